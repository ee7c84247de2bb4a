//! Atomic output: every file is written to a temporary sibling and renamed into place, so a
//! reader never sees half a file and a failed write never clobbers an earlier good one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::ProbeError;

fn unwritable(path: &Path, reason: impl ToString) -> ProbeError {
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
    let temp = temp_sibling(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = fs::File::create(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(err) = result {
        let _ = fs::remove_file(&temp);
        return Err(unwritable(path, err));
    }
    Ok(())
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
