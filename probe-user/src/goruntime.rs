//! Go targets: detect them (build info in the ELF), name the runtime functions to probe, pair
//! the probes into GC cycles and stop-the-world pauses, and classify on-CPU samples into GC,
//! Go scheduler/runtime, syscalls and application code.

use std::collections::BTreeMap;
use std::path::Path;

use object::{Object, ObjectSection};
use probe_common::{GO_GC_MARK_TERMINATION, GO_GC_START, GO_START_THE_WORLD, GO_STOP_THE_WORLD};
use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::recording::Recording;
use crate::window::Window;

/// What the agent found and attached for a Go target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoInfo {
    pub version: String,
    /// `uprobe/<symbol>` for each runtime probe attached.
    pub probes: Vec<String>,
    /// Probes that could not be attached, with why.
    pub missing: Vec<String>,
}

/// (kernel program, runtime symbol) — entry probes present in Go 1.14 through 1.23.
pub const PROBES: &[(&str, &str)] = &[
    ("go_stop_the_world", "runtime.stopTheWorldWithSema"),
    ("go_start_the_world", "runtime.startTheWorldWithSema"),
    ("go_gc_start", "runtime.gcStart"),
    ("go_gc_mark_termination", "runtime.gcMarkTermination"),
];

const BUILDINFO_MAGIC: &[u8] = b"\xff Go buildinf:";

/// The Go version a binary was built with, from its `.go.buildinfo` section; `None` if it is
/// not a Go binary.
pub fn go_version(path: &Path) -> Option<String> {
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    let section = file.section_by_name(".go.buildinfo")?;
    let info = section.data().ok()?;
    if !info.starts_with(BUILDINFO_MAGIC) || info.len() < 32 {
        return None;
    }
    let pointer_size = info[14] as usize;
    let flags = info[15];
    if flags & 2 != 0 {
        // Go 1.18+: length-prefixed strings inline, from offset 32.
        let (len, used) = uvarint(&info[32..])?;
        let start = 32 + used;
        return info
            .get(start..start + len as usize)
            .map(|v| String::from_utf8_lossy(v).into_owned());
    }
    // Before 1.18: a pointer to a Go string header {data, len} elsewhere in the binary.
    let big_endian = flags & 1 != 0;
    let read_ptr = |bytes: &[u8]| -> Option<u64> {
        let b = bytes.get(..pointer_size)?;
        Some(match (pointer_size, big_endian) {
            (8, false) => u64::from_le_bytes(b.try_into().ok()?),
            (8, true) => u64::from_be_bytes(b.try_into().ok()?),
            (4, false) => u32::from_le_bytes(b.try_into().ok()?) as u64,
            (4, true) => u32::from_be_bytes(b.try_into().ok()?) as u64,
            _ => return None,
        })
    };
    let at = |address: u64, len: usize| -> Option<&[u8]> {
        file.sections().find_map(|s| {
            let offset = address.checked_sub(s.address())?;
            (offset < s.size())
                .then(|| s.data().ok())?
                .and_then(|d| d.get(offset as usize..offset as usize + len))
        })
    };
    let header_addr = read_ptr(&info[16..])?;
    let header = at(header_addr, 2 * pointer_size)?;
    let text = read_ptr(header)?;
    let len = read_ptr(&header[pointer_size..])? as usize;
    at(text, len).map(|v| String::from_utf8_lossy(v).into_owned())
}

fn uvarint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// What a Go on-CPU sample was doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleClass {
    /// Background mark workers: GC's own 25% of GOMAXPROCS (and idle-time marking).
    GcMarkWorker,
    /// Mark assists: goroutines made to mark because they allocate while GC runs.
    GcAssist,
    /// Sweeping and other GC work.
    GcOther,
    /// The Go scheduler and runtime housekeeping (finding work, parking, sysmon).
    Scheduler,
    /// In the kernel on behalf of a system call.
    Syscall,
    Application,
}

