//! Request latency: the kernel's per-request measurements (or an external feed), P99 over a
//! sliding window, and the worst window of a recording.

use std::collections::VecDeque;

use hdrhistogram::Histogram;
use probe_common::EventKind;
use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::histogram::{new_histogram, Percentiles};
use crate::recording::Recording;
use crate::window::Window;

/// Which request latency drives the trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LatencyKind {
    /// Request bytes arrived on the socket → response written by the server.
    Server,
    /// Request bytes arrived → response acknowledged by the peer (includes retransmissions).
    Delivery,
    /// Latencies fed from outside (`--latency-feed`).
    External,
}

impl LatencyKind {
    /// The kind of the events that carry this latency.
    pub fn event_kind(self) -> EventKind {
        match self {
            LatencyKind::Server => EventKind::RequestServed,
            LatencyKind::Delivery => EventKind::RequestDelivered,
            LatencyKind::External => EventKind::ExternalLatency,
        }
    }
}

/// `(end timestamp, latency)` of a request event of `kind`.
pub fn request_latency(event: &Event, kind: LatencyKind) -> Option<(u64, u64)> {
    match (kind, event) {
        (
            LatencyKind::Server,
            Event::RequestServed {
                ts_ns, latency_ns, ..
            },
        )
        | (LatencyKind::Delivery, Event::RequestDelivered { ts_ns, latency_ns })
        | (LatencyKind::External, Event::ExternalLatency { ts_ns, latency_ns }) => {
            Some((*ts_ns, *latency_ns))
        }
        _ => None,
    }
}

/// Percentiles over the last `window_ns`, kept as per-slice histograms so old slices fall off
/// in O(1) and memory stays bounded however many requests arrive.
///
/// Read ten times a second while attached, so a read must not merge the slices: the sum of
/// every slice but the newest is kept as slices close and a slice is subtracted when it falls
/// off; a read adds the newest slice for the moment it takes. (Merging them on each read cost
/// the agent bursts of ~0.7 ms, which delayed a load generator on the same CPU.) A request
/// is recorded once, into its slice: recording it into the sum as well was a tenth of the
/// agent's CPU under load. Fallen-off histograms are reused.
///
/// The histograms keep two significant digits, not the three of the reports: the trigger only
/// compares P99 with a threshold, and at three digits each histogram is 28,672 counters (224 KB),
/// so a request's two records missed the cache and each read scanned them all: a third of the
/// agent's CPU under load. At two digits it is 3,968 counters (31 KB).
pub struct SlidingLatency {
    slice_ns: u64,
    /// By start time; the last is the newest, the only one whose requests are not in `closed`.
    slices: VecDeque<(u64, Histogram<u64>)>,
    closed: Histogram<u64>,
    spare: Vec<Histogram<u64>>,
    window_ns: u64,
}

const SLICES_PER_WINDOW: u64 = 10;

/// 1 ns to 100 s within 1%.
fn new_trigger_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 2).expect("valid bounds")
}

impl SlidingLatency {
    pub fn new(window_ns: u64) -> Self {
        SlidingLatency {
            slice_ns: (window_ns / SLICES_PER_WINDOW).max(1),
            slices: VecDeque::new(),
            closed: new_trigger_histogram(),
            spare: Vec::new(),
            window_ns,
        }
    }

    pub fn record(&mut self, ts_ns: u64, latency_ns: u64) {
        let latency_ns = latency_ns.max(1);
        let slice_start = ts_ns - ts_ns % self.slice_ns;
        let newest_start = self.slices.back().map(|(start, _)| *start);
        if newest_start == Some(slice_start) {
            let (_, newest) = self.slices.back_mut().expect("checked");
            newest.saturating_record(latency_ns);
            return;
        }
        // From here on the request's slice is a closed one, or a new newest one.
        if newest_start.is_none_or(|newest| slice_start > newest) {
            if let Some((_, closing)) = self.slices.back() {
                // Same bounds, so adding cannot fail.
                let _ = self.closed.add(closing);
            }
            let histogram = self.new_slice_with(latency_ns);
            self.slices.push_back((slice_start, histogram));
            return;
        }
        // A request that ended in an earlier slice, drained late.
        self.closed.saturating_record(latency_ns);
        match self
            .slices
            .binary_search_by_key(&slice_start, |(start, _)| *start)
        {
            Ok(found) => self.slices[found].1.saturating_record(latency_ns),
            Err(insert_at) => {
                let histogram = self.new_slice_with(latency_ns);
                self.slices.insert(insert_at, (slice_start, histogram));
            }
        }
    }

    /// A slice's histogram (a fallen-off one reused when there is one) holding `latency_ns`.
    fn new_slice_with(&mut self, latency_ns: u64) -> Histogram<u64> {
        let mut histogram = self.spare.pop().unwrap_or_else(new_trigger_histogram);
        histogram.saturating_record(latency_ns);
        histogram
    }

    /// Percentiles of the requests recorded so far that ended after `now - window`. Time only
    /// moves forward: requests recorded with a later end than `now` count too.
    pub fn percentiles(&mut self, now_ns: u64) -> Percentiles {
        let oldest = now_ns.saturating_sub(self.window_ns);
        while self
            .slices
            .front()
            .is_some_and(|(start, _)| start + self.slice_ns <= oldest)
        {
            let (_, mut histogram) = self.slices.pop_front().expect("checked");
            if !self.slices.is_empty() {
                // A closed slice: its counts were added to the sum, so this cannot underflow.
                let _ = self.closed.subtract(&histogram);
            }
            histogram.reset();
            self.spare.push(histogram);
        }
        let Some((_, newest)) = self.slices.back() else {
            return Percentiles::of(&self.closed);
        };
        let _ = self.closed.add(newest);
        let percentiles = Percentiles::of(&self.closed);
        let _ = self.closed.subtract(newest);
        percentiles
    }
}

