//! Loading the kernel programs and attaching them to one target, with the scheduler hook chosen
//! at run time from a fallback chain and the choice reported.

use std::collections::BTreeSet;
use std::fmt;

use aya::{
    maps::Array,
    programs::{
        perf_event::{PerfEventLinkId, PerfEventScope, PerfTypeId, SamplePolicy},
        raw_trace_point::RawTracePointLinkId,
        tp_btf::BtfTracePointLinkId,
        BtfTracePoint, FEntry, KProbe, PerfEvent, RawTracePoint, UProbe,
    },
    Btf, Ebpf, EbpfLoader,
};
use probe_common::{port_bit, KernelOffsets, ProbeConfig, LATENCY_SLICES_PER_CPU};
use serde::{Deserialize, Serialize};

use crate::btf::KernelBtf;
use crate::error::ProbeError;
use crate::latency_slices::{self, LatencySlices};
use crate::listeners::Listeners;
use crate::own_cost::ProgramRuns;
use crate::request_end::WriteHookPolicy;
use crate::sampling::full_period_ns;
use crate::target;
use crate::thread_table::ThreadTable;
use crate::timing_rings::{ring_bits, TimingRings};

/// The compiled kernel programs, built by `build.rs` from `probe-ebpf`.
static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"));

/// Ways to observe context switches, in the order they are tried: cheapest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SchedHook {
    /// fentry on finish_task_switch: a direct call, no tracepoint argument marshalling.
    Fentry,
    /// kprobe on finish_task_switch (its kallsyms name, often a .isra clone).
    Kprobe,
    /// BTF-typed sched_switch for the switch-out and sched_exit_tp (the end of __schedule,
    /// Linux 6.16+) for the switch-in, where the thread is current again: as with
    /// finish_task_switch, stacks are walked only for intervals long enough to report.
    TpBtfExit,
    /// BTF-typed sched_switch alone: stacks are walked as the target's thread leaves the CPU,
    /// unless it blocks where it keeps blocking, before the interval's length is known.
    TpBtf,
    /// Raw sched_switch tracepoint: works wherever BPF raw tracepoints do.
    RawTp,
}

impl SchedHook {
    pub const CHAIN: [SchedHook; 5] = [
        SchedHook::Fentry,
        SchedHook::Kprobe,
        SchedHook::TpBtfExit,
        SchedHook::TpBtf,
        SchedHook::RawTp,
    ];

    fn program(self) -> &'static str {
        match self {
            SchedHook::Fentry => "sched_switch_fentry",
            SchedHook::Kprobe => "sched_switch_kprobe",
            SchedHook::TpBtfExit => "sched_switch_out_btf",
            SchedHook::TpBtf => "sched_switch_btf",
            SchedHook::RawTp => "sched_switch_raw",
        }
    }

    /// Whether the thread's stacks are walked as it leaves the CPU and kept in its kernel state
    /// until it returns (the other hooks walk them on its return, into the event itself).
    pub fn holds_stacks_while_off_cpu(self) -> bool {
        matches!(self, SchedHook::TpBtf | SchedHook::RawTp)
    }
}

impl fmt::Display for SchedHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SchedHook::Fentry => "fentry/finish_task_switch",
            SchedHook::Kprobe => "kprobe/finish_task_switch",
            SchedHook::TpBtfExit => "tp_btf/sched_switch+sched_exit_tp",
            SchedHook::TpBtf => "tp_btf/sched_switch",
            SchedHook::RawTp => "raw_tp/sched_switch",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookAttempt {
    pub hook: String,
    /// `None` when it attached.
    pub error: Option<String>,
}

/// Which hooks are live, and why the ones before them in the chain are not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachReport {
    pub scheduler: String,
    pub scheduler_attempts: Vec<HookAttempt>,
    pub wakeup: String,
    pub sampling: String,
    pub tcp: Vec<String>,
    /// Present for Go targets.
    #[serde(default)]
    pub go: Option<crate::goruntime::GoInfo>,
    /// Present when benchmark events were asked for.
    #[serde(default)]
    pub synthetic: Option<String>,
    /// How the agent's own threads are scheduled (set once they are).
    #[serde(default)]
    pub agent: Option<String>,
    /// Present when a benchmark asked for programs that do nothing.
    #[serde(default)]
    pub empty_programs: Option<String>,
}

