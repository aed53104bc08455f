//! Memory mappings owned by this process: the memory file mapped for
//! reading, zero buffers, and (in the test kit) Firecracker-shaped guest
//! memory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use super::cvt;

/// Bytes in a 2 MiB huge page.
pub const HUGE_2M: usize = 2 << 20;

/// An owned `mmap` region, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is a plain range of address space. Shared access only
// hands out `&[u8]` (reads) or raw addresses; writes go through `&mut self`
// or through the kernel (another process's uffd ioctls never write here).
unsafe impl Send for Mapping {}
// SAFETY: see `Send`: `&Mapping` allows only reads of the bytes.
unsafe impl Sync for Mapping {}

/// How anonymous memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Ordinary 4 KiB pages.
    Small,
    /// 2 MiB hugetlb pages (`MAP_HUGETLB|MAP_HUGE_2MB`).
    Huge2M,
}

impl Mapping {
    /// Maps `len` bytes of `file` read-only and shared, so that every
    /// process mapping the same file shares its page cache. A `len` of 0
    /// gives an empty mapping.
    pub fn file_read_only(file: &File, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping {
                ptr: NonNull::dangling(),
                len: 0,
            });
        }
        // SAFETY: a new mapping at an address the kernel picks; it aliases
        // no Rust object. MAP_SHARED of a file opened for reading with
        // PROT_READ only: the bytes can change if another process writes
        // the file, which the memory file's contract rules out.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        Self::from_mmap(ptr, len)
    }

    /// Maps `len` bytes of private anonymous memory, read-write, with
    /// `MAP_NORESERVE`: Firecracker's guest memory flags.
    pub fn anonymous(len: usize, backing: Backing) -> io::Result<Mapping> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if backing == Backing::Huge2M {
            flags |= libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
        }
        // SAFETY: a new anonymous mapping; it aliases no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        Self::from_mmap(ptr, len)
    }

    fn from_mmap(ptr: *mut libc::c_void, len: usize) -> io::Result<Mapping> {
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte's address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The mapped bytes.
    ///
    /// Reading them may block on a page fault (the file's page cache, or a
    /// userfaultfd registered over the range by its owner).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` readable bytes for the life of
        // `self` (mapped at construction, unmapped only in drop), and the
        // bytes are plain data.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The mapped bytes, writable. Only for anonymous mappings.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `bytes`, and `&mut self` makes this the only
        // reference; anonymous mappings are PROT_WRITE. A read-only file
        // mapping would fault on write: only the test kit calls this, on
        // anonymous memory.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Which of the pages in `[offset, offset+len)` are resident, as
    /// `mincore` reports, into `out` (one byte per 4 KiB page; bit 0 set
    /// when resident). `offset` must be 4 KiB aligned.
    pub fn resident(&self, offset: usize, len: usize, out: &mut [u8]) -> io::Result<bool> {
        let pages = len.div_ceil(4096);
        if offset % 4096 != 0 || offset + len > self.len || out.len() < pages {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the range lies inside this mapping (checked above) and
        // `out` has room for one byte per page of it.
        let ret =
            unsafe { libc::mincore(self.ptr.as_ptr().add(offset).cast(), len, out.as_mut_ptr()) };
        cvt(ret)?;
        Ok(out[..pages].iter().all(|b| b & 1 != 0))
    }

    /// `madvise(advice)` on `[offset, offset+len)` of this mapping.
    pub fn advise(&self, offset: usize, len: usize, advice: Advice) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // The range lies inside this mapping (checked above). For
        // DONTNEED/REMOVE its contents become zero on the next touch, which
        // no Rust reference can observe mid-call: callers hold `&self`
        // only, and read the bytes through volatile loads or the kernel.
        advise_raw(self.addr() + offset as u64, len as u64, advice)
    }
}

/// `madvise(advice)` on `[addr, addr+len)` of this process, which may span
/// several mappings (the test kit's REMOVE across two regions).
pub fn advise_raw(addr: u64, len: u64, advice: Advice) -> io::Result<()> {
    let advice = match advice {
        Advice::DontNeed => libc::MADV_DONTNEED,
        Advice::WillNeed => libc::MADV_WILLNEED,
        Advice::Remove => libc::MADV_REMOVE,
    };
    // SAFETY: madvise validates the range against this process's mappings
    // and fails for unmapped parts. It may drop pages of Rust-owned memory
    // only where callers pass ranges of guest memory they map themselves
    // (a `Mapping` whose bytes are read only through volatile loads).
    cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) })?;
    Ok(())
}

/// `madvise` advice used by snapfault and its test kit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages (a uffd REMOVE event).
    DontNeed,
    /// `MADV_WILLNEED`: start reading the pages in.
    WillNeed,
    /// `MADV_REMOVE`: free the backing store.
    Remove,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: unmaps exactly what the constructor mapped; no reference
        // into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Reads a byte at `addr` of this process with a volatile load, so that
/// the access really happens (and faults) even if the value is unused.
///
/// # Panics
///
/// Never; but the read may block in a userfaultfd fault.
pub fn touch(mapping: &Mapping, offset: usize) -> u8 {
    assert!(offset < mapping.len);
    // SAFETY: `offset` is inside the mapping (asserted), which is readable.
    unsafe { std::ptr::read_volatile(mapping.ptr.as_ptr().add(offset)) }
}

/// Writes `bytes` at `offset` of `mapping` with volatile stores, through a
/// shared reference: for guest memory that other threads and the kernel
/// (REMOVE) change under us, as a VM's memory changes.
pub fn write_shared(mapping: &Mapping, offset: usize, bytes: &[u8]) {
    assert!(
        offset
            .checked_add(bytes.len())
            .is_some_and(|end| end <= mapping.len)
    );
    let base = mapping.ptr.as_ptr();
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: inside the mapping (asserted). Guest memory is shared by
        // design: racing writers see some interleaving of bytes, as a VM's
        // vCPUs do; no Rust reference to these bytes is held across this.
        unsafe { std::ptr::write_volatile(base.add(offset + i), *b) };
    }
}

/// Copies `[offset, offset+out.len())` of `mapping` into `out` with
/// volatile loads (see [`write_shared`]).
pub fn read_shared(mapping: &Mapping, offset: usize, out: &mut [u8]) {
    assert!(
        offset
            .checked_add(out.len())
            .is_some_and(|end| end <= mapping.len)
    );
    let base = mapping.ptr.as_ptr();
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: inside the mapping (asserted); see `write_shared`.
        *b = unsafe { std::ptr::read_volatile(base.add(offset + i)) };
    }
}

/// A zeroed array of `n` atomic words, allocated with `alloc_zeroed` so
/// that the kernel commits the memory only when a word is first written:
/// page states for a terabyte of address space cost nothing until used.
pub fn zeroed_atomic_words(n: usize) -> Box<[std::sync::atomic::AtomicU64]> {
    use std::alloc::{Layout, alloc_zeroed, handle_alloc_error};
    use std::sync::atomic::AtomicU64;
    if n == 0 {
        return Box::new([]);
    }
    let layout = Layout::array::<AtomicU64>(n).expect("page state array fits in memory");
    // SAFETY: the layout has non-zero size (n > 0).
    let ptr = unsafe { alloc_zeroed(layout) }.cast::<AtomicU64>();
    if ptr.is_null() {
        handle_alloc_error(layout);
    }
    // SAFETY: `ptr` is a fresh allocation of exactly `n` AtomicU64 with the
    // global allocator's layout for `[AtomicU64; n]`, which is what Box
    // frees with; all-zero bytes are a valid AtomicU64 (value 0).
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)) }
}
