//! A tiny KVM VMM and guest program, so that tests can have a real vCPU touch guest memory that
//! snapfault serves through userfaultfd.
//!
//! The caller maps the guest memory (anonymous private, 4 KiB or `MAP_HUGETLB` 2 MiB pages),
//! fills it with the image of [`write_image`] (or registers it with a userfaultfd whose server
//! serves that image), and creates a [`Vm`] over it. [`Vm::run`] then runs one [`GuestOp`] on a
//! vCPU on the calling thread and returns the guest's checksum, which the host-side models
//! ([`expected_sum`], [`random_pages`], [`PageContent`]) predict.
//!
//! # Design
//!
//! **CPU mode: 64-bit long mode, paging on, guest code at CPL 3.** The machine's `/dev/kvm` is
//! PVM (pagetable-based paravirtual KVM, no VMX/SVM): the guest's ring-0 code is emulated
//! instruction by instruction, while ring-3 code runs natively under shadow paging. Measured on
//! the 2-core development machine: folding 6 MiB already-populated memory took ~3.9 s at CPL 0
//! but ~6 ms at CPL 3, so the VMM enters user mode directly: `KVM_SET_SREGS` loads DPL-3
//! code/stack segments (selectors 0x23/0x1b of the image's GDT), EFER.LME|LMA, CR0.PG|PE,
//! CR4.PAE, and RFLAGS has IOPL=3 so that the guest's `out` instructions are allowed (they trap
//! to KVM, which emulates them). No guest kernel, IDT, TSS or interrupt controller exists: the
//! guest never takes an interrupt, and an exception ends the run (KVM reports a shutdown).
//!
//! **Memory layout** (guest physical = guest virtual, one memslot at gpa 0):
//!
//! | gpa | content |
//! | --- | --- |
//! | [`GDT_GPA`] | GDT |
//! | [`MAILBOX_GPA`] | balloon mailbox: one 256-byte ring per vCPU |
//! | [`CODE_GPA`] | the guest program (one entry point per [`GuestOp`]) |
//! | [`PML4_GPA`], [`PDPT_GPA`] | PML4 and PDPT |
//! | [`PD_GPA`].. | identity map of `[0, mem_size)`, 2 MiB pages (U/S, A/D preset), a PD per GiB |
//! | [`LIST_GPA`] | scratch area for [`GuestOp::ReadList`] lists ([`LIST_LEN`] bytes) |
//! | [`DATA_START`].. | data area: [`pattern_word`] of each word's gpa |
//!
//! 1 GiB pages are not used: this KVM does not offer them to guests (CPUID `pdpe1gb` is clear),
//! so a 1 GiB PDPTE is reserved and the first fetch shut the vCPU down. The guest always works
//! in 4 KiB steps ([`PAGE_SIZE`]), also on 2 MiB host pages.
//!
//! **Speed** (2-core development machine, PVM): `ReadSum` over 16 MiB of populated, already
//! guest-touched memory takes ~4 ms (~4 GB/s); the first guest touch of each 4 KiB page adds a
//! shadow page fault (~2.5 µs each when the host memory is populated), resolved inside
//! `KVM_RUN`. Served through a userfaultfd (one 4 KiB `UFFDIO_COPY` per fault by a thread of
//! the same process) a first read cost ~50 µs per page; with 2 MiB hugetlb pages, one fault
//! per 2 MiB.
//!
//! **Running an operation.** [`Vm::run`] sets RIP to the op's entry and the parameters in
//! registers (the host never writes them into guest memory), then calls `KVM_RUN` until the
//! guest writes to [`DONE_PORT`] (a `KVM_EXIT_IO` exit); the result is in RAX. Any other exit
//! is returned as [`KvmError::UnexpectedExit`] with the exit reason and RIP. First touches of
//! guest memory by the vCPU are resolved inside `KVM_RUN` (shadow page faults that call
//! `get_user_pages`, which may block in a userfaultfd fault), so they do not count as exits.
//!
//! **Balloon.** [`GuestOp::ReportFree`] posts `(gpa, len)` into its vCPU's ring in the mailbox
//! (`[posted, done, 8 x (gpa, len)]`, slot = `posted % 8`), bumps `posted`, and writes to
//! [`BALLOON_PORT`], which is bound to an eventfd by `KVM_IOEVENTFD`, so the vCPU does not
//! exit to userspace. A VMM thread owned by the [`Vm`] waits on the eventfd, reads the rings,
//! calls `madvise(MADV_DONTNEED)` on each reported range (like Firecracker's balloon device on
//! its own thread) and bumps `done`. With `wait: true` the guest spins (`pause`) until `done`
//! reaches its report; with a full ring it spins until a slot is free.
//!
//! **Host touches of guest memory:** only the VMM thread reading/updating the mailbox page,
//! and [`Vm::write_words`] (e.g. to place a [`GuestOp::ReadList`] list). [`Vm::new`] and
//! [`Vm::run`] do not touch guest memory (KVM reads the page tables on the vCPU's behalf).
//!
//! # Limitations
//!
//! - At most [`MAX_VCPUS`] vCPUs and [`MAX_MEM_SIZE`] of memory; `mem_size` a multiple of
//!   2 MiB and at least [`MIN_MEM_SIZE`].
//! - No interrupts or exceptions: a guest fault (e.g. a `ReadList` entry outside memory) ends
//!   the run with an error, and the vCPU's state is then whatever KVM left (the next run sets
//!   the registers again).
//! - [`Vm::run`] has no timeout: if the VMM thread never completes a `wait: true` report (for
//!   instance because its mailbox read blocks in a userfaultfd fault nobody serves), the run
//!   spins forever; dropping the [`Vm`] likewise waits for that thread.
//! - The memory must stay mapped for the whole life of the [`Vm`] (see [`Vm::new`]).
//! - The checksums model only the data area; reads of the system area are allowed but are not
//!   modelled by [`PageContent`].

