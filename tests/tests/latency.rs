//! Kernel-observed request latency counts every request, with and without keep-alive, and
//! measures from the arrival of the request's bytes.

use std::process::Command;
use std::time::Duration;

use integration_tests::*;
use p99probe::attach::ProbeSettings;
use p99probe::events::Event;
use p99probe::request_end::WriteHookPolicy;

/// Where the kernel ends a request in a run of [`measure`].
#[derive(Clone, Copy, PartialEq, Debug)]
enum Ends {
    /// Delivery latency is tracked too (as `record` does), so the write hook stays attached
    /// and requests end at the server's write.
    AtWrite,
    /// Server latency only, as `attach` measures it, where under this load the write hook is
    /// detached: requests end when the peer's next request or FIN acknowledges the response.
    /// The hook is left off from the start here, so every request ends that way.
    WhenAcknowledged,
}

/// Runs wrk (in the server's network namespace) for 2 s while recording the server; returns
/// (wrk's request count, the recording's served requests, their latencies).
fn measure(server: Spawned, extra_wrk_args: &[&str], ends: Ends) -> (u64, u64, Vec<u64>) {
    let port = server.port.unwrap();
    let recorder = std::thread::spawn({
        let settings = ProbeSettings {
            track_delivery: ends == Ends::AtWrite,
            write_hook: match ends {
                Ends::AtWrite => WriteHookPolicy::Always,
                Ends::WhenAcknowledged => WriteHookPolicy::Never,
            },
            ..settings(server.pid())
        };
        move || record_for(settings, Duration::from_secs(6))
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
    // Requests ended at the server's write carry the writing thread; those ended by the
    // peer's acknowledgement (in softirq) carry none.
    let ended_at_write = recording
        .events()
        .filter(|e| matches!(e, Event::RequestServed { tid, .. } if *tid != 0))
        .count();
    eprintln!(
        "wrk {extra_wrk_args:?} {ends:?}: {sent} requests; served {} ({ended_at_write} at a write) and delivered {delivered} seen by the kernel",
        latencies.len()
    );
    match ends {
        Ends::AtWrite => {
            assert!(
                delivered * 10 >= sent * 9,
                "only {delivered} of {sent} deliveries seen"
            );
            assert!(
                ended_at_write * 10 >= latencies.len() * 9,
                "only {ended_at_write} of {} requests ended at a write",
                latencies.len()
            );
        }
        Ends::WhenAcknowledged => {
            assert_eq!(delivered, 0, "delivery was not asked for");
            assert_eq!(
                ended_at_write, 0,
                "requests ended at a write with no write hook"
            );
        }
    }
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
    let (sent, served, latencies) = measure(go_server_on_cpu0(&[]), &[], Ends::AtWrite);
    check(sent, served, latencies);
}

#[test]
fn keep_alive_requests_ended_by_the_next_request_are_all_counted() {
    let _serial = serial();
    let (sent, served, latencies) = measure(go_server_on_cpu0(&[]), &[], Ends::WhenAcknowledged);
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
    let (sent, served, latencies) = measure(server, &[], Ends::AtWrite);
    check(sent, served, latencies);
}

#[test]
fn connection_close_requests_are_all_counted_including_the_first_on_each_connection() {
    let _serial = serial();
    let (sent, served, latencies) = measure(
        go_server_on_cpu0(&[]),
        &["-H", "Connection: close"],
        Ends::AtWrite,
    );
    check(sent, served, latencies);
}

/// Without the write hook, a request on a connection the server then closes ends at the
/// close: the client's ACK of the server's FIN acknowledges the response too.
#[test]
fn connection_close_requests_ended_by_the_close_are_all_counted() {
    let _serial = serial();
    let (sent, served, latencies) = measure(
        go_server_on_cpu0(&[]),
        &["-H", "Connection: close"],
        Ends::WhenAcknowledged,
    );
    check(sent, served, latencies);
}

/// Request latencies stay in the kernel's per-CPU timing rings until the agent reads them; at a
/// trickle of requests, which never wake it, it must still get each one promptly, or a spike
/// at low load goes unseen.
/// Server latency only, as `attach` measures it: at a trickle the write hook must be attached,
/// or a request on a connection that then sits idle would not end until its next request.
#[test]
fn a_lone_request_reaches_the_live_agent_promptly() {
    use std::io::{BufRead, BufReader, Write};

    use p99probe::recorder::{monotonic_ns, LiveSession};

    let _serial = serial();
    let server = target(&["server", "--duration", "30", "--response-bytes", "64"]);
    let port = server.port.unwrap();
    block_on(async {
        let mut session = LiveSession::start(&ProbeSettings {
            track_delivery: false,
            ..settings(server.pid())
        })
        .unwrap();
        // Idle long enough for the agent to judge the request rate (and keep the hook).
        let mut events = p99probe::events::Drained::default();
        let idle_until = monotonic_ns() + 3 * p99probe::request_end::DECIDE_EVERY_NS;
        while monotonic_ns() < idle_until {
            session.next_events(&mut events).await.unwrap();
        }
        assert!(
            session.write_hook_attached(),
            "no requests, yet the write hook is off"
        );
        events.clear();
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        (&stream).write_all(b"GET\n").unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        let answered = monotonic_ns();

        let seen = loop {
            session.next_events(&mut events).await.unwrap();
            let served = events
                .raw_events()
                .filter_map(|e| Event::from_raw(&e))
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

/// While requests are plentiful and calm the agent drains once a second; a rise in their
/// latency to the watch mark wakes it at once (the kernel counts the trigger's latencies), so
/// the trigger and full-rate sampling do not wait for the next drain.
#[test]
fn a_rise_in_latency_wakes_the_agent_that_drains_seldom() {
    use p99probe::attach::TriggerLatency;
    use p99probe::recorder::{monotonic_ns, LiveSession};

    let _serial = serial();
    // Time to attach and then drain a second apart at least once before the stalls.
    let inject_after_ns = 6_000_000_000;
    let server = target(&[
        "server",
        "--duration",
        "30",
        "--response-bytes",
        "64",
        "--stall-every",
        "10",
        "--stall-ms",
        "5",
        "--inject-after",
        "6",
    ]);
    let stalls_from = monotonic_ns() + inject_after_ns;
    let _load = client_load(server.port.unwrap(), 4, 20);
    block_on(async {
        let mut session = LiveSession::start(&ProbeSettings {
            track_delivery: false,
            trigger_latency: Some(TriggerLatency {
                kind: probe_common::EventKind::RequestServed,
                window_ns: 1_000_000_000,
            }),
            ..settings(server.pid())
        })
        .unwrap();
        session.watch_latency(Some(2_000_000));
        let mut events = p99probe::events::Drained::default();
        let mut longest_calm_gap_ns = 0;
        let mut last = monotonic_ns();
        let woken_at = loop {
            session.next_events(&mut events).await.unwrap();
            events.clear();
            let now = monotonic_ns();
            if now < stalls_from {
                longest_calm_gap_ns = longest_calm_gap_ns.max(now - last);
            }
            last = now;
            if std::mem::take(&mut events.latency_rising) && now >= stalls_from {
                break Some(now);
            }
            if now > stalls_from + 3_000_000_000 {
                break None;
            }
        };
        let woken_ms =
            woken_at.expect("no rise reached the agent") / 1_000_000 - stalls_from / 1_000_000;
        let gap_ms = longest_calm_gap_ns / 1_000_000;
        eprintln!("drains up to {gap_ms} ms apart while calm; woken {woken_ms} ms into the stalls");
        assert!(
            gap_ms >= 900,
            "busy and calm, yet drains came every {gap_ms} ms at most"
        );
        // A slice is 50 ms; it takes 1% of its requests at 5 ms, about the first 10% of it.
        assert!(woken_ms < 400, "woken {woken_ms} ms into the stalls");
    });
}

/// Both ways of ending a request measure the same interval: every 10th request sleeps 5 ms in
/// the server, and both runs must see a tenth of their requests at 5 ms and a bit more.
///
/// The two runs are compared by the 10th percentile of their stalled requests, not the
/// median: the sleep's overshoot (the server's wakeup) differs between runs with the host's
/// load, and in one CI run a disturbed stretch put a run's median 0.9 ms above the other's.
/// Host noise delays some wakeups and moves the median more than the fastest requests. An end
/// taken at the wrong moment (a delayed acknowledgement, the client's next request) would
/// shift them all.
#[test]
fn requests_ended_at_the_write_or_by_the_acknowledgement_measure_the_same() {
    let _serial = serial();
    let stalled_fastest_tenth_ns = |ends: Ends| -> u64 {
        let server = go_server_on_cpu0(&["-stall-every", "10", "-stall-ms", "5"]);
        let (sent, served, latencies) = measure(server, &[], ends);
        check(sent, served, latencies.clone());
        let mut stalled: Vec<u64> = latencies
            .iter()
            .copied()
            .filter(|&ns| ns >= 5_000_000)
            .collect();
        let share = stalled.len() as f64 / latencies.len() as f64;
        let median_ns = median(&mut stalled);
        let fastest_tenth_ns = stalled[stalled.len() / 10];
        eprintln!(
            "{ends:?}: {share:.3} of requests took 5 ms or more; of those the median took \
             {median_ns} ns, the 10th percentile {fastest_tenth_ns} ns"
        );
        assert!(
            (0.08..0.12).contains(&share),
            "{ends:?}: {share:.3} of requests at 5 ms or more, not a tenth"
        );
        assert!(
            median_ns < 7_000_000,
            "{ends:?}: stalled requests took {median_ns} ns (median), not ~5 ms"
        );
        fastest_tenth_ns
    };
    let at_write = stalled_fastest_tenth_ns(Ends::AtWrite);
    let acknowledged = stalled_fastest_tenth_ns(Ends::WhenAcknowledged);
    let apart_ns = at_write.abs_diff(acknowledged);
    assert!(
        apart_ns < 500_000,
        "stalled requests, 10th percentile: {at_write} ns ended at the write, {acknowledged} ns \
         by the acknowledgement"
    );
}

#[test]
fn a_listener_takes_no_request_slot_from_the_connections_it_accepts() {
    // The listening socket's sk_data_ready runs once for every connection it queues for
    // accept. It carries no request: had it taken a slot, it would sit there as a request
    // waiting forever, and evict a connection's waiting request whenever the two share one.
    let _serial = serial();
    let server = target(&["server", "--duration", "20", "--response-bytes", "64"]);
    let port = server.port.unwrap();
    let probes = p99probe::attach::attach(&settings(server.pid())).unwrap();
    let slots = |what: fn(&probe_common::SocketState) -> bool| {
        let sockets: aya::maps::Array<_, probe_common::SocketState> =
            aya::maps::Array::try_from(probes.ebpf.map("SOCKETS").unwrap()).unwrap();
        sockets.iter().filter(|s| what(s.as_ref().unwrap())).count()
    };

    let mut connections: Vec<std::net::TcpStream> = (0..32)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let waiting = slots(|s| s.stage == probe_common::WAITING);
    assert_eq!(waiting, 0, "32 connections accepted, none has sent a byte");
    assert_eq!(slots(|s| s.sk != 0), 0, "slots taken before any request");

    // The same map does show a connection once it has carried a request.
    use std::io::{BufRead, Write};
    let connection = &mut connections[0];
    connection.write_all(b"ping\n").unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(connection.try_clone().unwrap())
        .read_line(&mut reply)
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        slots(|s| s.sk != 0),
        1,
        "one connection has carried a request"
    );
}

#[test]
fn the_round_trip_targets_tcp_exchanges_are_timed_as_requests() {
    // The cost-per-event benchmark prices a request by this target's TCP round trips. Each
    // is a request only while the port its server end is on is one the target listens on.
    let _serial = serial();
    let target = target(&["roundtrips", "--via", "tcp", "--duration", "10"]);
    let recording = record_for(settings(target.pid()), Duration::from_secs(2));
    let served = recording
        .events()
        .filter(|e| matches!(e, Event::RequestServed { .. }))
        .count();
    // Tens of thousands of round trips a second on this machine, even traced.
    assert!(
        served >= 10_000,
        "{served} requests timed in 2 s of round trips"
    );
}
