//! Types shared by the kernel programs (`probe-ebpf`) and the agent (`probe-user`).
//!
//! Every record the kernel writes to the ring buffer is one fixed-size [`RawEvent`], tagged by
//! [`EventKind`]. The most frequent, request latencies and run-queue waits, are kept in per-CPU
//! timing rings instead ([`TimingRecord`]), which the agent maps. A single fixed layout keeps
//! the kernel side trivial and lets the recording file store events as a flat array.
#![no_std]

/// What a [`RawEvent`] describes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A thread of the target became runnable and later got a CPU: `duration_ns` is the wait.
    RunQueue = 1,
    /// A thread of the target was off-CPU for `duration_ns`; stacks are where it blocked.
    OffCpu = 2,
    /// A periodic on-CPU sample of a target thread: `duration_ns` is the sampling period, the
    /// CPU time the sample stands for (0 in recordings older than calm-rate sampling).
    OnCpuSample = 3,
    /// A TCP segment of a socket owned by the target was retransmitted.
    TcpRetransmit = 4,
    /// The target wrote a response: `duration_ns` is from the arrival of the request's first
    /// bytes on the socket to the write ("server" latency).
    RequestServed = 5,
    /// The peer acknowledged the whole response: `duration_ns` is from the request's arrival
    /// to that acknowledgement ("delivery" latency, includes retransmissions).
    RequestDelivered = 6,
    /// A latency reported from outside the kernel (`--latency-feed`); written by the agent.
    ExternalLatency = 7,
    /// A Go runtime function was entered (uprobe); `state` says which (`GO_*`).
    GoRuntime = 8,
    /// Benchmarks only: one per system call of the target, with the hidden
    /// `--synthetic-syscall-events`, to measure how many events per second the agent drains.
    /// Carries nothing to analyse.
    Synthetic = 9,
    // 10 was a ring-buffer batch of timings, before the timing rings; never in a recording.
    /// The trigger's latency rose on `cpu` (see [`latency_rising`]): sent only to wake the
    /// agent, which drops it; never in a recording.
    LatencyRising = 11,
}

/// One request latency or run-queue wait, in its CPU's timing ring (the kernel's `TIMINGS`).
/// These are the most frequent events, one or two per request, so they do not go through the
/// ring buffer: the kernel keeps the last few seconds of them in place, and the agent reads
/// them from its mapping of the rings, without a system call or a copy by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimingRecord {
    pub ts_ns: u64,
    pub duration_ns: u64,
    pub tid: u32,
    /// `EventKind::RequestServed`, `EventKind::RequestDelivered` or `EventKind::RunQueue`.
    pub kind: u32,
}

/// Where a CPU's timing ring stands (its entry in the kernel's `TIMING_HEADS`). Cache-line
/// aligned: the entries of neighbouring CPUs lie next to each other and must not share a line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct TimingHead {
    /// Set while a program on this CPU writes its ring. Programs on one CPU do not preempt
    /// each other, but an interrupt (a softirq's ACK) can arrive in the middle of one; the
    /// nested program then sends its timing through the ring buffer instead.
    pub busy: u64,
    /// Timings ever written to this CPU's ring; the next goes to slot `written % capacity`.
    /// Stored after the slot it counts, so a reader that sees it sees the slot.
    pub written: u64,
    /// Of those, `EventKind::RequestServed`: the request rate, without reading the ring.
    pub served: u64,
}

/// Buckets of the kernel's latency histograms ([`LatencySlice`]): one per nanosecond below
/// 16 ns, then 16 per power of two, so a bucket is at most 1/16 of its lower bound wide.
pub const LATENCY_BUCKETS: usize = 976;

/// The histogram bucket of `value` (ns). Shifts and compares only: BPF has no
/// count-leading-zeros instruction.
#[inline(always)]
pub const fn latency_bucket(value: u64) -> usize {
    if value < 16 {
        return value as usize;
    }
    let mut msb = 0;
    let mut rest = value;
    let mut step = 32;
    while step > 0 {
        if rest >> step != 0 {
            rest >>= step;
            msb += step;
        }
        step /= 2;
    }
    ((msb - 3) * 16 + ((value >> (msb - 4)) & 15) as u32) as usize
}