#[allow(unsafe_code)]
mod balloon;
mod guest;
mod image;
#[cfg(test)]
#[allow(unsafe_code)]
mod tests;
#[allow(unsafe_code)]
mod vm;

pub use image::{
    FOLD_INIT, FOLD_MUL, PageContent, expected_sum, fold, fold_page, pattern_word, random_pages,
    strided_pages, write_image, write_word,
};
pub use vm::Vm;

/// The page size the guest works in (also on 2 MiB host pages).
pub const PAGE_SIZE: u64 = 4096;
/// Guest physical address of the GDT.
pub const GDT_GPA: u64 = 0x0000;
/// Guest physical address of the balloon mailbox page (one [`RING_LEN`]-byte ring per vCPU).
pub const MAILBOX_GPA: u64 = 0x1000;
/// Guest physical address of the guest program.
pub const CODE_GPA: u64 = 0x2000;
/// Bytes reserved for the guest program.
pub const CODE_LEN: u64 = 0x2000;
/// Guest physical address of the PML4.
pub const PML4_GPA: u64 = 0x4000;
/// Guest physical address of the page-directory-pointer table.
pub const PDPT_GPA: u64 = 0x5000;
/// Guest physical address of the first page directory (one page per GiB of memory).
pub const PD_GPA: u64 = 0x6000;
/// Guest physical address of the scratch area for [`GuestOp::ReadList`] lists.
pub const LIST_GPA: u64 = 0x10_0000;
/// Length of the list scratch area (room for 131072 gpas).
pub const LIST_LEN: u64 = 0x10_0000;
/// Start of the data area (2 MiB aligned); everything below is the system area.
pub const DATA_START: u64 = 0x20_0000;
/// Length of the system area at the start of the image.
pub const SYSTEM_AREA_LEN: u64 = DATA_START;
/// The smallest supported memory size.
pub const MIN_MEM_SIZE: u64 = DATA_START + (2 << 20);
/// The largest supported memory size (limited by the page directories in the system area).
pub const MAX_MEM_SIZE: u64 = 64 << 30;
/// The most vCPUs a [`Vm`] can have (limited by the rings in the mailbox page).
pub const MAX_VCPUS: u32 = (PAGE_SIZE / RING_LEN) as u32;
/// Bytes per vCPU ring in the mailbox: `posted`, `done`, then [`RING_SLOTS`] `(gpa, len)`.
pub const RING_LEN: u64 = 256;
/// Reports a vCPU can have in flight (a power of two).
pub const RING_SLOTS: u64 = 8;
/// The port the guest writes to when an operation is done (exits to the VMM).
pub const DONE_PORT: u8 = 0xe0;
/// The port the guest writes to after posting a report (bound to an ioeventfd).
pub const BALLOON_PORT: u8 = 0xe4;

/// Returns [`SYSTEM_AREA_LEN`].
pub fn system_area_len() -> u64 {
    SYSTEM_AREA_LEN
}

/// One guest operation, run by [`Vm::run`]. Page gpas are 4 KiB aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOp {
    /// Folds every word of `pages` pages from `first_gpa`, `stride_pages` pages apart
    /// (see [`strided_pages`]). Returns the checksum.
    ReadSum {
        /// First page.
        first_gpa: u64,
        /// Number of pages visited.
        pages: u64,
        /// Distance between visited pages, in pages (0 re-reads the same page).
        stride_pages: u64,
    },
    /// Folds every word of `count` pages drawn from `[0, range_pages)` pages after
    /// `first_gpa` (see [`random_pages`]). Returns the checksum.
    ReadRandom {
        /// First page of the range.
        first_gpa: u64,
        /// Pages in the range (at least 1 when `count > 0`).
        range_pages: u64,
        /// Number of pages visited.
        count: u64,
        /// Seed of the page sequence.
        seed: u64,
    },
    /// Folds every word of the `count` pages whose gpas are listed (u64 each) at `list_gpa`,
    /// e.g. in [`LIST_GPA`] and placed there by [`Vm::write_words`]. Returns the checksum.
    ReadList {
        /// Address of the list (8-aligned).
        list_gpa: u64,
        /// Number of entries.
        count: u64,
    },
    /// Writes [`write_word`]`(gpa, seed)` to every word of `pages` pages from `first_gpa`,
    /// `stride_pages` apart (data area only). Returns `pages`.
    Write {
        /// First page (at least [`DATA_START`]).
        first_gpa: u64,
        /// Number of pages written.
        pages: u64,
        /// Distance between written pages, in pages.
        stride_pages: u64,
        /// Seed of the written words.
        seed: u64,
    },
    /// Reports `[gpa, gpa + len)` (data area, 4 KiB aligned, `len > 0`) free to the balloon
    /// thread, which discards it with `MADV_DONTNEED`. With `wait`, the guest spins until the
    /// report is done. Returns the number of reports this vCPU's ring has posted so far.
    ReportFree {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
        /// Spin until the balloon thread has discarded the range.
        wait: bool,
    },
}