impl SampleClass {
    pub fn is_gc(self) -> bool {
        matches!(
            self,
            SampleClass::GcMarkWorker | SampleClass::GcAssist | SampleClass::GcOther
        )
    }
}

/// Classifies one root-first stack (as in folded output: process name first, kernel frames
/// with `_[k]`).
pub fn classify(frames: &[&str]) -> SampleClass {
    let has = |name: &str| frames.contains(&name);
    let has_prefix = |prefix: &str| frames.iter().any(|f| f.starts_with(prefix));
    if has("runtime.gcBgMarkWorker") {
        return SampleClass::GcMarkWorker;
    }
    if has("runtime.gcAssistAlloc") || has("runtime.gcAssistAlloc1") {
        return SampleClass::GcAssist;
    }
    if has("runtime.bgsweep")
        || has("runtime.bgscavenge")
        || has("runtime.sweepone")
        || has("runtime.gcStart")
        || has("runtime.gcMarkDone")
        || has("runtime.gcMarkTermination")
        || has_prefix("runtime.markroot")
        || has("runtime.gcDrain")
    {
        return SampleClass::GcOther;
    }
    let user: Vec<&str> = frames
        .iter()
        .skip(1)
        .filter(|f| !f.ends_with("_[k]"))
        .copied()
        .collect();
    let kernel_syscall = frames
        .iter()
        .any(|f| f.starts_with("entry_SYSCALL") || f.starts_with("do_syscall"));
    let scheduler_roots = [
        "runtime.mstart",
        "runtime.mcall",
        "runtime.sysmon",
        "runtime.schedule",
        "runtime.findRunnable",
        "runtime.findrunnable",
        "runtime.park_m",
        "runtime.goexit0",
        "runtime.morestack",
    ];
    let in_scheduler = user.iter().any(|f| scheduler_roots.contains(f))
        && !user
            .iter()
            .any(|f| f.starts_with("main.") || f.contains(".(*") && !f.starts_with("runtime."));
    if in_scheduler {
        return SampleClass::Scheduler;
    }
    if kernel_syscall {
        return SampleClass::Syscall;
    }
    SampleClass::Application
}

/// GC cycles and stop-the-world pauses in a recording, paired from the entry probes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GcActivity {
    /// (start, end) of each stop-the-world pause.
    pub pauses: Vec<(u64, u64)>,
    /// (gcStart, gcMarkTermination) of each cycle.
    pub cycles: Vec<(u64, u64)>,
}

pub fn gc_activity(recording: &Recording) -> GcActivity {
    let mut activity = GcActivity::default();
    let mut stopped: Option<u64> = None;
    let mut started_gc: Option<u64> = None;
    for event in recording.events() {
        if let Event::GoRuntime { ts_ns, which, .. } = event {
            match which {
                GO_STOP_THE_WORLD => stopped = Some(ts_ns),
                GO_START_THE_WORLD => {
                    if let Some(start) = stopped.take() {
                        activity.pauses.push((start, ts_ns));
                    }
                }
                GO_GC_START => started_gc = Some(ts_ns),
                GO_GC_MARK_TERMINATION => {
                    if let Some(start) = started_gc.take() {
                        activity.cycles.push((start, ts_ns));
                    }
                }
                _ => {}
            }
        }
    }
    activity
}

/// Go runtime numbers for a set of windows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GoStats {
    /// GC cycles that started inside the windows.
    pub gc_cycles: usize,
    pub stw_pauses: usize,
    pub stw_total_ns: u64,
    pub stw_longest_ns: u64,
    /// Stop-the-world time per second of wall time.
    pub stw_ms_per_s: f64,
    /// CPU milliseconds per second by class (from on-CPU samples).
    pub cpu_ms_per_s: BTreeMap<SampleClass, f64>,
    /// Share of the target's sampled CPU spent in GC, and in mark assists alone.
    pub gc_cpu_share: f64,
    pub assist_cpu_share: f64,
}

