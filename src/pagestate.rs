//! The state of every guest page, two bits each.
//!
//! # Design
//!
//! A page is in one of four states:
//!
//! | state | meaning | a missing fault gets |
//! |---|---|---|
//! | [`PageState::Never`] | not served since the restore | snapshot bytes |
//! | [`PageState::Clean`] | served from the snapshot, only read faults seen | snapshot bytes |
//! | [`PageState::Written`] | a write fault was served | zeros |
//! | [`PageState::Removed`] | dropped by a REMOVE, not written since | zeros |
//!
//! Why `Written` pages get zeros: once a page was installed, the kernel
//! reports a missing fault on it again only if the page was zapped, and only
//! a REMOVE zaps it. A REMOVE moves the page to `Removed` before any later
//! fault is decided, so a fault on a `Written` page is either a duplicate
//! (another vCPU's fault on the same page; its install gets `EEXIST`, so the
//! bytes chosen do not matter) or the page was served in the window between
//! the REMOVE being read and the kernel's zap (HAZARDS item 5) and has been
//! zapped since. In that window it can only have been served zeros, and it
//! must get zeros again.
//!
//! `Removed` is `0b11`, so a REMOVE is a plain `fetch_or`, a whole word (32
//! pages) at a time in the middle of a range.
//!
//! # Orderings
//!
//! The serve loop is the only writer of a session's states, and it makes
//! every decision from its own writes, so no ordering with other memory is
//! needed: all operations are `Relaxed`. Other threads (metrics, tests,
//! snapshot export after the session) only observe. Updates are still
//! atomic read-modify-writes, so that two writers of neighbouring pages in
//! one word never lose each other's bits.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::sys::mem::zeroed_atomic_words;

/// The state of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Not served since the restore.
    Never = 0,
    /// Served from the snapshot; no write fault seen.
    Clean = 1,
    /// A write fault was served: the content may differ from the snapshot.
    Written = 2,
    /// Dropped by a REMOVE and not written since: the content is zeros.
    Removed = 3,
}

/// What a missing fault on a page must be answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// The snapshot's bytes for the page.
    Snapshot,
    /// Zeros.
    Zero,
}

impl PageState {
    fn from_bits(bits: u64) -> PageState {
        match bits & 0b11 {
            0 => PageState::Never,
            1 => PageState::Clean,
            2 => PageState::Written,
            _ => PageState::Removed,
        }
    }

    /// The bytes a missing fault on a page in this state gets.
    pub fn content(self) -> Content {
        match self {
            PageState::Never | PageState::Clean => Content::Snapshot,
            PageState::Written | PageState::Removed => Content::Zero,
        }
    }

    /// The state after a fault of this kind was answered.
    pub fn after_fault(self, write: bool) -> PageState {
        match (self, write) {
            (_, true) => PageState::Written,
            (PageState::Never, false) => PageState::Clean,
            (other, false) => other,
        }
    }
}

const PAGES_PER_WORD: u64 = 32;

/// The states of `len` pages, 2 bits each.
#[derive(Debug)]
pub struct PageStates {
    words: Box<[AtomicU64]>,
    len: u64,
}

/// How many pages are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// [`PageState::Never`].
    pub never: u64,
    /// [`PageState::Clean`].
    pub clean: u64,
    /// [`PageState::Written`].
    pub written: u64,
    /// [`PageState::Removed`].
    pub removed: u64,
}

