//! What p99probe's own kernel programs cost the machine, measured on the user's workload while
//! attached, so that nobody has to take the benchmarks' word for it.
//!
//! The kernel times BPF programs only while someone asks it to (`BPF_ENABLE_STATS`, or the
//! `kernel.bpf_stats_enabled` sysctl), and timing a run costs it two clock reads: on the
//! benchmark VM an empty program costs 59 ns per run timed, most of it those reads. Left on, that
//! would add a third to what p99probe's hooks cost. So the agent times one span of
//! [`SPAN_NS`] every `--own-cost-every` and reports the rates of those spans; between them the
//! kernel does not time anything. The first span starts at a random point of the first period
//! rather than at attach: then any stretch of time, however short (a benchmark's phase of a
//! few seconds, say), pays on average the same share of the timing's cost as a long run. The figures are the programs' own time. The kernel's dispatch
//! to them is not in it (about 80 ns per run on the benchmark VM, see docs/benchmark-notes.md),
//! which is why runs per second are reported beside it.

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

/// How long each measured span lasts.
pub const SPAN_NS: u64 = 1_000_000_000;

/// How often a span starts unless `--own-cost-every` says otherwise: one second in ten timed.
pub const DEFAULT_EVERY_NS: u64 = 10_000_000_000;

/// One of the agent's programs as the kernel counts it: cumulative while timing is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramRuns {
    pub program: String,
    pub run_time_ns: u64,
    pub runs: u64,
}

/// One program's runs and time over the measured spans.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramCost {
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

impl ProgramCost {
    pub fn ns_per_run(&self) -> f64 {
        self.run_time_ns as f64 / self.runs.max(1) as f64
    }
}

/// The agent's kernel programs over the spans measured so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OwnCost {
    /// The spans' total length.
    pub measured_ns: u64,
    pub spans: u32,
    /// Requests the target served in the spans, by the kernel's timing rings.
    pub requests_served: u64,
    /// Programs that ran in the spans, costliest first.
    pub programs: Vec<ProgramCost>,
    /// Why nothing was measured, when the kernel refused to time programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmeasured: Option<String>,
}

impl OwnCost {
    /// Adds a span of `span_ns` whose programs counted `before` at its start and `after` at
    /// its end. A program missing from `before` (attached during the span) counts from 0.
    pub fn add_span(
        &mut self,
        span_ns: u64,
        before: &[ProgramRuns],
        after: &[ProgramRuns],
        requests_served: u64,
    ) {
        self.measured_ns += span_ns;
        self.spans += 1;
        self.requests_served += requests_served;
        for end in after {
            let start = before.iter().find(|b| b.program == end.program);
            let runs = end.runs.saturating_sub(start.map_or(0, |s| s.runs));
            let run_time_ns = end
                .run_time_ns
                .saturating_sub(start.map_or(0, |s| s.run_time_ns));
            if runs == 0 {
                continue;
            }
            match self.programs.iter_mut().find(|p| p.program == end.program) {
                Some(cost) => {
                    cost.runs += runs;
                    cost.run_time_ns += run_time_ns;
                }
                None => self.programs.push(ProgramCost {
                    program: end.program.clone(),
                    runs,
                    run_time_ns,
                }),
            }
        }
        self.programs.sort_by(|a, b| {
            b.run_time_ns
                .cmp(&a.run_time_ns)
                .then(a.program.cmp(&b.program))
        });
    }

    fn per_s(&self, total: u64) -> f64 {
        total as f64 * 1e9 / self.measured_ns.max(1) as f64
    }

    /// CPU time the programs took, ms per second of wall time (all CPUs together).
    pub fn ms_per_s(&self) -> f64 {
        self.per_s(self.programs.iter().map(|p| p.run_time_ns).sum()) / 1e6
    }

    pub fn runs_per_s(&self) -> f64 {
        self.per_s(self.programs.iter().map(|p| p.runs).sum())
    }

