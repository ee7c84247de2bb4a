//! Kernel programs of p99probe. They only observe one target thread group, keep per-thread
//! interval state, and write fixed-size events; every analysis happens in user space.
//!
//! Scheduler hooks come in two flavours because the agent picks one at run time:
//! - at `sched_switch` (tp_btf, raw_tp) the current task is `prev`, so the off-CPU stack is
//!   captured when the thread leaves the CPU;
//! - at `finish_task_switch` (fentry, kprobe) the current task is `next`, so the stack is
//!   captured when the thread comes back, which is the same user stack it blocked in.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, fentry, kprobe, map, perf_event, raw_tracepoint, tracepoint, uprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, StackTrace},
    programs::{
        BtfTracePointContext, FEntryContext, PerfEventContext, ProbeContext, RawTracePointContext,
        TracePointContext,
    },
    EbpfContext,
};
use aya_log_ebpf::warn;
use probe_common::{
    Counter, EventKind, ProbeConfig, RawEvent, COUNTER_SLOTS, FLAG_PREEMPTED,
    GO_GC_MARK_TERMINATION, GO_GC_START, GO_START_THE_WORLD, GO_STOP_THE_WORLD, NO_STACK,
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
        skb_data: 0,
        _pad: 0,
    },
};

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// tid → when the thread became runnable (woken, or preempted while still runnable).
#[map]
static RUNNABLE_SINCE: HashMap<u32, u64> = HashMap::with_max_entries(65536, 0);

/// tid → when and where the thread left the CPU.
#[map]
static OFFCPU_SINCE: HashMap<u32, SwitchedOut> = HashMap::with_max_entries(65536, 0);

