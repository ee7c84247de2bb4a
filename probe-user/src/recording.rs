//! The recording file: everything one capture saw, self-contained (stacks already resolved to
//! names, memory maps kept) so it can be analysed later on another machine or after the target
//! has exited. The format is documented in docs/recording-format.md.

use std::collections::BTreeMap;
use std::path::Path;

use probe_common::RawEvent;
use serde::{Deserialize, Serialize};

use crate::attach::AttachReport;
use crate::error::ProbeError;
use crate::events::{decode_raw, encode_raw, Event};
use crate::output::write_atomic;
use crate::symbolize::SymbolTable;
use crate::target::MemoryMap;

pub const MAGIC: &[u8; 8] = b"P99PROBE";
pub const FORMAT_VERSION: u32 = 1;

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelCounters {
    pub events_sent: u64,
    /// Events lost because the ring buffer was full.
    pub ring_buffer_full: u64,
    pub stacks_missing: u64,
    pub state_map_full: u64,
    /// Requests not timed because another connection took their socket's slot.
    #[serde(default)]
    pub requests_untimed: u64,
    /// Request latencies and run-queue waits written to the kernel's timing rings (not in
    /// `events_sent`, which counts the ring buffer's events).
    #[serde(default)]
    pub timings_recorded: u64,
    /// Timings the kernel overwrote in its rings before the agent read them.
    #[serde(default)]
    pub timings_overwritten: u64,
    /// A capture only: when it fired, the kernel's timing rings had overwritten the request
    /// latencies and run-queue waits from before this time (CLOCK_MONOTONIC ns), which is
    /// after the capture's start: a busy CPU's ring filled up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings_lost_before_ns: Option<u64>,
}

impl KernelCounters {
    /// Events the kernel produced: through the ring buffer and into the timing rings.
    pub fn produced(&self) -> u64 {
        self.events_sent + self.timings_recorded
    }

    /// Events lost before the agent read them: the ring buffer full, or a timing overwritten.
    pub fn lost(&self) -> u64 {
        self.ring_buffer_full + self.timings_overwritten
    }

