//! Ranking the causes of a spike. Each cause is scored by how much MORE of it there was per
//! second in the spike window than in the baseline, in milliseconds of thread time per second
//! of wall time, so the causes compare on one scale and a cause as large in the baseline
//! scores zero:
//!
//! - `run_queue_delay`: extra run-queue wait;
//! - `off_cpu`: extra blocked time of the fastest-growing stack that is not an idle wait
//!   (threads parked in epoll, accept, a socket read or the Go scheduler's idle loop are
//!   waiting for work, not delaying it);
//! - `on_cpu`: extra CPU time of the fastest-growing user stack (samples × sample period);
//! - `tcp_retransmit`: extra retransmits × 200 ms, Linux's minimum retransmission timeout,
//!   the least a retransmitted response is delayed by;
//! - `gc` (Go targets): extra GC CPU time (mark workers, assists, sweeping) plus extra
//!   stop-the-world time × the CPUs it stops. GC samples are left out of `on_cpu`, so the two
//!   do not count the same CPU time twice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::analysis::WindowStats;
use crate::flamegraph::{describe_stack, Folded, StackVariance};
use crate::histogram::human_ns;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CauseKind {
    RunQueueDelay,
    OffCpu,
    OnCpu,
    TcpRetransmit,
    /// Go garbage collection: stop-the-world pauses and GC CPU (mark workers, assists, sweep).
    Gc,
}

impl CauseKind {
    /// The name used in report.json.
    pub fn name(self) -> &'static str {
        match self {
            CauseKind::RunQueueDelay => "run_queue_delay",
            CauseKind::OffCpu => "off_cpu",
            CauseKind::OnCpu => "on_cpu",
            CauseKind::TcpRetransmit => "tcp_retransmit",
            CauseKind::Gc => "gc",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cause {
    pub cause: CauseKind,
    /// Extra milliseconds per second in the spike versus the baseline (≥ 0).
    pub score: f64,
    pub summary: String,
    pub evidence: serde_json::Value,
}

/// A stack with its weight (µs blocked, or samples) and its share of its window's total.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopStack {
    /// Root first; the first frame is the process name, kernel frames end in `_[k]`.
    pub frames: Vec<String>,
    pub weight: u64,
    pub share: f64,
    /// Half-width of the 95% confidence interval of `weight`, for an off-CPU stack whose
    /// blocked time is estimated from sampled intervals (`--offcpu-stack-budget`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ci95: Option<f64>,
}

pub fn top_stacks(folded: &Folded, n: usize) -> Vec<TopStack> {
    top_stacks_estimated(folded, &StackVariance::new(), n)
}

/// `top_stacks`, each with the confidence interval of its weight where `variance` has one.
pub fn top_stacks_estimated(folded: &Folded, variance: &StackVariance, n: usize) -> Vec<TopStack> {
    let total: u64 = folded.values().sum();
    crate::flamegraph::top_stacks(folded, n)
        .into_iter()
        .map(|(weight, frames)| TopStack {
            ci95: ci95(variance, &frames.join(";")),
            frames,
            weight,
            share: weight as f64 / total.max(1) as f64,
        })
        .collect()
}

/// Half-width of the normal 95% interval of a stack's estimated weight, if it is an estimate.
fn ci95(variance: &StackVariance, stack: &str) -> Option<f64> {
    variance
        .get(stack)
        .filter(|v| **v > 0.0)
        .map(|v| 1.96 * v.sqrt())
}

const IDLE_FRAMES: &[&str] = &[
    // kernel: waiting for connections or input
    "ep_poll",
    "do_epoll_wait",
    "inet_csk_accept",
    "sk_wait_data",
    "do_sys_poll",
    "do_select",
    "core_sys_select",
    "pipe_read",
    // Go runtime: idle Ms, the netpoller, sysmon's naps
    "runtime.netpoll",
    "runtime.stopm",
    "runtime.mPark",
    "runtime.notesleep",
    "runtime.sysmon",
];

/// An off-CPU stack of a thread waiting for work rather than delaying it.
pub fn is_idle_wait(stack: &str) -> bool {
    stack
        .split(';')
        .any(|frame| IDLE_FRAMES.contains(&frame.trim_end_matches("_[k]")))
}

fn per_second(weight: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        weight as f64 / seconds
    } else {
        0.0
    }
}

