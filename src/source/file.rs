//! A local memory file, mapped read-only and shared.
//!
//! Every VM restored from the same file shares its page cache. Bytes are
//! copied straight from the mapping into the guest by `UFFDIO_COPY`, so a
//! page is copied once, by the kernel.
//!
//! # Limitations
//!
//! Whether a page is in the page cache is asked of `mincore` just before
//! the copy; the kernel may evict it in between, and that copy then waits
//! on the disk on the serve loop. The file must not shrink while it is
//! served: a read past its end raises `SIGBUS`.

use std::fs::File;
use std::path::Path;

use super::{PageSource, SourceError};
use crate::sys::mem::{Advice, Mapping, touch};

/// Pages (4 KiB) asked of `mincore` at most per call: one 2 MiB page.
const MAX_CHECK_PAGES: usize = 512;

/// A memory file mapped read-only and shared.
#[derive(Debug)]
pub struct FileSource {
    map: Mapping,
    path: String,
    check_resident: bool,
}

impl FileSource {
    /// Maps the file at `path`.
    pub fn open(path: &Path) -> std::io::Result<FileSource> {
        let file = File::open(path)?;
        let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
        let map = Mapping::file_read_only(&file, len)?;
        Ok(FileSource {
            map,
            path: path.display().to_string(),
            check_resident: true,
        })
    }

    /// Whether `try_get` asks `mincore` first (the default). Without the
    /// check a page not in the page cache is read from disk on the serve
    /// loop; with a file known to be hot that saves a syscall per fault.
    pub fn check_resident(mut self, check: bool) -> FileSource {
        self.check_resident = check;
        self
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
        if self.check_resident {
            let mut vec = [0u8; MAX_CHECK_PAGES];
            let pages = len.div_ceil(4096);
            if pages > MAX_CHECK_PAGES || !self.map.resident(start, len, &mut vec[..pages]).ok()? {
                return None;
            }
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
