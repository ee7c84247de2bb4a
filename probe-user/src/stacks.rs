//! Stacks held by the agent rather than the kernel.
//!
//! The kernel's stack map is a fixed-size table with one stack per bucket and no chaining: a
//! stack whose hash lands in a bucket another stack holds is lost (`bpf_get_stackid` fails with
//! EEXIST), and overwriting (`BPF_F_REUSE_STACKID`) would silently change what ids already in
//! flight mean. The more stacks the table holds, the more new ones collide. So the agent copies
//! each stack out the first time it drains an event naming it, renames the event's stack ids to
//! ids of its own, and frees the kernel's entry once the stack has not recurred for a short
//! while. Only the stacks of the last fraction of a second occupy the table, however long the
//! flight recorder or recording keeps their events.
//!
//! The store also makes stacks the kernel did not walk: an on-CPU sample at the calm rate keeps
//! only the kernel address it interrupted (`ProbeConfig::kernel_stack_max_period_ns`), which
//! becomes the stack `[address, KERNEL_NOT_WALKED]`, so every reader downstream sees a kernel
//! stack like any other, with a root frame that says what is missing.
//!
//! And it fills in the stacks of off-CPU intervals the kernel reported as repeats
//! (`FLAG_STACKS_REPEATED`): the thread blocked where its last walked interval did, so they are
//! that interval's stacks, which the store keeps for each thread.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use probe_common::{EventKind, RawEvent, FLAG_STACKS_REPEATED, NO_STACK};

use crate::events::stack_id;

/// The root frame of a kernel stack the kernel did not walk: an address no code has, which
/// the symbolizer names for what it stands for.
pub const KERNEL_NOT_WALKED: u64 = u64::MAX;

/// Largest id the store hands out: events carry stack ids as `i32`, negative meaning none.
const MAX_ID: u32 = i32::MAX as u32;

#[derive(Default)]
pub struct StackStore {
    frames: HashMap<u32, Arc<[u64]>>,
    ids: HashMap<Arc<[u64]>, u32>,
    next_id: u32,
    /// Kernel stack ids copied out and still in the kernel's map.
    copied: HashMap<u32, Copied>,
    /// Kernel ids freed by the latest release, with the stack they held. An event can name one
    /// after all: it was written between the drain before the release and the kernel's delete.
    /// If the kernel's entry is still empty when that event is drained, nothing has been
    /// stored under the id since, so this is its stack.
    just_released: HashMap<u32, u32>,
    /// Releases done so far; stamps when a kernel id was last named.
    releases: u64,
    /// Stack ids an event named that the kernel no longer held, and repeated off-CPU intervals
    /// with no walked interval to repeat: those stacks are lost.
    pub unreadable: u64,
    /// Each thread's last walked off-CPU stacks (the store's ids, kernel and user), which the
    /// kernel's repeats of it stand for.
    last_walked: HashMap<u32, (i32, i32)>,
}

struct Copied {
    id: u32,
    last_named: u64,
}

impl StackStore {
    /// Replaces the kernel's stack ids in `event` by the store's. A kernel id not copied yet is
    /// read with `read_kernel` (its frames, or `None` when the kernel no longer has it). An
    /// on-CPU sample's interrupted kernel address, where it carries one instead of a kernel
    /// stack, becomes a stack of the store's.
    pub fn adopt(
        &mut self,
        event: &mut RawEvent,
        mut read_kernel: impl FnMut(u32) -> Option<Vec<u64>>,
    ) {
        event.kernel_stack_id = self.adopt_id(event.kernel_stack_id, &mut read_kernel);
        event.user_stack_id = self.adopt_id(event.user_stack_id, &mut read_kernel);
        if event.kind == EventKind::OffCpu as u32 {
            self.fill_in_repeat(event);
        }
        if event.kind == EventKind::OnCpuSample as u32 && event.wait_ns != 0 {
            if event.kernel_stack_id == NO_STACK {
                event.kernel_stack_id = self.intern(vec![event.wait_ns, KERNEL_NOT_WALKED]) as i32;
            }
            event.wait_ns = 0;
        }
    }

    /// Gives a repeated off-CPU interval its thread's last walked stacks, or remembers a walked
    /// interval's. The flag stays: readers may tell repeats from walks.
    fn fill_in_repeat(&mut self, event: &mut RawEvent) {
        if event.flags & FLAG_STACKS_REPEATED != 0 {
            match self.last_walked.get(&event.tid) {
                Some(&(kernel, user)) => {
                    event.kernel_stack_id = kernel;
                    event.user_stack_id = user;
                }
                None => self.unreadable += 1,
            }
        } else if event.kernel_stack_id != NO_STACK && event.user_stack_id != NO_STACK {
            self.last_walked
                .insert(event.tid, (event.kernel_stack_id, event.user_stack_id));
        } else {
            // The kernel repeats only walks that gave both stacks; one lost here must not be
            // stood in for by an older one.
            self.last_walked.remove(&event.tid);
        }
    }

