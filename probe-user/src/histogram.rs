//! Scheduler (run-queue) delay distributions in HDR histograms: percentiles as text, and as a
//! percentile-spectrum picture (the classic HdrHistogram plot), several series overlaid.
//!
//! The SVG is written by hand: it is one line chart with axes, and a plotting crate would bring a
//! font and raster stack for nothing the chart needs.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::recording::Recording;
use crate::window::Window;

/// 1 ns to 100 s at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid bounds")
}

/// Run-queue delays (ns) of events ending in `window`, optionally on one CPU.
pub fn run_queue_delays(recording: &Recording, window: Window, cpu: Option<u32>) -> Histogram<u64> {
    let mut histogram = new_histogram();
    for event in recording.events() {
        if let Event::RunQueue {
            ts_ns,
            cpu: event_cpu,
            delay_ns,
            ..
        } = event
        {
            if window.contains(ts_ns) && cpu.is_none_or(|c| c == event_cpu) {
                histogram.saturating_record(delay_ns.max(1));
            }
        }
    }
    histogram
}

/// Percentiles of a latency histogram, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
    pub mean_ns: f64,
}

impl Percentiles {
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: histogram.len(),
            p50_ns: histogram.value_at_quantile(0.50),
            p90_ns: histogram.value_at_quantile(0.90),
            p99_ns: histogram.value_at_quantile(0.99),
            p999_ns: histogram.value_at_quantile(0.999),
            max_ns: histogram.max(),
            mean_ns: histogram.mean(),
        }
    }
}

/// Nanoseconds as a short human unit: `850ns`, `12.3us`, `4.56ms`, `1.20s`.
pub fn human_ns(ns: u64) -> String {
    let ns_f = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.1}us", ns_f / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2}ms", ns_f / 1e6)
    } else {
        format!("{:.2}s", ns_f / 1e9)
    }
}

pub fn render_text(series: &[(&str, &Histogram<u64>)]) -> String {
    let mut text = format!(
        "{:<12} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "window", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for (label, histogram) in series {
        let p = Percentiles::of(histogram);
        let _ = writeln!(
            text,
            "{:<12} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
            label,
            p.count,
            human_ns(p.p50_ns),
            human_ns(p.p90_ns),
            human_ns(p.p99_ns),
            human_ns(p.p999_ns),
            human_ns(p.max_ns)
        );
    }
    text
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Latency by percentile, x on a "nines" scale (0%, 90%, 99%, 99.9%, ...), one line per series.
pub fn render_svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let (width, height) = (900.0, 480.0);
    let (left, right, top, bottom) = (80.0, 220.0, 50.0, 60.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    // Nines shown: enough for the largest series (1 / (1 - p) up to its count).
    let max_nines = series
        .iter()
        .map(|(_, h)| (h.len().max(10) as f64).log10().ceil())
        .fold(1.0, f64::max)
        .min(6.0);
    let max_value = series
        .iter()
        .map(|(_, h)| h.max())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let y_top = nice_ceiling(max_value);
    let x_of = |nines: f64| left + plot_w * nines / max_nines;
    let y_of = |value: f64| top + plot_h * (1.0 - value / y_top);

    let mut svg = crate::svg::start(width, height, title);
    // Axes and grid.
    for tick in 0..=max_nines as u32 {
        let x = x_of(tick as f64);
        let label = match tick {
            0 => "0%".to_string(),
            n => format!("{}%", 100.0 - 100.0 / 10f64.powi(n as i32)),
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            top + plot_h,
            top + plot_h + 18.0
        );
    }
    for step in 0..=4 {
        let value = y_top * step as f64 / 4.0;
        let y = y_of(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 6.0,
            y + 4.0,
            human_ns(value as u64)
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        left + plot_w / 2.0,
        height - 16.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">run-queue delay</text>"#,
        top + plot_h / 2.0
    );
    // Series and legend with their key percentiles.
    for (index, (label, histogram)) in series.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let legend_y = top + 10.0 + index as f64 * 92.0;
        let legend_x = left + plot_w + 20.0;
        let p = Percentiles::of(histogram);
        let _ = writeln!(
            svg,
            r#"<rect x="{legend_x}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}" font-weight="bold">{} (n={})</text>"#,
            legend_y - 10.0,
            legend_x + 18.0,
            legend_y,
            crate::svg::escape(label),
            p.count
        );
        for (row, (name, value)) in [
            ("p50", p.p50_ns),
            ("p99", p.p99_ns),
            ("p99.9", p.p999_ns),
            ("max", p.max_ns),
        ]
        .iter()
        .enumerate()
        {
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}">{name}: {}</text>"#,
                legend_x + 18.0,
                legend_y + 16.0 * (row as f64 + 1.0),
                human_ns(*value)
            );
        }
        if histogram.is_empty() {
            continue;
        }
        let limit = (histogram.len() as f64).log10().min(max_nines);
        let mut points = Vec::new();
        let steps = 200;
        for i in 0..=steps {
            let nines = limit * i as f64 / steps as f64;
            let quantile = 1.0 - 10f64.powf(-nines);
            let value = histogram.value_at_quantile(quantile) as f64;
            points.push(format!("{:.1},{:.1}", x_of(nines), y_of(value)));
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn nice_ceiling(value: f64) -> f64 {
    let magnitude = 10f64.powf(value.log10().floor());
    for factor in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if value <= factor * magnitude {
            return factor * magnitude;
        }
    }
    10.0 * magnitude
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram_of(values: &[u64]) -> Histogram<u64> {
        let mut h = new_histogram();
        for v in values {
            h.record(*v).unwrap();
        }
        h
    }

    #[test]
    fn percentiles_are_exact_to_three_digits() {
        let values: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let p = Percentiles::of(&histogram_of(&values));
        assert_eq!(p.count, 1000);
        assert!((p.p50_ns as f64 - 500_000.0).abs() / 500_000.0 < 0.001);
        assert!((p.p99_ns as f64 - 990_000.0).abs() / 990_000.0 < 0.001);
        assert!((p.max_ns as f64 - 1_000_000.0).abs() / 1_000_000.0 < 0.001);
        assert_eq!(Percentiles::of(&new_histogram()), Percentiles::default());
    }

    #[test]
    fn human_units() {
        assert_eq!(human_ns(850), "850ns");
        assert_eq!(human_ns(12_345), "12.3us");
        assert_eq!(human_ns(4_560_000), "4.56ms");
        assert_eq!(human_ns(1_200_000_000), "1.20s");
    }

    #[test]
    fn text_and_svg_show_every_series() {
        let base = histogram_of(&[1_000, 2_000, 3_000]);
        let spike = histogram_of(&[1_000_000, 5_000_000]);
        let text = render_text(&[("baseline", &base), ("spike", &spike)]);
        assert!(
            text.contains("baseline") && text.contains("5.00ms"),
            "{text}"
        );
        let svg = render_svg("delay <cpu0>", &[("baseline", &base), ("spike", &spike)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("delay &lt;cpu0&gt;"));
        assert_eq!(nice_ceiling(4_300_000.0), 5_000_000.0);
    }
}