/// The stack whose rate grew most: `(stack, spike rate, baseline rate)`, rates per second.
fn fastest_growing(
    spike: &Folded,
    spike_s: f64,
    baseline: &Folded,
    baseline_s: f64,
) -> Option<(String, f64, f64)> {
    spike
        .iter()
        .map(|(stack, weight)| {
            let base = baseline.get(stack).copied().unwrap_or(0);
            (
                stack.clone(),
                per_second(*weight, spike_s),
                per_second(base, baseline_s),
            )
        })
        .max_by(|a, b| (a.1 - a.2).total_cmp(&(b.1 - b.2)))
}

fn user_frames_only(folded: &Folded) -> Folded {
    let mut out = Folded::new();
    for (stack, weight) in folded {
        let user: Vec<&str> = stack.split(';').filter(|f| !f.ends_with("_[k]")).collect();
        *out.entry(user.join(";")).or_default() += weight;
    }
    out
}

fn ratio(spike: f64, baseline: f64) -> String {
    if baseline <= 0.0 {
        if spike > 0.0 {
            "none in the baseline".into()
        } else {
            "same as baseline".into()
        }
    } else {
        format!("{:.1}x baseline", spike / baseline)
    }
}

fn run_queue_cause(spike: &WindowStats, baseline: &WindowStats) -> Cause {
    let spike_rate = per_second(spike.run_queue_total_ns, spike.seconds) / 1e6;
    let base_rate = per_second(baseline.run_queue_total_ns, baseline.seconds) / 1e6;
    let (worst_cpu, worst_ns) = spike
        .run_queue_by_cpu
        .iter()
        .max_by_key(|(_, ns)| **ns)
        .map(|(cpu, ns)| (Some(*cpu), *ns))
        .unwrap_or((None, 0));
    let p99_ratio = ratio(
        spike.run_queue.p99_ns as f64,
        baseline.run_queue.p99_ns as f64,
    );
    let summary = match worst_cpu {
        Some(cpu) => format!(
            "run-queue delay p99 {} ({p99_ratio}), most on CPU {cpu}: threads waited {:.1} ms/s for a CPU vs {:.1} ms/s in the baseline",
            human_ns(spike.run_queue.p99_ns),
            per_second(worst_ns, spike.seconds) / 1e6,
            base_rate
        ),
        None => "no run-queue delay observed".into(),
    };
    Cause {
        cause: CauseKind::RunQueueDelay,
        score: (spike_rate - base_rate).max(0.0),
        summary,
        evidence: json!({
            "spike": spike.run_queue,
            "baseline": baseline.run_queue,
            "spike_wait_ms_per_s": spike_rate,
            "baseline_wait_ms_per_s": base_rate,
            "spike_wait_ms_by_cpu": spike.run_queue_by_cpu.iter().map(|(cpu, ns)| (cpu.to_string(), *ns as f64 / 1e6)).collect::<BTreeMap<_, _>>(),
        }),
    }
}

fn off_cpu_cause(spike: &WindowStats, baseline: &WindowStats) -> Cause {
    let busy = |folded: &Folded| -> Folded {
        folded
            .iter()
            .filter(|(stack, _)| !is_idle_wait(stack))
            .map(|(s, w)| (s.clone(), *w))
            .collect()
    };
    let (spike_busy, base_busy) = (busy(&spike.off_cpu), busy(&baseline.off_cpu));
    let total_busy: u64 = spike_busy.values().sum();
    let top = fastest_growing(&spike_busy, spike.seconds, &base_busy, baseline.seconds);
    let (score, summary, top_json) = match &top {
        Some((stack, spike_rate, base_rate)) => {
            let frames: Vec<String> = stack.split(';').map(str::to_string).collect();
            let weight = spike_busy[stack];
            let share = 100.0 * weight as f64 / total_busy.max(1) as f64;
            // Sampled intervals make the figure an estimate: say how close it is.
            let spike_ci95 = ci95(&spike.off_cpu_variance, stack).map(|us| us / spike.seconds);
            let plus_minus = spike_ci95
                .map(|rate| format!(" ± {:.1}", rate / 1e3))
                .unwrap_or_default();
            (
                ((spike_rate - base_rate) / 1e3).max(0.0),
                format!(
                    "{share:.0}% of off-CPU time in {} ({:.1}{plus_minus} ms/s blocked, {})",
                    describe_stack(&frames, 3),
                    spike_rate / 1e3,
                    ratio(*spike_rate, *base_rate)
                ),
                json!({"frames": frames, "weight_us": weight, "share": share / 100.0,
                       "spike_ms_per_s": spike_rate / 1e3, "baseline_ms_per_s": base_rate / 1e3,
                       "spike_ms_per_s_ci95": spike_ci95.map(|rate| rate / 1e3)}),
            )
        }
        None => (
            0.0,
            "no off-CPU time outside idle waits".into(),
            serde_json::Value::Null,
        ),
    };
    Cause {
        cause: CauseKind::OffCpu,
        score,
        summary,
        evidence: json!({
            "top_growing_stack": top_json,
            "spike_blocked_ms_per_s": per_second(total_busy, spike.seconds) / 1e3,
            "baseline_blocked_ms_per_s": per_second(base_busy.values().sum(), baseline.seconds) / 1e3,
            "spike_top": top_stacks_estimated(&spike_busy, &spike.off_cpu_variance, 5),
        }),
    }
}

