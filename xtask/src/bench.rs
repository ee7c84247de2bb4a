//! `cargo xtask bench`: what p99probe costs, measured against nothing attached and against the
//! tools a user would reach for instead (bpftrace, BCC), alternating configurations round by
//! round so drift cancels, and written to BENCHMARKS.md with medians and min–max.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

/// Runs on this VM vary by ±8% between neighbouring minutes; four alternating rounds keep a
/// median from resting on one lucky or unlucky run, and every run has nothing-attached runs
/// right before and after it to be compared with.
const ROUNDS: usize = 4;
const LOAD_SECONDS: u32 = 6;

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Tool {
    Nothing,
    P99probe,
    P99probeFullRate,
    P99probeDelivery,
    Bpftrace,
    Bcc,
    BccLibbpf,
    /// No tracing at all: a process that uses a known share of the load generator's CPU, to
    /// show how much this machine's closed loop amplifies any work that shares that CPU.
    BusyNeighbour,
    /// `attach` without its request-timing hooks (only through `--also`, like those below).
    WithoutRequestTiming,
    /// `attach` without its context-switch and wakeup hooks.
    WithoutScheduler,
    /// `attach` without its Go runtime uprobes.
    WithoutGoRuntime,
    /// `attach` without on-CPU sampling.
    WithoutSampling,
    /// `attach` with no hook at all: the agent's own process and what it reads.
    AgentOnly,
    /// `attach` with one scheduler hook per context switch (`sched_switch` alone), which walks
    /// stacks as a thread leaves the CPU, against the default pair.
    OneSchedulerHook,
    /// `attach` with every hook attached and every program returning at once: what the hooks
    /// cost by being there (dispatch, sampling interrupts, uprobe traps), the floor of any
    /// tool that follows the same events, apart from what the programs do.
    EmptyPrograms,
}

impl Tool {
    const ALL: [Tool; 8] = [
        Tool::Nothing,
        Tool::P99probe,
        Tool::P99probeFullRate,
        Tool::P99probeDelivery,
        Tool::Bpftrace,
        Tool::Bcc,
        Tool::BccLibbpf,
        Tool::BusyNeighbour,
    ];
    /// `p99probe attach` with one part of its cost taken away at a time: what `attach` costs
    /// a server is spread over its hook families, and these show each one's share; then with
    /// one scheduler hook per switch instead of two, and with every hook but programs that do
    /// nothing. Only run when `--also` names them.
    const DECOMPOSITION: [Tool; 7] = [
        Tool::WithoutRequestTiming,
        Tool::WithoutScheduler,
        Tool::WithoutGoRuntime,
        Tool::WithoutSampling,
        Tool::AgentOnly,
        Tool::OneSchedulerHook,
        Tool::EmptyPrograms,
    ];

    fn name(self) -> &'static str {
        match self {
            Tool::Nothing => "nothing attached",
            Tool::P99probe => "p99probe attach",
            Tool::P99probeFullRate => {
                "p99probe attach --calm-sample-hz 499 (full-rate sampling, as around a spike)"
            }
            Tool::P99probeDelivery => "p99probe attach --latency delivery",
            Tool::Bpftrace => "bpftrace (equivalent script)",
            Tool::Bcc => "BCC runqlat+offcputime+tcpretrans",
            Tool::BccLibbpf => "BCC libbpf-tools runqlat+offcputime (tcpretrans not packaged)",
            Tool::BusyNeighbour => {
                "calibration, no tracing: a process busy 1 ms every 50 ms (2%) on the load generator's CPU"
            }
            Tool::WithoutRequestTiming => {
                "p99probe attach --bench-without request-timing (no request is timed)"
            }
            Tool::WithoutScheduler => "p99probe attach --bench-without scheduler",
            Tool::WithoutGoRuntime => "p99probe attach --bench-without go-runtime",
            Tool::WithoutSampling => "p99probe attach --sample-hz 0",
            Tool::OneSchedulerHook => "p99probe attach --sched-hook tp-btf (one scheduler hook)",
            Tool::EmptyPrograms => {
                "p99probe attach --bench-empty-programs (every hook, each program returning at once)"
            }
            Tool::AgentOnly => {
                "p99probe attach --bench-without request-timing,scheduler,go-runtime --sample-hz 0 (the agent alone)"
            }
        }
    }

    /// The arguments `attach` takes beyond those every p99probe configuration shares, or
    /// `None` for a configuration that is not p99probe.
    fn attach_args(self) -> Option<&'static [&'static str]> {
        Some(match self {
            Tool::P99probe => &[],
            Tool::P99probeFullRate => &["--calm-sample-hz", "499"],
            Tool::P99probeDelivery => &["--latency", "delivery"],
            Tool::WithoutRequestTiming => &["--bench-without", "request-timing"],
            Tool::WithoutScheduler => &["--bench-without", "scheduler"],
            Tool::WithoutGoRuntime => &["--bench-without", "go-runtime"],
            Tool::WithoutSampling => &["--sample-hz", "0"],
            Tool::OneSchedulerHook => &["--sched-hook", "tp-btf"],
            Tool::EmptyPrograms => &["--bench-empty-programs"],
            Tool::AgentOnly => &[
                "--bench-without",
                "request-timing,scheduler,go-runtime",
                "--sample-hz",
                "0",
            ],
            Tool::Nothing | Tool::Bpftrace | Tool::Bcc | Tool::BccLibbpf | Tool::BusyNeighbour => {
                return None
            }
        })
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        unsafe { kill(self.0.id() as i32, 2) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

extern "C" {
    fn kill(pid: i32, signal: i32) -> i32;
}

fn bin(root: &Path, name: &str) -> PathBuf {
    root.join("target/release").join(name)
}

/// Starts `cmd` pinned to CPU 0 and waits for its `ready PORT` line.
fn start_ready(mut cmd: Command) -> Result<(Killed, u16)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("starting server")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let port = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {line:?}"))?;
    Ok((Killed(child), port))
}

/// wrk on CPU 1 against the Go server on `port`, for as long as it is left running.
fn endless_wrk(port: u16) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1", "wrk", "-t1", "-c8", "-d3600s"])
        .arg(format!("http://127.0.0.1:{port}/"));
    cmd
}

fn go_server(go_binary: &Path, args: &[&str]) -> Result<(Killed, u16)> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(go_binary)
        .args(args)
        // A safety net only (Killed stops it); the interleaved measurement alone runs over 10 min.
        .args(["-lifetime", "3600s"]);
    start_ready(cmd)
}