impl GuestOp {
    /// The pages a `ReadSum`, `ReadRandom` or `Write` visits, in order (`None` for the others,
    /// whose pages depend on guest memory or are not visited).
    pub fn visited_pages(&self) -> Option<Vec<u64>> {
        match *self {
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
            } => Some(strided_pages(first_gpa, pages, stride_pages).collect()),
            GuestOp::ReadRandom {
                first_gpa,
                range_pages,
                count,
                seed,
            } => Some(random_pages(first_gpa, range_pages, count, seed)),
            GuestOp::ReadList { .. } | GuestOp::ReportFree { .. } => None,
        }
    }
}

/// The result of one [`Vm::run`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The guest's result (RAX): the checksum of a read, see [`GuestOp`] for the others.
    pub value: u64,
    /// How many times `KVM_RUN` returned (1 when only the final done exit happened).
    pub exits: u64,
}

/// Errors of [`Vm`], named after the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The guest memory given to [`Vm::new`] is unusable.
    #[error("bad guest memory at {host_addr:#x}, {mem_size} bytes: {reason}")]
    BadMemory {
        /// The host address.
        host_addr: usize,
        /// The size.
        mem_size: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The vCPU count given to [`Vm::new`] is 0 or above [`MAX_VCPUS`].
    #[error("bad vCPU count {vcpus} (1..={MAX_VCPUS})")]
    BadVcpuCount {
        /// The count.
        vcpus: u32,
    },
    /// Opening `/dev/kvm` failed.
    #[error("open /dev/kvm: {source}")]
    OpenKvm {
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_CREATE_VM` failed.
    #[error("create VM: {source}")]
    CreateVm {
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("set memory region of {mem_size} bytes: {source}")]
    SetMemoryRegion {
        /// The size.
        mem_size: u64,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("get supported CPUID: {source}")]
    GetSupportedCpuid {
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A vCPU ioctl failed (`op` names it: create, set CPUID, get/set (s)regs).
    #[error("{op} of vCPU {vcpu}: {source}")]
    VcpuIoctl {
        /// The operation.
        op: &'static str,
        /// The vCPU index.
        vcpu: u32,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Creating the balloon eventfd failed.
    #[error("create balloon eventfd: {source}")]
    CreateEventfd {
        /// The error.
        source: std::io::Error,
    },
    /// `KVM_IOEVENTFD` for the balloon port failed.
    #[error("register ioeventfd on port {port:#x}: {source}")]
    RegisterIoeventfd {
        /// The port.
        port: u8,
        /// The error.
        source: std::io::Error,
    },
    /// Spawning the balloon thread failed.
    #[error("spawn balloon thread: {source}")]
    SpawnBalloonThread {
        /// The error.
        source: std::io::Error,
    },
    /// [`Vm::run`] was given a vCPU index the VM does not have.
    #[error("no vCPU {vcpu} (the VM has {vcpus})")]
    NoSuchVcpu {
        /// The index.
        vcpu: u32,
        /// The VM's vCPU count.
        vcpus: u32,
    },
    /// [`Vm::run`] was given an operation with bad parameters.
    #[error("bad operation {op:?}: {reason}")]
    BadOp {
        /// The operation.
        op: GuestOp,
        /// What is wrong.
        reason: &'static str,
    },
    /// [`Vm::write_words`] was given a range outside guest memory or misaligned.
    #[error("bad guest range {gpa:#x}+{len} (memory is {mem_size} bytes)")]
    BadGuestRange {
        /// The start.
        gpa: u64,
        /// The length in bytes.
        len: u64,
        /// The memory size.
        mem_size: u64,
    },
    /// `KVM_RUN` failed.
    #[error("run vCPU {vcpu}: {source}")]
    Run {
        /// The vCPU index.
        vcpu: u32,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The vCPU exited for another reason than the done port.
    #[error("vCPU {vcpu} exited unexpectedly: {reason} at rip {rip:#x}")]
    UnexpectedExit {
        /// The vCPU index.
        vcpu: u32,
        /// The exit reason (and details such as the port or the internal-error sub-code).
        reason: String,
        /// The guest's RIP after the exit.
        rip: u64,
    },
}
