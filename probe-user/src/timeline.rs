//! `timeline.svg`: request P99, run-queue delay, off-CPU time and retransmits over a capture,
//! one row each in 100 ms buckets, with the baseline and spike windows shaded and the trigger
//! marked. Hand-written SVG for the same reason as the histogram picture.

use std::fmt::Write as _;

use crate::events::Event;
use crate::histogram::{human_ns, new_histogram};
use crate::latency::{request_latency, LatencyKind};
use crate::recording::Recording;
use crate::trigger::Fire;
use crate::verdict::is_idle_wait;
use crate::window::Window;

const BUCKET_NS: u64 = 100_000_000;

struct Row {
    title: String,
    values: Vec<f64>,
    format: fn(f64) -> String,
    color: &'static str,
}

fn ns_label(v: f64) -> String {
    human_ns(v as u64)
}

fn count_label(v: f64) -> String {
    format!("{v:.0}")
}

pub fn render(
    recording: &Recording,
    spike: Window,
    baseline: &[Window],
    fire: Option<&Fire>,
    latency_kind: LatencyKind,
) -> String {
    let (start, end) = (
        recording.meta.start_ns,
        recording.meta.end_ns.max(recording.meta.start_ns + 1),
    );
    let buckets = (end - start).div_ceil(BUCKET_NS) as usize;
    let bucket = |ts: u64| ((ts.saturating_sub(start)) / BUCKET_NS) as usize;
    let bucket_window = |i: usize| {
        Window::new(
            start + i as u64 * BUCKET_NS,
            start + (i as u64 + 1) * BUCKET_NS,
        )
    };
    let mut latency: Vec<hdrhistogram::Histogram<u64>> =
        (0..buckets).map(|_| new_histogram()).collect();
    let mut run_queue = vec![0f64; buckets];
    let mut off_cpu = vec![0f64; buckets];
    let mut retransmits = vec![0f64; buckets];
    for event in recording.events() {
        if let Some((ts, value)) = request_latency(&event, latency_kind) {
            if let Some(h) = latency.get_mut(bucket(ts)) {
                h.saturating_record(value.max(1));
            }
            continue;
        }
        match event {
            Event::RunQueue {
                ts_ns, delay_ns, ..
            } => {
                if let Some(v) = run_queue.get_mut(bucket(ts_ns)) {
                    *v += delay_ns as f64;
                }
            }
            event @ Event::OffCpu {
                kernel_stack,
                user_stack,
                ..
            } => {
                let Some((end, blocked)) = event.blocked_interval(false) else {
                    continue;
                };
                let mut frames = recording.stack_names(user_stack);
                frames.extend(recording.stack_names(kernel_stack));
                if is_idle_wait(&frames.join(";")) {
                    continue;
                }
                let last = bucket(end).min(buckets.saturating_sub(1));
                for (i, slot) in off_cpu
                    .iter_mut()
                    .enumerate()
                    .take(last + 1)
                    .skip(bucket(end - blocked))
                {
                    *slot += event.weigh_off_cpu(bucket_window(i).overlap(end, blocked)) as f64;
                }
            }
            Event::TcpRetransmit { ts_ns, .. } => {
                if let Some(v) = retransmits.get_mut(bucket(ts_ns)) {
                    *v += 1.0;
                }
            }
            _ => {}
        }
    }
    let mut rows = vec![
        Row {
            title: format!("request P99 ({latency_kind:?})"),
            values: latency
                .iter()
                .map(|h| {
                    if h.is_empty() {
                        0.0
                    } else {
                        h.value_at_quantile(0.99) as f64
                    }
                })
                .collect(),
            format: ns_label,
            color: "#d62728",
        },
        Row {
            title: "run-queue delay (sum)".into(),
            values: run_queue,
            format: ns_label,
            color: "#ff7f0e",
        },
        Row {
            title: "off-CPU blocked, not idle (sum)".into(),
            values: off_cpu,
            format: ns_label,
            color: "#1f77b4",
        },
        Row {
            title: "TCP retransmits".into(),
            values: retransmits,
            format: count_label,
            color: "#9467bd",
        },
    ];
    let gc = recording
        .meta
        .hooks
        .go
        .as_ref()
        .map(|_| crate::goruntime::gc_activity(recording));
    if let Some(gc) = &gc {
        let mut stw = vec![0f64; buckets];
        for (i, slot) in stw.iter_mut().enumerate() {
            let w = bucket_window(i);
            *slot = gc
                .pauses
                .iter()
                .map(|(s, e)| w.overlap(*e, e - s) as f64)
                .sum();
        }
        rows.push(Row {
            title: "Go stop-the-world (GC cycles shaded)".into(),
            values: stw,
            format: ns_label,
            color: "#2ca02c",
        });
    }

    let (width, left, right, row_h, gap, top) = (1000.0, 190.0, 20.0, 90.0, 25.0, 40.0);
    let plot_w = width - left - right;
    let height = top + rows.len() as f64 * (row_h + gap) + 30.0;
    let x_of = |ts: u64| left + plot_w * ts.saturating_sub(start) as f64 / (end - start) as f64;
    let mut svg = crate::svg::start(
        width,
        height,
        &format!(
            "{} (pid {}): baseline (grey), spike (red), trigger (line)",
            recording.meta.comm, recording.meta.pid
        ),
    );
    let plot_bottom = height - 30.0;
    // A full-height background band over window `w`.
    let mut band = |w: &Window, fill: &str| {
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{top}" width="{:.1}" height="{:.1}" fill="{fill}"/>"##,
            x_of(w.start_ns),
            x_of(w.end_ns) - x_of(w.start_ns),
            plot_bottom - top
        );
    };
    for w in baseline {
        band(w, "#eeeeee");
    }
    band(&spike, "#fde0e0");
    let bar_w = plot_w / buckets.max(1) as f64;
    for (r, row) in rows.iter().enumerate() {
        let y0 = top + r as f64 * (row_h + gap) + gap;
        let max = row.values.iter().cloned().fold(0.0, f64::max);
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><text x="{}" y="{}" text-anchor="end" fill="#666">max {}</text>"##,
            left - 8.0,
            y0 + 20.0,
            row.title,
            left - 8.0,
            y0 + 36.0,
            (row.format)(max)
        );
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#999"/>"##,
            y0 + row_h,
            left + plot_w,
            y0 + row_h
        );
        if let (Some(gc), true) = (&gc, r == rows.len() - 1) {
            for (s, e) in &gc.cycles {
                let _ = writeln!(
                    svg,
                    r##"<rect x="{:.1}" y="{y0:.1}" width="{:.1}" height="{row_h}" fill="#d8f0d8"><title>GC cycle {}</title></rect>"##,
                    x_of(*s),
                    (x_of(*e) - x_of(*s)).max(1.0),
                    human_ns(e - s)
                );
            }
        }
        for (i, value) in row.values.iter().enumerate() {
            if *value <= 0.0 || max <= 0.0 {
                continue;
            }
            let h = row_h * value / max;
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
                left + i as f64 * bar_w,
                y0 + row_h - h,
                (bar_w - 0.5).max(0.5),
                h,
                row.color,
                (row.format)(*value)
            );
        }
    }
    let seconds = (end - start) as f64 / 1e9;
    for s in 0..=seconds.floor() as u64 {
        let x = x_of(start + s * 1_000_000_000);
        let _ = writeln!(
            svg,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{s}s</text>"#,
            plot_bottom + 18.0
        );
    }
    if let Some(f) = fire {
        let x = x_of(f.at_ns);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{plot_bottom}" stroke="#000" stroke-width="2" stroke-dasharray="6,3"/><text x="{:.1}" y="{}" >trigger: P99 {} &gt; {}</text>"##,
            x + 4.0,
            top + 12.0,
            human_ns(f.observed_p99_ns),
            human_ns(f.threshold_ns)
        );
    }
    svg.push_str("</svg>\n");
    svg
}