fn redis_server(port: u16) -> Result<Killed> {
    let child = Command::new("taskset")
        .args([
            "-c",
            "0",
            "redis-server",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    for _ in 0..100 {
        let ok = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"));
        if ok {
            return Ok(Killed(child));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("redis-server did not answer")
}

fn parse_wrk_latency(text: &str, label: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
    let value = line.split_whitespace().nth(1)?;
    let (number, unit) = value.split_at(value.find(|c: char| c.is_ascii_alphabetic())?);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        _ => return None,
    })
}

fn wrk(port: u16) -> Result<Sample> {
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1", "-c8", "--latency"])
        .arg(format!("-d{LOAD_SECONDS}s"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let throughput = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk output: {text}"))?;
    Ok(Sample {
        throughput,
        p50_ms: parse_wrk_latency(&text, "50%").unwrap_or(f64::NAN),
        p99_ms: parse_wrk_latency(&text, "99%").unwrap_or(f64::NAN),
    })
}

fn redis_benchmark(port: u16) -> Result<Sample> {
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "redis-benchmark",
            "-p",
            &port.to_string(),
            "-t",
            "get",
            "-c",
            "8",
            "-n",
            "400000",
            "--csv",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let row = text
        .lines()
        .find(|l| l.starts_with("\"GET\""))
        .with_context(|| format!("redis-benchmark output: {text}"))?;
    let fields: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    Ok(Sample {
        throughput: fields[0],
        p50_ms: fields.get(3).copied().unwrap_or(f64::NAN),
        p99_ms: fields.get(5).copied().unwrap_or(f64::NAN),
    })
}

const BPFTRACE_SCRIPT: &str = r#"
tracepoint:sched:sched_wakeup, tracepoint:sched:sched_wakeup_new { @qtime[args->pid] = nsecs; }
tracepoint:sched:sched_switch {
  if (args->prev_state == 0) { @qtime[args->prev_pid] = nsecs; }
  if (pid == PID) { @offstart[tid] = nsecs; @offstack[tid] = kstack; @offustack[tid] = ustack; }
  $q = @qtime[args->next_pid];
  if ($q) { @runq_us = hist((nsecs - $q) / 1000); delete(@qtime[args->next_pid]); }
  $s = @offstart[args->next_pid];
  if ($s) {
    @offcpu_us[@offstack[args->next_pid], @offustack[args->next_pid]] = sum((nsecs - $s) / 1000);
    delete(@offstart[args->next_pid]);
  }
}
tracepoint:tcp:tcp_retransmit_skb { @retransmits[args->sport, args->dport] = count(); }
profile:hz:99 /pid == PID/ { @oncpu[kstack, ustack] = count(); }
"#;

/// Where p99probe's stdout goes while the bench runs it: what it prints at exit (its own cost)
/// is read from there. Its readiness line is on stderr.
const P99PROBE_STDOUT: &str = "p99probe.stdout";

/// Starts `tool` on `pid` and returns once it says it is tracing; Err(reason) when the tool
/// cannot run on this machine.
fn start_tool(tool: Tool, pid: u32, root: &Path, scratch: &Path) -> Result<Vec<Killed>, String> {
    let spawn_with_stdout = |cmd: &mut Command, stdout: Stdio| -> Result<Killed, String> {
        cmd.stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .map(Killed)
            .map_err(|e| format!("{cmd:?}: {e}"))
    };
    let spawn = |cmd: &mut Command| spawn_with_stdout(cmd, Stdio::piped());
    let p99probe_stdout = || {
        let path = scratch.join(P99PROBE_STDOUT);
        std::fs::File::create(&path)
            .map(Stdio::from)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    // How each process shows its probes are in: p99probe prints its hook report, bpftrace
    // "Attaching N probes...", BCC "Tracing ...". libbpf-tools' C stdio holds its lines in a
    // buffer while stdout is a pipe (offcputime prints none until it exits anyway), so for
    // them the sign is a BPF link among their open files.
    let (mut running, ready): (Vec<Killed>, Ready) = match (tool, tool.attach_args()) {
        (Tool::Nothing, _) => return Ok(vec![]),
        // Pinned with the load generator, as the peers are. The calm rate is the bpftrace
        // script's 99 Hz unless the configuration sets its own (clap refuses a flag given
        // twice).
        (_, Some(extra)) => (
            vec![spawn_with_stdout(
                Command::new("taskset")
                    .args(["-c", "1"])
                    .arg(bin(root, "p99probe"))
                    .args(["attach", "--pid", &pid.to_string(), "--p99", "1h"])
                    .args(["--duration", "600s", "--out"])
                    .arg(scratch.join("captures"))
                    .args(if extra.contains(&"--calm-sample-hz") {
                        &[][..]
                    } else {
                        &["--calm-sample-hz", "99"][..]
                    })
                    .args(extra),
                p99probe_stdout()?,
            )?],
            Ready::Line("p99probe: tracing pid"),
        ),
        // Pinned like p99probe, so both share the load generator's CPU alike.
        (Tool::Bpftrace, _) => (
            vec![spawn(
                Command::new("taskset")
                    .args(["-c", "1", "bpftrace", "-e"])
                    .arg(BPFTRACE_SCRIPT.replace("PID", &pid.to_string())),
            )?],
            Ready::Line("Attaching"),
        ),
        (Tool::Bcc, _) => (
            vec![
                spawn(Command::new("runqlat-bpfcc").arg("-p").arg(pid.to_string())),
                spawn(
                    Command::new("offcputime-bpfcc")
                        .arg("-p")
                        .arg(pid.to_string()),
                ),
                spawn(&mut Command::new("tcpretrans-bpfcc")),
            ]
            .into_iter()
            .collect::<Result<_, _>>()?,
            Ready::Line("Tracing"),
        ),
        // BCC's own CO-RE rewrites of the same tools: they need BTF, not kernel headers.
        // Pinned like p99probe and bpftrace.
        (Tool::BccLibbpf, _) => (
            ["runqlat", "offcputime"]
                .into_iter()
                .map(|program| {
                    spawn(
                        Command::new("taskset")
                            .args(["-c", "1", program, "-p"])
                            .arg(pid.to_string()),
                    )
                })
                .collect::<Result<_, _>>()?,
            Ready::BpfLink,
        ),
        (Tool::BusyNeighbour, _) => (
            vec![spawn(
                Command::new(bin(root, "p99probe-target"))
                    .args([
                        "duty",
                        "--cpu",
                        "1",
                        "--busy-us",
                        "1000",
                        "--period-us",
                        "50000",
                    ])
                    .args(["--duration", "600"]),
            )?],
            Ready::Line("ready"),
        ),
        (_, None) => unreachable!("every p99probe configuration has its attach arguments"),
    };
    for killed in running.iter_mut() {
        // Both streams are read to the end: a tool blocked on a full pipe would stall. The
        // markers go to stdout or stderr depending on the tool.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = killed
            .0
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let stderr = killed
            .0
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let mut last_line = String::new();
        // bpftrace compiles its script first; allow for a slow machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        let failure = loop {
            if ready == Ready::BpfLink && holds_bpf_link(killed.0.id()) {
                break None;
            }
            let wait = match ready {
                Ready::Line(_) => deadline.saturating_duration_since(Instant::now()),
                Ready::BpfLink => Duration::from_millis(50),
            };
            match rx.recv_timeout(wait) {
                Ok(line) if matches!(ready, Ready::Line(marker) if line.contains(marker)) => {
                    break None
                }
                Ok(line) => {
                    if !line.trim().is_empty() {
                        last_line = line;
                    }
                }
                // Both streams closed: it is exiting.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = killed.0.wait().map(|s| s.to_string()).unwrap_or_default();
                    break Some(format!("exited with {status}: {last_line}"));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    break Some(format!(
                        "did not report tracing within 60 s (waiting for {ready:?}); last output: {last_line}"
                    ))
                }
            }
        };
        if let Some(reason) = failure {
            return Err(reason);
        }
    }
    // The tools print before their last probes are in (bpftrace) or right after; let
    // attaching settle so it is not counted as overhead.
    std::thread::sleep(SETTLE);
    Ok(running)
}

const SETTLE: Duration = Duration::from_millis(700);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Ready {
    /// It prints a line containing this.
    Line(&'static str),
    /// It holds a BPF link: a program is attached.
    BpfLink,
}

fn holds_bpf_link(pid: u32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_to_string(fd.path()).is_ok_and(|info| info.contains("link_type:")))
}

fn stats(values: &[f64]) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn fmt_stat(values: &[f64], digits: usize) -> String {
    let (median, min, max) = stats(values);
    format!("{median:.digits$} ({min:.digits$}–{max:.digits$})")
}

/// Separate runs, each with its own server: every configuration's run sits between two
/// nothing-attached runs, so each can be compared with what ran just before and after it.
struct Overhead {
    server: &'static str,
    load: &'static str,
    /// The nothing-attached runs, in the order they ran.
    nothing: Vec<Sample>,
    /// Every other configuration's runs, or why it cannot run here.
    results: Vec<(Tool, Result<Vec<SeparateRun>, String>)>,
}

struct SeparateRun {
    sample: Sample,
    /// Index in `Overhead::nothing` of the run right before this one; the next ran right after.
    nothing_before: usize,
}

impl Overhead {
    /// The runs of `tool` (not `Tool::Nothing`), or why it could not run.
    fn runs(&self, tool: Tool) -> Result<&[SeparateRun], &str> {
        match self.results.iter().find(|(t, _)| *t == tool) {
            Some((_, Ok(runs))) => Ok(runs),
            Some((_, Err(reason))) => Err(reason),
            None => Ok(&[]),
        }
    }

    /// One figure of every run of `tool`, or empty when it did not run.
    fn column(&self, tool: Tool, figure: fn(&Sample) -> f64) -> Vec<f64> {
        if tool == Tool::Nothing {
            return self.nothing.iter().map(figure).collect();
        }
        self.runs(tool)
            .unwrap_or_default()
            .iter()
            .map(|run| figure(&run.sample))
            .collect()
    }

    /// Each run's P99 divided by the mean P99 of the nothing-attached runs right before and
    /// after it, so drift of the machine slower than a run cancels. For `Tool::Nothing`, each
    /// nothing-attached run against its own two neighbours: the null control.
    fn p99_ratios(&self, tool: Tool) -> Vec<f64> {
        let around = |before: usize| -> Option<f64> {
            let after = self.nothing.get(before + 1)?;
            Some((self.nothing[before].p99_ms + after.p99_ms) / 2.0)
        };
        if tool == Tool::Nothing {
            return (1..self.nothing.len().saturating_sub(1))
                .map(|i| {
                    let neighbours =
                        (self.nothing[i - 1].p99_ms + self.nothing[i + 1].p99_ms) / 2.0;
                    self.nothing[i].p99_ms / neighbours
                })
                .collect();
        }
        self.runs(tool)
            .unwrap_or_default()
            .iter()
            .filter_map(|run| Some(run.sample.p99_ms / around(run.nothing_before)?))
            .collect()
    }
}

fn overhead(
    server: &'static str,
    load: &'static str,
    root: &Path,
    scratch: &Path,
    start: &dyn Fn() -> Result<(Killed, u16)>,
    measure: &dyn Fn(u16) -> Result<Sample>,
) -> Result<Overhead> {
    // Ok(Err(reason)): the tool cannot run here.
    let run = |tool: Tool, label: &str| -> Result<Result<Sample, String>> {
        let (server_process, port) = start()?;
        eprintln!("bench: {server} {label} / {}", tool.name());
        let sample = match start_tool(tool, server_process.0.id(), root, scratch) {
            Ok(running) => {
                let sample = measure(port)?;
                drop(running);
                Ok(sample)
            }
            Err(reason) => Err(reason),
        };
        drop(server_process);
        Ok(sample)
    };
    let nothing_run = |label: &str| -> Result<Sample> {
        run(Tool::Nothing, label)?.map_err(|reason| anyhow::anyhow!("{reason}"))
    };
    let mut nothing = vec![nothing_run("first run")?];
    let mut results: Vec<(Tool, Result<Vec<SeparateRun>, String>)> = Tool::ALL
        .iter()
        .filter(|t| **t != Tool::Nothing)
        .map(|t| (*t, Ok(Vec::new())))
        .collect();
    for round in 0..ROUNDS {
        let label = format!("round {}", round + 1);
        for (tool, result) in results.iter_mut() {
            let Ok(runs) = result else { continue };
            match run(*tool, &label)? {
                Ok(sample) => {
                    runs.push(SeparateRun {
                        sample,
                        nothing_before: nothing.len() - 1,
                    });
                    nothing.push(nothing_run(&label)?);
                }
                Err(reason) => *result = Err(reason),
            }
        }
    }
    Ok(Overhead {
        server,
        load,
        nothing,
        results,
    })
}

/// Length of each phase of the interleaved measurement: long enough to average out
/// sub-second jitter, short enough that many phases fit in a few minutes.
const PHASE: Duration = Duration::from_secs(2);

/// `p99probe-target load` on CPU 1: a closed-loop load like `wrk -t1 -c8` that reports
/// throughput and latency percentiles per phase (wrk and redis-benchmark report only at exit,
/// so under them interleaved phases could compare throughput but not P99).
struct LoadGenerator {
    process: Killed,
    control: ChildStdin,
    reports: BufReader<ChildStdout>,
}

/// What the load generator measured over one phase.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LoadPhase {
    requests: f64,
    requests_per_second: f64,
    p99_us: f64,
    p999_us: f64,
    /// Busy CPU time of the whole machine over the phase, ns (0 where not measured).
    machine_busy_ns: u64,
    /// The largest share of a CPU's time the hypervisor took during the phase.
    most_stolen: f64,
}

impl LoadPhase {
    /// The whole machine's busy CPU time per request: the server's, the load generator's, the
    /// kernel's (network stack, a tool's programs and its interrupts) and a tool's own
    /// process. It is what sets the throughput of a server that saturates its CPU. In a closed
    /// loop it still moves with the host (a CPU woken from idle for each request costs more
    /// than a busy one): in the runs so far its intervals were about as wide as throughput's.
    fn cpu_ns_per_request(&self) -> f64 {
        self.machine_busy_ns as f64 / self.requests
    }
}

/// A reading of /proc/stat's CPU time counters.
#[derive(Clone, Debug, Default, PartialEq)]
struct CpuTimes {
    /// Busy time of all CPUs, ticks: user, nice, system, irq and softirq. Idle, I/O wait and
    /// steal (the hypervisor running others) are not this machine's work.
    busy_ticks: u64,
    /// Each CPU's stolen and total ticks.
    per_cpu: Vec<(u64, u64)>,
}

impl CpuTimes {
    const NS_PER_TICK: u64 = 10_000_000;

    fn read() -> Result<CpuTimes> {
        Self::parse(&std::fs::read_to_string("/proc/stat")?)
    }

    fn parse(stat: &str) -> Result<CpuTimes> {
        let ticks = |fields: &str| -> Vec<u64> {
            fields
                .split_whitespace()
                .map(|n| n.parse().unwrap_or(0))
                .collect()
        };
        let field = |ticks: &[u64], i: usize| ticks.get(i).copied().unwrap_or(0);
        let all = ticks(
            stat.lines()
                .find_map(|l| l.strip_prefix("cpu "))
                .context("no cpu line in /proc/stat")?,
        );
        let per_cpu = stat
            .lines()
            .filter_map(|l| l.strip_prefix("cpu")?.split_once(' '))
            .filter(|(n, _)| n.parse::<u32>().is_ok())
            .map(|(_, fields)| {
                let t = ticks(fields);
                (field(&t, 7), t.iter().sum())
            })
            .collect();
        Ok(CpuTimes {
            busy_ticks: [0, 1, 2, 5, 6].iter().map(|&i| field(&all, i)).sum(),
            per_cpu,
        })
    }

    /// The machine's busy CPU time since `earlier`, ns.
    fn busy_ns_since(&self, earlier: &CpuTimes) -> u64 {
        self.busy_ticks.saturating_sub(earlier.busy_ticks) * Self::NS_PER_TICK
    }

    /// The largest share of any CPU's time the hypervisor took since `earlier`.
    fn most_stolen_since(&self, earlier: &CpuTimes) -> f64 {
        self.per_cpu
            .iter()
            .zip(&earlier.per_cpu)
            .map(|(&(steal, total), &(steal0, total0))| {
                steal.saturating_sub(steal0) as f64 / total.saturating_sub(total0).max(1) as f64
            })
            .fold(0.0, f64::max)
    }
}

/// A phase in which the hypervisor took more than this share of either CPU is left out of the
/// interleaved ratios, with the phases either side of it. This KVM guest has had 40–50% of both
/// CPUs stolen for ten seconds at a time: in 1 s windows under redis with nothing attached,
/// 8–35 k requests/s then, against 98 k on average in 79 windows under 5% stolen. A
/// tool phase or a nothing-phase caught in such a stretch made the ratios' widest outliers.
const STEAL_LIMIT: f64 = 0.2;

/// The connections the load generator keeps busy, as wrk's `-c8` and redis-benchmark's `-c 8`.
const LOAD_CONNECTIONS: &str = "8";

impl LoadGenerator {
    fn start(root: &Path, port: u16, protocol: &str) -> Result<LoadGenerator> {
        LoadGenerator::spawn(
            Command::new("taskset")
                .args(["-c", "1"])
                .arg(bin(root, "p99probe-target"))
                .args(["load", "--conns", LOAD_CONNECTIONS, "--protocol", protocol])
                .args(["--port", &port.to_string(), "--duration", "3600"]),
        )
    }

    /// A `p99probe-target` mode that reports a line per line read on stdin, once it is ready.
    fn spawn(cmd: &mut Command) -> Result<LoadGenerator> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let control = child.stdin.take().context("load generator stdin")?;
        let mut reports = BufReader::new(child.stdout.take().context("load generator stdout")?);
        let mut line = String::new();
        reports.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("{cmd:?} did not start: {line:?}");
        }
        Ok(LoadGenerator {
            process: Killed(child),
            control,
            reports,
        })
    }

    /// Ends the generator's current phase and returns its report line.
    fn end_phase(&mut self) -> Result<String> {
        writeln!(self.control).context("signalling the load generator")?;
        self.control.flush()?;
        let mut line = String::new();
        if self.reports.read_line(&mut line)? == 0 {
            bail!("the load generator exited");
        }
        Ok(line)
    }

    /// A fresh phase of `span`: whatever ran before it (a tool attaching, say) is left out.
    /// Its report line, and the machine's CPU times at its start and end.
    fn timed_phase(&mut self, span: Duration) -> Result<(String, CpuTimes, CpuTimes)> {
        self.end_phase()?;
        let before = CpuTimes::read()?;
        std::thread::sleep(span);
        let after = CpuTimes::read()?;
        Ok((self.end_phase()?, before, after))
    }

    fn phase(&mut self, span: Duration) -> Result<LoadPhase> {
        let (line, before, after) = self.timed_phase(span)?;
        let mut phase = parse_load_phase(&line)?;
        phase.machine_busy_ns = after.busy_ns_since(&before);
        phase.most_stolen = after.most_stolen_since(&before);
        if phase.requests_per_second == 0.0 {
            bail!("the server answered nothing for {span:?}: it stopped or hung");
        }
        Ok(phase)
    }
}

/// Parses `phase requests N seconds S errors E ... p99_us X ...`; a phase with
/// connection errors is refused, since its figures would mix in reconnects.
fn parse_load_phase(line: &str) -> Result<LoadPhase> {
    let field = |name: &str| phase_field(line, name);
    if line.split_whitespace().next() != Some("phase") {
        bail!("not a load generator report: {line:?}");
    }
    if field("errors")? > 0.0 {
        bail!("the load generator's connections failed during a phase: {line:?}");
    }
    let requests = field("requests")?;
    Ok(LoadPhase {
        requests,
        requests_per_second: requests / field("seconds")?,
        p99_us: field("p99_us")?,
        p999_us: field("p999_us")?,
        machine_busy_ns: 0,
        most_stolen: 0.0,
    })
}

/// The number after `name` in a `phase ...` report line of `p99probe-target`.
fn phase_field(line: &str, name: &str) -> Result<f64> {
    let mut words = line.split_whitespace();
    words
        .by_ref()
        .position(|w| w == name)
        .and_then(|_| words.next()?.parse().ok())
        .with_context(|| format!("no {name} in the report {line:?}"))
}

/// The write() calls `pid` has made: one per response, for net/http and redis alike (redis:
/// 200 001 writes for `redis-benchmark -n 200000`), so they count responses without the
/// load generator's help.
fn server_writes(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("reading /proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no syscw in /proc/PID/io")
}

/// One tool phase of the interleaved measurement.
#[derive(Clone, Copy, Debug)]
struct Phase {
    /// Requests served, over the mean of the nothing-phases either side.
    ratio: f64,
    /// The phase's P99 over the mean P99 of the nothing-phases either side.
    p99_ratio: f64,
    /// The phase's own P99, in microseconds.
    p99_us: f64,
    /// The phase's P99.9 over the mean P99.9 of the nothing-phases either side: where a
    /// tool's short bursts of work on a shared CPU show first.
    p999_ratio: f64,
    /// CPU the tool's own processes used during the phase (user + system, % of one CPU).
    tool_cpu_percent: f64,
    /// The machine's busy CPU time per request over that of the nothing-phases either side.
    cpu_per_request_ratio: f64,
}

