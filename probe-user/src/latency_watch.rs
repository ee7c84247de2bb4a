//! When the kernel watches the trigger's latency for the agent, so that busy drains can come
//! seldom.
//!
//! Under a busy, calm target each drain is a wakeup of the agent, and on a CPU it shares with
//! the load (or the target) each wakeup makes whatever waits there wait out its turn. While
//! P99 is well under the threshold the drains serve only the agent's upkeep, so they come once
//! a second, and the kernel wakes the agent when 1% of a time slice's requests on a CPU reach
//! the watch mark (`probe_common::latency_rising`): half the threshold, where sampling goes to
//! full rate. From there on the usual drain intervals hold, as the trigger and the capture
//! wait on them.
//!
//! A slice is a twentieth of the trigger's window, so one slice's P99 can reach the mark while
//! the window's stays under it. Where latency hovers near the mark (a threshold set at twice
//! the usual P99, say), that could wake the agent a few times every second, more often than
//! the drains it replaced. So a wake that finds the window's P99 still under the mark rests
//! the watch for a while, and drains keep their usual busy interval meanwhile.

use crate::sampling::full_rate_mark_ns;

/// How long the watch rests after a wake that found the window's P99 under the mark.
pub const REST_NS: u64 = 5_000_000_000;

/// Decides the watch mark at each P99 check.
#[derive(Clone, Debug, Default)]
pub struct LatencyWatch {
    rest_until_ns: u64,
}

impl LatencyWatch {
    /// The mark the kernel should watch for (ns), or `None` for no watch, given the trigger's
    /// threshold (`None` while it is learned), the window's P99 (`None` without requests),
    /// whether a capture is open, and whether this check follows a wake by the kernel.
    pub fn mark(
        &mut self,
        now_ns: u64,
        threshold_ns: Option<u64>,
        p99_ns: Option<u64>,
        capturing: bool,
        woken: bool,
    ) -> Option<u64> {
        let mark = full_rate_mark_ns(threshold_ns?);
        let calm = !capturing && p99_ns.is_none_or(|p99| p99 < mark);
        if calm && woken {
            self.rest_until_ns = now_ns + REST_NS;
        }
        (calm && now_ns >= self.rest_until_ns).then_some(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    #[test]
    fn half_the_threshold_is_watched_only_while_calm() {
        let mut watch = LatencyWatch::default();
        let threshold = Some(10 * MS);
        assert_eq!(
            watch.mark(S, threshold, Some(MS), false, false),
            Some(5 * MS)
        );
        assert_eq!(
            watch.mark(S, threshold, None, false, false),
            Some(5 * MS),
            "no requests yet"
        );
        assert_eq!(
            watch.mark(S, threshold, Some(5 * MS), false, false),
            None,
            "at the mark"
        );
        assert_eq!(
            watch.mark(S, threshold, Some(MS), true, false),
            None,
            "capturing"
        );
        assert_eq!(
            watch.mark(S, None, Some(MS), false, false),
            None,
            "threshold not learned"
        );
    }

    #[test]
    fn a_wake_that_finds_the_window_calm_rests_the_watch() {
        let mut watch = LatencyWatch::default();
        let threshold = Some(10 * MS);
        assert_eq!(watch.mark(S, threshold, Some(4 * MS), false, true), None);
        assert_eq!(
            watch.mark(S + REST_NS - 1, threshold, Some(4 * MS), false, false),
            None,
            "still resting"
        );
        assert_eq!(
            watch.mark(S + REST_NS, threshold, Some(4 * MS), false, false),
            Some(5 * MS)
        );
    }

    #[test]
    fn a_wake_that_finds_the_window_at_the_mark_does_not_rest_the_watch() {
        let mut watch = LatencyWatch::default();
        let threshold = Some(10 * MS);
        assert_eq!(watch.mark(S, threshold, Some(6 * MS), false, true), None);
        assert_eq!(
            watch.mark(S + MS, threshold, Some(MS), false, false),
            Some(5 * MS),
            "calm again at once"
        );
    }
}
