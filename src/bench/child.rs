//! The child process: the VM side of every measurement.
//!
//! It maps its memory as Firecracker does (or, for the kernel baselines,
//! as a private file mapping or plain anonymous memory), does the
//! handshake when a server is to serve it, waits for `go` on stdin, runs
//! its timed part and prints one [`ChildResult`] line. Threads and vCPUs
//! time themselves: `Instant::now` around each touch of a thread, around
//! the whole `KVM_RUN` of a vCPU.

use std::io::BufRead;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Barrier;
use std::time::Instant;

use super::raw::{GuestVm, PrivateMap, no_huge_pages};
use super::spec::{
    Access, ChildResult, ChildSpec, Faulter, Memory, Page, Pattern, RemoveTimes, Role,
};
use super::stats::{Counts, Latency};
use crate::handshake::{Flavor, encode};
use crate::region::RegionSpec;
use crate::sys::mem::{Advice, Backing, Mapping, read_shared, touch, write_shared};
use crate::sys::sock::send_with_fds;
use crate::sys::uffd::{Uffd, feature, register_mode};
use crate::testkit::kvm::{DATA_START, pattern_word};
use crate::testkit::snapshot::mix;

/// The child's memory and what keeps it served.
struct Guest {
    memory: Backed,
    /// Kept open as Firecracker keeps it (v1.12 on).
    _conn: Option<UnixStream>,
    /// Firecracker keeps its own copy of the userfaultfd.
    _uffd: Option<Uffd>,
}

enum Backed {
    Anon(Mapping),
    Private(PrivateMap),
}

impl Guest {
    fn set_up(spec: &ChildSpec) -> Result<Guest, String> {
        let len = spec.len as usize;
        let backing = match spec.page {
            Page::Small => Backing::Small,
            Page::Huge => Backing::Huge2M,
        };
        let err = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
        match spec.memory {
            Memory::PrivateFile => {
                let file = std::fs::File::open(&spec.memfile).map_err(err("opening memfile"))?;
                let map = PrivateMap::file(&file, len).map_err(err("mapping memfile"))?;
                Ok(Guest {
                    memory: Backed::Private(map),
                    _conn: None,
                    _uffd: None,
                })
            }
            Memory::Anon => {
                let mut map = Mapping::anonymous(len, backing).map_err(err("mapping memory"))?;
                if spec.page == Page::Small {
                    no_huge_pages(&map).map_err(err("MADV_NOHUGEPAGE"))?;
                }
                if spec.faulter == Faulter::Vcpu {
                    // The guest's code and page tables; the data area is
                    // left for the kernel to fill on first touch.
                    let mut file =
                        std::fs::File::open(&spec.memfile).map_err(err("opening memfile"))?;
                    let system = &mut map.bytes_mut()[..DATA_START as usize];
                    std::io::Read::read_exact(&mut file, system).map_err(err("reading memfile"))?;
                }
                Ok(Guest {
                    memory: Backed::Anon(map),
                    _conn: None,
                    _uffd: None,
                })
            }
            Memory::Uffd => {
                let map = Mapping::anonymous(len, backing).map_err(err("mapping memory"))?;
                let (uffd, _) = Uffd::open(feature::EVENT_REMOVE).map_err(|e| e.to_string())?;
                uffd.register(map.addr(), spec.len, register_mode::MISSING)
                    .map_err(|e| e.to_string())?;
                let region = RegionSpec {
                    base: map.addr(),
                    size: spec.len,
                    offset: 0,
                    page_size: spec.page.bytes(),
                };
                let socket = spec
                    .socket
                    .as_ref()
                    .ok_or("no socket to hand the uffd to")?;
                let conn = UnixStream::connect(socket).map_err(err("connecting"))?;
                let payload = encode(&[region], Flavor::Current);
                send_with_fds(conn.as_fd(), payload.as_bytes(), &[uffd.as_fd()])
                    .map_err(err("sending the handshake"))?;
                Ok(Guest {
                    memory: Backed::Anon(map),
                    _conn: Some(conn),
                    _uffd: Some(uffd),
                })
            }
        }
    }

