//! A page source that a test holds back: pages it gates are not ready
//! until a fetch for them is let through, and fetches wait for the test.
//!
//! With it a test makes storage as slow as it likes, or failing, without
//! any timing: it decides when each fetch ends.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex};

use crate::source::{FileSource, PageSource, SourceError};

#[derive(Default)]
struct Gate {
    gated: HashSet<u64>,
    open: bool,
    fail: bool,
    started: u64,
}

/// A [`FileSource`] whose gated pages wait for [`GatedSource::open`].
pub struct GatedSource {
    inner: FileSource,
    gate: Mutex<Gate>,
    changed: Condvar,
}

impl GatedSource {
    /// Gates the pages at the file offsets in `gated`.
    pub fn new(inner: FileSource, gated: impl IntoIterator<Item = u64>) -> GatedSource {
        let gate = Gate {
            gated: gated.into_iter().collect(),
            ..Gate::default()
        };
        GatedSource {
            inner,
            gate: Mutex::new(gate),
            changed: Condvar::new(),
        }
    }

    /// Lets every waiting and future fetch through.
    pub fn open(&self) {
        self.gate.lock().unwrap().open = true;
        self.changed.notify_all();
    }

    /// Makes every fetch fail once let through.
    pub fn fail(&self) {
        self.gate.lock().unwrap().fail = true;
        self.changed.notify_all();
    }

    /// Waits until at least `n` fetches have started.
    pub fn wait_started(&self, n: u64) {
        let mut g = self.gate.lock().unwrap();
        while g.started < n {
            g = self.changed.wait(g).unwrap();
        }
    }

    /// Fetches started so far.
    pub fn started(&self) -> u64 {
        self.gate.lock().unwrap().started
    }
}

impl PageSource for GatedSource {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn try_get(&self, offset: u64, len: usize) -> Option<&[u8]> {
        if self.gate.lock().unwrap().gated.contains(&offset) {
            return None;
        }
        self.inner.try_get(offset, len)
    }

    fn fetch(&self, offset: u64, len: usize) -> Result<(), SourceError> {
        let mut g = self.gate.lock().unwrap();
        g.started += 1;
        self.changed.notify_all();
        while !g.open && !g.fail {
            g = self.changed.wait(g).unwrap();
        }
        if g.fail {
            let source = std::io::Error::other("gated source told to fail");
            return Err(SourceError::Read {
                what: "gated".into(),
                offset,
                len: len as u64,
                source,
            });
        }
        g.gated.remove(&offset);
        drop(g);
        self.inner.fetch(offset, len)
    }

    fn describe(&self) -> String {
        format!("gated {}", self.inner.describe())
    }
}
