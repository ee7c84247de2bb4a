//! Kernel programs of p99probe. They only observe one target thread group, keep per-thread
//! interval state, and write fixed-size events; every analysis happens in user space.
//!
//! Scheduler hooks come in three flavours because the agent picks one at run time:
//! - at `finish_task_switch` (fentry, kprobe) the current task is `next`, so the stack is
//!   captured when the thread comes back, which is the same user stack it blocked in, and
//!   only when the interval proved long enough to report (and, while intervals come faster
//!   than the agent's budget, was drawn in its sample: see `OFFCPU_SAMPLING`);
//! - `sched_switch` for the switch-out plus `sched_exit_tp` (end of `__schedule`, in the task
//!   that now runs) for the switch-in: the same, from tracepoints;
//! - at `sched_switch` alone (tp_btf, raw_tp) the current task is `prev`, so the off-CPU stack
//!   is captured when the thread leaves the CPU, before anyone knows how long it will be away:
//!   a place it keeps blocking at is walked once in 8 to 128 intervals there, as on return,
//!   but a walked interval too short to report is sent for its stacks alone
//!   (`FLAG_STACKS_ONLY`). One hook per switch instead of two, on every switch of the machine.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_perf_event_data, BPF_F_MMAPABLE, BPF_F_USER_STACK, BPF_RB_AVAIL_DATA,
        BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_get_prandom_u32,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_skc_to_tcp_sock,
        bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, fentry, kprobe, map, perf_event, raw_tracepoint, uprobe},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf, StackTrace},
    programs::{
        BtfTracePointContext, FEntryContext, PerfEventContext, ProbeContext, RawTracePointContext,
    },
    EbpfContext,
};
use aya_log_ebpf::warn;
use probe_common::{
    latency_bucket, latency_rising, port_bit, thread_slots, Counter, EventKind, LatencySlice,
    ProbeConfig, RawEvent, SocketState, ThreadState, TimingHead, TimingRecord, ANSWERED,
    COUNTER_SLOTS, FLAG_PREEMPTED, FLAG_STACKS_ONLY, FLAG_STACKS_REPEATED, GO_GC_MARK_TERMINATION,
    GO_GC_START, GO_START_THE_WORLD, GO_STOP_THE_WORLD, IDLE, LATENCY_BUCKETS,
    LATENCY_SLICES_PER_CPU, NEVER_REPEAT, NO_STACK, PORT_BITMAP_WORDS, SOCKET_SLOTS,
    SOCKET_SLOT_BITS, THREAD_SLOTS, WAITING,
};

#[no_mangle]
static CONFIG: ProbeConfig = ProbeConfig {
    target_tgid: 0,
    debug: 0,
    min_offcpu_ns: 0,
    offsets: probe_common::KernelOffsets {
        task_pid: 0,
        task_tgid: 0,
        task_state: 0,
        tcp_write_seq: 0,
        tcp_snd_una: 0,
        tcp_rack_mstamp: 0,
        tcp_clock_cache: 0,
        skb_data: 0,
        sk_family: 0,
        sk_state: 0,
        sk_num: 0,
        sk_dport: 0,
        sk_rcv_saddr: 0,
        sk_daddr: 0,
        sk_v6_rcv_saddr: 0,
        sk_v6_daddr: 0,
        sk_hash: 0,
        regs_ip: 0,
        regs_sp: 0,
        regs_orig_ax: 0,
    },
    track_delivery: 0,
    timing_ring_bits: 0,
    trigger_kind: 0,
    trigger_slice_shift: 0,
    kernel_stack_max_period_ns: u64::MAX,
};

/// Benchmarks only (`attach --bench-empty-programs`): 1 makes every program return as soon as
/// it runs, so that what the hooks cost by being attached (the kernel's dispatch, sampling
/// interrupts, uprobe traps) can be told from what the programs' work costs. A global of its
/// own, not a field of `CONFIG`, because every run of every program reads it: here that is
/// one load and a branch, where `CONFIG`'s hidden address would add a stack round trip.
#[no_mangle]
static BENCH_EMPTY_PROGRAMS: u32 = 0;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Each CPU's ring of its last request latencies and run-queue waits: CPU `c` owns the
/// `1 << timing_ring_bits` records from `c << timing_ring_bits` (the agent sizes the map). The
/// kernel overwrites the oldest; the agent maps the rings and reads them in place, so the
/// per-request path has no ring-buffer record, wakeup or copy, and a quiet agent costs the
/// requests in flight nothing. A plain array rather than a per-CPU map: only a plain array
/// can be mapped.
#[map]
static TIMINGS: Array<TimingRecord> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Each CPU's position in its timing ring, at the index of its CPU id.
#[map]
static TIMING_HEADS: Array<TimingHead> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Each CPU's histograms of the trigger's latency, `LATENCY_SLICES_PER_CPU` slices of time
/// from `cpu * LATENCY_SLICES_PER_CPU`, reused round-robin (the agent sizes the map). Mapped by
/// the agent, which sums a window of them ten times a second: the trigger then needs nothing
/// from the agent per request.
#[map]
static LATENCY_SLICES: Array<LatencySlice> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The threads' scheduling states, each in one of its two slots (`thread_slots`), taken on first
/// sight and updated in place afterwards. Mapped by the agent, which reads the stack ids that
/// threads hold (for the hook flavours that walk stacks at switch-out).
#[map]
static THREADS: Array<ThreadState> = Array::with_max_entries(THREAD_SLOTS, BPF_F_MMAPABLE);

/// The off-CPU stack-sampling threshold in ms, set by the agent while attached (0: every
/// interval over the minimum is reported). Walking an interval's two stacks costs 7–12 µs here,
/// so a target that blocks tens of thousands of times a second would spend a CPU on them; the
/// agent raises the threshold to keep the walks within a budget (`offcpu_sampling`).
#[map]
static OFFCPU_SAMPLING: Array<u32> = Array::with_max_entries(1, 0);

/// The agent's watch mark on the trigger's latency, as a `latency_bucket`; 0: none. While the
/// target is calm the agent drains seldom, and a slice in which requests reach the mark (half
/// the threshold) wakes it (`latency_rising`): it wakes when latency rises, not on a timer.
#[map]
static LATENCY_WATCH: Array<u32> = Array::with_max_entries(1, 0);

/// Local ports the target listens on, one bit per port, set by the agent (from sock_diag) at
/// attach and re-read while attached. Arrivals, ACKs and retransmits run in softirq or timer
/// context, where the current task says nothing about who owns the socket; the local port
/// does. A bitmap rather than a hash: every arrival on the machine is checked against it, and
/// an array lookup is one indexed load where a hash lookup of a socket pointer is a cache miss.
#[map]
static TARGET_PORTS: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);

