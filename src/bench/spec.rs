//! What the parent asks of a child process, and what the child answers.
//!
//! Both travel as JSON: the spec on the child's command line, the result
//! as one line on its stdout that holds [`RESULT_TAG`] and then the JSON
//! (what comes before the tag, and other lines, such as a test harness's
//! chatter, are ignored).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::stats::{Counts, Latency};

/// Prefix of the child's result line.
pub const RESULT_TAG: &str = "bench-result ";
/// Prefix of the child's error line.
pub const ERROR_TAG: &str = "bench-error ";

/// Guest page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Page {
    /// 4 KiB pages.
    Small,
    /// 2 MiB hugetlb pages.
    Huge,
}

impl Page {
    /// Bytes per page.
    pub fn bytes(self) -> u64 {
        match self {
            Page::Small => 4 << 10,
            Page::Huge => 2 << 20,
        }
    }

    /// `4k` or `2m`.
    pub fn label(self) -> &'static str {
        match self {
            Page::Small => "4k",
            Page::Huge => "2m",
        }
    }
}

/// Order in which pages are first touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pattern {
    /// Ascending; with two faulters each takes one contiguous half.
    Seq,
    /// A seeded permutation of every page; each faulter takes half of it.
    Random,
}

impl Pattern {
    /// `seq` or `rand`.
    pub fn label(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Random => "rand",
        }
    }
}

/// Who touches the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Faulter {
    /// A plain thread of the child: a host (VMM) access.
    Thread,
    /// A KVM vCPU of the test kit's VM, run by a thread of the child.
    Vcpu,
}

impl Faulter {
    /// `thread` or `vcpu`.
    pub fn label(self) -> &'static str {
        match self {
            Faulter::Thread => "thread",
            Faulter::Vcpu => "vcpu",
        }
    }
}

/// How a thread touches a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    /// Load one byte.
    Read,
    /// Store one byte.
    Write,
}

/// What backs the child's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Memory {
    /// Firecracker's guest memory, registered with a userfaultfd handed to
    /// the parent's server through the handshake.
    Uffd,
    /// A private, writable mapping of the memory file: the kernel's own
    /// read fault (page cache, with fault-around) or copy-on-write fault.
    PrivateFile,
    /// Anonymous memory without a userfaultfd: the kernel's zero-fill.
    Anon,
}

/// What a child does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Touches every page once and times it.
    Touch,
    /// Times `madvise(MADV_DONTNEED)` calls.
    Remove,
    /// Hands over its memory and waits until stdin closes (bulk install).
    Hold,
    /// One vCPU reads the whole data area once: the ready time.
    Ready,
}

impl Role {
    /// The name used on the child's command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Touch => "touch",
            Role::Remove => "remove",
            Role::Hold => "hold",
            Role::Ready => "ready",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Role> {
        [Role::Touch, Role::Remove, Role::Hold, Role::Ready]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// Everything a child needs besides its role.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildSpec {
    /// The server's socket, for [`Memory::Uffd`].
    pub socket: Option<PathBuf>,
    /// The memory file (for [`Memory::PrivateFile`]).
    pub memfile: PathBuf,
    /// Bytes of memory; the region maps the memory file from offset 0.
    pub len: u64,
    /// Page size.
    pub page: Page,
    /// What backs the memory.
    pub memory: Memory,
    /// Who touches it.
    pub faulter: Faulter,
    /// Threads or vCPUs touching at once.
    pub threads: u32,
    /// Order of first touches.
    pub pattern: Pattern,
    /// Load or store (threads only; vCPUs read).
    pub access: Access,
    /// Seed of the random order.
    pub seed: u64,
    /// `madvise` lengths, for [`Role::Remove`].
    pub remove_lens: Vec<u64>,
    /// Calls per length, for [`Role::Remove`].
    pub remove_calls: u32,
    /// Sleep before each call, us (0: calls back to back), so that the
    /// server has gone to sleep when the REMOVE comes.
    pub remove_gap_us: u64,
    /// Pin the child (all its threads) to this CPU.
    pub cpu: Option<usize>,
}

/// Medians of one child's `madvise` calls of one length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoveTimes {
    /// Bytes per call.
    pub len: u64,
    /// Median call time.
    pub median_ns: u64,
    /// Fastest call.
    pub min_ns: u64,
    /// Slowest call.
    pub max_ns: u64,
}

/// What a child measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChildResult {
    /// Pages first touched in the timed part (or `madvise` calls).
    pub touches: u64,
    /// From the first faulter's start to the last one's end.
    pub wall_ns: u64,
    /// Per-touch latency (threads only: a vCPU cannot be timed per touch).
    pub latency: Option<Latency>,
    /// Kernel counters of the timed threads, summed.
    pub counts: Counts,
    /// `KVM_RUN` returns in the timed part.
    pub exits: u64,
    /// Per-length `madvise` times, for [`Role::Remove`].
    pub removes: Vec<RemoveTimes>,
}
