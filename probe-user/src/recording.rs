//! The recording file: everything one capture saw, self-contained (stacks already resolved to
//! names, memory maps kept) so it can be analysed later on another machine or after the target
//! has exited. The format is documented in docs/recording-format.md.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use probe_common::RawEvent;
use serde::{Deserialize, Serialize};

use crate::attach::AttachReport;
use crate::error::ProbeError;
use crate::events::{decode_raw, raw_event_bytes, Drained, Event, Timing};
use crate::output::{unwritable, write_atomic, AtomicFile};
use crate::own_cost::OwnCost;
use crate::symbolize::SymbolTable;
use crate::target::MemoryMap;

pub const MAGIC: &[u8; 8] = b"P99PROBE";
pub const FORMAT_VERSION: u32 = 2;

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelCounters {
    pub events_sent: u64,
    /// Events lost because the ring buffer was full.
    pub ring_buffer_full: u64,
    pub stacks_missing: u64,
    /// A thread took a state slot another thread held (see `Counter::StateMapFull`).
    pub state_map_full: u64,
    /// Requests not timed because another connection took their socket's slot.
    #[serde(default)]
    pub requests_untimed: u64,
    /// Off-CPU intervals whose stacks were not walked but repeat the thread's last walked ones
    /// (`FLAG_STACKS_REPEATED`). With `sched_switch` alone, which decides as the thread leaves
    /// the CPU, intervals left out afterwards are counted too.
    #[serde(default)]
    pub stacks_repeated: u64,
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
            "ring buffer: {} sent, {} lost to it full; timing rings: {} written, {} overwritten unread; {} off-CPU stacks repeated, not walked",
            self.events_sent,
            self.ring_buffer_full,
            self.timings_recorded,
            self.timings_overwritten,
            self.stacks_repeated
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
    /// What the agent's kernel programs cost while attached, up to the end of the recording
    /// (absent in older files, and when `--own-cost-every 0` turned measuring off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_cost: Option<OwnCost>,
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
    /// The events that are more than a [`Timing`], in time order.
    pub raw_events: Vec<RawEvent>,
    /// Request latencies and run-queue waits, in time order: most of a recording under load,
    /// held in a third of a [`RawEvent`]'s space.
    pub timings: Vec<Timing>,
}

impl Recording {
    /// A recording of `events`, in any order.
    pub fn new(meta: RecordingMeta, events: impl IntoIterator<Item = RawEvent>) -> Recording {
        let mut recording = Recording::unsorted(meta, events);
        recording.sort();
        recording
    }

    /// A recording of `events` left in their order, for a reader that sorts once at the end.
    fn unsorted(meta: RecordingMeta, events: impl IntoIterator<Item = RawEvent>) -> Recording {
        let mut recording = Recording {
            meta,
            raw_events: Vec::new(),
            timings: Vec::new(),
        };
        events.into_iter().for_each(|raw| recording.push(raw));
        recording
    }

    /// Adds `raw` where it belongs; [`Self::sort`] restores time order.
    fn push(&mut self, raw: RawEvent) {
        match Timing::of(&raw) {
            Some(timing) => self.timings.push(timing),
            None => self.raw_events.push(raw),
        }
    }

    /// Puts both kinds of event in time order. Unstable (in place): a stable sort would
    /// allocate half of a recording that can run to gigabytes.
    fn sort(&mut self) {
        self.raw_events.sort_unstable_by_key(|e| e.ts_ns);
        self.timings.sort_unstable_by_key(|t| t.ts_ns);
    }

    /// Every event, in time order.
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        let mut events = self.raw_events.iter().peekable();
        let mut timings = self.timings.iter().peekable();
        std::iter::from_fn(move || {
            let timing_first = match (events.peek(), timings.peek()) {
                (Some(event), Some(timing)) => timing.ts_ns < event.ts_ns,
                (None, Some(_)) => true,
                (_, None) => false,
            };
            if timing_first {
                timings.next().map(Timing::to_raw)
            } else {
                events.next().copied()
            }
        })
        .filter_map(|raw| Event::from_raw(&raw))
    }

    /// How many events the recording holds.
    pub fn len(&self) -> usize {
        self.raw_events.len() + self.timings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// The recording as the bytes of a file, in the current format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let write = || -> std::io::Result<Vec<u8>> {
            let mut body = Body::start(Vec::new(), self.meta.pid)?;
            body.events(&self.raw_events)?;
            body.timings(&self.timings)?;
            body.end(&self.meta)
        };
        write().expect("writing to memory does not fail")
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
        if !(1..=FORMAT_VERSION).contains(&version) {
            return Err(format!(
                "format version {version}, this p99probe reads versions 1 to {FORMAT_VERSION}"
            ));
        }
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err("checksum mismatch (truncated or modified file)".into());
        }
        let mut recording = match version {
            1 => read_version_1(&body[12..])?,
            _ => read_chunks(&body[12..])?,
        };
        // Streamed chunks follow the drains, which interleave CPUs and deliver some timings
        // late; analysis wants time order.
        recording.sort();
        Ok(recording)
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

