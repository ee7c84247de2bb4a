//! Atomic output: every file is written to a temporary sibling and renamed into place, so a
//! reader never sees half a file and a failed write never clobbers an earlier good one.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::ProbeError;

pub fn unwritable(path: &Path, reason: impl ToString) -> ProbeError {
    ProbeError::Unwritable {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), ProbeError> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(contents).map_err(|e| unwritable(path, e))?;
    file.commit()
}

/// A file written under a temporary name and renamed into place by [`AtomicFile::commit`]; the
/// temporary file is removed if it is dropped uncommitted. For output that is written as it
/// comes (a recording streamed to disk) rather than from one buffer.
pub struct AtomicFile {
    path: PathBuf,
    temp: PathBuf,
    /// `None` once committed.
    file: Option<BufWriter<fs::File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<AtomicFile, ProbeError> {
        if path.is_dir() {
            return Err(unwritable(path, "is a directory"));
        }
        let temp = temp_sibling(path);
        let file = fs::File::create(&temp).map_err(|e| unwritable(path, e))?;
        Ok(AtomicFile {
            path: path.to_owned(),
            temp,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes, syncs and renames the file into place.
    pub fn commit(mut self) -> Result<(), ProbeError> {
        let file = self.file.take().expect("committed once");
        let result = (|| -> std::io::Result<()> {
            file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            fs::rename(&self.temp, &self.path)
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&self.temp);
            unwritable(&self.path, e)
        })
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("not committed").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Fails early, before anything is attached, if `path` could not be written later.
pub fn check_writable(path: &Path) -> Result<(), ProbeError> {
    if path.is_dir() {
        return Err(unwritable(path, "is a directory"));
    }
    let temp = temp_sibling(path);
    fs::File::create(&temp).map_err(|e| unwritable(path, e))?;
    let _ = fs::remove_file(&temp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_uncommitted_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.p99");
        write_atomic(&path, b"good").unwrap();
        let mut file = AtomicFile::create(&path).unwrap();
        file.write_all(b"half").unwrap();
        drop(file);
        assert_eq!(fs::read(&path).unwrap(), b"good");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn unwritable_paths_are_reported() {
        let err = check_writable(Path::new("/proc/definitely/not/here.p99")).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot write output /proc/definitely"));
        let dir = tempfile::tempdir().unwrap();
        assert!(check_writable(dir.path()).is_err());
        assert!(check_writable(&dir.path().join("ok.p99")).is_ok());
    }
}
