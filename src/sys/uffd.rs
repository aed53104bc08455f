//! The userfaultfd ABI and a safe handle over it.
//!
//! # Design
//!
//! [`Uffd`] owns the descriptor. Every ioctl that installs or changes pages
//! returns an [`Outcome`] instead of a bare error, because three kernel
//! answers are part of normal serving and not failures:
//!
//! - `EEXIST`: the page is already present (a duplicate fault; the waiter
//!   still needs a wake).
//! - `EAGAIN`: a non-cooperative event (a REMOVE) is queued and unread, so
//!   the kernel refused the change or made part of it. The kernel will not
//!   report the fault again: the caller must keep it and retry.
//! - `ESRCH`: the process that owns the memory is exiting.
//!
//! The count fields of the kernel's structures are signed (`__s64`): a
//! positive value is bytes done, a negative one an errno. They are read as
//! `i64` and never cast to an unsigned count before their sign is checked.
//!
//! # Limitations
//!
//! Only the events a Firecracker handler can see are decoded in full
//! (page faults and REMOVE, plus UNMAP and REMAP for completeness); FORK
//! carries a new descriptor the server never asks for and is reported as
//! [`Event::Unknown`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::cvt;

/// `UFFD_API`, the only API version the kernel knows.
pub const API: u64 = 0xaa;