impl PageStates {
    /// `len` pages, all [`PageState::Never`]. The memory is committed only
    /// as pages are first touched.
    pub fn new(len: u64) -> PageStates {
        let words = usize::try_from(len.div_ceil(PAGES_PER_WORD)).expect("page count fits usize");
        PageStates {
            words: zeroed_atomic_words(words),
            len,
        }
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no pages.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of memory the states take.
    pub fn footprint(&self) -> usize {
        std::mem::size_of_val(&*self.words)
    }

    fn slot(page: u64) -> (usize, u32) {
        (
            (page / PAGES_PER_WORD) as usize,
            ((page % PAGES_PER_WORD) * 2) as u32,
        )
    }

    /// The state of `page`.
    ///
    /// # Panics
    ///
    /// If `page` is out of range.
    pub fn get(&self, page: u64) -> PageState {
        assert!(page < self.len, "page {page} out of {}", self.len);
        let (word, shift) = Self::slot(page);
        PageState::from_bits(self.words[word].load(Relaxed) >> shift)
    }

    /// Sets `page` to `state`; returns the state it had.
    pub fn set(&self, page: u64, state: PageState) -> PageState {
        assert!(page < self.len, "page {page} out of {}", self.len);
        let (word, shift) = Self::slot(page);
        let mask = 0b11u64 << shift;
        let new = (state as u64) << shift;
        let old = self.words[word]
            .fetch_update(Relaxed, Relaxed, |w| Some((w & !mask) | new))
            .unwrap_or_else(|w| w);
        PageState::from_bits(old >> shift)
    }

    /// Marks pages `[first, end)` removed, a word at a time where the range
    /// covers whole words. Returns how many of them were not removed before.
    pub fn remove_range(&self, first: u64, end: u64) -> u64 {
        let end = end.min(self.len);
        let mut newly = 0;
        let mut page = first;
        while page < end {
            let (word, shift) = Self::slot(page);
            let in_word = (PAGES_PER_WORD - page % PAGES_PER_WORD).min(end - page);
            let mask = if in_word == PAGES_PER_WORD {
                u64::MAX
            } else {
                ((1u64 << (in_word * 2)) - 1) << shift
            };
            let old = self.words[word].fetch_or(mask, Relaxed);
            newly += in_word - u64::from(count_removed(old & mask));
            page += in_word;
        }
        newly
    }

    /// Counts the pages in each state.
    pub fn counts(&self) -> StateCounts {
        let mut counts = StateCounts::default();
        for (i, word) in self.words.iter().enumerate() {
            let w = word.load(Relaxed);
            let pages = (self.len - i as u64 * PAGES_PER_WORD).min(PAGES_PER_WORD);
            for p in 0..pages {
                match PageState::from_bits(w >> (p * 2)) {
                    PageState::Never => counts.never += 1,
                    PageState::Clean => counts.clean += 1,
                    PageState::Written => counts.written += 1,
                    PageState::Removed => counts.removed += 1,
                }
            }
        }
        counts
    }
}

/// Number of 2-bit fields equal to `0b11` in `bits`.
fn count_removed(bits: u64) -> u32 {
    (bits & (bits >> 1) & 0x5555_5555_5555_5555).count_ones()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_and_content() {
        use PageState::*;
        assert_eq!(Never.after_fault(false), Clean);
        assert_eq!(Never.after_fault(true), Written);
        assert_eq!(Removed.after_fault(false), Removed);
        assert_eq!(Removed.after_fault(true), Written);
        assert_eq!(Clean.after_fault(true), Written);
        assert_eq!(Never.content(), Content::Snapshot);
        assert_eq!(Clean.content(), Content::Snapshot);
        assert_eq!(Written.content(), Content::Zero);
        assert_eq!(Removed.content(), Content::Zero);
    }

    #[test]
    fn set_and_get_do_not_disturb_neighbours() {
        let states = PageStates::new(100);
        states.set(31, PageState::Written);
        states.set(32, PageState::Clean);
        assert_eq!(states.get(30), PageState::Never);
        assert_eq!(states.get(31), PageState::Written);
        assert_eq!(states.get(32), PageState::Clean);
        assert_eq!(states.set(31, PageState::Clean), PageState::Written);
    }

    #[test]
    fn remove_range_covers_exactly_the_range() {
        let states = PageStates::new(200);
        states.set(9, PageState::Clean);
        states.set(10, PageState::Removed);
        states.set(150, PageState::Written);
        let newly = states.remove_range(10, 150);
        assert_eq!(newly, 139);
        assert_eq!(states.get(9), PageState::Clean);
        assert_eq!(states.get(150), PageState::Written);
        for p in 10..150 {
            assert_eq!(states.get(p), PageState::Removed, "page {p}");
        }
        let c = states.counts();
        assert_eq!((c.never, c.clean, c.written, c.removed), (58, 1, 1, 140));
    }

    #[test]
    fn remove_range_is_clamped() {
        let states = PageStates::new(40);
        assert_eq!(states.remove_range(30, 1000), 10);
        assert_eq!(states.remove_range(50, 60), 0);
    }

    #[test]
    fn two_bits_per_page() {
        let pages_per_gib = (1u64 << 30) / 4096;
        let states = PageStates::new(pages_per_gib);
        assert_eq!(states.footprint() as u64 * 8 / pages_per_gib, 2);
    }

    #[test]
    fn concurrent_writers_of_one_word_keep_each_others_bits() {
        let states = PageStates::new(32);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let states = &states;
                s.spawn(move || {
                    for round in 0..1000u64 {
                        for p in (t..32).step_by(4) {
                            let st = if round % 2 == 0 {
                                PageState::Clean
                            } else {
                                PageState::Written
                            };
                            states.set(p, st);
                        }
                    }
                });
            }
        });
        for p in 0..32 {
            assert_eq!(states.get(p), PageState::Written);
        }
    }
}