/// The `window_ns`-long window (stepped by a tenth of it) with the highest P99 among those with
/// at least `min_requests` requests: where a recording's spike is, found after the fact.
pub fn worst_window(
    recording: &Recording,
    kind: LatencyKind,
    window_ns: u64,
    min_requests: u64,
) -> Option<(Window, Percentiles)> {
    let latencies: Vec<(u64, u64)> = recording
        .events()
        .filter_map(|e| request_latency(&e, kind))
        .collect();
    let step = (window_ns / 10).max(1);
    let (start, end) = (recording.meta.start_ns, recording.meta.end_ns);
    let mut best: Option<(Window, Percentiles)> = None;
    let mut from = start;
    let mut first = 0;
    while from + window_ns <= end.max(start + window_ns) {
        let window = Window::new(from, from + window_ns);
        while first < latencies.len() && latencies[first].0 < from {
            first += 1;
        }
        let mut histogram = new_histogram();
        for &(ts, latency) in latencies[first..]
            .iter()
            .take_while(|(ts, _)| *ts < window.end_ns)
        {
            let _ = ts;
            histogram.saturating_record(latency.max(1));
        }
        let p = Percentiles::of(&histogram);
        if p.count >= min_requests && best.as_ref().is_none_or(|(_, b)| p.p99_ns > b.p99_ns) {
            best = Some((window, p));
        }
        if from + window_ns >= end {
            break;
        }
        from += step;
    }
    best
}

/// Parses one line of an external latency feed: `12.5ms`, `800us`, `3s`, or a bare number of
/// milliseconds.
pub fn parse_feed_line(line: &str) -> Option<u64> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    if let Ok(ms) = line.parse::<f64>() {
        return (ms.is_finite() && ms >= 0.0).then_some((ms * 1e6) as u64);
    }
    let split = line.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = line.split_at(split);
    let value: f64 = number.trim().parse().ok()?;
    let scale = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => return None,
    };
    (value.is_finite() && value >= 0.0).then_some((value * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_forgets_old_requests() {
        let mut sliding = SlidingLatency::new(1_000_000_000);
        for i in 0..100u64 {
            sliding.record(i * 10_000_000, 1_000_000); // 1 ms for the first second
        }
        let p = sliding.percentiles(1_000_000_000);
        assert_eq!(p.count, 100);
        assert!(p.p99_ns < 1_100_000);
        sliding.record(1_500_000_000, 50_000_000);
        // At 2.4 s only the slow request (and nothing from the first second) is left.
        let p = sliding.percentiles(2_400_000_000);
        assert_eq!(p.count, 1);
        assert!(p.p99_ns >= 49_000_000);
        assert_eq!(sliding.percentiles(10_000_000_000).count, 0);
        // Slices reused after falling off start empty.
        sliding.record(10_050_000_000, 2_000_000);
        let p = sliding.percentiles(10_100_000_000);
        assert_eq!(p.count, 1);
        assert!(p.p99_ns >= 1_990_000 && p.p99_ns < 2_010_000);
    }

    #[test]
    fn late_requests_count_in_their_own_slice() {
        let mut sliding = SlidingLatency::new(1_000_000_000);
        sliding.record(950_000_000, 1_000_000);
        sliding.record(550_000_000, 2_000_000); // an older slice, new to the window
        sliding.record(960_000_000, 3_000_000);
        sliding.record(560_000_000, 4_000_000); // that older slice again
        sliding.record(1_010_000_000, 5_000_000); // a new newest slice closes the 0.9 s one
        assert_eq!(sliding.percentiles(1_050_000_000).count, 5);
        // The 0.5 s slice falls off with both its requests, and only with them.
        let p = sliding.percentiles(1_650_000_000);
        assert_eq!(p.count, 3);
        assert!(p.p99_ns >= 4_900_000 && p.p99_ns < 5_100_000);
        // Then the closed 0.9 s slice; then the newest, which was never in the sum.
        assert_eq!(sliding.percentiles(2_050_000_000).count, 1);
        assert_eq!(sliding.percentiles(2_150_000_000).count, 0);
        sliding.record(2_200_000_000, 6_000_000);
        assert_eq!(sliding.percentiles(2_250_000_000).count, 1);
    }

    #[test]
    fn each_latency_kind_is_carried_by_its_event_kind() {
        let kinds = [
            LatencyKind::Server,
            LatencyKind::Delivery,
            LatencyKind::External,
        ];
        for event_kind in [
            EventKind::RequestServed,
            EventKind::RequestDelivered,
            EventKind::ExternalLatency,
            EventKind::RunQueue,
        ] {
            let mut raw = probe_common::RawEvent::zeroed();
            raw.kind = event_kind as u32;
            raw.ts_ns = 5_000;
            raw.duration_ns = 1_200;
            let event = Event::from_raw(&raw).expect("known kind");
            for kind in kinds {
                assert_eq!(
                    request_latency(&event, kind),
                    (kind.event_kind() == event_kind).then_some((5_000, 1_200)),
                    "{event_kind:?} as {kind:?}"
                );
            }
        }
    }

    #[test]
    fn feed_lines() {
        assert_eq!(parse_feed_line("12.5ms"), Some(12_500_000));
        assert_eq!(parse_feed_line("800us"), Some(800_000));
        assert_eq!(parse_feed_line("3"), Some(3_000_000));
        assert_eq!(parse_feed_line(" 2 s "), Some(2_000_000_000));
        assert_eq!(parse_feed_line("fast"), None);
        assert_eq!(parse_feed_line("-1"), None);
        assert_eq!(parse_feed_line(""), None);
    }
}