/// On-CPU stacks, without Go GC work when the target is Go (the `gc` cause accounts for it).
fn non_gc(stats: &WindowStats) -> Folded {
    if stats.go.is_none() {
        return stats.on_cpu.clone();
    }
    stats
        .on_cpu
        .iter()
        .filter(|(stack, _)| {
            !crate::goruntime::classify(&stack.split(';').collect::<Vec<_>>()).is_gc()
        })
        .map(|(s, w)| (s.clone(), *w))
        .collect()
}

fn on_cpu_cause(spike: &WindowStats, baseline: &WindowStats, sample_hz: u64) -> Cause {
    let ms_per_sample = 1e3 / sample_hz.max(1) as f64;
    let (spike_user, base_user) = (
        user_frames_only(&non_gc(spike)),
        user_frames_only(&non_gc(baseline)),
    );
    let total: u64 = spike_user.values().sum();
    let top = fastest_growing(&spike_user, spike.seconds, &base_user, baseline.seconds);
    let (score, summary, top_json) = match &top {
        Some((stack, spike_rate, base_rate)) => {
            let frames: Vec<String> = stack.split(';').map(str::to_string).collect();
            let samples = spike_user[stack];
            let share = 100.0 * samples as f64 / total.max(1) as f64;
            (
                ((spike_rate - base_rate) * ms_per_sample).max(0.0),
                format!(
                    "{share:.0}% of on-CPU samples in {} ({:.0} ms/s of CPU, {})",
                    describe_stack(&frames, 3),
                    spike_rate * ms_per_sample,
                    // Samples, not time: a stack with a few ms/s of CPU can go unsampled,
                    // the more so in a baseline sampled at attach's calm rate.
                    if *base_rate > 0.0 {
                        ratio(*spike_rate, *base_rate)
                    } else {
                        "not sampled in the baseline".into()
                    }
                ),
                json!({"frames": frames, "samples": samples, "share": share / 100.0,
                       "spike_cpu_ms_per_s": spike_rate * ms_per_sample,
                       "baseline_cpu_ms_per_s": base_rate * ms_per_sample}),
            )
        }
        None => (0.0, "no on-CPU samples".into(), serde_json::Value::Null),
    };
    Cause {
        cause: CauseKind::OnCpu,
        score,
        summary,
        evidence: json!({
            "top_growing_stack": top_json,
            "spike_cpu_ms_per_s": per_second(total, spike.seconds) * ms_per_sample,
            "baseline_cpu_ms_per_s": per_second(base_user.values().sum(), baseline.seconds) * ms_per_sample,
            "spike_top": top_stacks(&spike_user, 5),
        }),
    }
}

const MIN_RTO_MS: f64 = 200.0;

fn retransmit_cause(spike: &WindowStats, baseline: &WindowStats) -> Cause {
    let spike_rate = per_second(spike.retransmits.len() as u64, spike.seconds);
    let base_rate = per_second(baseline.retransmits.len() as u64, baseline.seconds);
    let mut ports: BTreeMap<u16, u64> = BTreeMap::new();
    for r in &spike.retransmits {
        *ports.entry(r.local.port()).or_default() += 1;
    }
    let summary = match ports.iter().max_by_key(|(_, n)| **n) {
        Some((port, _)) => format!(
            "{} retransmits on :{port} during the spike ({} in the baseline)",
            spike.retransmits.len(),
            baseline.retransmits.len()
        ),
        None => "no retransmits during the spike".into(),
    };
    Cause {
        cause: CauseKind::TcpRetransmit,
        score: ((spike_rate - base_rate) * MIN_RTO_MS).max(0.0),
        summary,
        evidence: json!({
            "spike_count": spike.retransmits.len(),
            "baseline_count": baseline.retransmits.len(),
            "spike_per_s": spike_rate,
            "baseline_per_s": base_rate,
            "by_local_port": ports,
        }),
    }
}

