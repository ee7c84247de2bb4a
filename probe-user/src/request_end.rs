//! Where the kernel ends a request's server latency: at the server's response write (the write
//! hook, `sock_send_length`), or, without that hook, when the peer next shows it got the
//! response (its next request, or its FIN) — then the request ends when the last acknowledged
//! response segment was sent.
//!
//! The write hook runs on every send on the machine and costs the server ~3% of its throughput
//! under a saturating closed-loop load here (interleaved A/B, Go under wrk: 0.957 with it,
//! 0.99 without). Under such a load the next request comes within microseconds of the
//! response, so the hook buys nothing. At a trickle it is cheap, and it is what reports a
//! request at once when its connection then sits idle. So the hook is attached while the
//! request rate is low and detached while it is high.

/// When the write hook is attached. Delivery latency needs it throughout, whatever this says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteHookPolicy {
    /// Attached while the request rate is low ([`WriteHookGovernor`]).
    #[default]
    WhileRateIsLow,
    Always,
    /// Never: every request ends when the peer acknowledges its response.
    Never,
}

/// Requests per second at or above which the write hook is detached.
pub const DETACH_AT_PER_S: f64 = 2_000.0;

/// Requests per second below which it is attached again. Well under [`DETACH_AT_PER_S`], so a
/// rate around either mark does not flap the hook.
pub const ATTACH_BELOW_PER_S: f64 = 500.0;

/// How long requests are counted before each decision.
pub const DECIDE_EVERY_NS: u64 = 250_000_000;

/// Decides, from the rate of requests the agent receives, whether the write hook should be
/// attached.
#[derive(Clone, Debug)]
pub struct WriteHookGovernor {
    attached: bool,
    since_ns: u64,
    requests: u64,
}

impl WriteHookGovernor {
    /// Starts with the hook attached (`attached`), counting from `now_ns`.
    pub fn new(now_ns: u64, attached: bool) -> Self {
        WriteHookGovernor {
            attached,
            since_ns: now_ns,
            requests: 0,
        }
    }

    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Counts `requests` ended since the last call; at most every [`DECIDE_EVERY_NS`],
    /// returns the hook's new state (`true`: attach) when it must change.
    pub fn observe(&mut self, now_ns: u64, requests: u64) -> Option<bool> {
        self.requests += requests;
        let elapsed_ns = now_ns.saturating_sub(self.since_ns);
        if elapsed_ns < DECIDE_EVERY_NS {
            return None;
        }
        let per_s = self.requests as f64 * 1e9 / elapsed_ns as f64;
        self.since_ns = now_ns;
        self.requests = 0;
        let attach = if self.attached {
            per_s < DETACH_AT_PER_S
        } else {
            per_s < ATTACH_BELOW_PER_S
        };
        (attach != self.attached).then(|| {
            self.attached = attach;
            attach
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn decides_only_after_a_full_period() {
        let mut governor = WriteHookGovernor::new(0, true);
        assert_eq!(governor.observe(100 * MS, 10_000), None);
        // 10,000 + 1,000 requests in 250 ms: 44,000/s.
        assert_eq!(governor.observe(250 * MS, 1_000), Some(false));
        assert!(!governor.is_attached());
    }

    #[test]
    fn hysteresis_keeps_the_state_between_the_marks() {
        let mut governor = WriteHookGovernor::new(0, true);
        // 1,000/s: under the detach mark, stays attached.
        assert_eq!(governor.observe(1_000 * MS, 1_000), None);
        // 3,000/s: detached.
        assert_eq!(governor.observe(2_000 * MS, 3_000), Some(false));
        // 1,000/s: above the attach mark, stays detached.
        assert_eq!(governor.observe(3_000 * MS, 1_000), None);
        // 400/s: attached again.
        assert_eq!(governor.observe(4_000 * MS, 400), Some(true));
    }

    #[test]
    fn no_requests_attaches() {
        let mut governor = WriteHookGovernor::new(0, false);
        assert_eq!(governor.observe(300 * MS, 0), Some(true));
    }
}
