//! The balloon side of the VMM: the ioeventfd the guest kicks, and the thread that completes
//! the reports posted in the mailbox (like Firecracker's balloon device on its own thread).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_bindings::kvm_ioeventfd;
use kvm_ioctls::VmFd;

use super::{BALLOON_PORT, DATA_START, KvmError, MAILBOX_GPA, PAGE_SIZE, RING_LEN, RING_SLOTS};

/// `KVM_IOEVENTFD` = `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)` (64 bytes).
const KVM_IOEVENTFD: u64 = (1 << 30) | (64 << 16) | (0xae << 8) | 0x79;
/// `kvm_ioeventfd.flags`: the address is a PIO port.
const IOEVENTFD_FLAG_PIO: u32 = 1 << 1;

/// Creates the balloon eventfd and binds it to [`BALLOON_PORT`] with `KVM_IOEVENTFD`.
pub(crate) fn register_balloon_eventfd(vm: &VmFd) -> Result<File, KvmError> {
    // SAFETY: eventfd(2) takes no pointers; the result is checked below.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        let source = std::io::Error::last_os_error();
        return Err(KvmError::CreateEventfd { source });
    }
    // SAFETY: `raw` is a freshly created, valid file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let req = kvm_ioeventfd {
        addr: u64::from(BALLOON_PORT),
        len: 1,
        fd: fd.as_raw_fd(),
        flags: IOEVENTFD_FLAG_PIO,
        ..Default::default()
    };
    // SAFETY: KVM_IOEVENTFD reads one `struct kvm_ioeventfd` from the pointer, which points to
    // a live, fully initialized value of that type; the VM and event fds are valid.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_IOEVENTFD as _, &req) };
    if ret < 0 {
        let source = std::io::Error::last_os_error();
        return Err(KvmError::RegisterIoeventfd {
            port: BALLOON_PORT,
            source,
        });
    }
    Ok(File::from(fd))
}

/// What the balloon thread needs (everything `Send`; the memory is passed as an address).
pub(crate) struct BalloonThread {
    pub host_addr: usize,
    pub mem_size: u64,
    pub vcpus: u32,
    pub kick: Arc<File>,
    pub stop: Arc<AtomicBool>,
    pub reports_done: Arc<AtomicU64>,
}

impl BalloonThread {
    /// The thread's body: waits for kicks until `stop` is set and the eventfd is written.
    pub(crate) fn run(self) {
        let mut buf = [0u8; 8];
        loop {
            match (&*self.kick).read(&mut buf) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "balloon eventfd read failed; thread stops");
                    return;
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            for v in 0..self.vcpus {
                self.drain(v);
            }
        }
    }

    /// Completes the reports posted in vCPU `v`'s ring.
    fn drain(&self, v: u32) {
        let ring = self.host_addr + (MAILBOX_GPA + u64::from(v) * RING_LEN) as usize;
        // SAFETY: the ring lies in the mailbox page inside the mapping, which `Vm::new`'s
        // contract keeps mapped while the `Vm` lives, and the `Vm` joins this thread before it
        // goes away. The addresses are 8-aligned (page-aligned base). The mailbox is shared
        // with the guest, which only ever accesses it with aligned 8-byte moves, so atomics are
        // the right view of it; no Rust reference to it exists elsewhere.
        let (posted, done) = unsafe {
            (
                AtomicU64::from_ptr(ring as *mut u64),
                AtomicU64::from_ptr((ring + 8) as *mut u64),
            )
        };
        let target = posted.load(Ordering::Acquire);
        let mut completed = done.load(Ordering::Relaxed);
        if target.wrapping_sub(completed) > RING_SLOTS {
            tracing::warn!(
                vcpu = v,
                target,
                completed,
                "corrupt balloon ring; resynced"
            );
            done.store(target, Ordering::Release);
            return;
        }
        while completed != target {
            let slot = ring + 16 + ((completed % RING_SLOTS) * 16) as usize;
            // SAFETY: as above: the slot is inside the mailbox page, 8-aligned, and the guest
            // wrote it before publishing `posted` (x86 stores are ordered, and the acquire
            // load above orders these reads after that of `posted`).
            let (gpa, len) = unsafe {
                (
                    (slot as *const u64).read_volatile(),
                    ((slot + 8) as *const u64).read_volatile(),
                )
            };
            self.discard(gpa, len);
            completed = completed.wrapping_add(1);
            done.store(completed, Ordering::Release);
            self.reports_done.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// `madvise(MADV_DONTNEED)` on guest range `[gpa, gpa + len)`, if it is a valid one.
    fn discard(&self, gpa: u64, len: u64) {
        let valid = gpa >= DATA_START
            && gpa % PAGE_SIZE == 0
            && len % PAGE_SIZE == 0
            && gpa.checked_add(len).is_some_and(|e| e <= self.mem_size);
        if !valid {
            tracing::warn!(gpa, len, "balloon report outside the data area ignored");
            return;
        }
        let addr = (self.host_addr + gpa as usize) as *mut libc::c_void;
        // SAFETY: the range was checked to be a page-aligned part of the guest data area inside
        // the mapping (kept alive by `Vm::new`'s contract); discarding guest memory is what the
        // guest asked for, and the caller promised to hold no references into it.
        let ret = unsafe { libc::madvise(addr, len as usize, libc::MADV_DONTNEED) };
        if ret != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(gpa, len, error = %e, "balloon madvise(MADV_DONTNEED) failed");
        }
    }
}
