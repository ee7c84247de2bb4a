//! Kernel-observed request latency counts every request, with and without keep-alive, and
//! measures from the arrival of the request's bytes.

use std::process::Command;
use std::time::Duration;

use integration_tests::*;
use p99probe::events::Event;

/// Runs wrk (in the server's network namespace) for 2 s while recording the server; returns
/// (wrk's request count, the recording's served requests, their latencies).
fn measure(server: Spawned, extra_wrk_args: &[&str]) -> (u64, u64, Vec<u64>) {
    let port = server.port.unwrap();
    let recorder = std::thread::spawn({
        let pid = server.pid();
        move || record_for(settings(pid), Duration::from_secs(6))
    });
    std::thread::sleep(Duration::from_secs(2));
    let wrk = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", server.pid()))
        .args(["taskset", "-c", "1", "wrk", "-t1", "-c4", "-d2s"])
        .args(extra_wrk_args)
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&wrk.stdout);
    let sent: u64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("wrk output: {text}"));
    let recording = recorder.join().unwrap();
    let latencies: Vec<u64> = recording
        .events()
        .filter_map(|e| match e {
            Event::RequestServed { latency_ns, .. } => Some(latency_ns),
            _ => None,
        })
        .collect();
    let delivered = recording
        .events()
        .filter(|e| matches!(e, Event::RequestDelivered { .. }))
        .count() as u64;
    eprintln!(
        "wrk {extra_wrk_args:?}: {sent} requests; served {} and delivered {delivered} seen by the kernel",
        latencies.len()
    );
    assert!(
        delivered * 10 >= sent * 9,
        "only {delivered} of {sent} deliveries seen"
    );
    (sent, latencies.len() as u64, latencies)
}

fn check(sent: u64, served: u64, mut latencies: Vec<u64>) {
    // wrk counts completed requests; requests in flight at its end may add a few.
    assert!(
        served * 100 >= sent * 98,
        "only {served} of {sent} requests seen"
    );
    assert!(served <= sent + 16, "{served} seen but wrk sent {sent}");
    let median = median(&mut latencies);
    assert!(
        median > 1_000 && median < 5_000_000,
        "median latency {median} ns"
    );
}

#[test]
fn keep_alive_requests_are_all_counted() {
    let _serial = serial();
    let (sent, served, latencies) = measure(go_server_on_cpu0(&[]), &[]);
    check(sent, served, latencies);
}

/// A containerised server listens in its own network namespace: its listeners must be found
/// there, or none of its connections is known as the target's.
#[test]
fn requests_to_a_server_in_its_own_network_namespace_are_counted() {
    let _serial = serial();
    let script = format!(
        "ip link set lo up && exec taskset -c 0 {}",
        go_server_binary().display()
    );
    let server = spawn_ready(
        std::path::Path::new("unshare"),
        &["--net", "--", "sh", "-c", &script],
    );
    let (sent, served, latencies) = measure(server, &[]);
    check(sent, served, latencies);
}

#[test]
fn connection_close_requests_are_all_counted_including_the_first_on_each_connection() {
    let _serial = serial();
    let (sent, served, latencies) = measure(go_server_on_cpu0(&[]), &["-H", "Connection: close"]);
    check(sent, served, latencies);
}

/// Request latencies wait in a per-CPU batch in the kernel until it fills; at a trickle of
/// requests the agent must still get each one promptly, or a spike at low load goes unseen.
#[test]
fn a_lone_request_reaches_the_live_agent_promptly() {
    use std::io::{BufRead, BufReader, Write};

    use p99probe::recorder::{monotonic_ns, LiveSession};

    let _serial = serial();
    let server = target(&["server", "--duration", "30", "--response-bytes", "64"]);
    let port = server.port.unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut session = LiveSession::start(&settings(server.pid())).unwrap();
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        (&stream).write_all(b"GET\n").unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        let answered = monotonic_ns();

        let mut events = Vec::new();
        let seen = loop {
            session.next_events(&mut events).await.unwrap();
            let served = events
                .iter()
                .filter_map(Event::from_raw)
                .any(|e| matches!(e, Event::RequestServed { .. }));
            if served || monotonic_ns() - answered > 2_000_000_000 {
                break served.then(monotonic_ns);
            }
        };
        let waited_ns = seen.expect("the request never reached the agent") - answered;
        let waited_ms = waited_ns / 1_000_000;
        eprintln!("the request reached the agent {waited_ms} ms after its answer");
        assert!(waited_ms < 200, "the request took {waited_ms} ms to arrive");
    });
}
