//! `--bench-without`: the benchmark that splits `attach`'s cost over its hook families leaves
//! one family out at a time. That split is only worth something if a family left out records
//! nothing of its kind while the others go on recording.

use std::time::Duration;

use integration_tests::*;
use p99probe::attach::{HookFamily, ProbeSettings};
use p99probe::events::Event;
use p99probe::recording::Recording;

/// Requests timed, scheduler events (off-CPU intervals and run-queue waits), on-CPU samples.
fn counts(recording: &Recording) -> (usize, usize, usize) {
    let (mut served, mut scheduler, mut samples) = (0, 0, 0);
    for event in recording.events() {
        match event {
            Event::RequestServed { .. } | Event::RequestDelivered { .. } => served += 1,
            Event::OffCpu { .. } | Event::RunQueue { .. } => scheduler += 1,
            Event::OnCpuSample { .. } => samples += 1,
            _ => {}
        }
    }
    (served, scheduler, samples)
}

#[test]
fn an_omitted_hook_family_records_nothing_of_its_kind_and_the_others_still_record() {
    let _serial = serial();
    let server = target(&["server", "--duration", "30", "--response-bytes", "64"]);
    let _load = client_load(server.port.unwrap(), 4, 25);
    let record = |omitted: Vec<HookFamily>| {
        let settings = ProbeSettings {
            // Every interval, however short: the server's threads block between requests.
            min_offcpu_ns: 0,
            omitted: omitted.clone(),
            ..settings(server.pid())
        };
        let recording = record_for(settings, Duration::from_secs(2));
        let counts = counts(&recording);
        eprintln!(
            "without {omitted:?}: (timed, scheduler, samples) {counts:?}; {}",
            recording.meta.hooks
        );
        (counts, recording.meta.hooks)
    };

    let ((served, scheduler, samples), hooks) = record(vec![]);
    assert!(served > 100, "{served} requests timed with every hook");
    assert!(
        scheduler > 100,
        "{scheduler} scheduler events with every hook"
    );
    assert!(samples > 0, "no on-CPU samples with every hook");
    assert!(!hooks.to_string().contains("omitted"), "{hooks}");

    let ((served, scheduler, samples), hooks) = record(vec![HookFamily::RequestTiming]);
    assert_eq!(served, 0, "requests timed without the request-timing hooks");
    assert!(scheduler > 100, "{scheduler} scheduler events");
    assert!(samples > 0, "no on-CPU samples");
    assert!(
        hooks
            .tcp
            .iter()
            .any(|h| h.contains("request timing") && h.contains("omitted for a benchmark")),
        "{hooks}"
    );
    // Delivery latency is request timing too: its per-segment hook goes with the rest.
    assert!(
        !hooks.tcp.iter().any(|h| h.contains("/tcp_probe")),
        "{hooks}"
    );

    let ((served, scheduler, samples), hooks) = record(vec![HookFamily::Scheduler]);
    assert!(served > 100, "{served} requests timed");
    assert_eq!(scheduler, 0, "scheduler events without the scheduler hooks");
    assert!(samples > 0, "no on-CPU samples");
    assert!(
        hooks.scheduler.contains("omitted for a benchmark"),
        "{hooks}"
    );
    assert!(hooks.wakeup.contains("omitted for a benchmark"), "{hooks}");
}

/// `--bench-empty-programs` prices the hooks apart from the programs' work, so it must attach
/// every hook `attach` attaches, have each one run under load, and have none of them do
/// anything: no event, no timing.
#[test]
fn empty_programs_run_at_every_hook_and_record_nothing() {
    let _serial = serial();
    let server = target(&["server", "--duration", "30", "--response-bytes", "64"]);
    let _load = client_load(server.port.unwrap(), 4, 25);
    let settings = ProbeSettings {
        min_offcpu_ns: 0,
        empty_programs: true,
        // Spans back to back: every program's runs are counted over the whole recording.
        own_cost_every_ns: p99probe::own_cost::SPAN_NS,
        ..settings(server.pid())
    };
    let recording = record_for(settings, Duration::from_secs(3));
    let hooks = &recording.meta.hooks;
    let cost = recording.meta.own_cost.clone().expect("own cost measured");
    eprintln!(
        "{hooks}; {:?}; {:?}",
        recording.meta.counters, cost.programs
    );

    assert!(!hooks.to_string().contains("omitted"), "{hooks}");
    assert_eq!(
        hooks.empty_programs.as_deref(),
        Some(p99probe::attach::EMPTY_PROGRAMS)
    );
    // What each family's programs would have recorded, had they done their work: the
    // server answers thousands of requests a second, and its threads block between them.
    for program in [
        "sk_data_ready",
        "sched_switch",
        "sched_wakeup",
        "on_cpu_sample",
    ] {
        let runs: u64 = cost
            .programs
            .iter()
            .filter(|p| p.program.starts_with(program))
            .map(|p| p.runs)
            .sum();
        assert!(runs > 0, "{program}* never ran: {:?}", cost.programs);
    }
    // The response-write hook runs for every send on the machine, and with no request seen
    // its governor would keep it on. Under a load whose requests are timed it is detached.
    assert!(
        !cost
            .programs
            .iter()
            .any(|p| p.program.starts_with("sock_send") && p.runs > 0),
        "{:?}",
        cost.programs
    );
    assert_eq!(counts(&recording), (0, 0, 0));
    assert_eq!(recording.meta.counters.events_sent, 0);
    assert_eq!(recording.meta.counters.timings_recorded, 0);
}
