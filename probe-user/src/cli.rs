//! Command-line flags → option structs → library calls.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::attach::{HookFamily, ProbeSettings, SchedHook};
use crate::error::ProbeError;
use crate::flamegraph::{self, FlameKind};
use crate::histogram::{self, human_ns};
use crate::output::write_atomic;
use crate::own_cost::OwnCost;
use crate::recorder::{record, RecordOptions};
use crate::recording::Recording;
use crate::window::Window;

#[derive(Debug, Parser)]
#[command(
    name = "p99probe",
    version,
    about = "Explains why a server's P99 latency spiked, from the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to a server, watch its request latency, and capture the window around every P99
    /// spike with flame graphs, histograms, a timeline and a ranked verdict.
    Attach(AttachArgs),
    /// Build a capture directory from a recording, for a window given or the worst one found.
    Report(ReportArgs),
    /// Record a running process: scheduler delay, off-CPU stacks, on-CPU samples, retransmits.
    Record(RecordArgs),
    /// Write a flame graph (SVG) and/or folded stacks from a recording.
    Flamegraph(FlamegraphArgs),
    /// Run-queue (scheduler) delay percentiles from a recording, as text and SVG.
    SchedDelay(SchedDelayArgs),
    /// Summarize a recording: target, hooks, event counts, drops.
    Info(InfoArgs),
}

/// A duration such as `10s`, `250ms`, `1m30s`, or plain seconds (`2.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok(Duration::from_secs_f64(seconds));
        }
        return Err(format!("`{text}` is not a valid duration"));
    }
    humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e}"))
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// PID of the process to observe (all its threads, including ones created later).
    #[arg(long)]
    pub pid: u32,
    /// How long to record; without it, until Ctrl-C or the process exits.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Recording file to write.
    #[arg(long, short, default_value = "recording.p99")]
    pub out: PathBuf,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// PID of the server.
    #[arg(long)]
    pub pid: u32,
    /// Capture when P99 exceeds this (e.g. `50ms`).
    #[arg(long, value_parser = parse_duration, conflicts_with = "p99_factor", required_unless_present = "p99_factor")]
    pub p99: Option<Duration>,
    /// Capture when P99 exceeds this multiple of the baseline P99 learned over `--learn`.
    #[arg(long)]
    pub p99_factor: Option<f64>,
    /// How long to learn the baseline P99 for `--p99-factor`.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub learn: Duration,
    /// Which request latency the trigger watches.
    #[arg(long, value_enum, default_value = "server")]
    pub latency: crate::latency::LatencyKind,
    /// Take latencies from outside instead: `stdin` or `udp:PORT`, one per line (`12.5ms`).
    #[arg(long)]
    pub latency_feed: Option<crate::monitor::LatencyFeed>,
    /// Sliding window for the P99.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub window: Duration,
    /// Keep this much before the trigger in each capture.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub pre: Duration,
    /// Keep recording this long after the trigger.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub post: Duration,
    /// Baseline compared against the spike: this long, before the pre-window.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub baseline: Duration,
    /// Minimum time between two captures.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub cooldown: Duration,
    /// Stop after this many captures.
    #[arg(long, default_value_t = 3)]
    pub max_captures: usize,
    /// Ignore windows with fewer requests than this.
    #[arg(long, default_value_t = 20)]
    pub min_requests: u64,
    /// Stop after this long (default: until Ctrl-C, max captures, or the target exits).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Parent directory of the capture directories.
    #[arg(long, short, default_value = "p99probe-captures")]
    pub out: PathBuf,
    /// On-CPU sampling rate while P99 stays under half the threshold (rounded to a whole
    /// fraction of `--sample-hz`); full rate from half the threshold and during captures.
    /// Calm samples keep the kernel function they interrupted, not the kernel stack. Equal to
    /// `--sample-hz` to always sample at full rate, with kernel stacks.
    #[arg(long, default_value_t = 99)]
    pub calm_sample_hz: u64,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    pub recording: PathBuf,
    /// The spike window; without it, the worst P99 window of the recording.
    #[command(flatten)]
    pub window: WindowArgs,
    /// Length of the window searched for when none is given.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub search_window: Duration,
    #[arg(long, value_enum, default_value = "server")]
    pub latency: crate::latency::LatencyKind,
    /// Parent directory of the capture directory.
    #[arg(long, short, default_value = "p99probe-captures")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// On-CPU sampling frequency per CPU (0 disables sampling).
    #[arg(long, default_value_t = 499)]
    pub sample_hz: u64,
    /// Report off-CPU intervals at least this long (0 = all; short ones flood busy servers).
    #[arg(long, value_parser = parse_duration, default_value = "1ms")]
    pub min_offcpu: Duration,
    /// Off-CPU intervals (each two stack walks, 7–12 µs) reported per second before shorter
    /// ones are sampled in proportion to their length and weighted back (0 = never sample).
    #[arg(long, default_value_t = crate::offcpu_sampling::DEFAULT_BUDGET_PER_S)]
    pub offcpu_stack_budget: u32,
    /// How often the kernel times p99probe's own programs for one second, to report what they
    /// cost this workload (0 = never; timing adds two clock reads to each run while on).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub own_cost_every: Duration,
    /// Use only this scheduler hook instead of the fallback chain
    /// fentry → kprobe → tp_btf sched_switch+sched_exit_tp → tp_btf sched_switch → raw_tp.
    #[arg(long, value_enum)]
    pub sched_hook: Option<SchedHook>,
    /// Print the kernel programs' diagnostics (aya-log).
    #[arg(long)]
    pub debug_ebpf: bool,
    /// Benchmarks only: one event per system call of the target, to load the pipeline.
    #[arg(long, hide = true)]
    pub synthetic_syscall_events: bool,
    /// Benchmarks only: leave these hook families unattached (comma-separated), to measure
    /// what each one costs the target.
    #[arg(long, hide = true, value_enum, value_delimiter = ',')]
    pub bench_without: Vec<HookFamily>,
    /// Benchmarks only: attach every hook with programs that return at once, to measure what
    /// the hooks cost apart from the programs' work.
    #[arg(long, hide = true)]
    pub bench_empty_programs: bool,
}

