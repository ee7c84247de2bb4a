//! On-CPU sampling rate while attached: the full `--sample-hz` around spikes, a lower calm rate
//! while the target's P99 stays well under the threshold, and what each sample then weighs.
//!
//! Each sample is a timer interrupt and two stack walks on the target's CPU, the largest cost
//! p99probe has after timing requests. Most of an `attach` session is calm, and the calm
//! stretches only serve as the baseline a spike is compared with, which needs CPU time per
//! stack, not fine resolution. So sampling drops to `--calm-sample-hz` there, and goes back to
//! full rate as soon as P99 reaches half the threshold or a capture is open. Samples carry
//! their period, and every on-CPU figure weighs them by it, so calm and full-rate stretches
//! add up to the same CPU time.

/// How long sampling stays at full rate after the last sign of trouble (P99 at half the
/// threshold, or an open capture): P99 hovering around that mark does not flap the rate, and
/// a spike that comes back soon after a capture is sampled at full rate from its start.
pub const FULL_RATE_HOLD_NS: u64 = 5_000_000_000;

/// P99 at this fraction of the threshold or more switches to full rate.
const FULL_RATE_AT_THRESHOLD_FRACTION: f64 = 0.5;

/// The P99 (ns) at or over which sampling goes to full rate: the smallest whole ns at the
/// fraction of `threshold_ns`. Also where the kernel watches latency for the agent
/// (`latency_watch`), so that the two agree on what calm is.
pub fn full_rate_mark_ns(threshold_ns: u64) -> u64 {
    (threshold_ns as f64 * FULL_RATE_AT_THRESHOLD_FRACTION).ceil() as u64
}

/// The calm rate as a whole number of full-rate periods (so calm samples weigh a whole number
/// of full-rate samples): `sample_hz / calm_hz`, rounded; 1 means no calm rate.
pub fn calm_divisor(sample_hz: u64, calm_hz: u64) -> u64 {
    if sample_hz == 0 || calm_hz == 0 || calm_hz >= sample_hz {
        return 1;
    }
    (sample_hz + calm_hz / 2) / calm_hz
}

/// The `cpu-clock` period of full-rate sampling, in ns.
pub fn full_period_ns(sample_hz: u64) -> u64 {
    1_000_000_000 / sample_hz.max(1)
}

/// How many full-rate samples a sample taken every `period_ns` stands for: 1 at full rate,
/// the calm divisor at the calm rate. Samples without a period (recordings made before calm
/// sampling existed) weigh 1.
pub fn sample_weight(period_ns: u64, sample_hz: u64) -> u64 {
    if period_ns == 0 || sample_hz == 0 {
        return 1;
    }
    let full = full_period_ns(sample_hz);
    ((period_ns + full / 2) / full).max(1)
}

/// Decides, at each P99 check, whether sampling should be at the calm or the full rate.
#[derive(Clone, Debug)]
pub struct SamplingGovernor {
    /// 1 when there is no calm rate: the governor then never asks for a change.
    calm_divisor: u64,
    calm: bool,
    full_rate_until_ns: u64,
}

impl SamplingGovernor {
    /// Starts calm (the probes attach at the calm rate) unless there is no calm rate.
    pub fn new(calm_divisor: u64) -> Self {
        SamplingGovernor {
            calm_divisor,
            calm: calm_divisor > 1,
            full_rate_until_ns: 0,
        }
    }

    pub fn is_calm(&self) -> bool {
        self.calm
    }

    /// Looks at the current P99 (`None` while there are no requests) against the trigger's
    /// threshold (`None` while it is still being learned) and whether a capture is open.
    /// Returns the new state (`true` for calm) when the rate must change.
    pub fn observe(
        &mut self,
        now_ns: u64,
        p99_ns: Option<u64>,
        threshold_ns: Option<u64>,
        capturing: bool,
    ) -> Option<bool> {
        if self.calm_divisor <= 1 {
            return None;
        }
        let near_threshold = match (p99_ns, threshold_ns) {
            (Some(p99), Some(threshold)) => p99 >= full_rate_mark_ns(threshold),
            _ => false,
        };
        if capturing || near_threshold {
            self.full_rate_until_ns = now_ns + FULL_RATE_HOLD_NS;
            if self.calm {
                self.calm = false;
                return Some(false);
            }
            return None;
        }
        if !self.calm && now_ns >= self.full_rate_until_ns {
            self.calm = true;
            return Some(true);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    #[test]
    fn divisor_rounds_to_whole_periods_and_one_means_no_calm_rate() {
        assert_eq!(calm_divisor(499, 99), 5);
        assert_eq!(calm_divisor(499, 49), 10);
        assert_eq!(calm_divisor(499, 499), 1);
        assert_eq!(calm_divisor(499, 1000), 1);
        assert_eq!(calm_divisor(499, 0), 1);
        assert_eq!(calm_divisor(0, 99), 1);
    }

    #[test]
    fn calm_samples_weigh_the_divisor_and_old_samples_weigh_one() {
        let full = full_period_ns(499);
        assert_eq!(full, 2_004_008);
        assert_eq!(sample_weight(full, 499), 1);
        assert_eq!(sample_weight(5 * full, 499), 5);
        assert_eq!(sample_weight(0, 499), 1);
        // A period shorter than full rate still counts once, never zero.
        assert_eq!(sample_weight(full / 3, 499), 1);
    }

    #[test]
    fn full_rate_near_the_threshold_and_calm_again_after_the_hold() {
        let mut governor = SamplingGovernor::new(5);
        assert!(governor.is_calm());
        let threshold = Some(10 * MS);
        assert_eq!(governor.observe(S, Some(4 * MS), threshold, false), None);
        assert_eq!(
            governor.observe(2 * S, Some(5 * MS), threshold, false),
            Some(false)
        );
        assert_eq!(governor.observe(3 * S, Some(MS), threshold, false), None);
        assert!(!governor.is_calm());
        assert_eq!(
            governor.observe(2 * S + FULL_RATE_HOLD_NS, Some(MS), threshold, false),
            Some(true)
        );
        assert!(governor.is_calm());
    }

    #[test]
    fn an_open_capture_keeps_full_rate_whatever_the_p99() {
        let mut governor = SamplingGovernor::new(5);
        assert_eq!(governor.observe(S, None, None, true), Some(false));
        assert_eq!(
            governor.observe(S + 10 * FULL_RATE_HOLD_NS, Some(MS), Some(10 * MS), true),
            None
        );
        assert_eq!(
            governor.observe(S + 12 * FULL_RATE_HOLD_NS, Some(MS), Some(10 * MS), false),
            Some(true)
        );
    }

    #[test]
    fn no_threshold_yet_or_no_requests_stays_calm() {
        let mut governor = SamplingGovernor::new(5);
        assert_eq!(governor.observe(S, Some(500 * MS), None, false), None);
        assert_eq!(governor.observe(S, None, Some(10 * MS), false), None);
        assert!(governor.is_calm());
    }

    #[test]
    fn without_a_calm_rate_nothing_changes() {
        let mut governor = SamplingGovernor::new(1);
        assert!(!governor.is_calm());
        assert_eq!(governor.observe(S, Some(MS), Some(10 * MS), false), None);
        assert_eq!(
            governor.observe(S, Some(50 * MS), Some(10 * MS), true),
            None
        );
    }
}
