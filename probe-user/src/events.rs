//! Kernel records decoded into typed events.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use probe_common::{EventKind, RawEvent, FLAG_PREEMPTED, NO_STACK};
use serde::Serialize;

/// Stack-map id as written by the kernel; `None` when no stack was captured.
pub type StackId = Option<u32>;

/// A raw event's (or thread state's) stack id field as a [`StackId`].
pub(crate) fn stack_id(id: i32) -> StackId {
    (id != NO_STACK && id >= 0).then_some(id as u32)
}

/// The stack ids a raw event names, kernel then user.
pub(crate) fn stacks_named(event: &RawEvent) -> impl Iterator<Item = u32> {
    [event.kernel_stack_id, event.user_stack_id]
        .into_iter()
        .filter_map(stack_id)
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    RunQueue {
        ts_ns: u64,
        tid: u32,
        cpu: u32,
        delay_ns: u64,
    },
    OffCpu {
        ts_ns: u64,
        tid: u32,
        cpu: u32,
        duration_ns: u64,
        /// Part of `duration_ns` spent runnable, waiting for a CPU after the wakeup.
        wait_ns: u64,
        /// `prev_state` when the thread left the CPU (1 = interruptible sleep, 2 = uninterruptible).
        state: u32,
        /// It was preempted while runnable: this interval is run-queue wait, not blocking.
        preempted: bool,
        /// 0, or the stack-sampling threshold (ms) this interval was sampled under: it then
        /// stands for `threshold / duration_ns` intervals like it (`offcpu_sampling`).
        sampled_below_ms: u16,
        kernel_stack: StackId,
        user_stack: StackId,
    },
    OnCpuSample {
        ts_ns: u64,
        tid: u32,
        cpu: u32,
        /// The CPU time the sample stands for (`sampling::sample_weight`); 0 when not recorded.
        period_ns: u64,
        kernel_stack: StackId,
        user_stack: StackId,
    },
    TcpRetransmit {
        ts_ns: u64,
        cpu: u32,
        local: SocketAddr,
        remote: SocketAddr,
        /// TCP state number (1 = ESTABLISHED, ...).
        tcp_state: u32,
    },
    /// A request answered: `latency_ns` from the arrival of its bytes to the response write.
    RequestServed {
        ts_ns: u64,
        tid: u32,
        latency_ns: u64,
    },
    /// A response acknowledged by the peer: `latency_ns` from the request's arrival.
    RequestDelivered { ts_ns: u64, latency_ns: u64 },
    /// A latency fed from outside (a load generator or script).
    ExternalLatency { ts_ns: u64, latency_ns: u64 },
    /// A Go runtime function was entered: `which` is one of `probe_common::GO_*`.
    GoRuntime { ts_ns: u64, tid: u32, which: u32 },
}

impl Event {
    pub fn ts_ns(&self) -> u64 {
        match *self {
            Event::RunQueue { ts_ns, .. }
            | Event::OffCpu { ts_ns, .. }
            | Event::OnCpuSample { ts_ns, .. }
            | Event::TcpRetransmit { ts_ns, .. }
            | Event::RequestServed { ts_ns, .. }
            | Event::RequestDelivered { ts_ns, .. }
            | Event::ExternalLatency { ts_ns, .. }
            | Event::GoRuntime { ts_ns, .. } => ts_ns,
        }
    }

    /// For an off-CPU interval, `(end, length)` of the time the thread was blocked: switch-out to
    /// wakeup, without the run-queue wait that followed. A preempted interval is all run-queue
    /// wait, so it counts whole when `include_preempted`, and not at all otherwise.
    pub fn blocked_interval(&self, include_preempted: bool) -> Option<(u64, u64)> {
        match *self {
            Event::OffCpu {
                ts_ns,
                duration_ns,
                preempted: true,
                ..
            } => include_preempted.then_some((ts_ns, duration_ns)),
            Event::OffCpu {
                ts_ns,
                duration_ns,
                wait_ns,
                ..
            } => Some((ts_ns - wait_ns, duration_ns - wait_ns)),
            _ => None,
        }
    }

    /// For an off-CPU interval sampled under a stack-sampling threshold (`offcpu_sampling`):
    /// (threshold, duration), both in ns and the threshold at least the duration (an interval
    /// as long as the threshold was reported for its length, so it stands for itself alone).
    fn sampled_interval(&self) -> Option<(u64, u64)> {
        match *self {
            Event::OffCpu {
                duration_ns,
                sampled_below_ms,
                ..
            } if sampled_below_ms > 0 && duration_ns > 0 => Some((
                (sampled_below_ms as u64 * 1_000_000).max(duration_ns),
                duration_ns,
            )),
            _ => None,
        }
    }