impl ProbeArgs {
    pub fn settings(&self, pid: u32, track_delivery: bool) -> ProbeSettings {
        ProbeSettings {
            pid,
            sample_hz: self.sample_hz,
            calm_sample_divisor: 1,
            min_offcpu_ns: self.min_offcpu.as_nanos() as u64,
            offcpu_stack_budget: self.offcpu_stack_budget,
            own_cost_every_ns: self.own_cost_every.as_nanos() as u64,
            sched_hook: self.sched_hook,
            debug_ebpf: self.debug_ebpf,
            track_delivery,
            write_hook: Default::default(),
            synthetic_syscall_events: self.synthetic_syscall_events,
            trigger_latency: None,
            omitted: self.bench_without.clone(),
            empty_programs: self.bench_empty_programs,
        }
    }
}

#[derive(Debug, Args)]
pub struct WindowArgs {
    /// Window start, as an offset from the start of the recording (e.g. `2.5`, `2s500ms`).
    #[arg(long, value_parser = parse_duration)]
    pub from: Option<Duration>,
    /// Window end, as an offset from the start of the recording.
    #[arg(long, value_parser = parse_duration)]
    pub to: Option<Duration>,
}

impl WindowArgs {
    pub fn window(&self, recording: &Recording) -> Window {
        Window::from_offsets(
            recording.meta.start_ns,
            recording.meta.end_ns,
            self.from.map(|d| d.as_nanos() as u64),
            self.to.map(|d| d.as_nanos() as u64),
        )
    }
}