impl fmt::Display for AttachReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "scheduler hook: {}", self.scheduler)?;
        let failed: Vec<String> = self
            .scheduler_attempts
            .iter()
            .filter_map(|a| a.error.as_ref().map(|e| format!("{} ({e})", a.hook)))
            .collect();
        if !failed.is_empty() {
            write!(f, " [not available: {}]", failed.join("; "))?;
        }
        write!(
            f,
            "; wakeups: {}; sampling: {}; tcp: {}",
            self.wakeup,
            self.sampling,
            self.tcp.join(", ")
        )?;
        if let Some(synthetic) = &self.synthetic {
            write!(f, "; benchmark events: {synthetic}")?;
        }
        if let Some(agent) = &self.agent {
            write!(f, "; agent: {agent}")?;
        }
        if let Some(empty) = &self.empty_programs {
            write!(f, "; programs: {empty}")?;
        }
        if let Some(go) = &self.go {
            write!(f, "; Go {}: {}", go.version, go.probes.join(", "))?;
            if !go.missing.is_empty() {
                write!(f, " [not attached: {}]", go.missing.join("; "))?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct ProbeSettings {
    pub pid: u32,
    /// On-CPU sampling frequency per CPU.
    pub sample_hz: u64,
    /// While calm (see `sampling`), sample every this many full-rate periods; 1 = always at
    /// full rate. The probes attach at the calm rate when it is above 1.
    pub calm_sample_divisor: u64,
    pub min_offcpu_ns: u64,
    /// Reported off-CPU intervals per second before they are sampled (`offcpu_sampling`);
    /// 0: never sampled.
    pub offcpu_stack_budget: u32,
    /// How often the kernel times the agent's programs for a span (`own_cost`); 0: never.
    pub own_cost_every_ns: u64,
    /// Use only this scheduler hook instead of walking the chain.
    pub sched_hook: Option<SchedHook>,
    pub debug_ebpf: bool,
    /// Follow responses until the peer acknowledges them (delivery latency). Costs a hook on
    /// every incoming TCP segment, so `attach` turns it on only for `--latency delivery`.
    pub track_delivery: bool,
    /// When the response-write hook is attached (see `request_end`).
    pub write_hook: WriteHookPolicy,
    /// Benchmarks only: an event per system call of the target (`EventKind::Synthetic`).
    pub synthetic_syscall_events: bool,
    /// The request latency the kernel sums into histograms for a trigger, and over what window.
    pub trigger_latency: Option<TriggerLatency>,
    /// Benchmarks only: hook families left unattached, to tell what each one costs.
    pub omitted: Vec<HookFamily>,
    /// Benchmarks only: every hook attached, every program returning at once (see
    /// [`EMPTY_PROGRAMS`]).
    pub empty_programs: bool,
}

/// A family of hooks that a benchmark can leave out (`--bench-without`): what `attach` costs
/// a server is spread over them, and taking one away at a time shows each one's share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HookFamily {
    /// `sk_data_ready` and the response-write hook: no request is timed.
    RequestTiming,
    /// The context-switch and wakeup hooks: no off-CPU intervals or run-queue waits.
    Scheduler,
    /// The uprobes on the Go runtime's GC and stop-the-world functions.
    GoRuntime,
}

impl HookFamily {
    fn omitted_from(self, settings: &ProbeSettings) -> bool {
        settings.omitted.contains(&self)
    }
}

/// How the report names a family left out.
const OMITTED: &str = "omitted for a benchmark (--bench-without)";

/// How the report says that the programs do nothing. With no request seen, the write hook's
/// governor would keep that hook on; it stays off instead, as under a load whose requests
/// the programs do see.
pub const EMPTY_PROGRAMS: &str =
    "every program returns at once, for a benchmark (--bench-empty-programs); write hook off";

/// What the kernel's trigger histograms count (see `latency_slices`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TriggerLatency {
    /// `EventKind::RequestServed` or `EventKind::RequestDelivered`.
    pub kind: probe_common::EventKind,
    pub window_ns: u64,
}

pub struct AttachedProbes {
    pub ebpf: Ebpf,
    /// The target's process id.
    pid: u32,
    pub report: AttachReport,
    /// `None` only when a benchmark left the scheduler hooks out.
    pub sched_hook: Option<SchedHook>,
    /// Online CPUs.
    online_cpus: Vec<u32>,
    /// The last request latencies and run-queue waits of every CPU, as the kernel keeps them.
    pub timings: TimingRings,
    /// The kernel's histograms of the trigger's latency, when it keeps them.
    pub latency_slices: Option<LatencySlices>,
    /// The kernel's thread states.
    pub threads: ThreadTable,
    listeners: Listeners,
    sampling: Option<Sampling>,
    /// The response-write hook (see `request_end`).
    write_hook: TracepointHook,
    /// Delivery latency needs the write hook throughout, and a policy may fix it: then it is
    /// not changed while attached.
    write_hook_fixed: bool,
}

/// The response-write hook (see `request_end`).
const WRITE_HOOK: &str = "sock_send_length";

/// The on-CPU sampling events, one per sampled CPU, and the rate they run at.
///
/// Only the online CPUs the target may run on are sampled. A sample on any other CPU is never
/// the target's, and its timer interrupt is not free for whoever runs there: on this VM, under
/// the Go benchmark load (server on CPU 0), `perf record -F 499` on the load generator's CPU
/// alone took throughput to 0.932 ± 0.045 of nothing attached, on the server's CPU to
/// 0.989 ± 0.025 (eight interleaved rounds each).
struct Sampling {
    sample_hz: u64,
    calm_divisor: u64,
    calm: bool,
    /// The CPUs sampled, in order.
    cpus: Vec<u32>,
    links: Vec<PerfEventLinkId>,
}

impl Sampling {
    fn period_ns(&self) -> u64 {
        let divisor = if self.calm { self.calm_divisor } else { 1 };
        full_period_ns(self.sample_hz) * divisor
    }

