//! The timer the agent sleeps on between drains: one kernel timer (`timerfd`), which wakes the
//! agent once, at the time asked.
//!
//! tokio's timers wake the runtime twice for a deadline more than 64 ms away: its wheel keeps
//! such a deadline in a coarser level, and wakes at the start of the deadline's slot there to
//! move it down, then again at the deadline. Between drains 200 ms apart, `strace` of the agent
//! showed exactly that pair, a 136–200 ms wait then a 0–64 ms one. On a CPU the agent shares
//! with the target or its load, each wakeup costs them the agent's switch in and out (~0.1 ms on
//! the benchmark's VM), so the extra one was half of what the agent cost them between drains.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

pub struct WakeupTimer {
    fd: AsyncFd<OwnedFd>,
}

impl WakeupTimer {
    /// Needs a tokio runtime with I/O enabled.
    pub fn new() -> io::Result<WakeupTimer> {
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just created, owned by nothing else; the OwnedFd keeps it open
        // for as long as the AsyncFd that owns it lives.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(WakeupTimer { fd })
    }

    /// Completes `after` from now. Setting the timer replaces any earlier setting, and with it
    /// an expiry that a sleep dropped before completing left unread.
    pub async fn sleep(&self, after: Duration) -> io::Result<()> {
        // A zero it_value would disarm the timer: the shortest wait is 1 ns.
        let after = after.max(Duration::from_nanos(1));
        let setting = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        let fd = self.fd.get_ref().as_raw_fd();
        if unsafe { libc::timerfd_settime(fd, 0, &setting, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = 0u64;
            let read = unsafe {
                libc::read(
                    fd,
                    &mut expirations as *mut u64 as *mut libc::c_void,
                    std::mem::size_of::<u64>(),
                )
            };
            if read == std::mem::size_of::<u64>() as isize {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::WouldBlock {
                return Err(error);
            }
            // Readiness left from an expiry that the setting above cleared.
            ready.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_as_long_as_asked_and_a_dropped_sleep_does_not_end_the_next_early() {
        let timer = WakeupTimer::new().unwrap();
        let started = Instant::now();
        timer.sleep(Duration::from_millis(30)).await.unwrap();
        let slept = started.elapsed();
        assert!(slept >= Duration::from_millis(30), "{slept:?}");

        // A sleep abandoned before its end, whose expiry then passes unread.
        let abandoned = tokio::time::timeout(
            Duration::from_millis(1),
            timer.sleep(Duration::from_millis(5)),
        )
        .await;
        assert!(abandoned.is_err(), "a 5 ms sleep ended within 1 ms");
        std::thread::sleep(Duration::from_millis(10));
        let started = Instant::now();
        timer.sleep(Duration::from_millis(40)).await.unwrap();
        let slept = started.elapsed();
        assert!(slept >= Duration::from_millis(40), "{slept:?}");
    }
}