#[derive(Debug, Args)]
pub struct FlamegraphArgs {
    pub recording: PathBuf,
    #[arg(long, value_enum)]
    pub kind: FlameKind,
    #[command(flatten)]
    pub window: WindowArgs,
    /// SVG output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Folded-stacks output (for inferno, flamegraph.pl, speedscope).
    #[arg(long)]
    pub folded: Option<PathBuf>,
    /// Off-CPU: also count intervals where the thread was preempted (run-queue wait).
    #[arg(long)]
    pub include_preempted: bool,
    /// Print the N heaviest stacks.
    #[arg(long, default_value_t = 0)]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct SchedDelayArgs {
    pub recording: PathBuf,
    #[command(flatten)]
    pub window: WindowArgs,
    /// Only delays on this CPU.
    #[arg(long)]
    pub cpu: Option<u32>,
    /// SVG output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Text output (also printed).
    #[arg(long)]
    pub text: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    pub recording: PathBuf,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Attach(args) => run_attach(args),
        Command::Report(args) => run_report(args),
        Command::Record(args) => run_record(args),
        Command::Flamegraph(args) => run_flamegraph(args),
        Command::SchedDelay(args) => run_sched_delay(args),
        Command::Info(args) => run_info(args),
    }
}

/// One thread drives the agent's loop, its timers and its I/O: with a worker thread, every
/// drain woke two threads (the worker to poll, then the loop), and the agent shares a CPU with
/// the load generator or the target. Captures are written on the blocking pool.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn print_verdict(causes: &[crate::verdict::Cause]) {
    for (rank, cause) in causes.iter().enumerate() {
        println!(
            "  {}. {:<16} score {:>8.1}  {}",
            rank + 1,
            cause.cause.name(),
            cause.score,
            cause.summary
        );
    }
}

fn run_attach(args: AttachArgs) -> anyhow::Result<()> {
    let threshold = match (args.p99, args.p99_factor) {
        (Some(p99), _) => crate::trigger::Threshold::Absolute {
            p99_ns: p99.as_nanos() as u64,
        },
        (None, Some(factor)) if factor > 1.0 => crate::trigger::Threshold::Factor {
            factor,
            learn_ns: args.learn.as_nanos() as u64,
        },
        _ => {
            return Err(ProbeError::InvalidArgument(
                "give --p99 DURATION, or --p99-factor greater than 1".into(),
            )
            .into())
        }
    };
    let options = crate::monitor::AttachOptions {
        // attach_and_watch turns delivery tracking on when `--latency delivery` asks for it.
        probe: ProbeSettings {
            calm_sample_divisor: crate::sampling::calm_divisor(
                args.probe.sample_hz,
                args.calm_sample_hz,
            ),
            ..args.probe.settings(args.pid, false)
        },
        latency: args.latency,
        feed: args.latency_feed,
        threshold,
        window: args.window,
        pre: args.pre,
        post: args.post,
        baseline: args.baseline,
        cooldown: args.cooldown,
        max_captures: args.max_captures,
        min_requests: args.min_requests,
        duration: args.duration,
        out_dir: args.out,
        progress: true,
        max_buffered_events: 4_000_000,
        stack_prune_every: Duration::from_secs(5),
    };
    let summary = runtime()?.block_on(async {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        crate::monitor::attach_and_watch(&options, ctrl_c).await
    })?;
    if summary.target_exited {
        eprintln!("target {} exited", args.pid);
    }
    println!(
        "{} capture(s); {} events sent, {} dropped in the kernel, {} stacks missing ({})",
        summary.captures.len(),
        summary.counters.produced(),
        summary.counters.lost(),
        summary.counters.stacks_missing,
        summary.counters.breakdown()
    );
    if summary.timing_history_cut > 0 {
        println!(
            "{} capture(s) started after the kernel's timing rings had lost the start of their baseline",
            summary.timing_history_cut
        );
    }
    if let Some(line) = crate::offcpu_sampling::summary_line(&summary.offcpu_sampling_changes) {
        println!("{line}");
    }
    if let Some(line) = summary.own_cost.as_ref().and_then(OwnCost::summary) {
        println!("{line}");
    }
    for capture in &summary.captures {
        println!("{}", capture.dir.display());
        if let Some(cause) = &capture.top_cause {
            println!("  most likely: {}: {}", cause.cause.name(), cause.summary);
        }
    }
    Ok(())
}