pub fn go_stats(
    recording: &Recording,
    windows: &[Window],
    on_cpu: &crate::flamegraph::Folded,
    seconds: f64,
) -> GoStats {
    let activity = gc_activity(recording);
    let inside = |ts: u64| windows.iter().any(|w| w.contains(ts));
    let overlap = |(start, end): (u64, u64)| -> u64 {
        windows.iter().map(|w| w.overlap(end, end - start)).sum()
    };
    let pauses: Vec<u64> = activity
        .pauses
        .iter()
        .filter(|p| overlap(**p) > 0)
        .map(|(s, e)| e - s)
        .collect();
    let stw_total_ns: u64 = activity.pauses.iter().map(|p| overlap(*p)).sum();
    let ms_per_sample = 1e3 / recording.meta.settings.sample_hz.max(1) as f64;
    let mut samples: BTreeMap<SampleClass, u64> = BTreeMap::new();
    for (stack, count) in on_cpu {
        let frames: Vec<&str> = stack.split(';').collect();
        *samples.entry(classify(&frames)).or_default() += count;
    }
    let total: u64 = samples.values().sum();
    let share = |pred: fn(SampleClass) -> bool| -> f64 {
        samples
            .iter()
            .filter(|(c, _)| pred(**c))
            .map(|(_, n)| *n)
            .sum::<u64>() as f64
            / total.max(1) as f64
    };
    let per_second = |x: f64| if seconds > 0.0 { x / seconds } else { 0.0 };
    GoStats {
        gc_cycles: activity.cycles.iter().filter(|(s, _)| inside(*s)).count(),
        stw_pauses: pauses.len(),
        stw_total_ns,
        stw_longest_ns: pauses.iter().copied().max().unwrap_or(0),
        stw_ms_per_s: per_second(stw_total_ns as f64 / 1e6),
        cpu_ms_per_s: samples
            .iter()
            .map(|(c, n)| (*c, per_second(*n as f64 * ms_per_sample)))
            .collect(),
        gc_cpu_share: share(SampleClass::is_gc),
        assist_cpu_share: share(|c| c == SampleClass::GcAssist),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let c = |s: &str| classify(&s.split(';').collect::<Vec<_>>());
        assert_eq!(
            c("srv;runtime.goexit;runtime.gcBgMarkWorker;runtime.gcDrain;runtime.scanobject"),
            SampleClass::GcMarkWorker
        );
        assert_eq!(
            c("srv;runtime.goexit;main.handler;runtime.mallocgc;runtime.gcAssistAlloc;runtime.gcAssistAlloc1;runtime.gcDrainN"),
            SampleClass::GcAssist
        );
        assert_eq!(
            c("srv;runtime.goexit;runtime.bgsweep;runtime.sweepone"),
            SampleClass::GcOther
        );
        assert_eq!(
            c("srv;runtime.mstart;runtime.mstart1;runtime.schedule;runtime.findRunnable"),
            SampleClass::Scheduler
        );
        assert_eq!(
            c("srv;runtime.goexit;main.handler;syscall.write;entry_SYSCALL_64_after_hwframe_[k];do_syscall_64_[k]"),
            SampleClass::Syscall
        );
        assert_eq!(
            c("srv;runtime.goexit;main.handler;main.spinHere"),
            SampleClass::Application
        );
        assert!(SampleClass::GcAssist.is_gc() && !SampleClass::Application.is_gc());
    }

    #[test]
    fn uvarints() {
        assert_eq!(uvarint(&[0x07]), Some((7, 1)));
        assert_eq!(uvarint(&[0xac, 0x02]), Some((300, 2)));
        assert_eq!(uvarint(&[0x80]), None);
    }

    #[test]
    fn non_go_binaries_have_no_version() {
        assert_eq!(go_version(Path::new("/bin/sh")), None);
        assert_eq!(go_version(Path::new("/nonexistent")), None);
    }
}
