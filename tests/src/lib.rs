//! Helpers for the end-to-end tests: spawn targets with known behaviour, record them with the
//! real kernel programs, induce loss with nftables. These tests need root and fail (never skip)
//! without it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use p99probe::attach::ProbeSettings;
use p99probe::recorder::{record, RecordOptions};
use p99probe::recording::Recording;

/// Scheduler measurements are disturbed by other tests on a 2-CPU machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "end-to-end tests load eBPF programs and must run as root (cargo xtask test)"
    );
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `target/<profile>/` of this build, found from the test executable (`.../deps/test-xxx`).
pub fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// A workspace binary; built on demand so `cargo test` alone also works.
pub fn binary(name: &str) -> PathBuf {
    let path = build_dir().join(name);
    if !path.exists() {
        let profile = build_dir()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "targets", "-p", "probe-user"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building {name} failed");
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A child process killed (and reaped) when dropped.
pub struct Spawned {
    pub child: Child,
    /// The port it printed with `ready PORT`, if any.
    pub port: Option<u16>,
    /// Lines it printed after `ready`.
    later_lines: Option<std::sync::mpsc::Receiver<String>>,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first later stdout line starting with `prefix`, without it; panics after `timeout`.
    pub fn line_after(&mut self, prefix: &str, timeout: Duration) -> String {
        let lines = self.later_lines.as_ref().expect("stdout was not captured");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_string();
                    }
                }
                Err(_) => panic!("no line starting {prefix:?} within {timeout:?}"),
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `program args` and waits (up to 60 s) for its `ready [PORT]` line.
pub fn spawn_ready(program: &Path, args: &[&str]) -> Spawned {
    let mut child = Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (later_tx, later_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok);
        let _ = tx.send(first);
        // Keep draining so the child never blocks on a full pipe.
        for line in lines.map_while(Result::ok) {
            let _ = later_tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("{} {args:?} never said ready", program.display()));
    let mut words = line.split_whitespace();
    assert_eq!(
        words.next(),
        Some("ready"),
        "unexpected first line {line:?}"
    );
    let port = words.next().map(|p| p.parse().expect("port"));
    Spawned {
        child,
        port,
        later_lines: Some(later_rx),
    }
}

pub fn target(args: &[&str]) -> Spawned {
    spawn_ready(&binary("p99probe-target"), args)
}

/// `p99probe-target client`: `conns` connections to `port` kept busy for `seconds`.
pub fn client_load(port: u16, conns: u32, seconds: u32) -> Spawned {
    target(&[
        "client",
        "--port",
        &port.to_string(),
        "--conns",
        &conns.to_string(),
        "--duration",
        &seconds.to_string(),
    ])
}

pub fn settings(pid: u32) -> ProbeSettings {
    ProbeSettings {
        pid,
        sample_hz: 499,
        calm_sample_divisor: 1,
        min_offcpu_ns: 1_000_000,
        offcpu_stack_budget: p99probe::offcpu_sampling::DEFAULT_BUDGET_PER_S,
        own_cost_every_ns: p99probe::own_cost::DEFAULT_EVERY_NS,
        sched_hook: None,
        debug_ebpf: false,
        track_delivery: true,
        write_hook: Default::default(),
        synthetic_syscall_events: false,
        trigger_latency: None,
        omitted: Vec::new(),
        empty_programs: false,
    }
}

/// Records with the real kernel programs for `duration` and reads the file back.
pub fn record_for(settings: ProbeSettings, duration: Duration) -> Recording {
    let dir = tempfile::tempdir().unwrap();
    record_to(settings, duration, &dir.path().join("test.p99"))
}

/// Like [`record_for`], keeping the file at `out`.
pub fn record_to(settings: ProbeSettings, duration: Duration, out: &Path) -> Recording {
    let out = out.to_path_buf();
    let options = RecordOptions {
        probe: settings,
        duration: Some(duration),
        out: out.clone(),
        progress: false,
    };
    block_on(record(&options, std::future::pending())).expect("recording failed");
    Recording::load(&out).expect("recording reads back")
}

/// Runs `future` to its end on a runtime of the current thread, as the agent runs.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Drops `percent`% of incoming TCP segments from the given source ports on loopback while
/// alive (nftables, `input` hook: a drop there makes the sender retransmit). Removed on drop.
pub struct PacketLoss {
    table: String,
}

impl PacketLoss {
    pub fn on_source_ports(ports: &[u16], percent: u32) -> PacketLoss {
        Self::on_ports("sport", ports, percent)
    }

    pub fn on_destination_ports(ports: &[u16], percent: u32) -> PacketLoss {
        Self::on_ports("dport", ports, percent)
    }

    fn on_ports(match_field: &str, ports: &[u16], percent: u32) -> PacketLoss {
        let table = format!("p99probe_test_{}", std::process::id());
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} input {{ type filter hook input priority 0; policy accept; }}\n\
             add rule inet {table} input iif lo tcp {match_field} {{ {} }} numgen random mod 100 < {percent} drop\n",
            ports.join(", ")
        );
        let loss = PacketLoss { table };
        nft(&["-f", "-"], Some(&script));
        loss
    }
}

