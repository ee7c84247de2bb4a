//! `p99probe attach`: watch the target's request latency, and when P99 crosses the threshold,
//! capture the window around it (from the flight recorder) into a capture directory.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::attach::{AttachReport, ProbeSettings, TriggerLatency};
use crate::capture::{write_capture, CaptureRequest};
use crate::error::ProbeError;
use crate::events::{external_latency, Drained};
use crate::flight::FlightRecorder;
use crate::histogram::human_ns;
use crate::latency::{parse_feed_line, LatencyKind, SlidingLatency};
use crate::latency_watch::LatencyWatch;
use crate::offcpu_sampling;
use crate::own_cost::OwnCost;
use crate::recorder::{after, monotonic_ns, status_line, LiveSession};
use crate::recording::KernelCounters;
use crate::sampling::SamplingGovernor;
use crate::trigger::{Fire, Threshold, Trigger, TriggerConfig};
use crate::verdict::Cause;
use crate::window::Window;

/// Where external latencies come from, one per line (`12.5ms`, `800us`, or bare milliseconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LatencyFeed {
    Stdin,
    Udp(u16),
}

impl std::str::FromStr for LatencyFeed {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "stdin" || text == "-" {
            return Ok(LatencyFeed::Stdin);
        }
        text.strip_prefix("udp:")
            .and_then(|p| p.parse().ok())
            .map(LatencyFeed::Udp)
            .ok_or_else(|| format!("`{text}`: use `stdin` or `udp:PORT`"))
    }
}

#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub probe: ProbeSettings,
    pub latency: LatencyKind,
    pub feed: Option<LatencyFeed>,
    pub threshold: Threshold,
    /// Sliding window the P99 is computed over.
    pub window: Duration,
    pub pre: Duration,
    pub post: Duration,
    /// Compared against the spike: this long, ending where `pre` begins.
    pub baseline: Duration,
    pub cooldown: Duration,
    pub max_captures: usize,
    pub min_requests: u64,
    pub duration: Option<Duration>,
    pub out_dir: PathBuf,
    pub progress: bool,
    /// Flight-recorder bound; the oldest events go first beyond it.
    pub max_buffered_events: usize,
    /// How often the agent forgets the stacks that no held event refers to.
    pub stack_prune_every: Duration,
}

#[derive(Clone, Debug)]
pub struct CaptureDone {
    pub dir: PathBuf,
    pub fire: Fire,
    pub top_cause: Option<Cause>,
}

#[derive(Clone, Debug)]
pub struct AttachSummary {
    pub captures: Vec<CaptureDone>,
    pub hooks: AttachReport,
    pub counters: KernelCounters,
    pub target_exited: bool,
    pub evicted_for_memory: u64,
    /// Captures whose start the kernel's timing rings no longer reached back to.
    pub timing_history_cut: usize,
    /// Kernel stack-map entries freed: copied out and not recurring, or named by no event.
    pub stacks_freed: u64,
    /// When on-CPU sampling changed rate (CLOCK_MONOTONIC ns) and to what: `true` for calm.
    pub sampling_changes: Vec<(u64, bool)>,
    /// When the response-write hook was attached (`true`) or detached; see `request_end`.
    pub write_hook_changes: Vec<(u64, bool)>,
    /// When the off-CPU stack-sampling threshold changed and to what (ms); see
    /// `offcpu_sampling`.
    pub offcpu_sampling_changes: Vec<(u64, u32)>,
    /// `None` when `--own-cost-every 0` turned measuring off.
    pub own_cost: Option<OwnCost>,
}

