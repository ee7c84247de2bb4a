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

/// At the full rate (`record` always samples at it), a sample that interrupted the kernel has
/// its kernel stack walked, from the system call's entry; only calm-rate samples keep just the
/// interrupted address. `attach`'s switch between the rates is checked in attach.rs, where a
/// spinning server leaves too few full-rate samples in the kernel to rest this on.
#[test]
fn full_rate_samples_in_a_system_call_have_their_kernel_stack_walked() {
    use p99probe::events::Event;
    let _serial = serial();
    // Two threads handing a byte back and forth through pipes: on a CPU, mostly in read and
    // write.
    let pingpong = target(&["pingpong", "--duration", "20"]);
    let recording = record_for(settings(pingpong.pid()), Duration::from_secs(2));
    let (mut samples, mut in_kernel, mut from_a_system_call) = (0, 0, 0);
    for event in recording.events() {
        let Event::OnCpuSample { kernel_stack, .. } = event else {
            continue;
        };
        samples += 1;
        if kernel_stack.is_none() {
            continue;
        }
        in_kernel += 1;
        let names = recording.stack_names(kernel_stack);
        if full_rate_stack_from_a_system_call(&names, "pingpong") {
            from_a_system_call += 1;
        }
    }
    eprintln!(
        "{samples} samples, {in_kernel} in the kernel, {from_a_system_call} from a system call"
    );
    assert!(
        in_kernel * 2 > samples,
        "{in_kernel} of {samples} in the kernel"
    );
    assert!(
        from_a_system_call * 2 > in_kernel,
        "{from_a_system_call} of {in_kernel} kernel stacks reach the system call's entry"
    );
}

#[test]
fn code_a_jit_generated_is_named_from_the_perf_map_it_wrote() {
    // Java, Node and .NET run generated code with no file behind it; they name it for
    // profilers in /tmp/perf-PID.map. The target spins in code it generated, in a frame of its
    // own, called from run_generated_code.
    let _serial = serial();
    let jit = target(&["jit", "--duration", "20"]);
    let perf_map = format!("/tmp/perf-{}.map", jit.pid());
    assert!(
        std::path::Path::new(&perf_map).exists(),
        "the target wrote no {perf_map}"
    );
    let recording = record_for(settings(jit.pid()), Duration::from_secs(2));
    let window = Window::new(recording.meta.start_ns, recording.meta.end_ns);
    let folded = fold(&recording, FlameKind::Oncpu, window, false);
    let total: u64 = folded.values().sum();
    // The leaf named from the map, and unwinding carried on through its frame to its caller.
    let named: u64 = folded
        .iter()
        .filter(|(stack, _)| stack.ends_with(";run_generated_code;jitted::spin_in_generated_code"))
        .map(|(_, weight)| weight)
        .sum();
    assert!(total >= 500, "only {total} on-CPU samples");
    assert!(
        named * 10 >= total * 8,
        "the generated code, under its caller, is in {named} of {total} samples: {:?}",
        folded.iter().max_by_key(|(_, weight)| **weight)
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
    // And the agent, which reads only new threads' names, named it.
    assert!(
        recording
            .meta
            .threads
            .values()
            .any(|name| name == "spin-loop"),
        "threads named: {:?}",
        recording.meta.threads
    );
}

#[test]
fn only_cpus_the_target_may_run_on_are_sampled_and_a_widened_affinity_is_followed() {
    // Sampling a CPU the target cannot run on finds nothing of it, and its timer interrupts
    // cost whoever runs there; a target that moves must still be sampled where it goes.
    let _serial = serial();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let online = p99probe::target::parse_cpu_list(&online).unwrap();
    assert!(
        online.contains(&0) && online.contains(&1),
        "this test needs CPUs 0 and 1 online: {online:?}"
    );
    let spinner = target(&["spinner", "--duration", "30"]);
    let pid = spinner.pid();
    pin_all_threads(pid, "0");
    let probes = p99probe::attach::attach(&settings(pid)).unwrap();
    let sampling = probes.report.sampling.clone();
    drop(probes);
    assert!(
        sampling.contains("on CPU 0 (the target's affinity, 1 of "),
        "{sampling}"
    );
    let mover = std::thread::spawn(move || {
        // Well after attaching; the agent re-reads the affinity every 2 s.
        std::thread::sleep(Duration::from_secs(4));
        pin_all_threads(pid, "1");
    });
    let recording = record_for(settings(pid), Duration::from_secs(8));
    mover.join().unwrap();
    // The report a capture carries says what was sampled by then.
    let sampling = &recording.meta.hooks.sampling;
    let both = if online.len() == 2 {
        "on 2 CPUs".to_string()
    } else {
        "on CPU 0,1 (the target's affinity, 2 of ".to_string()
    };
    assert!(sampling.contains(&both), "{sampling}");
    let mut spinning_on = [0u64; 2];
    for event in recording.events() {
        if let p99probe::events::Event::OnCpuSample { cpu, tid, .. } = event {
            if tid != pid && (cpu as usize) < spinning_on.len() {
                spinning_on[cpu as usize] += 1;
            }
        }
    }
    // 499 Hz: seconds on CPU 0 before the move, then ≥ 2 s on CPU 1 once it is sampled.
    assert!(
        spinning_on[0] >= 200 && spinning_on[1] >= 500,
        "spinning thread's samples on CPUs 0 and 1: {spinning_on:?}"
    );
}

fn pin_all_threads(pid: u32, cpus: &str) {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "taskset -a -p -c {cpus} {pid}: {status}");
}

#[test]
fn a_thread_renamed_long_after_it_was_first_seen_is_captured_under_its_new_name() {
    // The agent reads a thread's name when it first sees it and once more a second later; a
    // thread a runtime renames after that must still carry its current name in a capture.
    let _serial = serial();
    let sleeper = target(&["sleeper", "--rename-after", "4", "--duration", "20"]);
    let recording = record_for(settings(sleeper.pid()), Duration::from_secs(6));
    let names: Vec<&String> = recording.meta.threads.values().collect();
    assert!(
        names.iter().any(|name| *name == "stall-renamed"),
        "threads named: {names:?}"
    );
    assert!(
        !names.iter().any(|name| *name == "stall-loop"),
        "a thread kept the name it had before: {names:?}"
    );
}