impl Drop for PacketLoss {
    fn drop(&mut self) {
        nft(&["delete", "table", "inet", &self.table], None);
    }
}

fn nft(args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft (nftables) is installed by cargo xtask setup");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "nft {args:?} failed");
}

/// The kernel's count of retransmitted TCP segments (all sockets), from /proc/net/snmp.
pub fn retransmitted_segments() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names: Vec<&str> = tcp.next().unwrap().split_whitespace().collect();
    let values: Vec<&str> = tcp.next().unwrap().split_whitespace().collect();
    let index = names.iter().position(|n| *n == "RetransSegs").unwrap();
    values[index].parse().unwrap()
}

/// Builds the Go test server with Debian's golang-go into a temporary directory.
pub fn build_go_server() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("go/server.go");
    let binary = dir.path().join("goserver");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(&source)
        .env("GOCACHE", dir.path().join("gocache"))
        .env("GOPATH", dir.path().join("gopath"))
        .env("GO111MODULE", "off")
        .status()
        .expect("go (golang-go) is installed by cargo xtask setup");
    assert!(status.success(), "go build failed");
    (dir, binary)
}

/// Median of a non-empty list.
pub fn median(values: &mut [u64]) -> u64 {
    assert!(!values.is_empty(), "median of nothing");
    values.sort_unstable();
    values[values.len() / 2]
}

/// The Go test server, built once per test binary.
pub fn go_server_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_go_server).1.clone()
}

/// The Go test server pinned to CPU 0 (taskset execs it, so the PID is the server's).
pub fn go_server_on_cpu0(args: &[&str]) -> Spawned {
    let binary = go_server_binary();
    let mut full = vec!["-c", "0", binary.to_str().unwrap()];
    full.extend_from_slice(args);
    spawn_ready(Path::new("taskset"), &full)
}

/// wrk (Debian) on CPU 1 against `http://127.0.0.1:PORT/`, bounded by `seconds`.
pub fn wrk_on_cpu1(port: u16, connections: u32, seconds: u32) -> Spawned {
    let child = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{seconds}s"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("wrk is installed by cargo xtask setup");
    Spawned {
        child,
        port: None,
        later_lines: None,
    }
}

/// Whether a full-rate on-CPU sample's kernel stack (`names`, root first) reaches a system
/// call's entry. Panics, naming `sample`, when the stack carries the calm rate's not-walked
/// marker: no full-rate sample may.
pub fn full_rate_stack_from_a_system_call(names: &[String], sample: &str) -> bool {
    assert!(
        !names
            .iter()
            .any(|f| f == p99probe::symbolize::KERNEL_NOT_WALKED_NAME),
        "{sample}: a full-rate sample without its kernel stack: {names:?}"
    );
    names.iter().any(|f| f.starts_with("entry_SYSCALL"))
}
