//! The trigger's P99 from the kernel's own histograms: each CPU counts every request latency of
//! the watched kind into a histogram per slice of time (a tenth of the window or less), and the agent
//! sums the window's slices from its mapping of them.
//!
//! Before, the agent read each request (from the ring buffer, then from the timing rings) and
//! recorded it into histograms of its own: under 120k requests/s that was most of its CPU, and
//! its drains, on the load generator's CPU, delayed the requests in flight there. Now a check
//! reads ~20k counters, whatever the request rate.

use hdrhistogram::Histogram;
use probe_common::{latency_bucket_start, LatencySlice, LATENCY_BUCKETS, LATENCY_SLICES_PER_CPU};

use crate::histogram::Percentiles;

/// The slice length for a trigger window of `window_ns`, as a power of two (ns): the largest
/// that is at most a tenth of the window, so a window spans 10 to 20 slices (and part of one
/// more), within the `LATENCY_SLICES_PER_CPU` the kernel keeps.
pub fn slice_shift(window_ns: u64) -> u32 {
    (window_ns / 10).max(1).ilog2()
}

/// Every CPU's slices, wherever they live (the kernel's mapping, or a test's vector).
pub struct LatencySlices {
    slices: *const LatencySlice,
    cpus: usize,
    slice_shift: u32,
    window_ns: u64,
    /// Reused by each read: the window's counts, bucket by bucket.
    sums: Vec<u64>,
    /// One slice's counts, as read.
    scratch: Vec<u64>,
    /// Reused by each read: the sums as a histogram, for their percentiles.
    histogram: Histogram<u64>,
    _memory: Option<memmap2::Mmap>,
}

// SAFETY: the pointer refers to a mapping the struct owns, read only with volatile loads.
unsafe impl Send for LatencySlices {}

impl LatencySlices {
    /// Maps the kernel's `LATENCY_SLICES` map (`fd`), sized for `possible_cpus`.
    pub fn map(
        fd: std::os::fd::BorrowedFd<'_>,
        possible_cpus: usize,
        window_ns: u64,
    ) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len =
            possible_cpus * LATENCY_SLICES_PER_CPU as usize * std::mem::size_of::<LatencySlice>();
        // SAFETY: the kernel keeps the pages for as long as the mapping lives; they are only
        // read, with volatile loads of plain integers.
        let memory = unsafe { memmap2::MmapOptions::new().len(len).map(fd.as_raw_fd()) }?;
        Ok(LatencySlices {
            slices: memory.as_ptr() as *const LatencySlice,
            cpus: possible_cpus,
            slice_shift: slice_shift(window_ns),
            window_ns,
            sums: vec![0; LATENCY_BUCKETS],
            scratch: vec![0; LATENCY_BUCKETS],
            histogram: bucket_histogram(),
            _memory: Some(memory),
        })
    }

    fn slice_number(&self, ns: u64) -> u64 {
        (ns >> self.slice_shift) + 1
    }

    /// Adds the counts of `cpu`'s histogram of slice `number` to the sums, if the kernel still
    /// holds that slice there.
    fn add_slice(&mut self, cpu: usize, number: u64) {
        let index = cpu * LATENCY_SLICES_PER_CPU as usize
            + (number % LATENCY_SLICES_PER_CPU as u64) as usize;
        // SAFETY: in bounds: `cpu` is below `cpus` and the slot below the slices per CPU.
        let slice = unsafe { self.slices.add(index) };
        let held = || unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*slice).slice)) };
        if held() != number {
            return;
        }
        for (bucket, read) in self.scratch.iter_mut().enumerate() {
            // SAFETY: as above; a count the kernel is adding to reads as before or after.
            *read = unsafe {
                std::ptr::read_volatile(std::ptr::addr_of!((*slice).buckets[bucket])) as u64
            };
        }
        // Reused for a newer slice while we read (the agent stalled for seconds): not ours.
        if held() == number {
            for (sum, read) in self.sums.iter_mut().zip(&self.scratch) {
                *sum += read;
            }
        }
    }

    /// Percentiles of the requests that ended in the window up to `now_ns`, to within a
    /// bucket (1/16 of the value): whole slices, the oldest one partly before the window, as
    /// the agent's own sliding histogram did.
    pub fn percentiles(&mut self, now_ns: u64) -> Percentiles {
        self.sums.iter_mut().for_each(|sum| *sum = 0);
        let newest = self.slice_number(now_ns);
        let oldest = self.slice_number(now_ns.saturating_sub(self.window_ns));
        for cpu in 0..self.cpus {
            for number in oldest..=newest {
                self.add_slice(cpu, number);
            }
        }
        percentiles_of_buckets(&self.sums, &mut self.histogram)
    }
}

/// A histogram for [`percentiles_of_buckets`]: made once, as a fresh one each check would
/// allocate and clear ~60 KB ten times a second.
pub fn bucket_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, u64::MAX / 2, 2).expect("valid bounds")
}

