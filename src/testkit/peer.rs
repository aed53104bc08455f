//! A process that plays Firecracker's part of a `Uffd` snapshot restore.
//!
//! It does what Firecracker does, in order: maps each region
//! `MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE` (plus `MAP_HUGETLB` for 2 MiB
//! pages), opens a userfaultfd `O_CLOEXEC|O_NONBLOCK` asking for
//! `UFFD_FEATURE_EVENT_REMOVE` only, registers every region MISSING-only,
//! connects, and sends the compact JSON with the one descriptor. Its main
//! thread then writes two low pages before any other thread runs, as
//! Firecracker's VMGenID and VMClock do during the load. With
//! `--legacy` it plays v1.10/v1.11: `page_size_kib` only, and the
//! connection closed right after the send.
//!
//! Then it takes commands on stdin, one per line, and answers each on
//! stdout with a line starting `ok` or `err` (see [`Peer::command`]). A
//! model of every 4 KiB page (snapshot bytes, zeros, or written with a
//! seed) lets `read` check content byte for byte.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::handshake::{Flavor, encode};
use crate::region::{PAGE_2M, PAGE_4K, RegionSpec};
use crate::sys::mem::{Advice, Backing, Mapping, read_shared, write_shared};
use crate::sys::sock::send_with_fds;
use crate::sys::uffd::{Uffd, feature, register_mode};
use crate::testkit::snapshot::{fill_snapshot, fill_written};
use crate::testkit::vmpeer::KvmGuest;

/// The peer's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct PeerArgs {
    /// The server's socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// Seed the snapshot file was made with (to check content).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Region sizes in MiB, in handshake order (offsets follow).
    #[arg(long = "region-mib", value_delimiter = ',', default_value = "32")]
    pub regions_mib: Vec<u64>,
    /// Page size: 4k or 2m.
    #[arg(long, default_value = "4k")]
    pub page: String,
    /// Play Firecracker v1.10/v1.11.
    #[arg(long)]
    pub legacy: bool,
    /// Skip the main thread's two writes after the handshake.
    #[arg(long)]
    pub no_boot_writes: bool,
    /// Send this text instead of the regions' JSON.
    #[arg(long)]
    pub payload: Option<String>,
    /// Which descriptors to attach: uffd, none, two, file.
    #[arg(long, default_value = "uffd")]
    pub fds: String,
    /// Also map and register this many MiB that the handshake does not
    /// declare (`touch-undeclared` then faults outside every region).
    #[arg(long, default_value_t = 0)]
    pub undeclared_mib: u64,
    /// Run a KVM VM with this many vCPUs over the (single) region; the
    /// memory file must be a `testkit::kvm` image. Implies no boot writes.
    #[arg(long, default_value_t = 0)]
    pub kvm_vcpus: u32,
    /// File ranges `OFFSET:LEN` (bytes) that are holes in the memory file
    /// (the unplugged parts of a hotplug region): they read as zeros.
    #[arg(long, value_delimiter = ',')]
    pub holes: Vec<String>,
}

/// What a `read` accepts.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// What the model says.
    Model,
    /// Snapshot bytes or zeros.
    Any,
    /// Zeros.
    Zero,
    /// Snapshot bytes.
    Snapshot,
    /// Zeros or the pattern written with this seed.
    ZeroOr(u64),
}

/// What one 4 KiB page should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    Snapshot,
    Zero,
    Written(u64),
}

struct Guest {
    // Declared first so that it is dropped first: the VM uses the maps.
    kvm: Option<KvmGuest>,
    undeclared: Option<Mapping>,
    maps: Vec<Mapping>,
    specs: Vec<RegionSpec>,
    model: Mutex<Vec<Model>>,
    seed: u64,
}

/// The running peer.
pub struct Peer {
    guest: Arc<Guest>,
    conn: Option<UnixStream>,
    threads: HashMap<String, (JoinHandle<String>, i32)>,
    _uffd: Uffd,
}

/// The boot writes' seeds and pages.
pub const BOOT_WRITES: [(u64, u64); 2] = [(0, 0xb007), (1, 0xc10c)];

