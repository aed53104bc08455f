//! The VMM: VM and vCPU setup and running guest operations.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::{
    KVM_EXIT_INTERNAL_ERROR, KVM_MAX_CPUID_ENTRIES, kvm_dtable, kvm_regs, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::balloon::{BalloonThread, register_balloon_eventfd};
use super::guest::{self, Entries};
use super::image::{check_mem_size, random_state};
use super::{
    CODE_GPA, DATA_START, DONE_PORT, GDT_GPA, GuestOp, KvmError, MAILBOX_GPA, MAX_VCPUS, Outcome,
    PAGE_SIZE, PML4_GPA, RING_LEN,
};

/// RFLAGS: the reserved bit 1 and IOPL=3.
const RFLAGS_IOPL3: u64 = 0x3002;
/// User code64 and user data selectors (GDT entries 4 and 3, RPL 3).
const USER_CS: u16 = 0x23;
const USER_DS: u16 = 0x1b;

/// A VM over caller-owned memory, with `vcpus` vCPUs and a balloon thread.
///
/// `Vm` is `Send + Sync`: each vCPU is behind its own mutex, so different threads can run
/// different vCPUs at the same time ([`Vm::run`] on one vCPU from two threads serializes).
pub struct Vm {
    /// Kept so the VM (and its memslot and ioeventfd) lives as long as the vCPUs.
    _vm: VmFd,
    vcpus: Vec<Mutex<VcpuFd>>,
    host_addr: usize,
    mem_size: u64,
    entries: Entries,
    kick: Arc<File>,
    stop: Arc<AtomicBool>,
    reports_done: Arc<AtomicU64>,
    balloon: Option<JoinHandle<()>>,
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    }
}

/// 64-bit long mode at CPL 3 with the image's GDT and page tables.
fn user_long_mode(mut s: kvm_sregs) -> kvm_sregs {
    let data = segment(USER_DS, 0x3, 0, 1);
    s.cs = segment(USER_CS, 0xb, 1, 0);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.gdt = kvm_dtable {
        base: GDT_GPA,
        limit: 5 * 8 - 1,
        ..Default::default()
    };
    s.idt = kvm_dtable {
        base: 0,
        limit: 0,
        ..Default::default()
    };
    s.cr0 = 0x8000_0011; // PG | ET | PE
    s.cr3 = PML4_GPA;
    s.cr4 = 0x20; // PAE
    s.efer = 0x500; // LMA | LME
    s
}

fn vcpu_err(op: &'static str, vcpu: u32) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::VcpuIoctl { op, vcpu, source }
}