/// The smallest value in histogram bucket `index` (ns); the bucket ends where the next begins.
pub const fn latency_bucket_start(index: usize) -> u64 {
    if index < 16 {
        return index as u64;
    }
    let msb = index as u32 / 16 + 3;
    (16 + (index as u64 % 16)) << (msb - 4)
}

/// Slices each CPU keeps of the trigger's latency histogram; a power of two, and more than a
/// window's worth (at most 21 slices) plus the agent's slowest read.
pub const LATENCY_SLICES_PER_CPU: u32 = 32;

/// One CPU's histogram of the trigger's request latency over one slice of time (a tenth to a
/// twentieth of the trigger's window), in the kernel's `LATENCY_SLICES`. The kernel counts each request
/// into the histogram of the slice it ended in; the agent sums the slices of the window from
/// its mapping of them, so it needs no copy of each request to know the P99.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LatencySlice {
    /// The slice's number (its start time / slice length) + 1; 0 for never used. Stored after
    /// the buckets are cleared for a new slice.
    pub slice: u64,
    pub buckets: [u32; LATENCY_BUCKETS],
    /// Requests counted, and of those the ones at or over the agent's watch mark
    /// (`LATENCY_WATCH`) while it had one; for [`latency_rising`].
    pub total: u32,
    pub over_watch_mark: u32,
    /// 1 once this slice has woken the agent: once is enough.
    pub woke: u32,
    pub _pad: u32,
}

/// Requests at or over the watch mark, in one CPU's slice, before the kernel wakes the agent:
/// a lone slow request is no trend, and the agent looks at the whole window anyway.
pub const LATENCY_RISING_MIN: u32 = 3;

/// Whether the kernel wakes the agent for a slice in which `over` of `total` requests reached
/// the watch mark: as many as 1% of them, so that the slice's own P99 is at the mark.
#[inline(always)]
pub fn latency_rising(over: u32, total: u32) -> bool {
    over >= LATENCY_RISING_MIN && over as u64 * 100 >= total as u64
}

/// `state` of a [`EventKind::GoRuntime`] event: which runtime function was entered.
pub const GO_STOP_THE_WORLD: u32 = 1;
pub const GO_START_THE_WORLD: u32 = 2;
pub const GO_GC_START: u32 = 3;
pub const GO_GC_MARK_TERMINATION: u32 = 4;

impl EventKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::RunQueue),
            2 => Some(Self::OffCpu),
            3 => Some(Self::OnCpuSample),
            4 => Some(Self::TcpRetransmit),
            5 => Some(Self::RequestServed),
            6 => Some(Self::RequestDelivered),
            7 => Some(Self::ExternalLatency),
            8 => Some(Self::GoRuntime),
            9 => Some(Self::Synthetic),
            11 => Some(Self::LatencyRising),
            _ => None,
        }
    }
}

/// No stack was captured (or the stack map refused it: full or hash collision).
pub const NO_STACK: i32 = -1;

/// `flags` bit: the off-CPU interval began with an involuntary switch (preemption).
pub const FLAG_PREEMPTED: u32 = 1;
/// An off-CPU interval whose stacks were not walked: the thread blocked where its last walked
/// interval did (the same user instruction and stack pointer, system call and wait state), so
/// its stacks are that interval's, which the agent fills in. See `ThreadState::walked_at`.
pub const FLAG_STACKS_REPEATED: u32 = 2;
/// Not an interval to report: one left out (shorter than `--min-offcpu`, or not drawn in the
/// sample) sent only for the stacks the hooks before the switch walked as it began, which later
/// intervals at its place repeat. The agent keeps the stacks and drops the event.
pub const FLAG_STACKS_ONLY: u32 = 4;

