//! `p99probe attach` end to end: a real Go server under wrk, ONE injected cause per test, and
//! the capture's report.json must name that cause first. A quiet run must capture nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::*;
use p99probe::attach::ProbeSettings;
use p99probe::latency::LatencyKind;
use p99probe::monitor::{attach_and_watch, AttachOptions, AttachSummary};
use p99probe::recording::Recording;
use p99probe::trigger::Threshold;
use serde_json::Value;

const MS: u64 = 1_000_000;

fn options(pid: u32, out: &Path, p99_ms: u64, latency: LatencyKind, seconds: u64) -> AttachOptions {
    AttachOptions {
        // As the CLI does: attach_and_watch itself turns delivery tracking on when asked for.
        probe: ProbeSettings {
            track_delivery: false,
            // As the CLI's default `--calm-sample-hz 99` does.
            calm_sample_divisor: 5,
            // Timed throughout, so that every capture's report has the agent's own cost.
            own_cost_every_ns: p99probe::own_cost::SPAN_NS,
            ..settings(pid)
        },
        latency,
        feed: None,
        threshold: Threshold::Absolute {
            p99_ns: p99_ms * MS,
        },
        window: Duration::from_secs(1),
        pre: Duration::from_secs(2),
        post: Duration::from_secs(1),
        baseline: Duration::from_secs(3),
        cooldown: Duration::from_secs(30),
        max_captures: 1,
        min_requests: 20,
        duration: Some(Duration::from_secs(seconds)),
        out_dir: out.to_path_buf(),
        progress: false,
        max_buffered_events: 4_000_000,
        // Often, so that stacks are pruned while captures are taken and must not cost them any.
        stack_prune_every: Duration::from_secs(1),
    }
}

/// Attaches with `options` until their duration ends.
fn watch(options: &AttachOptions) -> AttachSummary {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(attach_and_watch(options, std::future::pending()))
        .expect("attach failed")
}

/// Attaches with `options` and checks the hooks every latency mode must (not) have.
fn run(options: &AttachOptions) -> AttachSummary {
    let summary = watch(options);
    // The per-segment ACK hook costs on every packet; it runs only for delivery latency.
    let tcp_probe_attached = summary.hooks.tcp.iter().any(|h| h.ends_with("/tcp_probe"));
    assert_eq!(
        tcp_probe_attached,
        options.latency == LatencyKind::Delivery,
        "hooks: {:?}",
        summary.hooks.tcp
    );
    summary
}

fn capture_dirs(summary: &AttachSummary) -> Vec<PathBuf> {
    summary.captures.iter().map(|c| c.dir.clone()).collect()
}

