//! The live capture: drain the kernel's ring buffer while the target runs, then resolve stacks
//! and write a self-contained recording.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aya::maps::{MapData, PerCpuArray, RingBuf, StackTraceMap};
use aya::Ebpf;
use probe_common::{Counter, RawEvent};
use tokio::io::unix::AsyncFd;

use crate::attach::{attach, AttachReport, ProbeSettings};
use crate::error::ProbeError;
use crate::events::{decode_raw, Event};
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

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn drain(ring: &mut RingBuf<MapData>, events: &mut Vec<RawEvent>) {
    while let Some(item) = ring.next() {
        if let Some(raw) = decode_raw(&item) {
            events.push(raw);
        }
    }
}

fn map_err(what: &str, err: impl std::fmt::Display) -> ProbeError {
    ProbeError::Attach {
        program: what.into(),
        reason: err.to_string(),
    }
}

fn read_counters(ebpf: &Ebpf) -> Result<KernelCounters, ProbeError> {
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.map("COUNTERS")
            .ok_or_else(|| map_err("COUNTERS", "map missing"))?,
    )
    .map_err(|e| map_err("COUNTERS", e))?;
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
    let map: StackTraceMap<_> = StackTraceMap::try_from(
        ebpf.map("STACKS")
            .ok_or_else(|| map_err("STACKS", "map missing"))?,
    )
    .map_err(|e| map_err("STACKS", e))?;
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

/// Records the target until `duration` passes, `stop` resolves (Ctrl-C), or the target exits;
/// whatever was captured is written in every one of those cases.
pub async fn record(
    opts: &RecordOptions,
    stop: impl Future<Output = ()>,
) -> Result<RecordSummary, ProbeError> {
    let pid = opts.probe.pid;
    check_writable(&opts.out)?;
    let mut attached = attach(&opts.probe)?;
    let ring = RingBuf::try_from(
        attached
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| map_err("EVENTS", "map missing"))?,
    )
    .map_err(|e| map_err("EVENTS", e))?;
    // SAFETY: the RingBuf owns its map fd and keeps it open until the AsyncFd (which owns the
    // RingBuf) is dropped.
    let mut ring =
        unsafe { AsyncFd::register(ring) }.map_err(|e| map_err("EVENTS", e.to_string()))?;

    let start_ns = monotonic_ns();
    let start_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let comm = target::comm(pid);
    let exe = target::exe(pid);
    let cmdline = target::cmdline(pid);
    let mut threads = target::thread_names(pid);
    let mut maps = target::executable_maps(pid);

    let progress = if opts.progress {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut events: Vec<RawEvent> = Vec::new();
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline, stop);
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut target_exited = false;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(|e| map_err("EVENTS", e))?;
                drain(guard.get_inner_mut(), &mut events);
                guard.clear_ready();
            }
            _ = &mut deadline => break,
            _ = &mut stop => break,
            _ = poll.tick() => {
                if !target::is_alive(pid) {
                    target_exited = true;
                    break;
                }
                threads.extend(target::thread_names(pid));
                merge_maps(&mut maps, target::executable_maps(pid));
                let elapsed = (monotonic_ns() - start_ns) as f64 / 1e9;
                progress.set_message(format!(
                    "recording pid {pid} ({comm}): {elapsed:.1}s, {} events", events.len()
                ));
                progress.tick();
            }
        }
    }
    drain(ring.get_mut(), &mut events);
    let end_ns = monotonic_ns();
    progress.finish_and_clear();

    let counters = read_counters(&attached.ebpf)?;
    let mut stacks = read_stacks(&attached.ebpf, &events)?;
    let hooks = attached.report.clone();
    // Detach before the slow part (symbolization) so the target runs unobserved again.
    drop(ring);
    drop(attached);

    // Kernel timestamps are taken before the ring-buffer reservation, so CPUs can interleave.
    events.sort_by_key(|e| e.ts_ns);
    let symbols = symbolize_stacks(&stacks, &maps, pid);
    trim_tracing_frames(&mut stacks, &symbols);
    let recording = Recording {
        meta: RecordingMeta {
            format_version: FORMAT_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").into(),
            pid,
            comm,
            exe,
            cmdline,
            start_ns,
            end_ns,
            start_unix_ms,
            target_exited,
            hooks: hooks.clone(),
            settings: RecordSettings {
                sample_hz: opts.probe.sample_hz,
                min_offcpu_ns: opts.probe.min_offcpu_ns,
            },
            counters,
            threads,
            maps,
            stacks,
            symbols,
        },
        raw_events: events,
    };
    recording.save(&opts.out)?;
    Ok(RecordSummary {
        path: opts.out.clone(),
        events: recording.raw_events.len(),
        counters,
        hooks,
        target_exited,
    })
}