/// One event as written by the kernel. Little-endian, 96 bytes, no padding holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent {
    pub kind: u32,
    /// CPU the event was observed on (for run-queue delay: the CPU the thread got).
    pub cpu: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the end of the interval / at the sample.
    pub ts_ns: u64,
    /// Run-queue wait, off-CPU time, or request latency; 0 for samples and retransmits.
    pub duration_ns: u64,
    /// Off-CPU: the part of `duration_ns` spent runnable, waiting for a CPU (so
    /// `duration_ns - wait_ns` is the time the thread was blocked). On-CPU sample that
    /// interrupted the kernel without walking its stack (`kernel_stack_max_period_ns`): the
    /// interrupted kernel address, which the agent turns into a stack of its own before
    /// anything else reads the event (`StackStore::adopt`).
    pub wait_ns: u64,
    pub tid: u32,
    pub tgid: u32,
    /// Stack-map ids; [`NO_STACK`] when absent.
    pub kernel_stack_id: i32,
    pub user_stack_id: i32,
    /// Off-CPU: the `prev_state` the thread left the CPU with. Retransmit: TCP state.
    pub state: u32,
    pub flags: u32,
    /// Retransmit only: address family (2 = AF_INET, 10 = AF_INET6), ports in host order.
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// Off-CPU only: 0 when the interval was reported because it was one (every interval over
    /// the minimum is); otherwise the stack-sampling threshold `D` (ms) in force, below which an
    /// interval of length `d` was reported with probability `d / D` and so stands for `D / d`
    /// intervals like it (see the agent's `offcpu_sampling`).
    pub offcpu_sampled_below_ms: u16,
    /// Retransmit only: IPv4 in the first 4 bytes, or IPv6.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

impl RawEvent {
    pub const SIZE: usize = core::mem::size_of::<RawEvent>();

    pub const fn zeroed() -> Self {
        RawEvent {
            kind: 0,
            cpu: 0,
            ts_ns: 0,
            duration_ns: 0,
            wait_ns: 0,
            tid: 0,
            tgid: 0,
            kernel_stack_id: NO_STACK,
            user_stack_id: NO_STACK,
            state: 0,
            flags: 0,
            family: 0,
            local_port: 0,
            remote_port: 0,
            offcpu_sampled_below_ms: 0,
            local_addr: [0; 16],
            remote_addr: [0; 16],
        }
    }
}

const _: () = assert!(RawEvent::SIZE == 96);

/// Indexes into the kernel's per-CPU `COUNTERS` array. Drops are counted where they happen so
/// the user can tell "nothing happened" from "we lost it".
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `bpf_ringbuf_reserve` failed: the agent did not drain fast enough.
    RingBufferFull = 0,
    /// `bpf_get_stackid` failed (map full, hash collision, or no user stack).
    StackMissing = 1,
    /// A thread found both of its state slots held by other threads and took the first: the
    /// interval that thread had in progress is not reported.
    StateMapFull = 2,
    /// Events written to the ring buffer.
    EventsSent = 3,
    /// A request's state was displaced by another connection sharing its socket slot: that
    /// request was not timed.
    RequestsUntimed = 4,
    /// Off-CPU intervals reported with `FLAG_STACKS_REPEATED` instead of two stack walks.
    StacksRepeated = 5,
}

pub const COUNTER_SLOTS: u32 = 6;

/// Words of the kernel's bitmap of the target's listening ports: one bit per TCP port.
pub const PORT_BITMAP_WORDS: u32 = 65536 / 64;

/// Where a port's bit lives in that bitmap: the word's index and the bit's mask.
#[inline(always)]
pub const fn port_bit(port: u16) -> (u32, u64) {
    (port as u32 / 64, 1 << (port % 64))
}

/// The kernel's state of one connection to the target, in its `SOCKETS` array: which request
/// is waiting on it and since when. Connections are spread over the slots by the kernel's hash
/// of the connection; two can share a slot, and the later arrival takes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// The `struct sock` this slot belongs to; 0 when free.
    pub sk: u64,
    /// When the bytes of the request now `WAITING` first arrived.
    pub arrived_ns: u64,
    /// One of [`IDLE`], [`WAITING`], [`ANSWERED`].
    pub stage: u32,
    /// Once `ANSWERED`: the sequence number the peer must acknowledge for the response to be
    /// delivered.
    pub response_end_seq: u32,
    /// While `WAITING`: the server's `write_seq` when the request arrived (the end of all it had
    /// queued before). Once the peer has acknowledged data past it, the server has answered.
    pub request_write_seq: u32,
    pub _pad: u32,
}

