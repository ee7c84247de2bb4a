//! The live capture: drain the kernel's ring buffer while the target runs, then resolve stacks
//! and write a self-contained recording.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aya::maps::{MapData, PerCpuArray, RingBuf, StackTraceMap};
use aya::Ebpf;
use probe_common::{latency_bucket, Counter, EventKind, RawEvent, FLAG_STACKS_ONLY};
use tokio::io::unix::AsyncFd;

use crate::attach::{
    attach, attach_err, kernel_map, take_kernel_map, AttachReport, AttachedProbes, ProbeSettings,
    SchedHook,
};
use crate::error::ProbeError;
use crate::events::{decode_ring_record, stacks_named, Drained, Event, Timing};
use crate::histogram::Percentiles;
use crate::offcpu_sampling::{self, OffCpuSamplingGovernor};
use crate::own_cost::{OwnCost, OwnCostMeter};
use crate::recording::{
    KernelCounters, RecordSettings, Recording, RecordingMeta, RecordingWriter, FORMAT_VERSION,
};
use crate::request_end::WriteHookGovernor;
use crate::stacks::StackStore;
use crate::symbolize::{symbolize_stacks, trim_tracing_frames};
use crate::target::{self, MemoryMap};
use crate::timing_rings::{ReadBack, RingCursors};
use crate::wakeup::WakeupTimer;

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
    /// When the off-CPU stack-sampling threshold changed and to what (ms; 0: every interval).
    pub offcpu_sampling_changes: Vec<(u64, u32)>,
    /// `None` when `--own-cost-every 0` turned measuring off.
    pub own_cost: Option<OwnCost>,
}

/// How often the agent drains the ring buffer when the kernel has not woken it. Each wakeup
/// costs the agent ~90 µs here (timer, context switch, epoll), more than the drain itself at
/// moderate rates: at 20 ms an idle agent took 0.6% of a CPU.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);

/// The drain interval while events are plentiful (the last drain found `BUSY_DRAIN_EVENTS` or
/// more) and no capture is waiting for them: the agent's work then comes in fewer, larger
/// pieces. On a CPU the agent shares with the target or its load, each piece delays the
/// requests in flight there, so fewer pieces delay fewer requests. Measured with redis at
/// ~125k requests/s under a closed loop sharing a CPU with the agent, 12 interleaved rounds:
/// P99.9 against nothing attached 3.3× draining every 50 ms, 1.24× every 200 ms; P99 and
/// throughput the same within the noise. At low rates a drain is small and `DRAIN_INTERVAL`
/// keeps a lone request's wait for the trigger short.
const BUSY_DRAIN_INTERVAL: Duration = Duration::from_millis(200);
const BUSY_DRAIN_EVENTS: usize = 2_000;

/// The busy drain interval while the kernel watches the trigger's latency for the agent
/// (`watch_latency`): a rise wakes the agent at once, so the timer only has to keep the
/// agent's own upkeep going (the target's threads and ports, the write hook, freeing stacks).
/// Under redis at ~120k requests/s each wakeup of the agent made the load generator that
/// shares its CPU wait out its turn, ~0.1 ms of switching on this VM (docs/benchmark-notes.md).
const WATCHED_BUSY_DRAIN_INTERVAL: Duration = Duration::from_millis(1_000);

/// The drain interval while stacks churn: kernel stack entries are freed only after a drain,
/// and with more than `CHURN_STACK_ENTRIES` of the map's 16,384 held, a new stack's chance of
/// colliding with one (and being lost) nears 1%. A target blocking under 4,000 new stacks a
/// second lost 4% of them at 50 ms.
const CHURN_DRAIN_INTERVAL: Duration = Duration::from_millis(20);
const CHURN_STACK_ENTRIES: usize = 128;

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

/// An off-CPU interval left out that the kernel sent only for the stacks it walked as the
/// interval began (`FLAG_STACKS_ONLY`): the stack store keeps them for the repeats to come.
fn only_for_stacks(event: &RawEvent) -> bool {
    event.kind == EventKind::OffCpu as u32 && event.flags & FLAG_STACKS_ONLY != 0
}

