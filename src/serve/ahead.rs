//! Installing ranges of the memory file before the guest touches them.
//!
//! The serve loop installs one chunk (up to 2 MiB of pages still
//! [`PageState::Never`]) per turn and goes back to reading events, so a
//! REMOVE waits at most one chunk's copy, and a fault is never queued
//! behind a whole range. Pages already served, written or removed are
//! skipped: install-ahead never overwrites what the guest has seen. A page
//! installed ahead is a read, so it becomes [`PageState::Clean`].

use super::{End, ServeError, Session};
use crate::metrics::Metrics;
use crate::pagestate::PageState;
use crate::region::Region;
use crate::sys::uffd::Outcome;

/// Most bytes installed per turn of the loop.
const CHUNK: u64 = 2 << 20;
/// Most page states looked at per turn while skipping served pages.
const SCAN_BUDGET: u64 = 1 << 16;

/// Where install-ahead stands.
#[derive(Debug)]
pub(super) struct Ahead {
    ranges: Vec<(u64, u64)>,
    next: usize,
    pos: u64,
}

impl Ahead {
    pub(super) fn new(ranges: Vec<(u64, u64)>) -> Ahead {
        Ahead {
            ranges,
            next: 0,
            pos: 0,
        }
    }

    /// Whether anything is left to install.
    pub(super) fn pending(&self) -> bool {
        self.next < self.ranges.len()
    }

    /// Installs at most one chunk.
    pub(super) fn step(&mut self, s: &Session) -> Result<Option<End>, ServeError> {
        let mut budget = SCAN_BUDGET;
        while let Some(&(offset, len)) = self.ranges.get(self.next) {
            let end = offset.saturating_add(len);
            self.pos = self.pos.max(offset);
            let region = s
                .layout
                .regions()
                .iter()
                .find(|r| in_file_range(r, self.pos));
            let Some(region) = region.filter(|_| self.pos < end) else {
                // Past this range, or in no region: go to the next region
                // start inside the range, or the next range.
                let next_start = s
                    .layout
                    .regions()
                    .iter()
                    .map(|r| r.spec.offset)
                    .filter(|&o| o > self.pos && o < end)
                    .min();
                match next_start {
                    Some(o) => self.pos = o,
                    None => {
                        self.next += 1;
                        self.pos = 0;
                        if !self.pending() {
                            Metrics::inc(&s.metrics.install_ahead_finished);
                        }
                    }
                }
                continue;
            };
            let size = region.spec.page_size;
            let limit = region
                .states
                .len()
                .min((end - region.spec.offset).div_ceil(size));
            let mut first = (self.pos - region.spec.offset) / size;
            while first < limit && region.states.get(first) != PageState::Never && budget > 0 {
                first += 1;
                budget -= 1;
            }
            if budget == 0 {
                self.pos = region.file_offset(first);
                return Ok(None);
            }
            let mut last = first;
            while last < limit
                && last - first < (CHUNK / size).max(1)
                && region.states.get(last) == PageState::Never
            {
                last += 1;
            }
            if first == last {
                // Everything up to the limit is served already.
                self.pos = region.file_offset(limit);
                continue;
            }
            return self.install(s, region, first, last);
        }
        Ok(None)
    }

    fn install(
        &mut self,
        s: &Session,
        region: &Region,
        first: u64,
        last: u64,
    ) -> Result<Option<End>, ServeError> {
        let size = region.spec.page_size;
        let offset = region.file_offset(first);
        let len = (last - first) * size;
        let Some(bytes) = s.source.try_get(offset, len as usize) else {
            // Not available without waiting: leave these pages to faults.
            self.pos = offset + len;
            return Ok(None);
        };
        let addr = region.page_addr(first);
        let outcome = s
            .uffd
            .copy(addr, bytes, true, false)
            .map_err(|source| ServeError::Install { addr, source })?;
        let (done, skip) = match outcome {
            Outcome::Done => (len, 0),
            // A page was present already: keep what came before it, step
            // over it.
            Outcome::Exists { done } => (done / size * size, size),
            // A REMOVE is queued: read it first, then go on from here.
            Outcome::Again { done } => (done / size * size, 0),
            Outcome::Gone => return Ok(Some(End::MemoryGone)),
        };
        for page in first..first + done / size {
            region.states.set(page, PageState::Clean);
        }
        Metrics::add(&s.metrics.pages_installed_ahead, done / size);
        Metrics::add(&s.metrics.bytes_from_source, done);
        self.pos = offset + done + skip;
        Ok(None)
    }
}

fn in_file_range(region: &Region, offset: u64) -> bool {
    offset >= region.spec.offset && offset < region.spec.offset + region.spec.size
}