impl Peer {
    /// Maps memory, registers it and performs the handshake.
    pub fn start(args: &PeerArgs) -> anyhow::Result<Peer> {
        let page_size = match args.page.as_str() {
            "4k" => PAGE_4K,
            "2m" => PAGE_2M,
            other => anyhow::bail!("page size {other}: use 4k or 2m"),
        };
        let backing = if page_size == PAGE_2M {
            Backing::Huge2M
        } else {
            Backing::Small
        };
        let (uffd, _) = Uffd::open(feature::EVENT_REMOVE)?;
        let mut maps = Vec::new();
        let mut specs = Vec::new();
        let mut offset = 0;
        for mib in &args.regions_mib {
            let size = mib << 20;
            let map = Mapping::anonymous(size as usize, backing)?;
            uffd.register(map.addr(), size, register_mode::MISSING)?;
            specs.push(RegionSpec {
                base: map.addr(),
                size,
                offset,
                page_size,
            });
            maps.push(map);
            offset += size;
        }
        let undeclared = match args.undeclared_mib {
            0 => None,
            mib => {
                let map = Mapping::anonymous((mib << 20) as usize, backing)?;
                uffd.register(map.addr(), mib << 20, register_mode::MISSING)?;
                Some(map)
            }
        };
        let flavor = if args.legacy {
            Flavor::Legacy
        } else {
            Flavor::Current
        };
        let payload = args
            .payload
            .clone()
            .unwrap_or_else(|| encode(&specs, flavor));
        let conn = UnixStream::connect(&args.socket)?;
        let file = std::fs::File::open("/proc/self/exe")?;
        let fds = match args.fds.as_str() {
            "uffd" => vec![uffd.as_fd()],
            "none" => vec![],
            "two" => vec![uffd.as_fd(), file.as_fd()],
            "file" => vec![file.as_fd()],
            other => anyhow::bail!("--fds {other}"),
        };
        send_with_fds(conn.as_fd(), payload.as_bytes(), &fds)?;
        drop(file);
        let pages = (offset / PAGE_4K) as usize;
        let mut model = vec![Model::Snapshot; pages];
        for hole in &args.holes {
            let (off, len) = hole
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--holes {hole}"))?;
            let (off, len) = (
                parse_size(off).map_err(anyhow::Error::msg)?,
                parse_size(len).map_err(anyhow::Error::msg)?,
            );
            for p in off / PAGE_4K..((off + len) / PAGE_4K).min(pages as u64) {
                model[p as usize] = Model::Zero;
            }
        }
        let kvm = match args.kvm_vcpus {
            0 => None,
            n if maps.len() == 1 => Some(KvmGuest::new(&maps[0], n)?),
            _ => anyhow::bail!("--kvm-vcpus needs exactly one region"),
        };
        let guest = Guest {
            kvm,
            undeclared,
            maps,
            specs,
            model: Mutex::new(model),
            seed: args.seed,
        };
        let peer = Peer {
            guest: Arc::new(guest),
            conn: (!args.legacy).then_some(conn),
            threads: HashMap::new(),
            _uffd: uffd,
        };
        if !args.no_boot_writes && args.kvm_vcpus == 0 {
            for (page, seed) in BOOT_WRITES {
                peer.guest.write(page * PAGE_4K, PAGE_4K, seed)?;
            }
        }
        Ok(peer)
    }

    /// Runs commands from stdin until `exit` or EOF.
    pub fn serve_stdin(mut self) -> anyhow::Result<()> {
        let stdin = std::io::stdin();
        let mut out = std::io::stdout();
        writeln!(out, "ready pid={}", std::process::id())?;
        out.flush()?;
        for line in stdin.lock().lines() {
            let line = line?;
            if line.trim() == "exit" {
                break;
            }
            let reply = self.command(&line);
            writeln!(out, "{reply}")?;
            out.flush()?;
        }
        Ok(())
    }

