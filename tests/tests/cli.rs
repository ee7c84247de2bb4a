//! The `p99probe` binary on bad input: one clear line, non-zero exit, and no lost data.

use std::process::{Command, Output};
use std::time::Duration;

use integration_tests::*;
use p99probe::recording::Recording;

fn p99probe(args: &[&str]) -> Output {
    Command::new(binary("p99probe"))
        .args(args)
        .output()
        .unwrap()
}

/// `p99probe record --pid PID --duration DURATION --out OUT`.
fn p99probe_record(pid: impl ToString, duration: &str, out: &str) -> Output {
    p99probe_record_with(pid, duration, out, &[])
}

/// [`p99probe_record`] with `extra` flags.
fn p99probe_record_with(pid: impl ToString, duration: &str, out: &str, extra: &[&str]) -> Output {
    let pid = pid.to_string();
    let args = [
        "record",
        "--pid",
        &pid,
        "--duration",
        duration,
        "--out",
        out,
    ];
    p99probe(&[&args[..], extra].concat())
}

fn assert_one_line_error(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "exit 0 for an error; stderr: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(stderr.contains(expected), "{stderr:?} lacks {expected:?}");
}

#[test]
fn unknown_pid_is_one_line_and_nonzero() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.p99");
    let output = p99probe_record("999999999", "1s", out.to_str().unwrap());
    assert_one_line_error(&output, "no process with PID 999999999");
    assert!(!out.exists());
}

#[test]
fn unwritable_output_fails_before_attaching() {
    let _serial = serial();
    let sleeper = target(&["sleeper", "--duration", "20"]);
    let output = p99probe_record(sleeper.pid(), "1s", "/proc/no-such-dir/x.p99");
    assert_one_line_error(&output, "cannot write output /proc/no-such-dir/x.p99");
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "p99probe-test",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs failed");
        SmallDisk { dir }
    }

    fn assert_left_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn full_disk_ends_a_recording_with_one_line_and_detaches() {
    let _serial = serial();
    // Context switches as fast as two threads can: well over a megabyte of events a second.
    let storm = target(&["pingpong", "--duration", "30"]);
    let disk = SmallDisk::mount("1m");
    let out = disk.dir.path().join("full.p99");
    let started = std::time::Instant::now();
    let output = p99probe_record(storm.pid(), "20s", out.to_str().unwrap());
    // Past the announcement that tracing has started, one line says what went wrong.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit 0; stderr: {stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("p99probe: tracing pid"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("No space left on device"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the recording went on for {:?} after the disk filled",
        started.elapsed()
    );
    // Neither a half-written recording nor its temporary file is left to fill the disk.
    disk.assert_left_empty();
    assert_programs_unloaded("after the error");
}