    /// `ns` of this off-CPU interval's time, counted for every interval it stands for: an
    /// interval sampled under a threshold `D` stands for `D / duration` of them
    /// (`offcpu_sampling`). Off-CPU figures add these up, not bare overlaps.
    pub fn weigh_off_cpu(&self, ns: u64) -> u64 {
        match self.sampled_interval() {
            Some((threshold_ns, duration_ns)) => {
                (ns as u128 * threshold_ns as u128 / duration_ns as u128) as u64
            }
            None => ns,
        }
    }

    /// The variance (ns²) that `weigh_off_cpu(ns)` adds to an estimate of time blocked: 0 for
    /// an interval reported because of its length, and for one sampled with probability
    /// `p = duration / threshold` the Horvitz–Thompson term `ns² (1 - p) / p²`. Summed over a
    /// stack's intervals, its square root is the standard error of the stack's blocked time.
    pub fn off_cpu_estimate_variance(&self, ns: u64) -> f64 {
        match self.sampled_interval() {
            Some((threshold_ns, duration_ns)) => {
                let stands_for = threshold_ns as f64 / duration_ns as f64;
                (ns as f64).powi(2) * stands_for * (stands_for - 1.0)
            }
            None => 0.0,
        }
    }

    pub fn from_raw(raw: &RawEvent) -> Option<Event> {
        let kernel_stack = stack_id(raw.kernel_stack_id);
        let user_stack = stack_id(raw.user_stack_id);
        Some(match EventKind::from_u32(raw.kind)? {
            EventKind::RunQueue => Event::RunQueue {
                ts_ns: raw.ts_ns,
                tid: raw.tid,
                cpu: raw.cpu,
                delay_ns: raw.duration_ns,
            },
            EventKind::OffCpu => Event::OffCpu {
                ts_ns: raw.ts_ns,
                tid: raw.tid,
                cpu: raw.cpu,
                duration_ns: raw.duration_ns,
                wait_ns: raw.wait_ns.min(raw.duration_ns),
                state: raw.state,
                preempted: raw.flags & FLAG_PREEMPTED != 0,
                sampled_below_ms: raw.offcpu_sampled_below_ms,
                kernel_stack,
                user_stack,
            },
            EventKind::OnCpuSample => Event::OnCpuSample {
                ts_ns: raw.ts_ns,
                tid: raw.tid,
                cpu: raw.cpu,
                period_ns: raw.duration_ns,
                kernel_stack,
                user_stack,
            },
            EventKind::TcpRetransmit => Event::TcpRetransmit {
                ts_ns: raw.ts_ns,
                cpu: raw.cpu,
                local: socket_addr(raw.family, &raw.local_addr, raw.local_port),
                remote: socket_addr(raw.family, &raw.remote_addr, raw.remote_port),
                tcp_state: raw.state,
            },
            EventKind::RequestServed => Event::RequestServed {
                ts_ns: raw.ts_ns,
                tid: raw.tid,
                latency_ns: raw.duration_ns,
            },
            EventKind::RequestDelivered => Event::RequestDelivered {
                ts_ns: raw.ts_ns,
                latency_ns: raw.duration_ns,
            },
            EventKind::ExternalLatency => Event::ExternalLatency {
                ts_ns: raw.ts_ns,
                latency_ns: raw.duration_ns,
            },
            EventKind::GoRuntime => Event::GoRuntime {
                ts_ns: raw.ts_ns,
                tid: raw.tid,
                which: raw.state,
            },
            EventKind::Synthetic | EventKind::LatencyRising => return None,
        })
    }
}

/// The record the agent stores for an externally reported latency.
pub fn external_latency(ts_ns: u64, latency_ns: u64) -> RawEvent {
    let mut raw = RawEvent::zeroed();
    raw.kind = EventKind::ExternalLatency as u32;
    raw.ts_ns = ts_ns;
    raw.duration_ns = latency_ns;
    raw
}

fn socket_addr(family: u16, addr: &[u8; 16], port: u16) -> SocketAddr {
    let ip = if family == libc::AF_INET6 as u16 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    };
    SocketAddr::new(ip, port)
}