/// The target's connections on its listening ports and the request in flight on each, in a
/// table indexed by the connection's hash. Not a hash map: a hash-map lookup cost
/// ~200 ns here, twice per request (the largest part of the per-request cost, measured with
/// `kernel.bpf_stats_enabled`), while an array slot is one inlined load. Two live connections
/// can share a slot; the later arrival takes it, and a request it displaces is counted as
/// untimed rather than timed wrongly (each slot is tagged with its socket).
#[map]
static SOCKETS: Array<SocketState> = Array::with_max_entries(SOCKET_SLOTS, 0);

/// Sockets the target connected (or sent on, while the write hook is attached) that are not on
/// its listening ports: its own outbound connections (databases, upstream services). Kept only
/// so that their retransmits are attributed; their traffic is not request latency.
#[map]
static OUTBOUND: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

const NEW_THREAD: ThreadState = ThreadState {
    runnable_since: 0,
    off_since: 0,
    kernel_stack_id: NO_STACK,
    user_stack_id: NO_STACK,
    state: 0,
    flags: 0,
    tid: 0,
    repeats_left: 0,
    repeats_granted: 0,
    _pad: 0,
    walked_at: 0,
    walked_kernel_stack_id: NO_STACK,
    walked_user_stack_id: NO_STACK,
};

const TASK_RUNNING: u32 = 0;
const TASK_DEAD: u32 = 0x80;
const AF_INET6: u16 = 10;
const TCP_SYN_SENT: i32 = 2;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: u8 = 10;
const AF_INET: u16 = 2;

#[inline(always)]
fn config() -> &'static ProbeConfig {
    // The loader rewrites this global, so the compiler must not fold its zero initializer into
    // the programs. Hiding its address (a volatile read of a pointer) does that; a volatile
    // read of the whole struct did too, but loaded all 22 fields in every hook, used or not.
    let address: *const ProbeConfig = &CONFIG;
    unsafe { &*core::ptr::read_volatile(&address) }
}

/// Whether every program is to return at once (`BENCH_EMPTY_PROGRAMS`). The verifier knows
/// the frozen value, but the return it would skip to is shared with the programs' own early
/// returns, so the branch stays: about 1 ns a run when off.
#[inline(always)]
fn bench_empty() -> bool {
    // Volatile, so the compiler does not fold the zero the loader replaces.
    unsafe { core::ptr::read_volatile(&BENCH_EMPTY_PROGRAMS) != 0 }
}

#[inline(always)]
fn count(counter: Counter) {
    count_n(counter, 1);
}

#[inline(always)]
fn count_n(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        unsafe { *slot += n };
    }
}

/// Ring-buffer flags for a record: wake the agent only once enough has accumulated.
#[inline(always)]
fn wakeup_flags() -> u64 {
    (if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_AT_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }) as u64
}

/// Unread bytes in the ring buffer before an event wakes the agent. Below it the agent is not
/// woken per event (each wakeup costs it a context switch) but drains on its own timer. Small
/// enough to leave 14 MB for the agent to wake into: 70 ms of the synthetic 2.3 M events/s
/// storm, which it drains with no drops.
const WAKEUP_AT_BYTES: u64 = 2 << 20;

/// Reserves an event in the ring buffer, zeroes it and lets `fill` set its fields in place.
///
/// Zeroing is done with volatile 8-byte stores on purpose: building a `RawEvent` on the stack
/// and copying it makes LLVM emit a call to a byte-at-a-time `memset` subprogram (96
/// iterations per event), which was the largest single cost of the request hooks.
#[inline(always)]
fn emit(fill: impl FnOnce(&mut RawEvent)) -> bool {
    emit_flagged(fill, false)
}

/// [`emit`], waking the agent however little the ring holds.
#[inline(always)]
fn emit_waking(fill: impl FnOnce(&mut RawEvent)) -> bool {
    emit_flagged(fill, true)
}

#[inline(always)]
fn emit_flagged(fill: impl FnOnce(&mut RawEvent), wake: bool) -> bool {
    let Some(mut entry) = EVENTS.reserve::<RawEvent>(0) else {
        count(Counter::RingBufferFull);
        return false;
    };
    let event = entry.as_mut_ptr();
    unsafe {
        let words = event as *mut u64;
        for i in 0..RawEvent::SIZE / 8 {
            core::ptr::write_volatile(words.add(i), 0);
        }
        (*event).kernel_stack_id = NO_STACK;
        (*event).user_stack_id = NO_STACK;
        fill(&mut *event);
    }
    entry.submit(if wake {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        wakeup_flags()
    });
    count(Counter::EventsSent);
    true
}

#[inline(always)]
fn stack_id<C: EbpfContext>(ctx: &C, flags: u64) -> i32 {
    match unsafe { STACKS.get_stackid(ctx, flags) } {
        Ok(id) => id as i32,
        Err(_) => {
            count(Counter::StackMissing);
            NO_STACK
        }
    }
}

/// A kernel object pointer from a hook's arguments, whose fields are read at offsets the agent
/// resolved from BTF.
trait KernelPtr: Copy {
    fn addr(self) -> u64;
    /// The field at `offset`, or 0 when it cannot be read.
    fn read<T: Copy + Default>(self, offset: u32) -> T;
    /// This socket as a `struct tcp_sock`, whose fields lie past `struct sock`; `None` when it
    /// is not one.
    fn tcp_sock(self) -> Option<Self>;
}

/// An argument of a BTF-typed hook (tp_btf, fentry). The verifier knows what it points to, so
/// a field is a plain load, checked when the program loads and fault-guarded by the kernel.
/// On the hot paths this matters: here `bpf_probe_read_kernel` costs more than the map
/// lookup it was meant to avoid.
#[derive(Clone, Copy)]
struct Typed(*const u8);

impl KernelPtr for Typed {
    #[inline(always)]
    fn addr(self) -> u64 {
        self.0 as u64
    }
    #[inline(always)]
    fn read<T: Copy + Default>(self, offset: u32) -> T {
        // The offset is a constant of the loaded program (CONFIG is frozen), as the
        // verifier requires for a typed access.
        unsafe { core::ptr::read_volatile(self.0.add(offset as usize) as *const T) }
    }
    #[inline(always)]
    fn tcp_sock(self) -> Option<Self> {
        // The verifier refuses a typed access past the end of the hooks' `struct sock`; the
        // helper's result is typed `struct tcp_sock`, so its fields are plain loads too (a
        // `bpf_probe_read_kernel` each cost ~20-40 ns more here).
        let tcp = unsafe { bpf_skc_to_tcp_sock(self.0 as *mut _) };
        (!tcp.is_null()).then_some(Typed(tcp as *const u8))
    }
}