    /// What the attach report says of it, out of `online` CPUs.
    fn describe(&self, online: usize) -> String {
        let hz = self.sample_hz;
        let mut description = if self.cpus.len() < online {
            let listed: Vec<String> = self.cpus.iter().map(u32::to_string).collect();
            format!(
                "perf_event cpu-clock {hz} Hz on CPU {} (the target's affinity, {} of {online} online)",
                listed.join(","),
                self.cpus.len()
            )
        } else {
            format!("perf_event cpu-clock {hz} Hz on {online} CPUs")
        };
        if self.calm_divisor > 1 {
            description += &format!(
                ", {:.1} Hz while P99 is under half the threshold (kernel stacks not walked)",
                hz as f64 / self.calm_divisor as f64
            );
        }
        description
    }
}

/// The online CPUs to sample for the target: those it may run on, or all of them when /proc
/// does not say (or names none online).
fn cpus_to_sample(online: &[u32], allowed: &BTreeSet<u32>) -> Vec<u32> {
    let cpus: Vec<u32> = online
        .iter()
        .copied()
        .filter(|cpu| allowed.contains(cpu))
        .collect();
    if cpus.is_empty() {
        online.to_vec()
    } else {
        cpus
    }
}

const SAMPLING_PROGRAM: &str = "on_cpu_sample";

const OFFCPU_SAMPLING: &str = "OFFCPU_SAMPLING";
const LATENCY_WATCH: &str = "LATENCY_WATCH";

impl AttachedProbes {
    /// Samples at the calm rate (`calm`) or at full rate. The events are replaced, not
    /// retuned (aya keeps their perf file descriptors), old ones first: a CPU is unsampled
    /// between its detach and its attach, which is better than sampled twice. A no-op without
    /// a calm rate.
    pub fn set_calm_sampling(&mut self, calm: bool) -> Result<(), ProbeError> {
        let Some(sampling) = self.sampling.as_mut() else {
            return Ok(());
        };
        if sampling.calm_divisor <= 1 || sampling.calm == calm {
            return Ok(());
        }
        let p: &mut PerfEvent = program_mut(&mut self.ebpf, SAMPLING_PROGRAM)?;
        for link in sampling.links.drain(..) {
            p.detach(link)
                .map_err(|e| attach_err(SAMPLING_PROGRAM, chain(&e)))?;
        }
        sampling.calm = calm;
        sampling.links = attach_sampling_events(p, &sampling.cpus, sampling.period_ns())?;
        Ok(())
    }

    /// Starts sampling the online CPUs the target may now run on that are not sampled yet (its
    /// affinity widened, or a thread with another one started); returns them. CPUs are not
    /// given up again: a target that narrows its affinity leaves idle events behind, not gaps.
    pub fn sample_newly_allowed_cpus(&mut self) -> Result<Vec<u32>, ProbeError> {
        let Some(sampling) = self.sampling.as_mut() else {
            return Ok(Vec::new());
        };
        let allowed = crate::target::allowed_cpus(self.pid);
        let added: Vec<u32> = cpus_to_sample(&self.online_cpus, &allowed)
            .into_iter()
            .filter(|cpu| !sampling.cpus.contains(cpu))
            .collect();
        if added.is_empty() {
            return Ok(added);
        }
        let p: &mut PerfEvent = program_mut(&mut self.ebpf, SAMPLING_PROGRAM)?;
        sampling
            .links
            .extend(attach_sampling_events(p, &added, sampling.period_ns())?);
        sampling.cpus.extend(&added);
        sampling.cpus.sort_unstable();
        self.report.sampling = sampling.describe(self.online_cpus.len());
        Ok(added)
    }

    /// Attaches (`attached`) or detaches the response-write hook; see `request_end`. A no-op
    /// when it is already so, or when delivery latency needs it throughout.
    pub fn set_write_hook(&mut self, attached: bool) -> Result<(), ProbeError> {
        if self.write_hook_fixed {
            return Ok(());
        }
        if attached {
            self.write_hook.attach(&mut self.ebpf)
        } else {
            self.write_hook.detach(&mut self.ebpf)
        }
    }

    /// Sets the off-CPU stack-sampling threshold (ms; 0: every interval is reported); see
    /// `offcpu_sampling`.
    pub fn set_offcpu_sampling(&mut self, threshold_ms: u32) -> Result<(), ProbeError> {
        let mut threshold: Array<_, u32> = kernel_map_mut(&mut self.ebpf, OFFCPU_SAMPLING)?;
        threshold
            .set(0, threshold_ms, 0)
            .map_err(|e| attach_err(OFFCPU_SAMPLING, e))
    }

    /// Sets the latency bucket at or over which requests count towards waking the agent
    /// (`probe_common::latency_rising`); 0: none do.
    pub fn set_latency_watch(&mut self, bucket: u32) -> Result<(), ProbeError> {
        let mut watch: Array<_, u32> = kernel_map_mut(&mut self.ebpf, LATENCY_WATCH)?;
        watch
            .set(0, bucket, 0)
            .map_err(|e| attach_err(LATENCY_WATCH, e))
    }