fn report(dir: &Path) -> Value {
    for file in [
        "report.json",
        "report.md",
        "oncpu.svg",
        "offcpu.svg",
        "offcpu-diff.svg",
        "oncpu.folded",
        "offcpu.folded",
        "sched-delay.svg",
        "sched-delay.txt",
        "timeline.svg",
        "profile.pb.gz",
        "recording.p99",
    ] {
        assert!(
            dir.join(file).is_file(),
            "{file} missing from {}",
            dir.display()
        );
    }
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

fn frames_contain(stack: &Value, function: &str) -> bool {
    stack["frames"].as_array().is_some_and(|frames| {
        frames
            .iter()
            .any(|f| f.as_str().is_some_and(|f| f.contains(function)))
    })
}

fn single_capture(captures: &[PathBuf]) -> Value {
    assert_eq!(captures.len(), 1, "expected one capture, got {captures:?}");
    let report = report(&captures[0]);
    eprintln!(
        "verdict: {}",
        serde_json::to_string_pretty(&report["verdict"]).unwrap()
    );
    report
}

/// One capture of a Go server spike.
struct Spike {
    /// The capture's report.json.
    report: Value,
    /// The server's port.
    port: u16,
    summary: AttachSummary,
    /// The capture's recording.p99.
    recording: Recording,
}

/// The Go server on CPU 0 (with `env` variables and flags) under wrk on CPU 1; `during(port)`
/// runs alongside (to inject a cause from outside); p99probe attaches with `--p99 p99_ms` on
/// `latency` and must capture exactly once.
fn capture_go_spike(
    env: &[&str],
    server_args: &[&str],
    p99_ms: u64,
    latency: LatencyKind,
    during: impl FnOnce(u16) + Send + 'static,
) -> Spike {
    let binary = go_server_binary();
    let mut args = vec!["-c", "0", "env"];
    args.extend_from_slice(env);
    args.push(binary.to_str().unwrap());
    args.extend_from_slice(server_args);
    let server = spawn_ready(Path::new("taskset"), &args);
    let port = server.port.unwrap();
    let _load = wrk_on_cpu1(port, 4, 15);
    let injector = std::thread::spawn(move || during(port));
    let out = tempfile::tempdir().unwrap();
    let summary = run(&options(server.pid(), out.path(), p99_ms, latency, 13));
    injector.join().unwrap();
    let captures = capture_dirs(&summary);
    let report = single_capture(&captures);
    let recording = Recording::load(&captures[0].join("recording.p99")).unwrap();
    Spike {
        report,
        port,
        summary,
        recording,
    }
}

/// Injected by the server itself from 7 s to 10 s after it starts (past the trigger's arming).
const INJECT: [&str; 4] = ["-inject-after", "7s", "-inject-for", "3s"];

fn nothing_from_outside(_port: u16) {}

#[test]
fn blocking_sleep_on_some_requests_is_off_cpu_in_that_function() {
    let _serial = serial();
    let args = [&["-stall-every", "20", "-stall-ms", "20"][..], &INJECT].concat();
    let Spike {
        report, summary, ..
    } = capture_go_spike(&[], &args, 5, LatencyKind::Server, nothing_from_outside);
    let top = &report["verdict"][0];
    assert_eq!(top["cause"], "off_cpu");
    // The capture fired 7 s or more after attach: its report has the agent's own cost over
    // the spans until then, and the summary those of the whole run.
    let own = &report["own_cost"];
    assert!(own["spans"].as_u64().unwrap() >= 1, "{own}");
    assert!(
        own["programs"].as_array().unwrap().iter().any(|p| {
            p["program"].as_str().unwrap().starts_with("sk_data_ready")
                && p["runs"].as_u64().unwrap() > 100
        }),
        "{own}"
    );
    let whole_run = summary.own_cost.expect("own cost measured");
    assert!(whole_run.spans >= own["spans"].as_u64().unwrap() as u32);
    assert!(
        frames_contain(&top["evidence"]["top_growing_stack"], "main.stallHere"),
        "{top}"
    );
    let spike_top = report["off_cpu_top"]["spike"].as_array().unwrap();
    assert!(spike_top
        .iter()
        .take(3)
        .any(|s| frames_contain(s, "main.stallHere")));
    let trigger = &report["trigger"];
    assert!(
        trigger["observed_p99_ns"].as_u64().unwrap() > trigger["threshold_ns"].as_u64().unwrap()
    );
    assert!(
        report["request_latency"]["spike"]["server"]["p99_ns"]
            .as_u64()
            .unwrap()
            >= 15 * MS
    );
    assert!(
        report["request_latency"]["baseline"]["server"]["count"]
            .as_u64()
            .unwrap()
            > 1000
    );
}

#[test]
fn cpu_hog_on_the_servers_cpu_is_run_queue_delay() {
    let _serial = serial();
    let Spike { report, .. } = capture_go_spike(&[], &[], 4, LatencyKind::Server, |_port| {
        std::thread::sleep(Duration::from_secs(7));
        let hogs: Vec<_> = (0..3)
            .map(|_| target(&["hog", "--cpu", "0", "--duration", "3"]))
            .collect();
        std::thread::sleep(Duration::from_secs(3));
        drop(hogs);
    });
    let top = &report["verdict"][0];
    assert_eq!(top["cause"], "run_queue_delay");
    assert!(top["summary"].as_str().unwrap().contains("CPU 0"), "{top}");
    let spike = report["run_queue_delay"]["spike"]["p99_ns"]
        .as_u64()
        .unwrap();
    let baseline = report["run_queue_delay"]["baseline"]["p99_ns"]
        .as_u64()
        .unwrap();
    assert!(
        spike > 2 * baseline.max(1),
        "spike p99 {spike} vs baseline {baseline}"
    );
}

#[test]
fn busy_loop_on_some_requests_is_on_cpu_in_that_function() {
    let _serial = serial();
    // Sampling is calm only while P99 stays under half the threshold, 6 ms here: a lower
    // threshold let this host's noisy stretches (P99s of several ms with nothing injected)
    // keep sampling at full rate through the whole baseline.
    let args = [&["-spin-every", "20", "-spin-ms", "20"][..], &INJECT].concat();
    let spike = capture_go_spike(&[], &args, 12, LatencyKind::Server, nothing_from_outside);
    let top = &spike.report["verdict"][0];
    assert_eq!(top["cause"], "on_cpu");
    assert!(
        frames_contain(&top["evidence"]["top_growing_stack"], "main.spin"),
        "{top}"
    );
    assert!(top["summary"].as_str().unwrap().contains("main.spin"));
    check_calm_then_full_rate_sampling(&spike);
}

/// Sampling starts calm (a fifth of 499 Hz), goes to full rate by the time the trigger fires,
/// and every sample's period says which rate took it: the on-CPU verdict above compared a
/// calm baseline with a full-rate spike by CPU time, not by sample counts. Calm samples that
/// interrupted the kernel name the function they interrupted under the marker that says the
/// kernel stack was not walked; full-rate ones have the walked stack, from the syscall entry.
fn check_calm_then_full_rate_sampling(spike: &Spike) {
    use p99probe::events::Event;
    use p99probe::sampling::full_period_ns;
    use p99probe::symbolize::KERNEL_NOT_WALKED_NAME;
    let changes = &spike.summary.sampling_changes;
    let fire_ns = spike.summary.captures[0].fire.at_ns;
    eprintln!("sampling changes (ns, calm): {changes:?}; trigger at {fire_ns}");
    let calm_at = |ts: u64| {
        changes
            .iter()
            .take_while(|(at, _)| *at <= ts)
            .last()
            .is_none_or(|(_, calm)| *calm)
    };
    assert!(
        !calm_at(fire_ns),
        "sampling was calm when the trigger fired"
    );
    // A switch takes effect when the old events are gone: skip samples close to one.
    let near_a_switch = |ts: u64| changes.iter().any(|(at, _)| ts.abs_diff(*at) < 20 * MS);
    let full = full_period_ns(499);
    let (mut calm_samples, mut full_samples) = (0, 0);
    let (mut calm_in_kernel, mut full_in_kernel) = (0, 0);
    for event in spike.recording.events() {
        let Event::OnCpuSample {
            ts_ns,
            period_ns,
            kernel_stack,
            ..
        } = event
        else {
            continue;
        };
        if near_a_switch(ts_ns) {
            continue;
        }
        let kernel = spike.recording.stack_names(kernel_stack);
        if calm_at(ts_ns) {
            assert_eq!(period_ns, 5 * full, "calm sample at {ts_ns}");
            calm_samples += 1;
            if kernel_stack.is_some() {
                // The marker alone when the address was p99probe's own program, whose
                // frames are trimmed from kernel leaves like any tracing frame.
                assert!(kernel.len() <= 2, "calm sample at {ts_ns}: {kernel:?}");
                assert_eq!(kernel[0], KERNEL_NOT_WALKED_NAME);
                if kernel.get(1).is_some_and(|leaf| !leaf.starts_with('[')) {
                    calm_in_kernel += 1;
                }
            }
        } else {
            assert_eq!(period_ns, full, "full-rate sample at {ts_ns}");
            full_samples += 1;
            if full_rate_stack_from_a_system_call(&kernel, &format!("sample at {ts_ns}")) {
                full_in_kernel += 1;
            }
        }
    }
    eprintln!(
        "{calm_samples} calm ({calm_in_kernel} in a named kernel function) and {full_samples} full-rate \
         ({full_in_kernel} with a walked syscall stack) samples in the capture"
    );
    assert!(calm_samples > 0 && full_samples > 0);
    // A Go server under wrk spends much of its CPU time in syscalls, but while it spins most
    // of it is in user code: 0-2 of ~500 full-rate samples interrupted a system call in runs on
    // a fast host, too few to require one. Full-rate kernel stacks are checked to be walked in
    // oncpu.rs, and any full-rate sample here that has one has it walked (above).
    assert!(calm_in_kernel > 0);
}

#[test]
fn lost_responses_are_tcp_retransmits_by_delivery_latency() {
    let _serial = serial();
    let Spike { report, port, .. } =
        capture_go_spike(&[], &[], 50, LatencyKind::Delivery, |port| {
            std::thread::sleep(Duration::from_secs(7));
            let _loss = PacketLoss::on_source_ports(&[port], 5);
            std::thread::sleep(Duration::from_secs(3));
        });
    let top = &report["verdict"][0];
    assert_eq!(top["cause"], "tcp_retransmit");
    assert!(report["tcp_retransmits"]["spike_count"].as_u64().unwrap() > 0);
    assert_eq!(report["trigger"]["latency"], "delivery");
    for event in report["tcp_retransmits"]["events"].as_array().unwrap() {
        let local = event["local"].as_str().unwrap();
        assert!(
            local.ends_with(&format!(":{port}")),
            "retransmit on {local}"
        );
    }
}

#[test]
fn allocation_heavy_requests_with_low_gogc_are_gc() {
    let _serial = serial();
    let args = [
        &["-live-mb", "64", "-alloc-every", "1", "-alloc-kb", "256"][..],
        &INJECT,
    ]
    .concat();
    let Spike { report, .. } = capture_go_spike(
        &["GOGC=20"],
        &args,
        5,
        LatencyKind::Server,
        nothing_from_outside,
    );
    let top = &report["verdict"][0];
    assert_eq!(top["cause"], "gc", "{top}");
    let spike = &top["evidence"]["spike"];
    let baseline = &top["evidence"]["baseline"];
    assert!(spike["stw_pauses"].as_u64().unwrap() > 0, "{spike}");
    assert!(spike["gc_cycles"].as_u64().unwrap() > baseline["gc_cycles"].as_u64().unwrap());
    assert!(spike["gc_cpu_share"].as_f64().unwrap() > baseline["gc_cpu_share"].as_f64().unwrap());
    assert!(spike["assist_cpu_share"].as_f64().unwrap() > 0.0, "{spike}");
    assert!(report["go"]["version"]
        .as_str()
        .unwrap()
        .starts_with("go1."));
    assert!(!report["go"]["notes"].as_array().unwrap().is_empty());
    assert_eq!(report["hooks"]["go"]["probes"].as_array().unwrap().len(), 4);
    // The stall, hog, busy-loop and loss tests above run against the same Go server with `gc`
    // among the causes, and must still name their own.
}

#[test]
fn quiet_run_under_load_captures_nothing() {
    let _serial = serial();
    let server = go_server_on_cpu0(&[]);
    let _load = wrk_on_cpu1(server.port.unwrap(), 4, 11);
    let out = tempfile::tempdir().unwrap();
    let summary = run(&options(
        server.pid(),
        out.path(),
        100,
        LatencyKind::Server,
        10,
    ));
    assert!(
        summary.captures.is_empty(),
        "false positive: {:?}",
        capture_dirs(&summary)
    );
    // P99 stayed far under half the threshold: sampling never left the calm rate.
    assert!(
        summary.sampling_changes.is_empty(),
        "sampling changed rate in a quiet run: {:?}",
        summary.sampling_changes
    );
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "files written without a capture: {left:?}");
}