/// Socket pointers the target has sent or received on; retransmits run in softirq or timer
/// context, so the current task says nothing about who owns the socket.
#[map]
static TARGET_SOCKETS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// Local ports the target listens on, seeded by the agent from /proc (catches sockets that
/// have not sent anything since attach).
#[map]
static TARGET_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// sk → the request in flight on it: when its bytes arrived, and once answered, the sequence
/// number the peer must acknowledge for the response to be delivered.
#[map]
static REQUESTS: LruHashMap<u64, InFlight> = LruHashMap::with_max_entries(65536, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct InFlight {
    arrived_ns: u64,
    /// 0 until the response is written.
    answered: u32,
    response_end_seq: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SwitchedOut {
    ts_ns: u64,
    kernel_stack_id: i32,
    user_stack_id: i32,
    state: u32,
    flags: u32,
}

const TASK_RUNNING: u32 = 0;
const TASK_DEAD: u32 = 0x80;
const TCP_ESTABLISHED: i32 = 1;
const TCP_CLOSE: i32 = 7;

#[inline(always)]
fn config() -> ProbeConfig {
    // Volatile: the loader rewrites this global; the compiler must not fold the zeroes.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        unsafe { *slot += 1 };
    }
}

/// Unread bytes in the ring buffer before an event wakes the agent. Below it the agent is not
/// woken per event (each wakeup costs it a context switch) but drains on its own timer.
const WAKEUP_AT_BYTES: u64 = 512 * 1024;

#[inline(always)]
fn emit(event: &RawEvent) {
    match EVENTS.reserve::<RawEvent>(0) {
        Some(mut entry) => {
            entry.write(*event);
            let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_AT_BYTES {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            };
            entry.submit(flags as u64);
            count(Counter::EventsSent);
        }
        None => count(Counter::RingBufferFull),
    }
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

#[inline(always)]
unsafe fn read_task_u32(task: *const u8, offset: u32) -> u32 {
    bpf_probe_read_kernel(task.add(offset as usize) as *const u32).unwrap_or(0)
}

/// (tid, tgid) of a task pointer.
#[inline(always)]
unsafe fn task_ids(task: *const u8, cfg: &ProbeConfig) -> (u32, u32) {
    (
        read_task_u32(task, cfg.offsets.task_pid),
        read_task_u32(task, cfg.offsets.task_tgid),
    )
}

#[inline(always)]
fn mark_runnable(tid: u32, now: u64) {
    if RUNNABLE_SINCE.insert(&tid, &now, 0).is_err() {
        count(Counter::StateMapFull);
    }
}

/// A target thread leaves the CPU. `ctx` is only used for stacks when the thread is current.
#[inline(always)]
fn switched_out<C: EbpfContext>(
    ctx: &C,
    tid: u32,
    now: u64,
    runnable: bool,
    state: u32,
    thread_is_current: bool,
) {
    if state & TASK_DEAD != 0 {
        let _ = RUNNABLE_SINCE.remove(&tid);
        let _ = OFFCPU_SINCE.remove(&tid);
        return;
    }
    if runnable {
        mark_runnable(tid, now);
    }
    let (kernel_stack_id, user_stack_id) = if thread_is_current {
        (stack_id(ctx, 0), stack_id(ctx, BPF_F_USER_STACK as u64))
    } else {
        (NO_STACK, NO_STACK)
    };
    let out = SwitchedOut {
        ts_ns: now,
        kernel_stack_id,
        user_stack_id,
        state,
        flags: if runnable { FLAG_PREEMPTED } else { 0 },
    };
    if OFFCPU_SINCE.insert(&tid, &out, 0).is_err() {
        count(Counter::StateMapFull);
    }
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
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let mut waited = 0;
    if let Some(since) = unsafe { RUNNABLE_SINCE.get(&tid) } {
        let since = *since;
        let _ = RUNNABLE_SINCE.remove(&tid);
        if now > since {
            waited = now - since;
            let mut event = RawEvent::zeroed();
            event.kind = EventKind::RunQueue as u32;
            event.cpu = cpu;
            event.ts_ns = now;
            event.duration_ns = now - since;
            event.tid = tid;
            event.tgid = tgid;
            emit(&event);
        }
    }
    if let Some(out) = unsafe { OFFCPU_SINCE.get(&tid) } {
        let out = *out;
        let _ = OFFCPU_SINCE.remove(&tid);
        let duration = now.saturating_sub(out.ts_ns);
        if duration < cfg.min_offcpu_ns {
            return;
        }
        let mut event = RawEvent::zeroed();
        event.kind = EventKind::OffCpu as u32;
        event.cpu = cpu;
        event.ts_ns = now;
        event.duration_ns = duration;
        event.wait_ns = if waited < duration { waited } else { duration };
        event.tid = tid;
        event.tgid = tgid;
        event.state = out.state;
        event.flags = out.flags;
        if thread_is_current {
            event.kernel_stack_id = stack_id(ctx, 0);
            event.user_stack_id = stack_id(ctx, BPF_F_USER_STACK as u64);
        } else {
            event.kernel_stack_id = out.kernel_stack_id;
            event.user_stack_id = out.user_stack_id;
        }
        if cfg.debug != 0 && event.user_stack_id == NO_STACK {
            warn!(ctx, "off-CPU interval of tid {} has no user stack", tid);
        }
        emit(&event);
    }
}

/// `sched_switch` flavour: current == prev.
#[inline(always)]
fn on_sched_switch<C: EbpfContext>(
    ctx: &C,
    preempt: bool,
    prev: *const u8,
    next: *const u8,
    prev_state: u32,
) {
    let cfg = config();
    let now = unsafe { bpf_ktime_get_ns() };
    let (prev_tid, prev_tgid) = unsafe { task_ids(prev, &cfg) };
    if prev_tgid == cfg.target_tgid && prev_tid != 0 {
        let runnable = preempt || prev_state == TASK_RUNNING;
        switched_out(ctx, prev_tid, now, runnable, prev_state, true);
    }
    let (next_tid, next_tgid) = unsafe { task_ids(next, &cfg) };
    if next_tgid == cfg.target_tgid && next_tid != 0 {
        switched_in(ctx, &cfg, next_tid, next_tgid, now, false);
    }
}

/// `finish_task_switch` flavour: current == next, `prev` has just left.
#[inline(always)]
fn on_finish_task_switch<C: EbpfContext>(ctx: &C, prev: *const u8) {
    let cfg = config();
    let now = unsafe { bpf_ktime_get_ns() };
    let (prev_tid, prev_tgid) = unsafe { task_ids(prev, &cfg) };
    if prev_tgid == cfg.target_tgid && prev_tid != 0 {
        let state = unsafe { read_task_u32(prev, cfg.offsets.task_state) };
        switched_out(ctx, prev_tid, now, state == TASK_RUNNING, state, false);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    if tgid == cfg.target_tgid && tid != 0 {
        switched_in(ctx, &cfg, tid, tgid, now, true);
    }
}

#[inline(always)]
fn on_wakeup(task: *const u8) {
    let cfg = config();
    let (tid, tgid) = unsafe { task_ids(task, &cfg) };
    if tgid == cfg.target_tgid && tid != 0 {
        mark_runnable(tid, unsafe { bpf_ktime_get_ns() });
    }
}

#[fentry(function = "finish_task_switch")]
pub fn sched_switch_fentry(ctx: FEntryContext) -> u32 {
    let prev: *const u8 = unsafe { ctx.arg(0) };
    on_finish_task_switch(&ctx, prev);
    0
}

#[kprobe]
pub fn sched_switch_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(prev) = ctx.arg::<*const u8>(0) {
        on_finish_task_switch(&ctx, prev);
    }
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch_btf(ctx: BtfTracePointContext) -> i32 {
    let (preempt, prev, next, prev_state): (u8, *const u8, *const u8, u32) =
        unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3)) };
    on_sched_switch(&ctx, preempt != 0, prev, next, prev_state);
    0
}