fn drain(ring: &mut RingBuf<MapData>, out: &mut Drained) {
    while let Some(item) = ring.next() {
        decode_ring_record(&item, out);
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
        requests_untimed: sum(Counter::RequestsUntimed),
        stacks_repeated: sum(Counter::StacksRepeated),
        timings_recorded: 0,
        timings_overwritten: 0,
        timings_lost_before_ns: None,
    })
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
    /// Ends the wait for the ring at the drain interval.
    drain_timer: WakeupTimer,
    /// Kept open: making one reads a sysctl, and stacks are read at every drain.
    kernel_stacks: StackTraceMap<MapData>,
    pub pid: u32,
    pub start_ns: u64,
    pub start_unix_ms: u64,
    pub comm: String,
    exe: Option<String>,
    cmdline: Vec<String>,
    /// Every thread seen, live or not, with its name.
    threads: BTreeMap<u32, String>,
    /// The threads alive at the last refresh, and those of them first seen then, whose names
    /// are read once more.
    threads_live: BTreeSet<u32>,
    threads_first_seen: BTreeSet<u32>,
    liveness: target::Liveness,
    maps: Vec<MemoryMap>,
    settings: RecordSettings,
    /// Every stack the drained events name, under the store's ids.
    stacks: StackStore,
    /// Kernel stack ids that no drained event had named at the last full sweep.
    unnamed_at_last_sweep: BTreeSet<u32>,
    stacks_released_ns: u64,
    stacks_swept_ns: u64,
    /// Entries freed from the kernel's stack map.
    pub stacks_freed: u64,
    target_reread_ns: u64,
    /// `None` when the write hook stays attached throughout (delivery latency).
    write_hook: Option<WriteHookGovernor>,
    /// When the response-write hook was attached (`true`) or detached (CLOCK_MONOTONIC ns).
    pub write_hook_changes: Vec<(u64, bool)>,
    /// `None` once the kernel's threshold could not be set.
    offcpu_sampling: Option<OffCpuSamplingGovernor>,
    /// When the off-CPU stack-sampling threshold changed and to what (ms; 0: every interval).
    pub offcpu_sampling_changes: Vec<(u64, u32)>,
    /// `None` when `--own-cost-every 0` turned it off.
    own_cost: Option<OwnCostMeter>,
    /// Whether drains read the kernel's timing rings: always for `record`; for `attach` only
    /// while a capture is in progress (its trigger reads the kernel's histograms).
    reading_timings: bool,
    /// Where drains have read the kernel's timing rings up to.
    timing_cursors: RingCursors,
    /// Requests served and timings written as of the last drain, by the timing rings' counts.
    served_in_rings: u64,
    timings_written: u64,
    /// Timings the kernel overwrote before a drain read them.
    timings_overwritten: u64,
    /// Events the last drain found.
    last_drained: usize,
    /// Whether a capture is waiting for events, so drains keep to `DRAIN_INTERVAL`.
    prompt: bool,
    /// The trigger's latency at or over which the kernel wakes the agent (ns); see
    /// `watch_latency`.
    latency_watch_ns: Option<u64>,
    /// The kernel refused a watch mark once: not asked again.
    latency_watch_refused: bool,
}

/// How often, at most, copied stacks that did not recur are freed from the kernel's map (after a
/// drain). What the map holds, and so how likely a new stack is to collide, is the stacks of
/// about twice the time between releases.
const STACK_RELEASE_NS: u64 = CHURN_DRAIN_INTERVAL.as_nanos() as u64;

/// How often the kernel's whole stack map is checked for entries no event ever named (their
/// event was lost, or the interval was too short to report).
const STACK_SWEEP_NS: u64 = 1_000_000_000;

/// How often the target's listening ports and CPU affinity are re-read while attached: a
/// listener opened after attach has its connections timed from then on, and a CPU the target
/// may newly run on is sampled from then on.
const TARGET_REREAD_NS: u64 = 2_000_000_000;

