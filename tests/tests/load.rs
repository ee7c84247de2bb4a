//! The benchmark's load generator (`p99probe-target load`) reports each phase on its own: a
//! server that starts stalling between two phases shows in the second phase's P99 only.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::*;

/// The `name value` pairs of a phase report line.
fn field(report: &str, name: &str) -> f64 {
    let words: Vec<&str> = report.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == name)
        .unwrap_or_else(|| panic!("no {name} in {report:?}"));
    words[at + 1].parse().unwrap()
}

#[test]
fn each_phase_reports_its_own_throughput_and_percentiles() {
    // Every 20th request stalls 40 ms, but only from 3 s after the server starts.
    let server = target(&[
        "server",
        "--duration",
        "30",
        "--response-bytes",
        "100",
        "--stall-every",
        "20",
        "--stall-ms",
        "40",
        "--inject-after",
        "3",
    ]);
    let server_started = Instant::now();
    let port = server.port.unwrap().to_string();
    let mut load = Command::new(binary("p99probe-target"))
        .args(["load", "--port", &port, "--conns", "4", "--duration", "20"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the load generator");
    let mut control = load.stdin.take().unwrap();
    let mut reports = BufReader::new(load.stdout.take().unwrap()).lines();
    assert_eq!(reports.next().unwrap().unwrap(), "ready");
    let mut end_phase = || -> String {
        writeln!(control).unwrap();
        reports.next().expect("a phase report").unwrap()
    };

    std::thread::sleep(Duration::from_millis(1500));
    let calm = end_phase();
    let stalling_from = Duration::from_millis(3500);
    std::thread::sleep(stalling_from.saturating_sub(server_started.elapsed()));
    end_phase();
    std::thread::sleep(Duration::from_secs(2));
    let stalling = end_phase();
    let _ = load.kill();
    let _ = load.wait();
    drop(server);

    for report in [&calm, &stalling] {
        assert!(report.starts_with("phase "), "{report}");
        assert_eq!(field(report, "errors"), 0.0, "{report}");
        assert!(field(report, "requests") > 100.0, "{report}");
    }
    // 40 ms stalls on 5% of requests: P99 is a stall, P50 is not.
    assert!(field(&calm, "p99_us") < 20_000.0, "calm phase: {calm}");
    assert!(
        field(&stalling, "p99_us") >= 40_000.0,
        "stalling phase: {stalling}"
    );
    assert!(
        field(&stalling, "p50_us") < 20_000.0,
        "stalling phase: {stalling}"
    );
    let seconds = field(&stalling, "seconds");
    assert!((1.9..3.0).contains(&seconds), "{stalling}");
}