/// An argument of an untyped hook (raw tracepoint, kprobe): read through the helper.
#[derive(Clone, Copy)]
struct Untyped(u64);

impl KernelPtr for Untyped {
    #[inline(always)]
    fn addr(self) -> u64 {
        self.0
    }
    #[inline(always)]
    fn read<T: Copy + Default>(self, offset: u32) -> T {
        unsafe { bpf_probe_read_kernel((self.0 as *const u8).add(offset as usize) as *const T) }
            .unwrap_or_default()
    }
    #[inline(always)]
    fn tcp_sock(self) -> Option<Self> {
        // Only TCP sockets reach the hooks that ask (they are on the target's TCP ports).
        Some(self)
    }
}

/// The task's thread id when it belongs to the target. Only the thread group is read for
/// other tasks: this runs for every context switch and wakeup on the machine, nearly all of
/// them someone else's, so their cost is one read.
#[inline(always)]
fn target_tid(task: impl KernelPtr, cfg: &ProbeConfig) -> Option<u32> {
    if task.read::<u32>(cfg.offsets.task_tgid) != cfg.target_tgid {
        return None;
    }
    match task.read::<u32>(cfg.offsets.task_pid) {
        0 => None,
        tid => Some(tid),
    }
}

/// The current task's thread id when it belongs to the target: a helper call, no memory read.
#[inline(always)]
fn current_target_tid(cfg: &ProbeConfig) -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    (tgid == cfg.target_tgid && tid != 0).then_some(tid)
}

/// The thread's state, if one of its slots holds it.
#[inline(always)]
fn known_thread(tid: u32) -> Option<&'static mut ThreadState> {
    for index in thread_slots(tid) {
        if let Some(slot) = THREADS.get_ptr_mut(index) {
            let slot = unsafe { &mut *slot };
            if slot.tid == tid {
                return Some(slot);
            }
        }
    }
    None
}

/// The thread's state, in a slot of its own if it is new: the first of its two that is free,
/// else the first, whose thread loses the interval it had in progress.
#[inline(always)]
fn thread_state(tid: u32) -> Option<&'static mut ThreadState> {
    if let Some(thread) = known_thread(tid) {
        return Some(thread);
    }
    let [first, second] = thread_slots(tid);
    let first = unsafe { &mut *THREADS.get_ptr_mut(first)? };
    let slot = if first.tid == 0 {
        first
    } else {
        match THREADS.get_ptr_mut(second) {
            Some(second) if unsafe { (*second).tid } == 0 => unsafe { &mut *second },
            _ => {
                count(Counter::StateMapFull);
                first
            }
        }
    };
    *slot = NEW_THREAD;
    slot.tid = tid;
    Some(slot)
}

#[inline(always)]
fn mark_runnable(tid: u32, now: u64) {
    if let Some(thread) = thread_state(tid) {
        thread.runnable_since = now;
    }
}

/// A target thread leaves the CPU, `preempted` or in `state`; it stays runnable when preempted
/// or still `TASK_RUNNING`. When the thread is current (the hooks before the switch), its
/// stacks are taken here, and its return reports them.
#[inline(always)]
fn switched_out<C: EbpfContext>(
    ctx: &C,
    cfg: &ProbeConfig,
    tid: u32,
    now: u64,
    preempted: bool,
    state: u32,
    thread_is_current: bool,
) {
    let runnable = preempted || state == TASK_RUNNING;
    if state & TASK_DEAD != 0 {
        if let Some(thread) = known_thread(tid) {
            thread.tid = 0;
        }
        return;
    }
    let Some(thread) = thread_state(tid) else {
        return;
    };
    if runnable {
        thread.runnable_since = now;
    }
    // Where the thread blocks, before anyone knows for how long: walked unless it repeats a
    // place already walked, as at the return for the hooks that run there.
    let (kernel_stack_id, user_stack_id, repeated) = if thread_is_current {
        offcpu_stacks(ctx, cfg, thread, state)
    } else {
        (NO_STACK, NO_STACK, false)
    };
    thread.off_since = now;
    thread.kernel_stack_id = kernel_stack_id;
    thread.user_stack_id = user_stack_id;
    thread.state = state;
    let preempted_flag = if runnable { FLAG_PREEMPTED } else { 0 };
    thread.flags = preempted_flag | if repeated { FLAG_STACKS_REPEATED } else { 0 };
}

/// A target thread gets a CPU. When it is current, its stacks are captured here.
#[inline(always)]
fn switched_in<C: EbpfContext>(
    ctx: &C,
    cfg: &ProbeConfig,
    tid: u32,
    tgid: u32,
    now: u64,
    thread_is_current: bool,
) {
    let Some(thread) = known_thread(tid) else {
        return;
    };
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let mut waited = 0;
    let since = thread.runnable_since;
    if since != 0 {
        thread.runnable_since = 0;
        if now > since {
            waited = now - since;
            record_timing(EventKind::RunQueue, tid, now, waited);
        }
    }
    if thread.off_since != 0 {
        let out = *thread;
        thread.off_since = 0;
        let duration = now.saturating_sub(out.off_since);
        let sampled_below_ms = if duration < cfg.min_offcpu_ns {
            LEFT_OUT
        } else {
            offcpu_sampled_below_ms(duration)
        };
        // With the hooks before the switch, stacks walked as the thread left must reach the
        // agent even when their interval is left out (shorter than `--min-offcpu`, or not drawn
        // in the sample): later intervals at the place repeat them. The interval then goes for
        // its stacks alone (`FLAG_STACKS_ONLY`); walks are rare, one in 8 to 128 intervals at a
        // place, so these are too.
        let left_out = sampled_below_ms == LEFT_OUT;
        let walked_as_it_left = !thread_is_current
            && out.flags & FLAG_STACKS_REPEATED == 0
            && out.kernel_stack_id != NO_STACK
            && out.user_stack_id != NO_STACK;
        if left_out && !walked_as_it_left {
            return;
        }
        let (kernel_stack_id, user_stack_id, repeated) = if thread_is_current {
            offcpu_stacks(ctx, cfg, thread, out.state)
        } else {
            (
                out.kernel_stack_id,
                out.user_stack_id,
                out.flags & FLAG_STACKS_REPEATED != 0,
            )
        };
        if cfg.debug != 0 && user_stack_id == NO_STACK && !repeated {
            warn!(ctx, "off-CPU interval of tid {} has no user stack", tid);
        }
        let repeated_flag = if repeated { FLAG_STACKS_REPEATED } else { 0 };
        let stacks_only_flag = if left_out { FLAG_STACKS_ONLY } else { 0 };
        let flags = out.flags | repeated_flag | stacks_only_flag;
        let sent = emit(|event| {
            event.kind = EventKind::OffCpu as u32;
            event.cpu = cpu;
            event.ts_ns = now;
            event.duration_ns = duration;
            event.wait_ns = if waited < duration { waited } else { duration };
            event.tid = tid;
            event.tgid = tgid;
            event.state = out.state;
            event.flags = flags;
            event.kernel_stack_id = kernel_stack_id;
            event.user_stack_id = user_stack_id;
            event.offcpu_sampled_below_ms = sampled_below_ms;
        });
        if !sent && !repeated {
            // The agent fills repeats in from the last walked interval it received: this one
            // never reaches it, so none may repeat it.
            thread.walked_at = 0;
        }
    }
}

