//! p99probe times its own kernel programs in spans while attached and reports what they cost
//! the workload: the figures must be the real programs' runs, over the spans and only them.

use std::time::Duration;

use integration_tests::*;
use p99probe::attach::ProbeSettings;
use p99probe::events::Event;
use p99probe::own_cost::{OwnCost, SPAN_NS};
use p99probe::recording::Recording;

fn record_with_own_cost_every(pid: u32, every: Duration, length: Duration) -> Recording {
    let settings = ProbeSettings {
        own_cost_every_ns: every.as_nanos() as u64,
        ..settings(pid)
    };
    record_for(settings, length)
}

fn served_in(recording: &Recording) -> u64 {
    recording
        .events()
        .filter(|e| matches!(e, Event::RequestServed { .. }))
        .count() as u64
}

fn program<'a>(cost: &'a OwnCost, prefix: &str) -> &'a p99probe::own_cost::ProgramCost {
    cost.programs
        .iter()
        .find(|p| p.program.starts_with(prefix))
        .unwrap_or_else(|| panic!("no program {prefix}* in {:?}", cost.programs))
}

#[test]
fn the_agents_programs_are_timed_over_the_spans_and_only_them() {
    let _serial = serial();
    // Both outlive the test by far (they are killed when it ends): the two recordings take
    // 14 s, but attaching, draining and symbolizing a debug build under this load add 20-30 s.
    let server = target(&["server", "--duration", "180", "--response-bytes", "64"]);
    let _load = client_load(server.port.unwrap(), 4, 170);

    // Spans back to back: the whole recording is timed.
    let recording = record_with_own_cost_every(
        server.pid(),
        Duration::from_nanos(SPAN_NS),
        Duration::from_secs(3),
    );
    let cost = recording.meta.own_cost.clone().expect("own cost measured");
    let recorded = served_in(&recording);
    eprintln!(
        "back to back: {cost:?}; {recorded} requests recorded; {}",
        cost.summary().unwrap()
    );
    assert_eq!(cost.unmeasured, None);
    assert!(cost.spans >= 3, "{} spans in 3 s", cost.spans);
    // From the agent's first wake to the moment the recording ends, which comes after the
    // 3 s by as much as one drain takes (up to 0.3 s in a debug build under this load): the
    // bound is the recording's own length, not the 3 s asked for.
    assert!(
        (2_700_000_000..=recording.duration_ns()).contains(&cost.measured_ns),
        "{} ns measured of a recording of {} ns, 3 s asked for",
        cost.measured_ns,
        recording.duration_ns()
    );
    assert!(recorded > 1000, "only {recorded} requests recorded");
    assert!(
        cost.requests_served * 10 >= recorded * 9 && cost.requests_served <= recorded + 100,
        "{} requests served in the spans, {recorded} recorded",
        cost.requests_served
    );
    // Every request's bytes arrive once at least, and the client's answers arrive too.
    let data_ready = program(&cost, "sk_data_ready");
    assert!(
        data_ready.runs >= cost.requests_served,
        "{} runs of {} for {} requests",
        data_ready.runs,
        data_ready.program,
        cost.requests_served
    );
    // The server's threads block between requests: the scheduler programs ran as well.
    assert!(program(&cost, "sched_switch").runs > 100);
    for p in &cost.programs {
        assert!(
            (5.0..200_000.0).contains(&p.ns_per_run()),
            "{}: {} ns per run",
            p.program,
            p.ns_per_run()
        );
    }
    let per_request = cost.ns_per_request().unwrap();
    assert!(
        (50.0..50_000.0).contains(&per_request),
        "{per_request} ns per request"
    );

    // The default period: one span, somewhere in the first 10 s, and the kernel does not time
    // the rest of the recording.
    let recording = record_with_own_cost_every(
        server.pid(),
        Duration::from_nanos(p99probe::own_cost::DEFAULT_EVERY_NS),
        Duration::from_secs(11),
    );
    let cost = recording.meta.own_cost.clone().expect("own cost measured");
    let recorded = served_in(&recording);
    eprintln!("one span: {cost:?}; {recorded} requests recorded");
    // The first span starts anywhere in the first 9 s and the next 10 s after it: when the
    // first started in the first second (one run in nine), the next starts before the 11 s are
    // up, and their end cuts it short.
    // Requests counted in the spans: at most what their length holds, a fifth of the 11 s for
    // one span, a quarter for two (the second cut short).
    let span_share = match cost.spans {
        1 => {
            assert!(
                // The agent wakes at the span's end: it does not wait for the next drain,
                // which for a busy target can be a second away.
                (SPAN_NS..SPAN_NS + 250_000_000).contains(&cost.measured_ns),
                "{} ns measured in one span",
                cost.measured_ns
            );
            5
        }
        2 => {
            assert!(
                (SPAN_NS..2 * SPAN_NS).contains(&cost.measured_ns),
                "{} ns measured in two spans, the second cut short by the end",
                cost.measured_ns
            );
            4
        }
        spans => panic!("{spans} spans in 11 s, one every 10 s"),
    };
    assert!(
        cost.requests_served * span_share < recorded,
        "{} requests counted in {} span(s) of an 11 s recording of {recorded}",
        cost.requests_served,
        cost.spans
    );
    assert!(program(&cost, "sk_data_ready").runs >= cost.requests_served);

    let recording =
        record_with_own_cost_every(server.pid(), Duration::ZERO, Duration::from_secs(1));
    assert_eq!(
        recording.meta.own_cost, None,
        "--own-cost-every 0 measures nothing"
    );
}
