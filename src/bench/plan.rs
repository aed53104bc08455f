//! The cases of one bench run, in the order every repetition runs them.
//!
//! Cases compared with each other sit next to each other (the minimal
//! handler and snapfault of one shape, the spins of one shape, the two
//! bulk installs), so that each pair runs seconds apart in every
//! repetition and a ratio taken within a repetition sees one machine.

use std::path::PathBuf;
use std::time::Duration;

use super::host::{Server, SnapConfig};
use super::spec::{Access, ChildSpec, Faulter, Memory, Page, Pattern, Role};
use crate::serve::Config;
use crate::testkit::kvm::DATA_START;

/// Sleep before each isolated REMOVE: Firecracker's free page reporting
/// sends one every few tenths of a millisecond.
pub const REMOVE_GAP_US: u64 = 300;

/// Sizes and counts of one bench run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sizes {
    /// Bytes each 4 KiB fault case touches.
    pub fault: u64,
    /// Bytes each 2 MiB fault case touches.
    pub huge: u64,
    /// Bytes of the ready-time working set.
    pub working_set: u64,
    /// Bytes of the bulk install.
    pub bulk: u64,
    /// `madvise` lengths of the REMOVE cases.
    pub remove_lens: Vec<u64>,
    /// `madvise` calls per length per repetition.
    pub remove_calls: u32,
    /// `Config::spin` values tried, microseconds.
    pub spins_us: Vec<u64>,
}

/// What a case runs.
#[derive(Debug, Clone)]
pub enum Work {
    /// A child process, served by `server`.
    Child {
        /// The child's role.
        role: Role,
        /// Its spec.
        spec: ChildSpec,
        /// Who serves it.
        server: Server,
        /// The CPU the serving thread is pinned to, if any.
        server_cpu: Option<usize>,
    },
    /// `memcpy` of this many bytes in the parent.
    Memcpy(u64),
}

/// One case: a key (stable across runs, used in the JSON) and its work.
#[derive(Debug, Clone)]
pub struct Case {
    /// E.g. `fault/thread1/seq/4k/snapfault`.
    pub key: String,
    /// What runs.
    pub work: Work,
}

/// The shape of a fault case: who faults, how many, in which order, on
/// which pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Thread or vCPU.
    pub faulter: Faulter,
    /// Faulting threads or vCPUs.
    pub threads: u32,
    /// Order of first touches.
    pub pattern: Pattern,
    /// Page size.
    pub page: Page,
}

impl Shape {
    /// A shape on 4 KiB pages.
    pub fn small(faulter: Faulter, threads: u32, pattern: Pattern) -> Shape {
        Shape {
            faulter,
            threads,
            pattern,
            page: Page::Small,
        }
    }

    /// The key prefix, e.g. `fault/vcpu2/rand/2m`.
    pub fn key(&self) -> String {
        let (f, p) = (self.faulter.label(), self.pattern.label());
        format!("fault/{f}{}/{p}/{}", self.threads, self.page.label())
    }

    /// Every shape the fault table has, in its order.
    pub fn all(kvm: bool, huge: bool) -> Vec<Shape> {
        let mut out = Vec::new();
        let pages: &[Page] = if huge {
            &[Page::Small, Page::Huge]
        } else {
            &[Page::Small]
        };
        let faulters: &[Faulter] = if kvm {
            &[Faulter::Thread, Faulter::Vcpu]
        } else {
            &[Faulter::Thread]
        };
        for &page in pages {
            for &faulter in faulters {
                for threads in [1, 2] {
                    for pattern in [Pattern::Seq, Pattern::Random] {
                        out.push(Shape {
                            faulter,
                            threads,
                            pattern,
                            page,
                        });
                    }
                }
            }
        }
        out
    }
}

/// The `Config::spin` snapfault uses when not told otherwise, in us.
pub fn default_spin_us() -> u64 {
    Config::default().spin.as_micros() as u64
}

/// The server label of a spin-sweep case.
pub fn spin_label(spin_us: u64) -> String {
    format!("snapfault-spin{spin_us}")
}

/// The shapes the spin sweep runs (the vCPU ones only with KVM).
pub fn spin_shapes(kvm: bool) -> Vec<Shape> {
    let mut shapes = vec![
        Shape::small(Faulter::Thread, 1, Pattern::Seq),
        Shape::small(Faulter::Thread, 2, Pattern::Random),
    ];
    if kvm {
        shapes.push(Shape::small(Faulter::Vcpu, 1, Pattern::Seq));
        shapes.push(Shape::small(Faulter::Vcpu, 2, Pattern::Seq));
    }
    shapes
}

/// A child spec for `shape` over `bytes` of touched memory.
pub fn spec(shape: Shape, bytes: u64, memory: Memory, access: Access) -> ChildSpec {
    let len = match shape.faulter {
        Faulter::Thread => bytes,
        Faulter::Vcpu => DATA_START + bytes,
    };
    ChildSpec {
        socket: None,
        memfile: PathBuf::new(),
        len,
        page: shape.page,
        memory,
        faulter: shape.faulter,
        threads: shape.threads,
        pattern: shape.pattern,
        access,
        seed: 0x5eed,
        remove_lens: Vec::new(),
        remove_calls: 0,
        remove_gap_us: 0,
        cpu: None,
    }
}

/// A snapfault server.
pub fn snap(spin_us: u64, check_resident: bool, install_ahead: bool) -> Server {
    let spin = Duration::from_micros(spin_us);
    Server::Snapfault(SnapConfig {
        spin,
        check_resident,
        install_ahead,
    })
}

fn child(key: String, role: Role, spec: ChildSpec, server: Server) -> Case {
    let work = Work::Child {
        role,
        spec,
        server,
        server_cpu: None,
    };
    Case { key, work }
}

