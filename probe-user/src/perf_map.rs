//! Names a JIT gives the code it generates, from the perf map it writes for profilers
//! (`/tmp/perf-PID.map`: Java with `-XX:+DumpPerfMapAtExit` or `jcmd PID Compiler.perfmap`,
//! Node with `--perf-basic-prof`, .NET with `DOTNET_PerfMapEnabled=1`). Generated code has no
//! file behind it, so without the map its frames are only `[unknown]`.
//!
//! blazesym reads these maps too, but only as part of symbolizing a live process through its
//! current /proc/PID/maps; p99probe symbolizes from the maps saved while recording, also after
//! the target has exited, so it reads the file itself (the format is a line of text per piece
//! of code).

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

/// Generated code's address ranges and names.
#[derive(Debug, Default)]
pub struct PerfMap {
    /// Start → (end, name).
    code: BTreeMap<u64, (u64, String)>,
}

impl PerfMap {
    /// The target's perf map, if it wrote one. While the target runs, the map is found through
    /// its own root and with its PID as its namespace sees it (a JIT in a container writes
    /// `/tmp/perf-1.map` in the container's /tmp); after it has exited, only a map on the
    /// host's /tmp under its host PID can be found.
    pub fn of_process(pid: u32) -> Option<PerfMap> {
        candidate_paths(pid)
            .into_iter()
            .find_map(|path| fs::read_to_string(path).ok())
            .map(|text| PerfMap::parse(&text))
    }

    /// Each line is `START SIZE name`, START and SIZE in hex (with or without `0x`), the name
    /// the rest of the line. JITs append as they generate code and may reuse freed memory, so
    /// a later line for the same start replaces an earlier one. Lines that do not parse are
    /// skipped: a JIT may be writing the last one as it is read.
    pub fn parse(text: &str) -> PerfMap {
        let mut code = BTreeMap::new();
        for line in text.lines() {
            let mut fields = line.splitn(3, ' ');
            let (Some(start), Some(size), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Some(start), Some(size)) = (hex(start), hex(size)) else {
                continue;
            };
            let name = name.trim();
            if size == 0 || name.is_empty() {
                continue;
            }
            code.insert(start, (start.saturating_add(size), name.to_string()));
        }
        PerfMap { code }
    }

    /// The name of the generated code at `addr`. Where ranges overlap (memory reused for other
    /// code), the one starting nearest below `addr` answers.
    pub fn name_at(&self, addr: u64) -> Option<&str> {
        let (_, (end, name)) = self.code.range(..=addr).next_back()?;
        (addr < *end).then_some(name.as_str())
    }
}

fn hex(field: &str) -> Option<u64> {
    let digits = field
        .strip_prefix("0x")
        .or_else(|| field.strip_prefix("0X"))
        .unwrap_or(field);
    u64::from_str_radix(digits, 16).ok()
}

fn candidate_paths(pid: u32) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(namespace_pid) = namespace_pid(pid) {
        paths.push(PathBuf::from(format!(
            "/proc/{pid}/root/tmp/perf-{namespace_pid}.map"
        )));
    }
    paths.push(PathBuf::from(format!("/tmp/perf-{pid}.map")));
    paths
}

/// The PID the process has in its own (innermost) PID namespace: the last field of `NSpid`.
fn namespace_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_give_ranges_and_names_with_spaces() {
        let map = PerfMap::parse(
            "7f0000001000 40 LazyCompile:*handle /srv/app.js:12\n\
             0x7f0000002000 0x10 Ljava/lang/String;::hashCode\n",
        );
        assert_eq!(
            map.name_at(0x7f00_0000_1000),
            Some("LazyCompile:*handle /srv/app.js:12")
        );
        assert_eq!(
            map.name_at(0x7f00_0000_103f),
            Some("LazyCompile:*handle /srv/app.js:12")
        );
        assert_eq!(map.name_at(0x7f00_0000_1040), None, "one past the end");
        assert_eq!(
            map.name_at(0x7f00_0000_2008),
            Some("Ljava/lang/String;::hashCode")
        );
        assert_eq!(map.name_at(0x7f00_0000_0fff), None);
    }

    #[test]
    fn later_code_at_the_same_start_replaces_earlier_and_bad_lines_are_skipped() {
        let map = PerfMap::parse(
            "1000 100 first\n\
             not a line\n\
             1000 20 second\n\
             2000 0 empty\n\
             3000 10\n\
             4000 1",
        );
        assert_eq!(map.name_at(0x1010), Some("second"));
        assert_eq!(map.name_at(0x1050), None, "the replaced code's tail");
        assert_eq!(map.name_at(0x2000), None);
        assert_eq!(map.name_at(0x3000), None);
        assert_eq!(map.name_at(0x4000), None, "a line still being written");
    }

    #[test]
    fn a_running_process_is_found_under_its_own_pid() {
        let pid = std::process::id();
        // getpid() answers in the process's own namespace, as the last NSpid field does.
        assert_eq!(namespace_pid(pid), Some(pid));
        assert_eq!(
            candidate_paths(pid),
            vec![
                PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{pid}.map")),
                PathBuf::from(format!("/tmp/perf-{pid}.map")),
            ]
        );
        assert!(PerfMap::of_process(u32::MAX).is_none());
    }
}