impl LiveSession {
    pub fn start(probe: &ProbeSettings) -> Result<LiveSession, ProbeError> {
        let pid = probe.pid;
        let mut attached = attach(probe)?;
        attached.report.agent = Some(give_way_to_target());
        let ring: RingBuf<MapData> = take_kernel_map(&mut attached.ebpf, "EVENTS")?;
        // SAFETY: the RingBuf owns its map fd and keeps it open until the AsyncFd (which owns
        // the RingBuf) is dropped.
        let ring =
            unsafe { AsyncFd::register(ring) }.map_err(|e| attach_err("EVENTS", e.to_string()))?;
        let kernel_stacks = take_kernel_map(&mut attached.ebpf, "STACKS")?;
        let threads = target::thread_names(pid);
        let drain_timer =
            WakeupTimer::new().map_err(|e| attach_err("the drain timer", e.to_string()))?;
        Ok(LiveSession {
            ring,
            drain_timer,
            kernel_stacks,
            pid,
            start_ns: monotonic_ns(),
            start_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            comm: target::comm(pid),
            exe: target::exe(pid),
            cmdline: target::cmdline(pid),
            threads_live: threads.keys().copied().collect(),
            threads_first_seen: threads.keys().copied().collect(),
            threads,
            liveness: target::Liveness::new(pid),
            maps: target::executable_maps(pid),
            settings: RecordSettings {
                sample_hz: probe.sample_hz,
                min_offcpu_ns: probe.min_offcpu_ns,
            },
            stacks: StackStore::default(),
            unnamed_at_last_sweep: BTreeSet::new(),
            stacks_released_ns: monotonic_ns(),
            stacks_swept_ns: monotonic_ns(),
            stacks_freed: 0,
            target_reread_ns: monotonic_ns(),
            write_hook: attached
                .write_hook_adjustable()
                .then(|| WriteHookGovernor::new(monotonic_ns(), attached.write_hook_attached())),
            write_hook_changes: Vec::new(),
            offcpu_sampling: Some(OffCpuSamplingGovernor::new(
                monotonic_ns(),
                probe.offcpu_stack_budget,
            )),
            offcpu_sampling_changes: Vec::new(),
            own_cost: OwnCostMeter::new(monotonic_ns(), probe.own_cost_every_ns),
            reading_timings: true,
            timing_cursors: attached.timings.cursors(),
            served_in_rings: 0,
            timings_written: 0,
            timings_overwritten: 0,
            last_drained: 0,
            latency_watch_ns: None,
            latency_watch_refused: false,
            prompt: false,
            attached,
        })
    }

    pub fn hooks(&self) -> &AttachReport {
        &self.attached.report
    }

    /// Waits until the kernel wakes us (its buffer is filling) or the poll interval passes,
    /// then drains every event into `out`. The kernel does not wake the agent per event: at
    /// hundreds of thousands of events a second those wakeups would cost more than the events.
    pub async fn next_events(&mut self, out: &mut Drained) -> Result<(), ProbeError> {
        let interval = if self.stacks.in_kernel() > CHURN_STACK_ENTRIES {
            CHURN_DRAIN_INTERVAL
        } else if !self.prompt && self.last_drained >= BUSY_DRAIN_EVENTS {
            if self.latency_watch_ns.is_some() {
                WATCHED_BUSY_DRAIN_INTERVAL
            } else {
                BUSY_DRAIN_INTERVAL
            }
        } else {
            DRAIN_INTERVAL
        };
        let interval = match self.own_cost.as_ref().and_then(OwnCostMeter::next_due_ns) {
            Some(due_ns) => {
                interval.min(Duration::from_nanos(due_ns.saturating_sub(monotonic_ns())))
            }
            None => interval,
        };
        tokio::select! {
            guard = self.ring.readable_mut() => {
                // Cleared before the drain, so that a wakeup during it is not lost.
                guard.map_err(|e| attach_err("EVENTS", e))?.clear_ready();
            }
            slept = self.drain_timer.sleep(interval) => {
                slept.map_err(|e| attach_err("the drain timer", e.to_string()))?;
            }
        }
        // Before the drain, which under a heavy load can take a tenth of a second: a span
        // ends when it is due, not when the drain is done.
        self.measure_own_cost();
        let (drained, served) = self.drain_into(out);
        self.last_drained = drained;
        self.govern_write_hook(served);
        self.govern_offcpu_sampling();
        self.free_kernel_stacks()
    }

    /// Drains at the short interval whatever the event rate while `prompt`: a capture is
    /// waiting for the end of its post-window.
    pub fn drain_promptly(&mut self, prompt: bool) {
        self.prompt = prompt;
    }

