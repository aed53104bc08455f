//! The peer's KVM mode: real vCPUs run guest programs over the memory that
//! snapfault serves, as a restored Firecracker guest does.
//!
//! The memory file is a [`kvm::write_image`] image (page tables and code in
//! its first 2 MiB). The peer keeps a model of each 4 KiB page (image,
//! zero, written with a seed) and checks every checksum the guest returns
//! against it. Free-page reports go through the VMM's balloon thread, which
//! calls `madvise(MADV_DONTNEED)` as Firecracker's balloon device does,
//! while the vCPUs keep running.

use std::sync::Mutex;

use crate::sys::mem::Mapping;
use crate::testkit::kvm::{self, GuestOp, PageContent, Vm};

/// The VM and its page model.
pub struct KvmGuest {
    vm: Vm,
    model: Mutex<Vec<PageContent>>,
}

impl KvmGuest {
    /// A VM with `vcpus` vCPUs over all of `memory`.
    #[allow(unsafe_code)]
    pub fn new(memory: &Mapping, vcpus: u32) -> Result<KvmGuest, kvm::KvmError> {
        let addr = memory.addr() as *mut u8;
        // SAFETY: `memory` is a read-write anonymous mapping of `len` bytes
        // owned by the peer, which keeps it (in its `Guest`) for as long
        // as this `KvmGuest` (dropped first, as it is declared after the
        // mappings' owner drops it). The peer touches these bytes only
        // through volatile loads and stores, never through references.
        let vm = unsafe { Vm::new(addr, memory.len() as u64, vcpus) }?;
        let pages = memory.len() / kvm::PAGE_SIZE as usize;
        Ok(KvmGuest {
            vm,
            model: Mutex::new(vec![PageContent::Image; pages]),
        })
    }

    fn content(&self, gpa: u64) -> PageContent {
        self.model.lock().unwrap()[(gpa / kvm::PAGE_SIZE) as usize]
    }

    fn set(&self, pages: impl IntoIterator<Item = u64>, content: PageContent) {
        let mut model = self.model.lock().unwrap();
        for gpa in pages {
            model[(gpa / kvm::PAGE_SIZE) as usize] = content;
        }
    }

    /// Runs `vcpu N OP ARGS… [any]`:
    ///
    /// - `sum FIRST PAGES STRIDE`, `random FIRST RANGE COUNT SEED`: a read,
    ///   its checksum checked against the model (`any`: not checked);
    /// - `list FIRST RANGE COUNT SEED`: the same pages as `random`, as a
    ///   recorded list the VMM writes into guest memory first;
    /// - `write FIRST PAGES STRIDE SEED`;
    /// - `report GPA LEN wait|nowait`: a free-page report.
    pub fn command(&self, words: &[&str]) -> Result<String, String> {
        let num = |i: usize| -> Result<u64, String> {
            let w = words.get(i).ok_or("missing argument")?;
            match w.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => w.parse(),
            }
            .map_err(|e| format!("{w}: {e}"))
        };
        let vcpu = num(0)? as u32;
        let unchecked = words.contains(&"any");
        let op = match words.get(1).copied() {
            Some("sum") => GuestOp::ReadSum {
                first_gpa: num(2)?,
                pages: num(3)?,
                stride_pages: num(4)?,
            },
            Some("random") => GuestOp::ReadRandom {
                first_gpa: num(2)?,
                range_pages: num(3)?,
                count: num(4)?,
                seed: num(5)?,
            },
            Some("write") => GuestOp::Write {
                first_gpa: num(2)?,
                pages: num(3)?,
                stride_pages: num(4)?,
                seed: num(5)?,
            },
            Some("list") => {
                // A recorded list: the VMM writes the page addresses into
                // guest memory (a host touch, served like any other).
                let pages = kvm::random_pages(num(2)?, num(3)?, num(4)?, num(5)?);
                self.vm
                    .write_words(kvm::LIST_GPA, &pages)
                    .map_err(|e| crate::serve::error_chain(&e))?;
                GuestOp::ReadList {
                    list_gpa: kvm::LIST_GPA,
                    count: pages.len() as u64,
                }
            }
            Some("report") => GuestOp::ReportFree {
                gpa: num(2)?,
                len: num(3)?,
                wait: words.get(4) == Some(&"wait"),
            },
            other => return Err(format!("unknown guest op {other:?}")),
        };
        let expected = match op {
            GuestOp::ReadSum { .. } | GuestOp::ReadRandom { .. } if !unchecked => {
                let pages = op.visited_pages().expect("reads list their pages");
                Some(kvm::expected_sum(pages, |gpa| self.content(gpa)))
            }
            GuestOp::ReadList { .. } if !unchecked => {
                let pages = kvm::random_pages(num(2)?, num(3)?, num(4)?, num(5)?);
                Some(kvm::expected_sum(pages, |gpa| self.content(gpa)))
            }
            _ => None,
        };
        let outcome = self
            .vm
            .run(vcpu, op)
            .map_err(|e| crate::serve::error_chain(&e))?;
        match op {
            GuestOp::Write { seed, .. } => {
                self.set(
                    op.visited_pages().expect("writes list their pages"),
                    PageContent::Written(seed),
                );
            }
            GuestOp::ReportFree {
                gpa,
                len,
                wait: true,
            } => {
                self.set(
                    (gpa..gpa + len).step_by(kvm::PAGE_SIZE as usize),
                    PageContent::Zero,
                );
            }
            _ => {}
        }
        if let Some(want) = expected {
            if outcome.value != want {
                return Err(format!("checksum {:#x}, expected {want:#x}", outcome.value));
            }
        }
        Ok(format!(
            "ok value={} exits={}",
            outcome.value, outcome.exits
        ))
    }

    /// Marks `[gpa, gpa+len)` as zeros in the model: for a test that knows
    /// a range was reported free without waiting, once it is done.
    pub fn assume_zero(&self, gpa: u64, len: u64) {
        self.set(
            (gpa..gpa + len).step_by(kvm::PAGE_SIZE as usize),
            PageContent::Zero,
        );
    }

    /// Reports the balloon thread has finished.
    pub fn reports_done(&self) -> u64 {
        self.vm.reports_done()
    }
}
