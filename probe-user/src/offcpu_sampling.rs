//! A budget for off-CPU stack walks.
//!
//! The kernel walks an off-CPU interval's two stacks (kernel and user) when the thread comes
//! back, once the interval is known to be over `--min-offcpu`. A walk pair costs 7–12 µs here
//! (`kernel.bpf_stats_enabled`, and a CPU profile agrees: a thread sleeping 1 ms in a loop made
//! `sched_exit_btf` cost 5.8 µs per run, half of its runs walking, against 0.3 µs with the
//! walks left out; 32 threads sleeping 2 ms, 7.7 µs per run, nearly all walking). At a hundred
//! intervals a second, as under the Go benchmark load, that is nothing; a thread-pool server
//! with a few hundred threads blocking a few milliseconds at a time makes tens of thousands a
//! second, and would cost a CPU. The 32 sleeping threads made 11,000 a second: 82 ms of
//! `sched_exit_btf` per second with every interval walked, 15 ms/s under the default budget.
//!
//! So while the intervals come faster than the budget, the kernel samples them in proportion
//! to their length: under a threshold `D`, an interval of length `d` is reported (and its stacks
//! walked) with probability `d / D` and stands for `D / d` intervals like it; intervals of at
//! least `D` are all reported, each with its own stacks. That estimate of the time blocked per
//! stack is unbiased, and the long blocks that explain a spike are never sampled away. The
//! governor here picks `D` from the rate of reported intervals, once a second.

use crate::events::Event;

/// Reported off-CPU intervals (each a pair of stack walks) per second that `--offcpu-stack-budget`
/// allows by default: at most 7–12 ms of kernel time per second here, about 1% of one CPU, and
/// the governor aims at half of it.
pub const DEFAULT_BUDGET_PER_S: u32 = 1000;

/// The largest threshold the kernel is given, in ms (its event field is 16 bits wide, and one
/// value is taken).
pub const MAX_THRESHOLD_MS: u32 = 60_000;

/// How long reports are counted before each decision.
pub const DECIDE_EVERY_NS: u64 = 1_000_000_000;

/// Picks the sampling threshold `D` from the intervals the agent receives.
#[derive(Clone, Debug)]
pub struct OffCpuSamplingGovernor {
    /// Reported intervals per second allowed; 0: no limit, `D` stays 0.
    budget_per_s: u32,
    threshold_ms: u32,
    since_ns: u64,
    reported: u64,
    /// Estimated off-CPU time of all intervals over the minimum, reported or not.
    estimated_ns: f64,
}

impl OffCpuSamplingGovernor {
    pub fn new(now_ns: u64, budget_per_s: u32) -> Self {
        OffCpuSamplingGovernor {
            budget_per_s,
            threshold_ms: 0,
            since_ns: now_ns,
            reported: 0,
            estimated_ns: 0.0,
        }
    }

    /// The threshold in force, ms; 0 while every interval is reported.
    pub fn threshold_ms(&self) -> u32 {
        self.threshold_ms
    }

    /// Counts one reported interval (other events are ignored), with the time of all the
    /// intervals it stands for.
    pub fn count(&mut self, event: &Event) {
        if let Event::OffCpu { duration_ns, .. } = *event {
            self.reported += 1;
            self.estimated_ns += event.weigh_off_cpu(duration_ns) as f64;
        }
    }

    /// At most every [`DECIDE_EVERY_NS`], the new threshold (ms) when it must change.
    ///
    /// Over the budget, `D` is set so that the intervals counted would have made half the
    /// budget: below `D`, reports per second come to about (time blocked per second) / `D`.
    /// Under a quarter of the budget, `D` halves. The gap keeps a steady load from flapping it.
    pub fn decide(&mut self, now_ns: u64) -> Option<u32> {
        let elapsed_ns = now_ns.saturating_sub(self.since_ns);
        if elapsed_ns < DECIDE_EVERY_NS {
            return None;
        }
        let seconds = elapsed_ns as f64 / 1e9;
        let reported_per_s = self.reported as f64 / seconds;
        let blocked_ns_per_s = self.estimated_ns / seconds;
        self.since_ns = now_ns;
        self.reported = 0;
        self.estimated_ns = 0.0;
        if self.budget_per_s == 0 {
            return None;
        }
        let budget = self.budget_per_s as f64;
        let threshold_ms = if reported_per_s > budget {
            let aim_ms = (2.0 * blocked_ns_per_s / budget / 1e6).ceil() as u32;
            aim_ms.max(self.threshold_ms * 2).max(1)
        } else if reported_per_s * 4.0 < budget {
            self.threshold_ms / 2
        } else {
            self.threshold_ms
        }
        .min(MAX_THRESHOLD_MS);
        (threshold_ms != self.threshold_ms).then(|| {
            self.threshold_ms = threshold_ms;
            threshold_ms
        })
    }
}

/// For the status line: how off-CPU intervals are sampled, when they are.
pub fn status(threshold_ms: u32) -> String {
    if threshold_ms == 0 {
        String::new()
    } else {
        format!(" | off-CPU stacks sampled below {threshold_ms} ms")
    }
}

/// The sampled off-CPU intervals of a recording, for `info`.
#[derive(Clone, Debug, Default)]
pub struct SampledIntervals {
    reported: u64,
    sampled: u64,
    /// How many intervals the sampled ones stand for.
    stand_for: f64,
    highest_threshold_ms: u16,
}