/// Off-CPU intervals that repeat a walked one's stacks after the first check that the place
/// still means those stacks, before the next check: every 8th interval there is walked.
const FIRST_REPEATS: u32 = 7;
/// The most repeats between two checks: each check that finds the same stacks again doubles
/// the repeats, so a thread that keeps blocking at one place (Go's sysmon, ~100 times a
/// second) is walked there every 128th interval once it has held for ~250, not every 8th.
const MOST_REPEATS: u32 = 127;

/// The stacks of the current thread's off-CPU interval, which just ended, and whether they are
/// a repeat (`FLAG_STACKS_REPEATED`: not walked, the last walked interval's). The two walks
/// cost ~30 µs, with the CPU stalled. A place repeats only once two walks in a row there gave
/// the same user stack; it is walked again after `FIRST_REPEATS` repeats, then after twice as
/// many each time the stacks held, up to `MOST_REPEATS`; a thread whose place once gave
/// another user stack is walked every time from then on.
#[inline(always)]
fn offcpu_stacks<C: EbpfContext>(
    ctx: &C,
    cfg: &ProbeConfig,
    thread: &mut ThreadState,
    state: u32,
) -> (i32, i32, bool) {
    if thread.repeats_left == NEVER_REPEAT {
        // Where it blocked no longer matters: not worth the registers' reads.
        return (
            stack_id(ctx, 0),
            stack_id(ctx, BPF_F_USER_STACK as u64),
            false,
        );
    }
    let place = blocked_at(cfg, state);
    let same_place = place != 0 && place == thread.walked_at;
    if same_place && thread.repeats_left > 0 {
        thread.repeats_left -= 1;
        count(Counter::StacksRepeated);
        return (NO_STACK, NO_STACK, true);
    }
    let kernel = stack_id(ctx, 0);
    let user = stack_id(ctx, BPF_F_USER_STACK as u64);
    let walked = kernel != NO_STACK && user != NO_STACK;
    // User stacks only: the kernel's at one place differ in return addresses within the same
    // functions from one interval to the next (Go's sysmon: two ids over one symbolized
    // stack, one interval in twelve), and a repeat keeps the last one walked.
    let same_stacks = user == thread.walked_user_stack_id;
    if same_place && walked && !same_stacks {
        thread.repeats_left = NEVER_REPEAT;
    } else if same_place && walked {
        let granted = match thread.repeats_granted {
            0 => FIRST_REPEATS,
            last => (last * 2 + 1).min(MOST_REPEATS),
        };
        thread.repeats_granted = granted;
        thread.repeats_left = granted;
    } else {
        thread.repeats_left = 0;
        thread.repeats_granted = 0;
        thread.walked_at = if walked { place } else { 0 };
    }
    thread.walked_kernel_stack_id = kernel;
    thread.walked_user_stack_id = user;
    (kernel, user, false)
}

/// Where the current thread blocked, as a hash of its user instruction and stack pointers at
/// the system call it blocked in, the call's number and the wait state; 0 when unreadable.
#[inline(always)]
fn blocked_at(cfg: &ProbeConfig, state: u32) -> u64 {
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) };
    if regs == 0 {
        return 0;
    }
    let regs = Typed(regs as *const u8);
    let o = &cfg.offsets;
    let (ip, sp, syscall) = (
        regs.read::<u64>(o.regs_ip),
        regs.read::<u64>(o.regs_sp),
        regs.read::<u64>(o.regs_orig_ax),
    );
    (ip.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ sp.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
        ^ (syscall << 8 | state as u64).wrapping_mul(0x1656_67b1_9e37_79f9))
        | 1
}

/// `offcpu_sampled_below_ms` says the interval is not reported.
const LEFT_OUT: u16 = u16::MAX;

/// Whether an off-CPU interval of `duration_ns` is reported under the agent's sampling
/// threshold `D`: always when it is at least `D` long (the event's field is then 0), otherwise
/// with probability `duration / D` (the field is `D`, so the agent can weigh it by `D / duration`),
/// else `LEFT_OUT`. Sampling in proportion to length keeps the estimate of time blocked per
/// stack unbiased, and every long interval keeps its own stack.
#[inline(always)]
fn offcpu_sampled_below_ms(duration_ns: u64) -> u16 {
    let threshold_ms = match OFFCPU_SAMPLING.get(0) {
        Some(&ms) if ms > 0 => ms.min(u16::MAX as u32 - 1),
        _ => return 0,
    };
    let threshold_us = threshold_ms as u64 * 1000;
    if duration_ns >= threshold_us * 1000 {
        return 0;
    }
    // A uniform draw in [0, threshold) µs, without a division.
    let draw_us = (unsafe { bpf_get_prandom_u32() } as u64 * threshold_us) >> 32;
    if draw_us * 1000 < duration_ns {
        threshold_ms as u16
    } else {
        LEFT_OUT
    }
}