impl Phase {
    /// A tool's phase against the nothing-phases either side; each phase comes with the CPU the
    /// tool's processes used in it.
    fn between(phases: &Neighbours<(LoadPhase, f64)>) -> Phase {
        let (before, after) = (&phases.before.0, &phases.after.0);
        let (during, tool_cpu_percent) = (&phases.during.0, phases.during.1);
        let against_neighbours = |figure: fn(&LoadPhase) -> f64| {
            figure(during) / ((figure(before) + figure(after)) / 2.0)
        };
        Phase {
            ratio: against_neighbours(|p| p.requests_per_second),
            p99_ratio: against_neighbours(|p| p.p99_us),
            p99_us: during.p99_us,
            p999_ratio: against_neighbours(|p| p.p999_us),
            tool_cpu_percent,
            cpu_per_request_ratio: against_neighbours(LoadPhase::cpu_ns_per_request),
        }
    }
}

/// A goal judged from the interleaved phases' ratios of p99probe to nothing attached.
struct InterleavedGoal {
    figure: &'static str,
    ratios: fn(&Paired, Tool) -> Vec<f64>,
    meets: fn(f64) -> bool,
    /// Whether a larger ratio means a cheaper tool (throughput), or a dearer one (P99).
    larger_is_cheaper: bool,
}

/// Throughput and P99 ratios from interleaved phases on one server under one continuous load.
struct Paired {
    server: &'static str,
    /// The load command, as the table's heading shows it.
    load: String,
    results: Vec<(Tool, Result<ToolPhases, String>)>,
}

/// A tool's interleaved phases, and how many were left out for the hypervisor's steal.
#[derive(Debug, Default)]
struct ToolPhases {
    phases: Vec<Phase>,
    left_out: usize,
}

/// A configuration's phases from [`interleave`]: each kept one with the nothing-phases right
/// before and after it, and how many were left out for the hypervisor's steal.
struct Interleaved<P> {
    kept: Vec<Neighbours<P>>,
    left_out: usize,
}

/// A phase with something running, between the nothing-phases either side.
struct Neighbours<P> {
    before: P,
    during: P,
    after: P,
}

/// Alternates phases of one continuous workload: nothing, the first configuration, nothing,
/// the next, ... for `rounds` rounds, so drift slower than a few seconds cancels, which
/// separate runs on this VM cannot achieve (their throughput differs by up to 30% minute to
/// minute). `start(i)` starts configuration `i` (no process: nothing runs, the null control);
/// `measure` measures a phase, given what runs during it; a phase in which the hypervisor took
/// more than [`STEAL_LIMIT`] of a CPU, in it or either neighbour, is left out, and up to half
/// as many rounds again make up for those. A configuration that cannot start is left with
/// the reason, and the others go on.
fn interleave<P: Clone>(
    progress: &str,
    names: &[&str],
    rounds: usize,
    mut start: impl FnMut(usize) -> Result<Vec<Killed>, String>,
    mut measure: impl FnMut(&[Killed]) -> Result<P>,
    most_stolen: impl Fn(&P) -> f64,
) -> Result<Vec<Result<Interleaved<P>, String>>> {
    let mut results: Vec<Result<Interleaved<P>, String>> = names
        .iter()
        .map(|_| {
            Ok(Interleaved {
                kept: Vec::new(),
                left_out: 0,
            })
        })
        .collect();
    let mut before = measure(&[])?;
    for round in 0..rounds + rounds / 2 {
        for (i, result) in results.iter_mut().enumerate() {
            let Ok(measured) = result else { continue };
            if measured.kept.len() >= rounds {
                continue;
            }
            eprintln!("bench: {progress} round {} / {}", round + 1, names[i]);
            let running = match start(i) {
                Ok(running) => running,
                Err(reason) => {
                    *result = Err(reason);
                    continue;
                }
            };
            if running.is_empty() {
                std::thread::sleep(SETTLE);
            }
            let during = measure(&running)?;
            drop(running);
            std::thread::sleep(Duration::from_millis(300));
            let after = measure(&[])?;
            let stolen = [&before, &during, &after]
                .into_iter()
                .map(&most_stolen)
                .fold(0.0, f64::max);
            if stolen > STEAL_LIMIT {
                measured.left_out += 1;
            } else {
                measured.kept.push(Neighbours {
                    before: before.clone(),
                    during,
                    after: after.clone(),
                });
            }
            before = after;
        }
        let done = results
            .iter()
            .all(|r| r.as_ref().map_or(true, |m| m.kept.len() >= rounds));
        if done {
            break;
        }
    }
    Ok(results)
}

/// Runs the server and its load once and interleaves the tools' phases with nothing-phases
/// ([`interleave`]). Each tool phase is compared with the nothing-phases right before and after
/// it. A `Tool::Nothing` phase is the null control: its ratios show what the method can
/// resolve.
fn paired(
    server: &'static str,
    root: &Path,
    scratch: &Path,
    start: &dyn Fn() -> Result<(Killed, u16)>,
    protocol: &str,
    rounds: usize,
    configs: &[Tool],
) -> Result<Paired> {
    let (server_process, port) = start()?;
    let pid = server_process.0.id();
    let mut generator = LoadGenerator::start(root, port, protocol)?;
    std::thread::sleep(Duration::from_secs(2));
    let names: Vec<&str> = configs.iter().map(|t| t.name()).collect();
    let interleaved = interleave(
        &format!("{server} interleaved"),
        &names,
        rounds,
        |i| start_tool(configs[i], pid, root, scratch),
        |running| {
            let (t0, cpu0) = (Instant::now(), processes_cpu_ns(running));
            let phase = generator.phase(PHASE)?;
            let cpu_percent =
                cpu_percent_of(processes_cpu_ns(running).saturating_sub(cpu0), t0.elapsed());
            Ok((phase, cpu_percent))
        },
        |(phase, _)| phase.most_stolen,
    )?;
    let results = configs
        .iter()
        .zip(interleaved)
        .map(|(tool, result)| {
            let phases = result.map(|measured| ToolPhases {
                phases: measured.kept.iter().map(Phase::between).collect(),
                left_out: measured.left_out,
            });
            (*tool, phases)
        })
        .collect();
    drop(generator);
    drop(server_process);
    Ok(Paired {
        server,
        load: format!("p99probe-target load --conns {LOAD_CONNECTIONS} --protocol {protocol}"),
        results,
    })
}

/// How a mean with a 95% confidence interval stands against a goal that `meets` tells.
fn against_goal(mean: f64, ci: f64, meets: fn(f64) -> bool) -> &'static str {
    let both_ends = meets(mean - ci) && meets(mean + ci);
    let either_end = meets(mean - ci) || meets(mean + ci);
    match (meets(mean), both_ends, either_end) {
        (true, true, _) => "met",
        (true, false, _) => "met on the mean, but the interval reaches past the goal",
        (false, _, true) => "missed on the mean, but the interval reaches the goal",
        (false, _, false) => "missed",
    }
}

/// How p99probe's cost stands against a peer's, each a mean with its 95% interval: only
/// intervals apart say less or more.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ComparedCost {
    Less,
    More,
    Overlapping,
}

impl ComparedCost {
    /// `larger_is_cheaper`: the figure is throughput-like; otherwise ns- or CPU-like.
    fn of(ours: (f64, f64), peer: (f64, f64), larger_is_cheaper: bool) -> ComparedCost {
        let ((mean, ci), (peer_mean, peer_ci)) = (ours, peer);
        let (ours_lower, peer_lower) = (
            mean + ci < peer_mean - peer_ci,
            peer_mean + peer_ci < mean - ci,
        );
        match (ours_lower, peer_lower, larger_is_cheaper) {
            (true, _, false) | (_, true, true) => ComparedCost::Less,
            (true, _, true) | (_, true, false) => ComparedCost::More,
            _ => ComparedCost::Overlapping,
        }
    }
}

impl std::fmt::Display for ComparedCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComparedCost::Less => "less",
            ComparedCost::More => "more",
            ComparedCost::Overlapping => "about the same (intervals overlap)",
        })
    }
}

/// Mean and the half-width of its 95% confidence interval (Student's t).
fn mean_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n < 2 {
        return (values.first().copied().unwrap_or(f64::NAN), f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // Two-sided 95% quantiles for 1..=30 degrees of freedom.
    const T95: [f64; 30] = [
        12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    let t = T95.get(n - 2).copied().unwrap_or_else(|| {
        // Beyond the table, the normal quantile with the first Cornish–Fisher term: within
        // 0.003 of the true one (the normal value alone is up to 0.08 too small there).
        const Z: f64 = 1.96;
        let df = (n - 1) as f64;
        Z + (Z.powi(3) + Z) / (4.0 * df)
    });
    (mean, t * (variance / n as f64).sqrt())
}

impl Paired {
    /// One figure of every phase of `tool`, or empty when it did not run.
    fn column(&self, tool: Tool, figure: fn(&Phase) -> f64) -> Vec<f64> {
        self.results
            .iter()
            .find(|(t, _)| *t == tool)
            .and_then(|(_, r)| r.as_ref().ok())
            .map(|measured| measured.phases.iter().map(figure).collect())
            .unwrap_or_default()
    }

    fn ratios(&self, tool: Tool) -> Vec<f64> {
        self.column(tool, |p| p.ratio)
    }

    fn p99_ratios(&self, tool: Tool) -> Vec<f64> {
        self.column(tool, |p| p.p99_ratio)
    }

    fn cpu_per_request_ratios(&self, tool: Tool) -> Vec<f64> {
        self.column(tool, |p| p.cpu_per_request_ratio)
    }

    /// The throughput and P99 goals as judged from these phases, with the peers beside.
    fn goal_lines(&self) -> Vec<String> {
        [
            InterleavedGoal {
                figure: "throughput ≥ 98% of nothing attached",
                ratios: Paired::ratios,
                meets: |r| r >= 0.98,
                larger_is_cheaper: true,
            },
            InterleavedGoal {
                figure: "P99 inflation ≤ 5%",
                ratios: Paired::p99_ratios,
                meets: |r| r <= 1.05,
                larger_is_cheaper: false,
            },
            InterleavedGoal {
                figure: "the machine's CPU per request ≤ 102% (what throughput ≥ 98% needs where the CPU is the limit)",
                ratios: Paired::cpu_per_request_ratios,
                meets: |r| r <= 1.0 / 0.98,
                larger_is_cheaper: false,
            },
        ]
        .into_iter()
        .map(
            |InterleavedGoal {
                 figure,
                 ratios,
                 meets,
                 larger_is_cheaper,
             }| {
                let (mean, ci) = mean_ci95(&ratios(self, Tool::P99probe));
                let (null_mean, null_ci) = mean_ci95(&ratios(self, Tool::Nothing));
                let peers: Vec<String> = [
                    (Tool::Bpftrace, "bpftrace equivalent"),
                    (Tool::BccLibbpf, "BCC libbpf-tools"),
                ]
                .into_iter()
                .map(|(tool, label)| {
                    let peer = ratios(self, tool);
                    if peer.is_empty() {
                        return format!("{label}: did not run");
                    }
                    let (peer_mean, peer_ci) = mean_ci95(&peer);
                    let cost =
                        ComparedCost::of((mean, ci), (peer_mean, peer_ci), larger_is_cheaper);
                    format!(
                        "{label}: {:.1}% ± {:.1}, p99probe costs {cost}",
                        peer_mean * 100.0,
                        peer_ci * 100.0
                    )
                })
                .collect();
                format!(
                    "- {}: {figure}: {:.1}% ± {:.1} of nothing attached — {}; {} (interleaved phases; null control {:.1}% ± {:.1})",
                    self.server,
                    mean * 100.0,
                    ci * 100.0,
                    against_goal(mean, ci, meets),
                    peers.join("; "),
                    null_mean * 100.0,
                    null_ci * 100.0,
                )
            })
            .collect()
    }

    fn write_table(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## Interleaved phases: {} under `{}`\n",
            self.server, self.load
        );
        let _ = writeln!(
            md,
            "| configuration | throughput ratio, mean ± 95% CI | median | min–max | P99 ratio, mean ± 95% CI | median | min–max | P99 (µs), median | P99.9 ratio, median (min–max) | machine's CPU per request, ratio, mean ± 95% CI | phases (left out for steal) | tool's own CPU, % of one CPU (median) |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for (tool, result) in &self.results {
            let name = if *tool == Tool::Nothing {
                "nothing attached (null control)"
            } else {
                tool.name()
            };
            let measured = match result {
                Ok(measured) => measured,
                Err(reason) => {
                    let _ = writeln!(
                        md,
                        "| {name} | does not run here: {} | | | | | | | | | | |",
                        reason.replace('|', "/")
                    );
                    continue;
                }
            };
            let mut cells = String::new();
            for ratios in [self.ratios(*tool), self.p99_ratios(*tool)] {
                let (mean, ci) = mean_ci95(&ratios);
                let (median, min, max) = stats(&ratios);
                let _ = write!(
                    cells,
                    " {mean:.3} ± {ci:.3} | {median:.3} | {min:.3}–{max:.3} |"
                );
            }
            let p99_us = stats(&self.column(*tool, |p| p.p99_us)).0;
            let p999 = fmt_stat(&self.column(*tool, |p| p.p999_ratio), 2);
            let (cpu_mean, cpu_ci) = mean_ci95(&self.cpu_per_request_ratios(*tool));
            let cpu = if *tool == Tool::Nothing {
                "—".to_string()
            } else {
                format!(
                    "{:.1}",
                    stats(&self.column(*tool, |p| p.tool_cpu_percent)).0
                )
            };
            let _ = writeln!(
                md,
                "| {name} |{cells} {p99_us:.0} | {p999} | {cpu_mean:.3} ± {cpu_ci:.3} | {} ({}) | {cpu} |",
                measured.phases.len(),
                measured.left_out,
            );
        }
        let _ = writeln!(md);
    }
}

/// CPU time of process `pid`'s threads, ns, from their schedstat (the scheduler's ns count;
/// /proc/PID/stat counts 10 ms ticks, too coarse for an agent using a fraction of a percent).
/// A thread that has exited no longer counts: the tools measured keep theirs.
fn proc_cpu_ns(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
            .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            .sum(),
    )
}