    /// The programs' time per request served, when the target served any in the spans.
    pub fn ns_per_request(&self) -> Option<f64> {
        (self.requests_served > 0).then(|| {
            self.programs.iter().map(|p| p.run_time_ns).sum::<u64>() as f64
                / self.requests_served as f64
        })
    }

    /// One line for a summary or a report; `None` before the first span ends.
    pub fn summary(&self) -> Option<String> {
        if let Some(reason) = &self.unmeasured {
            return Some(format!(
                "p99probe's own kernel time: not measured ({reason})"
            ));
        }
        if self.spans == 0 {
            return None;
        }
        let per_request = self
            .ns_per_request()
            .map(|ns| format!(", {ns:.0} ns per request served"))
            .unwrap_or_default();
        Some(format!(
            "p99probe's own kernel time: {:.2} ms/s ({:.2}% of one CPU) in {:.0} program runs/s{per_request}, measured over {} span(s), {:.1} s in all; the kernel's dispatch to the programs (tens of ns per run) is not included",
            self.ms_per_s(),
            self.ms_per_s() / 10.0,
            self.runs_per_s(),
            self.spans,
            self.measured_ns as f64 / 1e9,
        ))
    }
}

/// A span being timed: the kernel times programs for as long as `_timing` is open.
struct Span {
    _timing: OwnedFd,
    since_ns: u64,
    before: Vec<ProgramRuns>,
    served_before: u64,
}

/// Times one span every `every_ns`, the first at a random point of the first period.
pub struct OwnCostMeter {
    every_ns: u64,
    next_ns: u64,
    span: Option<Span>,
    cost: OwnCost,
}

impl OwnCostMeter {
    /// `None` when `every_ns` is 0: never measured.
    pub fn new(now_ns: u64, every_ns: u64) -> Option<OwnCostMeter> {
        if every_ns == 0 {
            return None;
        }
        let every_ns = every_ns.max(SPAN_NS);
        let first_ns = now_ns + fastrand::u64(0..=every_ns - SPAN_NS);
        Some(OwnCostMeter::first_at(first_ns, every_ns))
    }

    fn first_at(first_ns: u64, every_ns: u64) -> OwnCostMeter {
        OwnCostMeter {
            every_ns,
            next_ns: first_ns,
            span: None,
            cost: OwnCost::default(),
        }
    }

    /// Ends the span in progress when it has lasted [`SPAN_NS`], and starts one when due.
    /// `start_timing` turns the kernel's timing on until its result is dropped; `programs`
    /// reads the programs' counts, `served` the requests served so far. A refusal to time
    /// ends the measuring, with the reason kept for the report.
    pub fn poll(
        &mut self,
        now_ns: u64,
        start_timing: impl FnOnce() -> std::io::Result<OwnedFd>,
        programs: impl Fn() -> Vec<ProgramRuns>,
        served: u64,
    ) {
        if self.cost.unmeasured.is_some() {
            return;
        }
        if self
            .span
            .as_ref()
            .is_some_and(|span| now_ns >= span.since_ns + SPAN_NS)
        {
            self.end_span(now_ns, &programs, served);
        }
        if self.span.is_some() || now_ns < self.next_ns {
            return;
        }
        match start_timing() {
            Ok(timing) => {
                self.next_ns = now_ns + self.every_ns;
                self.span = Some(Span {
                    _timing: timing,
                    since_ns: now_ns,
                    before: programs(),
                    served_before: served,
                });
            }
            Err(e) => self.cost.unmeasured = Some(format!("BPF_ENABLE_STATS: {e}")),
        }
    }

    /// Ends the span in progress, however short: the agent is detaching.
    pub fn finish(&mut self, now_ns: u64, programs: impl Fn() -> Vec<ProgramRuns>, served: u64) {
        if self.span.is_some() {
            self.end_span(now_ns, &programs, served);
        }
    }

