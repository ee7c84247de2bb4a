//! The agent's view of the kernel's table of thread states (`THREADS`), mapped into its memory.
//!
//! Only the hook flavours that walk stacks as a thread leaves the CPU need it: the stack ids a
//! thread holds until it returns must not be freed meanwhile. The table has far more slots than
//! a target has threads, so the agent looks up the target's live threads in their two slots
//! each rather than scanning it.

use std::collections::BTreeSet;

use probe_common::{thread_slots, ThreadState, THREAD_SLOTS};

use crate::events::stack_id;

pub struct ThreadTable {
    slots: *const ThreadState,
    /// Keeps the memory `slots` points into alive; `None` when it points into a test's vector.
    _memory: Option<memmap2::Mmap>,
}

// SAFETY: the pointer refers to a mapping the struct owns, read only with volatile loads.
unsafe impl Send for ThreadTable {}

impl ThreadTable {
    /// Maps the kernel's `THREADS` array (`THREAD_SLOTS` states).
    pub fn map(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len = THREAD_SLOTS as usize * std::mem::size_of::<ThreadState>();
        // SAFETY: the kernel keeps the pages for as long as the mapping lives; they are only
        // read, with volatile loads of plain integers.
        let memory = unsafe { memmap2::MmapOptions::new().len(len).map(fd.as_raw_fd())? };
        Ok(ThreadTable {
            slots: memory.as_ptr() as *const ThreadState,
            _memory: Some(memory),
        })
    }

    /// The state the kernel keeps for `tid`, if one of its slots holds it. A copy of a slot the
    /// kernel may be writing: a torn read can only hold a stack id a little longer.
    pub fn get(&self, tid: u32) -> Option<ThreadState> {
        thread_slots(tid).into_iter().find_map(|index| {
            // SAFETY: `thread_slots` stays below THREAD_SLOTS, the length of the mapping.
            let state = unsafe { std::ptr::read_volatile(self.slots.add(index as usize)) };
            (state.tid == tid).then_some(state)
        })
    }

    /// The stack ids that any of `tids` holds.
    pub fn held_stack_ids(&self, tids: impl IntoIterator<Item = u32>) -> BTreeSet<u32> {
        tids.into_iter()
            .filter_map(|tid| self.get(tid))
            .flat_map(|thread| [thread.kernel_stack_id, thread.user_stack_id])
            .filter_map(stack_id)
            .collect()
    }

    /// A table over `slots` (THREAD_SLOTS long), for tests.
    #[cfg(test)]
    fn over(slots: &[ThreadState]) -> Self {
        assert_eq!(slots.len(), THREAD_SLOTS as usize);
        ThreadTable {
            slots: slots.as_ptr(),
            _memory: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::NO_STACK;

    fn holding(tid: u32, kernel: i32, user: i32) -> ThreadState {
        ThreadState {
            tid,
            kernel_stack_id: kernel,
            user_stack_id: user,
            ..ThreadState::default()
        }
    }

    #[test]
    fn a_thread_is_found_in_either_of_its_slots_and_only_there() {
        let mut slots = vec![ThreadState::default(); THREAD_SLOTS as usize];
        let [first, _] = thread_slots(42);
        slots[first as usize] = holding(42, 7, 8);
        // 42 + THREAD_SLOTS shares 42's first slot, so it lives in its second.
        let neighbour = 42 + THREAD_SLOTS;
        let [shared, second] = thread_slots(neighbour);
        assert_eq!(shared, first);
        slots[second as usize] = holding(neighbour, 9, NO_STACK);
        let table = ThreadTable::over(&slots);
        assert_eq!(table.get(42).map(|t| t.user_stack_id), Some(8));
        assert_eq!(table.get(neighbour).map(|t| t.kernel_stack_id), Some(9));
        // A tid whose slots hold other threads has no state.
        assert_eq!(table.get(43), None);
        assert_eq!(
            table.held_stack_ids([42, neighbour, 43]),
            BTreeSet::from([7, 8, 9])
        );
    }
}
