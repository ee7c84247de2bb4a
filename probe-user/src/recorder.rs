//! The live capture: drain the kernel's ring buffer while the target runs, then resolve stacks
//! and write a self-contained recording.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aya::maps::{MapData, PerCpuArray, RingBuf, StackTraceMap};
use aya::Ebpf;
use probe_common::{Counter, RawEvent, ThreadState};
use tokio::io::unix::AsyncFd;

use crate::attach::{
    attach, attach_err, kernel_map, kernel_map_mut, AttachReport, AttachedProbes, ProbeSettings,
};
use crate::error::ProbeError;
use crate::events::{decode_ring_record, Event};
use crate::output::check_writable;
use crate::recording::{KernelCounters, RecordSettings, Recording, RecordingMeta, FORMAT_VERSION};
use crate::symbolize::{symbolize_stacks, trim_tracing_frames};
use crate::target::{self, MemoryMap};

#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub probe: ProbeSettings,
    /// Stop after this long; `None` records until the stop future resolves or the target exits.
    pub duration: Option<Duration>,
    pub out: PathBuf,
    /// Show a live status line on stderr (hidden automatically when stderr is not a terminal).
    pub progress: bool,
}

#[derive(Clone, Debug)]
pub struct RecordSummary {
    pub path: PathBuf,
    pub events: usize,
    pub counters: KernelCounters,
    pub hooks: AttachReport,
    pub target_exited: bool,
}

/// How often the agent drains the ring buffer when the kernel has not woken it.
const DRAIN_INTERVAL: Duration = Duration::from_millis(20);

/// How long a request may wait in a CPU's batch in the kernel before the agent has it sent.
/// With the drain interval, the trigger sees a request at most ~50 ms after it ended.
const BATCH_STALE_NS: u64 = 30_000_000;

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Makes the agent (this thread and those it starts later) give way to the target and its
/// load; says how it runs. It still works as an ordinary task when the kernel refuses.
fn give_way_to_target() -> String {
    match crate::scheduling::yield_to_target() {
        Ok(scheduling) => scheduling.to_string(),
        Err(e) => format!("ordinary task (sched_setattr: {e})"),
    }
}

fn drain(ring: &mut RingBuf<MapData>, events: &mut Vec<RawEvent>) {
    while let Some(item) = ring.next() {
        decode_ring_record(&item, events);
    }
}

