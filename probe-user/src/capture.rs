//! A capture directory: everything that explains one spike, written from a recording of the
//! window around it. Used by `attach` (live) and `report` (post-mortem) alike.
//!
//! The directory is assembled under a temporary name and renamed into place, so a reader (or a
//! script polling for `report.json`) never sees a half-written capture.

use std::path::{Path, PathBuf};

use crate::error::ProbeError;
use crate::flamegraph::{self, FlameKind, Folded};
use crate::histogram::{render_svg as histogram_svg, render_text};
use crate::latency::LatencyKind;
use crate::output::write_atomic;
use crate::pprof;
use crate::recording::Recording;
use crate::report::Report;
use crate::timeline;
use crate::trigger::Fire;
use crate::window::Window;

pub struct CaptureRequest<'a> {
    pub recording: &'a Recording,
    pub spike: Window,
    pub baseline: Vec<Window>,
    pub fire: Option<Fire>,
    pub latency_kind: LatencyKind,
}

fn unwritable(path: &Path, err: impl ToString) -> ProbeError {
    ProbeError::Unwritable {
        path: path.display().to_string(),
        reason: err.to_string(),
    }
}

/// `20261122T193012Z` for a Unix time in milliseconds.
pub fn utc_stamp(unix_ms: u64) -> String {
    let rfc = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms),
    )
    .to_string();
    rfc.replace(['-', ':'], "")
}

/// Baseline weights scaled to the spike window's length, so the diff compares rates.
fn scaled(folded: &Folded, factor: f64) -> Folded {
    folded
        .iter()
        .map(|(stack, weight)| (stack.clone(), (*weight as f64 * factor).round() as u64))
        .filter(|(_, weight)| *weight > 0)
        .collect()
}

fn differential_svg(baseline: &Folded, spike: &Folded, title: &str) -> anyhow::Result<Vec<u8>> {
    let before = flamegraph::folded_text(baseline);
    let after = flamegraph::folded_text(spike);
    let mut diff = Vec::new();
    inferno::differential::from_readers(
        inferno::differential::Options::default(),
        before.as_bytes(),
        after.as_bytes(),
        &mut diff,
    )?;
    let diff = String::from_utf8(diff)?;
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.into();
    options.subtitle = Some(
        "spike vs baseline (baseline scaled to the spike's length): red grew, blue shrank".into(),
    );
    options.count_name = "us".into();
    let mut svg = Vec::new();
    if diff.trim().is_empty() {
        inferno::flamegraph::from_lines(&mut options, std::iter::once("[no data] 1 1"), &mut svg)?;
    } else {
        inferno::flamegraph::from_lines(&mut options, diff.lines(), &mut svg)?;
    }
    Ok(svg)
}

/// Writes the capture directory under `parent`; returns its path and the report in it.
pub fn write_capture(
    parent: &Path,
    request: &CaptureRequest<'_>,
) -> Result<(PathBuf, Report), ProbeError> {
    let recording = request.recording;
    let stamp_ms = recording.meta.start_unix_ms
        + request
            .fire
            .map(|f| f.at_ns)
            .unwrap_or(request.spike.start_ns)
            .saturating_sub(recording.meta.start_ns)
            / 1_000_000;
    let name = format!("{}-pid{}", utc_stamp(stamp_ms), recording.meta.pid);
    std::fs::create_dir_all(parent).map_err(|e| unwritable(parent, e))?;
    let mut final_dir = parent.join(&name);
    let mut suffix = 1;
    while final_dir.exists() {
        suffix += 1;
        final_dir = parent.join(format!("{name}-{suffix}"));
    }
    let temp_dir = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&temp_dir);
    std::fs::create_dir(&temp_dir).map_err(|e| unwritable(&temp_dir, e))?;
    let report = match fill(&temp_dir, request) {
        Ok(report) => report,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&temp_dir);
            return Err(err);
        }
    };
    std::fs::rename(&temp_dir, &final_dir).map_err(|e| unwritable(&final_dir, e))?;
    Ok((final_dir, report))
}

fn fill(dir: &Path, request: &CaptureRequest<'_>) -> Result<Report, ProbeError> {
    let recording = request.recording;
    let write = |name: &str, bytes: &[u8]| write_atomic(&dir.join(name), bytes);
    let svg_err = |name: &str, e: anyhow::Error| unwritable(&dir.join(name), e);
    let (report, spike, baseline) = Report::build(
        recording,
        request.spike,
        &request.baseline,
        request.fire.as_ref(),
        request.latency_kind,
    );
    let who = format!("{} (pid {})", recording.meta.comm, recording.meta.pid);

    // `<name>.folded` and `<name>.svg` of the spike's stacks.
    let flame_graph = |name: &str, stacks, kind, title: &str| -> Result<(), ProbeError> {
        write(
            &format!("{name}.folded"),
            flamegraph::folded_text(stacks).as_bytes(),
        )?;
        let svg_name = format!("{name}.svg");
        let svg = flamegraph::render_svg(stacks, kind, &format!("{title} in the spike: {who}"))
            .map_err(|e| svg_err(&svg_name, e))?;
        write(&svg_name, &svg)
    };
    flame_graph("oncpu", &spike.on_cpu, FlameKind::Oncpu, "On-CPU")?;
    flame_graph("offcpu", &spike.off_cpu, FlameKind::Offcpu, "Off-CPU")?;
    write(
        "offcpu-baseline.folded",
        flamegraph::folded_text(&baseline.off_cpu).as_bytes(),
    )?;
    let factor = if baseline.seconds > 0.0 {
        spike.seconds / baseline.seconds
    } else {
        0.0
    };
    let svg = differential_svg(
        &scaled(&baseline.off_cpu, factor),
        &spike.off_cpu,
        &format!("Off-CPU, spike vs baseline: {who}"),
    )
    .map_err(|e| svg_err("offcpu-diff.svg", e))?;
    write("offcpu-diff.svg", &svg)?;

    let series = [
        ("baseline", &baseline.run_queue_histogram),
        ("spike", &spike.run_queue_histogram),
    ];
    write("sched-delay.txt", render_text(&series).as_bytes())?;
    write(
        "sched-delay.svg",
        histogram_svg(&format!("Run-queue delay: {who}"), &series).as_bytes(),
    )?;

    write(
        "timeline.svg",
        timeline::render(
            recording,
            request.spike,
            &request.baseline,
            request.fire.as_ref(),
            request.latency_kind,
        )
        .as_bytes(),
    )?;
    write(
        "profile.pb.gz",
        &pprof::encode_gzip(recording, &[request.spike]),
    )?;
    recording.save(&dir.join("recording.p99"))?;

    let json = serde_json::to_vec_pretty(&report).expect("report serializes");
    write("report.md", report.to_markdown().as_bytes())?;
    // Last: its presence means the capture is complete.
    write("report.json", &json)?;
    Ok(report)
}