    pub fn write_hook_attached(&self) -> bool {
        self.write_hook.is_attached()
    }

    /// Whether the write hook may be attached and detached by the request rate.
    pub fn write_hook_adjustable(&self) -> bool {
        !self.write_hook_fixed
    }

    /// Marks listeners the target opened since the last look.
    pub fn mark_listening_ports(&mut self) -> Result<usize, ProbeError> {
        mark_listening_ports(&mut self.ebpf, &mut self.listeners)
    }

    /// Every loaded program's runs and run time as the kernel has counted them, which it does
    /// only while timing is on (`own_cost`). Programs of the chain that did not load are left
    /// out; those loaded and not attached count nothing.
    pub fn program_runs(&self) -> Vec<ProgramRuns> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramRuns {
                    program: name.to_string(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                    runs: info.run_count(),
                })
            })
            .collect()
    }
}

const TIMINGS_MAP: &str = "TIMINGS";
const TIMING_HEADS_MAP: &str = "TIMING_HEADS";
const LATENCY_SLICES_MAP: &str = "LATENCY_SLICES";
const THREADS_MAP: &str = "THREADS";

fn array_map_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<std::os::fd::BorrowedFd<'a>, ProbeError> {
    use std::os::fd::AsFd;
    match ebpf.map(name) {
        Some(aya::maps::Map::Array(data)) => Ok(data.fd().as_fd()),
        _ => Err(attach_err(name, "array map missing")),
    }
}

/// Maps the kernel's histograms of the trigger's latency into the agent's memory.
fn map_latency_slices(
    ebpf: &Ebpf,
    possible_cpus: usize,
    window_ns: u64,
) -> Result<LatencySlices, ProbeError> {
    LatencySlices::map(
        array_map_fd(ebpf, LATENCY_SLICES_MAP)?,
        possible_cpus,
        window_ns,
    )
    .map_err(|e| attach_err(LATENCY_SLICES_MAP, format!("mmap: {e}")))
}

/// Maps the kernel's timing rings into the agent's memory.
fn map_timing_rings(
    ebpf: &Ebpf,
    possible_cpus: usize,
    bits: u32,
    tgid: u32,
) -> Result<TimingRings, ProbeError> {
    TimingRings::map(
        array_map_fd(ebpf, TIMINGS_MAP)?,
        array_map_fd(ebpf, TIMING_HEADS_MAP)?,
        possible_cpus,
        bits,
        tgid,
    )
    .map_err(|e| attach_err(TIMINGS_MAP, format!("mmap: {e}")))
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Root, or the capabilities BPF tracing needs, in the effective set.
pub fn require_privileges() -> Result<(), ProbeError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(ProbeError::NotPrivileged)
    }
}

fn kernel_offsets(btf: &KernelBtf) -> Result<KernelOffsets, ProbeError> {
    // `struct sock` embeds `struct sock_common` as `__sk_common`.
    let common = btf.member_offset("sock", "__sk_common")?;
    let sock = |member: &str| -> Result<u32, ProbeError> {
        Ok(common + btf.member_offset("sock_common", member)?)
    };
    Ok(KernelOffsets {
        task_pid: btf.member_offset("task_struct", "pid")?,
        task_tgid: btf.member_offset("task_struct", "tgid")?,
        // Renamed from `state` in 5.14.
        task_state: btf
            .member_offset("task_struct", "__state")
            .or_else(|_| btf.member_offset("task_struct", "state"))?,
        tcp_write_seq: btf.member_offset("tcp_sock", "write_seq")?,
        tcp_snd_una: btf.member_offset("tcp_sock", "snd_una")?,
        tcp_rack_mstamp: btf.member_offset("tcp_sock", "rack")?
            + btf.member_offset("tcp_rack", "mstamp")?,
        // Since 4.20; older kernels leave the programs reading the clock themselves.
        tcp_clock_cache: btf
            .member_offset("tcp_sock", "tcp_clock_cache")
            .unwrap_or(0),
        skb_data: btf.member_offset("sk_buff", "data")?,
        sk_family: sock("skc_family")?,
        sk_state: sock("skc_state")?,
        sk_num: sock("skc_num")?,
        sk_dport: sock("skc_dport")?,
        sk_rcv_saddr: sock("skc_rcv_saddr")?,
        sk_daddr: sock("skc_daddr")?,
        sk_v6_rcv_saddr: sock("skc_v6_rcv_saddr")?,
        sk_v6_daddr: sock("skc_v6_daddr")?,
        sk_hash: sock("skc_hash")?,
        regs_ip: btf.member_offset("pt_regs", "ip")?,
        regs_sp: btf.member_offset("pt_regs", "sp")?,
        regs_orig_ax: btf.member_offset("pt_regs", "orig_ax")?,
    })
}

/// The kallsyms name of finish_task_switch: compilers often emit only a `.isra` clone.
fn finish_task_switch_symbol() -> String {
    std::fs::read_to_string("/proc/kallsyms")
        .ok()
        .and_then(|text| {
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2))
                .find(|name| {
                    *name == "finish_task_switch" || name.starts_with("finish_task_switch.")
                })
                .map(str::to_string)
        })
        .unwrap_or_else(|| "finish_task_switch".into())
}

