//! `report.json` (a documented contract, see docs/report-format.md) and `report.md`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::analysis::{RequestLatency, Retransmit, WindowStats};
use crate::attach::AttachReport;
use crate::histogram::{human_ns, Percentiles};
use crate::latency::LatencyKind;
use crate::own_cost::OwnCost;
use crate::recording::{KernelCounters, Recording};
use crate::trigger::Fire;
use crate::verdict::{rank, top_stacks, top_stacks_estimated, Cause, TopStack};
use crate::window::Window;

pub const REPORT_FORMAT: &str = "p99probe-report/1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowInfo {
    /// Seconds from the start of the recording.
    pub start_s: f64,
    pub end_s: f64,
    pub start_unix_ms: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TriggerInfo {
    pub at_s: f64,
    pub at_unix_ms: u64,
    pub latency: LatencyKind,
    pub observed_p99_ns: u64,
    pub threshold_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pair<T> {
    pub spike: T,
    pub baseline: T,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Retransmits {
    pub spike_count: usize,
    pub baseline_count: usize,
    /// Retransmits in the spike window.
    pub events: Vec<Retransmit>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub format: String,
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub hooks: AttachReport,
    /// Absent for a post-mortem report of a window chosen by hand or found in the recording.
    pub trigger: Option<TriggerInfo>,
    /// Which request latency the windows were judged by.
    pub latency_kind: LatencyKind,
    pub spike_window: WindowInfo,
    pub baseline_windows: Vec<WindowInfo>,
    pub request_latency: Pair<RequestLatency>,
    pub run_queue_delay: Pair<Percentiles>,
    /// Weights in microseconds blocked.
    pub off_cpu_top: Pair<Vec<TopStack>>,
    /// The highest off-CPU stack-sampling threshold in force in each window, ms: 0 when every
    /// interval over the minimum was reported; otherwise shorter intervals were sampled in
    /// proportion to their length and weighted back (absent in older reports: 0).
    #[serde(default)]
    pub off_cpu_sampled_below_ms: Pair<u16>,
    /// Weights in samples.
    pub on_cpu_top: Pair<Vec<TopStack>>,
    pub tcp_retransmits: Retransmits,
    pub drops: KernelCounters,
    /// Seconds from the start of the recording before which request latencies and run-queue
    /// waits are incomplete (see `KernelCounters::timings_lost_before_ns`); absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings_complete_from_s: Option<f64>,
    /// Go targets only.
    pub go: Option<GoReport>,
    pub verdict: Vec<Cause>,
    /// What p99probe's own kernel programs cost while attached, up to the end of the capture
    /// (absent when not measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_cost: Option<OwnCost>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GoReport {
    pub version: String,
    pub runtime: Pair<crate::goruntime::GoStats>,
    pub notes: Vec<String>,
}

const GOROUTINE_NOTE: &str = "goroutines that block on channels, sync.Mutex or the network park without blocking an OS thread: that waiting is not in the off-CPU stacks (it shows as request latency and, when it piles up, as runnable goroutines)";

fn window_info(recording: &Recording, window: &Window) -> WindowInfo {
    let offset = |ns: u64| ns.saturating_sub(recording.meta.start_ns) as f64 / 1e9;
    WindowInfo {
        start_s: offset(window.start_ns),
        end_s: offset(window.end_ns),
        start_unix_ms: recording.meta.start_unix_ms
            + window.start_ns.saturating_sub(recording.meta.start_ns) / 1_000_000,
        seconds: window.len_ns() as f64 / 1e9,
    }
}

impl Report {
    pub fn build(
        recording: &Recording,
        spike: Window,
        baseline: &[Window],
        fire: Option<&Fire>,
        latency_kind: LatencyKind,
    ) -> (Report, WindowStats, WindowStats) {
        let spike_stats = WindowStats::compute(recording, &[spike]);
        let base_stats = WindowStats::compute(recording, baseline);
        let verdict = rank(&spike_stats, &base_stats, recording.meta.settings.sample_hz);
        let trigger = fire.map(|f| TriggerInfo {
            at_s: f.at_ns.saturating_sub(recording.meta.start_ns) as f64 / 1e9,
            at_unix_ms: recording.meta.start_unix_ms
                + f.at_ns.saturating_sub(recording.meta.start_ns) / 1_000_000,
            latency: latency_kind,
            observed_p99_ns: f.observed_p99_ns,
            threshold_ns: f.threshold_ns,
        });
        let report = Report {
            format: REPORT_FORMAT.into(),
            pid: recording.meta.pid,
            comm: recording.meta.comm.clone(),
            exe: recording.meta.exe.clone(),
            hooks: recording.meta.hooks.clone(),
            trigger,
            latency_kind,
            spike_window: window_info(recording, &spike),
            baseline_windows: baseline.iter().map(|w| window_info(recording, w)).collect(),
            request_latency: Pair {
                spike: spike_stats.latency.clone(),
                baseline: base_stats.latency.clone(),
            },
            run_queue_delay: Pair {
                spike: spike_stats.run_queue,
                baseline: base_stats.run_queue,
            },
            off_cpu_top: Pair {
                spike: top_stacks_estimated(
                    &spike_stats.off_cpu,
                    &spike_stats.off_cpu_variance,
                    10,
                ),
                baseline: top_stacks_estimated(
                    &base_stats.off_cpu,
                    &base_stats.off_cpu_variance,
                    10,
                ),
            },
            off_cpu_sampled_below_ms: Pair {
                spike: spike_stats.off_cpu_sampled_below_ms,
                baseline: base_stats.off_cpu_sampled_below_ms,
            },
            on_cpu_top: Pair {
                spike: top_stacks(&spike_stats.on_cpu, 10),
                baseline: top_stacks(&base_stats.on_cpu, 10),
            },
            tcp_retransmits: Retransmits {
                spike_count: spike_stats.retransmits.len(),
                baseline_count: base_stats.retransmits.len(),
                events: spike_stats.retransmits.clone(),
            },
            drops: recording.meta.counters,
            timings_complete_from_s: recording
                .meta
                .counters
                .timings_lost_before_ns
                .map(|ns| ns.saturating_sub(recording.meta.start_ns) as f64 / 1e9),
            go: match (&recording.meta.hooks.go, &spike_stats.go, &base_stats.go) {
                (Some(info), Some(spike_go), Some(base_go)) => Some(GoReport {
                    version: info.version.clone(),
                    runtime: Pair {
                        spike: spike_go.clone(),
                        baseline: base_go.clone(),
                    },
                    notes: vec![GOROUTINE_NOTE.into()],
                }),
                _ => None,
            },
            verdict,
            own_cost: recording.meta.own_cost.clone(),
        };
        (report, spike_stats, base_stats)
    }

    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# p99probe: {} (pid {})\n", self.comm, self.pid);
        if let Some(top) = self.verdict.first() {
            let _ = writeln!(
                md,
                "**Most likely cause: `{}`** — {}\n",
                top.cause.name(),
                top.summary
            );
        }
        if let Some(t) = &self.trigger {
            let _ = writeln!(
                md,
                "Triggered at {:.2} s: {} latency P99 {} over the threshold {}.\n",
                t.at_s,
                format!("{:?}", t.latency).to_lowercase(),
                human_ns(t.observed_p99_ns),
                human_ns(t.threshold_ns)
            );
        }
        let _ = writeln!(
            md,
            "Spike window {:.2}–{:.2} s; baseline {}. Scheduler hook: {}.\n",
            self.spike_window.start_s,
            self.spike_window.end_s,
            self.baseline_windows
                .iter()
                .map(|w| format!("{:.2}–{:.2} s", w.start_s, w.end_s))
                .collect::<Vec<_>>()
                .join(", "),
            self.hooks.scheduler
        );
        let _ = writeln!(
            md,
            "## Verdict\n\n| rank | cause | score (ms/s) | summary |\n|---|---|---|---|"
        );
        for (i, cause) in self.verdict.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | `{}` | {:.1} | {} |",
                i + 1,
                cause.cause.name(),
                cause.score,
                cause.summary
            );
        }
        let _ = writeln!(
            md,
            "\nScore: extra milliseconds per second of this cause in the spike over the baseline.\n"
        );
        let _ = writeln!(
            md,
            "## Latency\n\n| | count | p50 | p99 | p99.9 | max |\n|---|---|---|---|---|---|"
        );
        let rows = [
            (
                "request (server), spike",
                &self.request_latency.spike.server,
            ),
            (
                "request (server), baseline",
                &self.request_latency.baseline.server,
            ),
            (
                "request (delivery), spike",
                &self.request_latency.spike.delivery,
            ),
            (
                "request (delivery), baseline",
                &self.request_latency.baseline.delivery,
            ),
            ("run-queue delay, spike", &self.run_queue_delay.spike),
            ("run-queue delay, baseline", &self.run_queue_delay.baseline),
        ];
        for (label, p) in rows {
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} |",
                p.count,
                human_ns(p.p50_ns),
                human_ns(p.p99_ns),
                human_ns(p.p999_ns),
                human_ns(p.max_ns)
            );
        }
        let stacks = |md: &mut String, title: &str, unit: &str, list: &[TopStack]| {
            let _ = writeln!(md, "\n## {title}\n");
            for s in list.iter().take(5) {
                let plus_minus = s.ci95.map(|ci| format!(" ± {ci:.0}")).unwrap_or_default();
                let _ = writeln!(
                    md,
                    "- {}{plus_minus} {unit} ({:.0}%): `{}`",
                    s.weight,
                    s.share * 100.0,
                    crate::flamegraph::describe_stack(&s.frames, 4)
                );
            }
        };
        stacks(
            &mut md,
            "Top off-CPU stacks in the spike",
            "us",
            &self.off_cpu_top.spike,
        );
        stacks(
            &mut md,
            "Top on-CPU stacks in the spike",
            "samples",
            &self.on_cpu_top.spike,
        );
        let _ = writeln!(
            md,
            "\n## TCP retransmits\n\n{} in the spike, {} in the baseline.",
            self.tcp_retransmits.spike_count, self.tcp_retransmits.baseline_count
        );
        if let Some(go) = &self.go {
            let (s, b) = (&go.runtime.spike, &go.runtime.baseline);
            let _ = writeln!(
                md,
                "\n## Go runtime ({})\n\n| | GC cycles | STW pauses | longest STW | GC CPU | assists |\n|---|---|---|---|---|---|",
                go.version
            );
            for (label, g) in [("spike", s), ("baseline", b)] {
                let _ = writeln!(
                    md,
                    "| {label} | {} | {} | {} | {:.0}% | {:.0}% |",
                    g.gc_cycles,
                    g.stw_pauses,
                    human_ns(g.stw_longest_ns),
                    g.gc_cpu_share * 100.0,
                    g.assist_cpu_share * 100.0
                );
            }
            for note in &go.notes {
                let _ = writeln!(md, "\nNote: {note}.");
            }
        }
        let _ = writeln!(
            md,
            "\n## Data quality\n\n{} events lost in the kernel (ring buffer full, or timings overwritten before the agent read them), {} stacks missing, {} requests untimed (their connection's slot was taken by another).",
            self.drops.lost(), self.drops.stacks_missing, self.drops.requests_untimed
        );
        if self.drops.state_map_full > 0 {
            let _ = writeln!(
                md,
                "\n{} times a thread found both of its state slots in the kernel held by other threads and took one: the off-CPU interval or run-queue wait that thread had in progress was not recorded.",
                self.drops.state_map_full
            );
        }
        if let Some(from_s) = self.timings_complete_from_s {
            let _ = writeln!(
                md,
                "\nWhen the capture fired, a busy CPU's timing ring in the kernel no longer held the request latencies and run-queue waits from before {from_s:.1} s into the recording: windows before that have fewer of them than happened."
            );
        }
        let sampled = &self.off_cpu_sampled_below_ms;
        if sampled.spike > 0 || sampled.baseline > 0 {
            let _ = writeln!(
                md,
                "\nOff-CPU intervals came faster than the stack-walk budget (`--offcpu-stack-budget`), so those shorter than a threshold (up to {} ms in the spike, {} ms in the baseline) were sampled in proportion to their length and each counted for the intervals it stands for: off-CPU times are estimates, and every longer interval is there with its own stacks.",
                sampled.spike, sampled.baseline
            );
        }
        if let Some(cost) = &self.own_cost {
            own_cost_markdown(&mut md, cost);
        }
        md
    }
}