/// Feature bits of `uffdio_api.features` (`UFFD_FEATURE_*`).
pub mod feature {
    /// Write-protect faults carry `FLAG_WP`.
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// `UFFD_EVENT_REMOVE` on `madvise(MADV_DONTNEED/MADV_REMOVE)`.
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// Missing faults on hugetlbfs memory.
    pub const MISSING_HUGETLBFS: u64 = 1 << 4;
    /// Fault messages carry the faulting thread's id.
    pub const THREAD_ID: u64 = 1 << 8;
    /// Write protection on hugetlbfs and shmem.
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// Write protection also applies to pages never populated.
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    /// `UFFDIO_POISON`.
    pub const POISON: u64 = 1 << 14;
    /// Write protection resolved by the kernel itself.
    pub const WP_ASYNC: u64 = 1 << 15;
    /// `UFFDIO_MOVE`.
    pub const MOVE: u64 = 1 << 16;
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
pub mod register_mode {
    /// Report faults on pages that are not present.
    pub const MISSING: u64 = 1 << 0;
    /// Report writes to write-protected pages.
    pub const WP: u64 = 1 << 1;
    /// Report faults on pages present in the page cache but not mapped.
    pub const MINOR: u64 = 1 << 2;
}

/// `uffd_msg.event` values.
mod event_code {
    pub const PAGEFAULT: u8 = 0x12;
    pub const FORK: u8 = 0x13;
    pub const REMAP: u8 = 0x14;
    pub const REMOVE: u8 = 0x15;
    pub const UNMAP: u8 = 0x16;
}

/// Page fault flags (`UFFD_PAGEFAULT_FLAG_*`).
pub mod fault_flag {
    /// The access was a write.
    pub const WRITE: u64 = 1 << 0;
    /// The fault is a write-protect fault, not a missing one.
    pub const WP: u64 = 1 << 1;
    /// The fault is a minor fault.
    pub const MINOR: u64 = 1 << 2;
}

const COPY_MODE_DONTWAKE: u64 = 1 << 0;
const COPY_MODE_WP: u64 = 1 << 1;
const ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
const POISON_MODE_DONTWAKE: u64 = 1 << 0;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ApiArg {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RangeArg {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RegisterArg {
    range: RangeArg,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CopyArg {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `uffdio_zeropage`, `uffdio_poison` and `uffdio_continue` share a shape.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RangeModeCountArg {
    range: RangeArg,
    mode: u64,
    count: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct WriteProtectArg {
    range: RangeArg,
    mode: u64,
}

/// The kernel's `struct uffd_msg`, read as raw words and decoded by hand.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

/// Size of one message in a `read` of the descriptor.
pub const MSG_SIZE: usize = 32;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_RW: u64 = 3;

const UFFDIO_API: u64 = ioc(IOC_RW, 0x3f, size_of::<ApiArg>());
const UFFDIO_REGISTER: u64 = ioc(IOC_RW, 0x00, size_of::<RegisterArg>());
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, size_of::<RangeArg>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<RangeArg>());
const UFFDIO_COPY: u64 = ioc(IOC_RW, 0x03, size_of::<CopyArg>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_RW, 0x04, size_of::<RangeModeCountArg>());
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_RW, 0x06, size_of::<WriteProtectArg>());
const UFFDIO_POISON: u64 = ioc(IOC_RW, 0x08, size_of::<RangeModeCountArg>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xaa << 8;

// The ABI, pinned: if any of these fail, the structures above do not match
// the kernel's and every ioctl would read or write the wrong bytes.
const _: () = assert!(size_of::<RawMsg>() == MSG_SIZE);
const _: () = assert!(size_of::<CopyArg>() == 40);
const _: () = assert!(size_of::<RegisterArg>() == 32);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(UFFDIO_POISON == 0xc020_aa08);

/// One event, copied out of the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread touched `addr`; `flags` are [`fault_flag`] bits.
    Pagefault {
        /// Faulting address (page aligned unless `EXACT_ADDRESS` was asked).
        addr: u64,
        /// [`fault_flag`] bits.
        flags: u64,
    },
    /// `madvise(MADV_DONTNEED)` or `MADV_REMOVE` on `[start, end)`.
    Remove {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `munmap` of `[start, end)`.
    Unmap {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length in bytes.
        len: u64,
    },
    /// An event this server does not decode, by its code.
    Unknown(u8),
}

impl Event {
    fn decode(raw: &RawMsg) -> Event {
        match raw.event {
            event_code::PAGEFAULT => Event::Pagefault {
                addr: raw.arg[1],
                flags: raw.arg[0],
            },
            event_code::REMOVE => Event::Remove {
                start: raw.arg[0],
                end: raw.arg[1],
            },
            event_code::UNMAP => Event::Unmap {
                start: raw.arg[0],
                end: raw.arg[1],
            },
            event_code::REMAP => Event::Remap {
                from: raw.arg[0],
                to: raw.arg[1],
                len: raw.arg[2],
            },
            event_code::FORK => Event::Unknown(event_code::FORK),
            other => Event::Unknown(other),
        }
    }
}

/// How an install, wake or protect ioctl ended, short of a real error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole range was done.
    Done,
    /// `EEXIST`: a page in the range was already present; `done` bytes
    /// before it were installed.
    Exists {
        /// Bytes completed before the present page.
        done: u64,
    },
    /// `EAGAIN`: the mm is changing, or the copy was short (it met a page
    /// already present after `done` bytes: the kernel reports any short
    /// copy as `EAGAIN`); `done` bytes from the start were done.
    Again {
        /// Bytes completed before the kernel stopped.
        done: u64,
    },
    /// `ESRCH`: the owning process is exiting.
    Gone,
}

/// A failed ioctl, named after it.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// `UFFDIO_API` failed.
    #[error("UFFDIO_API with features {features:#x} failed")]
    Api {
        /// The features asked for.
        features: u64,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Opening a new userfaultfd failed.
    #[error("creating a userfaultfd failed")]
    Open {
        /// The kernel's answer.
        source: io::Error,
    },
    /// An ioctl on a range failed with an error that is not an [`Outcome`].
    #[error("{op} of {len:#x} bytes at {start:#x} failed")]
    Range {
        /// The ioctl, e.g. `UFFDIO_COPY`.
        op: &'static str,
        /// First byte of the range.
        start: u64,
        /// Length of the range.
        len: u64,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Reading events failed.
    #[error("reading userfaultfd events failed")]
    Read {
        /// The kernel's answer.
        source: io::Error,
    },
    /// The kernel returned a read that is not a whole number of messages.
    #[error("read of {len} bytes is not a whole number of {MSG_SIZE}-byte messages")]
    TornRead {
        /// Bytes read.
        len: usize,
    },
}

/// An owned userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

/// A buffer for reading events in batches; allocated once per reader.
pub struct EventBuf {
    raw: Box<[RawMsg]>,
}

impl EventBuf {
    /// Messages one read can bring.
    pub fn capacity(&self) -> usize {
        self.raw.len()
    }

    /// A buffer for at most `capacity` messages per read.
    pub fn new(capacity: usize) -> EventBuf {
        let zero = RawMsg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: [0; 3],
        };
        EventBuf {
            raw: vec![zero; capacity.max(1)].into_boxed_slice(),
        }
    }
}

impl Uffd {
    /// Wraps a descriptor already known to be a userfaultfd.
    pub fn from_owned(fd: OwnedFd) -> Uffd {
        Uffd { fd }
    }

    /// Opens a new userfaultfd for this process (`O_CLOEXEC|O_NONBLOCK`) and
    /// runs `UFFDIO_API` with `features`, as Firecracker does.
    ///
    /// `/dev/userfaultfd` is tried first, then the `userfaultfd` syscall.
    pub fn open(features: u64) -> Result<(Uffd, u64), UffdError> {
        let uffd = Self::open_raw().map_err(|source| UffdError::Open { source })?;
        let got = uffd.api(features)?;
        Ok((uffd, got))
    }

    /// The features this kernel offers (a throwaway descriptor asks).
    pub fn probe_features() -> Result<u64, UffdError> {
        let uffd = Self::open_raw().map_err(|source| UffdError::Open { source })?;
        uffd.api(0)
    }

    fn open_raw() -> io::Result<Uffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if let Ok(dev) = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and
            // returns a new descriptor or -1; `dev` is open for its duration.
            let ret = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
            if let Ok(fd) = cvt(ret) {
                // SAFETY: the ioctl returned a fresh descriptor that nothing
                // else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                return Ok(Uffd { fd });
            }
        }
        // SAFETY: the syscall takes flags by value and returns a new
        // descriptor or -1.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = cvt(ret)? as RawFd;
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Uffd { fd })
    }

    fn api(&self, features: u64) -> Result<u64, UffdError> {
        let mut arg = ApiArg {
            api: API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which
        // `ApiArg` matches (size pinned by the ioctl number's assert).
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_API as _, &mut arg) };
        cvt(ret).map_err(|source| UffdError::Api { features, source })?;
        Ok(arg.features)
    }