/// Chunk tags of a version-2 file.
const CHUNK_END: u32 = 0;
const CHUNK_EVENTS: u32 = 1;
const CHUNK_TIMINGS: u32 = 2;
/// A timing in a version-2 file: time, duration, thread, CPU, kind.
const TIMING_SIZE: usize = 24;
/// Records per chunk at most: a chunk's count is a u32, and a chunk is built in memory.
const CHUNK_RECORDS: usize = 1 << 14;

/// The writing side of a version-2 file: the header, chunks of events as they come, then the
/// metadata (known only at the end: stacks, symbols, counters) and the checksum of it all.
struct Body<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    /// The target: a timing of another process is written as a whole event.
    pid: u32,
    events: u64,
    /// Where a chunk of timings is built, kept for the next.
    chunk: Vec<u8>,
}

impl<W: Write> Body<W> {
    fn start(out: W, pid: u32) -> std::io::Result<Self> {
        let mut body = Body {
            out,
            crc: crc32fast::Hasher::new(),
            pid,
            events: 0,
            chunk: Vec::new(),
        };
        body.put(MAGIC)?;
        body.put(&FORMAT_VERSION.to_le_bytes())?;
        Ok(body)
    }

    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }

    fn put_chunk_header(&mut self, tag: u32, records: usize) -> std::io::Result<()> {
        self.put(&tag.to_le_bytes())?;
        self.put(&(records as u32).to_le_bytes())?;
        self.events += records as u64;
        Ok(())
    }

    fn events(&mut self, events: &[RawEvent]) -> std::io::Result<()> {
        for records in events.chunks(CHUNK_RECORDS) {
            self.put_chunk_header(CHUNK_EVENTS, records.len())?;
            self.put(&raw_event_bytes(records))?;
        }
        Ok(())
    }

    fn timings(&mut self, timings: &[Timing]) -> std::io::Result<()> {
        let mut whole = Vec::new();
        for records in timings.chunks(CHUNK_RECORDS) {
            let mut chunk = std::mem::take(&mut self.chunk);
            chunk.clear();
            for timing in records {
                match compact_timing(timing, self.pid) {
                    Some(compact) => chunk.extend_from_slice(&compact),
                    None => whole.push(timing.to_raw()),
                }
            }
            let compact = chunk.len() / TIMING_SIZE;
            if compact > 0 {
                self.put_chunk_header(CHUNK_TIMINGS, compact)?;
                self.put(&chunk)?;
            }
            self.chunk = chunk;
        }
        self.events(&whole)
    }

    /// Writes the metadata and the checksum; returns the output.
    fn end(mut self, meta: &RecordingMeta) -> std::io::Result<W> {
        let meta = serde_json::to_vec(meta).expect("metadata serializes");
        self.put(&CHUNK_END.to_le_bytes())?;
        self.put(&(meta.len() as u64).to_le_bytes())?;
        self.put(&meta)?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        Ok(self.out)
    }
}

/// `timing` in a version-2 file's 24 bytes, if they hold it: it is the target's, and its CPU
/// and kind fit 16 bits.
fn compact_timing(timing: &Timing, pid: u32) -> Option<[u8; TIMING_SIZE]> {
    if timing.tgid != pid {
        return None;
    }
    let cpu = u16::try_from(timing.cpu).ok()?;
    let kind = u16::try_from(timing.kind).ok()?;
    let mut out = [0u8; TIMING_SIZE];
    out[0..8].copy_from_slice(&timing.ts_ns.to_le_bytes());
    out[8..16].copy_from_slice(&timing.duration_ns.to_le_bytes());
    out[16..20].copy_from_slice(&timing.tid.to_le_bytes());
    out[20..22].copy_from_slice(&cpu.to_le_bytes());
    out[22..24].copy_from_slice(&kind.to_le_bytes());
    Some(out)
}

fn timing_of_compact(bytes: &[u8], pid: u32) -> Timing {
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap());
    Timing {
        ts_ns: u64_at(0),
        duration_ns: u64_at(8),
        tid: u32::from_le_bytes(bytes[16..20].try_into().unwrap()),
        tgid: pid,
        cpu: u16_at(20).into(),
        kind: u16_at(22).into(),
    }
}