/// CPU time of `processes` (a tool's), ns; see [`proc_cpu_ns`].
fn processes_cpu_ns(processes: &[Killed]) -> u64 {
    processes.iter().filter_map(|k| proc_cpu_ns(k.0.id())).sum()
}

/// The agent's resident memory: its own (anonymous) and the kernel maps it has mapped (the
/// timing rings, the event ring buffer and the trigger's histograms, resident in full from the
/// moment they are mapped), in MB. VmRSS would add the two, and the pages of the binary besides.
fn agent_memory_mb(pid: u32) -> (f64, f64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut own_kb, mut maps_kb, mut in_bpf_map) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            in_bpf_map = line.ends_with("anon_inode:bpf-map");
            continue;
        }
        let kb = || {
            fields
                .clone()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Anonymous:" => own_kb += kb(),
            "Rss:" if in_bpf_map => maps_kb += kb(),
            _ => {}
        }
    }
    (own_kb as f64 / 1024.0, maps_kb as f64 / 1024.0)
}

/// Per-round figures of the agent draining the kernel's events.
#[derive(Default)]
struct Drain {
    events_per_s: Vec<f64>,
    drops: Vec<f64>,
    cpu_percent: Vec<f64>,
}

impl Drain {
    /// Median events/s and median agent CPU %.
    fn medians(&self) -> (f64, f64) {
        (stats(&self.events_per_s).0, stats(&self.cpu_percent).0)
    }

    /// The table head and the rows both drain measurements share.
    fn write_rows(&self, md: &mut String, cpu_label: &str) {
        let (eps, cpu) = self.medians();
        let _ = writeln!(md, "| metric | value |\n|---|---|");
        let _ = writeln!(
            md,
            "| events/s drained | {} |",
            fmt_stat(&self.events_per_s, 0)
        );
        let _ = writeln!(
            md,
            "| events dropped in the kernel (per run) | {} |",
            fmt_stat(&self.drops, 0)
        );
        let _ = writeln!(md, "| {cpu_label} | {} |", fmt_stat(&self.cpu_percent, 1));
        let _ = writeln!(
            md,
            "| agent CPU % per 100k events/s | {:.2} |",
            cpu / (eps / 100_000.0)
        );
    }
}

/// CPU % of one CPU that `cpu_ns` of CPU time are over `span`.
fn cpu_percent_of(cpu_ns: u64, span: Duration) -> f64 {
    cpu_ns as f64 / span.as_nanos() as f64 * 100.0
}

/// CPU % of process `pid` over `span`, starting now.
fn cpu_percent_during(pid: u32, span: Duration) -> f64 {
    let (t0, c0) = (Instant::now(), proc_cpu_ns(pid).unwrap_or(0));
    std::thread::sleep(span);
    cpu_percent_of(
        proc_cpu_ns(pid).unwrap_or(0).saturating_sub(c0),
        t0.elapsed(),
    )
}

struct Pipeline {
    switches: Drain,
    /// `record`'s own memory 2 s and 5 s into each recording, MB: it streams to disk, so the
    /// two should match.
    record_memory_mb: (Vec<f64>, Vec<f64>),
    /// The recording's size on disk per event, bytes.
    record_bytes_per_event: Vec<f64>,
    rss_full_mb: f64,
    /// The kernel maps the agent had mapped then.
    kernel_maps_mb: f64,
    storm: Storm,
}

/// The agent under an event storm it cannot fall behind on unnoticed: one event per system
/// call of a target that does nothing else.
#[derive(Default)]
struct Storm {
    drain: Drain,
    rss_mb: Vec<f64>,
}

const STORM_SECONDS: u64 = 8;

