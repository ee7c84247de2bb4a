//! Folded stacks and flame graphs (inferno) from a recording: on-CPU weighted by samples (at
//! the full sampling rate: a sample taken at the calm rate counts as the samples it stands
//! for), off-CPU weighted by microseconds blocked.

use std::collections::BTreeMap;

use inferno::flamegraph::{self, color::BasicPalette, Palette};
use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::recording::Recording;
use crate::sampling::sample_weight;
use crate::window::Window;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlameKind {
    Oncpu,
    Offcpu,
}

/// Kernel frames carry perf's `_[k]` suffix so they stand apart from user frames.
const KERNEL_SUFFIX: &str = "_[k]";

/// Folded stacks: `frame;frame;...` (root first) → weight.
pub type Folded = BTreeMap<String, u64>;

/// Per folded stack, the variance (µs²) of its off-CPU weight where that weight is estimated
/// from sampled intervals (`Event::off_cpu_estimate_variance`); stacks weighed exactly are
/// absent.
pub type StackVariance = BTreeMap<String, f64>;

fn sanitize(frame: &str) -> String {
    // `;` separates frames and a trailing ` N` is the count: keep both out of names.
    frame.replace(';', ":").replace('\n', " ")
}

fn stack_line(recording: &Recording, kernel: Option<u32>, user: Option<u32>) -> String {
    let mut frames = vec![sanitize(&recording.meta.comm)];
    let user_frames = recording.stack_names(user);
    let kernel_frames = recording.stack_names(kernel);
    if user_frames.is_empty() && kernel_frames.is_empty() {
        frames.push("[no stack]".into());
    }
    frames.extend(user_frames.iter().map(|f| sanitize(f)));
    frames.extend(
        kernel_frames
            .iter()
            .map(|f| format!("{}{KERNEL_SUFFIX}", sanitize(f))),
    );
    frames.join(";")
}

/// Folded stacks of `kind` inside `window`. Off-CPU stacks are weighted by the time the thread
/// was blocked (switch-out to wakeup; the run-queue wait after the wakeup is scheduler delay and
/// shown there), clipped to the window; intervals where the thread was preempted are left out
/// unless `include_preempted`, and then count whole.
pub fn fold(
    recording: &Recording,
    kind: FlameKind,
    window: Window,
    include_preempted: bool,
) -> Folded {
    fold_with_variance(recording, kind, window, include_preempted).0
}

/// `fold`, with the variance of each off-CPU stack's weight estimated from sampled intervals.
pub fn fold_with_variance(
    recording: &Recording,
    kind: FlameKind,
    window: Window,
    include_preempted: bool,
) -> (Folded, StackVariance) {
    let mut folded = Folded::new();
    let mut variance = StackVariance::new();
    for event in recording.events() {
        match (kind, event) {
            (
                FlameKind::Oncpu,
                Event::OnCpuSample {
                    ts_ns,
                    period_ns,
                    kernel_stack,
                    user_stack,
                    ..
                },
            ) if window.contains(ts_ns) => {
                *folded
                    .entry(stack_line(recording, kernel_stack, user_stack))
                    .or_default() += sample_weight(period_ns, recording.meta.settings.sample_hz);
            }
            (
                FlameKind::Offcpu,
                event @ Event::OffCpu {
                    kernel_stack,
                    user_stack,
                    ..
                },
            ) => {
                let Some((end, blocked)) = event.blocked_interval(include_preempted) else {
                    continue;
                };
                let overlap = window.overlap(end, blocked);
                let micros = event.weigh_off_cpu(overlap) / 1000;
                if micros > 0 {
                    let stack = stack_line(recording, kernel_stack, user_stack);
                    let micros_squared = event.off_cpu_estimate_variance(overlap) / 1e6;
                    if micros_squared > 0.0 {
                        *variance.entry(stack.clone()).or_default() += micros_squared;
                    }
                    *folded.entry(stack).or_default() += micros;
                }
            }
            _ => {}
        }
    }
    (folded, variance)
}

pub fn folded_text(folded: &Folded) -> String {
    let mut text = String::new();
    for (stack, weight) in folded {
        text.push_str(stack);
        text.push(' ');
        text.push_str(&weight.to_string());
        text.push('\n');
    }
    text
}

/// Total weight of the stacks that contain `frame` (a frame name, exact match).
pub fn weight_containing(folded: &Folded, frame: &str) -> u64 {
    folded
        .iter()
        .filter(|(stack, _)| stack.split(';').any(|f| f == frame))
        .map(|(_, w)| w)
        .sum()
}

/// The `n` heaviest stacks as `(weight, frames root-first)`, heaviest first.
pub fn top_stacks(folded: &Folded, n: usize) -> Vec<(u64, Vec<String>)> {
    let mut stacks: Vec<(u64, Vec<String>)> = folded
        .iter()
        .map(|(stack, weight)| (*weight, stack.split(';').map(str::to_string).collect()))
        .collect();
    stacks.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    stacks.truncate(n);
    stacks
}

/// Frames of runtimes and standard libraries: a digest anchors on the code below them.
fn is_library_frame(frame: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "runtime.",
        "runtime/",
        "syscall.",
        "internal/",
        "std::",
        "core::",
        "alloc::",
        "tokio::",
        "__libc",
        "__GI_",
        "libc",
        "[unknown",
        "[no stack]",
        "start_thread",
        "clone",
    ];
    PREFIXES.iter().any(|p| frame.starts_with(p)) || frame == "syscall"
}