/// Splits `n` bytes off the front of `bytes`.
fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
    if bytes.len() < n {
        return Err(format!("{what} runs past the end of the file"));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_u32(bytes: &mut &[u8], what: &str) -> Result<u32, String> {
    Ok(u32::from_le_bytes(
        take(bytes, 4, what)?.try_into().unwrap(),
    ))
}

fn take_u64(bytes: &mut &[u8], what: &str) -> Result<u64, String> {
    Ok(u64::from_le_bytes(
        take(bytes, 8, what)?.try_into().unwrap(),
    ))
}

/// Splits the metadata (its u64 length, then its JSON) off the front of `bytes`.
fn take_metadata(bytes: &mut &[u8]) -> Result<RecordingMeta, String> {
    let length = take_u64(bytes, "the metadata's length")?;
    let length = usize::try_from(length).map_err(|_| "metadata length exceeds the file")?;
    serde_json::from_slice(take(bytes, length, "the metadata")?)
        .map_err(|e| format!("metadata: {e}"))
}

/// A version-2 file after its version, without the checksum; its events as they come.
fn read_chunks(mut bytes: &[u8]) -> Result<Recording, String> {
    let mut chunks = Vec::new();
    loop {
        let tag = take_u32(&mut bytes, "a chunk's header")?;
        if tag == CHUNK_END {
            break;
        }
        let count = take_u32(&mut bytes, "a chunk's header")? as usize;
        let size = match tag {
            CHUNK_EVENTS => RawEvent::SIZE,
            CHUNK_TIMINGS => TIMING_SIZE,
            _ => return Err(format!("unknown chunk tag {tag}")),
        };
        chunks.push((tag, take(&mut bytes, count * size, "a chunk")?));
    }
    let meta = take_metadata(&mut bytes)?;
    if !bytes.is_empty() {
        return Err(format!("{} stray bytes after the metadata", bytes.len()));
    }
    let mut recording = Recording::unsorted(meta, []);
    for (tag, records) in chunks {
        if tag == CHUNK_EVENTS {
            records
                .chunks_exact(RawEvent::SIZE)
                .for_each(|r| recording.push(decode_raw(r).expect("chunk has record size")));
        } else {
            let pid = recording.meta.pid;
            recording.timings.extend(
                records
                    .chunks_exact(TIMING_SIZE)
                    .map(|r| timing_of_compact(r, pid)),
            );
        }
    }
    Ok(recording)
}

/// A version-1 file after its version, without the checksum: the metadata, then every event
/// as a whole record; its events as they come.
fn read_version_1(mut bytes: &[u8]) -> Result<Recording, String> {
    let meta = take_metadata(&mut bytes)?;
    let count = take_u64(&mut bytes, "the event count")? as usize;
    if count.checked_mul(RawEvent::SIZE) != Some(bytes.len()) {
        return Err(format!(
            "{count} events declared but {} bytes of events present",
            bytes.len()
        ));
    }
    let events = bytes
        .chunks_exact(RawEvent::SIZE)
        .map(|chunk| decode_raw(chunk).expect("chunk has record size"));
    Ok(Recording::unsorted(meta, events))
}

/// A recording written to disk as it is captured, so that a long one does not have to fit in
/// the agent's memory: events go out in chunks as they are drained, the metadata at the end.
/// The file appears under its name only once finished; dropped unfinished, it is removed.
pub struct RecordingWriter {
    body: Body<AtomicFile>,
}

impl RecordingWriter {
    pub fn create(path: &Path, pid: u32) -> Result<RecordingWriter, ProbeError> {
        let file = AtomicFile::create(path)?;
        let path = file.path().to_owned();
        let body = Body::start(file, pid).map_err(|e| unwritable(&path, e))?;
        Ok(RecordingWriter { body })
    }

    /// Writes `drained` out (not necessarily to disk yet).
    pub fn append(&mut self, drained: &Drained) -> Result<(), ProbeError> {
        let result = self
            .body
            .events(&drained.events)
            .and_then(|()| self.body.timings(&drained.timings));
        result.map_err(|e| unwritable(self.body.out.path(), e))
    }

    /// Events written so far.
    pub fn events(&self) -> u64 {
        self.body.events
    }

    /// Writes the metadata and puts the file in place; returns how many events it holds.
    pub fn finish(self, meta: &RecordingMeta) -> Result<u64, ProbeError> {
        let events = self.body.events;
        let path = self.body.out.path().to_owned();
        let file = self.body.end(meta).map_err(|e| unwritable(&path, e))?;
        file.commit()?;
        Ok(events)
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
        let meta = RecordingMeta {
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
            own_cost: Some(OwnCost {
                measured_ns: 2_000_000_000,
                spans: 2,
                requests_served: 100_000,
                programs: vec![crate::own_cost::ProgramCost {
                    program: "sk_data_ready_btf".into(),
                    runs: 200_000,
                    run_time_ns: 26_000_000,
                }],
                unmeasured: None,
            }),
            threads: [(42, "server".to_string())].into_iter().collect(),
            maps: vec![],
            stacks: [(1, vec![0x1000, 0x2000])].into_iter().collect(),
            symbols,
        };
        let mut served = RawEvent::zeroed();
        served.kind = EventKind::RequestServed as u32;
        served.ts_ns = 1_000_500_000;
        served.duration_ns = 30_000;
        served.tid = 42;
        served.tgid = 42;
        events.push(served);
        Recording::new(meta, events)
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

    /// `recording` as version 1 wrote it: the metadata first, then every event whole.
    fn version_1_bytes(recording: &Recording) -> Vec<u8> {
        let meta = serde_json::to_vec(&recording.meta).unwrap();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&(recording.len() as u64).to_le_bytes());
        let timings = recording.timings.iter().map(Timing::to_raw);
        recording
            .raw_events
            .iter()
            .copied()
            .chain(timings)
            .for_each(|raw| crate::events::encode_raw(&raw, &mut out));
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn timing(ts_ns: u64, tgid: u32, kind: EventKind) -> Timing {
        Timing {
            ts_ns,
            duration_ns: 250_000,
            tid: 43,
            tgid,
            cpu: 1,
            kind: kind as u32,
        }
    }

    #[test]
    fn version_1_files_still_load() {
        let recording = sample_recording();
        assert_eq!(
            Recording::from_bytes(&version_1_bytes(&recording)).unwrap(),
            recording
        );
    }

    #[test]
    fn a_streamed_recording_holds_every_drain_in_time_order_and_timings_in_24_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streamed.p99");
        let sample = sample_recording();
        assert_eq!(sample.timings.len(), 1);
        let mut writer = RecordingWriter::create(&path, 42).unwrap();
        // Nothing under the name until it is finished.
        assert!(!path.exists());
        let first = Drained {
            events: sample.raw_events[5..].to_vec(),
            timings: vec![
                timing(1_000_000_500, 42, EventKind::RequestServed),
                // Another process's: kept whole.
                timing(1_000_000_600, 7, EventKind::RunQueue),
            ],
            ..Drained::default()
        };
        // A later drain can bring earlier events (a timing recorded at an acknowledgement).
        let second = Drained {
            events: sample.raw_events[..5].to_vec(),
            timings: vec![timing(999_000_000, 42, EventKind::RequestDelivered)],
            ..Drained::default()
        };
        writer.append(&first).unwrap();
        writer.append(&second).unwrap();
        assert_eq!(writer.events(), 13);
        assert_eq!(writer.finish(&sample.meta).unwrap(), 13);

        let loaded = Recording::load(&path).unwrap();
        let written = first.raw_events().chain(second.raw_events());
        assert_eq!(loaded, Recording::new(sample.meta.clone(), written));
        let times: Vec<u64> = loaded.events().map(|e| e.ts_ns()).collect();
        assert!(times.is_sorted(), "{times:?}");
        assert_eq!(times.len(), 13);
        // 10 events whole, one other process's timing whole, two timings compact, in five
        // chunks: each drain's events and compact timings, and the first drain's whole timing.
        let bytes = std::fs::read(&path).unwrap();
        let meta_len = serde_json::to_vec(&sample.meta).unwrap().len();
        let chunk_headers = 5 * 8;
        assert_eq!(
            bytes.len(),
            12 + chunk_headers + 11 * RawEvent::SIZE + 2 * TIMING_SIZE + 4 + 8 + meta_len + 4
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_unfinished_recording_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("unfinished.p99");
        let mut writer = RecordingWriter::create(&path, 42).unwrap();
        writer.append(&Drained::default()).unwrap();
        drop(writer);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
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
        let mut unknown_chunk = bytes[..bytes.len() - 4].to_vec();
        unknown_chunk[12] = 9;
        let crc = crc32fast::hash(&unknown_chunk);
        unknown_chunk.extend_from_slice(&crc.to_le_bytes());
        assert!(Recording::from_bytes(&unknown_chunk)
            .unwrap_err()
            .contains("unknown chunk tag 9"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.p99");
        std::fs::write(&path, &flipped).unwrap();
        let err = Recording::load(&path).unwrap_err().to_string();
        assert!(err.starts_with("corrupt recording"), "{err}");
    }
}
