//! A local memory file, mapped read-only and shared.
//!
//! Every VM restored from the same file shares its page cache. Bytes are
//! copied straight from the mapping into the guest by `UFFDIO_COPY`, so a
//! page is copied once, by the kernel.
//!
//! Whether a page is in the page cache is asked of `mincore` before the
//! copy, a whole 2 MiB window at a time: a window found wholly resident is
//! remembered (one bit), so a hot file costs one `mincore` per 2 MiB
//! rather than one per fault.
//!
//! # Limitations
//!
//! The kernel may evict a page after it was found resident (or after its
//! window was remembered as resident); that copy then waits on the disk on
//! the serve loop. The file must not shrink while it is served: a read
//! past its end raises `SIGBUS`.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{PageSource, SourceError};
use crate::sys::mem::{Advice, Mapping, touch};

/// Pages (4 KiB) asked of `mincore` at most per call: one 2 MiB window.
const MAX_CHECK_PAGES: usize = 512;
/// Bytes per residency window.
const WINDOW: usize = MAX_CHECK_PAGES * 4096;

/// A memory file mapped read-only and shared.
#[derive(Debug)]
pub struct FileSource {
    map: Mapping,
    path: String,
    check_resident: bool,
    /// One bit per 2 MiB window: found wholly resident. Only ever set;
    /// `Relaxed` because a stale clear bit only costs a `mincore`.
    resident: Box<[AtomicU64]>,
}

impl FileSource {
    /// Maps the file at `path`.
    pub fn open(path: &Path) -> std::io::Result<FileSource> {
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
        let map = Mapping::file_read_only(&file, len)?;
        let windows = len.div_ceil(WINDOW).div_ceil(64);
        let resident = crate::sys::mem::zeroed_atomic_words(windows);
        Ok(FileSource {
            map,
            path: path.display().to_string(),
            check_resident: true,
            resident,
        })
    }

    /// Whether `try_get` asks `mincore` first (the default). Without the
    /// check a page not in the page cache is read from disk on the serve
    /// loop; with a file known to be hot that saves a syscall per fault.
    pub fn check_resident(mut self, check: bool) -> FileSource {
        self.check_resident = check;
        self
    }

    /// Whether `[start, end)` is in the page cache, from the window bits
    /// where they say so, else from `mincore`.
    fn is_resident(&self, start: usize, end: usize) -> bool {
        let first = start / WINDOW;
        let last = (end - 1) / WINDOW;
        let known = |w: usize| self.resident[w / 64].load(Relaxed) & (1 << (w % 64)) != 0;
        if (first..=last).all(known) {
            return true;
        }
        let mut vec = [0u8; MAX_CHECK_PAGES];
        if last == first {
            // Ask for the whole window: if all of it is in, later faults
            // in it need not ask again.
            let w_start = first * WINDOW;
            let w_len = WINDOW.min(self.map.len() - w_start);
            let pages = w_len.div_ceil(4096);
            let Ok(all) = self.map.resident(w_start, w_len, &mut vec[..pages]) else {
                return false;
            };
            if all {
                self.resident[first / 64].fetch_or(1 << (first % 64), Relaxed);
                return true;
            }
            let (a, b) = ((start - w_start) / 4096, (end - w_start).div_ceil(4096));
            return vec[a..b].iter().all(|v| v & 1 != 0);
        }
        let pages = (end - start).div_ceil(4096);
        pages <= MAX_CHECK_PAGES
            && self
                .map
                .resident(start, end - start, &mut vec[..pages])
                .unwrap_or(false)
    }

    fn range(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.map.len()).then_some((start, end))
    }
}

impl PageSource for FileSource {
    fn len(&self) -> u64 {
        self.map.len() as u64
    }

    fn try_get(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let (start, end) = self.range(offset, len)?;
        if self.check_resident && !self.is_resident(start, end) {
            return None;
        }
        Some(&self.map.bytes()[start..end])
    }

    fn fetch(&self, offset: u64, len: usize) -> Result<(), SourceError> {
        let (start, end) = self.range(offset, len).ok_or(SourceError::OutOfRange {
            offset,
            len: len as u64,
            source_len: self.len(),
        })?;
        // Readahead is only a hint; the touches below do the real waiting.
        let _ = self.map.advise(start, end - start, Advice::WillNeed);
        for page in (start..end).step_by(4096) {
            touch(&self.map, page);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.clone()
    }
}
