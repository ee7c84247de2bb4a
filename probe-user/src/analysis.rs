//! What happened inside a set of time windows: request latency, run-queue delay, off-CPU and
//! on-CPU stacks, retransmits. The verdict compares two of these (spike and baseline).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::flamegraph::{fold, fold_with_variance, FlameKind, Folded, StackVariance};
use crate::histogram::{new_histogram, Percentiles};
use crate::latency::{request_latency, LatencyKind};
use crate::recording::Recording;
use crate::window::Window;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Retransmit {
    /// Seconds from the start of the recording.
    pub offset_s: f64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub tcp_state: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestLatency {
    pub server: Percentiles,
    pub delivery: Percentiles,
    pub external: Percentiles,
}

#[derive(Clone, Debug)]
pub struct WindowStats {
    pub windows: Vec<Window>,
    pub seconds: f64,
    pub latency: RequestLatency,
    pub run_queue: Percentiles,
    /// The distribution behind `run_queue`, for pictures that compare windows.
    pub run_queue_histogram: Histogram<u64>,
    /// Total run-queue wait per CPU, ns.
    pub run_queue_by_cpu: BTreeMap<u32, u64>,
    pub run_queue_total_ns: u64,
    /// Blocked time in µs per stack.
    pub off_cpu: Folded,
    /// The variance (µs²) of the stacks' blocked time estimated from sampled intervals.
    pub off_cpu_variance: StackVariance,
    /// The highest stack-sampling threshold (ms) that off-CPU intervals ending in the windows
    /// were sampled under; 0 when every interval was reported (`offcpu_sampling`).
    pub off_cpu_sampled_below_ms: u16,
    /// Samples per stack.
    pub on_cpu: Folded,
    pub retransmits: Vec<Retransmit>,
    /// For Go targets (Go runtime probes attached).
    pub go: Option<crate::goruntime::GoStats>,
}

fn merge(into: &mut Folded, from: Folded) {
    for (stack, weight) in from {
        *into.entry(stack).or_default() += weight;
    }
}

impl WindowStats {
    pub fn compute(recording: &Recording, windows: &[Window]) -> WindowStats {
        let seconds = windows.iter().map(|w| w.len_ns()).sum::<u64>() as f64 / 1e9;
        let inside = |ts: u64| windows.iter().any(|w| w.contains(ts));
        let mut run_queue = new_histogram();
        let kinds = [
            LatencyKind::Server,
            LatencyKind::Delivery,
            LatencyKind::External,
        ];
        let mut latency = kinds.map(|_| new_histogram());
        let mut run_queue_by_cpu = BTreeMap::new();
        let mut run_queue_total_ns = 0;
        let mut retransmits = Vec::new();
        let mut off_cpu_sampled_below_ms = 0;
        for event in recording.events() {
            for (kind, histogram) in kinds.iter().zip(latency.iter_mut()) {
                if let Some((ts, value)) = request_latency(&event, *kind) {
                    if inside(ts) {
                        histogram.saturating_record(value.max(1));
                    }
                }
            }
            match event {
                Event::RunQueue {
                    ts_ns,
                    cpu,
                    delay_ns,
                    ..
                } if inside(ts_ns) => {
                    run_queue.saturating_record(delay_ns.max(1));
                    *run_queue_by_cpu.entry(cpu).or_default() += delay_ns;
                    run_queue_total_ns += delay_ns;
                }
                Event::TcpRetransmit {
                    ts_ns,
                    local,
                    remote,
                    tcp_state,
                    ..
                } if inside(ts_ns) => retransmits.push(Retransmit {
                    offset_s: ts_ns.saturating_sub(recording.meta.start_ns) as f64 / 1e9,
                    local,
                    remote,
                    tcp_state,
                }),
                Event::OffCpu {
                    ts_ns,
                    sampled_below_ms,
                    ..
                } if inside(ts_ns) => {
                    off_cpu_sampled_below_ms = off_cpu_sampled_below_ms.max(sampled_below_ms);
                }
                _ => {}
            }
        }
        let mut off_cpu = Folded::new();
        let mut off_cpu_variance = StackVariance::new();
        let mut on_cpu = Folded::new();
        for window in windows {
            let (folded, variance) =
                fold_with_variance(recording, FlameKind::Offcpu, *window, false);
            merge(&mut off_cpu, folded);
            for (stack, v) in variance {
                *off_cpu_variance.entry(stack).or_default() += v;
            }
            merge(
                &mut on_cpu,
                fold(recording, FlameKind::Oncpu, *window, false),
            );
        }
        let go = recording
            .meta
            .hooks
            .go
            .as_ref()
            .map(|_| crate::goruntime::go_stats(recording, windows, &on_cpu, seconds));
        WindowStats {
            go,
            windows: windows.to_vec(),
            seconds,
            latency: RequestLatency {
                server: Percentiles::of(&latency[0]),
                delivery: Percentiles::of(&latency[1]),
                external: Percentiles::of(&latency[2]),
            },
            run_queue: Percentiles::of(&run_queue),
            run_queue_histogram: run_queue,
            run_queue_by_cpu,
            run_queue_total_ns,
            off_cpu,
            off_cpu_variance,
            off_cpu_sampled_below_ms,
            on_cpu,
            retransmits,
        }
    }

    pub fn latency_of(&self, kind: LatencyKind) -> &Percentiles {
        match kind {
            LatencyKind::Server => &self.latency.server,
            LatencyKind::Delivery => &self.latency.delivery,
            LatencyKind::External => &self.latency.external,
        }
    }
}
