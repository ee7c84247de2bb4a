//! A Go server (Debian's golang-go): its user stacks unwind through frame pointers and
//! symbolize to Go function names.

use std::time::Duration;

use integration_tests::*;
use p99probe::events::Event;
use p99probe::flamegraph::{fold, weight_containing, FlameKind};
use p99probe::window::Window;

#[test]
fn go_server_stacks_symbolize_to_go_function_names() {
    let _serial = serial();
    let (_dir, binary) = build_go_server();
    let server = spawn_ready(&binary, &["-background"]);
    let recording = record_for(settings(server.pid()), Duration::from_secs(3));

    // Detected as Go, with its version and the runtime probes attached.
    let go = recording
        .meta
        .hooks
        .go
        .as_ref()
        .expect("Go target not detected");
    assert_eq!(
        Some(go.version.clone()),
        p99probe::goruntime::go_version(&binary)
    );
    assert!(go.version.starts_with("go1."), "{}", go.version);
    assert_eq!(go.probes.len(), 4, "missing: {:?}", go.missing);

    let stall_stacks: Vec<(u64, Vec<String>)> = recording
        .events()
        .filter_map(|e| match e {
            Event::OffCpu {
                duration_ns,
                user_stack,
                preempted: false,
                ..
            } => Some((duration_ns, recording.stack_names(user_stack))),
            _ => None,
        })
        .filter(|(_, names)| names.iter().any(|n| n == "main.stallHere"))
        .collect();
    assert!(
        stall_stacks.len() >= 20,
        "{} off-CPU intervals in main.stallHere",
        stall_stacks.len()
    );
    let mut durations: Vec<u64> = stall_stacks.iter().map(|(d, _)| *d).collect();
    let median = median(&mut durations);
    assert!(
        (19_500_000..30_000_000).contains(&median),
        "median {median} ns"
    );
    // Root-first order through the Go runtime: the goroutine entry comes before the function.
    let names = &stall_stacks[0].1;
    eprintln!("Go off-CPU stack: {}", names.join(";"));
    let stall = names.iter().position(|n| n == "main.stallHere").unwrap();
    assert!(
        names[stall + 1..].iter().any(|n| n.starts_with("syscall.")),
        "{names:?}"
    );

    let window = Window::new(recording.meta.start_ns, recording.meta.end_ns);
    let oncpu = fold(&recording, FlameKind::Oncpu, window, false);
    let total: u64 = oncpu.values().sum();
    let spinning = weight_containing(&oncpu, "main.spinHere");
    eprintln!("main.spinHere in {spinning} of {total} on-CPU samples");
    assert!(
        spinning * 2 >= total && total >= 200,
        "main.spinHere in {spinning} of {total} samples"
    );
}