// Request stages. Slots are updated in place and freed when the socket closes.
pub const IDLE: u32 = 0;
pub const WAITING: u32 = 1;
pub const ANSWERED: u32 = 2;

pub const SOCKET_SLOT_BITS: u32 = 16;
pub const SOCKET_SLOTS: u32 = 1 << SOCKET_SLOT_BITS;

/// Offsets into kernel structs, resolved by the agent from the running kernel's BTF and
/// passed to the programs as a global, because aya-ebpf has no CO-RE relocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_state: u32,
    /// `struct tcp_sock.write_seq`: sequence number after the last byte the sender queued.
    pub tcp_write_seq: u32,
    /// `struct tcp_sock.snd_una`: first byte the peer has not acknowledged.
    pub tcp_snd_una: u32,
    /// `struct tcp_sock.rack.mstamp`: when (µs, monotonic clock) the most recently sent of the
    /// segments the peer has acknowledged was sent.
    pub tcp_rack_mstamp: u32,
    /// `struct tcp_sock.tcp_clock_cache`: the monotonic clock (ns) as TCP read it when it began
    /// on the segment in hand (`tcp_mstamp_refresh`); 0 where the kernel has no such field.
    pub tcp_clock_cache: u32,
    /// `struct sk_buff.data`: on TCP receive, points at the TCP header.
    pub skb_data: u32,
    /// `struct sock_common` members (at the start of every `struct sock`).
    pub sk_family: u32,
    pub sk_state: u32,
    /// Local port, host order.
    pub sk_num: u32,
    /// Remote port, network order.
    pub sk_dport: u32,
    pub sk_rcv_saddr: u32,
    pub sk_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_v6_daddr: u32,
    /// The connection's hash in the kernel's established table (a mix of its addresses and
    /// ports).
    pub sk_hash: u32,
    /// `struct pt_regs` members: the user registers saved at a system call's entry.
    pub regs_ip: u32,
    pub regs_sp: u32,
    pub regs_orig_ax: u32,
}

/// Run-time settings the agent writes into the programs' globals before loading.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Thread-group id (the PID users see) to observe.
    pub target_tgid: u32,
    /// 1 enables aya-log output from the kernel programs.
    pub debug: u32,
    /// Off-CPU intervals shorter than this are not reported (0 = report all).
    pub min_offcpu_ns: u64,
    pub offsets: KernelOffsets,
    /// 1: follow each response until the peer acknowledges it (`RequestDelivered` events);
    /// 0: stop at the response write, and `tcp_probe` is not attached.
    pub track_delivery: u32,
    /// Each CPU's timing ring holds `1 << timing_ring_bits` records.
    pub timing_ring_bits: u32,
    /// The `EventKind` the trigger watches, counted into `LATENCY_SLICES`; 0 for none.
    pub trigger_kind: u32,
    /// A `LatencySlice` is `1 << trigger_slice_shift` ns long: a shift, not a division, on
    /// every request.
    pub trigger_slice_shift: u32,
    /// On-CPU samples taken every this many ns or less walk the interrupted kernel stack;
    /// those further apart (the calm rate) record only the interrupted kernel address, in
    /// `RawEvent::wait_ns`. `u64::MAX`: every sample walks.
    pub kernel_stack_max_period_ns: u64,
}

