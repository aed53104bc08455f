//! Answering events: REMOVEs, faults, retries and finished fetches.
//!
//! Everything here runs on the serve loop's thread, which is the only one
//! that installs pages or writes page states.

use super::ahead::Ahead;
use super::deferred::{Deferred, Entry, Kind};
use super::fetch::{Done, Pool};
use super::{End, ServeError, Session};
use crate::log::RateLimit;
use crate::metrics::Metrics;
use crate::pagestate::Content;
use crate::region::PAGE_4K;
use crate::sys::mem::{Backing, HUGE_2M, Mapping};
use crate::sys::uffd::{Event, Outcome, fault_flag};

/// Retries after which a fault still refused with `EAGAIN` is reported.
const SLOW_RETRY_WARN: u32 = 1000;

static SLOW_RETRY_LOG: RateLimit = RateLimit::new(5);
static UNMAP_LOG: RateLimit = RateLimit::new(5);

/// A fault waiting for its bytes to be fetched.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    addr: u64,
    flags: u64,
    offset: u64,
    fetches: u32,
}

/// The serve loop's state between events.
pub(super) struct Answer<'s> {
    s: &'s Session,
    zeros: Mapping,
    pub(super) deferred: Deferred,
    retry: Vec<Entry>,
    waiting: Vec<Waiting>,
    done: Vec<Done>,
    fetched: Vec<Waiting>,
    pub(super) pool: Pool,
    pub(super) ahead: Ahead,
    rounds_without_progress: u32,
}