pub(crate) fn attach_err(program: &str, err: impl fmt::Display) -> ProbeError {
    ProbeError::Attach {
        program: program.into(),
        reason: err.to_string(),
    }
}

/// One of the probe object's maps, viewed as `T`.
pub(crate) fn kernel_map<'a, T>(ebpf: &'a Ebpf, name: &str) -> Result<T, ProbeError>
where
    T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .map(name)
        .ok_or_else(|| attach_err(name, "map missing"))?;
    T::try_from(map).map_err(|e| attach_err(name, e))
}

/// Takes the map out of `ebpf`, for a user that keeps it open for the whole attach.
pub(crate) fn take_kernel_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| attach_err(name, "map missing"))?;
    T::try_from(map).map_err(|e| attach_err(name, e))
}

/// [`kernel_map`] for changing the map.
fn kernel_map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<T, ProbeError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| attach_err(name, "map missing"))?;
    T::try_from(map).map_err(|e| attach_err(name, e))
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| attach_err(name, "program missing from the probe object"))?;
    program.try_into().map_err(|e| attach_err(name, e))
}

/// Full error chain of an aya error on one line (the useful errno is usually at the bottom).
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// The switch-in half of [`SchedHook::TpBtfExit`].
const SCHED_EXIT_PROGRAM: &str = "sched_exit_btf";

fn try_sched_hook(ebpf: &mut Ebpf, hook: SchedHook, btf: &Btf) -> Result<(), String> {
    let name = hook.program();
    let fail = |e: &dyn std::error::Error| chain(e);
    match hook {
        SchedHook::Fentry => {
            let p: &mut FEntry = program_mut(ebpf, name).map_err(|e| e.to_string())?;
            p.load("finish_task_switch", btf).map_err(|e| fail(&e))?;
            p.attach().map(drop).map_err(|e| fail(&e))
        }
        SchedHook::Kprobe => {
            let symbol = finish_task_switch_symbol();
            let p: &mut KProbe = program_mut(ebpf, name).map_err(|e| e.to_string())?;
            p.load().map_err(|e| fail(&e))?;
            p.attach(&symbol, 0).map(drop).map_err(|e| fail(&e))
        }
        SchedHook::TpBtfExit => {
            // Both load before either attaches, and the switch-out half is detached again if
            // the other does not attach: neither half is any use alone.
            for (program, tracepoint) in [
                (name, "sched_switch"),
                (SCHED_EXIT_PROGRAM, "sched_exit_tp"),
            ] {
                let p: &mut BtfTracePoint =
                    program_mut(ebpf, program).map_err(|e| e.to_string())?;
                p.load(tracepoint, btf).map_err(|e| fail(&e))?;
            }
            let out: &mut BtfTracePoint = program_mut(ebpf, name).map_err(|e| e.to_string())?;
            let out_link = out.attach().map_err(|e| fail(&e))?;
            let exit: &mut BtfTracePoint =
                program_mut(ebpf, SCHED_EXIT_PROGRAM).map_err(|e| e.to_string())?;
            if let Err(e) = exit.attach() {
                let out: &mut BtfTracePoint = program_mut(ebpf, name).map_err(|e| e.to_string())?;
                let _ = out.detach(out_link);
                return Err(fail(&e));
            }
            Ok(())
        }
        SchedHook::TpBtf => {
            let p: &mut BtfTracePoint = program_mut(ebpf, name).map_err(|e| e.to_string())?;
            p.load("sched_switch", btf).map_err(|e| fail(&e))?;
            p.attach().map(drop).map_err(|e| fail(&e))
        }
        SchedHook::RawTp => {
            let p: &mut RawTracePoint = program_mut(ebpf, name).map_err(|e| e.to_string())?;
            p.load().map_err(|e| fail(&e))?;
            p.attach("sched_switch").map(drop).map_err(|e| fail(&e))
        }
    }
}

/// Attaches `<base>_btf` to the BTF-typed tracepoint, or, if that fails, `<base>_raw` to the
/// raw one; returns which.
fn attach_btf_or_raw(
    ebpf: &mut Ebpf,
    btf: &Btf,
    base: &str,
    tracepoint: &'static str,
) -> Result<String, ProbeError> {
    // The link stays with the program (aya detaches it when the object is dropped).
    attach_btf_or_raw_link(ebpf, btf, base, tracepoint).map(|(report, _)| report)
}

