//! What /proc says about the target process: identity, threads, memory maps. (Its listening
//! ports come from sock_diag: see [`crate::listeners`].)

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ProbeError;

/// One executable file mapping of the target, enough to turn an address into a file offset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMap {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    pub path: String,
}

impl MemoryMap {
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }
}

pub fn require_process(pid: u32) -> Result<(), ProbeError> {
    if pid == 0 || !PathBuf::from(format!("/proc/{pid}")).exists() {
        return Err(ProbeError::NoSuchProcess(pid));
    }
    Ok(())
}

/// Tells whether the target still runs, checked once a second: through a pidfd (Linux 5.3),
/// which becomes readable when the process exits, one cheap system call; else through
/// /proc/PID/stat, whose making took ~60 µs here, on a CPU the agent may share with the target.
pub struct Liveness {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl Liveness {
    pub fn new(pid: u32) -> Liveness {
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        // SAFETY: a descriptor just created, owned by nothing else.
        let pidfd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
        Liveness { pid, pidfd }
    }

    pub fn is_alive(&self) -> bool {
        let Some(pidfd) = &self.pidfd else {
            return is_alive(self.pid);
        };
        let mut poll = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        match unsafe { libc::poll(&mut poll, 1, 0) } {
            0 => true,
            1 => false,
            _ => is_alive(self.pid),
        }
    }
}

pub fn is_alive(pid: u32) -> bool {
    // A zombie keeps its /proc entry but has no threads to observe.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| format!("pid{pid}"))
}

pub fn exe(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
}

pub fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The ids of the target's live threads.
pub fn thread_ids(pid: u32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|entry| entry.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// tid → thread name for every live thread of the target.
pub fn thread_names(pid: u32) -> BTreeMap<u32, String> {
    names_of(pid, thread_ids(pid))
}

/// tid → thread name for those of `tids` still alive.
pub fn names_of(pid: u32, tids: impl IntoIterator<Item = u32>) -> BTreeMap<u32, String> {
    tids.into_iter()
        .filter_map(|tid| {
            let name = fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
            Some((tid, name.trim_end().to_string()))
        })
        .collect()
}

/// The CPUs any thread of the target may run on (the union of their affinities); empty when
/// none can be read. One `sched_getaffinity` per thread: reading each thread's
/// /proc status instead cost ~15 µs a thread here.
pub fn allowed_cpus(pid: u32) -> BTreeSet<u32> {
    let mut allowed = BTreeSet::new();
    for tid in thread_ids(pid) {
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // A thread that has just exited answers ESRCH and adds nothing.
        if unsafe { libc::sched_getaffinity(tid as libc::pid_t, size, &mut set) } != 0 {
            continue;
        }
        for cpu in 0..libc::CPU_SETSIZE as usize {
            if unsafe { libc::CPU_ISSET(cpu, &set) } {
                allowed.insert(cpu as u32);
            }
        }
    }
    allowed
}

/// A kernel CPU list (`0-3,8,10-11`), as in `Cpus_allowed_list` and sysfs; `None` when it is
/// not one.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for range in text.trim().split(',') {
        let (first, last): (u32, u32) = match range.split_once('-') {
            Some((first, last)) => (first.parse().ok()?, last.parse().ok()?),
            None => {
                let cpu = range.parse().ok()?;
                (cpu, cpu)
            }
        };
        if first > last {
            return None;
        }
        cpus.extend(first..=last);
    }
    Some(cpus)
}

/// Executable file-backed mappings from /proc/PID/maps.
pub fn executable_maps(pid: u32) -> Vec<MemoryMap> {
    fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|text| parse_maps(&text))
        .unwrap_or_default()
}

pub fn parse_maps(text: &str) -> Vec<MemoryMap> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let offset = fields.next()?;
            let _dev = fields.next()?;
            let _inode = fields.next()?;
            let path: Vec<&str> = fields.collect();
            let path = path.join(" ");
            if !perms.contains('x') || path.is_empty() {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            Some(MemoryMap {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                file_offset: u64::from_str_radix(offset, 16).ok()?,
                path,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("0-x"), None);
    }

    #[test]
    fn a_process_may_run_where_it_runs() {
        let cpus = allowed_cpus(std::process::id());
        let running_on = unsafe { libc::sched_getcpu() };
        assert!(running_on >= 0);
        assert!(
            cpus.contains(&(running_on as u32)),
            "{running_on} not in {cpus:?}"
        );
        assert!(allowed_cpus(u32::MAX).is_empty());
    }

    #[test]
    fn a_pinned_process_may_run_only_on_its_cpu() {
        let mut pinned = std::process::Command::new("taskset")
            .args(["-c", "0", "sleep", "5"])
            .spawn()
            .unwrap();
        // taskset sets the affinity, then becomes sleep.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while comm(pinned.id()) != "sleep" {
            assert!(
                std::time::Instant::now() < deadline,
                "taskset never ran sleep"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let cpus = allowed_cpus(pinned.id());
        pinned.kill().unwrap();
        pinned.wait().unwrap();
        assert_eq!(cpus, BTreeSet::from([0]));
    }

    #[test]
    fn an_exited_process_is_not_alive_even_unreaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let liveness = Liveness::new(child.id());
        assert!(
            liveness.pidfd.is_some(),
            "pidfd_open failed (Linux has it from 5.3)"
        );
        assert!(liveness.is_alive());
        // Exited and not yet waited for: a zombie, whose /proc entry is still there.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while is_alive(child.id()) {
            assert!(std::time::Instant::now() < deadline, "sleep 0.3 still runs");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!liveness.is_alive());
        child.wait().unwrap();
        assert!(!liveness.is_alive(), "reaped");
    }

    #[test]
    fn maps_keep_only_executable_file_mappings() {
        let text = "\
55d0a0000000-55d0a0001000 r--p 00000000 08:01 1234 /usr/bin/server
55d0a0001000-55d0a0005000 r-xp 00001000 08:01 1234 /usr/bin/server
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
7ffd1000000-7ffd1002000 r-xp 00000000 00:00 0 [vdso]
7f1000000000-7f1000100000 r-xp 00002000 08:01 99 /opt/my lib/libx.so";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 3);
        assert_eq!(maps[0].start, 0x55d0a0001000);
        assert_eq!(maps[0].file_offset, 0x1000);
        assert_eq!(maps[0].path, "/usr/bin/server");
        assert_eq!(maps[1].path, "[vdso]");
        assert_eq!(maps[2].path, "/opt/my lib/libx.so");
        assert!(maps[0].contains(0x55d0a0001000) && !maps[0].contains(0x55d0a0005000));
    }

    #[test]
    fn own_process_is_visible() {
        let me = std::process::id();
        require_process(me).unwrap();
        assert!(is_alive(me));
        assert!(thread_names(me).contains_key(&me));
        assert!(!executable_maps(me).is_empty());
        assert!(matches!(
            require_process(u32::MAX - 7),
            Err(ProbeError::NoSuchProcess(_))
        ));
    }
}