/// The agent's own kernel time, with the programs that took it, so a user can weigh what the
/// tool cost against the spike it explains.
fn own_cost_markdown(md: &mut String, cost: &OwnCost) {
    let Some(summary) = cost.summary() else {
        return;
    };
    let _ = writeln!(md, "\n## p99probe's own cost\n\n{summary}.");
    if cost.programs.is_empty() {
        return;
    }
    let seconds = cost.measured_ns as f64 / 1e9;
    let _ = writeln!(
        md,
        "\n| program | runs/s | ns per run | ms/s |\n|---|---|---|---|"
    );
    for program in &cost.programs {
        let _ = writeln!(
            md,
            "| `{}` | {:.0} | {:.0} | {:.2} |",
            program.program,
            program.runs as f64 / seconds,
            program.ns_per_run(),
            program.run_time_ns as f64 / seconds / 1e6
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::tests::sample_recording;

    /// The report of the sample recording's second half-second against the one before.
    fn build(recording: &Recording) -> Report {
        let spike = Window::new(1_500_000_000, 2_000_000_000);
        let baseline = Window::new(1_000_000_000, 1_500_000_000);
        Report::build(recording, spike, &[baseline], None, LatencyKind::Server).0
    }

    #[test]
    fn a_capture_whose_timings_were_cut_says_from_when_they_are_whole() {
        let mut recording = sample_recording();
        let whole = build(&recording);
        assert_eq!(whole.timings_complete_from_s, None);
        assert!(!whole.to_markdown().contains("timing ring"));
        recording.meta.counters.timings_lost_before_ns = Some(1_250_000_000);
        let cut = build(&recording);
        assert_eq!(cut.timings_complete_from_s, Some(0.25));
        assert!(cut
            .to_markdown()
            .contains("from before 0.2 s into the recording"));
        let json = serde_json::to_value(&cut).unwrap();
        assert_eq!(json["timings_complete_from_s"], 0.25);
        assert!(serde_json::to_value(&whole).unwrap()["timings_complete_from_s"].is_null());
    }

    #[test]
    fn the_agents_own_kernel_time_is_reported_with_its_programs() {
        let report = build(&sample_recording());
        let md = report.to_markdown();
        assert!(
            md.contains("p99probe's own kernel time: 13.00 ms/s (1.30% of one CPU) in 100000 program runs/s, 260 ns per request served"),
            "{md}"
        );
        assert!(
            md.contains("| `sk_data_ready_btf` | 100000 | 130 | 13.00 |"),
            "{md}"
        );
        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.own_cost, report.own_cost);
    }

    #[test]
    fn thread_states_that_displaced_others_are_reported_under_data_quality() {
        let mut recording = sample_recording();
        assert!(!build(&recording).to_markdown().contains("state slots"));
        recording.meta.counters.state_map_full = 3;
        assert!(build(&recording)
            .to_markdown()
            .contains("3 times a thread found both of its state slots"));
    }
}