fn storm(root: &Path, scratch: &Path) -> Result<Storm> {
    let mut result = Storm::default();
    for round in 0..ROUNDS {
        eprintln!("bench: event storm round {}", round + 1);
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(bin(root, "p99probe-target"))
            .args(["syscalls", "--duration", "30"]);
        let target = Killed(cmd.stdout(Stdio::piped()).spawn()?);
        std::thread::sleep(Duration::from_millis(300));
        let agent = Command::new("taskset")
            .args(["-c", "1"])
            .arg(bin(root, "p99probe"))
            .args(["attach", "--pid", &target.0.id().to_string()])
            .args(["--p99", "1h", "--synthetic-syscall-events", "--duration"])
            .arg(format!("{STORM_SECONDS}s"))
            .arg("--out")
            .arg(scratch.join("captures"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = agent.id();
        std::thread::sleep(Duration::from_secs(2));
        let cpu_percent = cpu_percent_during(pid, Duration::from_secs(4));
        result.rss_mb.push(agent_memory_mb(pid).0);
        let out = agent.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "0 capture(s); N events sent, M dropped in the kernel"
        let line = text
            .lines()
            .find(|l| l.contains("events sent"))
            .with_context(|| format!("attach output: {text}"))?;
        let number = |after: &str| -> f64 {
            line.split(after)
                .next()
                .and_then(|head| head.split_whitespace().last())
                .and_then(|n| n.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let drain = &mut result.drain;
        drain
            .events_per_s
            .push(number(" events sent") / STORM_SECONDS as f64);
        drain.drops.push(number(" dropped"));
        drain.cpu_percent.push(cpu_percent);
        drop(target);
    }
    Ok(result)
}

fn info_field(text: &str, prefix: &str, index: usize) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))?
        .split_whitespace()
        .nth(index)?
        .trim_end_matches(',')
        .parse()
        .ok()
}

fn pipeline(root: &Path, scratch: &Path) -> Result<Pipeline> {
    let target = bin(root, "p99probe-target");
    let agent = bin(root, "p99probe");
    let mut result = Pipeline {
        switches: Drain::default(),
        record_memory_mb: (Vec::new(), Vec::new()),
        record_bytes_per_event: Vec::new(),
        rss_full_mb: 0.0,
        kernel_maps_mb: 0.0,
        storm: storm(root, scratch)?,
    };
    for round in 0..ROUNDS {
        eprintln!("bench: pipeline round {}", round + 1);
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(&target)
            .args(["pingpong", "--duration", "30"]);
        let pingpong = Killed(cmd.stdout(Stdio::piped()).spawn()?);
        std::thread::sleep(Duration::from_millis(300));
        let out = scratch.join("pingpong.p99");
        let recorder = Command::new("taskset")
            .args(["-c", "1"])
            .arg(&agent)
            .args([
                "record",
                "--pid",
                &pingpong.0.id().to_string(),
                "--duration",
                "6s",
                "--min-offcpu",
                "0",
                "--offcpu-stack-budget",
                "0",
                "--out",
            ])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = recorder.id();
        std::thread::sleep(Duration::from_secs(2));
        result.record_memory_mb.0.push(agent_memory_mb(pid).0);
        let cpu_percent = cpu_percent_during(pid, Duration::from_secs(3));
        result.record_memory_mb.1.push(agent_memory_mb(pid).0);
        drop(Killed(recorder));
        result.switches.cpu_percent.push(cpu_percent);
        let info = Command::new(&agent).arg("info").arg(&out).output()?;
        let text = String::from_utf8_lossy(&info.stdout);
        let sent = info_field(&text, "kernel:", 1).unwrap_or(f64::NAN);
        let dropped = info_field(&text, "kernel:", 3).unwrap_or(f64::NAN);
        let length = text
            .lines()
            .find_map(|l| l.strip_prefix("length: "))
            .and_then(|l| l.trim_end_matches('s').parse::<f64>().ok())
            .unwrap_or(6.0);
        result.switches.events_per_s.push(sent / length);
        let bytes = std::fs::metadata(&out).map_or(f64::NAN, |m| m.len() as f64);
        result.record_bytes_per_event.push(bytes / sent);
        result.switches.drops.push(dropped);
        drop(pingpong);
    }
    // Flight recorder full: attach (never triggering) long enough to fill its 10 s of history.
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(&target)
        .args(["pingpong", "--duration", "40"]);
    let pingpong = Killed(cmd.stdout(Stdio::piped()).spawn()?);
    let attach = Killed(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(&agent)
            .args([
                "attach",
                "--pid",
                &pingpong.0.id().to_string(),
                "--p99",
                "1h",
                "--min-offcpu",
                "0",
                "--offcpu-stack-budget",
                "0",
                "--duration",
                "60s",
                "--out",
            ])
            .arg(scratch.join("captures"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_secs(15));
    (result.rss_full_mb, result.kernel_maps_mb) = agent_memory_mb(attach.0.id());
    drop(attach);
    drop(pingpong);
    Ok(result)
}

/// Seconds from the end of each capture's post-window to its report.json on disk.
fn time_to_verdict(root: &Path, go_binary: &Path, scratch: &Path) -> Result<Vec<f64>> {
    eprintln!("bench: time to verdict");
    let (server, port) = go_server(go_binary, &["-stall-every", "20", "-stall-ms", "20"])?;
    let load = Killed(
        Command::new("taskset")
            .args(["-c", "1", "wrk", "-t1", "-c8", "-d40s"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .stdout(Stdio::null())
            .spawn()?,
    );
    let captures = scratch.join("verdict-captures");
    let _ = std::fs::remove_dir_all(&captures);
    let status = Command::new(bin(root, "p99probe"))
        .args([
            "attach",
            "--pid",
            &server.0.id().to_string(),
            "--p99",
            "5ms",
            "--pre",
            "1s",
            "--baseline",
            "2s",
        ])
        .args([
            "--post",
            "1s",
            "--cooldown",
            "2s",
            "--max-captures",
            "3",
            "--duration",
            "35s",
            "--out",
        ])
        .arg(&captures)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    drop(load);
    drop(server);
    if !status.success() {
        bail!("p99probe attach failed for the time-to-verdict run");
    }
    let mut seconds = Vec::new();
    for dir in std::fs::read_dir(&captures)?.flatten() {
        let report_path = dir.path().join("report.json");
        let written = std::fs::metadata(&report_path)?.modified()?;
        let text = std::fs::read_to_string(&report_path)?;
        let at_ms: u64 = text
            .split("\"at_unix_ms\":")
            .nth(1)
            .and_then(|t| t.trim_start().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .context("trigger time in report.json")?;
        let post_end = SystemTime::UNIX_EPOCH + Duration::from_millis(at_ms + 1000);
        seconds.push(
            written
                .duration_since(post_end)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
    }
    Ok(seconds)
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| "not installed".into())
}

/// bpftrace and BCC find classic tracepoints through tracefs, which a fresh machine may not
/// have mounted (p99probe itself does not need it).
fn mount_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events/sched").exists() {
        return Ok(());
    }
    let status = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .context("mount tracefs")?;
    if !status.success() {
        bail!("mounting tracefs on /sys/kernel/tracing failed: {status}");
    }
    Ok(())
}

/// The interleaved phases of `configs` on both servers, each under `p99probe-target load`.
fn interleaved(
    root: &Path,
    go_binary: &Path,
    scratch: &Path,
    rounds: usize,
    configs: &[Tool],
) -> Result<[Paired; 2]> {
    Ok([
        paired(
            "Go net/http (golang-go)",
            root,
            scratch,
            &|| go_server(go_binary, &[]),
            "http",
            rounds,
            configs,
        )?,
        paired(
            "redis-server",
            root,
            scratch,
            &|| redis_server(16379).map(|k| (k, 16379)),
            "redis",
            rounds,
            configs,
        )?,
    ])
}

/// `cargo xtask bench --interleaved-only`: the interleaved tables and their goal lines, for
/// p99probe's default configuration, the null control and `others` (when empty, every
/// configuration of the full bench, which leaves out `Tool::DECOMPOSITION`). Fewer
/// configurations make more rounds affordable: the interval narrows with the square root of
/// the rounds, and 12 leave it at ± 4–5% on this guest.
pub fn print_interleaved(
    root: &Path,
    go_binary: &Path,
    rounds: usize,
    others: &[Tool],
) -> Result<()> {
    let configs: Vec<Tool> = if others.is_empty() {
        Tool::ALL.to_vec()
    } else {
        Tool::ALL
            .into_iter()
            .chain(Tool::DECOMPOSITION)
            .filter(|t| matches!(t, Tool::Nothing | Tool::P99probe) || others.contains(t))
            .collect()
    };
    let scratch = root.join("target/bench");
    std::fs::create_dir_all(&scratch)?;
    mount_tracefs()?;
    let mut md = String::new();
    for p in interleaved(root, go_binary, &scratch, rounds, &configs)? {
        p.write_table(&mut md);
        for line in p.goal_lines() {
            let _ = writeln!(md, "{line}");
        }
        let _ = writeln!(md);
    }
    print!("{md}");
    Ok(())
}

pub fn run(root: &Path, go_binary: &Path, rounds: usize) -> Result<()> {
    let scratch = root.join("target/bench");
    std::fs::create_dir_all(&scratch)?;
    mount_tracefs()?;
    let go = overhead(
        "Go net/http (golang-go)",
        "wrk -t1 -c8",
        root,
        &scratch,
        &|| go_server(go_binary, &[]),
        &wrk,
    )?;
    let redis = overhead(
        "redis-server",
        "redis-benchmark -t get -c 8 -n 400000",
        root,
        &scratch,
        &|| redis_server(16379).map(|k| (k, 16379)),
        &redis_benchmark,
    )?;
    let [go_paired, redis_paired] = interleaved(root, go_binary, &scratch, rounds, &Tool::ALL)?;
    let kernel = kernel_cost(root, go_binary, &scratch)?;
    let per_event = event_costs(root, &scratch, rounds)?;
    let budget = stack_budget(root, &scratch)?;
    let pipeline = pipeline(root, &scratch)?;
    let verdict = time_to_verdict(root, go_binary, &scratch)?;

    let mut md = String::new();
    let _ = writeln!(md, "# p99probe benchmarks\n");
    let _ = writeln!(md, "What was tried to cut the cost, what was measured by hand around the runs, and how each run went: [docs/benchmark-notes.md](docs/benchmark-notes.md) (written by hand; the bench leaves it alone).\n");
    let _ = writeln!(md, "Written by `cargo xtask bench`. Overhead is measured two ways. **Interleaved phases** (the figure the goals use): one server under one continuous load, with {rounds} rounds of {}-second phases — nothing, a tool (measured once it reports tracing), nothing, the next tool, ... The load is `p99probe-target load`: like `wrk -t1 -c8`, one thread keeping 8 keep-alive connections busy in a closed loop (HTTP `GET /` for Go, redis `GET` for redis-server), but it reports throughput and latency percentiles for each phase, which wrk and redis-benchmark cannot (they report once, at exit). Each tool phase's throughput and P99 are divided by the mean of the nothing-phases on either side, so drift slower than a few seconds cancels; P99.9 likewise, where short bursts of a tool's work on a CPU it shares show first. A \"nothing attached\" phase (no tool started) is the null control. A tool phase is left out, with its neighbours, when the hypervisor took more than {:.0}% of either CPU during any of the three (this guest's steal comes in stretches of 40–50% that cut throughput several-fold), and further rounds, up to half as many again, make up for it; the phases column counts those left out. The last column is the CPU the tool's own processes used during its phases, as its threads' schedstat counts it (ns), which leaves out its programs' time in the kernel's hooks. The calibration row traces nothing: a process that spins 1 ms every 50 ms on the load generator's CPU shows how much this machine's closed loop amplifies any work that shares that CPU, against which a tool's own CPU can be read. **Separate runs** give absolute throughput and latency percentiles: every configuration runs {ROUNDS} times with its own server, alternating configurations round by round, with a nothing-attached run before and after each run; each cell is the median and, in brackets, the min–max, and the P99 ratio divides each run's P99 by the mean P99 of the two nothing-attached runs either side (for the nothing-attached row, each inner run against its two neighbours: the null control). On this VM separate runs differ by up to 30% from minute to minute, so their throughput ratios cannot resolve a few percent.\n", PHASE.as_secs(), STEAL_LIMIT * 100.0);
    let _ = writeln!(md, "## Machine\n");
    for (label, value) in [
        ("kernel", version("uname", &["-r"])),
        ("CPUs", version("nproc", &[])),
        (
            "p99probe",
            version(bin(root, "p99probe").to_str().unwrap(), &["--version"]),
        ),
        ("go", version("go", &["version"])),
        ("redis", version("redis-server", &["--version"])),
        ("wrk", version("wrk", &["--version"])),
        ("bpftrace", version("bpftrace", &["--version"])),
        (
            "libbpf-tools",
            version("dpkg-query", &["-W", "-f", "${Version}", "libbpf-tools"]),
        ),
    ] {
        let _ = writeln!(md, "- {label}: {value}");
    }
    let _ = writeln!(md, "\nServer pinned to CPU 0, load generator and tracing tools to CPU 1; {LOAD_SECONDS} s of load per run; p99probe runs `attach` with a threshold (`--p99 1h`) never reached and every hook its latency mode uses: scheduler, wakeups, sampling, arrival/state/retransmit socket hooks, the response-write hook while the request rate is under 2,000/s (under these loads it is detached within a quarter second of tracing), Go runtime uprobes; `--latency delivery` keeps the write hook throughout and adds the per-segment ACK hook. With the threshold never approached, `attach` samples at its calm rate throughout (99.8 Hz, on the server's CPU only, the one its affinity allows; the bpftrace script samples every CPU at 99 Hz); the full-rate row (`--calm-sample-hz 499`) shows what it costs while sampling at 499 Hz, as it does from half the threshold and during captures. BCC's Python tools need kernel headers to compile their programs; its libbpf-tools (CO-RE, BTF only) are the BCC equivalent that runs where there are none: `runqlat -p PID` and `offcputime -p PID` (Debian's libbpf-tools has no tcpretrans).\n");
    for p in [&go_paired, &redis_paired] {
        p.write_table(&mut md);
    }
    for o in [&go, &redis] {
        let _ = writeln!(md, "## Separate runs: {} under `{}`\n", o.server, o.load);
        let _ = writeln!(md, "| configuration | throughput (req/s) | ratio | P50 (ms) | P99 (ms) | P99 ratio to the nothing-attached runs either side |\n|---|---|---|---|---|---|");
        let base_throughput = o.column(Tool::Nothing, |s| s.throughput);
        let base = stats(&base_throughput).0;
        for tool in Tool::ALL {
            let failure = o.runs(tool).err();
            let name = if tool == Tool::Nothing {
                "nothing attached (P99 ratio: null control, each run against its neighbours)"
            } else {
                tool.name()
            };
            if let Some(reason) = failure {
                let _ = writeln!(
                    md,
                    "| {name} | does not run here: {} | | | | |",
                    reason.replace('|', "/")
                );
                continue;
            }
            let tput = o.column(tool, |s| s.throughput);
            let p50 = o.column(tool, |s| s.p50_ms);
            let p99 = o.column(tool, |s| s.p99_ms);
            let _ = writeln!(
                md,
                "| {name} | {} | {:.3} | {} | {} | {} |",
                fmt_stat(&tput, 0),
                stats(&tput).0 / base,
                fmt_stat(&p50, 3),
                fmt_stat(&p99, 3),
                fmt_stat(&o.p99_ratios(tool), 3)
            );
        }
        if !base_throughput.is_empty() {
            let (_, min, max) = stats(&base_throughput);
            let _ = writeln!(md, "\nRun-to-run spread of \"nothing attached\" alone: {:.0}% (max/min − 1); ratios closer to 1 than that are within this machine's noise.", (max / min - 1.0) * 100.0);
        }
        let _ = writeln!(md);
    }
    md.push_str(&kernel.markdown());
    md.push_str(&per_event.markdown(rounds));
    md.push_str(&budget.markdown());
    let _ = writeln!(md, "## Pipeline limits\n\nTarget: two threads handing a byte back and forth through pipes on CPU 0 (`p99probe-target pingpong`); `p99probe record --min-offcpu 0 --offcpu-stack-budget 0` on CPU 1, so every switch and wakeup is an event. The target, slowed by the tracing, is the limit here, not the agent.\n");
    pipeline
        .switches
        .write_rows(&mut md, "agent CPU % while draining");
    let _ = writeln!(md, "| `record`'s own memory (anonymous RSS) 2 s / 5 s into the recording: it writes each drain to disk | {} / {} MB |", fmt_stat(&pipeline.record_memory_mb.0, 0), fmt_stat(&pipeline.record_memory_mb.1, 0));
    let _ = writeln!(md, "| the recording on disk, bytes per event (24 for a run-queue wait, 96 for an off-CPU interval, plus the metadata) | {} |", fmt_stat(&pipeline.record_bytes_per_event, 1));
    let _ = writeln!(md, "| agent's own memory (anonymous RSS) with the flight recorder full (10 s of history, same target, `attach`) | {:.0} MB |", pipeline.rss_full_mb);
    let _ = writeln!(md, "| kernel maps the agent has mapped (the timing rings, 96 MiB here; the 16 MiB event ring buffer, mapped twice over; the trigger's histograms): kernel memory, resident in the agent's RSS too | {:.0} MB |", pipeline.kernel_maps_mb);
    let storm = &pipeline.storm;
    let (storm_eps, storm_cpu) = storm.drain.medians();
    let _ = writeln!(md, "\nDrain capacity: a target making `getppid()` calls as fast as it can on CPU 0, and `p99probe attach --synthetic-syscall-events` (a benchmark-only hook: one event per system call of the target, {STORM_SECONDS} s) pinned to CPU 1, so the agent runs on one core.\n");
    storm
        .drain
        .write_rows(&mut md, "agent CPU % of its core while draining");
    let _ = writeln!(
        md,
        "| agent's own memory (anonymous RSS) at the end (flight recorder bounded at 4 M events; these bare ones take 32 bytes each, 128 MB) | {} MB |",
        fmt_stat(&storm.rss_mb, 0)
    );
    let _ = writeln!(md, "\n## Time to verdict\n\nGo server with a 20 ms stall on every 20th request under wrk; `attach --p99 5ms --post 1s`, three captures. Time from the end of the post-window to `report.json` (written last) on disk:\n");
    let _ = writeln!(
        md,
        "- seconds: {} over {} captures; raw: {:?}\n",
        fmt_stat(&verdict, 3),
        verdict.len(),
        verdict
            .iter()
            .map(|v| (v * 1000.0).round() / 1000.0)
            .collect::<Vec<_>>()
    );
    let _ = writeln!(md, "## Goals\n");
    for p in [&go_paired, &redis_paired] {
        for line in p.goal_lines() {
            let _ = writeln!(md, "{line}");
        }
    }
    if let Some(line) = kernel.goal_line() {
        let _ = writeln!(md, "{line}");
    }
    for line in per_event.goal_lines() {
        let _ = writeln!(md, "{line}");
    }
    for o in [&go, &redis] {
        let (inflation, least, most) = stats(&o.p99_ratios(Tool::P99probe));
        let (_, null_least, null_most) = stats(&o.p99_ratios(Tool::Nothing));
        let _ = writeln!(
            md,
            "- {}, separate runs under `{}` (a cross-check with a different load generator): P99 {:+.1}% (median over runs of P99 against the mean of the nothing-attached runs either side; {:+.1}% to {:+.1}%); the null control ranges {:+.1}% to {:+.1}%",
            o.server,
            o.load,
            (inflation - 1.0) * 100.0,
            (least - 1.0) * 100.0,
            (most - 1.0) * 100.0,
            (null_least - 1.0) * 100.0,
            (null_most - 1.0) * 100.0,
        );
    }
    let storm_drops = stats(&storm.drain.drops).2;
    let _ = writeln!(
        md,
        "- ≥ 1 M events/s drained with zero drops on one core: {storm_eps:.0} events/s, at most {storm_drops:.0} dropped, agent at {storm_cpu:.0}% of its core — {}",
        if storm_eps >= 1e6 && storm_drops == 0.0 {
            "met"
        } else {
            "missed"
        }
    );
    let vt = stats(&verdict).0;
    let _ = writeln!(
        md,
        "- capture on disk ≤ 1 s after the post-window: {vt:.2} s — {}",
        if vt <= 1.0 { "met" } else { "missed" }
    );
    let _ = writeln!(
        md,
        "\nCommands: see `xtask/src/bench.rs` (the bpftrace script is `BPFTRACE_SCRIPT` there)."
    );
    std::fs::write(root.join("BENCHMARKS.md"), md)?;
    println!("wrote BENCHMARKS.md");
    Ok(())
}

/// `kernel.bpf_stats_enabled` for as long as this lives: the kernel then times every run of
/// every BPF program (which costs a clock read per run, so it is off otherwise).
struct BpfStats;

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        std::fs::write(BPF_STATS_SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(BpfStats)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS_SYSCTL, "0");
    }
}

/// Every loaded BPF program: id → (name, run time in ns, runs), from `bpftool prog show`
/// (which leaves the run figures out while they are zero).
fn bpf_program_stats() -> Result<BTreeMap<u32, (String, u64, u64)>> {
    let text = crate::output(Command::new("bpftool").args(["prog", "show"]))?;
    let mut programs = BTreeMap::new();
    for line in text.lines() {
        let Some((id, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(id) = id.trim().parse::<u32>() else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
        };
        let name = after("name").unwrap_or(&"?").to_string();
        let number = |key: &str| after(key).and_then(|v| v.parse().ok()).unwrap_or(0);
        programs.insert(id, (name, number("run_time_ns"), number("run_cnt")));
    }
    Ok(programs)
}

/// [`bpf_program_stats`] of the programs loaded since `others` was taken: a tool's own.
fn bpf_programs_since(
    others: &BTreeMap<u32, (String, u64, u64)>,
) -> Result<BTreeMap<u32, (String, u64, u64)>> {
    Ok(bpf_program_stats()?
        .into_iter()
        .filter(|(id, _)| !others.contains_key(id))
        .collect())
}

/// Per program name, the run time (ns) and runs between two [`bpf_program_stats`] snapshots.
/// Several programs of one tool may share a name (bpftrace names its programs by probe);
/// their runs add up.
fn runs_between(
    before: &BTreeMap<u32, (String, u64, u64)>,
    after: BTreeMap<u32, (String, u64, u64)>,
) -> BTreeMap<String, (u64, u64)> {
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (id, (name, time1, runs1)) in after {
        let (_, time0, runs0) = before.get(&id).cloned().unwrap_or_default();
        let entry = by_name.entry(name).or_default();
        entry.0 += time1.saturating_sub(time0);
        entry.1 += runs1.saturating_sub(runs0);
    }
    by_name
}

/// Per program name, `(runs per second, ns per run)` of each run.
type ProgramRuns = BTreeMap<String, Vec<(f64, f64)>>;

/// What each tool's kernel programs cost under the Go load, by the kernel's own accounting:
/// this host's noise moves it far less than throughput (per-run figures drift by up to ~30 ns
/// between runs minutes apart), so changes larger than that show, and the tools can be compared
/// where their throughput cannot.
struct KernelCost {
    results: Vec<ToolKernelCost>,
    /// ns per run of an empty program on `sched_switch`, one per round: what the statistics'
    /// own clock reads (and the call into a program) add to every run they time.
    floor_ns: Vec<f64>,
}

/// An empty program on a hook as busy as the scheduler hooks: its measured run time is the
/// floor that `kernel.bpf_stats_enabled` adds to every program's.
const STATS_FLOOR_SCRIPT: &str = "tracepoint:sched:sched_switch { }";

/// One configuration's runs.
struct ToolKernelCost {
    tool: Tool,
    /// Responses per second, per run.
    served: Vec<f64>,
    /// CPU % of one CPU that the tool's own processes used, per run.
    own_cpu: Vec<f64>,
    programs: ProgramRuns,
    /// p99probe only: the BPF ms/s it reported of itself at exit (`own_cost`), per run.
    self_reported_ms_per_s: Vec<f64>,
}

const KERNEL_COST_ROUNDS: usize = 3;
const KERNEL_COST_SPAN: Duration = Duration::from_secs(8);
const KERNEL_COST_TOOLS: [Tool; 4] = [
    Tool::P99probe,
    Tool::P99probeFullRate,
    Tool::Bpftrace,
    Tool::BccLibbpf,
];

fn kernel_cost(root: &Path, go_binary: &Path, scratch: &Path) -> Result<KernelCost> {
    let (server, port) = go_server(go_binary, &[])?;
    let pid = server.0.id();
    let _load = Killed(
        endless_wrk(port)
            .stdout(Stdio::null())
            .spawn()
            .context("starting wrk")?,
    );
    std::thread::sleep(Duration::from_secs(2));
    let _stats = BpfStats::enable()?;
    let mut results: Vec<ToolKernelCost> = KERNEL_COST_TOOLS
        .iter()
        .map(|&tool| ToolKernelCost {
            tool,
            served: Vec::new(),
            own_cpu: Vec::new(),
            programs: BTreeMap::new(),
            self_reported_ms_per_s: Vec::new(),
        })
        .collect();
    let mut floor_ns = Vec::new();
    for round in 0..KERNEL_COST_ROUNDS {
        eprintln!(
            "bench: kernel cost round {} / the statistics' floor",
            round + 1
        );
        floor_ns.push(stats_floor_ns()?);
        for result in &mut results {
            eprintln!(
                "bench: kernel cost round {} / {}",
                round + 1,
                result.tool.name()
            );
            let others = bpf_program_stats()?;
            let running = start_tool(result.tool, pid, root, scratch)
                .map_err(|e| anyhow::anyhow!("{}: {e}", result.tool.name()))?;
            std::thread::sleep(Duration::from_secs(2));
            let (t0, w0, c0, before) = (
                Instant::now(),
                server_writes(pid)?,
                processes_cpu_ns(&running),
                bpf_programs_since(&others)?,
            );
            std::thread::sleep(KERNEL_COST_SPAN);
            let (t1, w1, c1, after) = (
                Instant::now(),
                server_writes(pid)?,
                processes_cpu_ns(&running),
                bpf_programs_since(&others)?,
            );
            drop(running);
            if result.tool.attach_args().is_some() {
                let printed = std::fs::read_to_string(scratch.join(P99PROBE_STDOUT))?;
                result
                    .self_reported_ms_per_s
                    .push(self_reported_ms_per_s(&printed).with_context(|| {
                        format!("{}: no own-cost line in {printed:?}", result.tool.name())
                    })?);
            }
            let seconds = (t1 - t0).as_secs_f64();
            result.served.push((w1 - w0) as f64 / seconds);
            result
                .own_cpu
                .push(cpu_percent_of(c1.saturating_sub(c0), t1 - t0));
            for (name, (time, runs)) in runs_between(&before, after) {
                if runs == 0 {
                    continue;
                }
                result
                    .programs
                    .entry(name)
                    .or_default()
                    .push((runs as f64 / seconds, time as f64 / runs as f64));
            }
        }
    }
    Ok(KernelCost { results, floor_ns })
}

/// How p99probe's exit line about its own kernel time begins (`OwnCost::summary` in
/// probe-user, which the bench does not link).
const SELF_REPORT: &str = "p99probe's own kernel time: ";

/// The BPF ms/s in p99probe's exit line about its own kernel time.
fn self_reported_ms_per_s(printed: &str) -> Option<f64> {
    let line = printed.lines().find_map(|l| l.strip_prefix(SELF_REPORT))?;
    line.split(" ms/s").next()?.parse().ok()
}

/// ns per run of an empty bpftrace program on `sched_switch` over [`KERNEL_COST_SPAN`]: all
/// of it is the statistics' own cost and the call into the program.
fn stats_floor_ns() -> Result<f64> {
    let others = bpf_program_stats()?;
    let floor = Killed(
        Command::new("taskset")
            .args(["-c", "1", "bpftrace", "-e", STATS_FLOOR_SCRIPT])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace for the statistics' floor")?,
    );
    std::thread::sleep(Duration::from_secs(2));
    let before = bpf_programs_since(&others)?;
    std::thread::sleep(KERNEL_COST_SPAN);
    let after = bpf_programs_since(&others)?;
    drop(floor);
    let (time, runs) = runs_between(&before, after)
        .into_values()
        .fold((0, 0), |(time, runs), (t, r)| (time + t, runs + r));
    if runs == 0 {
        bail!("the empty program on sched_switch never ran (did bpftrace attach?)");
    }
    Ok(time as f64 / runs as f64)
}

/// What the off-CPU stack budget saves, on a target whose threads block far more often than
/// the budget allows: BPF time of p99probe's programs with every interval reported and walked
/// (`--offcpu-stack-budget 0`) and with the default budget, alternating.
struct StackBudget {
    /// Per configuration: its label and, per run, (BPF ms/s, the target's off-CPU intervals/s).
    rows: Vec<(&'static str, Vec<(f64, f64)>)>,
}

const STACK_BUDGET_ROUNDS: usize = 3;
const STACK_BUDGET_SPAN: Duration = Duration::from_secs(5);
const STACK_BUDGET_THREADS: &str = "32";
const STACK_BUDGET_STALL_MS: &str = "2";

/// Voluntary context switches of every thread of `pid`: each is one off-CPU interval of the
/// sleepers.
fn voluntary_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

fn stack_budget(root: &Path, scratch: &Path) -> Result<StackBudget> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(bin(root, "p99probe-target"))
        .args([
            "sleeper",
            "--threads",
            STACK_BUDGET_THREADS,
            "--stall-ms",
            STACK_BUDGET_STALL_MS,
            "--duration",
            "600",
        ]);
    let mut sleepers = Killed(cmd.stdout(Stdio::piped()).spawn()?);
    let mut line = String::new();
    BufReader::new(sleepers.0.stdout.take().unwrap()).read_line(&mut line)?;
    let pid = sleepers.0.id();
    let _stats = BpfStats::enable()?;
    let configurations = [
        (
            "every interval reported with its stacks (`--offcpu-stack-budget 0`)",
            "0",
        ),
        ("default budget (`--offcpu-stack-budget 1000`)", "1000"),
    ];
    let mut rows: Vec<(&'static str, Vec<(f64, f64)>)> = configurations
        .iter()
        .map(|(l, _)| (*l, Vec::new()))
        .collect();
    for round in 0..STACK_BUDGET_ROUNDS {
        for ((_, budget), (label, runs)) in configurations.iter().zip(rows.iter_mut()) {
            eprintln!("bench: stack budget round {} / {label}", round + 1);
            let others = bpf_program_stats()?;
            let agent = Killed(
                Command::new("taskset")
                    .args(["-c", "1"])
                    .arg(bin(root, "p99probe"))
                    .args(["attach", "--pid", &pid.to_string(), "--p99", "1h"])
                    .args([
                        "--offcpu-stack-budget",
                        budget,
                        "--duration",
                        "600s",
                        "--out",
                    ])
                    .arg(scratch.join("captures"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
            // Attached, and the budget's first decision (after a second) taken.
            std::thread::sleep(Duration::from_secs(3));
            let ours = || -> Result<(u64, u64)> {
                let total = bpf_programs_since(&others)?
                    .into_values()
                    .map(|(_, time, _)| time)
                    .sum();
                Ok((total, voluntary_switches(pid)))
            };
            let (t0, (bpf0, switches0)) = (Instant::now(), ours()?);
            std::thread::sleep(STACK_BUDGET_SPAN);
            let (t1, (bpf1, switches1)) = (Instant::now(), ours()?);
            drop(agent);
            let seconds = (t1 - t0).as_secs_f64();
            runs.push((
                bpf1.saturating_sub(bpf0) as f64 / 1e6 / seconds,
                switches1.saturating_sub(switches0) as f64 / seconds,
            ));
        }
    }
    Ok(StackBudget { rows })
}

impl StackBudget {
    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "## Off-CPU stack budget
"
        );
        let _ = writeln!(md, "Target: {STACK_BUDGET_THREADS} threads sleeping {STACK_BUDGET_STALL_MS} ms at a time on CPU 0 (`p99probe-target sleeper`), far more off-CPU intervals than the default budget of stack walks; each thread blocks at one place, so most intervals repeat their thread's last walked stacks instead of walking them (see README); `p99probe attach` on CPU 1, {STACK_BUDGET_ROUNDS} runs of {} s per configuration, alternating, measured from 3 s after attaching. BPF time is all of p99probe's programs by `kernel.bpf_stats_enabled`; intervals are the target's voluntary context switches. Each cell is the median and, in brackets, the min–max.\n", STACK_BUDGET_SPAN.as_secs());
        let _ = writeln!(
            md,
            "| configuration | BPF ms/s | target's off-CPU intervals/s |\n|---|---|---|"
        );
        for (label, runs) in &self.rows {
            let bpf: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let intervals: Vec<f64> = runs.iter().map(|r| r.1).collect();
            let _ = writeln!(
                md,
                "| {label} | {} | {} |",
                fmt_stat(&bpf, 1),
                fmt_stat(&intervals, 0)
            );
        }
        let _ = writeln!(md);
        md
    }
}

/// Ways the round-trip target hands its byte across: a round trip through pipes is two
/// context switches and two wakeups; over loopback TCP it is also a request and its response.
const ROUND_TRIP_VIAS: [&str; 2] = ["pipe", "tcp"];

/// The configurations measured per event: the tool, and whether it traces the round-trip
/// target itself or a bystander (a sleeping process), for which every event is filtered out.
/// `attach` without one hook family at a time prices each family by difference, the kernel's
/// dispatch to its programs included (which `kernel.bpf_stats_enabled` leaves out).
const EVENT_COST_CONFIGS: [(Tool, bool); 7] = [
    (Tool::Nothing, true),
    (Tool::P99probe, true),
    (Tool::WithoutRequestTiming, true),
    (Tool::WithoutScheduler, true),
    (Tool::P99probe, false),
    (Tool::Bpftrace, true),
    (Tool::BccLibbpf, true),
];

/// ns added per round trip in each phase kept, and the phases left out for steal; or why the
/// tool did not run.
type AddedNs = Result<(Vec<f64>, usize), String>;

/// What one context switch or one request costs with each tool attached, where nothing else
/// moves: two threads of `p99probe-target roundtrips` hand a byte back and forth on CPU 0 as
/// fast as they can, and each tool phase's ns per round trip is compared with the
/// nothing-phases either side. Throughput ratios under a server load resolve 2–4% on this
/// guest; this resolves tens of ns per event, the kernel's dispatch to the programs and
/// whatever they cost around them included (which `kernel.bpf_stats_enabled` leaves out).
struct EventCosts {
    /// ns per round trip with nothing attached, per way.
    baseline_ns: Vec<f64>,
    /// Per configuration, per way.
    added_ns: Vec<Vec<AddedNs>>,
}

fn event_costs(root: &Path, scratch: &Path, rounds: usize) -> Result<EventCosts> {
    let bystander = Killed(
        Command::new("sleep")
            .arg("3600")
            .spawn()
            .context("starting sleep")?,
    );
    let mut costs = EventCosts {
        baseline_ns: Vec::new(),
        added_ns: EVENT_COST_CONFIGS.iter().map(|_| Vec::new()).collect(),
    };
    for via in ROUND_TRIP_VIAS {
        let mut target = LoadGenerator::spawn(
            Command::new("taskset")
                .args(["-c", "0"])
                .arg(bin(root, "p99probe-target"))
                .args(["roundtrips", "--via", via, "--duration", "3600"]),
        )?;
        let target_pid = target.process.0.id();
        std::thread::sleep(Duration::from_secs(1));
        let names: Vec<&str> = EVENT_COST_CONFIGS
            .iter()
            .map(|(tool, _)| tool.name())
            .collect();
        let results = interleave(
            &format!("cost per event ({via})"),
            &names,
            rounds,
            |i| {
                let (tool, on_target) = EVENT_COST_CONFIGS[i];
                let pid = if on_target {
                    target_pid
                } else {
                    bystander.0.id()
                };
                start_tool(tool, pid, root, scratch)
            },
            |_| round_trip_phase(&mut target, PHASE),
            |phase| phase.most_stolen,
        )?;
        let mut baseline = Vec::new();
        let results: Vec<AddedNs> = results
            .into_iter()
            .map(|result| {
                result.map(|measured| {
                    let added = measured
                        .kept
                        .iter()
                        .map(|phases| {
                            let neighbours = (phases.before.ns + phases.after.ns) / 2.0;
                            baseline.push(neighbours);
                            phases.during.ns - neighbours
                        })
                        .collect();
                    (added, measured.left_out)
                })
            })
            .collect();
        costs.baseline_ns.push(stats(&baseline).0);
        for (per_config, result) in costs.added_ns.iter_mut().zip(results) {
            per_config.push(result);
        }
    }
    Ok(costs)
}

/// The ns added in the phases kept, when the tool ran and kept enough of them for an interval.
fn enough_phases(result: &AddedNs) -> Option<&[f64]> {
    match result {
        Ok((added, _)) if added.len() >= 2 => Some(added),
        _ => None,
    }
}

/// One phase of the round-trip target.
#[derive(Clone)]
struct RoundTripPhase {
    ns: f64,
    most_stolen: f64,
}

fn round_trip_phase(target: &mut LoadGenerator, span: Duration) -> Result<RoundTripPhase> {
    let (line, before, after) = target.timed_phase(span)?;
    let (round_trips, seconds) = (
        phase_field(&line, "roundtrips")?,
        phase_field(&line, "seconds")?,
    );
    if round_trips == 0.0 {
        bail!("the round-trip target made no progress in {span:?}");
    }
    Ok(RoundTripPhase {
        ns: seconds * 1e9 / round_trips,
        most_stolen: after.most_stolen_since(&before),
    })
}

impl EventCosts {
    fn markdown(&self, rounds: usize) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Cost per event

Two threads of `p99probe-target roundtrips` hand a byte back and forth on CPU 0 as fast as they can; each tool runs on CPU 1, {rounds} interleaved rounds of {}-second phases, each tool phase's ns per round trip against the mean of the nothing-phases either side. As in the interleaved phases, a phase in which the hypervisor took more than {:.0}% of either CPU is left out with its neighbours, and further rounds, up to half as many again, make up for it. A round trip through pipes is two context switches and two wakeups ({:.0} ns with nothing attached); over loopback TCP (to the target's own listening port, so p99probe times it as a request) it is also a request, its response and their segments ({:.0} ns). \"On a bystander\": p99probe attached to a sleeping process, so every hook run is one that turns the event away: the floor each hook costs for other processes' events. A bystander serves no requests, so `attach` keeps its response-write hook there, which runs for every send on the machine; on the round-trip target, serving tens of thousands of requests a second, it is detached, as under the servers' loads. The rows without request timing and without the scheduler hooks (`--bench-without`) price each family by difference from the full `attach` row. Unlike the kernel-cost table, this includes the kernel's dispatch to the programs and whatever they cost around them.\n", PHASE.as_secs(), STEAL_LIMIT * 100.0, self.baseline_ns[0], self.baseline_ns[1]);
        let _ = writeln!(md, "| configuration | pipe: ns added per round trip, mean ± 95% CI | per context switch (half) | tcp: ns added per round trip (a request), mean ± 95% CI | phases (left out for steal), pipe / tcp |");
        let _ = writeln!(md, "|---|---|---|---|---|");
        for ((tool, on_target), per_via) in EVENT_COST_CONFIGS.iter().zip(&self.added_ns) {
            let label = match (tool, on_target) {
                (Tool::Nothing, _) => "nothing attached (null control)".to_string(),
                (_, true) => format!("{}, on the round-trip target", tool.name()),
                (_, false) => format!("{}, on a bystander", tool.name()),
            };
            let cell = |result: &AddedNs, divide: f64| match (result, enough_phases(result)) {
                (_, Some(added)) => {
                    let (mean, ci) = mean_ci95(added);
                    format!("{:+.0} ± {:.0}", mean / divide, ci / divide)
                }
                (Ok(_), None) => "too few phases".to_string(),
                (Err(reason), None) => format!("does not run here: {reason}"),
            };
            let phases = per_via
                .iter()
                .map(|r| match r {
                    Ok((added, left_out)) => format!("{} ({left_out})", added.len()),
                    Err(_) => "—".to_string(),
                })
                .collect::<Vec<_>>()
                .join(" / ");
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {phases} |",
                cell(&per_via[0], 1.0),
                cell(&per_via[0], 2.0),
                cell(&per_via[1], 1.0)
            );
        }
        md.push('\n');
        md
    }

    /// The ns added per round trip through `ROUND_TRIP_VIAS[via]` with `tool` on the
    /// round-trip target, when it ran and kept at least two phases.
    fn on_target(&self, tool: Tool, via: usize) -> Option<&[f64]> {
        let index = EVENT_COST_CONFIGS
            .iter()
            .position(|&config| config == (tool, true))?;
        enough_phases(&self.added_ns[index][via])
    }

    /// The goal of costing less than the peers, judged event by event: per context switch
    /// (half a pipe round trip) and per request (a TCP round trip), where the server loads
    /// leave the tools' intervals overlapping.
    fn goal_lines(&self) -> Vec<String> {
        let peers = [
            (Tool::Bpftrace, "bpftrace equivalent"),
            (Tool::BccLibbpf, "BCC libbpf-tools"),
        ];
        [(0, 2.0, "per context switch"), (1, 1.0, "per request (a TCP round trip)")]
            .into_iter()
            .map(|(via, divide, event)| {
                let Some(ours) = self.on_target(Tool::P99probe, via) else {
                    return format!("- less overhead than the peers, {event}: p99probe did not run");
                };
                let (mean, ci) = mean_ci95(ours);
                let ours = (mean / divide, ci / divide);
                let compared: Vec<(String, Option<ComparedCost>)> = peers
                    .iter()
                    .map(|&(tool, label)| match self.on_target(tool, via) {
                        None => (format!("{label} did not run"), None),
                        Some(added) => {
                            let (mean, ci) = mean_ci95(added);
                            let peer = (mean / divide, ci / divide);
                            let cost = ComparedCost::of(ours, peer, false);
                            (
                                format!("{label} {:+.0} ± {:.0} ns, p99probe costs {cost}", peer.0, peer.1),
                                Some(cost),
                            )
                        }
                    })
                    .collect();
                let costs: Vec<ComparedCost> =
                    compared.iter().filter_map(|(_, cost)| *cost).collect();
                let verdict = if costs.is_empty() {
                    "no peer ran"
                } else if costs.contains(&ComparedCost::More) {
                    "missed"
                } else if costs.iter().all(|&cost| cost == ComparedCost::Less) {
                    "met"
                } else {
                    "not resolved (intervals overlap)"
                };
                let described: Vec<String> = compared.into_iter().map(|(text, _)| text).collect();
                format!(
                    "- less overhead than the peers, {event} (cost per event, on the round-trip target): p99probe {:+.0} ± {:.0} ns; {} — {verdict}",
                    ours.0,
                    ours.1,
                    described.join("; ")
                )
            })
            .collect()
    }
}

/// `cargo xtask bench --event-costs-only`: the cost-per-event table, printed.
pub fn print_event_costs(root: &Path, rounds: usize) -> Result<()> {
    let scratch = root.join("target/bench");
    std::fs::create_dir_all(&scratch)?;
    mount_tracefs()?;
    let costs = event_costs(root, &scratch, rounds)?;
    print!("{}", costs.markdown(rounds));
    for line in costs.goal_lines() {
        println!("{line}");
    }
    Ok(())
}

/// `cargo xtask bench --kernel-cost-only`: the kernel-side sections alone, printed.
pub fn print_kernel_cost(root: &Path, go_binary: &Path) -> Result<()> {
    let scratch = root.join("target/bench");
    std::fs::create_dir_all(&scratch)?;
    mount_tracefs()?;
    let budget = stack_budget(root, &scratch)?;
    print!("{}", budget.markdown());
    let kernel = kernel_cost(root, go_binary, &scratch)?;
    print!("{}", kernel.markdown());
    if let Some(line) = kernel.goal_line() {
        println!("{line}");
    }
    Ok(())
}

impl ToolKernelCost {
    /// Per program: median runs per second and median ns per run.
    fn program_medians(&self) -> Vec<(&str, f64, f64)> {
        self.programs
            .iter()
            .map(|(name, runs)| {
                let per_s = stats(&runs.iter().map(|r| r.0).collect::<Vec<_>>()).0;
                let ns = stats(&runs.iter().map(|r| r.1).collect::<Vec<_>>()).0;
                (name.as_str(), per_s, ns)
            })
            .collect()
    }

    /// ms of BPF time per second, all programs together.
    fn total_ms_per_s(&self) -> f64 {
        self.ms_per_s_where(0.0, |_| true)
    }

    /// ms of BPF time per second of the programs `include` picks, with `floor_ns` taken off
    /// each run (down to 0; 0 for the gross figure).
    fn ms_per_s_where(&self, floor_ns: f64, include: impl Fn(&str) -> bool) -> f64 {
        self.program_medians()
            .iter()
            .filter(|(name, _, _)| include(name))
            .map(|(_, per_s, ns)| per_s * (ns - floor_ns).max(0.0) / 1e6)
            .sum()
    }

    fn ns_per_response(&self) -> f64 {
        self.per_response(self.total_ms_per_s())
    }

    fn per_response(&self, ms_per_s: f64) -> f64 {
        ms_per_s * 1e6 / stats(&self.served).0.max(1.0)
    }

    /// ns per response with `floor_ns` taken off each run: the programs' own work, so that a
    /// tool that runs more often (on more hooks) is not charged the statistics' cost of each.
    fn net_ns_per_response(&self, floor_ns: f64) -> f64 {
        self.per_response(self.ms_per_s_where(floor_ns, |_| true))
    }

    /// Program runs per response, all programs together.
    fn runs_per_response(&self) -> f64 {
        let runs_per_s: f64 = self
            .program_medians()
            .iter()
            .map(|(_, per_s, _)| per_s)
            .sum();
        runs_per_s / stats(&self.served).0.max(1.0)
    }
}

fn costs_less_or_more(ours: f64, theirs: f64) -> &'static str {
    if ours < theirs {
        "p99probe costs less"
    } else {
        "p99probe costs more"
    }
}