fn read_counters(ebpf: &Ebpf) -> Result<KernelCounters, ProbeError> {
    let counters: PerCpuArray<_, u64> = kernel_map(ebpf, "COUNTERS")?;
    let sum = |c: Counter| -> u64 {
        counters
            .get(&(c as u32), 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    };
    Ok(KernelCounters {
        events_sent: sum(Counter::EventsSent),
        ring_buffer_full: sum(Counter::RingBufferFull),
        stacks_missing: sum(Counter::StackMissing),
        state_map_full: sum(Counter::StateMapFull),
    })
}

fn read_stacks(ebpf: &Ebpf, events: &[RawEvent]) -> Result<BTreeMap<u32, Vec<u64>>, ProbeError> {
    let map: StackTraceMap<_> = kernel_map(ebpf, "STACKS")?;
    let mut ids = BTreeSet::new();
    for event in events.iter().filter_map(Event::from_raw) {
        if let Event::OffCpu {
            kernel_stack,
            user_stack,
            ..
        }
        | Event::OnCpuSample {
            kernel_stack,
            user_stack,
            ..
        } = event
        {
            ids.extend(kernel_stack);
            ids.extend(user_stack);
        }
    }
    let mut stacks = BTreeMap::new();
    for id in ids {
        if let Ok(trace) = map.get(&id, 0) {
            stacks.insert(id, trace.frames().iter().map(|f| f.ip).collect());
        }
    }
    Ok(stacks)
}

fn merge_maps(known: &mut Vec<MemoryMap>, current: Vec<MemoryMap>) {
    for map in current {
        if !known.contains(&map) {
            known.push(map);
        }
    }
}

/// The kernel programs attached to one target, with what /proc says about it. Shared by
/// `record` and `attach`.
pub struct LiveSession {
    attached: AttachedProbes,
    ring: AsyncFd<RingBuf<MapData>>,
    pub pid: u32,
    pub start_ns: u64,
    pub start_unix_ms: u64,
    pub comm: String,
    exe: Option<String>,
    cmdline: Vec<String>,
    threads: BTreeMap<u32, String>,
    maps: Vec<MemoryMap>,
    settings: RecordSettings,
    /// Stack ids nothing referred to at the last [`LiveSession::sweep_stacks`].
    unreferenced_stacks: BTreeSet<u32>,
    ports_read_ns: u64,
}

/// How often the target's listening ports are re-read while attached: a listener opened after
/// attach has its connections timed from then on.
const PORTS_REREAD_NS: u64 = 2_000_000_000;

impl LiveSession {
    pub fn start(probe: &ProbeSettings) -> Result<LiveSession, ProbeError> {
        let pid = probe.pid;
        let mut attached = attach(probe)?;
        attached.report.agent = Some(give_way_to_target());
        let ring = RingBuf::try_from(
            attached
                .ebpf
                .take_map("EVENTS")
                .ok_or_else(|| attach_err("EVENTS", "map missing"))?,
        )
        .map_err(|e| attach_err("EVENTS", e))?;
        // SAFETY: the RingBuf owns its map fd and keeps it open until the AsyncFd (which owns
        // the RingBuf) is dropped.
        let ring =
            unsafe { AsyncFd::register(ring) }.map_err(|e| attach_err("EVENTS", e.to_string()))?;
        Ok(LiveSession {
            attached,
            ring,
            pid,
            start_ns: monotonic_ns(),
            start_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            comm: target::comm(pid),
            exe: target::exe(pid),
            cmdline: target::cmdline(pid),
            threads: target::thread_names(pid),
            maps: target::executable_maps(pid),
            settings: RecordSettings {
                sample_hz: probe.sample_hz,
                min_offcpu_ns: probe.min_offcpu_ns,
            },
            unreferenced_stacks: BTreeSet::new(),
            ports_read_ns: monotonic_ns(),
        })
    }

    pub fn hooks(&self) -> &AttachReport {
        &self.attached.report
    }

    /// Waits until the kernel wakes us (its buffer is filling) or the poll interval passes,
    /// then drains every event into `out`. The kernel does not wake the agent per event: at
    /// hundreds of thousands of events a second those wakeups would cost more than the events.
    pub async fn next_events(&mut self, out: &mut Vec<RawEvent>) -> Result<(), ProbeError> {
        match tokio::time::timeout(DRAIN_INTERVAL, self.ring.readable_mut()).await {
            Ok(guard) => {
                let mut guard = guard.map_err(|e| attach_err("EVENTS", e))?;
                drain(guard.get_inner_mut(), out);
                guard.clear_ready();
            }
            Err(_) => {
                let stale_before = monotonic_ns().saturating_sub(BATCH_STALE_NS);
                self.attached.flush_request_batches(stale_before)?;
                drain(self.ring.get_mut(), out);
            }
        }
        Ok(())
    }

    /// Frees the kernel stack map's entries that nothing refers to any more, and returns how
    /// many. The kernel never empties that map and it has a fixed size: in a long attach it
    /// fills, and from then on new stacks are lost. An entry stays while `live` (the events
    /// still held for captures) or a thread's unfinished off-CPU interval refers to it. It is
    /// removed only when it was unreferenced at the previous sweep as well, because the kernel
    /// may have just stored its id in an event the agent has not drained yet.
    pub fn sweep_stacks<'a>(
        &mut self,
        live: impl Iterator<Item = &'a RawEvent>,
    ) -> Result<usize, ProbeError> {
        let mut referenced = BTreeSet::new();
        let mut hold = |ids: [i32; 2]| {
            for id in ids {
                if let Ok(id) = u32::try_from(id) {
                    referenced.insert(id);
                }
            }
        };
        for event in live {
            hold([event.kernel_stack_id, event.user_stack_id]);
        }
        let threads: aya::maps::HashMap<_, u32, ThreadState> =
            kernel_map(&self.attached.ebpf, "THREADS")?;
        for (_, thread) in threads.iter().flatten() {
            hold([thread.kernel_stack_id, thread.user_stack_id]);
        }
        let mut stacks: StackTraceMap<_> = kernel_map_mut(&mut self.attached.ebpf, "STACKS")?;
        let present: Vec<u32> = stacks.stack_ids().flatten().collect();
        let mut unreferenced = BTreeSet::new();
        let mut freed = 0;
        for id in present.into_iter().filter(|id| !referenced.contains(id)) {
            if !self.unreferenced_stacks.contains(&id) {
                unreferenced.insert(id);
            } else if stacks.remove(&id).is_ok() {
                freed += 1;
            }
        }
        self.unreferenced_stacks = unreferenced;
        Ok(freed)
    }

    /// Drains everything the kernel holds, including partly filled request batches.
    pub fn drain_now(&mut self, out: &mut Vec<RawEvent>) {
        if let Err(e) = self.attached.flush_request_batches(u64::MAX) {
            log::warn!("request batches not flushed: {e}");
        }
        drain(self.ring.get_mut(), out);
    }

    /// Re-reads threads and maps; false once the target has exited.
    pub fn refresh_target(&mut self) -> bool {
        if !target::is_alive(self.pid) {
            return false;
        }
        self.threads.extend(target::thread_names(self.pid));
        merge_maps(&mut self.maps, target::executable_maps(self.pid));
        let now = monotonic_ns();
        if now.saturating_sub(self.ports_read_ns) >= PORTS_REREAD_NS {
            self.ports_read_ns = now;
            if let Err(e) = self.attached.mark_listening_ports() {
                log::warn!("listening ports not re-read: {e}");
            }
        }
        true
    }

    pub fn counters(&self) -> Result<KernelCounters, ProbeError> {
        read_counters(&self.attached.ebpf)
    }

    /// Everything a recording of `events` needs from the live kernel; symbolizing it (slow,
    /// no kernel needed) is left to [`PendingRecording::finish`].
    pub fn snapshot(
        &self,
        events: Vec<RawEvent>,
        start_ns: u64,
        end_ns: u64,
        target_exited: bool,
    ) -> Result<PendingRecording, ProbeError> {
        let stacks = read_stacks(&self.attached.ebpf, &events)?;
        let mut events = events;
        // Kernel timestamps are taken before the ring-buffer reservation, so CPUs interleave.
        events.sort_by_key(|e| e.ts_ns);
        Ok(PendingRecording {
            meta: RecordingMeta {
                format_version: FORMAT_VERSION,
                tool_version: env!("CARGO_PKG_VERSION").into(),
                pid: self.pid,
                comm: self.comm.clone(),
                exe: self.exe.clone(),
                cmdline: self.cmdline.clone(),
                start_ns,
                end_ns,
                start_unix_ms: self.start_unix_ms
                    + start_ns.saturating_sub(self.start_ns) / 1_000_000,
                target_exited,
                hooks: self.attached.report.clone(),
                settings: self.settings.clone(),
                counters: self.counters()?,
                threads: self.threads.clone(),
                maps: self.maps.clone(),
                stacks,
                symbols: Default::default(),
            },
            events,
        })
    }
}