/// `sched_switch` flavour: current == prev, whose thread id (when it is the target's) the
/// caller reads as cheaply as its hook allows.
#[inline(always)]
fn on_sched_switch<C: EbpfContext>(
    ctx: &C,
    cfg: &ProbeConfig,
    preempt: bool,
    prev_tid: Option<u32>,
    next: impl KernelPtr,
    prev_state: u32,
) {
    let next_tid = target_tid(next, cfg);
    if prev_tid.is_none() && next_tid.is_none() {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(tid) = prev_tid {
        switched_out(ctx, cfg, tid, now, preempt, prev_state, true);
    }
    if let Some(tid) = next_tid {
        switched_in(ctx, cfg, tid, cfg.target_tgid, now, false);
    }
}

/// `finish_task_switch` flavour: current == next, `prev` has just left.
#[inline(always)]
fn on_finish_task_switch<C: EbpfContext>(ctx: &C, prev: impl KernelPtr) {
    let cfg = config();
    let prev_tid = target_tid(prev, cfg);
    let next_tid = current_target_tid(cfg);
    if prev_tid.is_none() && next_tid.is_none() {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(prev_tid) = prev_tid {
        // No preempt flag here: a preempted thread shows as still TASK_RUNNING.
        let state = prev.read::<u32>(cfg.offsets.task_state);
        switched_out(ctx, cfg, prev_tid, now, false, state, false);
    }
    if let Some(tid) = next_tid {
        switched_in(ctx, cfg, tid, cfg.target_tgid, now, true);
    }
}

#[inline(always)]
fn on_wakeup(task: impl KernelPtr) {
    let cfg = config();
    if let Some(tid) = target_tid(task, cfg) {
        mark_runnable(tid, unsafe { bpf_ktime_get_ns() });
    }
}

#[fentry(function = "finish_task_switch")]
pub fn sched_switch_fentry(ctx: FEntryContext) -> u32 {
    if bench_empty() {
        return 0;
    }
    let prev: *const u8 = unsafe { ctx.arg(0) };
    on_finish_task_switch(&ctx, Typed(prev));
    0
}

#[kprobe]
pub fn sched_switch_kprobe(ctx: ProbeContext) -> u32 {
    if bench_empty() {
        return 0;
    }
    if let Some(prev) = ctx.arg::<*const u8>(0) {
        on_finish_task_switch(&ctx, Untyped(prev as u64));
    }
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    let (preempt, prev, next, prev_state): (u8, *const u8, *const u8, u32) =
        unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3)) };
    let cfg = config();
    let prev_tid = target_tid(Typed(prev), cfg);
    on_sched_switch(&ctx, cfg, preempt != 0, prev_tid, Typed(next), prev_state);
    0
}

/// Switch-out half of the two-tracepoint flavour: the thread's stacks are left for
/// `sched_exit_btf`.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_out_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    let (preempt, prev, prev_state): (u8, *const u8, u32) =
        unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(3)) };
    let cfg = config();
    // `prev` is the current task, and reading its thread group as a typed load rather than
    // through the current-task helper was ~18 ns less per run (kernel.bpf_stats_enabled,
    // interleaved A/B): this runs on every context switch of the machine.
    if let Some(tid) = target_tid(Typed(prev), cfg) {
        let now = unsafe { bpf_ktime_get_ns() };
        switched_out(&ctx, cfg, tid, now, preempt != 0, prev_state, false);
    }
    0
}

/// Switch-in half: the end of `__schedule` (Linux 6.16+), run by the task that got the CPU.
#[btf_tracepoint(function = "sched_exit_tp")]
pub fn sched_exit_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    let is_switch: u8 = unsafe { ctx.arg(0) };
    if is_switch == 0 {
        return 0;
    }
    let cfg = config();
    if let Some(tid) = current_target_tid(cfg) {
        let now = unsafe { bpf_ktime_get_ns() };
        switched_in(&ctx, cfg, tid, cfg.target_tgid, now, true);
    }
    0
}