/// [`attach_btf_or_raw`], keeping what it takes to detach the program and attach it again.
fn attach_btf_or_raw_link(
    ebpf: &mut Ebpf,
    btf: &Btf,
    base: &str,
    tracepoint: &'static str,
) -> Result<(String, TracepointHook), ProbeError> {
    let typed = format!("{base}_btf");
    let attempt = (|| -> Result<BtfTracePointLinkId, String> {
        let p: &mut BtfTracePoint = program_mut(ebpf, &typed).map_err(|e| e.to_string())?;
        p.load(tracepoint, btf).map_err(|e| chain(&e))?;
        p.attach().map_err(|e| chain(&e))
    })();
    let why = match attempt {
        Ok(link) => {
            let hook = TracepointHook {
                program: typed,
                tracepoint,
                link: Some(HookLinkId::Typed(link)),
            };
            return Ok((format!("tp_btf/{tracepoint}"), hook));
        }
        Err(why) => why,
    };
    let raw = format!("{base}_raw");
    let p: &mut RawTracePoint = program_mut(ebpf, &raw)?;
    p.load().map_err(|e| attach_err(&raw, chain(&e)))?;
    let link = p
        .attach(tracepoint)
        .map_err(|e| attach_err(&raw, chain(&e)))?;
    let hook = TracepointHook {
        program: raw,
        tracepoint,
        link: Some(HookLinkId::Raw(link)),
    };
    Ok((
        format!("raw_tp/{tracepoint} [tp_btf/{tracepoint} not available: {why}]"),
        hook,
    ))
}

/// A loaded tracepoint program (typed or raw, whichever loaded) that can be detached and
/// attached again.
struct TracepointHook {
    program: String,
    tracepoint: &'static str,
    link: Option<HookLinkId>,
}

enum HookLinkId {
    Typed(BtfTracePointLinkId),
    Raw(RawTracePointLinkId),
}

impl TracepointHook {
    fn is_attached(&self) -> bool {
        self.link.is_some()
    }

    fn detach(&mut self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        let name = &self.program;
        match self.link.take() {
            None => Ok(()),
            Some(HookLinkId::Typed(link)) => program_mut::<BtfTracePoint>(ebpf, name)?
                .detach(link)
                .map_err(|e| attach_err(name, chain(&e))),
            Some(HookLinkId::Raw(link)) => program_mut::<RawTracePoint>(ebpf, name)?
                .detach(link)
                .map_err(|e| attach_err(name, chain(&e))),
        }
    }

    fn attach(&mut self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        if self.link.is_some() {
            return Ok(());
        }
        let name = &self.program;
        let link = if let Ok(p) = program_mut::<BtfTracePoint>(ebpf, name) {
            HookLinkId::Typed(p.attach().map_err(|e| attach_err(name, chain(&e)))?)
        } else {
            let p = program_mut::<RawTracePoint>(ebpf, name)?;
            HookLinkId::Raw(
                p.attach(self.tracepoint)
                    .map_err(|e| attach_err(name, chain(&e)))?,
            )
        };
        self.link = Some(link);
        Ok(())
    }
}

fn attach_wakeups(ebpf: &mut Ebpf, btf: &Btf) -> Result<String, ProbeError> {
    Ok([
        attach_btf_or_raw(ebpf, btf, "sched_wakeup", "sched_wakeup")?,
        attach_btf_or_raw(ebpf, btf, "sched_wakeup_new", "sched_wakeup_new")?,
    ]
    .join(", "))
}

/// Only full-rate samples walk the kernel stack: at the calm rate, the walk (most of what a
/// sample costs, and all while the target waits on the CPU) would buy kernel paths for a
/// baseline whose verdict compares user stacks.
fn kernel_stack_max_period_ns(settings: &ProbeSettings) -> u64 {
    if settings.calm_sample_divisor > 1 && settings.sample_hz > 0 {
        full_period_ns(settings.sample_hz)
    } else {
        u64::MAX
    }
}

/// Loads the sampling program and attaches it on every one of `cpus` (of `online` CPUs), at
/// the calm rate when there is one.
fn attach_sampling(
    ebpf: &mut Ebpf,
    cpus: Vec<u32>,
    online: usize,
    hz: u64,
    calm_divisor: u64,
) -> Result<(String, Sampling), ProbeError> {
    let program = SAMPLING_PROGRAM;
    let p: &mut PerfEvent = program_mut(ebpf, program)?;
    p.load().map_err(|e| attach_err(program, chain(&e)))?;
    let calm_divisor = calm_divisor.max(1);
    let mut sampling = Sampling {
        sample_hz: hz,
        calm_divisor,
        calm: calm_divisor > 1,
        cpus,
        links: Vec::new(),
    };
    // A period rather than a frequency: the calm period is then exactly a whole number of
    // full-rate periods, and each sample's period says what it weighs.
    sampling.links = attach_sampling_events(p, &sampling.cpus, sampling.period_ns())?;
    Ok((sampling.describe(online), sampling))
}

fn attach_sampling_events(
    p: &mut PerfEvent,
    cpus: &[u32],
    period_ns: u64,
) -> Result<Vec<PerfEventLinkId>, ProbeError> {
    cpus.iter()
        .map(|&cpu| {
            p.attach(
                PerfTypeId::Software,
                aya::programs::perf_event::perf_sw_ids::PERF_COUNT_SW_CPU_CLOCK as u64,
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Period(period_ns),
                false,
            )
            .map_err(|e| attach_err(SAMPLING_PROGRAM, chain(&e)))
        })
        .collect()
}