    /// Forgets the last walked stacks of threads that are not `live`: they have exited.
    pub fn retain_threads(&mut self, live: impl Fn(u32) -> bool) {
        self.last_walked.retain(|&tid, _| live(tid));
    }

    fn adopt_id(
        &mut self,
        kernel_id: i32,
        read_kernel: &mut impl FnMut(u32) -> Option<Vec<u64>>,
    ) -> i32 {
        let Some(kernel_id) = stack_id(kernel_id) else {
            return NO_STACK;
        };
        if let Some(copied) = self.copied.get_mut(&kernel_id) {
            copied.last_named = self.releases;
            return copied.id as i32;
        }
        let Some(frames) = read_kernel(kernel_id) else {
            if let Some(&id) = self.just_released.get(&kernel_id) {
                return id as i32;
            }
            self.unreadable += 1;
            return NO_STACK;
        };
        let id = self.intern(frames);
        self.copied.insert(
            kernel_id,
            Copied {
                id,
                last_named: self.releases,
            },
        );
        id as i32
    }

    fn intern(&mut self, frames: Vec<u64>) -> u32 {
        let frames: Arc<[u64]> = frames.into();
        if let Some(&id) = self.ids.get(&frames) {
            return id;
        }
        // Ids are reused only after 2^31 new stacks, and never while in use.
        while self.frames.contains_key(&self.next_id) {
            self.next_id = (self.next_id + 1) % (MAX_ID + 1);
        }
        let id = self.next_id;
        self.next_id = (self.next_id + 1) % (MAX_ID + 1);
        self.frames.insert(id, frames.clone());
        self.ids.insert(frames, id);
        id
    }

    /// The kernel ids to free now, forgotten here: copied, not named since the previous
    /// release, and not `held` (by a thread whose interval has not ended, whose event will name
    /// it later). The caller must have drained the kernel's events just before, so that no
    /// event naming a returned id is still on its way.
    pub fn release(&mut self, held: &BTreeSet<u32>) -> Vec<u32> {
        let since = self.releases;
        self.releases += 1;
        let free: Vec<u32> = self
            .copied
            .iter()
            .filter(|(kernel_id, copied)| copied.last_named < since && !held.contains(kernel_id))
            .map(|(&kernel_id, _)| kernel_id)
            .collect();
        self.just_released = free
            .iter()
            .filter_map(|kernel_id| Some((*kernel_id, self.copied.remove(kernel_id)?.id)))
            .collect();
        free
    }

    /// How many kernel stack entries are copied and not released yet.
    pub fn in_kernel(&self) -> usize {
        self.copied.len()
    }

    /// Whether the kernel id's stack has been copied and its entry not released.
    pub fn is_copied(&self, kernel_id: u32) -> bool {
        self.copied.contains_key(&kernel_id)
    }

    /// Forgets the stacks that neither the `live` ids (those events still held name) nor a
    /// kernel id (copied or just released) refer to; returns how many.
    pub fn prune(&mut self, live: impl Iterator<Item = u32>) -> usize {
        let mut referenced: BTreeSet<u32> = self.copied.values().map(|c| c.id).collect();
        referenced.extend(self.just_released.values());
        referenced.extend(live);
        for &(kernel, user) in self.last_walked.values() {
            referenced.extend([kernel as u32, user as u32]);
        }
        let before = self.frames.len();
        self.frames.retain(|id, _| referenced.contains(id));
        self.ids.retain(|_, id| referenced.contains(id));
        before - self.frames.len()
    }

    /// The frames (innermost first) of a stack id the store handed out.
    pub fn frames(&self, id: u32) -> Option<&[u64]> {
        self.frames.get(&id).map(|f| &f[..])
    }

    /// Every id the store holds a stack under.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.frames.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::stacks_named;