#[inline(always)]
unsafe fn raw_arg(ctx: &RawTracePointContext, n: usize) -> u64 {
    bpf_probe_read_kernel((ctx.as_ptr() as *const u64).add(n)).unwrap_or(0)
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_raw(ctx: RawTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    unsafe {
        let preempt = raw_arg(&ctx, 0) as u8 != 0;
        let next = Untyped(raw_arg(&ctx, 2));
        let prev_state = raw_arg(&ctx, 3) as u32;
        // An untyped `prev` would be read through a helper too: the current task's is as cheap.
        let cfg = config();
        on_sched_switch(
            &ctx,
            cfg,
            preempt,
            current_target_tid(cfg),
            next,
            prev_state,
        );
    }
    0
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    on_wakeup(Typed(unsafe { ctx.arg(0) }));
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    on_wakeup(Typed(unsafe { ctx.arg(0) }));
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn sched_wakeup_raw(ctx: RawTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    on_wakeup(Untyped(unsafe { raw_arg(&ctx, 0) }));
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup_new")]
pub fn sched_wakeup_new_raw(ctx: RawTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    on_wakeup(Untyped(unsafe { raw_arg(&ctx, 0) }));
    0
}

/// Whether the sample interrupted kernel code. Code running in user mode has no kernel stack:
/// asking for one fails, and counting that as a missing stack made most samples of a
/// CPU-bound thread look lost.
#[inline(always)]
fn interrupted_kernel(ctx: &PerfEventContext) -> bool {
    let data = ctx.as_ptr() as *const bpf_perf_event_data;
    // The low two bits of CS are the privilege level the CPU ran at; user mode is 3.
    unsafe { (*data).regs.cs & 3 == 0 }
}

#[inline(always)]
fn interrupted_address(ctx: &PerfEventContext) -> u64 {
    let data = ctx.as_ptr() as *const bpf_perf_event_data;
    unsafe { (*data).regs.rip }
}

/// The CPU time (ns of `cpu-clock`) this sample stands for. The agent lowers the sampling rate
/// while the target is calm, so samples do not all weigh the same.
#[inline(always)]
fn sample_period_ns(ctx: &PerfEventContext) -> u64 {
    let data = ctx.as_ptr() as *const bpf_perf_event_data;
    unsafe { (*data).sample_period }
}

#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    if bench_empty() {
        return 0;
    }
    let cfg = config();
    let Some(tid) = current_target_tid(cfg) else {
        return 0;
    };
    let period_ns = sample_period_ns(&ctx);
    // The kernel walk is most of a sample's cost (about three quarters here), paid while the
    // target waits on the CPU it interrupts; calm samples only feed a baseline, so they keep
    // the interrupted address instead.
    let (kernel_stack_id, kernel_address) = if !interrupted_kernel(&ctx) {
        (NO_STACK, 0)
    } else if period_ns <= cfg.kernel_stack_max_period_ns {
        (stack_id(&ctx, 0), 0)
    } else {
        (NO_STACK, interrupted_address(&ctx))
    };
    let user_stack_id = stack_id(&ctx, BPF_F_USER_STACK as u64);
    emit(|event| {
        event.kind = EventKind::OnCpuSample as u32;
        event.cpu = unsafe { bpf_get_smp_processor_id() };
        event.ts_ns = unsafe { bpf_ktime_get_ns() };
        event.duration_ns = period_ns;
        event.wait_ns = kernel_address;
        event.tid = tid;
        event.tgid = cfg.target_tgid;
        event.kernel_stack_id = kernel_stack_id;
        event.user_stack_id = user_stack_id;
    });
    0
}

#[inline(always)]
unsafe fn read_field<T: Copy>(base: u64, offset: u32) -> Result<T, i64> {
    bpf_probe_read_kernel((base as *const u8).add(offset as usize) as *const T)
}

/// Adds a request latency or run-queue wait to this CPU's timing ring. When the ring is in
/// use by the program this one interrupted, the timing goes out through the ring buffer.
#[inline(always)]
fn record_timing(kind: EventKind, tid: u32, now: u64, duration: u64) {
    let cpu = unsafe { bpf_get_smp_processor_id() };
    if kind as u32 == config().trigger_kind {
        count_latency(cpu, now, duration);
    }
    let Some(head) = TIMING_HEADS.get_ptr_mut(cpu) else {
        return emit_timing(kind, tid, now, duration);
    };
    let head = unsafe { &mut *head };
    if unsafe { core::ptr::read_volatile(&head.busy) } != 0 {
        return emit_timing(kind, tid, now, duration);
    }
    // Every access between taking and releasing `busy` is volatile: LLVM may move plain
    // stores across the volatile ones, and BPF has no compiler fence.
    unsafe { core::ptr::write_volatile(&mut head.busy, 1) };
    let written = unsafe { core::ptr::read_volatile(&head.written) };
    let bits = config().timing_ring_bits;
    let slot = (cpu << bits) | (written as u32 & ((1u32 << bits) - 1));
    if let Some(record) = TIMINGS.get_ptr_mut(slot) {
        unsafe {
            core::ptr::write_volatile(
                record,
                TimingRecord {
                    ts_ns: now,
                    duration_ns: duration,
                    tid,
                    kind: kind as u32,
                },
            );
            // After the record: the agent reads `written` first and trusts the slots below it.
            // Stores are not reordered with other stores on x86; on arm64 a reader could see
            // the count before the record, which would make the newest record stale.
            core::ptr::write_volatile(&mut head.written, written + 1);
            if kind == EventKind::RequestServed {
                let served = core::ptr::read_volatile(&head.served);
                core::ptr::write_volatile(&mut head.served, served + 1);
            }
        }
    }
    unsafe { core::ptr::write_volatile(&mut head.busy, 0) };
}

/// Counts a latency of the trigger's kind into this CPU's histogram of the slice it ended in.
/// Not guarded like the ring: a program interrupting this one on the same CPU can at worst
/// lose one count, and the trigger reads a P99 of thousands.
#[inline(always)]
fn count_latency(cpu: u32, ended_ns: u64, duration: u64) {
    let slice = (ended_ns >> config().trigger_slice_shift) + 1;
    let index = cpu * LATENCY_SLICES_PER_CPU + (slice as u32 & (LATENCY_SLICES_PER_CPU - 1));
    let Some(histogram) = LATENCY_SLICES.get_ptr_mut(index) else {
        return;
    };
    let histogram = unsafe { &mut *histogram };
    let held = unsafe { core::ptr::read_volatile(&histogram.slice) };
    if held > slice {
        // Ended so long ago that its slice's histogram has been reused: too late to count.
        return;
    }
    if held < slice {
        // The buckets and the counts after them, as whole words.
        let words = histogram.buckets.as_mut_ptr() as *mut u64;
        for i in 0..LATENCY_BUCKETS / 2 + 2 {
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
        }
        unsafe { core::ptr::write_volatile(&mut histogram.slice, slice) };
    }
    let bucket = latency_bucket(duration);
    if let Some(count) = histogram.buckets.get_mut(bucket) {
        unsafe { core::ptr::write_volatile(count, core::ptr::read_volatile(count) + 1) };
    }
    let total = unsafe { core::ptr::read_volatile(&histogram.total) } + 1;
    unsafe { core::ptr::write_volatile(&mut histogram.total, total) };
    if !matches!(LATENCY_WATCH.get(0), Some(&mark) if mark != 0 && bucket as u32 >= mark) {
        return;
    }
    let over = unsafe { core::ptr::read_volatile(&histogram.over_watch_mark) } + 1;
    unsafe { core::ptr::write_volatile(&mut histogram.over_watch_mark, over) };
    if histogram.woke == 0 && latency_rising(over, total) {
        histogram.woke = 1;
        emit_waking(|event| {
            event.kind = EventKind::LatencyRising as u32;
            event.cpu = cpu;
            event.ts_ns = ended_ns;
        });
    }
}

/// One timing as a ring-buffer record of its own, for when this CPU's timing ring is in use.
#[inline(always)]
fn emit_timing(kind: EventKind, tid: u32, now: u64, duration: u64) {
    emit(|event| {
        event.kind = kind as u32;
        event.cpu = unsafe { bpf_get_smp_processor_id() };
        event.ts_ns = now;
        event.duration_ns = duration;
        event.tid = tid;
        event.tgid = config().target_tgid;
    });
}

#[inline(always)]
fn is_target_port(port: u16) -> bool {
    let (word, bit) = port_bit(port);
    TARGET_PORTS.get(word).is_some_and(|bits| bits & bit != 0)
}

/// Whether the socket's local port is one the target listens on: a connection it accepted
/// (or the listener itself).
#[inline(always)]
fn on_target_port(sk: impl KernelPtr) -> bool {
    is_target_port(sk.read::<u16>(config().offsets.sk_num))
}

/// The slot a socket's state lives in, whoever holds it now.
#[inline(always)]
fn socket_slot(sk: impl KernelPtr) -> Option<&'static mut SocketState> {
    // Indexed by the kernel's own hash of the connection: the verifier allows no arithmetic
    // on a typed socket pointer. Fibonacci hashing spreads it over the table's bits.
    let hash: u32 = sk.read(config().offsets.sk_hash);
    let index = hash.wrapping_mul(0x9e37_79b9) >> (32 - SOCKET_SLOT_BITS);
    SOCKETS.get_ptr_mut(index).map(|slot| unsafe { &mut *slot })
}

/// The socket's state, if its slot holds it.
#[inline(always)]
fn socket_state(sk: impl KernelPtr) -> Option<&'static mut SocketState> {
    socket_slot(sk).filter(|slot| slot.sk == sk.addr())
}