/// Percentiles of bucket counts, each bucket standing at its middle; `histogram` (from
/// [`bucket_histogram`]) is cleared and reused.
pub fn percentiles_of_buckets(counts: &[u64], histogram: &mut Histogram<u64>) -> Percentiles {
    histogram.reset();
    for (index, &count) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
        let start = latency_bucket_start(index);
        let end = if index + 1 < LATENCY_BUCKETS {
            latency_bucket_start(index + 1)
        } else {
            u64::MAX
        };
        let middle = start + (end - start) / 2;
        histogram.saturating_record_n(middle.clamp(1, u64::MAX / 2), count);
    }
    Percentiles::of(histogram)
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::latency_bucket;

    /// Slices in a leaked vector, filled the way the kernel fills them.
    fn slices(cpus: usize, window_ns: u64) -> (LatencySlices, *mut LatencySlice) {
        let empty = LatencySlice {
            slice: 0,
            buckets: [0; LATENCY_BUCKETS],
            total: 0,
            over_watch_mark: 0,
            woke: 0,
            _pad: 0,
        };
        let memory =
            Box::leak(vec![empty; cpus * LATENCY_SLICES_PER_CPU as usize].into_boxed_slice())
                .as_mut_ptr();
        (
            LatencySlices {
                slices: memory,
                cpus,
                slice_shift: slice_shift(window_ns),
                window_ns,
                sums: vec![0; LATENCY_BUCKETS],
                scratch: vec![0; LATENCY_BUCKETS],
                histogram: bucket_histogram(),
                _memory: None,
            },
            memory,
        )
    }

    fn count(memory: *mut LatencySlice, cpu: usize, shift: u32, ended_ns: u64, latency: u64) {
        let slice = (ended_ns >> shift) + 1;
        let index = cpu * LATENCY_SLICES_PER_CPU as usize
            + (slice % LATENCY_SLICES_PER_CPU as u64) as usize;
        let histogram = unsafe { &mut *memory.add(index) };
        if histogram.slice > slice {
            return;
        }
        if histogram.slice < slice {
            histogram.buckets = [0; LATENCY_BUCKETS];
            histogram.slice = slice;
        }
        histogram.buckets[latency_bucket(latency)] += 1;
    }

    #[test]
    fn the_window_sums_every_cpu_and_drops_what_fell_out() {
        let window = 1_000_000_000;
        let (mut sliced, memory) = slices(2, window);
        let shift = slice_shift(window);
        // 0.5 s: 990 fast requests on CPU 0, 10 slow ones on CPU 1.
        for i in 0..990 {
            count(memory, 0, shift, 500_000_000 + i, 100_000);
        }
        for i in 0..10 {
            count(memory, 1, shift, 500_000_000 + i, 50_000_000);
        }
        let p = sliced.percentiles(600_000_000);
        assert_eq!(p.count, 1_000);
        assert!(p.p50_ns.abs_diff(100_000) <= 100_000 / 16, "{p:?}");
        assert!(p.p999_ns.abs_diff(50_000_000) <= 50_000_000 / 16, "{p:?}");
        // 2 s later only the newer requests count.
        for i in 0..100 {
            count(memory, 1, shift, 2_500_000_000 + i, 7_000);
        }
        let p = sliced.percentiles(2_600_000_000);
        assert_eq!(p.count, 100);
        assert!(p.p99_ns.abs_diff(7_000) <= 7_000 / 16, "{p:?}");
    }

    #[test]
    fn a_window_spans_ten_to_twenty_slices() {
        for window in [1_000_000u64, 1_000_000_000, 1_500_000_000, 60_000_000_000] {
            let slices = window >> slice_shift(window);
            assert!((10..=20).contains(&slices), "{window}: {slices}");
            assert!(slices + 2 < LATENCY_SLICES_PER_CPU as u64);
        }
    }

    #[test]
    fn a_slice_reused_for_a_newer_time_is_not_read_as_the_old_one() {
        let window = 1_000_000_000;
        let (mut sliced, memory) = slices(1, window);
        let shift = slice_shift(window);
        let slice = 1u64 << shift;
        count(memory, 0, shift, 0, 1_000);
        // 32 slices later the same histogram holds the new slice.
        count(memory, 0, shift, 32 * slice, 9_000);
        assert_eq!(sliced.percentiles(slice / 2).count, 0);
        assert_eq!(sliced.percentiles(32 * slice).count, 1);
        // A request that ended before the histogram's slice is too late to count.
        count(memory, 0, shift, 0, 1_000);
        assert_eq!(sliced.percentiles(32 * slice).count, 1);
    }

    #[test]
    fn bucket_percentiles_stand_at_each_bucket_middle() {
        let mut counts = vec![0u64; LATENCY_BUCKETS];
        counts[latency_bucket(1_000)] = 99;
        counts[latency_bucket(1_000_000)] = 1;
        let mut histogram = bucket_histogram();
        let p = percentiles_of_buckets(&counts, &mut histogram);
        assert_eq!(p.count, 100);
        assert!(p.p50_ns.abs_diff(1_000) <= 1_000 / 16, "{p:?}");
        assert!(p.max_ns.abs_diff(1_000_000) <= 1_000_000 / 16, "{p:?}");
        // Reused: nothing of the last counts remains.
        assert_eq!(
            percentiles_of_buckets(&vec![0; LATENCY_BUCKETS], &mut histogram).count,
            0
        );
    }
}