    #[test]
    fn a_sample_without_a_kernel_walk_gets_its_address_and_the_marker_as_kernel_stack() {
        let mut store = StackStore::default();
        let sample = |kernel: i32, address: u64| {
            let mut e = event(kernel, 3);
            e.kind = EventKind::OnCpuSample as u32;
            e.wait_ns = address;
            e
        };
        let read = |id: u32| Some(vec![0x1000 + id as u64]);
        let mut calm = sample(NO_STACK, 0xffff_ffff_8100_0000);
        let mut again = calm;
        store.adopt(&mut calm, read);
        store.adopt(&mut again, read);
        assert_eq!(
            calm.wait_ns, 0,
            "the address is not left for readers of wait_ns"
        );
        assert_eq!(calm.kernel_stack_id, again.kernel_stack_id);
        assert_eq!(
            store.frames(calm.kernel_stack_id as u32),
            Some(&[0xffff_ffff_8100_0000, KERNEL_NOT_WALKED][..])
        );
        assert_eq!(store.frames(calm.user_stack_id as u32), Some(&[0x1003][..]));

        // A sample in user mode carries no address and gets no kernel stack.
        let mut in_user = sample(NO_STACK, 0);
        store.adopt(&mut in_user, read);
        assert_eq!(in_user.kernel_stack_id, NO_STACK);
        // Off-CPU intervals' wait_ns is a time, never an address.
        let mut off_cpu = event(NO_STACK, 3);
        off_cpu.kind = EventKind::OffCpu as u32;
        off_cpu.wait_ns = 5_000;
        store.adopt(&mut off_cpu, read);
        assert_eq!(
            (off_cpu.kernel_stack_id, off_cpu.wait_ns),
            (NO_STACK, 5_000)
        );
    }

    fn off_cpu(tid: u32, kernel: i32, user: i32, repeated: bool) -> RawEvent {
        let mut e = event(kernel, user);
        e.kind = EventKind::OffCpu as u32;
        e.tid = tid;
        e.flags = if repeated { FLAG_STACKS_REPEATED } else { 0 };
        e
    }

    #[test]
    fn a_repeated_off_cpu_interval_gets_its_threads_last_walked_stacks() {
        let mut store = StackStore::default();
        let read = |id: u32| Some(vec![0x1000 + id as u64]);
        let mut walked = off_cpu(10, 1, 2, false);
        let mut other_thread = off_cpu(11, 3, 4, false);
        store.adopt(&mut walked, read);
        store.adopt(&mut other_thread, read);
        let mut repeat = off_cpu(10, NO_STACK, NO_STACK, true);
        store.adopt(&mut repeat, read);
        assert_eq!(
            (repeat.kernel_stack_id, repeat.user_stack_id),
            (walked.kernel_stack_id, walked.user_stack_id)
        );
        assert_ne!(repeat.user_stack_id, other_thread.user_stack_id);
        assert_eq!(
            repeat.flags, FLAG_STACKS_REPEATED,
            "the flag stays for readers"
        );
        // Pruning keeps what the thread's next repeat will name, though no event holds it.
        store.prune(std::iter::empty());
        assert!(store.frames(repeat.user_stack_id as u32).is_some());
        assert_eq!(store.unreadable, 0);
    }

    #[test]
    fn a_repeat_with_no_walk_to_repeat_has_no_stacks_and_counts_as_lost() {
        let mut store = StackStore::default();
        let read = |id: u32| Some(vec![0x1000 + id as u64]);
        let mut never_walked = off_cpu(10, NO_STACK, NO_STACK, true);
        store.adopt(&mut never_walked, read);
        assert_eq!(never_walked.user_stack_id, NO_STACK);
        assert_eq!(store.unreadable, 1);
        // A walk whose user stack was lost is not stood in for by the walk before it.
        store.adopt(&mut off_cpu(10, 1, 2, false), read);
        store.adopt(&mut off_cpu(10, 1, NO_STACK, false), read);
        let mut repeat = off_cpu(10, NO_STACK, NO_STACK, true);
        store.adopt(&mut repeat, read);
        assert_eq!(repeat.user_stack_id, NO_STACK);
        assert_eq!(store.unreadable, 2);
        // Nor is an exited thread's.
        store.adopt(&mut off_cpu(12, 1, 2, false), read);
        store.retain_threads(|tid| tid == 10);
        let mut reused_tid = off_cpu(12, NO_STACK, NO_STACK, true);
        store.adopt(&mut reused_tid, read);
        assert_eq!(reused_tid.user_stack_id, NO_STACK);
    }

    fn event(kernel: i32, user: i32) -> RawEvent {
        let mut e = RawEvent::zeroed();
        e.kernel_stack_id = kernel;
        e.user_stack_id = user;
        e
    }

    /// A kernel map in miniature: id → frames, as the kernel holds it now.
    fn kernel(entries: &[(u32, &[u64])]) -> HashMap<u32, Vec<u64>> {
        entries.iter().map(|(id, f)| (*id, f.to_vec())).collect()
    }