    /// Has the kernel wake the agent when the trigger's latency reaches `mark_ns` (in 1% of
    /// the requests of a slice on a CPU), so that busy drains can come seldom; `None` stops
    /// it. A no-op when the kernel keeps no histograms of the trigger's latency. Should the
    /// kernel refuse, drains keep the usual busy interval.
    pub fn watch_latency(&mut self, mark_ns: Option<u64>) {
        if self.attached.latency_slices.is_none()
            || self.latency_watch_refused
            || mark_ns == self.latency_watch_ns
        {
            return;
        }
        // Bucket 0 holds latencies of 0 ns only, so it doubles as "no mark".
        let bucket = mark_ns.map_or(0, |ns| latency_bucket(ns).max(1) as u32);
        match self.attached.set_latency_watch(bucket) {
            Ok(()) => self.latency_watch_ns = mark_ns,
            Err(e) => {
                log::warn!("latency watch not set, and not again: {e}");
                self.latency_watch_refused = true;
                self.latency_watch_ns = None;
            }
        }
    }

    /// Attaches or detaches the response-write hook by the rate of requests (`request_end`).
    fn govern_write_hook(&mut self, served: u64) {
        let Some(governor) = self.write_hook.as_mut() else {
            return;
        };
        let now = monotonic_ns();
        let Some(attach) = governor.observe(now, served) else {
            return;
        };
        match self.attached.set_write_hook(attach) {
            Ok(()) => self.write_hook_changes.push((now, attach)),
            Err(e) => {
                // Requests still end without it (at the peer's next request); only promptness
                // at low rates is lost, which is no reason to end the run.
                log::warn!("response-write hook not changed, and not again: {e}");
                self.write_hook = None;
            }
        }
    }

    /// Sets the kernel's off-CPU stack-sampling threshold by the rate of reported intervals
    /// (`offcpu_sampling`).
    fn govern_offcpu_sampling(&mut self) {
        let Some(governor) = self.offcpu_sampling.as_mut() else {
            return;
        };
        let now = monotonic_ns();
        let Some(threshold_ms) = governor.decide(now) else {
            return;
        };
        match self.attached.set_offcpu_sampling(threshold_ms) {
            Ok(()) => self.offcpu_sampling_changes.push((now, threshold_ms)),
            Err(e) => {
                // The intervals keep coming, every one with its stacks: costlier, not wrong.
                log::warn!("off-CPU stack sampling not changed, and not again: {e}");
                self.offcpu_sampling = None;
            }
        }
    }