fn run_report(args: ReportArgs) -> anyhow::Result<()> {
    let recording = Recording::load(&args.recording)?;
    let whole = Window::new(recording.meta.start_ns, recording.meta.end_ns);
    let spike = if args.window.from.is_some() || args.window.to.is_some() {
        args.window.window(&recording)
    } else {
        crate::latency::worst_window(
            &recording,
            args.latency,
            args.search_window.as_nanos() as u64,
            20,
        )
        .map(|(window, _)| window)
        .ok_or_else(|| {
            let none_at_all = !recording
                .events()
                .any(|e| crate::latency::request_latency(&e, args.latency).is_some());
            let hint = if none_at_all && args.latency == crate::latency::LatencyKind::Delivery {
                " (it was recorded by `attach` without `--latency delivery`, which does not follow responses to the peer's ACK)"
            } else {
                ""
            };
            ProbeError::InvalidArgument(format!(
                "no window with enough {:?} request latencies in {}{hint}; give --from/--to",
                args.latency,
                args.recording.display()
            ))
        })?
    };
    let baseline: Vec<Window> = [
        Window::new(whole.start_ns, spike.start_ns),
        Window::new(spike.end_ns, whole.end_ns),
    ]
    .into_iter()
    .filter(|w| w.len_ns() > 0)
    .collect();
    let request = crate::capture::CaptureRequest {
        recording: &recording,
        spike,
        baseline,
        fire: None,
        latency_kind: args.latency,
    };
    let (dir, report) = crate::capture::write_capture(&args.out, &request)?;
    println!(
        "spike window {:.2}s..{:.2}s: {}",
        report.spike_window.start_s,
        report.spike_window.end_s,
        dir.display()
    );
    print_verdict(&report.verdict);
    Ok(())
}

fn run_record(args: RecordArgs) -> anyhow::Result<()> {
    let options = RecordOptions {
        // A recording is analysed later with either latency, so it carries both.
        probe: args.probe.settings(args.pid, true),
        duration: args.duration,
        out: args.out,
        progress: true,
    };
    let summary = runtime()?.block_on(async {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        record(&options, ctrl_c).await
    })?;
    if summary.target_exited {
        eprintln!(
            "target {} exited during the recording; kept what was captured",
            args.pid
        );
    }
    println!(
        "wrote {} ({} events, {} dropped in the kernel, {} stacks missing; {})",
        summary.path.display(),
        summary.events,
        summary.counters.lost(),
        summary.counters.stacks_missing,
        summary.counters.breakdown()
    );
    if let Some(line) = crate::offcpu_sampling::summary_line(&summary.offcpu_sampling_changes) {
        println!("{line}");
    }
    if let Some(line) = summary.own_cost.as_ref().and_then(OwnCost::summary) {
        println!("{line}");
    }
    Ok(())
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), ProbeError> {
    write_atomic(path, contents)
}