#[test]
fn stacks_that_stop_recurring_leave_the_kernel_map_while_their_events_are_held() {
    // stall_here's stacks appear only in the first 2 s; then the process lingers, blocked in
    // one long interval. The flight recorder still holds those events when the attach ends
    // (7 s of retention, 4 s attached), but their stacks are copied out, and the kernel's
    // fixed-size map must not keep them: the more it holds, the more new stacks collide.
    let _serial = serial();
    let sleeper = target(&[
        "sleeper",
        "--stall-ms",
        "5",
        "--duration",
        "2",
        "--linger",
        "30",
    ]);
    let out = tempfile::tempdir().unwrap();
    let summary = watch(&options(
        sleeper.pid(),
        out.path(),
        100,
        LatencyKind::Server,
        4,
    ));
    assert!(summary.captures.is_empty());
    assert!(!summary.target_exited);
    assert!(
        summary.stacks_freed >= 2,
        "stall_here's kernel and user stacks were not freed: {} freed",
        summary.stacks_freed
    );
}

#[test]
fn post_mortem_report_finds_the_spike_in_a_plain_recording() {
    let _serial = serial();
    let server = go_server_on_cpu0(&[
        "-stall-every",
        "20",
        "-stall-ms",
        "20",
        "-inject-after",
        "5s",
        "-inject-for",
        "2s",
    ]);
    let server_ready = std::time::Instant::now();
    let _load = wrk_on_cpu1(server.port.unwrap(), 4, 12);
    let dir = tempfile::tempdir().unwrap();
    let recording_path = dir.path().join("plain.p99");
    record_to(
        settings(server.pid()),
        Duration::from_secs(10),
        &recording_path,
    );
    // The recording's clock starts once attaching is done, which takes a second or more on a
    // busy host; whatever the 10 s of recording leave of the time since the server was ready
    // bounds how late it started.
    let recording_started_by = server_ready.elapsed().as_secs_f64() - 10.0;

    let out = dir.path().join("post");
    let output = std::process::Command::new(binary("p99probe"))
        .args([
            "report",
            recording_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let captures: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let report = single_capture(&captures);
    assert!(report["trigger"].is_null(), "post-mortem has no trigger");
    assert_eq!(report["verdict"][0]["cause"], "off_cpu");
    assert!(frames_contain(
        &report["verdict"][0]["evidence"]["top_growing_stack"],
        "main.stallHere"
    ));
    // The worst window lies inside the injection (5 s to 7 s after the server started), which
    // ends at most 7 s into the recording and begins at least at `5 - recording_started_by`.
    let start = report["spike_window"]["start_s"].as_f64().unwrap();
    let injection_began_by = 5.0 - recording_started_by;
    assert!(
        (injection_began_by - 0.5..7.0).contains(&start),
        "worst window starts at {start} s; the injection began between {injection_began_by:.1} s and 5 s"
    );
}

#[test]
fn external_latency_feed_triggers_and_ctrl_c_completes_the_capture() {
    use std::io::{BufRead, BufReader};
    let _serial = serial();
    let sleeper = target(&["sleeper", "--duration", "60"]);
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = tempfile::tempdir().unwrap();
    let mut attach = std::process::Command::new(binary("p99probe"))
        .args([
            "attach",
            "--pid",
            &sleeper.pid().to_string(),
            "--latency-feed",
        ])
        .arg(format!("udp:{port}"))
        .args([
            "--p99",
            "10ms",
            "--window",
            "500ms",
            "--pre",
            "1s",
            "--baseline",
            "1s",
        ])
        .args([
            "--post",
            "60s",
            "--min-requests",
            "5",
            "--out",
            out.path().to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let feeder = std::thread::spawn(move || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(8) {
            let line = if start.elapsed() < Duration::from_secs(4) {
                "1ms\n"
            } else {
                "50ms\n"
            };
            let _ = socket.send_to(line.as_bytes(), ("127.0.0.1", port));
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let stderr = BufReader::new(attach.stderr.take().unwrap());
    let (crossed_tx, crossed_rx) = std::sync::mpsc::channel();
    // Keep reading to the end: closing the pipe early would break the child's later writes.
    let reader = std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            eprintln!("attach: {line}");
            if line.contains("crossed") {
                let _ = crossed_tx.send(());
            }
        }
    });
    assert!(
        crossed_rx.recv_timeout(Duration::from_secs(30)).is_ok(),
        "the fed latencies never triggered a capture"
    );
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(attach.id() as i32, libc::SIGINT) };
    let status = attach.wait().unwrap();
    feeder.join().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "Ctrl-C must exit 0, got {status}");
    let captures: Vec<PathBuf> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let report = single_capture(&captures);
    assert_eq!(report["trigger"]["latency"], "external");
    assert!(report["trigger"]["observed_p99_ns"].as_u64().unwrap() >= 40 * MS);
    assert!(
        report["request_latency"]["spike"]["external"]["count"]
            .as_u64()
            .unwrap()
            > 10
    );
}