#[test]
fn full_disk_ends_attach_at_its_first_capture_with_one_line_and_detaches() {
    let _serial = serial();
    // Every 10th request stalls 30 ms from 3 s on: P99 crosses 10 ms as soon as `attach` arms.
    let server = target(&[
        "server",
        "--stall-every",
        "10",
        "--stall-ms",
        "30",
        "--inject-after",
        "3",
        "--inject-for",
        "60",
        "--duration",
        "60",
    ]);
    let _client = client_load(server.port.unwrap(), 4, 60);
    // Room for the start-up write check, not for a capture's flame graphs and recording.
    let disk = SmallDisk::mount("128k");
    let started = std::time::Instant::now();
    let output = p99probe(&[
        "attach",
        "--pid",
        &server.pid().to_string(),
        "--p99",
        "10ms",
        "--baseline",
        "1s",
        "--pre",
        "1s",
        "--post",
        "1s",
        "--duration",
        "40s",
        "--out",
        disk.dir.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit 0; stderr: {stderr}");
    assert!(
        stderr.contains("crossed 10.00ms"),
        "the trigger never fired: {stderr}"
    );
    // Past the announcements of tracing and of the trigger, one line says what went wrong.
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("p99probe: tracing pid") && !l.contains(" crossed "))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("No space left on device"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "attach went on for {:?} after its capture failed",
        started.elapsed()
    );
    // No half-written capture directory: captures are assembled under a hidden name.
    disk.assert_left_empty();
    assert_programs_unloaded("after the error");
}

#[test]
fn unprivileged_user_is_told_to_use_root() {
    let _serial = serial();
    let sleeper = target(&["sleeper", "--duration", "20"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = dir.path().join("x.p99");
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(binary("p99probe"))
        .args([
            "record",
            "--pid",
            &sleeper.pid().to_string(),
            "--duration",
            "1s",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_one_line_error(&output, "needs root");
}

#[test]
fn corrupt_recording_is_one_line_and_nonzero() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.p99");
    std::fs::write(&path, b"P99PROBE\x01\x00\x00\x00garbage").unwrap();
    assert_one_line_error(
        &p99probe(&["info", path.to_str().unwrap()]),
        "corrupt recording",
    );
    assert_one_line_error(
        &p99probe(&["info", dir.path().join("missing.p99").to_str().unwrap()]),
        "cannot read recording",
    );
}

#[test]
fn target_exiting_mid_capture_keeps_what_was_captured() {
    let _serial = serial();
    let sleeper = target(&["sleeper", "--stall-ms", "20", "--duration", "1.5"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exit.p99");
    let output = p99probe_record(sleeper.pid(), "10s", out.to_str().unwrap());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("exited during the recording"));
    let recording = Recording::load(&out).unwrap();
    assert!(recording.meta.target_exited);
    assert!(recording.duration_ns() < Duration::from_secs(5).as_nanos() as u64);
    // Symbolized after the exit from the saved maps: the function is still named.
    let named = recording.events().any(|e| match e {
        p99probe::events::Event::OffCpu { user_stack, .. } => recording
            .stack_names(user_stack)
            .iter()
            .any(|f| f == "stall_here"),
        _ => false,
    });
    assert!(named, "no off-CPU stack in stall_here survived the exit");
}

#[test]
fn analysis_commands_write_their_files() {
    let _serial = serial();
    let sleeper = target(&["sleeper", "--duration", "20"]);
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("r.p99");
    let rec_s = rec.to_str().unwrap();
    // Its own cost timed throughout: at the default period a 1 s recording may have no span.
    let output = p99probe_record_with(sleeper.pid(), "1s", rec_s, &["--own-cost-every", "1s"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "p99probe: tracing pid {}; scheduler hook: ",
            sleeper.pid()
        )),
        "hooks not announced: {stderr}"
    );
    assert!(
        stderr.contains("; agent: SCHED_BATCH, 0.1 ms slices"),
        "the agent's own scheduling not announced: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("p99probe's own kernel time: ")
            && stdout.contains(" span(s), ")
            && stdout.contains(" s in all;"),
        "the agent's own kernel time not reported: {stdout}"
    );
    let info = p99probe(&["info", rec_s]);
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("p99probe's own kernel time: "),
        "info lacks the recording's own cost: {}",
        String::from_utf8_lossy(&info.stdout)
    );

    let svg = dir.path().join("off.svg");
    let folded = dir.path().join("off.folded");
    let output = p99probe(&[
        "flamegraph",
        rec_s,
        "--kind",
        "offcpu",
        "-o",
        svg.to_str().unwrap(),
        "--folded",
        folded.to_str().unwrap(),
        "--from",
        "0.2",
        "--to",
        "0.8",
    ]);
    assert!(output.status.success());
    assert!(std::fs::read_to_string(&svg)
        .unwrap()
        .contains("stall_here"));
    let text = std::fs::read_to_string(&folded).unwrap();
    // 0.6 s of a thread that is asleep nearly all the time.
    let blocked_us: u64 = text
        .lines()
        .filter(|l| l.contains("stall_here"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(
        (450_000..=600_000).contains(&blocked_us),
        "{blocked_us} us in 0.6 s"
    );

    let delay_svg = dir.path().join("delay.svg");
    let delay_txt = dir.path().join("delay.txt");
    let output = p99probe(&[
        "sched-delay",
        rec_s,
        "-o",
        delay_svg.to_str().unwrap(),
        "--text",
        delay_txt.to_str().unwrap(),
    ]);
    assert!(output.status.success());
    assert!(std::fs::read_to_string(&delay_svg)
        .unwrap()
        .contains("<polyline"));
    assert!(std::fs::read_to_string(&delay_txt)
        .unwrap()
        .contains("p99.9"));
}

/// Names (as the kernel truncates them, 15 chars) of loaded BPF programs.
fn loaded_program_names() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .expect("bpftool is installed by cargo xtask setup");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(" name ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Fails unless p99probe's scheduler programs are gone from the kernel within a second. Its
/// links and programs are closed as the process exits, but the kernel frees a program from a
/// work queue, which a busy CPU can hold up for a moment.
fn assert_programs_unloaded(when: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let loaded = loaded_program_names();
        if !loaded.iter().any(|n| n.starts_with("sched_switch")) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "programs still loaded a second {when}: {loaded:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ctrl_c_flushes_detaches_and_exits_zero() {
    let _serial = serial();
    let sleeper = target(&["sleeper", "--duration", "20"]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("int.p99");
    let child = Command::new(binary("p99probe"))
        .args([
            "record",
            "--pid",
            &sleeper.pid().to_string(),
            "--out",
            out.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the programs are attached, then interrupt.
    let attached = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        loaded_program_names()
            .iter()
            .any(|n| n.starts_with("sched_switch"))
    });
    assert!(attached, "p99probe never attached");
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let recording = Recording::load(&out).unwrap();
    assert!(recording.events().count() > 10);
    assert_programs_unloaded("after exit");
}
