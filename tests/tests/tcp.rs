//! Retransmits fire in softirq/timer context: they must be attributed through the target's
//! sockets, not the current task.

use std::time::Duration;

use integration_tests::*;
use p99probe::events::Event;

#[test]
fn induced_loss_yields_retransmits_on_the_targets_port_only() {
    let _serial = serial();
    let server = target(&["server", "--duration", "30", "--response-bytes", "2000"]);
    let other = target(&["server", "--duration", "30", "--response-bytes", "2000"]);
    let (port, other_port) = (server.port.unwrap(), other.port.unwrap());
    let _load = target(&[
        "client",
        "--port",
        &port.to_string(),
        "--conns",
        "8",
        "--duration",
        "6",
    ]);
    let _other_load = target(&[
        "client",
        "--port",
        &other_port.to_string(),
        "--conns",
        "8",
        "--duration",
        "6",
    ]);

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