/// The feed's latencies, each with when it arrived: they are taken in between drains of the
/// kernel's events, not as they come (see `attach_and_watch`).
fn spawn_feed(feed: &LatencyFeed) -> Result<mpsc::Receiver<(u64, u64)>, ProbeError> {
    // Room for a fast feed's lines between two drains (50 ms at 1 M lines/s).
    let (tx, rx) = mpsc::channel(1 << 16);
    match feed.clone() {
        LatencyFeed::Stdin => {
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(ns) = parse_feed_line(&line) {
                        if tx.send((monotonic_ns(), ns)).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
        LatencyFeed::Udp(port) => {
            let socket = std::net::UdpSocket::bind(("127.0.0.1", port))
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .and_then(tokio::net::UdpSocket::from_std)
                .map_err(|e| {
                    ProbeError::InvalidArgument(format!("latency feed udp:{port}: {e}"))
                })?;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = socket.recv(&mut buf).await {
                    for line in String::from_utf8_lossy(&buf[..n]).lines() {
                        if let Some(ns) = parse_feed_line(line) {
                            if tx.send((monotonic_ns(), ns)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    }
    Ok(rx)
}

/// Every line the feed has delivered so far, as (arrival time, latency).
fn take_feed(feed: &mut Option<mpsc::Receiver<(u64, u64)>>, mut each: impl FnMut(u64, u64)) {
    if let Some(rx) = feed.as_mut() {
        while let Ok((arrived_ns, latency)) = rx.try_recv() {
            each(arrived_ns, latency);
        }
    }
}

/// Where the capture of `fire` starts: its baseline's start, or the start of tracing.
fn capture_start(opts: &AttachOptions, session: &LiveSession, fire: &Fire) -> u64 {
    let ahead = opts.pre + opts.baseline;
    fire.at_ns
        .saturating_sub(ahead.as_nanos() as u64)
        .max(session.start_ns)
}

struct Capturer<'a> {
    opts: &'a AttachOptions,
    /// What the trigger watches: the feed's latencies when there is a feed.
    latency_kind: LatencyKind,
    running: Vec<tokio::task::JoinHandle<Result<CaptureDone, ProbeError>>>,
}

impl Capturer<'_> {
    /// Snapshots the window around `fire` (ending at `end_ns`) and writes it in the
    /// background, so draining the kernel's events never stops.
    fn start(
        &mut self,
        session: &LiveSession,
        flight: &FlightRecorder,
        fire: Fire,
        end_ns: u64,
        target_exited: bool,
        timings_lost_before: Option<u64>,
    ) -> Result<(), ProbeError> {
        let ns = |d: Duration| d.as_nanos() as u64;
        let from = capture_start(self.opts, session, &fire);
        let spike = Window::new(
            fire.at_ns.saturating_sub(ns(self.opts.window)).max(from),
            end_ns,
        );
        let baseline_end = fire.at_ns.saturating_sub(ns(self.opts.pre)).max(from);
        // Attached too recently for a full pre-window: compare with whatever came before.
        let baseline_end = if baseline_end > from {
            baseline_end
        } else {
            spike.start_ns
        };
        let baseline = Window::new(from, baseline_end);
        let mut pending =
            session.snapshot(flight.snapshot(from, end_ns), from, end_ns, target_exited)?;
        pending.timings_lost_before(timings_lost_before);
        let out_dir = self.opts.out_dir.clone();
        let latency_kind = self.latency_kind;
        self.running.push(tokio::task::spawn_blocking(move || {
            let recording = pending.finish();
            let request = CaptureRequest {
                recording: &recording,
                spike,
                baseline: vec![baseline],
                fire: Some(fire),
                latency_kind,
            };
            let (dir, report) = write_capture(&out_dir, &request)?;
            let top_cause = report.verdict.into_iter().next();
            Ok(CaptureDone {
                dir,
                fire,
                top_cause,
            })
        }));
        Ok(())
    }

    /// The captures whose writing has ended since the last call, written or not.
    async fn ended(&mut self) -> Vec<Result<CaptureDone, ProbeError>> {
        let (ended, running) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|task| task.is_finished());
        self.running = running;
        let mut results = Vec::new();
        for task in ended {
            results.push(joined(task).await);
        }
        results
    }

    /// Waits for the captures still being written.
    async fn finish(self) -> Result<Vec<CaptureDone>, ProbeError> {
        let mut done = Vec::new();
        for task in self.running {
            done.push(joined(task).await?);
        }
        Ok(done)
    }
}

async fn joined(
    task: tokio::task::JoinHandle<Result<CaptureDone, ProbeError>>,
) -> Result<CaptureDone, ProbeError> {
    task.await
        .map_err(|e| ProbeError::InvalidArgument(format!("capture task: {e}")))?
}

/// How often the live P99 is compared with the threshold (and a due capture started).
const CHECK_EVERY_NS: u64 = 100_000_000;

pub async fn attach_and_watch(
    opts: &AttachOptions,
    stop: impl Future<Output = ()>,
) -> Result<AttachSummary, ProbeError> {
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| ProbeError::Unwritable {
        path: opts.out_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    crate::output::check_writable(&opts.out_dir.join(".p99probe-write-test"))?;
    let mut feed = match &opts.feed {
        Some(feed) => Some(spawn_feed(feed)?),
        None => None,
    };
    let latency_kind = if opts.feed.is_some() {
        LatencyKind::External
    } else {
        opts.latency
    };
    let ns = |d: Duration| d.as_nanos() as u64;
    let probe = ProbeSettings {
        track_delivery: opts.probe.track_delivery || latency_kind == LatencyKind::Delivery,
        // Measured in the kernel: it keeps the trigger's histograms too. A feed's latencies
        // come through the agent, which keeps their histograms itself (`sliding`).
        trigger_latency: (latency_kind != LatencyKind::External).then(|| TriggerLatency {
            kind: latency_kind.event_kind(),
            window_ns: ns(opts.window),
        }),
        ..opts.probe.clone()
    };
    let mut session = LiveSession::start(&probe)?;
    session.leave_timings_in_kernel();
    let mut flight = FlightRecorder::new(
        ns(opts.pre) + ns(opts.baseline) + ns(opts.window) + 1_000_000_000,
        opts.max_buffered_events,
    );
    let mut sliding = SlidingLatency::new(ns(opts.window));
    let mut trigger = Trigger::new(TriggerConfig {
        threshold: opts.threshold,
        min_requests: opts.min_requests,
        cooldown_ns: ns(opts.cooldown),
        max_captures: opts.max_captures,
        arm_after_ns: ns(opts.pre) + ns(opts.baseline),
    });
    let mut sampling = SamplingGovernor::new(probe.calm_sample_divisor);
    let mut sampling_changes = Vec::new();
    let mut capturer = Capturer {
        opts,
        latency_kind,
        running: Vec::new(),
    };
    let progress = status_line(opts.progress, probe.pid, session.hooks());
    let deadline = after(opts.duration);
    tokio::pin!(deadline, stop);
    let mut batch = Drained::default();
    let mut pending: Option<Fire> = None;
    let mut target_exited = false;
    let mut events_seen = 0u64;
    let mut rate_mark = (monotonic_ns(), 0u64);
    let mut events_per_s = 0.0;
    let mut last_prune = monotonic_ns();
    let mut last_check = 0u64;
    let mut latency_watch = LatencyWatch::default();
    let mut drops = 0u64;
    let mut timing_history_cut = 0usize;
    // For the capture in progress: see `KernelCounters::timings_lost_before_ns`.
    let mut timings_lost_before = None;
    let mut written = Vec::new();
    let mut failed: Option<ProbeError> = None;
    loop {
        tokio::select! {
            result = session.next_events(&mut batch) => {
                result?;
                events_seen += batch.events.len() as u64;
                // Timings come only while a capture is in progress: the kernel keeps them
                // otherwise (its rings), and counts the trigger's latencies itself.
                for timing in batch.timings.drain(..) {
                    flight.push_timing(timing);
                }
                for raw in batch.events.drain(..) {
                    flight.push(raw);
                }
                // Not a branch of this select: a feed faster than the drain interval restarted
                // the drain's timeout on every line, so a quiet target's events were never
                // drained and the trigger never checked.
                take_feed(&mut feed, |arrived_ns, latency| {
                    sliding.record(arrived_ns, latency);
                    flight.push(external_latency(arrived_ns, latency));
                });
                // Checked after a drain rather than on a timer of its own: each wakeup of
                // the agent costs more than the check. Drains come this often, or every
                // 200 ms while events are plentiful and no capture is pending (a second while
                // latency is also calm, when a rise in it wakes the agent).
                let now = monotonic_ns();
                // The kernel's wake for a rise is one per slice: it must not meet a skip.
                let rising = std::mem::take(&mut batch.latency_rising);
                if now.saturating_sub(last_check) < CHECK_EVERY_NS && !rising {
                    continue;
                }
                last_check = now;
                // A capture that could not be written (a full disk) ends the run now rather
                // than at its end, hours later perhaps; those written stay on disk.
                for ended in capturer.ended().await {
                    match ended {
                        Ok(done) => {
                            if opts.progress {
                                progress.suspend(|| eprintln!("p99probe: capture written: {}", done.dir.display()));
                            }
                            written.push(done);
                        }
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                }
                if failed.is_some() {
                    break;
                }
                if let Some(fire) = pending {
                    if now >= fire.at_ns + ns(opts.post) {
                        capturer.start(&session, &flight, fire, now, false, timings_lost_before)?;
                        pending = None;
                        session.leave_timings_in_kernel();
                        if !trigger.captures_left() {
                            break;
                        }
                    }
                }
                let hold = pending.map(|f| f.at_ns.saturating_sub(ns(opts.pre) + ns(opts.baseline)));
                flight.evict(now, hold);
                let current = session
                    .trigger_percentiles(now)
                    .unwrap_or_else(|| sliding.percentiles(now));
                let mut fired_now = false;
                if pending.is_none() {
                    if let Some(fire) = trigger.observe(now, &current) {
                        if opts.progress {
                            // suspend: shown even when the status line is hidden (not a TTY).
                            progress.suspend(|| eprintln!(
                                "p99probe: P99 {} crossed {}; capturing {}s before to {}s after",
                                human_ns(fire.observed_p99_ns),
                                human_ns(fire.threshold_ns),
                                opts.pre.as_secs_f64(),
                                opts.post.as_secs_f64()
                            ));
                        }
                        pending = Some(fire);
                        fired_now = true;
                    }
                }
                session.drain_promptly(pending.is_some());
                let p99 = (current.count > 0).then_some(current.p99_ns);
                session.watch_latency(latency_watch.mark(
                    now,
                    trigger.threshold_ns(),
                    p99,
                    pending.is_some(),
                    rising,
                ));
                if let Some(calm) =
                    sampling.observe(now, p99, trigger.threshold_ns(), pending.is_some())
                {
                    match session.set_calm_sampling(calm) {
                        Ok(()) => sampling_changes.push((now, calm)),
                        Err(e) => {
                            // Not worth ending the run (and the capture in progress) for.
                            progress.suspend(|| {
                                eprintln!("p99probe: sampling rate change failed, none again: {e}")
                            });
                            sampling = SamplingGovernor::new(1);
                        }
                    }
                }
                // After the switch to full-rate sampling, which should not wait for this copy
                // (tens of ms with full rings).
                if let Some(fire) = pending.filter(|_| fired_now) {
                    let mut held = Vec::new();
                    let read = session.hold_timings_from(capture_start(opts, &session, &fire), &mut held);
                    flight.hold_timings(held);
                    timings_lost_before = read.complete_from_ns;
                    if timings_lost_before.is_some() {
                        timing_history_cut += 1;
                        progress.suspend(|| eprintln!(
                            "p99probe: the kernel's timing rings no longer reach back to the capture's start; its earliest request latencies and run-queue waits are missing"
                        ));
                    }
                }
                if now.saturating_sub(rate_mark.0) >= 1_000_000_000 {
                    let events = events_seen + session.timings_written();
                    events_per_s = (events - rate_mark.1) as f64 * 1e9 / (now - rate_mark.0) as f64;
                    rate_mark = (now, events);
                    drops = session.counters().map(|c| c.lost()).unwrap_or(drops);
                    if !session.refresh_target() {
                        target_exited = true;
                        break;
                    }
                }
                if now.saturating_sub(last_prune) >= ns(opts.stack_prune_every) {
                    last_prune = now;
                    session.prune_stacks(flight.stacks_named());
                }
                if progress.is_hidden() {
                    continue;
                }
                let threshold = match trigger.threshold_ns() {
                    Some(t) if trigger.armed(now) => human_ns(t),
                    Some(t) => format!("{} (arming: collecting a baseline)", human_ns(t)),
                    None => "learning baseline".into(),
                };
                progress.set_message(format!(
                    "pid {} {:?} P99 {} (n={}) vs {threshold} | {:.0} events/s | {drops} dropped | sampling {} | requests end {}{} | {} captures{}",
                    session.pid,
                    latency_kind,
                    human_ns(current.p99_ns),
                    current.count,
                    events_per_s,
                    if sampling.is_calm() { "calm" } else { "full rate" },
                    if session.write_hook_attached() { "at write" } else { "at next request" },
                    offcpu_sampling::status(session.offcpu_sampling_threshold_ms()),
                    written.len() + capturer.running.len(),
                    if pending.is_some() { " | capturing…" } else { "" }
                ));
                progress.tick();
            }
            _ = &mut deadline => break,
            _ = &mut stop => break,
        }
    }
    if let Some(err) = failed {
        drop(session);
        // The other captures being written end before the error does (and likely fail too).
        let _ = capturer.finish().await;
        return Err(err);
    }
    let own_cost = session.end_run(&mut batch);
    for timing in batch.timings.drain(..) {
        flight.push_timing(timing);
    }
    for raw in batch.events.drain(..) {
        flight.push(raw);
    }
    take_feed(&mut feed, |arrived_ns, latency| {
        flight.push(external_latency(arrived_ns, latency))
    });
    if let Some(fire) = pending {
        // Ctrl-C, the duration or the target's exit cut the post-window short: keep what we have.
        capturer.start(
            &session,
            &flight,
            fire,
            monotonic_ns(),
            target_exited,
            timings_lost_before,
        )?;
    }
    progress.finish_and_clear();
    let hooks = session.hooks().clone();
    let counters = session.counters()?;
    let stacks_freed = session.stacks_freed;
    let write_hook_changes = std::mem::take(&mut session.write_hook_changes);
    let offcpu_sampling_changes = std::mem::take(&mut session.offcpu_sampling_changes);
    drop(session);
    written.extend(capturer.finish().await?);
    Ok(AttachSummary {
        captures: written,
        hooks,
        counters,
        target_exited,
        evicted_for_memory: flight.evicted_for_memory,
        timing_history_cut,
        stacks_freed,
        sampling_changes,
        write_hook_changes,
        offcpu_sampling_changes,
        own_cost,
    })
}