/// Sets the bits of the target's listening ports in the kernel's port bitmap and returns how
/// many ports it listens on. Called at attach and again while attached, for listeners opened
/// later. Bits are only added: connections on a port the target stops listening on stay
/// timed until they close.
fn mark_listening_ports(ebpf: &mut Ebpf, listeners: &mut Listeners) -> Result<usize, ProbeError> {
    let mut bitmap: Array<_, u64> = kernel_map_mut(ebpf, "TARGET_PORTS")?;
    let ports = listeners.ports()?;
    for &port in &ports {
        let (word, bit) = port_bit(port);
        let bits = bitmap
            .get(&word, 0)
            .map_err(|e| attach_err("TARGET_PORTS", e))?;
        if bits & bit == 0 {
            bitmap
                .set(word, bits | bit, 0)
                .map_err(|e| attach_err("TARGET_PORTS", e))?;
        }
    }
    Ok(ports.len())
}

/// The socket hooks; the response-write hook is returned attached, with its link.
fn attach_tcp(
    ebpf: &mut Ebpf,
    btf: &Btf,
    listeners: &mut Listeners,
    track_delivery: bool,
    timing_requests: bool,
) -> Result<(Vec<String>, TracepointHook), ProbeError> {
    // Ports first: the socket hooks know the target's connections by them.
    mark_listening_ports(ebpf, listeners)?;
    let mut hooks = vec!["inet_sock_set_state", "tcp_retransmit_skb"];
    if timing_requests {
        hooks.push("sk_data_ready");
    }
    if track_delivery && timing_requests {
        hooks.push("tcp_probe");
    }
    let mut reports = hooks
        .into_iter()
        .map(|tracepoint| attach_btf_or_raw(ebpf, btf, tracepoint, tracepoint))
        .collect::<Result<Vec<_>, _>>()?;
    let (report, write_hook) = attach_btf_or_raw_link(ebpf, btf, WRITE_HOOK, WRITE_HOOK)?;
    reports.push(if !timing_requests {
        let delivery = if track_delivery { ", tcp_probe" } else { "" };
        format!("request timing (sk_data_ready, {WRITE_HOOK}{delivery}) {OMITTED}")
    } else if track_delivery {
        report
    } else {
        format!(
            "{report} (while under {} requests/s; see request_end)",
            crate::request_end::DETACH_AT_PER_S
        )
    });
    Ok((reports, write_hook))
}

/// For a Go target, entry uprobes on the GC and stop-the-world functions. A probe that cannot
/// attach (a symbol renamed in some Go version) is reported, not fatal.
fn attach_go(ebpf: &mut Ebpf, pid: u32) -> Option<crate::goruntime::GoInfo> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let version = crate::goruntime::go_version(&exe)?;
    let mut info = crate::goruntime::GoInfo {
        version,
        ..Default::default()
    };
    for (program, symbol) in crate::goruntime::PROBES {
        let result = (|| -> Result<(), String> {
            let p: &mut UProbe = program_mut(ebpf, program).map_err(|e| e.to_string())?;
            p.load().map_err(|e| chain(&e))?;
            p.attach(Some(symbol), 0, &exe, Some(pid as i32))
                .map(drop)
                .map_err(|e| chain(&e))
        })();
        match result {
            Ok(()) => info.probes.push(format!("uprobe/{symbol}")),
            Err(e) => info.missing.push(format!("{symbol}: {e}")),
        }
    }
    Some(info)
}

