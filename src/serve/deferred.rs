//! Faults whose install the kernel refused with `EAGAIN`, kept for retry.
//!
//! The kernel reports a fault once: one dropped here hangs its thread for
//! good (HAZARDS item 7). Entries are keyed by page *and* kind, so a
//! write-protect fault is never merged into a missing fault of the same
//! page (item 11): resolving one does not resolve the other.

use std::time::Duration;

/// What kind of fault waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A missing page.
    Missing,
    /// A write to a write-protected page.
    WriteProtect,
}

/// One fault to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Page address.
    pub page: u64,
    /// Fault kind.
    pub kind: Kind,
    /// The fault's flags (merged flags of duplicates of the same kind).
    pub flags: u64,
}

/// The queue, with its retry backoff.
#[derive(Debug)]
pub struct Deferred {
    entries: Vec<Entry>,
    delay: Duration,
    min: Duration,
    max: Duration,
}

impl Deferred {
    /// An empty queue; delays grow from `min` to `max`.
    pub fn new(min: Duration, max: Duration) -> Deferred {
        Deferred {
            entries: Vec::with_capacity(256),
            delay: min,
            min,
            max,
        }
    }

    /// Adds a fault; a duplicate of the same page and kind merges flags.
    pub fn push(&mut self, page: u64, kind: Kind, flags: u64) {
        match self
            .entries
            .iter_mut()
            .find(|e| e.page == page && e.kind == kind)
        {
            Some(e) => e.flags |= flags,
            None => self.entries.push(Entry { page, kind, flags }),
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Moves every entry into `out` (cleared first) for a retry round.
    pub fn take_into(&mut self, out: &mut Vec<Entry>) {
        out.clear();
        out.append(&mut self.entries);
    }

    /// How long to sleep before the next round, if anything waits.
    pub fn timeout(&self) -> Option<Duration> {
        (!self.entries.is_empty()).then_some(self.delay)
    }

    /// Records a round's result: progress resets the delay, none doubles it.
    pub fn after_round(&mut self, progress: bool) {
        self.delay = if progress {
            self.min
        } else {
            (self.delay * 2).min(self.max)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_protect_and_missing_faults_stay_apart() {
        let mut q = Deferred::new(Duration::from_micros(10), Duration::from_millis(1));
        q.push(0x1000, Kind::Missing, 0);
        q.push(0x1000, Kind::WriteProtect, 3);
        q.push(0x1000, Kind::Missing, 1);
        let mut out = Vec::new();
        q.take_into(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            Entry {
                page: 0x1000,
                kind: Kind::Missing,
                flags: 1
            }
        );
        assert_eq!(out[1].kind, Kind::WriteProtect);
        assert!(q.is_empty());
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut q = Deferred::new(Duration::from_micros(10), Duration::from_micros(35));
        q.push(0, Kind::Missing, 0);
        q.after_round(false);
        q.after_round(false);
        assert_eq!(q.timeout(), Some(Duration::from_micros(35)));
        q.after_round(true);
        assert_eq!(q.timeout(), Some(Duration::from_micros(10)));
    }
}