/// Little-endian wire form of [`RawEvent`], the same as the kernel writes on x86_64 and the
/// recording stores. Explicit so recordings do not depend on the reader's struct layout.
pub fn encode_raw(raw: &RawEvent, out: &mut Vec<u8>) {
    out.extend_from_slice(&raw.kind.to_le_bytes());
    out.extend_from_slice(&raw.cpu.to_le_bytes());
    out.extend_from_slice(&raw.ts_ns.to_le_bytes());
    out.extend_from_slice(&raw.duration_ns.to_le_bytes());
    out.extend_from_slice(&raw.wait_ns.to_le_bytes());
    out.extend_from_slice(&raw.tid.to_le_bytes());
    out.extend_from_slice(&raw.tgid.to_le_bytes());
    out.extend_from_slice(&raw.kernel_stack_id.to_le_bytes());
    out.extend_from_slice(&raw.user_stack_id.to_le_bytes());
    out.extend_from_slice(&raw.state.to_le_bytes());
    out.extend_from_slice(&raw.flags.to_le_bytes());
    out.extend_from_slice(&raw.family.to_le_bytes());
    out.extend_from_slice(&raw.local_port.to_le_bytes());
    out.extend_from_slice(&raw.remote_port.to_le_bytes());
    out.extend_from_slice(&raw.offcpu_sampled_below_ms.to_le_bytes());
    out.extend_from_slice(&raw.local_addr);
    out.extend_from_slice(&raw.remote_addr);
}

/// `events` as the recording format's bytes, [`encode_raw`] after one another. On a
/// little-endian machine that is their memory (`#[repr(C)]` without padding, as `aya::Pod`
/// promises), so a drain of a million events is one copy rather than 17 million.
pub fn raw_event_bytes(events: &[RawEvent]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: RawEvent is Pod (every byte initialized, no padding), and the slice's
        // memory is `size_of_val(events)` bytes borrowed for the result's lifetime.
        Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(events.as_ptr().cast::<u8>(), size_of_val(events))
        })
    } else {
        let mut out = Vec::with_capacity(size_of_val(events));
        events.iter().for_each(|raw| encode_raw(raw, &mut out));
        Cow::Owned(out)
    }
}

/// Inverse of [`encode_raw`]; `None` if `bytes` is shorter than one record.
pub fn decode_raw(bytes: &[u8]) -> Option<RawEvent> {
    let bytes = bytes.get(..RawEvent::SIZE)?;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap());
    Some(RawEvent {
        kind: u32_at(0),
        cpu: u32_at(4),
        ts_ns: u64_at(8),
        duration_ns: u64_at(16),
        wait_ns: u64_at(24),
        tid: u32_at(32),
        tgid: u32_at(36),
        kernel_stack_id: u32_at(40) as i32,
        user_stack_id: u32_at(44) as i32,
        state: u32_at(48),
        flags: u32_at(52),
        family: u16_at(56),
        local_port: u16_at(58),
        remote_port: u16_at(60),
        offcpu_sampled_below_ms: u16_at(62),
        local_addr: bytes[64..80].try_into().unwrap(),
        remote_addr: bytes[80..96].try_into().unwrap(),
    })
}

/// An event that is nothing but a time, a duration and whose it was: request latencies and
/// run-queue waits, nine in ten of the events under load, which the kernel keeps in its timing
/// rings (`timing_rings`). The agent keeps them in a third of a [`RawEvent`]'s 96 bytes: building,
/// passing and storing 96 bytes per request was most of its work under a 120k requests/s
/// load, and holding them most of its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub ts_ns: u64,
    pub duration_ns: u64,
    pub tid: u32,
    pub tgid: u32,
    pub cpu: u32,
    /// An [`EventKind`], as in [`RawEvent::kind`].
    pub kind: u32,
}

const _: () = assert!(std::mem::size_of::<Timing>() == 32);

impl Timing {
    /// The timing `raw` is, if that loses nothing.
    pub fn of(raw: &RawEvent) -> Option<Self> {
        let timing = Timing {
            ts_ns: raw.ts_ns,
            duration_ns: raw.duration_ns,
            tid: raw.tid,
            tgid: raw.tgid,
            cpu: raw.cpu,
            kind: raw.kind,
        };
        (timing.to_raw() == *raw).then_some(timing)
    }

    pub fn to_raw(&self) -> RawEvent {
        RawEvent {
            kind: self.kind,
            cpu: self.cpu,
            ts_ns: self.ts_ns,
            duration_ns: self.duration_ns,
            tid: self.tid,
            tgid: self.tgid,
            ..RawEvent::zeroed()
        }
    }
}