    /// Runs one command and returns its answer line.
    ///
    /// - `read OFF LEN [threads=N] [expect=E]`: read guest bytes and check
    ///   them against the model, or against `E`: `any` (snapshot bytes or
    ///   zeros), `zero`, `snapshot`, `zero-or-SEED`.
    /// - `remove-joint LEN`: one `madvise` over the last LEN bytes of one
    ///   region and the first LEN of the region mapped right after it.
    /// - `touch-undeclared`: read memory registered but not declared.
    /// - `write OFF LEN SEED`: write a pattern.
    /// - `remove OFF LEN`: `madvise(MADV_DONTNEED)`, as the balloon does.
    /// - `spawn NAME CMD…`: run a command on a new thread.
    /// - `wait-blocked NAME`: wait until that thread sleeps in a
    ///   userfaultfd wait (a fault, or a REMOVE not yet read).
    /// - `join NAME`: that thread's answer.
    /// - `close`: close the connection, as v1.10 does.
    /// - `exec`: become `sleep 600` (the memory goes, the process stays).
    ///
    /// Offsets and lengths are guest offsets (file offsets), with `k`, `m`
    /// suffixes allowed.
    pub fn command(&mut self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["spawn", name, rest @ ..] => {
                let guest = self.guest.clone();
                let cmd = rest.join(" ");
                let (tx, rx) = std::sync::mpsc::channel();
                let handle = std::thread::spawn(move || {
                    // Report the thread id so that `wait-blocked` can watch it.
                    let _ = tx.send(current_tid());
                    guest.run(&cmd)
                });
                let tid = rx.recv().unwrap_or(0);
                self.threads.insert(name.to_string(), (handle, tid));
                format!("ok tid={tid}")
            }
            ["wait-blocked", name] => match self.threads.get(*name) {
                Some((_, tid)) => wait_blocked(*tid),
                None => format!("err no thread {name}"),
            },
            ["join", name] => match self.threads.remove(*name) {
                Some((h, _)) => h.join().unwrap_or_else(|_| "err thread panicked".into()),
                None => format!("err no thread {name}"),
            },
            ["close"] => {
                self.conn = None;
                "ok".into()
            }
            ["exec"] => {
                // Replace this process's image: the memory the server was
                // handed goes away while the process (and its pid) lives on.
                use std::os::unix::process::CommandExt;
                let err = std::process::Command::new("sleep").arg("600").exec();
                format!("err exec: {err}")
            }
            _ => self.guest.run(line),
        }
    }
}

fn current_tid() -> i32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits until thread `tid` of this process sleeps in a userfaultfd wait.
fn wait_blocked(tid: i32) -> String {
    let path = format!("/proc/self/task/{tid}/wchan");
    let mut last = String::new();
    for _ in 0..200_000 {
        match std::fs::read_to_string(&path) {
            Ok(w) if w.contains("userfault") => return format!("ok {w}"),
            Ok(w) => {
                last = w;
                std::thread::yield_now();
            }
            Err(_) => return "err thread gone".into(),
        }
    }
    format!("err thread never blocked (last wchan {last:?})")
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1 << 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    let v = if let Some(hex) = num.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        num.parse::<u64>()
    };
    v.map(|v| v * mult)
        .map_err(|e| format!("bad number {s}: {e}"))
}

impl Guest {
    fn run(&self, line: &str) -> String {
        match self.try_run(line) {
            Ok(s) => s,
            Err(e) => format!("err {e}"),
        }
    }

