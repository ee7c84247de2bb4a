//! The flight recorder: the last few seconds of events in bounded memory, so a capture holds
//! what happened before the threshold was crossed. Request latencies and run-queue waits are
//! the exception: the kernel keeps their last seconds (`timing_rings`), and the recorder holds
//! them only from a capture's start to its end.

use std::collections::{hash_map::Entry, HashMap, VecDeque};

use probe_common::{EventKind, RawEvent};

use crate::events::{stacks_named, Timing};

pub struct FlightRecorder {
    keep_ns: u64,
    max_events: usize,
    /// Events with stacks, addresses or flags: everything a [`Timing`] cannot hold.
    events: VecDeque<RawEvent>,
    /// Held apart in 32 bytes each: at 96, the recorder's growth in its first seconds (page
    /// faults, and the copies of a doubling deque) was half the agent's CPU under a 120k
    /// requests/s load, and 14 s of them 262 MB.
    timings: VecDeque<Timing>,
    /// Events pushed out early because `max_events` was reached (the window was busier than
    /// memory allows).
    pub evicted_for_memory: u64,
    /// How many held events name each stack id. The agent forgets stacks no event needs any
    /// more; counting here spares it a periodic walk of every held event, which for a full
    /// recorder (~100 MB) was a burst of CPU long enough to delay a traced server's requests.
    stack_references: HashMap<u32, u32>,
}

impl FlightRecorder {
    pub fn new(keep_ns: u64, max_events: usize) -> Self {
        FlightRecorder {
            keep_ns,
            max_events,
            events: VecDeque::new(),
            timings: VecDeque::new(),
            evicted_for_memory: 0,
            stack_references: HashMap::new(),
        }
    }

    pub fn push(&mut self, event: RawEvent) {
        if let Some(timing) = Timing::of(&event) {
            self.push_timing(timing);
            return;
        }
        self.make_room();
        for id in stacks_named(&event) {
            *self.stack_references.entry(id).or_default() += 1;
        }
        self.events.push_back(event);
    }

    pub fn push_timing(&mut self, timing: Timing) {
        self.make_room();
        self.timings.push_back(timing);
    }

    /// Holds `timings`, the kernel's copy of the request latencies and run-queue waits since
    /// a capture's start (read back from its rings), in place of any held before; keeps the
    /// external latencies, which only the agent has. The agent holds timings only while a
    /// capture is waiting for its post-window: the kernel keeps them otherwise.
    pub fn hold_timings(&mut self, mut timings: Vec<Timing>) {
        let external = EventKind::ExternalLatency as u32;
        timings.extend(self.timings.iter().filter(|t| t.kind == external));
        timings.sort_unstable_by_key(|t| t.ts_ns);
        self.timings = timings.into();
        while self.len() > self.max_events {
            self.pop_oldest();
            self.evicted_for_memory += 1;
        }
    }

    fn make_room(&mut self) {
        if self.len() >= self.max_events {
            self.pop_oldest();
            self.evicted_for_memory += 1;
        }
    }

    fn oldest_ts_ns(&self) -> Option<u64> {
        let full = self.events.front().map(|e| e.ts_ns);
        let timing = self.timings.front().map(|e| e.ts_ns);
        full.into_iter().chain(timing).min()
    }

    fn pop_oldest(&mut self) {
        let timing_is_older = match (self.events.front(), self.timings.front()) {
            (Some(full), Some(timing)) => timing.ts_ns < full.ts_ns,
            (None, Some(_)) => true,
            _ => false,
        };
        if timing_is_older {
            self.timings.pop_front();
            return;
        }
        let Some(event) = self.events.pop_front() else {
            return;
        };
        for id in stacks_named(&event) {
            if let Entry::Occupied(mut references) = self.stack_references.entry(id) {
                *references.get_mut() -= 1;
                if *references.get() == 0 {
                    references.remove();
                }
            }
        }
    }

    /// Drops events older than the retention, relative to `now_ns`. `hold_from_ns` keeps
    /// everything from that time on (a capture in progress).
    pub fn evict(&mut self, now_ns: u64, hold_from_ns: Option<u64>) {
        let mut oldest = now_ns.saturating_sub(self.keep_ns);
        if let Some(hold) = hold_from_ns {
            oldest = oldest.min(hold);
        }
        while self.oldest_ts_ns().is_some_and(|ts| ts < oldest) {
            self.pop_oldest();
        }
    }

    /// Events in `[from_ns, to_ns)`, in time order.
    pub fn snapshot(&self, from_ns: u64, to_ns: u64) -> Vec<RawEvent> {
        let wanted = from_ns..to_ns;
        let mut events: Vec<RawEvent> = self
            .events
            .iter()
            .filter(|e| wanted.contains(&e.ts_ns))
            .copied()
            .chain(
                self.timings
                    .iter()
                    .filter(|e| wanted.contains(&e.ts_ns))
                    .map(Timing::to_raw),
            )
            .collect();
        events.sort_by_key(|e| e.ts_ns);
        events
    }

