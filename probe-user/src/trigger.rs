//! When to capture: P99 over the sliding window against an absolute threshold or a multiple of
//! a learned baseline, with a cooldown and a cap on captures.

use serde::{Deserialize, Serialize};

use crate::histogram::Percentiles;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    /// Fire when P99 exceeds this many nanoseconds.
    Absolute { p99_ns: u64 },
    /// Fire when P99 exceeds `factor` × the baseline P99 learned over the first `learn_ns`.
    Factor { factor: f64, learn_ns: u64 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct TriggerConfig {
    pub threshold: Threshold,
    /// Windows with fewer requests say too little about a P99 to act on.
    pub min_requests: u64,
    pub cooldown_ns: u64,
    pub max_captures: usize,
    /// No capture before this long after the first observation: a capture needs a baseline
    /// before its spike (and attaching itself can disturb the target for a moment).
    pub arm_after_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fire {
    pub at_ns: u64,
    pub observed_p99_ns: u64,
    pub threshold_ns: u64,
}

pub struct Trigger {
    config: TriggerConfig,
    started_ns: Option<u64>,
    learning: Vec<u64>,
    baseline_p99_ns: Option<u64>,
    last_fire_ns: Option<u64>,
    fired: usize,
}

impl Trigger {
    pub fn new(config: TriggerConfig) -> Self {
        Trigger {
            config,
            started_ns: None,
            learning: Vec::new(),
            baseline_p99_ns: None,
            last_fire_ns: None,
            fired: 0,
        }
    }

    /// The P99 that fires, once known (a factor threshold needs its learning period first).
    pub fn threshold_ns(&self) -> Option<u64> {
        match self.config.threshold {
            Threshold::Absolute { p99_ns } => Some(p99_ns),
            Threshold::Factor { factor, .. } => self
                .baseline_p99_ns
                .map(|base| (base as f64 * factor) as u64),
        }
    }

    pub fn baseline_p99_ns(&self) -> Option<u64> {
        self.baseline_p99_ns
    }

    pub fn armed(&self, now_ns: u64) -> bool {
        self.started_ns
            .is_some_and(|s| now_ns.saturating_sub(s) >= self.config.arm_after_ns)
    }

    pub fn captures_left(&self) -> bool {
        self.fired < self.config.max_captures
    }

    /// Feeds the current window's percentiles; returns a firing when a capture should start.
    pub fn observe(&mut self, now_ns: u64, current: &Percentiles) -> Option<Fire> {
        let started = *self.started_ns.get_or_insert(now_ns);
        if let Threshold::Factor { learn_ns, .. } = self.config.threshold {
            if self.baseline_p99_ns.is_none() {
                if current.count >= self.config.min_requests {
                    self.learning.push(current.p99_ns);
                }
                if now_ns.saturating_sub(started) < learn_ns || self.learning.is_empty() {
                    return None;
                }
                self.learning.sort_unstable();
                self.baseline_p99_ns = Some(self.learning[self.learning.len() / 2].max(1));
            }
        }
        let threshold = self.threshold_ns()?;
        if now_ns.saturating_sub(started) < self.config.arm_after_ns {
            return None;
        }
        if current.count < self.config.min_requests || current.p99_ns <= threshold {
            return None;
        }
        if !self.captures_left() {
            return None;
        }
        if self
            .last_fire_ns
            .is_some_and(|last| now_ns.saturating_sub(last) < self.config.cooldown_ns)
        {
            return None;
        }
        self.last_fire_ns = Some(now_ns);
        self.fired += 1;
        Some(Fire {
            at_ns: now_ns,
            observed_p99_ns: current.p99_ns,
            threshold_ns: threshold,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn p99(value: u64, count: u64) -> Percentiles {
        Percentiles {
            count,
            p99_ns: value,
            ..Default::default()
        }
    }

    fn config(threshold: Threshold) -> TriggerConfig {
        TriggerConfig {
            threshold,
            min_requests: 20,
            cooldown_ns: 5_000 * MS,
            max_captures: 2,
            arm_after_ns: 100 * MS,
        }
    }

    #[test]
    fn absolute_threshold_with_cooldown_and_cap() {
        let mut trigger = Trigger::new(config(Threshold::Absolute { p99_ns: 50 * MS }));
        assert_eq!(trigger.observe(0, &p99(10 * MS, 100)), None);
        assert_eq!(
            trigger.observe(50 * MS, &p99(80 * MS, 100)),
            None,
            "not armed yet"
        );
        assert_eq!(
            trigger.observe(100 * MS, &p99(80 * MS, 5)),
            None,
            "too few requests"
        );
        let fire = trigger.observe(200 * MS, &p99(80 * MS, 100)).unwrap();
        assert_eq!(fire.observed_p99_ns, 80 * MS);
        assert_eq!(fire.threshold_ns, 50 * MS);
        assert_eq!(
            trigger.observe(300 * MS, &p99(80 * MS, 100)),
            None,
            "cooldown"
        );
        assert!(trigger.observe(5_300 * MS, &p99(80 * MS, 100)).is_some());
        assert_eq!(
            trigger.observe(20_000 * MS, &p99(80 * MS, 100)),
            None,
            "max captures"
        );
    }

    #[test]
    fn factor_threshold_learns_a_baseline_first() {
        let mut trigger = Trigger::new(config(Threshold::Factor {
            factor: 3.0,
            learn_ns: 1_000 * MS,
        }));
        for i in 0..10 {
            // A spike during learning must not fire, and the median ignores it.
            let value = if i == 5 { 100 * MS } else { 2 * MS };
            assert_eq!(trigger.observe(i * 100 * MS, &p99(value, 100)), None);
        }
        assert_eq!(trigger.observe(1_000 * MS, &p99(2 * MS, 100)), None);
        assert_eq!(trigger.baseline_p99_ns(), Some(2 * MS));
        assert_eq!(trigger.threshold_ns(), Some(6 * MS));
        assert_eq!(trigger.observe(1_100 * MS, &p99(5 * MS, 100)), None);
        assert!(trigger.observe(1_200 * MS, &p99(7 * MS, 100)).is_some());
    }
}