fn run_flamegraph(args: FlamegraphArgs) -> anyhow::Result<()> {
    if args.output.is_none() && args.folded.is_none() && args.top == 0 {
        return Err(ProbeError::InvalidArgument(
            "give --output FILE.svg, --folded FILE and/or --top N".into(),
        )
        .into());
    }
    let recording = Recording::load(&args.recording)?;
    let window = args.window.window(&recording);
    let folded = flamegraph::fold(&recording, args.kind, window, args.include_preempted);
    let total: u64 = folded.values().sum();
    for (weight, frames) in flamegraph::top_stacks(&folded, args.top) {
        let unit = match args.kind {
            FlameKind::Oncpu => "samples",
            FlameKind::Offcpu => "us",
        };
        println!(
            "{weight:>10} {unit} {:>5.1}%  {}",
            100.0 * weight as f64 / total.max(1) as f64,
            flamegraph::describe_stack(&frames, 3)
        );
    }
    if let Some(path) = &args.folded {
        write_file(path, flamegraph::folded_text(&folded).as_bytes())?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.output {
        let what = match args.kind {
            FlameKind::Oncpu => "On-CPU",
            FlameKind::Offcpu => "Off-CPU",
        };
        let title = format!(
            "{what}: {} (pid {})",
            recording.meta.comm, recording.meta.pid
        );
        let svg = flamegraph::render_svg(&folded, args.kind, &title)?;
        write_file(path, &svg)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn run_sched_delay(args: SchedDelayArgs) -> anyhow::Result<()> {
    let recording = Recording::load(&args.recording)?;
    let window = args.window.window(&recording);
    let histogram = histogram::run_queue_delays(&recording, window, args.cpu);
    let label = match args.cpu {
        Some(cpu) => format!("cpu{cpu}"),
        None => "all CPUs".to_string(),
    };
    let text = histogram::render_text(&[(&label, &histogram)]);
    print!("{text}");
    if let Some(path) = &args.text {
        write_file(path, text.as_bytes())?;
    }
    if let Some(path) = &args.output {
        let title = format!(
            "Run-queue delay: {} (pid {})",
            recording.meta.comm, recording.meta.pid
        );
        write_file(
            path,
            histogram::render_svg(&title, &[(&label, &histogram)]).as_bytes(),
        )?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn run_info(args: InfoArgs) -> anyhow::Result<()> {
    let recording = Recording::load(&args.recording)?;
    let meta = &recording.meta;
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    let mut sampled = crate::offcpu_sampling::SampledIntervals::default();
    for event in recording.events() {
        sampled.add(&event);
        let kind = match event {
            crate::events::Event::RunQueue { .. } => "run_queue",
            crate::events::Event::OffCpu { .. } => "off_cpu",
            crate::events::Event::OnCpuSample { .. } => "on_cpu_sample",
            crate::events::Event::TcpRetransmit { .. } => "tcp_retransmit",
            crate::events::Event::RequestServed { .. } => "request_served",
            crate::events::Event::RequestDelivered { .. } => "request_delivered",
            crate::events::Event::ExternalLatency { .. } => "external_latency",
            crate::events::Event::GoRuntime { .. } => "go_runtime",
        };
        *counts.entry(kind).or_default() += 1;
    }
    println!(
        "target: pid {} ({}) {}",
        meta.pid,
        meta.comm,
        meta.exe.as_deref().unwrap_or("?")
    );
    println!("length: {}", human_ns(recording.duration_ns()));
    println!("hooks: {}", meta.hooks);
    println!("events: {counts:?}");
    println!(
        "kernel: {} sent, {} dropped, {} stacks missing ({})",
        meta.counters.produced(),
        meta.counters.lost(),
        meta.counters.stacks_missing,
        meta.counters.breakdown()
    );
    if let Some(line) = sampled.summary() {
        println!("{line}");
    }
    if let Some(line) = meta.own_cost.as_ref().and_then(OwnCost::summary) {
        println!("{line}");
    }
    if meta.target_exited {
        println!("note: the target exited during the recording");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2.5").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn flags_parse_into_settings() {
        let cli = Cli::try_parse_from([
            "p99probe",
            "record",
            "--pid",
            "7",
            "--duration",
            "3s",
            "--min-offcpu",
            "0",
            "--sched-hook",
            "raw-tp",
        ])
        .unwrap();
        let Command::Record(args) = cli.command else {
            panic!("not record")
        };
        let settings = args.probe.settings(args.pid, true);
        assert_eq!(settings.pid, 7);
        assert_eq!(settings.min_offcpu_ns, 0);
        assert_eq!(settings.sample_hz, 499);
        assert_eq!(settings.sched_hook, Some(SchedHook::RawTp));
        assert_eq!(
            settings.calm_sample_divisor, 1,
            "a recording samples at full rate"
        );
        assert_eq!(args.duration, Some(Duration::from_secs(3)));
    }
}