    /// Registers `[start, start+len)` with `mode` ([`register_mode`] bits);
    /// returns the bitmap of ioctls allowed on the range.
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut arg = RegisterArg {
            range: RangeArg { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`,
        // which `RegisterArg` matches. The range is only a request: the
        // kernel validates it against the owning mm.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut arg) };
        cvt(ret).map_err(|source| range_err("UFFDIO_REGISTER", start, len, source))?;
        Ok(arg.ioctls)
    }

    /// Unregisters `[start, start+len)`.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = RangeArg { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut arg) };
        cvt(ret).map_err(|source| range_err("UFFDIO_UNREGISTER", start, len, source))?;
        Ok(())
    }

    /// Copies `src` into the registered range at `dst` (`UFFDIO_COPY`).
    ///
    /// `wake: false` passes `DONTWAKE`; `protect: true` passes `MODE_WP`, so
    /// the page is installed write-protected (without it, a copy clears
    /// write protection).
    pub fn copy(
        &self,
        dst: u64,
        src: &[u8],
        wake: bool,
        protect: bool,
    ) -> Result<Outcome, UffdError> {
        let mut mode = 0;
        if !wake {
            mode |= COPY_MODE_DONTWAKE;
        }
        if protect {
            mode |= COPY_MODE_WP;
        }
        let len = src.len() as u64;
        let mut arg = CopyArg {
            dst,
            src: src.as_ptr() as u64,
            len,
            mode,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes from `src`, a live borrowed
        // slice of exactly that length, and writes only into the target mm
        // (another process's memory, checked by the kernel) and into `arg`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut arg) };
        outcome("UFFDIO_COPY", dst, len, ret, arg.copy)
    }

    /// Maps the zero page over `[start, start+len)` (`UFFDIO_ZEROPAGE`).
    pub fn zeropage(&self, start: u64, len: u64, wake: bool) -> Result<Outcome, UffdError> {
        let mode = if wake { 0 } else { ZEROPAGE_MODE_DONTWAKE };
        let mut arg = RangeModeCountArg {
            range: RangeArg { start, len },
            mode,
            count: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `uffdio_zeropage`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut arg) };
        outcome("UFFDIO_ZEROPAGE", start, len, ret, arg.count)
    }

    /// Marks `[start, start+len)` poisoned: a touch raises `SIGBUS`.
    pub fn poison(&self, start: u64, len: u64, wake: bool) -> Result<Outcome, UffdError> {
        let mode = if wake { 0 } else { POISON_MODE_DONTWAKE };
        let mut arg = RangeModeCountArg {
            range: RangeArg { start, len },
            mode,
            count: 0,
        };
        // SAFETY: UFFDIO_POISON reads and writes one `uffdio_poison`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON as _, &mut arg) };
        outcome("UFFDIO_POISON", start, len, ret, arg.count)
    }

    /// Wakes the threads waiting on `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut arg = RangeArg { start, len };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut arg) };
        cvt(ret).map_err(|source| range_err("UFFDIO_WAKE", start, len, source))?;
        Ok(())
    }

    /// Sets (`protect: true`) or clears write protection on a range.
    pub fn write_protect(
        &self,
        start: u64,
        len: u64,
        protect: bool,
        wake: bool,
    ) -> Result<Outcome, UffdError> {
        let mut mode = if protect { WRITEPROTECT_MODE_WP } else { 0 };
        if !wake {
            mode |= WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut arg = WriteProtectArg {
            range: RangeArg { start, len },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `uffdio_writeprotect`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut arg) };
        match cvt(ret) {
            Ok(_) => Ok(Outcome::Done),
            Err(e) => errno_outcome("UFFDIO_WRITEPROTECT", start, len, e, 0),
        }
    }

    /// Reads every event available now into `out` (cleared first), without
    /// blocking. Returns the number read; 0 means none was pending.
    ///
    /// Each message is decoded into an owned [`Event`] before the buffer is
    /// reused, so nothing refers to the buffer after this returns.
    pub fn read_events(
        &self,
        buf: &mut EventBuf,
        out: &mut Vec<Event>,
    ) -> Result<usize, UffdError> {
        out.clear();
        let bytes = buf.raw.len() * MSG_SIZE;
        // SAFETY: `buf.raw` is a live, exclusively borrowed array of
        // `RawMsg` (plain integers, any bit pattern valid) of `bytes` bytes.
        let ret = unsafe { libc::read(self.fd.as_raw_fd(), buf.raw.as_mut_ptr().cast(), bytes) };
        let len = match cvt(ret) {
            Ok(n) => n as usize,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(0),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => return Ok(0),
            Err(source) => return Err(UffdError::Read { source }),
        };
        if len % MSG_SIZE != 0 {
            return Err(UffdError::TornRead { len });
        }
        out.extend(buf.raw[..len / MSG_SIZE].iter().map(Event::decode));
        Ok(out.len())
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn range_err(op: &'static str, start: u64, len: u64, source: io::Error) -> UffdError {
    UffdError::Range {
        op,
        start,
        len,
        source,
    }
}

/// Turns an install ioctl's return value and its signed count field into
/// an [`Outcome`]. `count` is bytes done when positive, `-errno` otherwise.
fn outcome(
    op: &'static str,
    start: u64,
    len: u64,
    ret: i32,
    count: i64,
) -> Result<Outcome, UffdError> {
    match cvt(ret) {
        Ok(_) => Ok(Outcome::Done),
        Err(e) => errno_outcome(op, start, len, e, count),
    }
}

fn errno_outcome(
    op: &'static str,
    start: u64,
    len: u64,
    err: io::Error,
    count: i64,
) -> Result<Outcome, UffdError> {
    // A positive count is progress made before the error; a negative one is
    // the errno again. `try_from` keeps a negative value from becoming a
    // huge unsigned count.
    let done = u64::try_from(count).unwrap_or(0).min(len);
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(Outcome::Exists { done }),
        Some(libc::EAGAIN) => Ok(Outcome::Again { done }),
        Some(libc::ESRCH) => Ok(Outcome::Gone),
        _ => Err(range_err(op, start, len, err)),
    }
}