/// A one-line digest of a stack for people: the innermost user frames around the deepest
/// application (non-library) frame, and the kernel function it ended in
/// (`handle → stall_here → syscall.Nanosleep … [do_nanosleep]`).
pub fn describe_stack(frames: &[String], depth: usize) -> String {
    let user: Vec<&str> = frames
        .iter()
        .skip(1) // process name
        .filter(|f| !f.ends_with(KERNEL_SUFFIX))
        .map(String::as_str)
        .collect();
    let kernel_leaf = frames
        .iter()
        .rev()
        .find(|f| f.ends_with(KERNEL_SUFFIX) && !f.contains("schedule"))
        .map(|f| f.trim_end_matches(KERNEL_SUFFIX));
    let anchor = user
        .iter()
        .rposition(|f| !is_library_frame(f))
        .unwrap_or(user.len().saturating_sub(1));
    // The anchor, what called it, and one frame it called (if any).
    let end = (anchor + 2).min(user.len());
    let start = end.saturating_sub(depth);
    let mut text = user[start..end].join(" → ");
    if end < user.len() {
        text.push_str(" …");
    }
    if let Some(kernel) = kernel_leaf {
        text.push_str(&format!(" [{kernel}]"));
    }
    text
}

pub fn render_svg(folded: &Folded, kind: FlameKind, title: &str) -> anyhow::Result<Vec<u8>> {
    let mut options = flamegraph::Options::default();
    options.title = title.to_string();
    match kind {
        FlameKind::Oncpu => {
            options.count_name = "samples".into();
            options.colors = Palette::Basic(BasicPalette::Hot);
        }
        FlameKind::Offcpu => {
            options.count_name = "us".into();
            options.colors = Palette::Basic(BasicPalette::Blue);
            options.subtitle = Some("time blocked (switch-out to wakeup), in microseconds".into());
        }
    }
    let mut svg = Vec::new();
    let text = folded_text(folded);
    if text.is_empty() {
        // inferno refuses empty input; an empty capture still deserves a readable file.
        options.subtitle = Some("no stacks in this window".into());
        flamegraph::from_lines(&mut options, std::iter::once("[no data] 1"), &mut svg)?;
    } else {
        flamegraph::from_lines(&mut options, text.lines(), &mut svg)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::tests::sample_recording;

    #[test]
    fn offcpu_is_weighted_by_microseconds_and_clipped() {
        let recording = sample_recording();
        let all = Window::new(0, u64::MAX);
        let folded = fold(&recording, FlameKind::Offcpu, all, false);
        assert_eq!(folded.len(), 1);
        let (stack, weight) = folded.iter().next().unwrap();
        assert_eq!(stack, "server;main;stall_here");
        assert_eq!(*weight, 10 * 20_000);
        assert_eq!(weight_containing(&folded, "stall_here"), 200_000);

        // Event i spans [0.980s + i ms, 1.000s + i ms]: a window ending at 0.990s holds
        // (10 - i) ms of each, 55 ms in all.
        let early = Window::new(0, 990_000_000);
        let folded = fold(&recording, FlameKind::Offcpu, early, false);
        assert_eq!(folded.values().sum::<u64>(), 55_000);

        assert!(fold(&recording, FlameKind::Oncpu, all, false).is_empty());
    }

    #[test]
    fn oncpu_samples_weigh_what_their_period_stands_for() {
        use probe_common::{EventKind, RawEvent};
        let mut recording = sample_recording();
        let full = crate::sampling::full_period_ns(499);
        // Three full-rate samples, two at a fifth of the rate, one from an old recording.
        for (i, period) in [full, full, full, 5 * full, 5 * full, 0]
            .into_iter()
            .enumerate()
        {
            let mut raw = RawEvent::zeroed();
            raw.kind = EventKind::OnCpuSample as u32;
            raw.ts_ns = 1_500_000_000 + i as u64;
            raw.duration_ns = period;
            raw.user_stack_id = 1;
            recording.raw_events.push(raw);
        }
        let folded = fold(
            &recording,
            FlameKind::Oncpu,
            Window::new(0, u64::MAX),
            false,
        );
        assert_eq!(folded.get("server;main;stall_here"), Some(&(3 + 10 + 1)));
    }

    #[test]
    fn renders_svg_even_when_empty() {
        let recording = sample_recording();
        let folded = fold(
            &recording,
            FlameKind::Offcpu,
            Window::new(0, u64::MAX),
            false,
        );
        let svg = String::from_utf8(render_svg(&folded, FlameKind::Offcpu, "t").unwrap()).unwrap();
        assert!(svg.contains("stall_here"));
        let svg = render_svg(&Folded::new(), FlameKind::Oncpu, "empty").unwrap();
        assert!(String::from_utf8(svg).unwrap().contains("<svg"));
    }

    #[test]
    fn top_stacks_and_descriptions() {
        let mut folded = Folded::new();
        folded.insert(
            "srv;main;handle;stall_here;do_nanosleep_[k];schedule_[k]".into(),
            30,
        );
        folded.insert("srv;main;idle".into(), 50);
        let top = top_stacks(&folded, 1);
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].0, 50);
        let all = top_stacks(&folded, 5);
        assert_eq!(
            describe_stack(&all[1].1, 2),
            "handle → stall_here [do_nanosleep]"
        );
        let go: Vec<String> = "srv;runtime.goexit;main.handler;main.stallHere;syscall.Nanosleep;syscall.Syscall;do_nanosleep_[k]"
            .split(';')
            .map(str::to_string)
            .collect();
        assert_eq!(
            describe_stack(&go, 3),
            "main.handler → main.stallHere → syscall.Nanosleep … [do_nanosleep]"
        );
    }

    #[test]
    fn frame_names_cannot_break_the_format() {
        assert_eq!(sanitize("a;b\nc"), "a:b c");
    }
}
