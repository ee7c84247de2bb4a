//! On-CPU sampling: a busy loop in a named function dominates the on-CPU flame graph.

use std::time::Duration;

use integration_tests::*;
use p99probe::flamegraph::{fold, render_svg, weight_containing, FlameKind};
use p99probe::window::Window;

#[test]
fn busy_loop_dominates_the_oncpu_flame_graph() {
    let _serial = serial();
    let spinner = target(&["spinner", "--duration", "20"]);
    let recording = record_for(settings(spinner.pid()), Duration::from_secs(2));
    let window = Window::new(recording.meta.start_ns, recording.meta.end_ns);
    let folded = fold(&recording, FlameKind::Oncpu, window, false);
    let total: u64 = folded.values().sum();
    let spinning = weight_containing(&folded, "spin_here");
    // One CPU-bound thread at 499 Hz for 2 s: ~1000 samples.
    assert!(total >= 500, "only {total} on-CPU samples");
    assert!(
        spinning * 10 >= total * 8,
        "spin_here is in {spinning} of {total} samples"
    );
    let svg = String::from_utf8(render_svg(&folded, FlameKind::Oncpu, "spinner").unwrap()).unwrap();
    assert!(svg.contains("spin_here"));
    // A thread spinning in user code has no kernel stack in its samples; that is not a lost
    // stack, and the count users read as data loss must not say so.
    let missing = recording.meta.counters.stacks_missing;
    assert!(
        missing * 20 <= total,
        "{missing} stacks reported missing for {total} samples"
    );
}

#[test]
fn threads_started_after_attaching_are_sampled() {
    // Servers start threads while attached (thread pools growing, Go's Ms): their CPU time
    // must show up like that of the threads already there.
    let _serial = serial();
    let spinner = target(&["spinner", "--start-after", "1", "--duration", "20"]);
    let recording = record_for(settings(spinner.pid()), Duration::from_secs(3));
    let window = Window::new(recording.meta.start_ns, recording.meta.end_ns);
    let folded = fold(&recording, FlameKind::Oncpu, window, false);
    let spinning = weight_containing(&folded, "spin_here");
    // Spinning for the last ~2 s at 499 Hz: ~1000 samples.
    assert!(
        spinning >= 500,
        "only {spinning} samples in spin_here from a thread started after attaching"
    );
}