    #[test]
    fn events_are_renamed_to_store_ids_whose_frames_outlive_the_kernel_entry() {
        let mut store = StackStore::default();
        let mut map = kernel(&[(7, &[1, 2, 3]), (9, &[4, 5])]);
        let mut e = event(7, 9);
        store.adopt(&mut e, |id| map.get(&id).cloned());
        let (k, u) = (e.kernel_stack_id as u32, e.user_stack_id as u32);
        assert_eq!(store.frames(k), Some(&[1, 2, 3][..]));
        assert_eq!(store.frames(u), Some(&[4, 5][..]));
        // Neither is named again: both are released, and the kernel may reuse id 7 for another
        // stack without changing what the adopted event means.
        assert!(store.release(&BTreeSet::new()).is_empty());
        let mut freed = store.release(&BTreeSet::new());
        freed.sort();
        assert_eq!(freed, vec![7, 9]);
        map.insert(7, vec![8, 8, 8]);
        let mut later = event(7, NO_STACK);
        store.adopt(&mut later, |id| map.get(&id).cloned());
        assert_eq!(
            store.frames(later.kernel_stack_id as u32),
            Some(&[8, 8, 8][..])
        );
        assert_eq!(store.frames(k), Some(&[1, 2, 3][..]));
        assert_eq!(later.user_stack_id, NO_STACK);
    }

    #[test]
    fn a_copied_id_is_read_from_the_kernel_once() {
        let mut store = StackStore::default();
        let mut reads = 0;
        for _ in 0..3 {
            let mut e = event(3, NO_STACK);
            store.adopt(&mut e, |_| {
                reads += 1;
                Some(vec![1])
            });
        }
        assert_eq!(reads, 1);
    }

    #[test]
    fn stacks_named_since_the_last_release_or_held_stay_in_the_kernel() {
        let mut store = StackStore::default();
        let read = |id: u32| Some(vec![id as u64]);
        store.adopt(&mut event(1, 2), read);
        store.release(&BTreeSet::new());
        // 1 recurs; 2 is held by a thread still off the CPU.
        store.adopt(&mut event(1, NO_STACK), read);
        assert!(store.release(&BTreeSet::from([2])).is_empty());
        store.adopt(&mut event(1, NO_STACK), read);
        assert_eq!(store.release(&BTreeSet::new()), vec![2]);
        assert!(store.is_copied(1));
        assert_eq!(store.release(&BTreeSet::new()), vec![1]);
        assert!(!store.is_copied(1));
    }

    #[test]
    fn identical_stacks_under_different_kernel_ids_share_one_store_id() {
        let mut store = StackStore::default();
        let (mut a, mut b) = (event(1, NO_STACK), event(2, NO_STACK));
        store.adopt(&mut a, |_| Some(vec![5, 6]));
        store.adopt(&mut b, |_| Some(vec![5, 6]));
        assert_eq!(a.kernel_stack_id, b.kernel_stack_id);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn an_event_written_just_before_its_stack_was_freed_keeps_it() {
        let mut store = StackStore::default();
        let mut first = event(6, NO_STACK);
        store.adopt(&mut first, |_| Some(vec![1, 2]));
        store.release(&BTreeSet::new());
        assert_eq!(store.release(&BTreeSet::new()), vec![6]);
        // The kernel's entry is gone; a straggler names it.
        let mut straggler = event(6, NO_STACK);
        store.adopt(&mut straggler, |_| None);
        assert_eq!(straggler.kernel_stack_id, first.kernel_stack_id);
        assert_eq!(store.unreadable, 0);
        // Not after the next release: by then every event written before the delete is drained.
        store.release(&BTreeSet::new());
        let mut late = event(6, NO_STACK);
        store.adopt(&mut late, |_| None);
        assert_eq!(late.kernel_stack_id, NO_STACK);
    }

    #[test]
    fn a_vanished_kernel_entry_is_a_missing_stack() {
        let mut store = StackStore::default();
        let mut e = event(4, 5);
        store.adopt(&mut e, |_| None);
        assert_eq!((e.kernel_stack_id, e.user_stack_id), (NO_STACK, NO_STACK));
        assert_eq!(store.unreadable, 2);
    }

    #[test]
    fn pruning_keeps_stacks_of_live_events_and_kernel_ids() {
        let mut store = StackStore::default();
        let (mut old, mut live) = (event(1, NO_STACK), event(2, NO_STACK));
        store.adopt(&mut old, |_| Some(vec![1]));
        store.adopt(&mut live, |_| Some(vec![2]));
        // Copied, released, then no longer a possible straggler's.
        for _ in 0..3 {
            store.release(&BTreeSet::new());
        }
        assert!(!store.is_empty());
        assert_eq!(store.prune(stacks_named(&live)), 1);
        assert_eq!(store.frames(old.kernel_stack_id as u32), None);
        assert_eq!(store.frames(live.kernel_stack_id as u32), Some(&[2][..]));

        let mut copied = event(3, NO_STACK);
        store.adopt(&mut copied, |_| Some(vec![3]));
        assert_eq!(store.prune(std::iter::empty()), 1);
        assert_eq!(store.frames(copied.kernel_stack_id as u32), Some(&[3][..]));
    }
}