/// p99probe's programs that time requests, which neither peer does: the rest is what compares
/// like with like.
fn times_requests(program: &str) -> bool {
    [
        "sk_data_ready",
        "sock_send_length",
        "tcp_probe",
        "inet_sock_set_state",
    ]
    .iter()
    .any(|hook| program.starts_with(hook))
}

impl KernelCost {
    fn get(&self, tool: Tool) -> Option<&ToolKernelCost> {
        self.results.iter().find(|r| r.tool == tool)
    }

    /// The median floor, ns per run.
    fn floor(&self) -> f64 {
        stats(&self.floor_ns).0
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## Kernel-side cost, by tool and program\n");
        let _ = writeln!(md, "Go server under `wrk -t1 -c8` as above; each tool ({KERNEL_COST_ROUNDS} runs of {} s per configuration, alternating) with `kernel.bpf_stats_enabled`, which times every run of every BPF program (adding a clock read to each). A tool's programs are those that appeared when it started. Each cell is the median over runs of runs per second and ns per run; ms/s is their product, the CPU the program takes (both CPUs together). The kernel's own dispatch to the programs and the sampling interrupts are not in these figures; they are what throughput shows. Dispatch costs more for classic tracepoints (bpftrace's `tracepoint:` probes marshal a trace event before the program runs) than for BTF-typed ones (p99probe, libbpf-tools). What the tools do differs: the bpftrace script and libbpf-tools follow the scheduler only (bpftrace's run-queue timing is machine-wide, as runqlat's is without `-p`); p99probe also times every request of the server (`sk_data_ready`) and follows its Go runtime. Under this load `sock_send_length`, p99probe's response-write hook, is detached and has no row.\n", KERNEL_COST_SPAN.as_secs());
        let floor = self.floor();
        let _ = writeln!(md, "The statistics are not free: an empty program on `sched_switch` (`bpftrace -e '{STATS_FLOOR_SCRIPT}'`, measured the same way in each round) took {} ns per run, all of it the statistics' own clock reads and the call into the program. Every run of every program below carries that much, so a tool whose hooks fire more often is charged more of it; the net column takes the median floor ({floor:.0} ns) off each program's ns per run (down to 0).\n", fmt_stat(&self.floor_ns, 0));
        let _ = writeln!(md, "p99probe also measures its own programs and prints what they took at exit (`own_cost`: one span of one second in every ten, at a random point, timed by the kernel). The third column is that figure from the same runs, median (min–max): a check that what p99probe tells its users agrees with this accounting. Its span falls anywhere in the tool's run (the 2 s before the measured {} s too), so it agrees within the run-to-run noise, not exactly.\n", KERNEL_COST_SPAN.as_secs());
        let _ = writeln!(
            md,
            "| configuration | BPF ms/s, all programs | as p99probe reported it of itself | ns per response | program runs per response | ns per response, net of the floor | responses/s | tool's own CPU, % of one CPU |\n|---|---|---|---|---|---|---|---|"
        );
        for result in &self.results {
            let self_reported = if result.self_reported_ms_per_s.is_empty() {
                "—".to_string()
            } else {
                fmt_stat(&result.self_reported_ms_per_s, 2)
            };
            let _ = writeln!(
                md,
                "| {} | {:.2} | {self_reported} | {:.0} | {:.2} | {:.0} | {:.0} | {:.1} |",
                result.tool.name(),
                result.total_ms_per_s(),
                result.ns_per_response(),
                result.runs_per_response(),
                result.net_ns_per_response(floor),
                stats(&result.served).0,
                stats(&result.own_cpu).0,
            );
        }
        let _ = writeln!(
            md,
            "\n| configuration | program | runs/s | ns/run | ms/s |\n|---|---|---|---|---|"
        );
        for result in &self.results {
            for (name, per_s, ns) in result.program_medians() {
                let _ = writeln!(
                    md,
                    "| {} | `{name}` | {per_s:.0} | {ns:.0} | {:.2} |",
                    result.tool.name(),
                    per_s * ns / 1e6
                );
            }
        }
        let _ = writeln!(md);
        md
    }

