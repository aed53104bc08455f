//! The minimal handler: the yardstick snapfault is measured against.
//!
//! One thread, the way the simplest working uffd handler is written:
//! `ppoll` on the userfaultfd and the VM's pidfd, `read` one message,
//! answer a fault with one `UFFDIO_COPY` of the page from the hot memory
//! file's mapping, and loop. A REMOVE is only read (which is what releases
//! the `madvise` caller); no page state is kept, so a removed page that
//! faults again would get snapshot bytes: the bench never touches one.
//! With `bulk`, it first copies every region in 2 MiB `UFFDIO_COPY`s and
//! times that: the raw install rate.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::stats::Counts;
use crate::region::RegionSpec;
use crate::sys::mem::HUGE_2M;
use crate::sys::poll::{PollFd, READABLE, poll};
use crate::sys::proc::PidFd;
use crate::sys::uffd::{Event, EventBuf, Outcome, Uffd};

/// What the handler did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Served {
    /// Page faults answered.
    pub faults: u64,
    /// REMOVE events read.
    pub removes: u64,
    /// Time of the bulk copy, if one was asked for.
    pub bulk: Option<Duration>,
    /// The handler thread's kernel counters over its whole run.
    pub counts: Counts,
}

/// Serves `uffd` from `file` (the memory file's bytes) until the VM
/// process behind `pidfd` exits. With `bulk`, every region is copied
/// first and the time it took sent there.
pub fn serve(
    uffd: &Uffd,
    regions: &[RegionSpec],
    file: &[u8],
    pidfd: &PidFd,
    bulk: Option<&Sender<Duration>>,
) -> Result<Served, String> {
    let before = Counts::this_thread();
    let mut served = Served::default();
    if let Some(done) = bulk {
        let start = Instant::now();
        for r in regions {
            for at in (0..r.size).step_by(HUGE_2M) {
                let len = (r.size - at).min(HUGE_2M as u64);
                let src = source(file, r.offset + at, len)?;
                install(uffd, r.base + at, src, &mut VecDeque::new())?;
            }
        }
        let took = start.elapsed();
        served.bulk = Some(took);
        let _ = done.send(took);
    }
    let mut buf = EventBuf::new(1);
    let mut read = Vec::with_capacity(1);
    let mut queue: VecDeque<Event> = VecDeque::new();
    loop {
        if queue.is_empty() {
            let mut fds = [
                PollFd::new(uffd.as_fd(), READABLE),
                PollFd::new(pidfd.as_fd(), READABLE),
            ];
            poll(&mut fds, None).map_err(|e| format!("ppoll: {e}"))?;
            if fds[1].ready() {
                break;
            }
            uffd.read_events(&mut buf, &mut read)
                .map_err(|e| e.to_string())?;
            queue.extend(read.drain(..));
        }
        let Some(event) = queue.pop_front() else {
            continue;
        };
        match event {
            Event::Pagefault { addr, .. } => {
                served.faults += 1;
                let r = regions
                    .iter()
                    .find(|r| addr >= r.base && addr < r.base + r.size)
                    .ok_or_else(|| format!("fault at {addr:#x} outside every region"))?;
                let page = addr & !(r.page_size - 1);
                let src = source(file, r.offset + (page - r.base), r.page_size)?;
                install(uffd, page, src, &mut queue)?;
            }
            Event::Remove { .. } => served.removes += 1,
            other => return Err(format!("unexpected event {other:?}")),
        }
    }
    served.counts = Counts::this_thread().since(&before);
    Ok(served)
}

fn source(file: &[u8], offset: u64, len: u64) -> Result<&[u8], String> {
    let start = offset as usize;
    file.get(start..start + len as usize)
        .ok_or_else(|| format!("{len} bytes at {offset:#x} are past the memory file"))
}

/// One `UFFDIO_COPY`; a duplicate fault gets a wake. `EAGAIN` means a
/// REMOVE is queued unread: it is read (into `queue`, after the events
/// already there) and the copy tried again, from where it stopped.
fn install(uffd: &Uffd, dst: u64, src: &[u8], queue: &mut VecDeque<Event>) -> Result<(), String> {
    let mut done = 0usize;
    let mut buf = EventBuf::new(16);
    let mut read = Vec::new();
    while done < src.len() {
        let outcome = uffd
            .copy(dst + done as u64, &src[done..], true, false)
            .map_err(|e| e.to_string())?;
        match outcome {
            Outcome::Done | Outcome::Gone => return Ok(()),
            Outcome::Exists { .. } => {
                uffd.wake(dst, src.len() as u64)
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            Outcome::Again { done: more } => {
                done += more as usize;
                uffd.read_events(&mut buf, &mut read)
                    .map_err(|e| e.to_string())?;
                queue.extend(read.drain(..));
            }
        }
    }
    Ok(())
}