    /// Starts or ends a span of the kernel timing the agent's programs (`own_cost`).
    fn measure_own_cost(&mut self) {
        let Some(meter) = self.own_cost.as_mut() else {
            return;
        };
        let attached = &self.attached;
        meter.poll(
            monotonic_ns(),
            || aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| e.io_error),
            || attached.program_runs(),
            attached.timings.served(),
        );
    }

    /// What the agent's kernel programs have cost so far, ending the span in progress.
    fn finish_own_cost(&mut self) -> Option<OwnCost> {
        let meter = self.own_cost.as_mut()?;
        let attached = &self.attached;
        meter.finish(
            monotonic_ns(),
            || attached.program_runs(),
            attached.timings.served(),
        );
        Some(meter.cost().clone())
    }

    /// The off-CPU stack-sampling threshold in force, ms (0: every interval is reported).
    pub fn offcpu_sampling_threshold_ms(&self) -> u32 {
        self.offcpu_sampling
            .as_ref()
            .map_or(0, OffCpuSamplingGovernor::threshold_ms)
    }

    /// Stops drains from reading the kernel's timing rings until [`Self::hold_timings_from`]:
    /// the trigger reads the kernel's histograms, and the rings keep the timings for a capture.
    pub fn leave_timings_in_kernel(&mut self) {
        self.reading_timings = false;
    }

    /// Appends the timings that ended at or after `from_ns`, as far back as the kernel's rings
    /// still hold them, and has drains read every newer one from now on: a capture starting
    /// now takes its history from the rings, as the agent keeps no copy of timings.
    pub fn hold_timings_from(&mut self, from_ns: u64, out: &mut Vec<Timing>) -> ReadBack {
        let rings = &self.attached.timings;
        if !self.reading_timings {
            rings.skip_to_end(&mut self.timing_cursors);
            self.reading_timings = true;
        }
        rings.read_back(&self.timing_cursors, from_ns, out)
    }

    /// Timings written to the kernel's rings so far, read or not.
    pub fn timings_written(&self) -> u64 {
        self.attached.timings.written()
    }

    /// The P99 (and more) of the trigger's latency over its window up to `now_ns`, from the
    /// kernel's histograms; `None` when the kernel keeps none (see `ProbeSettings`).
    pub fn trigger_percentiles(&mut self, now_ns: u64) -> Option<Percentiles> {
        Some(self.attached.latency_slices.as_mut()?.percentiles(now_ns))
    }

    /// Ends the run the moment it is over: ends the own-cost span in progress, then drains
    /// everything the kernel holds into `out`, and returns what the agent's kernel programs
    /// cost. The span ends first: ended after the drain, it would also time the programs
    /// while the agent drains and writes out its last events, which under a heavy load
    /// takes a tenth of a second or more; and the drain, reading after it, records every
    /// request the span counted.
    pub fn end_run(&mut self, out: &mut Drained) -> Option<OwnCost> {
        let own_cost = self.finish_own_cost();
        self.drain_into(out);
        own_cost
    }

    /// Drains the ring buffer (and the new timings of the timing rings, while reading them)
    /// into `out` and takes the new events in; returns how many events came, timings read or
    /// not, and how many of them were served requests.
    fn drain_into(&mut self, out: &mut Drained) -> (usize, u64) {
        let first_new_event = out.events.len();
        drain(self.ring.get_mut(), out);
        if self.reading_timings {
            self.timings_overwritten += self
                .attached
                .timings
                .read_new(&mut self.timing_cursors, &mut out.timings);
        }
        let timings_written = self.attached.timings.written();
        let new_timings = timings_written - self.timings_written;
        self.timings_written = timings_written;
        let new_events = &mut out.events[first_new_event..];
        let drained = new_events.len() + new_timings as usize;
        let (served, stacks_only) = self.take_in(new_events);
        if stacks_only > 0 {
            out.events.retain(|event| !only_for_stacks(event));
        }
        (drained, served)
    }

    /// Copies the stacks that newly drained `events` name out of the kernel and renames them,
    /// counts off-CPU intervals for their governor, and returns how many requests were served
    /// and how many events came only for their stacks (`FLAG_STACKS_ONLY`), for the caller to
    /// drop. One pass: a busy drain's events outgrow the CPU's caches, and each pass over them
    /// was a read from memory.
    fn take_in(&mut self, events: &mut [RawEvent]) -> (u64, usize) {
        let served_kind = EventKind::RequestServed as u32;
        // Counted by the kernel for the rings, read or not.
        let served_in_rings = self.attached.timings.served();
        let served_timings = served_in_rings - self.served_in_rings;
        self.served_in_rings = served_in_rings;
        let kernel = &self.kernel_stacks;
        let read = |id: u32| {
            let trace = kernel.get(&id, 0).ok()?;
            Some(trace.frames().iter().map(|f| f.ip).collect())
        };
        let mut served = 0;
        let mut stacks_only = 0;
        for event in events {
            self.stacks.adopt(event, read);
            if event.kind == served_kind {
                served += 1;
            }
            if event.kind != EventKind::OffCpu as u32 {
                continue;
            }
            if only_for_stacks(event) {
                stacks_only += 1;
                continue;
            }
            if let Some((governor, decoded)) =
                self.offcpu_sampling.as_mut().zip(Event::from_raw(event))
            {
                governor.count(&decoded);
            }
        }
        (served + served_timings, stacks_only)
    }

    /// Frees the kernel's stack entries that are copied out and did not recur, and (less
    /// often) those no event named. Called right after a drain: an event naming a freed id
    /// could otherwise still be in the ring buffer. An entry a thread holds for an interval
    /// that has not ended stays.
    fn free_kernel_stacks(&mut self) -> Result<(), ProbeError> {
        let now = monotonic_ns();
        let release = now.saturating_sub(self.stacks_released_ns) >= STACK_RELEASE_NS;
        let sweep = now.saturating_sub(self.stacks_swept_ns) >= STACK_SWEEP_NS;
        if !release && !sweep {
            return Ok(());
        }
        let held = if self
            .attached
            .sched_hook
            .is_some_and(SchedHook::holds_stacks_while_off_cpu)
        {
            self.stacks_held_by_threads()
        } else {
            BTreeSet::new()
        };
        let mut free = Vec::new();
        if release {
            self.stacks_released_ns = now;
            free = self.stacks.release(&held);
        }
        let kernel = &mut self.kernel_stacks;
        if sweep {
            self.stacks_swept_ns = now;
            let unnamed: BTreeSet<u32> = kernel
                .stack_ids()
                .flatten()
                .filter(|id| !self.stacks.is_copied(*id) && !held.contains(id))
                .collect();
            free.extend(unnamed.intersection(&self.unnamed_at_last_sweep));
            self.unnamed_at_last_sweep = unnamed;
        }
        for id in free {
            if kernel.remove(&id).is_ok() {
                self.stacks_freed += 1;
            }
        }
        Ok(())
    }

    /// Read fresh rather than from the thread names the recorder keeps: a thread created since
    /// they were last read may already hold stacks.
    fn stacks_held_by_threads(&self) -> BTreeSet<u32> {
        self.attached
            .threads
            .held_stack_ids(target::thread_ids(self.pid))
    }

    /// Forgets the stacks that no `live` id (of an event still held) refers to; returns how
    /// many.
    pub fn prune_stacks(&mut self, live: impl Iterator<Item = u32>) -> usize {
        self.stacks.prune(live)
    }

    /// Whether requests now end at the server's write; see `request_end`.
    pub fn write_hook_attached(&self) -> bool {
        self.attached.write_hook_attached()
    }

    /// Samples on-CPU at the calm rate, or at full rate (`sampling`).
    pub fn set_calm_sampling(&mut self, calm: bool) -> Result<(), ProbeError> {
        self.attached.set_calm_sampling(calm)
    }

    /// Re-reads threads and maps; false once the target has exited.
    pub fn refresh_target(&mut self) -> bool {
        if !self.liveness.is_alive() {
            return false;
        }
        let live: BTreeSet<u32> = target::thread_ids(self.pid).into_iter().collect();
        self.stacks.retain_threads(|tid| live.contains(&tid));
        // Runtimes name a thread just after they create it: a name is read when the thread is
        // first seen and once more a refresh later, not every second for every thread. A thread
        // id the kernel reuses after its thread has gone counts as first seen again.
        let first_seen: BTreeSet<u32> = live.difference(&self.threads_live).copied().collect();
        let to_name: Vec<u32> = first_seen
            .union(&self.threads_first_seen)
            .copied()
            .collect();
        self.threads.extend(target::names_of(self.pid, to_name));
        self.threads_live = live;
        self.threads_first_seen = first_seen;
        let now = monotonic_ns();
        if now.saturating_sub(self.target_reread_ns) >= TARGET_REREAD_NS {
            self.target_reread_ns = now;
            // A capture re-reads them too (see `recording_meta`); these are for a target that
            // exits before its capture is taken.
            merge_maps(&mut self.maps, target::executable_maps(self.pid));
            if let Err(e) = self.attached.mark_listening_ports() {
                log::warn!("listening ports not re-read: {e}");
            }
            match self.attached.sample_newly_allowed_cpus() {
                Ok(added) if !added.is_empty() => {
                    log::info!("the target may now run on CPUs {added:?}: sampling them too")
                }
                Ok(_) => {}
                Err(e) => log::warn!("CPUs the target may now run on not sampled: {e}"),
            }
        }
        true
    }

    /// The kernel's counters, with the stacks the agent found gone counted as missing.
    pub fn counters(&self) -> Result<KernelCounters, ProbeError> {
        let mut counters = read_counters(&self.attached.ebpf)?;
        counters.stacks_missing += self.stacks.unreadable;
        counters.timings_recorded = self.attached.timings.written();
        counters.timings_overwritten = self.timings_overwritten;
        Ok(counters)
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
        // Deduplicated first: each id's frames are copied once, not once per event.
        let stack_ids: BTreeSet<u32> = events.iter().flat_map(stacks_named).collect();
        Ok(PendingRecording {
            meta: self.recording_meta(stack_ids, start_ns, end_ns, target_exited)?,
            events,
        })
    }

    /// A recording's metadata, with the frames of the `stack_ids` its events name and no
    /// symbols yet (see [`symbolize`]).
    pub fn recording_meta(
        &self,
        stack_ids: impl IntoIterator<Item = u32>,
        start_ns: u64,
        end_ns: u64,
        target_exited: bool,
    ) -> Result<RecordingMeta, ProbeError> {
        Ok(RecordingMeta {
            format_version: FORMAT_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            pid: self.pid,
            comm: self.comm.clone(),
            exe: self.exe.clone(),
            cmdline: self.cmdline.clone(),
            start_ns,
            end_ns,
            start_unix_ms: self.start_unix_ms + start_ns.saturating_sub(self.start_ns) / 1_000_000,
            target_exited,
            hooks: self.attached.report.clone(),
            settings: self.settings.clone(),
            counters: self.counters()?,
            own_cost: self.own_cost.as_ref().map(|meter| meter.cost().clone()),
            threads: {
                // Names read when threads were first seen, brought up to date for those still
                // alive: a runtime can rename a thread whenever it likes (a pool naming a
                // worker for its task), and the capture should say what the thread is now.
                let mut threads = self.threads.clone();
                if !target_exited {
                    threads.extend(target::names_of(
                        self.pid,
                        self.threads_live.iter().copied(),
                    ));
                }
                threads
            },
            maps: {
                let mut maps = self.maps.clone();
                if !target_exited {
                    merge_maps(&mut maps, target::executable_maps(self.pid));
                }
                maps
            },
            stacks: stack_ids
                .into_iter()
                .filter_map(|id| Some((id, self.stacks.frames(id)?.to_vec())))
                .collect(),
            symbols: Default::default(),
        })
    }
}