/// Loads the programs for `settings.pid` and attaches all of them. Dropping the returned
/// [`AttachedProbes`] detaches everything (aya closes the links with their fds).
pub fn attach(settings: &ProbeSettings) -> Result<AttachedProbes, ProbeError> {
    require_privileges()?;
    target::require_process(settings.pid)?;
    let layout = KernelBtf::from_sys_fs()?;
    let btf = Btf::from_sys_fs().map_err(|e| ProbeError::MissingBtf {
        path: "/sys/kernel/btf/vmlinux".into(),
        reason: e.to_string(),
    })?;
    let possible_cpus = aya::util::nr_cpus()
        .map_err(|(what, e)| attach_err(TIMINGS_MAP, format!("{what}: {e}")))?;
    let config = ProbeConfig {
        target_tgid: settings.pid,
        debug: settings.debug_ebpf as u32,
        min_offcpu_ns: settings.min_offcpu_ns,
        offsets: kernel_offsets(&layout)?,
        track_delivery: settings.track_delivery as u32,
        timing_ring_bits: ring_bits(possible_cpus),
        trigger_kind: settings.trigger_latency.map_or(0, |t| t.kind as u32),
        trigger_slice_shift: settings
            .trigger_latency
            .map_or(0, |t| latency_slices::slice_shift(t.window_ns)),
        kernel_stack_max_period_ns: kernel_stack_max_period_ns(settings),
    };
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .set_global("CONFIG", &config, true)
        .set_global(
            "BENCH_EMPTY_PROGRAMS",
            &(settings.empty_programs as u32),
            true,
        )
        .set_max_entries(
            TIMINGS_MAP,
            (possible_cpus << config.timing_ring_bits) as u32,
        )
        .set_max_entries(TIMING_HEADS_MAP, possible_cpus as u32)
        .set_max_entries(
            LATENCY_SLICES_MAP,
            possible_cpus as u32 * LATENCY_SLICES_PER_CPU,
        )
        .load(PROBE_OBJECT)
        .map_err(|e| attach_err("probe object", chain(&e)))?;
    // Mapped before anything is attached: the kernel fills in the whole mapping of the rings
    // at once (96 MiB here), which should not hold up requests that are already being timed.
    let timings = map_timing_rings(&ebpf, possible_cpus, config.timing_ring_bits, settings.pid)?;
    let threads = ThreadTable::map(array_map_fd(&ebpf, THREADS_MAP)?)
        .map_err(|e| attach_err(THREADS_MAP, format!("mmap: {e}")))?;
    let latency_slices = match settings.trigger_latency {
        Some(trigger) => Some(map_latency_slices(&ebpf, possible_cpus, trigger.window_ns)?),
        None => None,
    };
    if settings.debug_ebpf {
        if let Err(e) = aya_log::EbpfLogger::init(&mut ebpf) {
            log::warn!("kernel-side logging unavailable: {e}");
        }
    }

    let scheduler_omitted = HookFamily::Scheduler.omitted_from(settings);
    let chain_to_try: Vec<SchedHook> = match settings.sched_hook {
        _ if scheduler_omitted => vec![],
        Some(hook) => vec![hook],
        None => SchedHook::CHAIN.to_vec(),
    };
    let mut attempts = Vec::new();
    let mut chosen = None;
    for hook in chain_to_try {
        let result = try_sched_hook(&mut ebpf, hook, &btf);
        attempts.push(HookAttempt {
            hook: hook.to_string(),
            error: result.as_ref().err().cloned(),
        });
        if result.is_ok() {
            chosen = Some(hook);
            break;
        }
    }
    if chosen.is_none() && !scheduler_omitted {
        let why: Vec<String> = attempts
            .iter()
            .map(|a| format!("{}: {}", a.hook, a.error.clone().unwrap_or_default()))
            .collect();
        return Err(ProbeError::NoSchedulerHook(why.join("; ")));
    }
    let wakeup = if scheduler_omitted {
        OMITTED.to_string()
    } else {
        attach_wakeups(&mut ebpf, &btf)?
    };
    let online_cpus = aya::util::online_cpus()
        .map_err(|(what, e)| attach_err("online CPUs", format!("{what}: {e}")))?;
    let (sampling_report, sampling) = if settings.sample_hz > 0 {
        let (report, sampling) = attach_sampling(
            &mut ebpf,
            cpus_to_sample(&online_cpus, &crate::target::allowed_cpus(settings.pid)),
            online_cpus.len(),
            settings.sample_hz,
            settings.calm_sample_divisor,
        )?;
        (report, Some(sampling))
    } else {
        ("off".into(), None)
    };
    let mut listeners = Listeners::open(settings.pid)?;
    let timing_requests = !HookFamily::RequestTiming.omitted_from(settings);
    let (tcp, mut write_hook) = attach_tcp(
        &mut ebpf,
        &btf,
        &mut listeners,
        settings.track_delivery,
        timing_requests,
    )?;
    // A benchmark that times no request, or whose programs do nothing, has no use for it.
    let write_hook_unused = !timing_requests || settings.empty_programs;
    if write_hook_unused
        || (settings.write_hook == WriteHookPolicy::Never && !settings.track_delivery)
    {
        write_hook.detach(&mut ebpf)?;
    }
    let go = if HookFamily::GoRuntime.omitted_from(settings) {
        None
    } else {
        attach_go(&mut ebpf, settings.pid)
    };
    let synthetic = if settings.synthetic_syscall_events {
        let name = "synthetic_sys_enter";
        let p: &mut BtfTracePoint = program_mut(&mut ebpf, name)?;
        p.load("sys_enter", &btf)
            .map_err(|e| attach_err(name, chain(&e)))?;
        p.attach().map_err(|e| attach_err(name, chain(&e)))?;
        Some("tp_btf/sys_enter".to_string())
    } else {
        None
    };
    Ok(AttachedProbes {
        ebpf,
        pid: settings.pid,
        sched_hook: chosen,
        online_cpus,
        timings,
        latency_slices,
        threads,
        listeners,
        sampling,
        write_hook,
        write_hook_fixed: settings.track_delivery
            || settings.write_hook != WriteHookPolicy::WhileRateIsLow
            || write_hook_unused,
        report: AttachReport {
            scheduler: chosen.map_or(OMITTED.to_string(), |hook| hook.to_string()),
            scheduler_attempts: attempts,
            wakeup,
            sampling: sampling_report,
            tcp,
            go,
            synthetic,
            agent: None,
            empty_programs: settings.empty_programs.then(|| EMPTY_PROGRAMS.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_kernel_has_every_offset_the_programs_read() {
        let btf = KernelBtf::from_sys_fs().expect("this machine has /sys/kernel/btf/vmlinux");
        let offsets = kernel_offsets(&btf).expect("every required member is in this kernel's BTF");
        // Optional, and 0 only makes the programs read the clock themselves: a slowdown on
        // every request that nothing else would notice.
        assert_ne!(offsets.tcp_clock_cache, 0);
        assert_ne!(offsets.tcp_clock_cache, offsets.tcp_rack_mstamp);
    }
}