    fn try_run(&self, line: &str) -> Result<String, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["read", off, len, opts @ ..] => {
                let (off, len) = (parse_size(off)?, parse_size(len)?);
                let expect = match opts.iter().find_map(|o| o.strip_prefix("expect=")) {
                    None => Expect::Model,
                    Some("any") => Expect::Any,
                    Some("zero") => Expect::Zero,
                    Some("snapshot") => Expect::Snapshot,
                    Some(other) => match other.strip_prefix("zero-or-") {
                        Some(seed) => Expect::ZeroOr(seed.parse().map_err(|e| format!("{e}"))?),
                        None => return Err(format!("expect={other}")),
                    },
                };
                let threads = opts
                    .iter()
                    .find_map(|o| o.strip_prefix("threads="))
                    .map(|n| n.parse::<u64>().map_err(|e| e.to_string()))
                    .transpose()?
                    .unwrap_or(1)
                    .max(1);
                self.read_threads(off, len, threads, expect)
            }
            ["remove-joint", len] => self.remove_joint(parse_size(len)?),
            ["vcpu", rest @ ..] => self.kvm.as_ref().ok_or("not in KVM mode")?.command(rest),
            ["assume-zero", gpa, len] => {
                self.kvm
                    .as_ref()
                    .ok_or("not in KVM mode")?
                    .assume_zero(parse_size(gpa)?, parse_size(len)?);
                Ok("ok".into())
            }
            ["touch-undeclared"] => {
                let map = self.undeclared.as_ref().ok_or("no undeclared memory")?;
                crate::sys::mem::touch(map, 0);
                Ok("ok".into())
            }
            ["write", off, len, seed] => {
                let seed = seed.parse::<u64>().map_err(|e| e.to_string())?;
                self.write(parse_size(off)?, parse_size(len)?, seed)
                    .map(|_| "ok".into())
                    .map_err(|e| e.to_string())
            }
            ["remove", off, len] => {
                let (off, len) = (parse_size(off)?, parse_size(len)?);
                let (map, at) = self.locate(off, len)?;
                map.advise(at, len as usize, Advice::DontNeed)
                    .map_err(|e| format!("madvise: {e}"))?;
                let mut model = self.model.lock().unwrap();
                for p in off / PAGE_4K..(off + len) / PAGE_4K {
                    model[p as usize] = Model::Zero;
                }
                Ok("ok".into())
            }
            [] => Err("empty command".into()),
            other => Err(format!("unknown command {other:?}")),
        }
    }

    /// The mapping and its offset for guest range `[off, off+len)`, which
    /// must lie in one region.
    fn locate(&self, off: u64, len: u64) -> Result<(&Mapping, usize), String> {
        for (map, spec) in self.maps.iter().zip(&self.specs) {
            if off >= spec.offset && off + len <= spec.offset + spec.size {
                return Ok((map, (off - spec.offset) as usize));
            }
        }
        Err(format!("range {off:#x}+{len:#x} is not inside one region"))
    }

    fn write(&self, off: u64, len: u64, seed: u64) -> std::io::Result<()> {
        let (map, at) = self.locate(off, len).map_err(std::io::Error::other)?;
        let mut page = vec![0u8; PAGE_4K as usize];
        for p in 0..len / PAGE_4K {
            let o = off + p * PAGE_4K;
            fill_written(seed, o, &mut page);
            write_shared(map, at + (p * PAGE_4K) as usize, &page);
            self.model.lock().unwrap()[(o / PAGE_4K) as usize] = Model::Written(seed);
        }
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)` of `len` bytes on each side of the place
    /// where one region's mapping ends and another's begins: one call on
    /// one range that spans two regions, as the kernel's merged mapping
    /// allows.
    fn remove_joint(&self, len: u64) -> Result<String, String> {
        let n = self.maps.len();
        let (lo, hi) = (0..n)
            .flat_map(|a| (0..n).map(move |b| (a, b)))
            .find(|&(a, b)| {
                a != b && self.maps[a].addr() + self.specs[a].size == self.maps[b].addr()
            })
            .ok_or("no two regions are adjacent")?;
        let (a, b) = (&self.specs[lo], &self.specs[hi]);
        if len > a.size || len > b.size {
            return Err("range longer than a region".into());
        }
        let start = a.base + a.size - len;
        crate::sys::mem::advise_raw(start, 2 * len, Advice::DontNeed)
            .map_err(|e| format!("madvise: {e}"))?;
        let mut model = self.model.lock().unwrap();
        for from in [a.offset + a.size - len, b.offset] {
            for p in from / PAGE_4K..(from + len) / PAGE_4K {
                model[p as usize] = Model::Zero;
            }
        }
        Ok(format!("ok lo={} hi={}", a.offset, b.offset))
    }

    fn read_threads(
        &self,
        off: u64,
        len: u64,
        threads: u64,
        expect: Expect,
    ) -> Result<String, String> {
        let pages = len / PAGE_4K;
        if threads == 1 {
            // On the calling thread, so that `wait-blocked` sees its fault.
            for p in 0..pages {
                self.check_page(off + p * PAGE_4K, expect)?;
            }
            return Ok(format!("ok pages={pages}"));
        }
        let results: Vec<Result<u64, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let mut checked = 0;
                        let mut p = t;
                        while p < pages {
                            self.check_page(off + p * PAGE_4K, expect)?;
                            checked += 1;
                            p += threads;
                        }
                        Ok(checked)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panic".into())))
                .collect()
        });
        let mut total = 0;
        for r in results {
            total += r?;
        }
        Ok(format!("ok pages={total}"))
    }

    fn check_page(&self, off: u64, expect: Expect) -> Result<(), String> {
        let (map, at) = self.locate(off, PAGE_4K)?;
        let mut got = vec![0u8; PAGE_4K as usize];
        read_shared(map, at, &mut got);
        let model = self.model.lock().unwrap()[(off / PAGE_4K) as usize];
        let mut want = vec![0u8; PAGE_4K as usize];
        let mut snapshot = vec![0u8; PAGE_4K as usize];
        fill_snapshot(self.seed, off, &mut snapshot);
        match model {
            Model::Snapshot => want.copy_from_slice(&snapshot),
            Model::Zero => {}
            Model::Written(seed) => fill_written(seed, off, &mut want),
        }
        let zero = got.iter().all(|&b| b == 0);
        let pass = match expect {
            Expect::Model => got == want,
            Expect::Any => zero || got == snapshot,
            Expect::Zero => zero,
            Expect::Snapshot => got == snapshot,
            Expect::ZeroOr(seed) => {
                fill_written(seed, off, &mut want);
                zero || got == want
            }
        };
        if pass {
            return Ok(());
        }
        let what = if zero {
            "zeros"
        } else if got == snapshot {
            "snapshot bytes"
        } else {
            "other bytes"
        };
        Err(format!(
            "mismatch at {off:#x}: expected {model:?}, got {what}"
        ))
    }
}