impl<'s> Answer<'s> {
    pub(super) fn new(s: &'s Session) -> Result<Answer<'s>, ServeError> {
        let zeros =
            Mapping::anonymous(HUGE_2M, Backing::Small).map_err(|source| ServeError::Setup {
                what: "zero buffer",
                source,
            })?;
        let pool = Pool::start(
            s.source.clone(),
            s.config.workers,
            s.config.fetch_attempts,
            s.metrics.clone(),
        )
        .map_err(|source| ServeError::Setup {
            what: "fetch workers",
            source,
        })?;
        Ok(Answer {
            s,
            zeros,
            deferred: Deferred::new(s.config.retry_min, s.config.retry_max),
            retry: Vec::with_capacity(256),
            waiting: Vec::with_capacity(256),
            done: Vec::with_capacity(64),
            fetched: Vec::with_capacity(64),
            pool,
            ahead: Ahead::new(s.config.install_ahead.clone()),
            rounds_without_progress: 0,
        })
    }

    /// Answers one batch of events: its REMOVEs first, then its faults
    /// (HAZARDS item 2), so that no fault read together with a REMOVE of
    /// its page is served from the snapshot.
    pub(super) fn batch(&mut self, events: &[Event]) -> Result<Option<End>, ServeError> {
        let mut removed = false;
        for event in events {
            match *event {
                Event::Remove { start, end } => {
                    self.remove(start, end);
                    removed = true;
                }
                Event::Unmap { start, end } => {
                    // Not asked for by Firecracker; an unmapped range has no
                    // content to keep, and a new mapping there starts empty.
                    if let Some(held) = UNMAP_LOG.check() {
                        tracing::warn!(
                            start,
                            end,
                            held,
                            "UNMAP event: treating the range as removed"
                        );
                    }
                    self.remove(start, end);
                    removed = true;
                }
                Event::Pagefault { .. } => {}
                Event::Remap { .. } | Event::Unknown(_) => {
                    Metrics::inc(&self.s.metrics.unexpected_events);
                    return Err(ServeError::UnexpectedEvent {
                        event: format!("{event:?}"),
                    });
                }
            }
        }
        if removed && !self.waiting.is_empty() {
            if let Some(end) = self.answer_removed_waiters()? {
                return Ok(Some(end));
            }
        }
        for event in events {
            if let Event::Pagefault { addr, flags } = *event {
                let m = &self.s.metrics;
                Metrics::inc(&m.faults);
                if flags & fault_flag::WRITE != 0 {
                    Metrics::inc(&m.write_faults);
                }
                if flags & fault_flag::WP != 0 {
                    Metrics::inc(&m.wp_faults);
                }
                if let Some(end) = self.fault(addr, flags)? {
                    return Ok(Some(end));
                }
            }
        }
        Ok(None)
    }

    fn remove(&mut self, start: u64, end: u64) {
        let layout = &self.s.layout;
        Metrics::inc(&self.s.metrics.remove_events);
        let mut newly = 0;
        for span in layout.spans(start, end) {
            newly += layout.regions()[span.region]
                .states
                .remove_range(span.first, span.end);
        }
        Metrics::add(&self.s.metrics.pages_removed, newly);
        tracing::debug!(start, end, newly, "remove");
    }

    /// Faults waiting on a fetch whose page was just removed get their
    /// zeros now instead of waiting for storage.
    fn answer_removed_waiters(&mut self) -> Result<Option<End>, ServeError> {
        let mut i = 0;
        while i < self.waiting.len() {
            let w = self.waiting[i];
            if self.content_of(w.addr) == Some(Content::Zero) {
                self.waiting.swap_remove(i);
                if let Some(end) = self.fault(w.addr, w.flags)? {
                    return Ok(Some(end));
                }
            } else {
                i += 1;
            }
        }
        Ok(None)
    }

    fn content_of(&self, addr: u64) -> Option<Content> {
        let region = &self.s.layout.regions()[self.s.layout.find(addr)?];
        Some(region.states.get(region.page_of(addr)).content())
    }

    /// Answers one fault: decides its bytes from the page's state and
    /// installs them, or defers it.
    pub(super) fn fault(&mut self, addr: u64, flags: u64) -> Result<Option<End>, ServeError> {
        let layout = &self.s.layout;
        let Some(index) = layout.find(addr) else {
            Metrics::inc(&self.s.metrics.faults_outside_regions);
            return Err(ServeError::OutsideRegions { addr });
        };
        let region = &layout.regions()[index];
        let page = region.page_of(addr);
        let page_addr = region.page_addr(page);
        let size = region.spec.page_size;
        let uffd = &self.s.uffd;
        let install_err = |source| ServeError::Install {
            addr: page_addr,
            source,
        };

        if flags & fault_flag::WP != 0 {
            // A write to a write-protected page: lift the protection. If a
            // REMOVE zapped the page meanwhile (item 15), the write turns
            // into a missing fault of its own, answered with zeros.
            let outcome = uffd
                .write_protect(page_addr, size, false, true)
                .map_err(install_err)?;
            return self.settle(
                outcome,
                index,
                page,
                page_addr,
                Kind::WriteProtect,
                flags,
                true,
            );
        }
        let write = flags & fault_flag::WRITE != 0;
        let outcome = match region.states.get(page).content() {
            Content::Zero => {
                let outcome = if size == PAGE_4K && !write {
                    uffd.zeropage(page_addr, size, true)
                } else {
                    // A write would fault again on a zero page at once, and
                    // hugetlb has no zero page: copy zeros instead.
                    uffd.copy(page_addr, &self.zeros.bytes()[..size as usize], true, false)
                };
                let outcome = outcome.map_err(install_err)?;
                if outcome == Outcome::Done {
                    Metrics::inc(&self.s.metrics.zero_pages);
                }
                outcome
            }
            Content::Snapshot => {
                let offset = region.file_offset(page);
                let Some(bytes) = self.s.source.try_get(offset, size as usize) else {
                    self.wait_for_fetch(addr, flags, offset, size as usize);
                    return Ok(None);
                };
                let outcome = uffd
                    .copy(page_addr, bytes, true, false)
                    .map_err(install_err)?;
                if outcome == Outcome::Done {
                    Metrics::inc(&self.s.metrics.pages_from_source);
                    Metrics::add(&self.s.metrics.bytes_from_source, size);
                }
                outcome
            }
        };
        self.settle(outcome, index, page, page_addr, Kind::Missing, flags, write)
    }

    #[expect(clippy::too_many_arguments, reason = "one call site per fault kind")]
    fn settle(
        &mut self,
        outcome: Outcome,
        region: usize,
        page: u64,
        page_addr: u64,
        kind: Kind,
        flags: u64,
        write: bool,
    ) -> Result<Option<End>, ServeError> {
        let region = &self.s.layout.regions()[region];
        let size = region.spec.page_size;
        match outcome {
            Outcome::Done => {}
            Outcome::Exists { .. } => {
                // A duplicate fault: the page is there, but this waiter was
                // not woken by the failed install (item 9).
                Metrics::inc(&self.s.metrics.already_present);
                self.s
                    .uffd
                    .wake(page_addr, size)
                    .map_err(|source| ServeError::Install {
                        addr: page_addr,
                        source,
                    })?;
            }
            Outcome::Again { done } if done >= size => {}
            Outcome::Again { .. } => {
                Metrics::inc(&self.s.metrics.deferred);
                self.deferred.push(page_addr, kind, flags);
                return Ok(None);
            }
            Outcome::Gone => return Ok(Some(End::MemoryGone)),
        }
        let state = region.states.get(page);
        region.states.set(page, state.after_fault(write));
        Ok(None)
    }

    fn wait_for_fetch(&mut self, addr: u64, flags: u64, offset: u64, len: usize) {
        let in_flight = self.waiting.iter().any(|w| w.offset == offset);
        if !in_flight {
            Metrics::inc(&self.s.metrics.source_misses);
            self.pool.submit(offset, len);
        }
        self.waiting.push(Waiting {
            addr,
            flags,
            offset,
            fetches: 1,
        });
    }

    /// Answers the faults whose fetches finished.
    pub(super) fn finish_fetches(&mut self) -> Result<Option<End>, ServeError> {
        self.pool.take_done(&mut self.done);
        let mut done = std::mem::take(&mut self.done);
        let mut mine = std::mem::take(&mut self.fetched);
        let mut result = Ok(None);
        for d in done.drain(..) {
            if let Err(source) = d.result {
                let len = d.len as u64;
                result = Err(ServeError::Fetch {
                    offset: d.offset,
                    len,
                    attempts: d.attempts,
                    source,
                });
                break;
            }
            mine.clear();
            mine.extend(self.waiting.iter().filter(|w| w.offset == d.offset));
            self.waiting.retain(|w| w.offset != d.offset);
            for w in &mine {
                result = self.after_fetch(*w, d.len);
                if !matches!(result, Ok(None)) {
                    break;
                }
            }
            if !matches!(result, Ok(None)) {
                break;
            }
        }
        self.done = done;
        self.fetched = mine;
        result
    }

    fn after_fetch(&mut self, w: Waiting, len: usize) -> Result<Option<End>, ServeError> {
        // The page may have been removed while it was fetched: `fault`
        // decides again from its state, so a removed page gets zeros.
        let before = self.waiting.len();
        let end = self.fault(w.addr, w.flags)?;
        if self.waiting.len() > before {
            // Not available after all (evicted again): `fault` queued
            // another fetch; give up after a few.
            let again = self.waiting.last_mut().expect("just pushed");
            again.fetches = w.fetches + 1;
            if again.fetches > self.s.config.fetch_attempts.max(1) * 4 {
                return Err(ServeError::SourceNeverReady {
                    offset: w.offset,
                    len: len as u64,
                    attempts: again.fetches,
                });
            }
        }
        Ok(end)
    }

    /// Retries every deferred install once.
    pub(super) fn retry_deferred(&mut self) -> Result<Option<End>, ServeError> {
        if self.deferred.is_empty() {
            return Ok(None);
        }
        let before = self.deferred.len();
        let mut retry = std::mem::take(&mut self.retry);
        self.deferred.take_into(&mut retry);
        let mut result = Ok(None);
        for (i, e) in retry.iter().enumerate() {
            Metrics::inc(&self.s.metrics.retries);
            result = self.fault(e.page, e.flags);
            if !matches!(result, Ok(None)) {
                // Keep the untried ones: the caller ends the session, but a
                // stop must not forget faults silently.
                for rest in &retry[i + 1..] {
                    self.deferred.push(rest.page, rest.kind, rest.flags);
                }
                break;
            }
        }
        self.retry = retry;
        let progress = self.deferred.len() < before;
        self.deferred.after_round(progress);
        self.rounds_without_progress = if progress {
            0
        } else {
            self.rounds_without_progress + 1
        };
        if self.rounds_without_progress == SLOW_RETRY_WARN {
            if let Some(held) = SLOW_RETRY_LOG.check() {
                let waiting = self.deferred.len();
                tracing::warn!(
                    waiting,
                    rounds = SLOW_RETRY_WARN,
                    held,
                    "installs still refused with EAGAIN"
                );
            }
        }
        result
    }
}