    fn end_span(&mut self, now_ns: u64, programs: &impl Fn() -> Vec<ProgramRuns>, served: u64) {
        // Read before the timing is turned off, so that the end matches the span's length.
        let after = programs();
        if let Some(span) = self.span.take() {
            self.cost.add_span(
                now_ns.saturating_sub(span.since_ns),
                &span.before,
                &after,
                served.saturating_sub(span.served_before),
            );
        }
    }

    /// When [`OwnCostMeter::poll`] next has something to do: the end of the span in
    /// progress, or the start of the next. `None` once measuring has been refused. The agent
    /// wakes for it, so that a span lasts [`SPAN_NS`] and not until whichever drain follows
    /// (drains of a calm, busy target come a second apart).
    pub fn next_due_ns(&self) -> Option<u64> {
        if self.cost.unmeasured.is_some() {
            return None;
        }
        Some(
            self.span
                .as_ref()
                .map_or(self.next_ns, |span| span.since_ns + SPAN_NS),
        )
    }

    /// Whether the kernel is timing programs for this meter right now.
    pub fn measuring(&self) -> bool {
        self.span.is_some()
    }

    pub fn cost(&self) -> &OwnCost {
        &self.cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(program: &str, run_time_ns: u64, runs: u64) -> ProgramRuns {
        ProgramRuns {
            program: program.into(),
            run_time_ns,
            runs,
        }
    }

    fn timing() -> std::io::Result<OwnedFd> {
        Ok(std::fs::File::open("/dev/null")?.into())
    }

    #[test]
    fn a_span_counts_what_ran_between_its_edges_costliest_first() {
        let mut cost = OwnCost::default();
        cost.add_span(
            1_000_000_000,
            &[runs("a", 1_000, 10), runs("b", 500, 5)],
            &[
                runs("a", 101_000, 1_010),
                runs("b", 500, 5),
                runs("c", 300_000, 2_000),
            ],
            500,
        );
        assert_eq!(
            cost.programs,
            vec![
                ProgramCost {
                    program: "c".into(),
                    runs: 2_000,
                    run_time_ns: 300_000
                },
                ProgramCost {
                    program: "a".into(),
                    runs: 1_000,
                    run_time_ns: 100_000
                },
            ],
            "b did not run in the span; c was attached during it"
        );
        assert!((cost.ms_per_s() - 0.4).abs() < 1e-9);
        assert!((cost.runs_per_s() - 3_000.0).abs() < 1e-9);
        assert_eq!(cost.ns_per_request(), Some(800.0));
    }

    #[test]
    fn rates_are_over_the_measured_time_only() {
        let mut cost = OwnCost::default();
        cost.add_span(1_000_000_000, &[], &[runs("a", 2_000_000, 1_000)], 0);
        cost.add_span(
            500_000_000,
            &[runs("a", 10_000_000, 5_000)],
            &[runs("a", 11_000_000, 5_500)],
            0,
        );
        assert_eq!(cost.spans, 2);
        assert_eq!(cost.programs[0].runs, 1_500);
        assert!((cost.runs_per_s() - 1_000.0).abs() < 1e-9);
        assert!((cost.ms_per_s() - 2.0).abs() < 1e-9);
        assert!((cost.programs[0].ns_per_run() - 2_000.0).abs() < 1e-9);
        assert_eq!(cost.ns_per_request(), None);
        let line = cost.summary().unwrap();
        assert!(line.contains("2.00 ms/s (0.20% of one CPU)"), "{line}");
        assert!(line.contains("2 span(s), 1.5 s in all"), "{line}");
        assert!(!line.contains("per request"), "{line}");
    }

    #[test]
    fn the_meter_times_one_span_every_period_and_reads_both_edges() {
        let counts = std::cell::Cell::new(0u64);
        let programs = || vec![runs("p", counts.get() * 100, counts.get())];
        let mut meter = OwnCostMeter::first_at(0, 5 * SPAN_NS);
        meter.poll(0, timing, programs, 0);
        assert!(meter.measuring());
        counts.set(10);
        meter.poll(SPAN_NS / 2, timing, programs, 3);
        assert!(meter.measuring());
        counts.set(20);
        meter.poll(SPAN_NS, timing, programs, 7);
        assert!(!meter.measuring(), "a span lasts SPAN_NS");
        assert_eq!(meter.cost().spans, 1);
        assert_eq!(meter.cost().programs[0].runs, 20);
        assert_eq!(meter.cost().requests_served, 7);
        counts.set(1_000);
        meter.poll(3 * SPAN_NS, timing, programs, 50);
        assert!(
            !meter.measuring(),
            "the next is due a period after the first began"
        );
        meter.poll(5 * SPAN_NS, timing, programs, 50);
        assert!(meter.measuring());
        counts.set(1_004);
        meter.finish(5 * SPAN_NS + SPAN_NS / 4, programs, 52);
        assert!(!meter.measuring());
        let cost = meter.cost();
        assert_eq!((cost.spans, cost.programs[0].runs), (2, 24));
        assert_eq!(cost.measured_ns, SPAN_NS + SPAN_NS / 4);
        assert_eq!(cost.requests_served, 9);
    }

    #[test]
    fn the_meter_is_due_at_each_edge_of_its_spans_and_never_once_refused() {
        let mut meter = OwnCostMeter::first_at(2 * SPAN_NS, 10 * SPAN_NS);
        assert_eq!(meter.next_due_ns(), Some(2 * SPAN_NS));
        // Polled late, as a drain may be: the span runs from then.
        meter.poll(2 * SPAN_NS + 7, timing, Vec::new, 0);
        assert_eq!(meter.next_due_ns(), Some(3 * SPAN_NS + 7));
        meter.poll(3 * SPAN_NS + 7, timing, Vec::new, 0);
        assert!(!meter.measuring());
        assert_eq!(meter.next_due_ns(), Some(12 * SPAN_NS + 7));

        let mut refused = OwnCostMeter::first_at(0, 10 * SPAN_NS);
        refused.poll(
            0,
            || Err(std::io::ErrorKind::PermissionDenied.into()),
            Vec::new,
            0,
        );
        assert_eq!(refused.next_due_ns(), None);
    }

    #[test]
    fn a_kernel_that_refuses_to_time_is_reported_and_not_asked_again() {
        let asked = std::cell::Cell::new(0);
        let refuse = || {
            asked.set(asked.get() + 1);
            Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
        };
        let mut meter = OwnCostMeter::new(0, SPAN_NS).unwrap();
        meter.poll(0, refuse, Vec::new, 0);
        meter.poll(10 * SPAN_NS, refuse, Vec::new, 0);
        assert_eq!(asked.get(), 1);
        let line = meter.cost().summary().unwrap();
        assert!(line.contains("not measured (BPF_ENABLE_STATS:"), "{line}");
    }

    #[test]
    fn a_period_of_zero_measures_nothing() {
        assert!(OwnCostMeter::new(0, 0).is_none());
    }

    #[test]
    fn the_first_span_starts_anywhere_in_the_first_period_and_ends_within_it() {
        let firsts: Vec<u64> = (0..200)
            .map(|_| OwnCostMeter::new(1_000, 4 * SPAN_NS).unwrap().next_ns - 1_000)
            .collect();
        assert!(firsts.iter().all(|&first| first <= 3 * SPAN_NS));
        assert!(firsts.iter().any(|&first| first < SPAN_NS));
        assert!(firsts.iter().any(|&first| first > 2 * SPAN_NS));
        // A period no longer than a span times throughout, from the start.
        assert_eq!(
            OwnCostMeter::new(1_000, SPAN_NS / 2).unwrap().next_ns,
            1_000
        );
        assert_eq!(OwnCostMeter::new(1_000, SPAN_NS).unwrap().next_ns, 1_000);
    }
}
