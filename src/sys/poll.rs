//! `ppoll` with a nanosecond timeout.
//!
//! `epoll_wait` counts its timeout in milliseconds, too coarse for the
//! tens-of-microseconds backoff of a deferred install; `ppoll` takes a
//! `timespec`. The serve loop watches at most four descriptors, where
//! `ppoll` costs the same as epoll.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use super::cvt;

/// Readable (`POLLIN`).
pub const READABLE: i16 = libc::POLLIN;
/// Hung up or in error (always reported).
pub const HANGUP: i16 = libc::POLLHUP | libc::POLLERR;

/// One descriptor to watch.
#[repr(transparent)]
#[derive(Debug, Clone, Copy)]
pub struct PollFd(libc::pollfd);

impl PollFd {
    /// Watches `fd` for `events`.
    pub fn new(fd: BorrowedFd<'_>, events: i16) -> PollFd {
        PollFd(libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        })
    }

    /// Whether any watched condition (or hang-up) was reported.
    pub fn ready(&self) -> bool {
        self.0.revents != 0
    }

    /// The reported events.
    pub fn revents(&self) -> i16 {
        self.0.revents
    }
}

/// Waits until a descriptor is ready or `timeout` passes (`None`: forever).
/// Returns how many are ready; `EINTR` counts as zero.
pub fn poll(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `PollFd` is a transparent `pollfd`; the slice is live and
    // exclusively borrowed, and `ts_ptr` is null or points at `ts`.
    let ret = unsafe {
        libc::ppoll(
            fds.as_mut_ptr().cast(),
            fds.len() as libc::nfds_t,
            ts_ptr,
            std::ptr::null(),
        )
    };
    match cvt(ret) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(0),
        Err(e) => Err(e),
    }
}