    fn touch(&self, offset: u64, access: Access) {
        let at = offset as usize;
        match (&self.memory, access) {
            (Backed::Anon(m), Access::Read) => {
                std::hint::black_box(touch(m, at));
            }
            (Backed::Anon(m), Access::Write) => write_shared(m, at, &[1]),
            (Backed::Private(p), Access::Read) => {
                std::hint::black_box(p.load(at));
            }
            (Backed::Private(p), Access::Write) => p.store(at, 1),
        }
    }

    /// The word at `offset` (8-aligned).
    fn word(&self, offset: u64) -> u64 {
        let mut w = [0u8; 8];
        match &self.memory {
            Backed::Anon(m) => read_shared(m, offset as usize, &mut w),
            Backed::Private(p) => {
                for (i, b) in w.iter_mut().enumerate() {
                    *b = p.load(offset as usize + i);
                }
            }
        }
        u64::from_le_bytes(w)
    }
}

/// Runs the child's part; the result is printed by the caller.
pub fn run(role: Role, spec: &ChildSpec) -> Result<ChildResult, String> {
    if let Some(cpu) = spec.cpu {
        super::raw::pin_to_cpu(cpu).map_err(|e| format!("pinning to CPU {cpu}: {e}"))?;
    }
    let mut guest = Guest::set_up(spec)?;
    match (role, spec.faulter) {
        (Role::Touch, Faulter::Thread) => {
            wait_go()?;
            touch_threads(&guest, spec)
        }
        (Role::Touch | Role::Ready, Faulter::Vcpu) => {
            let Backed::Anon(map) = &mut guest.memory else {
                return Err("vCPUs need anonymous memory".into());
            };
            let vm = GuestVm::new(map, spec.threads.max(1)).map_err(|e| e.to_string())?;
            wait_go()?;
            if role == Role::Ready {
                super::vcpu::ready(&vm, spec)
            } else {
                super::vcpu::touch(&vm, spec)
            }
        }
        (Role::Remove, _) => {
            wait_go()?;
            removes(&guest, spec)
        }
        (Role::Hold, _) => {
            wait_go()?;
            // Until the parent closes stdin: it measures the installs.
            for line in std::io::stdin().lock().lines() {
                line.map_err(|e| e.to_string())?;
            }
            Ok(ChildResult::default())
        }
        (Role::Ready, Faulter::Thread) => Err("ready time is measured on a vCPU".into()),
    }
}

/// Waits for the parent's `go` line.
fn wait_go() -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading go: {e}"))?;
    match line.trim() {
        "go" => Ok(()),
        other => Err(format!("expected go, got {other:?}")),
    }
}