/// What drains brought: the timing rings' timings apart from every other event (the ring
/// buffer's).
#[derive(Debug, Default)]
pub struct Drained {
    pub events: Vec<RawEvent>,
    pub timings: Vec<Timing>,
    /// The kernel woke the agent because the trigger's latency rose
    /// (`EventKind::LatencyRising`, whose records are dropped here).
    pub latency_rising: bool,
}

impl Drained {
    pub fn len(&self) -> usize {
        self.events.len() + self.timings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.events.clear();
        self.timings.clear();
    }

    /// Every event as a [`RawEvent`], timings last (not in time order).
    pub fn raw_events(&self) -> impl Iterator<Item = RawEvent> + '_ {
        self.events
            .iter()
            .copied()
            .chain(self.timings.iter().map(Timing::to_raw))
    }
}

/// Adds the event of one ring-buffer record; a record of another shape is dropped, and one
/// that only woke the agent (`EventKind::LatencyRising`) is noted in `latency_rising`.
pub fn decode_ring_record(bytes: &[u8], out: &mut Drained) {
    match decode_raw(bytes) {
        Some(raw) if raw.kind == EventKind::LatencyRising as u32 => out.latency_rising = true,
        raw => out.events.extend(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_bytes_are_the_records_one_after_another() {
        let mut first = RawEvent::zeroed();
        first.kind = EventKind::TcpRetransmit as u32;
        first.ts_ns = 0x0102_0304_0506_0708;
        first.kernel_stack_id = NO_STACK;
        first.local_port = 8080;
        first.remote_addr = [7; 16];
        let mut second = first;
        second.tid = 4242;
        second.offcpu_sampled_below_ms = 9;
        let mut expected = Vec::new();
        encode_raw(&first, &mut expected);
        encode_raw(&second, &mut expected);
        assert_eq!(&*raw_event_bytes(&[first, second]), &expected[..]);
        assert_eq!(expected.len(), 2 * RawEvent::SIZE);
    }

    #[test]
    fn timings_become_the_events_they_stand_for() {
        let timing = |ts_ns, duration_ns, tid, kind: EventKind| Timing {
            ts_ns,
            duration_ns,
            tid,
            tgid: 4242,
            cpu: 1,
            kind: kind as u32,
        };
        let drained = Drained {
            events: Vec::new(),
            timings: vec![
                timing(1_000, 250, 4243, EventKind::RequestServed),
                timing(2_000, 6_000_000_000, 0, EventKind::RequestDelivered),
                timing(3_000, 40_000, 4244, EventKind::RunQueue),
            ],
            ..Drained::default()
        };
        let events: Vec<Event> = drained
            .raw_events()
            .filter_map(|e| Event::from_raw(&e))
            .collect();
        assert_eq!(
            events,
            vec![
                Event::RequestServed {
                    ts_ns: 1_000,
                    tid: 4243,
                    latency_ns: 250
                },
                Event::RequestDelivered {
                    ts_ns: 2_000,
                    latency_ns: 6_000_000_000
                },
                // The ring's CPU is the wait's: each CPU writes its own ring.
                Event::RunQueue {
                    ts_ns: 3_000,
                    cpu: 1,
                    tid: 4244,
                    delay_ns: 40_000
                },
            ]
        );
        assert!(drained
            .raw_events()
            .all(|raw| raw.cpu == 1 && raw.tgid == 4242));
        // Each timing is what its event would be compacted to.
        assert!(drained
            .timings
            .iter()
            .all(|t| Timing::of(&t.to_raw()) == Some(*t)));
    }

    #[test]
    fn a_plain_record_passes_through() {
        let raw = sample_raw();
        let mut bytes = Vec::new();
        encode_raw(&raw, &mut bytes);
        let mut out = Drained::default();
        decode_ring_record(&bytes, &mut out);
        assert_eq!(out.events, vec![raw]);
        assert!(out.timings.is_empty());
    }

    fn sample_raw() -> RawEvent {
        let mut raw = RawEvent::zeroed();
        raw.kind = EventKind::TcpRetransmit as u32;
        raw.cpu = 1;
        raw.ts_ns = 123_456_789;
        raw.family = libc::AF_INET as u16;
        raw.local_port = 8080;
        raw.remote_port = 40000;
        raw.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        raw.remote_addr[..4].copy_from_slice(&[127, 0, 0, 2]);
        raw.state = 1;
        raw.kernel_stack_id = 7;
        raw
    }

    #[test]
    fn wire_form_round_trips_and_matches_in_memory_layout() {
        let raw = sample_raw();
        let mut bytes = Vec::new();
        encode_raw(&raw, &mut bytes);
        assert_eq!(bytes.len(), RawEvent::SIZE);
        assert_eq!(decode_raw(&bytes), Some(raw));
        // The kernel hands us the in-memory layout: on little-endian hosts it must equal ours.
        let in_memory = unsafe {
            std::slice::from_raw_parts(&raw as *const RawEvent as *const u8, RawEvent::SIZE)
        };
        assert_eq!(in_memory, &bytes[..]);
        assert_eq!(decode_raw(&bytes[..10]), None);
    }

    #[test]
    fn retransmit_decodes_to_socket_addresses() {
        let event = Event::from_raw(&sample_raw()).unwrap();
        assert_eq!(
            event,
            Event::TcpRetransmit {
                ts_ns: 123_456_789,
                cpu: 1,
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: "127.0.0.2:40000".parse().unwrap(),
                tcp_state: 1,
            }
        );
    }

    #[test]
    fn blocked_part_of_off_cpu_intervals() {
        let off = |preempted| Event::OffCpu {
            ts_ns: 1_000,
            tid: 1,
            cpu: 0,
            duration_ns: 300,
            wait_ns: 100,
            state: 1,
            preempted,
            sampled_below_ms: 0,
            kernel_stack: None,
            user_stack: None,
        };
        assert_eq!(off(false).blocked_interval(false), Some((900, 200)));
        assert_eq!(off(true).blocked_interval(false), None);
        assert_eq!(off(true).blocked_interval(true), Some((1_000, 300)));
        let sample = Event::OnCpuSample {
            ts_ns: 5,
            tid: 1,
            cpu: 0,
            period_ns: 0,
            kernel_stack: None,
            user_stack: None,
        };
        assert_eq!(sample.blocked_interval(true), None);
    }

    #[test]
    fn a_sampled_off_cpu_interval_counts_for_the_intervals_it_stands_for() {
        let mut raw = RawEvent::zeroed();
        raw.kind = EventKind::OffCpu as u32;
        raw.duration_ns = 2_000_000;
        // Sampled under 8 ms: reported with probability 2/8, so it stands for 4 intervals.
        raw.offcpu_sampled_below_ms = 8;
        let mut bytes = Vec::new();
        encode_raw(&raw, &mut bytes);
        let sampled = Event::from_raw(&decode_raw(&bytes).unwrap()).unwrap();
        assert_eq!(sampled.weigh_off_cpu(1_500_000), 6_000_000);
        // Horvitz–Thompson: (1.5 ms)² × 4 × 3.
        let variance = sampled.off_cpu_estimate_variance(1_500_000);
        assert!(
            (variance - 1.5e6f64.powi(2) * 12.0).abs() < 1.0,
            "{variance}"
        );
        raw.offcpu_sampled_below_ms = 0;
        let exact = Event::from_raw(&raw).unwrap();
        assert_eq!(exact.weigh_off_cpu(1_500_000), 1_500_000);
        assert_eq!(exact.off_cpu_estimate_variance(1_500_000), 0.0);
        // Sampled under a threshold shorter than itself: reported for its length, exact.
        raw.offcpu_sampled_below_ms = 1;
        assert_eq!(
            Event::from_raw(&raw)
                .unwrap()
                .off_cpu_estimate_variance(1_500_000),
            0.0
        );
        // Not off-CPU: nothing to weigh.
        raw.kind = EventKind::RunQueue as u32;
        raw.offcpu_sampled_below_ms = 8;
        assert_eq!(Event::from_raw(&raw).unwrap().weigh_off_cpu(7), 7);
    }

    #[test]
    fn unknown_kind_and_missing_stacks() {
        let mut raw = RawEvent::zeroed();
        raw.kind = 99;
        assert!(Event::from_raw(&raw).is_none());
        raw.kind = EventKind::OnCpuSample as u32;
        raw.user_stack_id = 3;
        raw.duration_ns = 2_004_008;
        match Event::from_raw(&raw).unwrap() {
            Event::OnCpuSample {
                kernel_stack,
                user_stack,
                period_ns,
                ..
            } => {
                assert_eq!(kernel_stack, None);
                assert_eq!(user_stack, Some(3));
                assert_eq!(period_ns, 2_004_008);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