impl SampledIntervals {
    pub fn add(&mut self, event: &Event) {
        let Event::OffCpu {
            duration_ns,
            sampled_below_ms,
            ..
        } = *event
        else {
            return;
        };
        self.reported += 1;
        if sampled_below_ms > 0 {
            self.sampled += 1;
            self.stand_for += event.weigh_off_cpu(duration_ns) as f64 / duration_ns.max(1) as f64;
            self.highest_threshold_ms = self.highest_threshold_ms.max(sampled_below_ms);
        }
    }

    pub fn summary(&self) -> Option<String> {
        (self.sampled > 0).then(|| {
            format!(
                "off-CPU: {} of {} intervals were sampled under a threshold of up to {} ms (--offcpu-stack-budget) and stand for about {:.0} intervals",
                self.sampled, self.reported, self.highest_threshold_ms, self.stand_for
            )
        })
    }
}

/// What to tell the user at the end of a run whose threshold changed (`changes`: when, and to
/// what, in ms); `None` when every interval was reported throughout.
pub fn summary_line(changes: &[(u64, u32)]) -> Option<String> {
    let highest = changes
        .iter()
        .map(|&(_, ms)| ms)
        .max()
        .filter(|&ms| ms > 0)?;
    Some(format!(
        "off-CPU intervals came faster than --offcpu-stack-budget: for part of the run those shorter than a threshold (up to {highest} ms) were sampled in proportion to their length and weighted back"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    fn off(duration_ns: u64, sampled_below_ms: u16) -> Event {
        Event::OffCpu {
            ts_ns: 1,
            tid: 1,
            cpu: 0,
            duration_ns,
            wait_ns: 0,
            state: 1,
            preempted: false,
            sampled_below_ms,
            kernel_stack: None,
            user_stack: None,
        }
    }

    /// Feeds one second of intervals as the kernel would report them under the governor's
    /// threshold: `threads` threads each blocking `d_ms` at a time all second.
    fn one_second(governor: &mut OffCpuSamplingGovernor, threads: u64, d_ms: u64) {
        let intervals = threads * 1000 / d_ms;
        let threshold_ms = governor.threshold_ms() as u64;
        let (reported, below) = if threshold_ms > d_ms {
            (intervals * d_ms / threshold_ms, threshold_ms as u16)
        } else {
            (intervals, 0)
        };
        for _ in 0..reported {
            governor.count(&off(d_ms * MS, below));
        }
    }

    #[test]
    fn within_the_budget_every_interval_is_reported() {
        let mut governor = OffCpuSamplingGovernor::new(0, 1000);
        one_second(&mut governor, 1, 2);
        assert_eq!(governor.decide(S / 2), None, "decides only after a second");
        assert_eq!(governor.decide(S), None);
        assert_eq!(governor.threshold_ms(), 0);
    }

    #[test]
    fn over_the_budget_the_threshold_brings_reports_to_half_of_it() {
        // 32 threads blocking 2 ms at a time: 16,000 intervals, 32 s blocked per second.
        let mut governor = OffCpuSamplingGovernor::new(0, 1000);
        one_second(&mut governor, 32, 2);
        assert_eq!(governor.decide(S), Some(64));
        // At 64 ms, 16,000 × 2/64 = 500 reports a second: half the budget, and it stays.
        for second in 2..6 {
            one_second(&mut governor, 32, 2);
            assert_eq!(governor.decide(second * S), None);
        }
        // The load goes: the threshold halves down to nothing.
        let mut second = 6;
        while governor.threshold_ms() > 0 {
            one_second(&mut governor, 1, 100);
            governor.decide(second * S);
            second += 1;
        }
        assert_eq!(second, 6 + 7, "64 → 32 → … → 1 → 0");
    }

    #[test]
    fn the_summary_names_the_highest_threshold() {
        assert_eq!(summary_line(&[]), None);
        assert_eq!(summary_line(&[(1, 0)]), None);
        let line = summary_line(&[(1, 16), (2, 64), (3, 0)]).unwrap();
        assert!(line.contains("up to 64 ms"), "{line}");
    }

    #[test]
    fn info_counts_the_intervals_the_sampled_ones_stand_for() {
        let mut intervals = SampledIntervals::default();
        intervals.add(&off(50 * MS, 0));
        assert_eq!(intervals.summary(), None);
        // 2 ms under 8 ms stands for 4; 4 ms under 16 ms for 4 more.
        intervals.add(&off(2 * MS, 8));
        intervals.add(&off(4 * MS, 16));
        let line = intervals.summary().unwrap();
        assert!(
            line.contains("2 of 3 intervals")
                && line.contains("up to 16 ms")
                && line.contains("about 8 intervals"),
            "{line}"
        );
    }

    #[test]
    fn no_budget_never_samples_and_the_threshold_is_bounded() {
        let mut unlimited = OffCpuSamplingGovernor::new(0, 0);
        one_second(&mut unlimited, 1000, 1);
        assert_eq!(unlimited.decide(S), None);
        let mut governor = OffCpuSamplingGovernor::new(0, 1);
        for _ in 0..100_000 {
            governor.count(&off(10 * S, 0));
        }
        assert_eq!(governor.decide(S), Some(MAX_THRESHOLD_MS));
    }
}