/// Request bytes arrived (softirq): start timing unless a request is already waiting.
#[inline(always)]
fn on_data_ready(sk: impl KernelPtr) {
    if !on_target_port(sk) {
        return;
    }
    let Some(socket) = socket_slot(sk) else {
        return;
    };
    if socket.sk != sk.addr() {
        // A listener's sk_data_ready runs once per connection it queues for accept. It carries
        // no request, and taking the slot would leave a connection's waiting request untimed.
        // Checked only here, where a socket takes a slot, to keep the load off every arrival.
        if sk.read::<u8>(config().offsets.sk_state) == TCP_LISTEN {
            return;
        }
        // First arrival since attach on this connection, or the slot's other connection had it.
        if socket.sk != 0 && socket.stage != IDLE {
            count(Counter::RequestsUntimed);
        }
        // The tag before the arrival time (both volatile, so they stay in that order): a send on
        // another CPU that read the old tag re-reads it after the arrival time and sees that
        // the slot was taken.
        unsafe { core::ptr::write_volatile(&mut socket.sk, sk.addr()) };
        socket.stage = IDLE;
    }
    let Some(tcp) = sk.tcp_sock() else {
        return;
    };
    // The peer acknowledged the answer to the waiting request before sending this: that
    // request ends here (when the write hook is not attached, this is where requests end).
    served_if_acked(tcp, socket);
    // More bytes of a request not yet answered: it started at its first bytes.
    if socket.stage != WAITING {
        let offsets = &config().offsets;
        // TCP read the clock as it began on this segment, a microsecond or two before it
        // called sk_data_ready: reading its cache spares a clock read on every request.
        let arrived_ns = match offsets.tcp_clock_cache {
            0 => unsafe { bpf_ktime_get_ns() },
            offset => tcp.read(offset),
        };
        unsafe { core::ptr::write_volatile(&mut socket.arrived_ns, arrived_ns) };
        socket.request_write_seq = tcp.read(offsets.tcp_write_seq);
        socket.stage = WAITING;
    }
}

/// If the peer has acknowledged data the server sent after the waiting request arrived, the
/// request was answered: it ends when the last acknowledged segment was sent, which the kernel
/// keeps for loss detection (`tcp_sock.rack.mstamp`, in µs).
#[inline(always)]
fn served_if_acked(tcp: impl KernelPtr, socket: &mut SocketState) {
    if socket.stage != WAITING {
        return;
    }
    let offsets = &config().offsets;
    let snd_una: u32 = tcp.read(offsets.tcp_snd_una);
    if (snd_una.wrapping_sub(socket.request_write_seq) as i32) <= 0 {
        return;
    }
    let sent_us: u64 = tcp.read(offsets.tcp_rack_mstamp);
    let sent_ns = sent_us * 1000;
    let arrived_ns = socket.arrived_ns;
    socket.stage = IDLE;
    // A segment sent before the request arrived (the answer to an earlier one) is not this
    // request's answer: the request is left untimed rather than timed wrongly.
    if sent_ns + 1000 < arrived_ns {
        count(Counter::RequestsUntimed);
        return;
    }
    record_timing(
        EventKind::RequestServed,
        0,
        sent_ns,
        sent_ns.saturating_sub(arrived_ns),
    );
}

/// The target sent on a socket: answer the request waiting on it, or remember an outbound
/// connection of the target. Attached only while the request rate is low, or for delivery
/// latency (see the agent's `request_end`); otherwise the arrival and state hooks end requests.
#[inline(always)]
fn on_send(sk: impl KernelPtr, sent: i32) {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != cfg.target_tgid {
        return;
    }
    if !on_target_port(sk) {
        learn_outbound(sk);
        return;
    }
    let Some(socket) = socket_state(sk) else {
        return;
    };
    if sent <= 0 || socket.stage != WAITING {
        return;
    }
    let Some(tcp) = sk.tcp_sock() else {
        return;
    };
    // Nothing sent since the waiting request arrived: this write's bytes went out before it,
    // and the arrival hook has already ended the request they answered.
    let write_seq: u32 = tcp.read(cfg.offsets.tcp_write_seq);
    if (write_seq.wrapping_sub(socket.request_write_seq) as i32) <= 0 {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let arrived_ns = unsafe { core::ptr::read_volatile(&socket.arrived_ns) };
    // Another connection's arrival may have taken the slot meanwhile (on another CPU).
    if unsafe { core::ptr::read_volatile(&socket.sk) } != sk.addr() {
        return;
    }
    record_timing(
        EventKind::RequestServed,
        pid_tgid as u32,
        now,
        now.saturating_sub(arrived_ns),
    );
    if cfg.track_delivery == 0 {
        socket.stage = IDLE;
        return;
    }
    socket.stage = ANSWERED;
    socket.response_end_seq = write_seq;
    // On loopback the peer's ACK can be processed before sendmsg returns here.
    deliver_if_acked(tcp, socket);
}

#[inline(always)]
fn learn_outbound_of_current(sk: impl KernelPtr) {
    if (bpf_get_current_pid_tgid() >> 32) as u32 == config().target_tgid {
        learn_outbound(sk);
    }
}

#[inline(always)]
fn learn_outbound(sk: impl KernelPtr) {
    let key = sk.addr();
    if unsafe { OUTBOUND.get(&key) }.is_some() {
        return;
    }
    if matches!(
        sk.read::<u16>(config().offsets.sk_family),
        AF_INET | AF_INET6
    ) {
        let _ = OUTBOUND.insert(&key, &0, 0);
    }
}

/// Every incoming segment on an established socket, before its ACK is processed: when it
/// acknowledges the whole response, the response was delivered. Attached only when delivery
/// latency is tracked: it runs for every segment on the machine.
#[inline(always)]
fn on_tcp_probe(sk: impl KernelPtr, skb: u64) -> Result<(), i64> {
    if !on_target_port(sk) {
        return Ok(());
    }
    let Some(socket) = socket_state(sk) else {
        return Ok(());
    };
    if socket.stage != ANSWERED {
        return Ok(());
    }
    let cfg = config();
    let ack_seq = unsafe {
        let data: u64 = read_field(skb, cfg.offsets.skb_data)?;
        // tcphdr.ack_seq, network byte order.
        u32::from_be(read_field::<u32>(data, 8)?)
    };
    if (ack_seq.wrapping_sub(socket.response_end_seq) as i32) >= 0 {
        delivered(socket);
    }
    Ok(())
}

#[inline(always)]
fn delivered(socket: &mut SocketState) {
    let now = unsafe { bpf_ktime_get_ns() };
    record_timing(
        EventKind::RequestDelivered,
        0,
        now,
        now.saturating_sub(socket.arrived_ns),
    );
    socket.stage = IDLE;
}

/// If the peer has acknowledged the whole answered response (by `snd_una`, whatever path
/// the ACK took), the response is delivered: now, or earlier than now.
#[inline(always)]
fn deliver_if_acked(tcp: impl KernelPtr, socket: &mut SocketState) {
    if socket.stage != ANSWERED {
        return;
    }
    let snd_una: u32 = tcp.read(config().offsets.tcp_snd_una);
    if (snd_una.wrapping_sub(socket.response_end_seq) as i32) >= 0 {
        delivered(socket);
    }
}

#[inline(always)]
fn on_set_state(sk: impl KernelPtr, new_state: i32) {
    if !on_target_port(sk) {
        if new_state == TCP_CLOSE {
            let _ = OUTBOUND.remove(&sk.addr());
        } else if new_state == TCP_SYN_SENT {
            // connect(), in the calling task.
            learn_outbound_of_current(sk);
        }
        return;
    }
    // ACKs after the server starts closing never reach tcp_probe (it fires in ESTABLISHED
    // only); a response followed by a close is delivered by the time the state moves on. The
    // peer's FIN (or the ACK of the server's) also ends a request answered just before.
    if let Some(socket) = socket_state(sk) {
        if let Some(tcp) = sk.tcp_sock() {
            served_if_acked(tcp, socket);
            deliver_if_acked(tcp, socket);
        }
        if new_state == TCP_CLOSE {
            socket.sk = 0;
            socket.stage = IDLE;
        }
    }
}

#[inline(always)]
fn on_retransmit(sk: u64) -> Result<(), i64> {
    let cfg = config();
    let o = &cfg.offsets;
    let local_port: u16 = unsafe { read_field(sk, o.sk_num)? };
    if !is_target_port(local_port) && unsafe { OUTBOUND.get(&sk) }.is_none() {
        return Ok(());
    }
    let (state, family, remote_port) = unsafe {
        (
            read_field::<u8>(sk, o.sk_state)? as u32,
            read_field::<u16>(sk, o.sk_family)?,
            u16::from_be(read_field(sk, o.sk_dport)?),
        )
    };
    let (mut local_addr, mut remote_addr) = ([0u8; 16], [0u8; 16]);
    unsafe {
        if family == AF_INET6 {
            local_addr = read_field(sk, o.sk_v6_rcv_saddr)?;
            remote_addr = read_field(sk, o.sk_v6_daddr)?;
        } else {
            let local: [u8; 4] = read_field(sk, o.sk_rcv_saddr)?;
            let remote: [u8; 4] = read_field(sk, o.sk_daddr)?;
            local_addr[..4].copy_from_slice(&local);
            remote_addr[..4].copy_from_slice(&remote);
        }
    }
    emit(|event| {
        event.kind = EventKind::TcpRetransmit as u32;
        event.cpu = unsafe { bpf_get_smp_processor_id() };
        event.ts_ns = unsafe { bpf_ktime_get_ns() };
        event.tgid = cfg.target_tgid;
        event.state = state;
        event.family = family;
        event.local_port = local_port;
        event.remote_port = remote_port;
        event.local_addr = local_addr;
        event.remote_addr = remote_addr;
    });
    Ok(())
}

// Socket hooks: BTF-typed tracepoints (no trace-event marshalling, unlike the classic ones),
// with raw tracepoints as the fallback. Arguments as in the kernel's trace_* prototypes.

#[btf_tracepoint(function = "sk_data_ready")]
pub fn sk_data_ready_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    on_data_ready(Typed(unsafe { ctx.arg(0) }));
    0
}