#[inline(always)]
unsafe fn raw_arg(ctx: &RawTracePointContext, n: usize) -> u64 {
    bpf_probe_read_kernel((ctx.as_ptr() as *const u64).add(n)).unwrap_or(0)
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_raw(ctx: RawTracePointContext) -> i32 {
    unsafe {
        let preempt = raw_arg(&ctx, 0) as u8 != 0;
        let prev = raw_arg(&ctx, 1) as *const u8;
        let next = raw_arg(&ctx, 2) as *const u8;
        let prev_state = raw_arg(&ctx, 3) as u32;
        on_sched_switch(&ctx, preempt, prev, next, prev_state);
    }
    0
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup_btf(ctx: BtfTracePointContext) -> i32 {
    on_wakeup(unsafe { ctx.arg(0) });
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new_btf(ctx: BtfTracePointContext) -> i32 {
    on_wakeup(unsafe { ctx.arg(0) });
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn sched_wakeup_raw(ctx: RawTracePointContext) -> i32 {
    on_wakeup(unsafe { raw_arg(&ctx, 0) } as *const u8);
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup_new")]
pub fn sched_wakeup_new_raw(ctx: RawTracePointContext) -> i32 {
    on_wakeup(unsafe { raw_arg(&ctx, 0) } as *const u8);
    0
}

#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
    if tgid != cfg.target_tgid || tid == 0 {
        return 0;
    }
    let mut event = RawEvent::zeroed();
    event.kind = EventKind::OnCpuSample as u32;
    event.cpu = unsafe { bpf_get_smp_processor_id() };
    event.ts_ns = unsafe { bpf_ktime_get_ns() };
    event.tid = tid;
    event.tgid = tgid;
    event.kernel_stack_id = stack_id(&ctx, 0);
    event.user_stack_id = stack_id(&ctx, BPF_F_USER_STACK as u64);
    emit(&event);
    0
}

// Field offsets of the classic tracepoints, from their tracefs `format` files; the agent checks
// them against the running kernel before attaching.
mod tp {
    pub const SOCK_LENGTH_SK: usize = 8;
    pub const SOCK_LENGTH_RET: usize = 20;
    pub const SET_STATE_SKADDR: usize = 8;
    pub const SET_STATE_NEWSTATE: usize = 20;
    pub const SET_STATE_SPORT: usize = 24;
    pub const DATA_READY_SKADDR: usize = 8;
    pub const PROBE_SKBADDR: usize = 120;
    pub const PROBE_SKADDR: usize = 128;
    pub const RETRANS_SKADDR: usize = 16;
    pub const RETRANS_STATE: usize = 24;
    pub const RETRANS_SPORT: usize = 28;
    pub const RETRANS_DPORT: usize = 30;
    pub const RETRANS_FAMILY: usize = 32;
    pub const RETRANS_SADDR: usize = 34;
    pub const RETRANS_DADDR: usize = 38;
    pub const RETRANS_SADDR_V6: usize = 42;
    pub const RETRANS_DADDR_V6: usize = 58;
}

#[inline(always)]
fn is_target_socket(sk: u64) -> bool {
    unsafe { TARGET_SOCKETS.get(&sk).is_some() }
}

#[inline(always)]
fn emit_request(kind: EventKind, tid: u32, now: u64, latency: u64) {
    let mut event = RawEvent::zeroed();
    event.kind = kind as u32;
    event.cpu = unsafe { bpf_get_smp_processor_id() };
    event.ts_ns = now;
    event.duration_ns = latency;
    event.tid = tid;
    event.tgid = config().target_tgid;
    emit(&event);
}

/// Request bytes arrived (softirq): start timing unless a request is already waiting.
#[tracepoint(category = "sock", name = "sk_data_ready")]
pub fn sk_data_ready(ctx: TracePointContext) -> u32 {
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(tp::DATA_READY_SKADDR) }) else {
        return 0;
    };
    if !is_target_socket(sk) {
        return 0;
    }
    if let Some(inflight) = REQUESTS.get_ptr_mut(&sk) {
        // More bytes of a request not yet answered: it started at its first bytes.
        if unsafe { (*inflight).answered } == 0 {
            return 0;
        }
    }
    let inflight = InFlight {
        arrived_ns: unsafe { bpf_ktime_get_ns() },
        answered: 0,
        response_end_seq: 0,
    };
    let _ = REQUESTS.insert(&sk, &inflight, 0);
    0
}

/// The target sent on a socket: learn the socket, and answer the request waiting on it.
#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != cfg.target_tgid {
        return 0;
    }
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(tp::SOCK_LENGTH_SK) }) else {
        return 0;
    };
    let _ = TARGET_SOCKETS.insert(&sk, &1, 0);
    let sent = unsafe { ctx.read_at::<i32>(tp::SOCK_LENGTH_RET) }.unwrap_or(0);
    if sent <= 0 {
        return 0;
    }
    if let Some(inflight) = REQUESTS.get_ptr_mut(&sk) {
        let inflight = unsafe { &mut *inflight };
        if inflight.answered == 0 {
            let now = unsafe { bpf_ktime_get_ns() };
            emit_request(
                EventKind::RequestServed,
                pid_tgid as u32,
                now,
                now.saturating_sub(inflight.arrived_ns),
            );
            let write_seq = unsafe {
                bpf_probe_read_kernel(
                    (sk as *const u8).add(cfg.offsets.tcp_write_seq as usize) as *const u32
                )
            };
            match write_seq {
                Ok(seq) => {
                    inflight.answered = 1;
                    inflight.response_end_seq = seq;
                }
                Err(_) => {
                    let _ = REQUESTS.remove(&sk);
                }
            }
        }
    }
    0
}