/// A recording whose stacks are read but not yet symbolized.
pub struct PendingRecording {
    meta: RecordingMeta,
    events: Vec<RawEvent>,
}

impl PendingRecording {
    pub fn finish(mut self) -> Recording {
        self.meta.symbols = symbolize_stacks(&self.meta.stacks, &self.meta.maps, self.meta.pid);
        trim_tracing_frames(&mut self.meta.stacks, &self.meta.symbols);
        Recording {
            meta: self.meta,
            raw_events: self.events,
        }
    }
}

/// Records the target until `duration` passes, `stop` resolves (Ctrl-C), or the target exits;
/// whatever was captured is written in every one of those cases.
/// A spinner status line, or a hidden one that ignores updates.
/// The live status line, after announcing which hooks are in. The announcement is printed
/// even without a terminal (where the status line is hidden): a script or a user piping the
/// output must be able to tell when tracing has started.
pub fn status_line(shown: bool, pid: u32, hooks: &AttachReport) -> indicatif::ProgressBar {
    if shown {
        eprintln!("p99probe: tracing pid {pid}; {hooks}");
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// Completes after `duration`, or never without one.
pub async fn after(duration: Option<Duration>) {
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

pub async fn record(
    opts: &RecordOptions,
    stop: impl Future<Output = ()>,
) -> Result<RecordSummary, ProbeError> {
    check_writable(&opts.out)?;
    let mut session = LiveSession::start(&opts.probe)?;
    let progress = status_line(opts.progress, opts.probe.pid, session.hooks());
    let mut events: Vec<RawEvent> = Vec::new();
    let deadline = after(opts.duration);
    tokio::pin!(deadline, stop);
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut target_exited = false;
    loop {
        tokio::select! {
            result = session.next_events(&mut events) => result?,
            _ = &mut deadline => break,
            _ = &mut stop => break,
            _ = poll.tick() => {
                if !session.refresh_target() {
                    target_exited = true;
                    break;
                }
                let elapsed = (monotonic_ns() - session.start_ns) as f64 / 1e9;
                progress.set_message(format!(
                    "recording pid {} ({}): {elapsed:.1}s, {} events",
                    session.pid, session.comm, events.len()
                ));
                progress.tick();
            }
        }
    }
    session.drain_now(&mut events);
    let end_ns = monotonic_ns();
    progress.finish_and_clear();
    let pending = session.snapshot(events, session.start_ns, end_ns, target_exited)?;
    let hooks = session.hooks().clone();
    // Detach before the slow part (symbolization) so the target runs unobserved again.
    drop(session);
    let recording = pending.finish();
    recording.save(&opts.out)?;
    Ok(RecordSummary {
        path: opts.out.clone(),
        events: recording.raw_events.len(),
        counters: recording.meta.counters,
        hooks,
        target_exited,
    })
}