    /// The stack ids that held events name.
    pub fn stacks_named(&self) -> impl Iterator<Item = u32> + '_ {
        self.stack_references.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.events.len() + self.timings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::NO_STACK;

    fn named_stacks(flight: &FlightRecorder) -> Vec<u32> {
        let mut ids: Vec<u32> = flight.stacks_named().collect();
        ids.sort();
        ids
    }

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
    fn the_stacks_named_are_those_of_the_events_still_held() {
        let with_stacks = |ts_ns: u64, kernel: i32, user: i32| {
            let mut e = at(ts_ns);
            e.kernel_stack_id = kernel;
            e.user_stack_id = user;
            e
        };
        let mut flight = FlightRecorder::new(1_000, 4);
        flight.push(with_stacks(0, 1, 2));
        flight.push(with_stacks(100, 1, NO_STACK));
        flight.push(at(200));
        flight.push(with_stacks(300, NO_STACK, 3));
        assert_eq!(named_stacks(&flight), [1, 2, 3]);
        // Full: the oldest goes, and with it the only event naming 2; 1 is still named.
        flight.push(with_stacks(400, 4, NO_STACK));
        assert_eq!(named_stacks(&flight), [1, 3, 4]);
        // Out of the retention: the second event naming 1 goes too.
        flight.evict(1_150, None);
        assert_eq!(named_stacks(&flight), [3, 4]);
        flight.evict(10_000, None);
        assert!(flight.is_empty());
        assert_eq!(named_stacks(&flight), [] as [u32; 0]);
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

    #[test]
    fn timings_and_full_events_come_back_whole_and_in_time_order() {
        let mut request = at(100);
        request.kind = EventKind::RequestServed as u32;
        request.duration_ns = 42_000;
        request.tid = 7;
        request.tgid = 7;
        request.cpu = 1;
        let mut off_cpu = at(50);
        off_cpu.kind = EventKind::OffCpu as u32;
        off_cpu.user_stack_id = 3;
        off_cpu.wait_ns = 5;
        let mut retransmit = at(150);
        retransmit.kind = EventKind::TcpRetransmit as u32;
        retransmit.local_port = 8080;
        retransmit.local_addr[0] = 127;
        assert!(Timing::of(&request).is_some());
        assert!(Timing::of(&off_cpu).is_none());
        assert!(Timing::of(&retransmit).is_none());

        let mut flight = FlightRecorder::new(1_000, 3);
        flight.push(request);
        flight.push(off_cpu);
        flight.push(retransmit);
        assert_eq!(flight.snapshot(0, 1_000), [off_cpu, request, retransmit]);
        // The memory bound and the retention take the oldest, whichever form it is held in.
        flight.push(at(200));
        assert_eq!(flight.evicted_for_memory, 1);
        assert_eq!(flight.snapshot(0, 1_000), [request, retransmit, at(200)]);
        flight.evict(1_120, None);
        assert_eq!(flight.snapshot(0, 1_000), [retransmit, at(200)]);
        assert_eq!(named_stacks(&flight), [] as [u32; 0]);
    }

    #[test]
    fn held_timings_replace_the_kernel_kinds_and_keep_external_latencies() {
        let timing = |ts_ns, kind: EventKind| Timing {
            ts_ns,
            duration_ns: 1,
            tid: 1,
            tgid: 1,
            cpu: 0,
            kind: kind as u32,
        };
        let mut flight = FlightRecorder::new(u64::MAX, 4);
        flight.push_timing(timing(10, EventKind::RequestServed));
        flight.push_timing(timing(20, EventKind::ExternalLatency));
        let mut off_cpu = at(30);
        off_cpu.kind = EventKind::OffCpu as u32;
        off_cpu.kernel_stack_id = 9;
        flight.push(off_cpu);
        flight.hold_timings(vec![
            timing(40, EventKind::RunQueue),
            timing(5, EventKind::RequestServed),
        ]);
        let held: Vec<(u64, u32)> = flight
            .snapshot(0, 100)
            .iter()
            .map(|e| (e.ts_ns, e.kind))
            .collect();
        assert_eq!(
            held,
            [
                (5, EventKind::RequestServed as u32),
                (20, EventKind::ExternalLatency as u32),
                (30, EventKind::OffCpu as u32),
                (40, EventKind::RunQueue as u32)
            ]
        );
        // Beyond the memory bound the oldest go.
        flight.hold_timings(vec![
            timing(1, EventKind::RunQueue),
            timing(2, EventKind::RunQueue),
            timing(3, EventKind::RunQueue),
        ]);
        assert_eq!(flight.len(), 4);
        assert_eq!(flight.evicted_for_memory, 1);
        assert_eq!(flight.snapshot(0, 100)[0].ts_ns, 2);
    }
}