#[tracepoint(category = "sock", name = "sock_recv_length")]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    if (bpf_get_current_pid_tgid() >> 32) as u32 == config().target_tgid {
        if let Ok(sk) = unsafe { ctx.read_at::<u64>(tp::SOCK_LENGTH_SK) } {
            let _ = TARGET_SOCKETS.insert(&sk, &1, 0);
        }
    }
    0
}

/// Every incoming segment on an established socket, before its ACK is processed: when it
/// acknowledges the whole response, the response was delivered.
#[tracepoint(category = "tcp", name = "tcp_probe")]
pub fn tcp_probe(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_probe(&ctx);
    0
}

fn try_tcp_probe(ctx: &TracePointContext) -> Result<(), i64> {
    let sk: u64 = unsafe { ctx.read_at(tp::PROBE_SKADDR)? };
    let Some(inflight) = REQUESTS.get_ptr_mut(&sk) else {
        return Ok(());
    };
    let inflight = unsafe { *inflight };
    if inflight.answered == 0 {
        return Ok(());
    }
    let cfg = config();
    let ack_seq = unsafe {
        let skb: u64 = ctx.read_at(tp::PROBE_SKBADDR)?;
        let data: u64 = bpf_probe_read_kernel(
            (skb as *const u8).add(cfg.offsets.skb_data as usize) as *const u64,
        )?;
        // tcphdr.ack_seq, network byte order.
        u32::from_be(bpf_probe_read_kernel(
            (data as *const u8).add(8) as *const u32
        )?)
    };
    if (ack_seq.wrapping_sub(inflight.response_end_seq) as i32) >= 0 {
        let now = unsafe { bpf_ktime_get_ns() };
        emit_request(
            EventKind::RequestDelivered,
            0,
            now,
            now.saturating_sub(inflight.arrived_ns),
        );
        let _ = REQUESTS.remove(&sk);
    }
    Ok(())
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    unsafe {
        let (Ok(sk), Ok(state)) = (
            ctx.read_at::<u64>(tp::SET_STATE_SKADDR),
            ctx.read_at::<i32>(tp::SET_STATE_NEWSTATE),
        ) else {
            return 0;
        };
        if state == TCP_CLOSE {
            let _ = TARGET_SOCKETS.remove(&sk);
            let _ = REQUESTS.remove(&sk);
        } else if state == TCP_ESTABLISHED {
            // A connection accepted on one of the target's listening ports is the target's
            // from its first byte, before the target has touched it.
            if let Ok(sport) = ctx.read_at::<u16>(tp::SET_STATE_SPORT) {
                if TARGET_PORTS.get(&sport).is_some() {
                    let _ = TARGET_SOCKETS.insert(&sk, &1, 0);
                }
            }
        }
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let _ = try_tcp_retransmit(&ctx);
    0
}

fn try_tcp_retransmit(ctx: &TracePointContext) -> Result<(), i64> {
    let cfg = config();
    unsafe {
        let sk: u64 = ctx.read_at(tp::RETRANS_SKADDR)?;
        let sport: u16 = ctx.read_at(tp::RETRANS_SPORT)?;
        if TARGET_SOCKETS.get(&sk).is_none() && TARGET_PORTS.get(&sport).is_none() {
            return Ok(());
        }
        let mut event = RawEvent::zeroed();
        event.kind = EventKind::TcpRetransmit as u32;
        event.cpu = bpf_get_smp_processor_id();
        event.ts_ns = bpf_ktime_get_ns();
        event.tgid = cfg.target_tgid;
        event.state = ctx.read_at::<i32>(tp::RETRANS_STATE)? as u32;
        event.family = ctx.read_at(tp::RETRANS_FAMILY)?;
        event.local_port = sport;
        event.remote_port = ctx.read_at(tp::RETRANS_DPORT)?;
        if event.family == 2 {
            let local: [u8; 4] = ctx.read_at(tp::RETRANS_SADDR)?;
            let remote: [u8; 4] = ctx.read_at(tp::RETRANS_DADDR)?;
            event.local_addr[..4].copy_from_slice(&local);
            event.remote_addr[..4].copy_from_slice(&remote);
        } else {
            event.local_addr = ctx.read_at(tp::RETRANS_SADDR_V6)?;
            event.remote_addr = ctx.read_at(tp::RETRANS_DADDR_V6)?;
        }
        emit(&event);
    }
    Ok(())
}

/// Entry of a Go runtime function in the target. Entry probes only: Go moves goroutine stacks,
/// which breaks the return trampolines uretprobes rely on.
#[inline(always)]
fn go_runtime_entered(which: u32) {
    let cfg = config();
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != cfg.target_tgid {
        return;
    }
    let mut event = RawEvent::zeroed();
    event.kind = EventKind::GoRuntime as u32;
    event.cpu = unsafe { bpf_get_smp_processor_id() };
    event.ts_ns = unsafe { bpf_ktime_get_ns() };
    event.tid = pid_tgid as u32;
    event.tgid = cfg.target_tgid;
    event.state = which;
    emit(&event);
}

#[uprobe]
pub fn go_stop_the_world(_ctx: ProbeContext) -> u32 {
    go_runtime_entered(GO_STOP_THE_WORLD);
    0
}

#[uprobe]
pub fn go_start_the_world(_ctx: ProbeContext) -> u32 {
    go_runtime_entered(GO_START_THE_WORLD);
    0
}

#[uprobe]
pub fn go_gc_start(_ctx: ProbeContext) -> u32 {
    go_runtime_entered(GO_GC_START);
    0
}

#[uprobe]
pub fn go_gc_mark_termination(_ctx: ProbeContext) -> u32 {
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