fn fault_cases(out: &mut Vec<Case>, sizes: &Sizes, kvm: bool, huge: bool) {
    let default = default_spin_us();
    for shape in Shape::all(kvm, huge) {
        let bytes = if shape.page == Page::Huge {
            sizes.huge
        } else {
            sizes.fault
        };
        let key = shape.key();
        let kernel = |memory, access, label: &str| {
            let spec = spec(shape, bytes, memory, access);
            child(format!("{key}/{label}"), Role::Touch, spec, Server::Kernel)
        };
        if shape.faulter == Faulter::Thread && shape.page == Page::Small {
            out.push(kernel(Memory::PrivateFile, Access::Read, "kernel-read"));
            out.push(kernel(Memory::PrivateFile, Access::Write, "kernel-cow"));
        }
        out.push(kernel(Memory::Anon, Access::Write, "kernel-zero"));
        let uffd = spec(shape, bytes, Memory::Uffd, Access::Read);
        let minimal = Server::Minimal { bulk: false };
        out.push(child(
            format!("{key}/minimal"),
            Role::Touch,
            uffd.clone(),
            minimal,
        ));
        let sf = snap(default, true, false);
        out.push(child(
            format!("{key}/snapfault"),
            Role::Touch,
            uffd.clone(),
            sf,
        ));
        if shape == Shape::small(Faulter::Thread, 1, Pattern::Seq) {
            let sf = snap(default, false, false);
            out.push(child(
                format!("{key}/snapfault-nocheck"),
                Role::Touch,
                uffd,
                sf,
            ));
        }
    }
}

/// A REMOVE child over the largest length, `gap` us between calls.
pub fn remove_spec(sizes: &Sizes, gap: u64) -> ChildSpec {
    let len = sizes.remove_lens.iter().copied().max().unwrap_or(4096);
    let mut s = spec(
        Shape::small(Faulter::Thread, 1, Pattern::Seq),
        len,
        Memory::Uffd,
        Access::Read,
    );
    s.remove_lens = sizes.remove_lens.clone();
    s.remove_calls = sizes.remove_calls;
    s.remove_gap_us = gap;
    s
}

/// Every case of a run, in the order each repetition runs them; the
/// placement cases only with `placements` (two CPUs or more).
pub fn cases(sizes: &Sizes, kvm: bool, huge: bool, placements: bool) -> Vec<Case> {
    let mut out = Vec::new();
    fault_cases(&mut out, sizes, kvm, huge);
    for shape in spin_shapes(kvm) {
        let uffd = spec(shape, sizes.fault, Memory::Uffd, Access::Read);
        let minimal = Server::Minimal { bulk: false };
        out.push(child(
            format!("{}/minimal-sweep", shape.key()),
            Role::Touch,
            uffd.clone(),
            minimal,
        ));
        for &spin in &sizes.spins_us {
            let key = format!("{}/{}", shape.key(), spin_label(spin));
            out.push(child(
                key,
                Role::Touch,
                uffd.clone(),
                snap(spin, true, false),
            ));
        }
    }
    let thread1 = Shape::small(Faulter::Thread, 1, Pattern::Seq);
    if placements {
        super::placement::cases(&mut out, sizes, kvm);
    }
    for (mode, gap) in [("remove", REMOVE_GAP_US), ("remove-burst", 0)] {
        for (label, server) in [
            ("kernel", Server::Kernel),
            ("minimal", Server::Minimal { bulk: false }),
            ("snapfault", snap(default_spin_us(), true, false)),
        ] {
            let mut spec = remove_spec(sizes, gap);
            if server == Server::Kernel {
                spec.memory = Memory::Anon;
            }
            out.push(child(format!("{mode}/{label}"), Role::Remove, spec, server));
        }
    }
    let hold = spec(thread1, sizes.bulk, Memory::Uffd, Access::Read);
    for (label, server) in [
        ("snapfault", snap(default_spin_us(), true, true)),
        ("raw-copy", Server::Minimal { bulk: true }),
    ] {
        out.push(child(
            format!("bulk/{label}"),
            Role::Hold,
            hold.clone(),
            server,
        ));
    }
    out.push(Case {
        key: "bulk/memcpy".into(),
        work: Work::Memcpy(sizes.bulk),
    });
    if kvm {
        let vcpu1 = Shape::small(Faulter::Vcpu, 1, Pattern::Seq);
        let ready = spec(vcpu1, sizes.working_set, Memory::Uffd, Access::Read);
        for (label, ahead) in [("on-demand", false), ("install-ahead", true)] {
            let sf = snap(default_spin_us(), true, ahead);
            out.push(child(
                format!("ready/{label}"),
                Role::Ready,
                ready.clone(),
                sf,
            ));
        }
    }
    out
}

/// The memory file length every case fits in.
pub fn memfile_len(cases: &[Case]) -> u64 {
    let longest = cases
        .iter()
        .map(|c| match &c.work {
            Work::Child { spec, .. } => spec.len,
            Work::Memcpy(len) => *len,
        })
        .max()
        .unwrap_or(0);
    longest
        .max(crate::testkit::kvm::MIN_MEM_SIZE)
        .next_multiple_of(2 << 20)
}

/// Hugepages (2 MiB) the largest hugetlb case needs at once.
pub fn hugepages_needed(sizes: &Sizes) -> u64 {
    (DATA_START + sizes.huge) / (2 << 20) + 1
}

/// `4k`, `2m`, `64m`: a length in the units the tables use.
pub fn size_label(len: u64) -> String {
    if len >= 1 << 20 && len % (1 << 20) == 0 {
        format!("{}m", len >> 20)
    } else {
        format!("{}k", len >> 10)
    }
}