#[raw_tracepoint(tracepoint = "sk_data_ready")]
pub fn sk_data_ready_raw(ctx: RawTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    on_data_ready(Untyped(unsafe { raw_arg(&ctx, 0) }));
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    let (sk, ret): (*const u8, u64) = unsafe { (ctx.arg(0), ctx.arg(1)) };
    on_send(Typed(sk), ret as i32);
    0
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length_raw(ctx: RawTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    unsafe { on_send(Untyped(raw_arg(&ctx, 0)), raw_arg(&ctx, 1) as i32) };
    0
}

#[btf_tracepoint(function = "tcp_probe")]
pub fn tcp_probe_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    let (sk, skb): (*const u8, u64) = unsafe { (ctx.arg(0), ctx.arg(1)) };
    let _ = on_tcp_probe(Typed(sk), skb);
    0
}

#[raw_tracepoint(tracepoint = "tcp_probe")]
pub fn tcp_probe_raw(ctx: RawTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    let _ = unsafe { on_tcp_probe(Untyped(raw_arg(&ctx, 0)), raw_arg(&ctx, 1)) };
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    let (sk, new_state): (*const u8, u64) = unsafe { (ctx.arg(0), ctx.arg(2)) };
    on_set_state(Typed(sk), new_state as i32);
    0
}

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_raw(ctx: RawTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    unsafe { on_set_state(Untyped(raw_arg(&ctx, 0)), raw_arg(&ctx, 2) as i32) };
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_btf(ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    let _ = on_retransmit(unsafe { ctx.arg::<u64>(0) });
    0
}

#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb_raw(ctx: RawTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    let _ = on_retransmit(unsafe { raw_arg(&ctx, 0) });
    0
}

/// Benchmarks only: one event per system call of the target, the cheapest way to make the
/// kernel produce millions of events per second and measure what the agent drains.
#[btf_tracepoint(function = "sys_enter")]
pub fn synthetic_sys_enter(_ctx: BtfTracePointContext) -> i32 {
    if bench_empty() {
        return 0;
    }
    emit_if_current_is_target(EventKind::Synthetic, 0);
    0
}

/// An event of `kind` (with `state`) when the current task belongs to the target.
#[inline(always)]
fn emit_if_current_is_target(kind: EventKind, state: u32) {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != cfg.target_tgid {
        return;
    }
    emit(|event| {
        event.kind = kind as u32;
        event.cpu = unsafe { bpf_get_smp_processor_id() };
        event.ts_ns = unsafe { bpf_ktime_get_ns() };
        event.tid = pid_tgid as u32;
        event.tgid = cfg.target_tgid;
        event.state = state;
    });
}

/// Entry of a Go runtime function in the target. Entry probes only: Go moves goroutine stacks,
/// which breaks the return trampolines uretprobes rely on.
#[inline(always)]
fn go_runtime_entered(which: u32) {
    emit_if_current_is_target(EventKind::GoRuntime, which);
}

#[uprobe]
pub fn go_stop_the_world(_ctx: ProbeContext) -> u32 {
    if bench_empty() {
        return 0;
    }
    go_runtime_entered(GO_STOP_THE_WORLD);
    0
}

#[uprobe]
pub fn go_start_the_world(_ctx: ProbeContext) -> u32 {
    if bench_empty() {
        return 0;
    }
    go_runtime_entered(GO_START_THE_WORLD);
    0
}

#[uprobe]
pub fn go_gc_start(_ctx: ProbeContext) -> u32 {
    if bench_empty() {
        return 0;
    }
    go_runtime_entered(GO_GC_START);
    0
}

#[uprobe]
pub fn go_gc_mark_termination(_ctx: ProbeContext) -> u32 {
    if bench_empty() {
        return 0;
    }
    go_runtime_entered(GO_GC_MARK_TERMINATION);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