/// A thread's scheduling state, kept by the kernel programs in one of its two slots of the
/// `THREADS` table ([`thread_slots`]) and updated in place. Shared because the agent must know
/// which stack ids threads still hold for off-CPU intervals that have not ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    /// When it became runnable (woken, or preempted while still runnable); 0: not waiting.
    pub runnable_since: u64,
    /// When it left the CPU; 0: on a CPU (or not seen leaving one).
    pub off_since: u64,
    /// Where and how it left.
    pub kernel_stack_id: i32,
    pub user_stack_id: i32,
    pub state: u32,
    pub flags: u32,
    /// The thread this slot belongs to; 0 when it is free.
    pub tid: u32,
    /// Off-CPU intervals that may still repeat the walked stacks below before one is walked
    /// again to check them; `NEVER_REPEAT` once a check found another user stack there.
    pub repeats_left: u32,
    /// The repeats the last check granted: each check that finds the same stacks again grants
    /// twice as many, up to a bound (see the kernel's `offcpu_stacks`).
    pub repeats_granted: u32,
    pub _pad: u32,
    /// Where the last walked off-CPU interval blocked (a hash of the user instruction and
    /// stack pointers at the system call, its number and the wait state; 0: none), and its
    /// stacks.
    pub walked_at: u64,
    pub walked_kernel_stack_id: i32,
    pub walked_user_stack_id: i32,
}

/// `ThreadState::repeats_left` of a thread whose off-CPU stacks are always walked.
pub const NEVER_REPEAT: u32 = u32::MAX;

/// Slots of the kernel's `THREADS` table: room for many more threads than a target has, so
/// that a thread nearly always finds one of its two slots free.
pub const THREAD_SLOT_BITS: u32 = 17;
pub const THREAD_SLOTS: u32 = 1 << THREAD_SLOT_BITS;

/// The two slots a thread's state may live in: its tid's low bits, and a multiplicative hash
/// of it (for the rare thread whose tid shares its low bits with another live thread's). A
/// table rather than a hash map: the scheduler hooks look a thread up three times per context
/// switch, and a hash-map lookup cost ~45 ns more per run here than an array slot
/// (`kernel.bpf_stats_enabled`, a pipe ping-pong between two target threads).
#[inline(always)]
pub const fn thread_slots(tid: u32) -> [u32; 2] {
    [
        tid & (THREAD_SLOTS - 1),
        tid.wrapping_mul(0x9e37_79b9) >> (32 - THREAD_SLOT_BITS),
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] data with no padding-dependent invariants.
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::RawEvent {}
    unsafe impl aya::Pod for super::ThreadState {}
    unsafe impl aya::Pod for super::SocketState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_rises_when_a_hundredth_of_a_slice_reaches_the_mark_and_not_for_one_or_two() {
        assert!(!latency_rising(1, 1), "one slow request is no trend");
        assert!(!latency_rising(2, 2));
        assert!(latency_rising(3, 3));
        assert!(latency_rising(10, 1_000));
        assert!(
            !latency_rising(9, 1_000),
            "under 1%: the slice's P99 is under the mark"
        );
        assert!(latency_rising(u32::MAX, u32::MAX), "no overflow");
    }

    #[test]
    fn latency_buckets_cover_every_value_in_order_within_a_sixteenth() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(15), 15);
        assert_eq!(latency_bucket(16), 16);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        for index in 0..LATENCY_BUCKETS {
            let start = latency_bucket_start(index);
            assert_eq!(latency_bucket(start), index, "start of {index}");
            if index > 0 {
                assert_eq!(latency_bucket(start - 1), index - 1, "before {index}");
            }
            if index + 1 < LATENCY_BUCKETS {
                let width = latency_bucket_start(index + 1) - start;
                assert!(width == 1 || width * 16 <= start, "bucket {index} too wide");
            }
        }
        for value in [17, 1_000, 130_000, 5_000_000, 10_000_000_000] {
            let start = latency_bucket_start(latency_bucket(value));
            assert!(start <= value && value - start <= start / 16);
        }
    }

    #[test]
    fn every_port_has_its_own_bit_inside_the_bitmap() {
        assert_eq!(port_bit(0), (0, 1));
        assert_eq!(port_bit(8080), (126, 1 << 16));
        assert_eq!(port_bit(u16::MAX), (PORT_BITMAP_WORDS - 1, 1 << 63));
        for port in 0..=u16::MAX {
            let (word, bit) = port_bit(port);
            assert_eq!(word * 64 + bit.trailing_zeros(), port as u32);
        }
    }
}