/// Resolves the stacks of `meta` to names (slow; no kernel needed, so done after detaching).
fn symbolize(meta: &mut RecordingMeta) {
    meta.symbols = symbolize_stacks(&meta.stacks, &meta.maps, meta.pid);
    trim_tracing_frames(&mut meta.stacks, &meta.symbols);
}

/// A recording whose stacks are read but not yet symbolized.
pub struct PendingRecording {
    meta: RecordingMeta,
    events: Vec<RawEvent>,
}

impl PendingRecording {
    /// Records that the timings from before `ns` were lost in the kernel's rings; see
    /// [`KernelCounters::timings_lost_before_ns`].
    pub fn timings_lost_before(&mut self, ns: Option<u64>) {
        self.meta.counters.timings_lost_before_ns = ns;
    }

    pub fn finish(mut self) -> Recording {
        symbolize(&mut self.meta);
        Recording::new(self.meta, self.events)
    }
}

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

/// Records the target until `duration` passes, `stop` resolves (Ctrl-C), or the target exits;
/// whatever was captured is written in every one of those cases.
pub async fn record(
    opts: &RecordOptions,
    stop: impl Future<Output = ()>,
) -> Result<RecordSummary, ProbeError> {
    // Created before attaching, so that an unwritable output fails with nothing attached.
    let mut recording = RecordingWriter::create(&opts.out, opts.probe.pid)?;
    let mut session = LiveSession::start(&opts.probe)?;
    let progress = status_line(opts.progress, opts.probe.pid, session.hooks());
    // Each drain goes to disk and is cleared: the agent holds one drain's events at a time.
    let mut drained = Drained::default();
    let deadline = after(opts.duration);
    tokio::pin!(deadline, stop);
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut target_exited = false;
    loop {
        tokio::select! {
            result = session.next_events(&mut drained) => {
                result?;
                recording.append(&drained)?;
                drained.clear();
            }
            _ = &mut deadline => break,
            _ = &mut stop => break,
            _ = poll.tick() => {
                if !session.refresh_target() {
                    target_exited = true;
                    break;
                }
                let elapsed = (monotonic_ns() - session.start_ns) as f64 / 1e9;
                progress.set_message(format!(
                    "recording pid {} ({}): {elapsed:.1}s, {} events{}",
                    session.pid, session.comm, recording.events(),
                    offcpu_sampling::status(session.offcpu_sampling_threshold_ms())
                ));
                progress.tick();
            }
        }
    }
    let own_cost = session.end_run(&mut drained);
    recording.append(&drained)?;
    let end_ns = monotonic_ns();
    progress.finish_and_clear();
    // Nothing prunes the store while recording: it holds the stacks of every event written.
    let mut meta = session.recording_meta(
        session.stacks.ids(),
        session.start_ns,
        end_ns,
        target_exited,
    )?;
    let hooks = session.hooks().clone();
    let offcpu_sampling_changes = std::mem::take(&mut session.offcpu_sampling_changes);
    // Detach before the slow part (symbolization) so the target runs unobserved again.
    drop(session);
    symbolize(&mut meta);
    let events = recording.finish(&meta)?;
    Ok(RecordSummary {
        path: opts.out.clone(),
        events: events as usize,
        counters: meta.counters,
        hooks,
        target_exited,
        offcpu_sampling_changes,
        own_cost,
    })
}