/// Whether `fd` is a userfaultfd, judged by its anonymous inode's name.
pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(link.as_os_str() == "anon_inode:[userfaultfd]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_count_is_not_progress() {
        let err = io::Error::from_raw_os_error(libc::EAGAIN);
        let got = errno_outcome("UFFDIO_COPY", 0, 4096, err, -(libc::EAGAIN as i64)).unwrap();
        assert_eq!(got, Outcome::Again { done: 0 });
    }

    #[test]
    fn partial_count_is_kept() {
        let err = io::Error::from_raw_os_error(libc::EAGAIN);
        let got = errno_outcome("UFFDIO_COPY", 0, 1 << 21, err, 8192).unwrap();
        assert_eq!(got, Outcome::Again { done: 8192 });
    }

    #[test]
    fn other_errors_name_the_ioctl() {
        let err = io::Error::from_raw_os_error(libc::EINVAL);
        let got = errno_outcome("UFFDIO_COPY", 0x1000, 4096, err, -22).unwrap_err();
        assert!(got.to_string().contains("UFFDIO_COPY"), "{got}");
    }

    #[test]
    fn probe_offers_remove_events() {
        let features = Uffd::probe_features().unwrap();
        assert_ne!(features & feature::EVENT_REMOVE, 0);
    }
}
