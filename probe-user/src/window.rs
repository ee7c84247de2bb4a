//! A time window over a recording, and how much of an interval falls inside it.

/// Half-open `[start_ns, end_ns)` on the events' clock (CLOCK_MONOTONIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Window {
    pub fn new(start_ns: u64, end_ns: u64) -> Self {
        Window { start_ns, end_ns }
    }

    /// A window given in offsets from the start of a recording; missing ends mean "all".
    pub fn from_offsets(
        recording_start_ns: u64,
        recording_end_ns: u64,
        from_ns: Option<u64>,
        to_ns: Option<u64>,
    ) -> Self {
        let start = recording_start_ns + from_ns.unwrap_or(0);
        let end = to_ns
            .map(|t| recording_start_ns + t)
            .unwrap_or(recording_end_ns)
            .max(start);
        Window::new(start, end)
    }

    pub fn contains(&self, ts_ns: u64) -> bool {
        (self.start_ns..self.end_ns).contains(&ts_ns)
    }

    /// Nanoseconds of the interval that ended at `end_ns` and lasted `duration_ns` that lie
    /// inside this window.
    pub fn overlap(&self, end_ns: u64, duration_ns: u64) -> u64 {
        let start = end_ns.saturating_sub(duration_ns).max(self.start_ns);
        let end = end_ns.min(self.end_ns);
        end.saturating_sub(start)
    }

    pub fn len_ns(&self) -> u64 {
        self.end_ns - self.start_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_clips_both_ends() {
        let w = Window::new(100, 200);
        assert_eq!(w.overlap(150, 20), 20); // fully inside
        assert_eq!(w.overlap(120, 50), 20); // starts before
        assert_eq!(w.overlap(250, 100), 50); // ends after
        assert_eq!(w.overlap(400, 100), 0); // after
        assert_eq!(w.overlap(90, 10), 0); // before
        assert_eq!(w.overlap(300, 250), 100); // spans
    }

    #[test]
    fn offsets_default_to_the_whole_recording() {
        let w = Window::from_offsets(1000, 5000, None, None);
        assert_eq!((w.start_ns, w.end_ns), (1000, 5000));
        let w = Window::from_offsets(1000, 5000, Some(500), Some(1500));
        assert_eq!((w.start_ns, w.end_ns), (1500, 2500));
        assert!(w.contains(1500) && !w.contains(2500));
        let inverted = Window::from_offsets(1000, 5000, Some(3000), Some(100));
        assert_eq!(inverted.len_ns(), 0);
    }
}
