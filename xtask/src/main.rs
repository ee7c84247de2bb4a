//! Project automation: `cargo xtask setup | build | demo | test`.
//!
//! Everything a fresh machine of this image lacks is installed here, idempotently and quickly
//! when already present: Debian packages, nightly rust-src, and bpf-linker built against the
//! toolchain's own LLVM (version and library name read from `rustc`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (fast when already installed).
    Setup,
    /// Setup, then build the agent and the test targets (release).
    Build,
    /// Build, then record a built-in demo target under load with an injected stall.
    Demo {
        /// Where the demo writes its outputs.
        #[arg(long, default_value = "demo-output")]
        out: PathBuf,
    },
    /// Setup, then formatting, lints, unit and integration tests (needs root).
    Test,
    /// Measure overhead against bpftrace and BCC, pipeline limits and time to verdict, and
    /// write BENCHMARKS.md (needs root; takes about 40 minutes; not part of `test`).
    Bench {
        /// Only the kernel-side cost by program (about 6 minutes), printed instead of written
        /// to BENCHMARKS.md: for comparing a change with the last full run.
        #[arg(long)]
        kernel_cost_only: bool,
        /// Only the interleaved phases on both servers (throughput and P99 against nothing
        /// attached; about 25 minutes at 12 rounds), printed instead of written to BENCHMARKS.md.
        #[arg(long, conflicts_with = "kernel_cost_only")]
        interleaved_only: bool,
        /// Only the cost per event (context switches and requests between two threads of a
        /// round-trip target, about 10 minutes at 12 rounds), printed instead of written to
        /// BENCHMARKS.md: resolves changes of tens of ns per event.
        #[arg(long, conflicts_with_all = ["kernel_cost_only", "interleaved_only"])]
        event_costs_only: bool,
        /// Rounds of interleaved phases; each round runs every configuration once.
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u16).range(2..))]
        rounds: u16,
        /// With --interleaved-only: the configurations to run beside `p99probe attach` and the
        /// null control, which always run (comma-separated; when not given, those of the full
        /// bench; `--also nothing` for those two alone). The `without-*` and `agent-only` ones
        /// take one part of attach's hooks away each, to show what that part costs.
        #[arg(long, value_delimiter = ',', requires = "interleaved_only")]
        also: Vec<bench::Tool>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Debian packages, by the command each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("go", "golang-go"),
    ("nft", "nftables"),
    ("wrk", "wrk"),
    ("setpriv", "util-linux"),
    ("mount", "mount"),
    ("bpftool", "bpftool"),
];

/// Only the benchmarks need these.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("redis-server", "redis-server"),
    ("redis-benchmark", "redis-tools"),
    ("bpftrace", "bpftrace"),
    ("runqlat-bpfcc", "bpfcc-tools"),
    ("offcputime", "libbpf-tools"),
];

fn install_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(command, _)| !have(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn install_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The stable toolchain's LLVM: major version and the shared library's file name.
fn toolchain_llvm() -> Result<(String, PathBuf, String)> {
    let version = output(Command::new("rustc").args(["+stable", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc -vV does not report an LLVM version")?
        .trim()
        .to_string();
    let major = llvm.split('.').next().unwrap_or_default().to_string();
    let sysroot = output(Command::new("rustc").args(["+stable", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let library = std::fs::read_dir(&lib_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with(&format!("libLLVM.so.{major}")))
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib_dir.display()))?;
    Ok((major, lib_dir.join(&library), library))
}

fn install_bpf_linker() -> Result<()> {
    let (major, library_path, library_name) = toolchain_llvm()?;
    let prefix = Path::new("/opt/rust-llvm");
    let marker = prefix.join("bpf-linker-built-for");
    let wanted = format!("{major} {library_name}\n");
    let current = std::fs::read_to_string(&marker).unwrap_or_default();
    let works = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works && current == wanted {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker against the toolchain's LLVM {major} ({library_name})");
    let lib64 = prefix.join("lib64");
    std::fs::create_dir_all(&lib64)?;
    // bpf-linker's rpath wants both the plain name (link time) and the soname (run time).
    for name in ["libLLVM.so", library_name.as_str()] {
        let link = lib64.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&library_path, &link)?;
    }
    run(Command::new("cargo")
        .args([
            "+stable",
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", prefix))?;
    std::fs::write(marker, wanted)?;
    Ok(())
}

fn setup() -> Result<()> {
    install_packages(PACKAGES)?;
    install_rust_src()?;
    install_bpf_linker()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn build(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "probe-user", "-p", "targets"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn require_root(what: &str) -> Result<()> {
    if unsafe { libc_geteuid() } != 0 {
        bail!("{what} loads eBPF programs into the kernel and must run as root (try: sudo -E cargo xtask ...)");
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn test() -> Result<()> {
    require_root("the test suite")?;
    setup()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(Command::new("cargo")
        .args(["+nightly", "fmt", "--check"])
        .current_dir(root().join("probe-ebpf")))?;
    // The kernel programs are their own workspace (nightly, bpfel), out of the reach of the
    // workspace's clippy below.
    run(Command::new("cargo")
        .args(["+nightly", "clippy", "--release", "--", "-D", "warnings"])
        .current_dir(root().join("probe-ebpf")))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    build(false)?;
    run_tests(cargo().args([
        "test",
        "--workspace",
        "--no-fail-fast",
        "--",
        "--test-threads=1",
    ]))
}

/// Runs cargo test, passing its output through, and closes with one total line so the result
/// is not mistaken for the last (often empty) test binary's.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build(true)
        }
        Task::Demo { out } => {
            require_root("the demo")?;
            setup()?;
            build(true)?;
            run(Command::new(root().join("scripts/demo.sh"))
                .arg(&out)
                .current_dir(root()))
        }
        Task::Test => test(),
        Task::Bench {
            kernel_cost_only,
            interleaved_only,
            event_costs_only,
            rounds,
            also,
        } => {
            require_root("the benchmarks")?;
            setup()?;
            install_packages(BENCH_PACKAGES)?;
            build(true)?;
            // The round-trip target needs no Go server.
            if event_costs_only {
                return bench::print_event_costs(&root(), rounds.into());
            }
            let go_binary = root().join("target/bench/goserver");
            std::fs::create_dir_all(go_binary.parent().unwrap())?;
            run(Command::new("go")
                .args(["build", "-o"])
                .arg(&go_binary)
                .arg(root().join("tests/go/server.go"))
                .env("GO111MODULE", "off")
                .env("GOCACHE", root().join("target/bench/gocache")))?;
            if kernel_cost_only {
                return bench::print_kernel_cost(&root(), &go_binary);
            }
            if interleaved_only {
                return bench::print_interleaved(&root(), &go_binary, rounds.into(), &also);
            }
            bench::run(&root(), &go_binary, rounds.into())
        }
    }
}