    /// How the totals split, for the end of a summary line.
    pub fn breakdown(&self) -> String {
        format!(
            "ring buffer: {} sent, {} lost to it full; timing rings: {} written, {} overwritten unread",
            self.events_sent, self.ring_buffer_full, self.timings_recorded, self.timings_overwritten
        )
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordSettings {
    pub sample_hz: u64,
    pub min_offcpu_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordingMeta {
    pub format_version: u32,
    pub tool_version: String,
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    /// CLOCK_MONOTONIC (the events' clock) at the start and end of the capture.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Wall-clock time of `start_ns`, milliseconds since the Unix epoch.
    pub start_unix_ms: u64,
    /// The target exited before the capture ended.
    pub target_exited: bool,
    pub hooks: AttachReport,
    pub settings: RecordSettings,
    pub counters: KernelCounters,
    /// tid → thread name.
    pub threads: BTreeMap<u32, String>,
    pub maps: Vec<MemoryMap>,
    /// Stack-map id → addresses, leaf first.
    pub stacks: BTreeMap<u32, Vec<u64>>,
    pub symbols: SymbolTable,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Recording {
    pub meta: RecordingMeta,
    /// In time order.
    pub raw_events: Vec<RawEvent>,
}

impl Recording {
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        self.raw_events.iter().filter_map(Event::from_raw)
    }

    /// Root-first function names for a stack id (empty when the stack was not captured).
    pub fn stack_names(&self, id: Option<u32>) -> Vec<String> {
        id.and_then(|id| self.meta.stacks.get(&id))
            .map(|addrs| self.meta.symbols.stack_root_first(addrs))
            .unwrap_or_default()
    }

    pub fn duration_ns(&self) -> u64 {
        self.meta.end_ns.saturating_sub(self.meta.start_ns)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let meta = serde_json::to_vec(&self.meta).expect("metadata serializes");
        let mut out = Vec::with_capacity(32 + meta.len() + self.raw_events.len() * RawEvent::SIZE);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&(self.raw_events.len() as u64).to_le_bytes());
        for raw in &self.raw_events {
            encode_raw(raw, &mut out);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Recording, String> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err("not a p99probe recording (bad magic)".into());
        }
        if bytes.len() < 8 + 4 + 8 + 8 + 4 {
            return Err("truncated header".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let version = u32::from_le_bytes(body[8..12].try_into().unwrap());
        if version != FORMAT_VERSION {
            return Err(format!(
                "format version {version}, this p99probe reads version {FORMAT_VERSION}"
            ));
        }
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err("checksum mismatch (truncated or modified file)".into());
        }
        let meta_len = u64::from_le_bytes(body[12..20].try_into().unwrap()) as usize;
        let meta_end = 20usize
            .checked_add(meta_len)
            .filter(|&end| end + 8 <= body.len())
            .ok_or("metadata length exceeds the file")?;
        let meta: RecordingMeta =
            serde_json::from_slice(&body[20..meta_end]).map_err(|e| format!("metadata: {e}"))?;
        let count = u64::from_le_bytes(body[meta_end..meta_end + 8].try_into().unwrap()) as usize;
        let events = &body[meta_end + 8..];
        if count.checked_mul(RawEvent::SIZE) != Some(events.len()) {
            return Err(format!(
                "{count} events declared but {} bytes of events present",
                events.len()
            ));
        }
        let raw_events = events
            .chunks_exact(RawEvent::SIZE)
            .map(|chunk| decode_raw(chunk).expect("chunk has record size"))
            .collect();
        Ok(Recording { meta, raw_events })
    }

    pub fn save(&self, path: &Path) -> Result<(), ProbeError> {
        write_atomic(path, &self.to_bytes())
    }

    pub fn load(path: &Path) -> Result<Recording, ProbeError> {
        let bytes = std::fs::read(path).map_err(|e| ProbeError::UnreadableRecording {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Recording::from_bytes(&bytes).map_err(|reason| ProbeError::CorruptRecording {
            path: path.display().to_string(),
            reason,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use probe_common::EventKind;

    pub fn sample_recording() -> Recording {
        let mut events = Vec::new();
        for i in 0..10u64 {
            let mut raw = RawEvent::zeroed();
            raw.kind = EventKind::OffCpu as u32;
            raw.ts_ns = 1_000_000_000 + i * 1_000_000;
            raw.duration_ns = 20_000_000;
            raw.tid = 42;
            raw.tgid = 42;
            raw.user_stack_id = 1;
            events.push(raw);
        }
        let symbols = SymbolTable {
            frames: [
                (0x1000, vec!["stall_here".to_string()]),
                (0x1fff, vec!["main".to_string()]),
            ]
            .into_iter()
            .collect(),
        };
        Recording {
            meta: RecordingMeta {
                format_version: FORMAT_VERSION,
                tool_version: "test".into(),
                pid: 42,
                comm: "server".into(),
                exe: Some("/usr/bin/server".into()),
                cmdline: vec!["server".into()],
                start_ns: 1_000_000_000,
                end_ns: 2_000_000_000,
                start_unix_ms: 0,
                target_exited: false,
                hooks: AttachReport::default(),
                settings: RecordSettings {
                    sample_hz: 499,
                    min_offcpu_ns: 1_000_000,
                },
                counters: KernelCounters::default(),
                threads: [(42, "server".to_string())].into_iter().collect(),
                maps: vec![],
                stacks: [(1, vec![0x1000, 0x2000])].into_iter().collect(),
                symbols,
            },
            raw_events: events,
        }
    }

    #[test]
    fn round_trips_through_bytes_and_disk() {
        let recording = sample_recording();
        assert_eq!(
            Recording::from_bytes(&recording.to_bytes()).unwrap(),
            recording
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.p99");
        recording.save(&path).unwrap();
        assert_eq!(Recording::load(&path).unwrap(), recording);
        assert_eq!(recording.stack_names(Some(1)), vec!["main", "stall_here"]);
    }

    #[test]
    fn corruption_is_detected_with_a_reason() {
        let bytes = sample_recording().to_bytes();
        let mut flipped = bytes.clone();
        flipped[40] ^= 0xff;
        assert!(Recording::from_bytes(&flipped)
            .unwrap_err()
            .contains("checksum"));
        assert!(Recording::from_bytes(&bytes[..bytes.len() - 100])
            .unwrap_err()
            .contains("checksum"));
        assert!(Recording::from_bytes(b"hello")
            .unwrap_err()
            .contains("magic"));
        let mut future = bytes.clone();
        future[8] = 9;
        assert!(Recording::from_bytes(&future)
            .unwrap_err()
            .contains("version 9"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.p99");
        std::fs::write(&path, &flipped).unwrap();
        let err = Recording::load(&path).unwrap_err().to_string();
        assert!(err.starts_with("corrupt recording"), "{err}");
    }
}
