//! The flight recorder: the last few seconds of events in bounded memory, so a capture holds
//! what happened before the threshold was crossed.

use std::collections::VecDeque;

use probe_common::RawEvent;

pub struct FlightRecorder {
    keep_ns: u64,
    max_events: usize,
    events: VecDeque<RawEvent>,
    /// Events pushed out early because `max_events` was reached (the window was busier than
    /// memory allows).
    pub evicted_for_memory: u64,
}

impl FlightRecorder {
    pub fn new(keep_ns: u64, max_events: usize) -> Self {
        FlightRecorder {
            keep_ns,
            max_events,
            events: VecDeque::new(),
            evicted_for_memory: 0,
        }
    }

    pub fn push(&mut self, event: RawEvent) {
        if self.events.len() >= self.max_events {
            self.events.pop_front();
            self.evicted_for_memory += 1;
        }
        self.events.push_back(event);
    }

    /// Drops events older than the retention, relative to `now_ns`. `hold_from_ns` keeps
    /// everything from that time on (a capture in progress).
    pub fn evict(&mut self, now_ns: u64, hold_from_ns: Option<u64>) {
        let mut oldest = now_ns.saturating_sub(self.keep_ns);
        if let Some(hold) = hold_from_ns {
            oldest = oldest.min(hold);
        }
        while self.events.front().is_some_and(|e| e.ts_ns < oldest) {
            self.events.pop_front();
        }
    }

    /// Events in `[from_ns, to_ns)`, in time order.
    pub fn snapshot(&self, from_ns: u64, to_ns: u64) -> Vec<RawEvent> {
        let mut events: Vec<RawEvent> = self
            .events
            .iter()
            .filter(|e| (from_ns..to_ns).contains(&e.ts_ns))
            .copied()
            .collect();
        events.sort_by_key(|e| e.ts_ns);
        events
    }

    pub fn iter(&self) -> impl Iterator<Item = &RawEvent> {
        self.events.iter()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts_ns: u64) -> RawEvent {
        let mut e = RawEvent::zeroed();
        e.ts_ns = ts_ns;
        e
    }

    #[test]
    fn keeps_the_last_seconds_and_holds_for_a_capture() {
        let mut flight = FlightRecorder::new(1_000, 100);
        for ts in (0..3_000).step_by(100) {
            flight.push(at(ts));
        }
        flight.evict(3_000, Some(1_500));
        assert_eq!(flight.snapshot(0, u64::MAX).first().unwrap().ts_ns, 1_500);
        flight.evict(3_000, None);
        assert_eq!(flight.snapshot(0, u64::MAX).first().unwrap().ts_ns, 2_000);
        assert_eq!(flight.snapshot(2_200, 2_500).len(), 3);
    }

    #[test]
    fn memory_bound_evicts_oldest_and_counts() {
        let mut flight = FlightRecorder::new(u64::MAX, 3);
        for ts in 0..5 {
            flight.push(at(ts));
        }
        assert_eq!(flight.len(), 3);
        assert_eq!(flight.evicted_for_memory, 2);
        assert_eq!(flight.snapshot(0, 10)[0].ts_ns, 2);
    }
}