impl Vm {
    /// Creates a VM whose guest physical memory `[0, mem_size)` is the host memory at
    /// `host_addr` (one memslot), with `vcpus` vCPUs in user long mode, the balloon ioeventfd,
    /// and the balloon thread. Touches no guest memory.
    ///
    /// # Safety
    ///
    /// `host_addr` must be the start of a readable and writable mapping of at least `mem_size`
    /// bytes that stays mapped until the `Vm` is dropped. The guest and the balloon thread
    /// write to it and discard ranges of it (`MADV_DONTNEED`) at any time, so the caller must
    /// not hold Rust references into it while the `Vm` lives (raw-pointer or volatile access
    /// is fine).
    pub unsafe fn new(host_addr: *mut u8, mem_size: u64, vcpus: u32) -> Result<Vm, KvmError> {
        let bad = |reason| KvmError::BadMemory {
            host_addr: host_addr as usize,
            mem_size,
            reason,
        };
        check_mem_size(mem_size).map_err(bad)?;
        if host_addr.is_null() || host_addr as u64 % PAGE_SIZE != 0 {
            return Err(bad("null or not page aligned"));
        }
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(KvmError::BadVcpuCount { vcpus });
        }
        let kvm = Kvm::new().map_err(|source| KvmError::OpenKvm { source })?;
        let vm = kvm
            .create_vm()
            .map_err(|source| KvmError::CreateVm { source })?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: by this function's contract, `host_addr` is a valid read/write mapping of at
        // least `mem_size` bytes that outlives the VM (it is dropped with `self`), and the
        // caller keeps no references into it, so KVM writing it cannot break Rust aliasing.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|source| KvmError::SetMemoryRegion { mem_size, source })?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| KvmError::GetSupportedCpuid { source })?;
        let mut fds = Vec::new();
        for i in 0..vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(vcpu_err("create", i))?;
            fd.set_cpuid2(&cpuid).map_err(vcpu_err("set CPUID", i))?;
            let sregs = fd.get_sregs().map_err(vcpu_err("get sregs", i))?;
            fd.set_sregs(&user_long_mode(sregs))
                .map_err(vcpu_err("set sregs", i))?;
            fds.push(Mutex::new(fd));
        }
        let kick = Arc::new(register_balloon_eventfd(&vm)?);
        let stop = Arc::new(AtomicBool::new(false));
        let reports_done = Arc::new(AtomicU64::new(0));
        let thread = BalloonThread {
            host_addr: host_addr as usize,
            mem_size,
            vcpus,
            kick: kick.clone(),
            stop: stop.clone(),
            reports_done: reports_done.clone(),
        };
        let balloon = std::thread::Builder::new()
            .name("kvm-balloon".into())
            .spawn(move || thread.run())
            .map_err(|source| KvmError::SpawnBalloonThread { source })?;
        tracing::debug!(mem_size, vcpus, "kvm testkit VM created");
        Ok(Vm {
            _vm: vm,
            vcpus: fds,
            host_addr: host_addr as usize,
            mem_size,
            entries: guest::program().1,
            kick,
            stop,
            reports_done,
            balloon: Some(balloon),
        })
    }

    /// The number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// The guest memory size.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// How many `ReportFree` reports the balloon thread has completed (discarded and marked
    /// done in the mailbox) since this `Vm` was created.
    pub fn reports_done(&self) -> u64 {
        self.reports_done.load(Ordering::Acquire)
    }

    /// Writes `words` to guest memory at `gpa` (8-aligned) from the host, e.g. a
    /// [`GuestOp::ReadList`] list into [`super::LIST_GPA`]. This is a host touch of guest
    /// memory (it may block in a userfaultfd fault, like any VMM access).
    pub fn write_words(&self, gpa: u64, words: &[u64]) -> Result<(), KvmError> {
        let len = words.len() as u64 * 8;
        let end = gpa.checked_add(len);
        if gpa % 8 != 0 || end.is_none_or(|e| e > self.mem_size) {
            return Err(KvmError::BadGuestRange {
                gpa,
                len,
                mem_size: self.mem_size,
            });
        }
        let base = (self.host_addr + gpa as usize) as *mut u64;
        for (i, w) in words.iter().enumerate() {
            // SAFETY: `[gpa, gpa + len)` was checked to lie inside the mapping, which
            // `Vm::new`'s contract keeps valid while `self` lives; the address is 8-aligned
            // (page-aligned base + 8-aligned gpa); volatile because the guest may run.
            unsafe { base.add(i).write_volatile(*w) };
        }
        Ok(())
    }

    /// Runs `op` on vCPU `vcpu` on the calling thread, until the guest signals completion on
    /// [`DONE_PORT`], and returns its result and the number of `KVM_RUN` exits.
    pub fn run(&self, vcpu: u32, op: GuestOp) -> Result<Outcome, KvmError> {
        let vcpus = self.vcpus();
        let fd = self
            .vcpus
            .get(vcpu as usize)
            .ok_or(KvmError::NoSuchVcpu { vcpu, vcpus })?;
        let regs = self.op_regs(vcpu, op)?;
        let mut fd = fd.lock().unwrap_or_else(PoisonError::into_inner);
        fd.set_regs(&regs).map_err(vcpu_err("set regs", vcpu))?;
        let mut exits = 0;
        let stop = loop {
            exits += 1;
            let stop = match fd.run() {
                Ok(VcpuExit::IoOut(port, _)) if port == u16::from(DONE_PORT) => Stop::Done,
                Ok(VcpuExit::InternalError) => Stop::Internal,
                Ok(other) => Stop::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(source) => return Err(KvmError::Run { vcpu, source }),
            };
            break stop;
        };
        let regs = fd.get_regs().map_err(vcpu_err("get regs", vcpu))?;
        let reason = match stop {
            Stop::Done => {
                return Ok(Outcome {
                    value: regs.rax,
                    exits,
                });
            }
            Stop::Internal => internal_error(fd.get_kvm_run()),
            Stop::Other(reason) => reason,
        };
        Err(KvmError::UnexpectedExit {
            vcpu,
            reason,
            rip: regs.rip,
        })
    }

    /// Checks `op` and builds the registers that start it.
    fn op_regs(&self, vcpu: u32, op: GuestOp) -> Result<kvm_regs, KvmError> {
        let bad = |reason| Err(KvmError::BadOp { op, reason });
        let mem = self.mem_size;
        // The end of `n` units of `unit` bytes from `start`, if it fits in memory.
        let fits = |start: u64, n: u64, unit: u64| {
            n.checked_mul(unit)
                .and_then(|l| l.checked_add(start))
                .is_some_and(|e| e <= mem)
        };
        let aligned = |gpa: u64| gpa % PAGE_SIZE == 0;
        let e = &self.entries;
        let mut r = kvm_regs {
            rflags: RFLAGS_IOPL3,
            ..Default::default()
        };
        match op {
            GuestOp::ReadSum {
                first_gpa,
                pages,
                stride_pages,
            }
            | GuestOp::Write {
                first_gpa,
                pages,
                stride_pages,
                ..
            } => {
                let is_write = matches!(op, GuestOp::Write { .. });
                let stride = stride_pages.checked_mul(PAGE_SIZE);
                let last = stride.and_then(|s| s.checked_mul(pages.saturating_sub(1)));
                let last = last.and_then(|l| l.checked_add(first_gpa));
                if !aligned(first_gpa) {
                    return bad("first_gpa not page aligned");
                }
                if pages > 0 && !last.is_some_and(|l| fits(l, 1, PAGE_SIZE)) {
                    return bad("pages beyond guest memory");
                }
                if is_write && first_gpa < DATA_START {
                    return bad("writes must stay in the data area");
                }
                (r.rsi, r.r13, r.rbx) = (first_gpa, pages, stride.unwrap_or(0));
                r.rip = if let GuestOp::Write { seed, .. } = op {
                    r.r9 = seed;
                    e.write
                } else {
                    e.read_sum
                };
            }
            GuestOp::ReadRandom {
                first_gpa,
                range_pages,
                count,
                seed,
            } => {
                if !aligned(first_gpa) {
                    return bad("first_gpa not page aligned");
                }
                if count > 0 && (range_pages == 0 || !fits(first_gpa, range_pages, PAGE_SIZE)) {
                    return bad("empty range or range beyond guest memory");
                }
                (r.rsi, r.r9, r.r13, r.r10) = (first_gpa, range_pages, count, random_state(seed));
                r.rip = e.read_random;
            }
            GuestOp::ReadList { list_gpa, count } => {
                if list_gpa % 8 != 0 || !fits(list_gpa, count, 8) {
                    return bad("list misaligned or beyond guest memory");
                }
                (r.rsi, r.r13, r.rip) = (list_gpa, count, e.read_list);
            }
            GuestOp::ReportFree { gpa, len, wait } => {
                if !aligned(gpa) || !aligned(len) || len == 0 {
                    return bad("range empty or not page aligned");
                }
                if gpa < DATA_START || !fits(gpa, len, 1) {
                    return bad("range outside the data area");
                }
                r.rdi = MAILBOX_GPA + u64::from(vcpu) * RING_LEN;
                (r.rsi, r.rdx, r.rcx, r.rip) = (gpa, len, u64::from(wait), e.report_free);
            }
        }
        r.rip += CODE_GPA;
        Ok(r)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = (&*self.kick).write_all(&1u64.to_ne_bytes()) {
            tracing::error!(error = %e, "cannot wake the balloon thread");
            return; // Leak the thread rather than hang.
        }
        if let Some(t) = self.balloon.take()
            && t.join().is_err()
        {
            tracing::error!("the balloon thread panicked");
        }
    }
}

/// Why `KVM_RUN` returned to [`Vm::run`].
enum Stop {
    /// The guest wrote to [`DONE_PORT`].
    Done,
    /// `KVM_EXIT_INTERNAL_ERROR` (details in the `kvm_run` page).
    Internal,
    /// Any other exit, described.
    Other(String),
}

/// Describes a `KVM_EXIT_INTERNAL_ERROR` from the `kvm_run` page.
fn internal_error(run: &kvm_bindings::kvm_run) -> String {
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return "InternalError".into();
    }
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the `internal`
    // member of the union; it is plain old data, so reading it is sound in any case.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    format!(
        "InternalError (suberror {}, data {:x?})",
        internal.suberror,
        &internal.data[..n]
    )
}
