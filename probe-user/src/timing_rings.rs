//! The kernel's per-CPU timing rings: the last few seconds of request latencies and run-queue
//! waits, kept in place by the kernel and read by the agent through a mapping.
//!
//! Under a loaded server these are one or two events per request. Carried through the ring
//! buffer, every one was copied by the kernel, decoded and stored by the agent, and the agent's
//! drains (1–2 ms every 200 ms under 120k requests/s) delayed the requests in flight on the CPU
//! it shared with the load. Kept in the kernel, a timing costs the agent nothing until it reads
//! it: `attach` reads them only for a capture (its trigger sums the kernel's histograms, see
//! `latency_slices`), and `record` reads them all.

use probe_common::{TimingHead, TimingRecord};

use crate::events::Timing;

/// Each CPU's ring holds `1 << bits` records; see [`ring_bits`].
const MIN_RING_BITS: u32 = 16;
const MAX_RING_BITS: u32 = 21;
/// Kernel memory the rings may take together before each CPU's is held to the minimum.
const RINGS_BUDGET_BYTES: u64 = 192 << 20;

/// The size (as a power of two) of each CPU's ring for `possible_cpus`: as large as the budget
/// allows, within bounds. 2M records (48 MiB) hold ~17 s of a CPU timing 120k requests/s, more
/// than the default capture span (11 s); 64k hold half a second of it, so on very large
/// machines a capture of a busy CPU can lose the start of its baseline (the capture says so).
pub fn ring_bits(possible_cpus: usize) -> u32 {
    let per_cpu = RINGS_BUDGET_BYTES
        / std::mem::size_of::<TimingRecord>() as u64
        / possible_cpus.max(1) as u64;
    per_cpu
        .checked_ilog2()
        .unwrap_or(0)
        .clamp(MIN_RING_BITS, MAX_RING_BITS)
}

/// One CPU's ring, wherever it lives (the kernel's mapping, or a test's vectors).
#[derive(Clone, Copy)]
struct CpuRing {
    cpu: u32,
    records: *const TimingRecord,
    capacity: u64,
    head: *const TimingHead,
}

impl CpuRing {
    /// Records written so far. Everything below it is in place: the kernel stores the count
    /// after the record.
    fn written(&self) -> u64 {
        // SAFETY: `head` points into a live mapping (or a test's value) for as long as `self`.
        let written = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.head).written)) };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        written
    }

    fn record(&self, seq: u64) -> TimingRecord {
        // SAFETY: the index is masked into the ring.
        unsafe { std::ptr::read_volatile(self.records.add((seq & (self.capacity - 1)) as usize)) }
    }

    /// Appends the records from `from_seq` up to `to_seq` (or what is written, if less) to
    /// `out`, as timings of `tgid`.
    fn read(&self, from_seq: u64, to_seq: u64, tgid: u32, out: &mut Vec<Timing>) -> RingRead {
        let written = self.written();
        let end = written.min(to_seq);
        let start = from_seq.max(written.saturating_sub(self.capacity)).min(end);
        let first = out.len();
        out.extend((start..end).map(|seq| {
            let record = self.record(seq);
            Timing {
                ts_ns: record.ts_ns,
                duration_ns: record.duration_ns,
                tid: record.tid,
                tgid,
                cpu: self.cpu,
                kind: record.kind,
            }
        }));
        // The kernel kept writing while we copied: the oldest slots may hold newer records
        // than the ones we meant to read, or a mix of two. Those are dropped as overwritten.
        let safe_from = self.written().saturating_sub(self.capacity);
        let torn = safe_from.saturating_sub(start).min(end - start);
        out.drain(first..first + torn as usize);
        RingRead {
            next: end,
            lost: (start + torn).saturating_sub(from_seq),
        }
    }
}

/// How one read of a ring went.
struct RingRead {
    /// Where the next read starts.
    next: u64,
    /// Records asked for that were overwritten before they could be read.
    lost: u64,
}

/// Where the agent has read each CPU's ring up to.
#[derive(Clone, Debug, Default)]
pub struct RingCursors(Vec<u64>);

/// What [`TimingRings::read_back`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadBack {
    /// Timings copied.
    pub timings: usize,
    /// Some CPU's ring no longer reaches back to the time asked for: the latest time before
    /// which a ring has lost timings (its oldest record left).
    pub complete_from_ns: Option<u64>,
}

/// The kernel's timing rings of every possible CPU.
pub struct TimingRings {
    rings: Vec<CpuRing>,
    tgid: u32,
    /// Keeps the memory `rings` point into alive; `None` when they point into a test's vectors.
    _memory: Option<(memmap2::Mmap, memmap2::Mmap)>,
}

// SAFETY: the pointers refer to mappings the struct owns, read only with volatile loads.
unsafe impl Send for TimingRings {}

