//! Retransmits fire in softirq/timer context: they must be attributed through the target's
//! sockets, not the current task.

use std::time::Duration;

use integration_tests::*;
use p99probe::attach::ProbeSettings;
use p99probe::events::Event;
use p99probe::request_end::WriteHookPolicy;

#[test]
fn induced_loss_yields_retransmits_on_the_targets_port_only() {
    let _serial = serial();
    let server = target(&["server", "--duration", "30", "--response-bytes", "2000"]);
    let other = target(&["server", "--duration", "30", "--response-bytes", "2000"]);
    let (port, other_port) = (server.port.unwrap(), other.port.unwrap());
    let _load = client_load(port, 8, 6);
    let _other_load = client_load(other_port, 8, 6);

    let before = retransmitted_segments();
    let recording = {
        let _loss = PacketLoss::on_source_ports(&[port, other_port], 20);
        record_for(settings(server.pid()), Duration::from_secs(3))
    };
    let all_retransmits = retransmitted_segments() - before;

    let retransmits: Vec<(std::net::SocketAddr, std::net::SocketAddr)> = recording
        .events()
        .filter_map(|e| match e {
            Event::TcpRetransmit { local, remote, .. } => Some((local, remote)),
            _ => None,
        })
        .collect();
    eprintln!(
        "{} retransmits attributed to the target, {all_retransmits} system-wide",
        retransmits.len()
    );
    assert!(
        retransmits.len() >= 3,
        "only {} retransmits attributed to the target ({all_retransmits} system-wide)",
        retransmits.len()
    );
    for (local, remote) in &retransmits {
        assert_eq!(
            local.port(),
            port,
            "retransmit {local} -> {remote} is not the target's"
        );
        assert!(local.ip().is_loopback() && remote.ip().is_loopback());
    }
    // The other server (and the clients' own sockets) retransmitted too, and none of it was
    // attributed to the target.
    assert!(
        all_retransmits > retransmits.len() as u64,
        "system-wide {all_retransmits} vs attributed {}",
        retransmits.len()
    );
}

/// A server that calls a backend for every request owns two kinds of socket: the accepted ones
/// (requests) and its own outbound ones (not requests, but their retransmits are its problem).
#[test]
fn outbound_calls_are_not_requests_but_their_retransmits_are_the_targets() {
    let _serial = serial();
    let backend = target(&["server", "--duration", "30", "--response-bytes", "64"]);
    let backend_port = backend.port.unwrap();
    let server = target(&[
        "server",
        "--duration",
        "30",
        "--response-bytes",
        "64",
        "--backend",
        &backend_port.to_string(),
    ]);
    let port = server.port.unwrap();

    let (recording, sent) = {
        let _loss = PacketLoss::on_destination_ports(&[backend_port], 10);
        // Without the write hook (whose sends also teach the kernel the target's outbound
        // sockets), the backend connections are known from their connect().
        let recorder = std::thread::spawn({
            let settings = ProbeSettings {
                track_delivery: false,
                write_hook: WriteHookPolicy::Never,
                ..settings(server.pid())
            };
            move || record_for(settings, Duration::from_secs(7))
        });
        std::thread::sleep(Duration::from_secs(2));
        let mut load = client_load(port, 4, 3);
        let sent: u64 = load
            .line_after("requests ", Duration::from_secs(20))
            .parse()
            .unwrap();
        (recorder.join().unwrap(), sent)
    };

    let served = recording
        .events()
        .filter(|e| matches!(e, Event::RequestServed { .. }))
        .count() as u64;
    eprintln!("client completed {sent} requests; the kernel saw {served} served");
    assert!(sent >= 100, "the load only completed {sent} requests");
    // Each request also made one backend call: counting those would double `served`.
    assert!(
        served * 100 >= sent * 98 && served <= sent + 8,
        "{served} requests seen for {sent} sent"
    );

    let outbound_retransmits = recording
        .events()
        .filter(|e| match e {
            Event::TcpRetransmit { local, remote, .. } => {
                assert!(
                    local.port() == port || remote.port() == backend_port,
                    "retransmit {local} -> {remote} is on neither of the target's sockets"
                );
                remote.port() == backend_port
            }
            _ => false,
        })
        .count();
    assert!(
        outbound_retransmits >= 3,
        "only {outbound_retransmits} retransmits on the target's calls to its backend"
    );
}