    /// The goal line comparing the tools' kernel-side cost per response.
    fn goal_line(&self) -> Option<String> {
        let p99probe = self.get(Tool::P99probe)?;
        let ours = p99probe.ns_per_response();
        let timing = p99probe.per_response(p99probe.ms_per_s_where(0.0, times_requests));
        let floor = self.floor();
        let ours_net = p99probe.net_ns_per_response(floor);
        let timing_net = p99probe.per_response(p99probe.ms_per_s_where(floor, times_requests));
        let peers: Vec<String> = [Tool::Bpftrace, Tool::BccLibbpf]
            .iter()
            .filter_map(|&tool| self.get(tool))
            .map(|peer| {
                let theirs = peer.ns_per_response();
                let theirs_net = peer.net_ns_per_response(floor);
                format!(
                    "{}: {theirs:.0} ns ({}), net {theirs_net:.0} ns ({})",
                    peer.tool.name(),
                    costs_less_or_more(ours, theirs),
                    costs_less_or_more(ours_net, theirs_net),
                )
            })
            .collect();
        Some(format!(
            "- kernel-side cost per response (BPF run time, dispatch excluded): p99probe attach {ours:.0} ns, of which {timing:.0} ns time the requests, which the peers do not do, and {:.0} ns follow the scheduler and the runtime; net of the statistics' own {floor:.0} ns per run, {ours_net:.0} ns ({timing_net:.0} timing requests, {:.0} following the scheduler and the runtime, which compares like with like); {}",
            ours - timing,
            ours_net - timing_net,
            peers.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99probes_report_of_itself_is_read_from_its_exit_lines() {
        let printed = "0 capture(s); 5 events sent\np99probe's own kernel time: 33.55 ms/s (3.35% of one CPU) in 277648 program runs/s, measured over 1 span(s), 1.0 s in all\n";
        assert_eq!(self_reported_ms_per_s(printed), Some(33.55));
        assert_eq!(self_reported_ms_per_s("0 capture(s)\n"), None);
        assert_eq!(
            self_reported_ms_per_s(
                "p99probe's own kernel time: not measured (BPF_ENABLE_STATS: EPERM)"
            ),
            None
        );
    }

    #[test]
    fn p99_ratios_compare_each_run_with_the_nothing_runs_either_side() {
        let sample = |p99_ms: f64| Sample {
            p99_ms,
            ..Sample::default()
        };
        let run = |p99_ms: f64, nothing_before: usize| SeparateRun {
            sample: sample(p99_ms),
            nothing_before,
        };
        // The machine drifts: nothing-attached P99 doubles run by run.
        let overhead = Overhead {
            server: "s",
            load: "l",
            nothing: [1.0, 2.0, 4.0, 8.0].map(sample).to_vec(),
            results: vec![
                (Tool::P99probe, Ok(vec![run(1.65, 0), run(6.6, 2)])),
                (Tool::Bpftrace, Ok(vec![run(3.0, 1)])),
                (Tool::Bcc, Err("does not run".into())),
            ],
        };
        let close = |got: Vec<f64>, want: &[f64]| {
            assert_eq!(got.len(), want.len(), "{got:?}");
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-9, "{got:?} against {want:?}");
            }
        };
        // 1.65 between 1 and 2, 6.6 between 4 and 8: +10% each, whatever the drift.
        close(overhead.p99_ratios(Tool::P99probe), &[1.1, 1.1]);
        close(overhead.p99_ratios(Tool::Bpftrace), &[1.0]);
        // The null control: each inner nothing-attached run against its two neighbours.
        close(overhead.p99_ratios(Tool::Nothing), &[2.0 / 2.5, 4.0 / 5.0]);
        assert!(overhead.p99_ratios(Tool::Bcc).is_empty());
        assert!(overhead.p99_ratios(Tool::BusyNeighbour).is_empty());
        assert_eq!(overhead.column(Tool::Nothing, |s| s.p99_ms).len(), 4);
    }

    #[test]
    fn load_phase_reports_give_throughput_and_p99_and_refuse_failed_phases() {
        let phase = parse_load_phase(
            "phase requests 120000 seconds 2.000 errors 0 p50_us 120.5 p90_us 220.0 p99_us 350.2 p999_us 900.0 max_us 5000.0\n",
        )
        .unwrap();
        assert_eq!(
            phase,
            LoadPhase {
                requests: 120000.0,
                requests_per_second: 60000.0,
                p99_us: 350.2,
                p999_us: 900.0,
                machine_busy_ns: 0,
                most_stolen: 0.0,
            }
        );
        let failed = parse_load_phase(
            "phase requests 10 seconds 2.000 errors 1 p50_us 1 p90_us 1 p99_us 1 p999_us 1 max_us 1",
        );
        assert!(failed.unwrap_err().to_string().contains("failed"));
        assert!(parse_load_phase("ready\n").is_err());
        assert!(parse_load_phase("phase requests 10 seconds 2.0 errors 0").is_err());
    }

    #[test]
    fn cpu_times_give_busy_time_and_the_most_stolen_cpu() {
        let earlier = CpuTimes::parse(
            "cpu  100 1 50 800 5 2 3 40 0 0\n\
             cpu0 50 1 25 400 2 1 2 10 0 0\n\
             cpu1 50 0 25 400 3 1 1 30 0 0\n\
             intr 12345\n",
        )
        .unwrap();
        assert_eq!(earlier.busy_ticks, 100 + 1 + 50 + 2 + 3);
        assert_eq!(earlier.per_cpu, vec![(10, 491), (30, 510)]);
        // 100 ticks later: cpu0 lost 5 to steal, cpu1 lost 40.
        let later = CpuTimes::parse(
            "cpu  190 1 90 820 5 2 3 85 0 0\n\
             cpu0 110 1 50 405 2 1 2 15 0 0\n\
             cpu1 80 0 40 415 3 1 1 70 0 0\n",
        )
        .unwrap();
        assert_eq!(later.busy_ns_since(&earlier), 130 * CpuTimes::NS_PER_TICK);
        assert!((later.most_stolen_since(&earlier) - 0.4).abs() < 1e-9);
        assert_eq!(earlier.most_stolen_since(&earlier), 0.0);
        assert!(CpuTimes::parse("intr 1\n").is_err());
    }

    #[test]
    fn interleaved_goals_judge_the_interval_not_just_the_mean() {
        let at_least_98 = |r: f64| r >= 0.98;
        assert_eq!(against_goal(0.99, 0.005, at_least_98), "met");
        assert!(against_goal(0.985, 0.01, at_least_98).starts_with("met on the mean"));
        assert!(against_goal(0.975, 0.01, at_least_98).starts_with("missed on the mean"));
        assert_eq!(against_goal(0.90, 0.01, at_least_98), "missed");

        let phases = |ratio: f64, p99_ratio: f64| -> Result<ToolPhases, String> {
            let phases = (0..4)
                .map(|i| Phase {
                    // ±0.001 around the figure, so the interval is narrow but not zero.
                    ratio: ratio + if i % 2 == 0 { 0.001 } else { -0.001 },
                    p99_ratio: p99_ratio + if i % 2 == 0 { 0.001 } else { -0.001 },
                    p99_us: 300.0,
                    p999_ratio: 1.0,
                    tool_cpu_percent: 1.0,
                    cpu_per_request_ratio: 1.0,
                })
                .collect();
            Ok(ToolPhases {
                phases,
                left_out: 1,
            })
        };
        let paired = Paired {
            server: "s",
            load: "l".into(),
            results: vec![
                (Tool::Nothing, phases(1.0, 1.0)),
                (Tool::P99probe, phases(0.99, 1.02)),
                (Tool::Bpftrace, phases(0.95, 1.20)),
                (Tool::BccLibbpf, Err("does not run".into())),
            ],
        };
        let lines = paired.goal_lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].contains("throughput ≥ 98% of nothing attached: 99.0%"),
            "{lines:?}"
        );
        assert!(lines[0].contains("— met;"), "{lines:?}");
        assert!(lines[0].contains("bpftrace equivalent: 95.0%"), "{lines:?}");
        assert!(lines[0].contains("p99probe costs less"), "{lines:?}");
        assert!(
            lines[0].contains("BCC libbpf-tools: did not run"),
            "{lines:?}"
        );
        // P99: smaller ratios are cheaper, so p99probe's 102% beats bpftrace's 120%.
        assert!(lines[1].contains("P99 inflation ≤ 5%: 102.0%"), "{lines:?}");
        assert!(lines[1].contains("— met;"), "{lines:?}");
        assert!(lines[1].contains("p99probe costs less"), "{lines:?}");
        assert!(lines[1].contains("null control 100.0%"), "{lines:?}");
        assert!(
            lines[2].contains("CPU per request ≤ 102% (what throughput ≥ 98% needs where the CPU is the limit): 100.0%"),
            "{lines:?}"
        );
        assert!(lines[2].contains("— met;"), "{lines:?}");
    }

    #[test]
    fn confidence_intervals_use_students_t_at_any_number_of_rounds() {
        // Alternating ±1: mean 0, sample variance n / (n - 1), so the half-width is
        // t / sqrt(n - 1).
        let half_width = |n: usize| {
            let values: Vec<f64> = (0..n)
                .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            let (mean, ci) = mean_ci95(&values);
            assert!(mean.abs() < 1e-12, "{mean}");
            ci * ((n - 1) as f64).sqrt()
        };
        // Student's t for 3, 29, 59 and 119 degrees of freedom.
        for (n, t) in [(4, 3.182), (30, 2.045), (60, 2.001), (120, 1.980)] {
            let got = half_width(n);
            assert!((got - t).abs() < 0.003, "n {n}: t {got}, expected {t}");
        }
        assert!(mean_ci95(&[1.0]).1.is_nan());
    }

    #[test]
    fn kernel_cost_per_response_sums_each_programs_median_cost() {
        let cost = |tool, served: Vec<f64>, programs: &[(&str, Vec<(f64, f64)>)]| ToolKernelCost {
            tool,
            served,
            own_cpu: vec![1.0],
            programs: programs
                .iter()
                .map(|(name, runs)| (name.to_string(), runs.clone()))
                .collect(),
            self_reported_ms_per_s: Vec::new(),
        };
        let mut kernel = KernelCost {
            results: vec![
                // 1000 runs/s at 200 ns plus 500 runs/s at 100 ns: 0.25 ms/s, over 1000
                // responses/s: 250 ns each. The outlying run of each program is ignored.
                cost(
                    Tool::P99probe,
                    vec![900.0, 1000.0, 5000.0],
                    &[
                        ("a", vec![(1000.0, 200.0), (1000.0, 900.0), (10.0, 200.0)]),
                        ("sk_data_ready_btf", vec![(500.0, 100.0)]),
                    ],
                ),
                cost(
                    Tool::Bpftrace,
                    vec![1000.0],
                    &[("c", vec![(1000.0, 240.0)])],
                ),
                // A program that runs often for less than the floor is charged nothing net.
                cost(
                    Tool::BccLibbpf,
                    vec![1000.0],
                    &[("d", vec![(1000.0, 100.0)]), ("e", vec![(2000.0, 50.0)])],
                ),
            ],
            // Median 60 ns: p99probe's runs come to 1000 × 140 + 500 × 40 ns a second, 160
            // ns per response, and the peer whose fewer runs cost more each comes out dearer
            // once the floor is taken off.
            floor_ns: vec![60.0, 500.0, 50.0],
        };
        let ours = kernel.get(Tool::P99probe).unwrap();
        assert!((ours.total_ms_per_s() - 0.25).abs() < 1e-9);
        assert!((ours.ns_per_response() - 250.0).abs() < 1e-9);
        let line = kernel.goal_line().unwrap();
        assert!(
            line.contains("p99probe attach 250 ns, of which 50 ns time"),
            "{line}"
        );
        assert!(line.contains("and 200 ns follow the scheduler"), "{line}");
        assert!(
            line.contains("own 60 ns per run, 160 ns (20 timing requests, 140 following"),
            "{line}"
        );
        assert!(
            line.contains(
                "(equivalent script): 240 ns (p99probe costs more), net 180 ns (p99probe costs less)"
            ),
            "{line}"
        );
        assert!(
            line.contains(
                "not packaged): 200 ns (p99probe costs more), net 40 ns (p99probe costs more)"
            ),
            "{line}"
        );
        kernel.results[0].self_reported_ms_per_s = vec![0.24, 0.26, 0.25];
        let markdown = kernel.markdown();
        assert!(markdown.contains("| p99probe attach | `sk_data_ready_btf` | 500 | 100 | 0.05 |"));
        assert!(
            markdown.contains(
                "| p99probe attach | 0.25 | 0.25 (0.24–0.26) | 250 | 1.50 | 160 | 1000 |"
            ),
            "{markdown}"
        );
        assert!(
            markdown.contains("| bpftrace (equivalent script) | 0.24 | — | 240 |"),
            "{markdown}"
        );
        assert!(
            markdown.contains("took 60 (50–500) ns per run"),
            "{markdown}"
        );
    }

    #[test]
    fn per_event_goal_lines_say_met_only_when_every_peer_costs_more_apart() {
        // Rows in EVENT_COST_CONFIGS order (nothing, p99probe, without request timing,
        // without the scheduler, bystander, bpftrace, libbpf-tools); columns pipe, tcp.
        let phases = |values: &[f64]| -> AddedNs { Ok((values.to_vec(), 0)) };
        let costs = EventCosts {
            baseline_ns: vec![5000.0, 15000.0],
            added_ns: vec![
                vec![phases(&[-10.0, 10.0]), phases(&[-500.0, 500.0])],
                vec![phases(&[800.0, 820.0, 810.0]), phases(&[1000.0, 3000.0])],
                vec![phases(&[830.0, 810.0]), phases(&[780.0, 800.0])],
                vec![phases(&[20.0, 40.0]), phases(&[360.0, 370.0])],
                vec![phases(&[470.0, 480.0]), phases(&[1200.0, 1250.0])],
                vec![
                    phases(&[10800.0, 11000.0, 10900.0]),
                    phases(&[12000.0, 13000.0]),
                ],
                vec![
                    phases(&[9700.0, 9600.0, 9800.0]),
                    Err("exited with status 1".into()),
                ],
            ],
        };
        let lines = costs.goal_lines();
        assert_eq!(lines.len(), 2);
        // Per context switch: half a pipe round trip.
        assert!(
            lines[0].starts_with("- less overhead than the peers, per context switch (cost per event, on the round-trip target): p99probe +405 ± 12 ns; bpftrace equivalent +5450 ± 124 ns, p99probe costs less; BCC libbpf-tools +4850 ± 124 ns, p99probe costs less — met"),
            "{}",
            lines[0]
        );
        // Two TCP phases far apart leave p99probe's interval over bpftrace's; the peer that
        // did not run is said so and does not count.
        assert!(
            lines[1].contains("bpftrace equivalent +12500 ± 6355 ns, p99probe costs about the same (intervals overlap); BCC libbpf-tools did not run — not resolved (intervals overlap)"),
            "{}",
            lines[1]
        );
        assert_eq!(
            ComparedCost::of((1.0, 0.1), (2.0, 0.1), false),
            ComparedCost::Less,
            "ns: smaller is cheaper"
        );
        assert_eq!(
            ComparedCost::of((1.0, 0.1), (2.0, 0.1), true),
            ComparedCost::More
        );
        assert_eq!(
            ComparedCost::of((3.0, 0.1), (2.0, 0.1), true),
            ComparedCost::Less
        );
        assert_eq!(
            ComparedCost::of((1.0, 0.6), (2.0, 0.5), true),
            ComparedCost::Overlapping
        );
    }
}