impl TimingRings {
    /// Maps the kernel's `records` (the `TIMINGS` map) and `heads` (`TIMING_HEADS`) maps,
    /// sized for `possible_cpus` rings of `1 << bits` records.
    pub fn map(
        records_fd: std::os::fd::BorrowedFd<'_>,
        heads_fd: std::os::fd::BorrowedFd<'_>,
        possible_cpus: usize,
        bits: u32,
        tgid: u32,
    ) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let capacity = 1usize << bits;
        let map = |fd: std::os::fd::BorrowedFd<'_>, len: usize| {
            // SAFETY: the kernel keeps the pages for as long as the mapping lives; they are
            // only read, with volatile loads of plain integers.
            unsafe { memmap2::MmapOptions::new().len(len).map(fd.as_raw_fd()) }
        };
        let records = map(
            records_fd,
            possible_cpus * capacity * std::mem::size_of::<TimingRecord>(),
        )?;
        let heads = map(heads_fd, possible_cpus * std::mem::size_of::<TimingHead>())?;
        let rings = (0..possible_cpus)
            .map(|cpu| CpuRing {
                cpu: cpu as u32,
                // SAFETY: in bounds of the mappings just made; both are page-aligned, so every
                // record and head is aligned.
                records: unsafe { (records.as_ptr() as *const TimingRecord).add(cpu * capacity) },
                capacity: capacity as u64,
                head: unsafe { (heads.as_ptr() as *const TimingHead).add(cpu) },
            })
            .collect();
        Ok(TimingRings {
            rings,
            tgid,
            _memory: Some((records, heads)),
        })
    }

    /// Timings written to every ring so far.
    pub fn written(&self) -> u64 {
        self.rings.iter().map(CpuRing::written).sum()
    }

    /// Requests served (`EventKind::RequestServed`) written to every ring so far.
    pub fn served(&self) -> u64 {
        self.rings
            .iter()
            .map(|ring| {
                // SAFETY: as in `CpuRing::written`.
                unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*ring.head).served)) }
            })
            .sum()
    }

    /// Moves `cursors` past everything written so far, unread.
    pub fn skip_to_end(&self, cursors: &mut RingCursors) {
        for (ring, cursor) in self.rings.iter().zip(cursors.0.iter_mut()) {
            *cursor = ring.written();
        }
    }

    /// Cursors at the start of every ring: the next [`Self::read_new`] reads all they hold.
    pub fn cursors(&self) -> RingCursors {
        RingCursors(vec![0; self.rings.len()])
    }

    /// Appends the timings written since `cursors` to `out` and moves the cursors past them;
    /// returns how many were overwritten before this read (the reader fell a ring behind).
    pub fn read_new(&self, cursors: &mut RingCursors, out: &mut Vec<Timing>) -> u64 {
        let mut overwritten = 0;
        for (ring, cursor) in self.rings.iter().zip(cursors.0.iter_mut()) {
            let read = ring.read(*cursor, u64::MAX, self.tgid, out);
            *cursor = read.next;
            overwritten += read.lost;
        }
        overwritten
    }

    /// Appends the timings that ended at or after `from_ns` and that `cursors` have already
    /// passed, as far back as the rings still hold them: what a capture that starts now needs
    /// from before it started. In time order per CPU only.
    pub fn read_back(
        &self,
        cursors: &RingCursors,
        from_ns: u64,
        out: &mut Vec<Timing>,
    ) -> ReadBack {
        let first = out.len();
        let mut complete_from_ns = None;
        for (ring, &cursor) in self.rings.iter().zip(cursors.0.iter()) {
            let from_seq = cursor.saturating_sub(ring.capacity);
            let first_of_ring = out.len();
            let read = ring.read(from_seq, cursor, self.tgid, out);
            // Something older is gone, and what is left starts after the time asked for.
            if from_seq + read.lost > 0 {
                // Nothing left of what the cursor passed: the ring's oldest record now says
                // from when it is whole.
                let oldest_left = out.get(first_of_ring).map_or_else(
                    || {
                        ring.record(ring.written().saturating_sub(ring.capacity))
                            .ts_ns
                    },
                    |t| t.ts_ns,
                );
                if oldest_left > from_ns {
                    complete_from_ns = complete_from_ns.max(Some(oldest_left));
                }
            }
            let mut kept = first_of_ring;
            for i in first_of_ring..out.len() {
                if out[i].ts_ns >= from_ns {
                    out[kept] = out[i];
                    kept += 1;
                }
            }
            out.truncate(kept);
        }
        ReadBack {
            timings: out.len() - first,
            complete_from_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::EventKind;

    /// Rings in leaked memory, written the way the kernel writes them.
    struct KernelSide {
        records: *mut TimingRecord,
        heads: *mut TimingHead,
        capacity: usize,
    }

    fn rings(cpus: usize, bits: u32) -> (TimingRings, KernelSide) {
        let capacity = 1usize << bits;
        let records = Box::leak(vec![TimingRecord::default(); cpus * capacity].into_boxed_slice())
            .as_mut_ptr();
        let heads = Box::leak(vec![TimingHead::default(); cpus].into_boxed_slice()).as_mut_ptr();
        let rings = (0..cpus)
            .map(|cpu| CpuRing {
                cpu: cpu as u32,
                records: unsafe { records.add(cpu * capacity) },
                capacity: capacity as u64,
                head: unsafe { heads.add(cpu) },
            })
            .collect();
        let kernel = KernelSide {
            records,
            heads,
            capacity,
        };
        (
            TimingRings {
                rings,
                tgid: 7,
                _memory: None,
            },
            kernel,
        )
    }

    impl KernelSide {
        fn record(&self, cpu: usize, ts_ns: u64) {
            unsafe {
                let head = &mut *self.heads.add(cpu);
                let slot = cpu * self.capacity + (head.written as usize % self.capacity);
                *self.records.add(slot) = TimingRecord {
                    ts_ns,
                    duration_ns: ts_ns / 10,
                    tid: 100 + cpu as u32,
                    kind: EventKind::RequestServed as u32,
                };
                head.written += 1;
            }
        }
    }

    fn times(timings: &[Timing]) -> Vec<u64> {
        timings.iter().map(|t| t.ts_ns).collect()
    }

    #[test]
    fn each_timing_is_read_once_with_its_cpu_and_process() {
        let (rings, kernel) = rings(2, 3);
        let mut cursors = rings.cursors();
        kernel.record(0, 10);
        kernel.record(1, 20);
        kernel.record(0, 30);
        let mut out = Vec::new();
        assert_eq!(rings.read_new(&mut cursors, &mut out), 0);
        assert_eq!(times(&out), [10, 30, 20]);
        assert_eq!((out[2].cpu, out[2].tid, out[2].tgid), (1, 101, 7));
        assert_eq!(out[1].duration_ns, 3);
        out.clear();
        assert_eq!(rings.read_new(&mut cursors, &mut out), 0);
        assert!(out.is_empty());
        kernel.record(1, 40);
        rings.read_new(&mut cursors, &mut out);
        assert_eq!(times(&out), [40]);
    }

    #[test]
    fn a_reader_a_ring_behind_gets_what_is_left_and_counts_the_rest() {
        let (rings, kernel) = rings(1, 3);
        let mut cursors = rings.cursors();
        for ts in 1..=11 {
            kernel.record(0, ts);
        }
        let mut out = Vec::new();
        // 8 slots: the first 3 of 11 were overwritten.
        assert_eq!(rings.read_new(&mut cursors, &mut out), 3);
        assert_eq!(times(&out), (4..=11).collect::<Vec<_>>());
    }

    #[test]
    fn reading_back_gives_what_the_cursors_passed_since_a_time() {
        let (rings, kernel) = rings(2, 3);
        let mut cursors = rings.cursors();
        for ts in [10, 20, 30, 40] {
            kernel.record(0, ts);
        }
        kernel.record(1, 25);
        let mut out = Vec::new();
        rings.read_new(&mut cursors, &mut out);
        // Written after the last read: the next read_new's, not the read-back's.
        kernel.record(0, 50);
        let mut back = Vec::new();
        let read = rings.read_back(&cursors, 20, &mut back);
        assert_eq!(times(&back), [20, 30, 40, 25]);
        assert_eq!(
            read,
            ReadBack {
                timings: 4,
                complete_from_ns: None
            }
        );
    }

    #[test]
    fn reading_back_past_what_a_ring_still_holds_says_it_is_truncated() {
        let (rings, kernel) = rings(1, 2);
        let mut cursors = rings.cursors();
        for ts in [10, 20, 30, 40, 50, 60] {
            kernel.record(0, ts);
        }
        rings.read_new(&mut cursors, &mut Vec::new());
        let mut back = Vec::new();
        // 4 slots: 10 and 20 are gone.
        assert_eq!(
            rings.read_back(&cursors, 15, &mut back).complete_from_ns,
            Some(30)
        );
        assert_eq!(times(&back), [30, 40, 50, 60]);
        back.clear();
        assert_eq!(
            rings.read_back(&cursors, 30, &mut back).complete_from_ns,
            None
        );
        assert_eq!(times(&back), [30, 40, 50, 60]);
    }

    #[test]
    fn rings_take_the_budget_within_bounds() {
        assert_eq!(ring_bits(1), MAX_RING_BITS);
        assert_eq!(ring_bits(2), MAX_RING_BITS);
        // 192 MiB / 24 B / 64 = 131,072.
        assert_eq!(ring_bits(64), 17);
        assert_eq!(ring_bits(4096), MIN_RING_BITS);
    }
}