/// Page indices `0..n` in the order `pattern` touches them.
pub fn page_order(n: u64, pattern: Pattern, seed: u64) -> Vec<u64> {
    let mut order: Vec<u64> = (0..n).collect();
    if pattern == Pattern::Random {
        // Fisher-Yates, drawing from a counter through splitmix64's
        // finalizer.
        for i in (1..order.len()).rev() {
            let draw = mix(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            order.swap(i, (draw % (i as u64 + 1)) as usize);
        }
    }
    order
}

/// `order` cut into `parts` contiguous pieces, one per faulter.
pub fn split(order: &[u64], parts: u32) -> Vec<&[u64]> {
    let size = order.len().div_ceil(parts.max(1) as usize).max(1);
    order.chunks(size).collect()
}

/// One faulter's timed part.
pub struct Timed {
    /// When it started touching.
    pub start: Instant,
    /// When it was done.
    pub end: Instant,
    /// Its kernel counters over that span.
    pub counts: Counts,
    /// Per-touch latencies, ns (threads only).
    pub samples: Vec<u64>,
    /// `KVM_RUN` returns (vCPUs only).
    pub exits: u64,
}

/// The result of all faulters of a run.
pub fn combine(timed: Vec<Timed>, touches: u64) -> ChildResult {
    let start = timed.iter().map(|t| t.start).min();
    let end = timed.iter().map(|t| t.end).max();
    let wall = match (start, end) {
        (Some(s), Some(e)) => e.duration_since(s).as_nanos() as u64,
        _ => 0,
    };
    let mut counts = Counts::default();
    let mut samples = Vec::new();
    let mut exits = 0;
    for t in timed {
        counts.add(&t.counts);
        samples.extend(t.samples);
        exits += t.exits;
    }
    ChildResult {
        touches,
        wall_ns: wall,
        latency: Latency::of(&mut samples),
        counts,
        exits,
        removes: Vec::new(),
    }
}

/// Every thread first-touches its share of the pages, each touch timed.
fn touch_threads(guest: &Guest, spec: &ChildSpec) -> Result<ChildResult, String> {
    let ps = spec.page.bytes();
    let order = page_order(spec.len / ps, spec.pattern, spec.seed);
    let parts = split(&order, spec.threads);
    let barrier = Barrier::new(parts.len());
    let timed: Vec<Timed> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .iter()
            .map(|part| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut samples = Vec::with_capacity(part.len());
                    barrier.wait();
                    let before = Counts::this_thread();
                    let start = Instant::now();
                    for &page in *part {
                        let t = Instant::now();
                        guest.touch(page * ps, spec.access);
                        samples.push(t.elapsed().as_nanos() as u64);
                    }
                    let end = Instant::now();
                    let counts = Counts::this_thread().since(&before);
                    Timed {
                        start,
                        end,
                        counts,
                        samples,
                        exits: 0,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("touch thread"))
            .collect()
    });
    if spec.memory != Memory::Anon {
        for &page in &order {
            let at = page * ps + 8;
            if at >= DATA_START && guest.word(at) != pattern_word(at) {
                return Err(format!("wrong bytes at offset {at:#x}"));
            }
        }
    }
    Ok(combine(timed, order.len() as u64))
}

/// `madvise(MADV_DONTNEED)` calls of each length, each timed.
fn removes(guest: &Guest, spec: &ChildSpec) -> Result<ChildResult, String> {
    let Backed::Anon(map) = &guest.memory else {
        return Err("REMOVE needs anonymous memory".into());
    };
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); spec.remove_lens.len()];
    let before = Counts::this_thread();
    let start = Instant::now();
    // Lengths interleaved call by call, so that drift hits them alike.
    for _ in 0..spec.remove_calls {
        for (i, &len) in spec.remove_lens.iter().enumerate() {
            if spec.remove_gap_us > 0 {
                std::thread::sleep(std::time::Duration::from_micros(spec.remove_gap_us));
            }
            let t = Instant::now();
            map.advise(0, len as usize, Advice::DontNeed)
                .map_err(|e| format!("madvise of {len} bytes: {e}"))?;
            samples[i].push(t.elapsed().as_nanos() as u64);
        }
    }
    let end = Instant::now();
    let counts = Counts::this_thread().since(&before);
    let removes = spec
        .remove_lens
        .iter()
        .zip(samples.iter_mut())
        .map(|(&len, s)| {
            s.sort_unstable();
            RemoveTimes {
                len,
                median_ns: super::stats::percentile(s, 0.5),
                min_ns: s.first().copied().unwrap_or(0),
                max_ns: s.last().copied().unwrap_or(0),
            }
        })
        .collect();
    let calls = u64::from(spec.remove_calls) * spec.remove_lens.len() as u64;
    Ok(ChildResult {
        touches: calls,
        wall_ns: end.duration_since(start).as_nanos() as u64,
        latency: None,
        counts,
        exits: 0,
        removes,
    })
}
