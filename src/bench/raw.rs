//! The few raw calls the bench needs that [`crate::sys`] does not wrap:
//! a private, writable mapping of the memory file (the kernel's own
//! faults), `MADV_NOHUGEPAGE`, pinning a thread to a CPU, and a test-kit
//! VM over a mapping it borrows for its whole life. Every `unsafe` block
//! of the bench is here.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};

use crate::sys::mem::Mapping;
use crate::testkit::kvm::{KvmError, Vm};

/// A `MAP_PRIVATE`, read-write mapping of a file: reads map the page
/// cache, writes copy a page on write. Unmapped on drop.
///
/// Its bytes are only ever accessed through relaxed atomic byte loads and
/// stores, so threads touching it at once never race in Rust's model, and
/// the accesses cannot be optimised away.
#[derive(Debug)]
pub struct PrivateMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is a plain range of address space owned by this
// value; all access goes through atomic operations (see the type's docs).
unsafe impl Send for PrivateMap {}
// SAFETY: as for `Send`: shared access is atomic byte loads and stores.
unsafe impl Sync for PrivateMap {}

impl PrivateMap {
    /// Maps the first `len` bytes of `file` (`len > 0`).
    pub fn file(file: &File, len: usize) -> io::Result<PrivateMap> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a new mapping at an address the kernel picks, aliasing no
        // Rust object; MAP_PRIVATE, so writes never reach the file, and a
        // change of the file by others only changes bytes we read
        // atomically.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(PrivateMap { ptr, len })
    }

    fn byte(&self, offset: usize) -> &AtomicU8 {
        assert!(
            offset < self.len,
            "offset {offset} outside {} bytes",
            self.len
        );
        // SAFETY: `offset` is inside the mapping (asserted), which stays
        // mapped, readable and writable while `self` lives; a byte is always
        // aligned for `AtomicU8`; and every access to these bytes is atomic
        // (this is the only way in), as `from_ptr` requires.
        unsafe { AtomicU8::from_ptr(self.ptr.as_ptr().add(offset)) }
    }

    /// Loads the byte at `offset` (faulting it in).
    pub fn load(&self, offset: usize) -> u8 {
        self.byte(offset).load(Relaxed)
    }

    /// Stores `value` at `offset` (a copy-on-write fault on first store).
    pub fn store(&self, offset: usize, value: u8) {
        self.byte(offset).store(value, Relaxed);
    }
}

impl Drop for PrivateMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `file` mapped; the references `byte`
        // hands out borrow `self`, so none outlives this.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `madvise(MADV_NOHUGEPAGE)` over `map`, so that a zero-fill baseline
/// takes one fault per 4 KiB page even where transparent hugepages are
/// `always`.
pub fn no_huge_pages(map: &Mapping) -> io::Result<()> {
    if map.is_empty() {
        return Ok(());
    }
    // SAFETY: the range is exactly a live mapping this process owns;
    // MADV_NOHUGEPAGE only sets a flag on its VMA and changes no byte.
    let ret = unsafe {
        libc::madvise(
            map.addr() as *mut libc::c_void,
            map.len(),
            libc::MADV_NOHUGEPAGE,
        )
    };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread (and the threads it starts afterwards) to
/// `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: `cpu_set_t` is a plain bit array, for which all-zero is the
    // empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * size_of::<libc::cpu_set_t>() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `cpu` is within the set (checked above); CPU_SET only sets
    // that bit of the exclusively borrowed `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the kernel reads exactly
    // `size_of::<cpu_set_t>()` bytes from the live `set`.
    let ret = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A test-kit [`Vm`] whose guest memory is a [`Mapping`] it borrows
/// exclusively for as long as it lives.
pub struct GuestVm<'m> {
    vm: Vm,
    _memory: PhantomData<&'m mut Mapping>,
}

impl<'m> GuestVm<'m> {
    /// A VM with `vcpus` vCPUs over all of `memory`, which must be an
    /// anonymous (read-write) mapping; over a read-only one the guest's
    /// accesses would fail in KVM.
    pub fn new(memory: &'m mut Mapping, vcpus: u32) -> Result<GuestVm<'m>, KvmError> {
        let host_addr = memory.addr() as *mut u8;
        // SAFETY: `Vm::new` needs a read-write mapping of `mem_size` bytes
        // that stays mapped while the VM lives and that no Rust reference
        // points into. `memory` is such a mapping (`Mapping` unmaps only on
        // drop), and it is borrowed exclusively for `'m`, which outlives
        // the returned value: it can be neither dropped nor read through
        // `bytes()` until the VM (dropped first, as `vm` is our field) is
        // gone.
        let vm = unsafe { Vm::new(host_addr, memory.len() as u64, vcpus) }?;
        Ok(GuestVm {
            vm,
            _memory: PhantomData,
        })
    }
}

impl std::ops::Deref for GuestVm<'_> {
    type Target = Vm;

    fn deref(&self) -> &Vm {
        &self.vm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_map_copies_on_write() {
        let dir = crate::testkit::harness::TempDir::new("bench-raw").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 8192]).unwrap();
        let file = File::open(&path).unwrap();
        let map = PrivateMap::file(&file, 8192).unwrap();
        assert_eq!(map.load(4096), 7);
        map.store(4096, 9);
        assert_eq!(map.load(4096), 9);
        assert_eq!(std::fs::read(&path).unwrap()[4096], 7);
    }
}