fn gc_cause(spike: &crate::goruntime::GoStats, baseline: &crate::goruntime::GoStats) -> Cause {
    let gc_cpu = |s: &crate::goruntime::GoStats| -> f64 {
        s.cpu_ms_per_s
            .iter()
            .filter(|(class, _)| class.is_gc())
            .map(|(_, ms)| ms)
            .sum()
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let score = (gc_cpu(spike) - gc_cpu(baseline)).max(0.0)
        + (spike.stw_ms_per_s - baseline.stw_ms_per_s).max(0.0) * cpus;
    let summary = format!(
        "Go GC: {} cycles, {} stop-the-world pauses (longest {}), GC took {:.0}% of the CPU ({:.0}% in mark assists) vs {:.0}% in the baseline",
        spike.gc_cycles,
        spike.stw_pauses,
        human_ns(spike.stw_longest_ns),
        spike.gc_cpu_share * 100.0,
        spike.assist_cpu_share * 100.0,
        baseline.gc_cpu_share * 100.0
    );
    Cause {
        cause: CauseKind::Gc,
        score,
        summary,
        evidence: json!({
            "spike": spike,
            "baseline": baseline,
            "spike_gc_cpu_ms_per_s": gc_cpu(spike),
            "baseline_gc_cpu_ms_per_s": gc_cpu(baseline),
        }),
    }
}

/// All causes (four, five for Go targets), most likely first.
pub fn rank(spike: &WindowStats, baseline: &WindowStats, sample_hz: u64) -> Vec<Cause> {
    let mut causes = vec![
        run_queue_cause(spike, baseline),
        off_cpu_cause(spike, baseline),
        on_cpu_cause(spike, baseline, sample_hz),
        retransmit_cause(spike, baseline),
    ];
    if let (Some(spike_go), Some(base_go)) = (&spike.go, &baseline.go) {
        causes.push(gc_cause(spike_go, base_go));
    }
    causes.sort_by(|a, b| b.score.total_cmp(&a.score));
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{RequestLatency, Retransmit};
    use crate::histogram::Percentiles;

    fn stats(seconds: f64) -> WindowStats {
        WindowStats {
            windows: vec![],
            seconds,
            latency: RequestLatency::default(),
            run_queue: Percentiles::default(),
            run_queue_histogram: crate::histogram::new_histogram(),
            run_queue_by_cpu: BTreeMap::new(),
            run_queue_total_ns: 0,
            off_cpu: Folded::new(),
            off_cpu_variance: StackVariance::new(),
            off_cpu_sampled_below_ms: 0,
            on_cpu: Folded::new(),
            retransmits: vec![],
            go: None,
        }
    }

    #[test]
    fn growing_blocked_stack_wins_and_idle_waits_do_not_count() {
        let mut spike = stats(1.0);
        let mut baseline = stats(4.0);
        spike.off_cpu.insert(
            "srv;main;handle;stall_here;do_nanosleep_[k]".into(),
            500_000,
        );
        // Idle waiting grew even more, but it is not a cause.
        spike
            .off_cpu
            .insert("srv;runtime.netpoll;ep_poll_[k]".into(), 2_000_000);
        baseline
            .off_cpu
            .insert("srv;runtime.netpoll;ep_poll_[k]".into(), 400_000);
        let causes = rank(&spike, &baseline, 499);
        assert_eq!(causes[0].cause, CauseKind::OffCpu);
        assert!(
            (causes[0].score - 500.0).abs() < 1e-6,
            "{}",
            causes[0].score
        );
        assert!(
            causes[0].summary.contains("stall_here"),
            "{}",
            causes[0].summary
        );
    }

    #[test]
    fn a_stack_estimated_from_sampled_intervals_says_how_close_the_estimate_is() {
        let mut spike = stats(2.0);
        let stalled = "srv;main;handle;stall_here;do_nanosleep_[k]";
        let exact = "srv;main;flush;fsync_[k]";
        spike.off_cpu.insert(stalled.into(), 400_000);
        spike.off_cpu.insert(exact.into(), 100_000);
        // A standard error of 10 ms over the 2 s window: ± 9.8 ms/s at 95%.
        spike
            .off_cpu_variance
            .insert(stalled.into(), 10_000f64.powi(2));
        let causes = rank(&spike, &stats(2.0), 499);
        let off_cpu = &causes[0];
        assert_eq!(off_cpu.cause, CauseKind::OffCpu);
        assert!(
            off_cpu.summary.contains("(200.0 ± 9.8 ms/s blocked"),
            "{}",
            off_cpu.summary
        );
        let top = &off_cpu.evidence["top_growing_stack"];
        assert!((top["spike_ms_per_s_ci95"].as_f64().unwrap() - 9.8).abs() < 1e-9);
        let listed = &off_cpu.evidence["spike_top"];
        assert!((listed[0]["ci95"].as_f64().unwrap() - 19_600.0).abs() < 1e-6);
        assert!(listed[1].get("ci95").is_none(), "{listed}");

        // Without sampling, no interval is claimed.
        spike.off_cpu_variance.clear();
        let causes = rank(&spike, &stats(2.0), 499);
        assert!(!causes[0].summary.contains('±'), "{}", causes[0].summary);
        assert!(causes[0].evidence["top_growing_stack"]["spike_ms_per_s_ci95"].is_null());
    }

    #[test]
    fn a_cause_as_large_in_the_baseline_scores_zero() {
        let mut spike = stats(1.0);
        let mut baseline = stats(2.0);
        spike.run_queue_total_ns = 300_000_000;
        baseline.run_queue_total_ns = 600_000_000; // the same 300 ms/s
        spike.run_queue_by_cpu.insert(0, 300_000_000);
        spike.on_cpu.insert("srv;main;spin_here".into(), 499);
        let causes = rank(&spike, &baseline, 499);
        let run_queue = causes
            .iter()
            .find(|c| c.cause == CauseKind::RunQueueDelay)
            .unwrap();
        assert_eq!(run_queue.score, 0.0);
        assert_eq!(causes[0].cause, CauseKind::OnCpu);
        assert!((causes[0].score - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn go_gc_work_moves_from_on_cpu_to_gc() {
        use crate::goruntime::{GoStats, SampleClass};
        let mut spike = stats(1.0);
        let mut baseline = stats(1.0);
        spike.on_cpu.insert(
            "srv;runtime.goexit;runtime.gcBgMarkWorker;runtime.gcDrain".into(),
            400,
        );
        spike
            .on_cpu
            .insert("srv;runtime.goexit;main.handler".into(), 50);
        baseline
            .on_cpu
            .insert("srv;runtime.goexit;main.handler".into(), 50);
        let mut go_spike = GoStats::default();
        go_spike
            .cpu_ms_per_s
            .insert(SampleClass::GcMarkWorker, 400.0);
        go_spike.stw_ms_per_s = 10.0;
        go_spike.stw_pauses = 4;
        spike.go = Some(go_spike);
        baseline.go = Some(GoStats::default());
        let causes = rank(&spike, &baseline, 1000);
        assert_eq!(causes[0].cause, CauseKind::Gc);
        assert!(causes[0].score >= 410.0, "{}", causes[0].score);
        assert!(causes[0].summary.contains("4 stop-the-world pauses"));
        let on_cpu = causes.iter().find(|c| c.cause == CauseKind::OnCpu).unwrap();
        assert_eq!(
            on_cpu.score, 0.0,
            "GC samples must not count as on-CPU growth"
        );
    }

    #[test]
    fn retransmits_are_scored_by_the_minimum_timeout() {
        let mut spike = stats(2.0);
        let baseline = stats(2.0);
        for _ in 0..4 {
            spike.retransmits.push(Retransmit {
                offset_s: 1.0,
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: "127.0.0.1:50000".parse().unwrap(),
                tcp_state: 1,
            });
        }
        let causes = rank(&spike, &baseline, 499);
        assert_eq!(causes[0].cause, CauseKind::TcpRetransmit);
        assert!((causes[0].score - 400.0).abs() < 1e-6);
        assert!(causes[0].summary.contains("4 retransmits on :8080"));
        let json = serde_json::to_value(&causes[0]).unwrap();
        assert_eq!(json["cause"], "tcp_retransmit");
        for kind in [
            CauseKind::RunQueueDelay,
            CauseKind::OffCpu,
            CauseKind::OnCpu,
            CauseKind::TcpRetransmit,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.name());
        }
    }
}
