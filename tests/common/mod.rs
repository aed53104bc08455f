//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use snapfault::serve::Hooks;
use snapfault::testkit::harness::{Rig, RigOptions};

/// The `snapfault` binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_snapfault"))
}

/// Page size in bytes for `4k` / `2m`.
pub fn page_bytes(page: &str) -> u64 {
    if page == "2m" { 2 << 20 } else { 4096 }
}

/// Makes sure at least `n` 2 MiB hugepages are free (tests run as root).
pub fn ensure_hugepages(n: u64) {
    let free_path = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let free = read(free_path).unwrap_or(0);
    if free >= n {
        return;
    }
    let total = read("/proc/sys/vm/nr_hugepages").unwrap_or(0);
    let _ = std::fs::write(
        "/proc/sys/vm/nr_hugepages",
        (total + n - free + 16).to_string(),
    );
    let free = read(free_path).unwrap_or(0);
    assert!(
        free >= n,
        "could not reserve {n} free 2 MiB hugepages (have {free})"
    );
}

/// Starts a rig for `page` memory with the given options.
#[track_caller]
pub fn rig(page: &'static str, mut opts: RigOptions) -> Rig {
    opts.page = page;
    if page == "2m" {
        ensure_hugepages(opts.regions_mib.iter().sum::<u64>() / 2 + 2);
    }
    match Rig::start(&exe(), opts) {
        Ok(rig) => rig,
        Err(e) => panic!("rig failed to start: {e}"),
    }
}

/// Holds the serve loop before its next read of events, so that a test
/// can queue several events and have them read together.
#[derive(Default)]
pub struct ReaderGate {
    held: Mutex<(bool, u32)>,
    changed: Condvar,
}

impl ReaderGate {
    /// A gate, open.
    pub fn new() -> Arc<ReaderGate> {
        Arc::new(ReaderGate::default())
    }

    /// Hooks that make the serve loop wait at this gate.
    pub fn hooks(self: &Arc<Self>) -> Hooks {
        let gate = self.clone();
        Hooks {
            before_read: Some(Arc::new(move || gate.pass())),
            ..Hooks::default()
        }
    }

    /// Closes the gate: the serve loop stops before its next read.
    pub fn hold(&self) {
        *self.held.lock().unwrap() = (true, 0);
    }

    /// Opens the gate.
    pub fn release(&self) {
        *self.held.lock().unwrap() = (false, 0);
        self.changed.notify_all();
    }

    /// Lets `n` more reads through a closed gate.
    pub fn allow(&self, n: u32) {
        self.held.lock().unwrap().1 += n;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut held = self.held.lock().unwrap();
        loop {
            match *held {
                (false, _) => return,
                (true, n) if n > 0 => {
                    held.1 -= 1;
                    return;
                }
                _ => held = self.changed.wait(held).unwrap(),
            }
        }
    }
}

/// Parses `key=value` from a peer's answer.
pub fn field(answer: &str, key: &str) -> Option<u64> {
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Waits (yielding, never sleeping) until `done` holds; panics after a
/// minute, as a guard against a hang rather than a measurement.
#[track_caller]
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        std::thread::yield_now();
    }
}

/// A `snapfault serve` process and what it printed.
pub struct ServerProcess {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Its socket.
    pub socket: PathBuf,
}

impl ServerProcess {
    /// Starts `snapfault ARGS…` (with or without the `serve` word) and waits
    /// until it logs that it listens (or exits).
    #[track_caller]
    pub fn start(args: &[&str], socket: &std::path::Path) -> ServerProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(exe())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start snapfault");
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut server = ServerProcess {
            child,
            log,
            reader: Some(reader),
            socket: socket.to_path_buf(),
        };
        wait_until("the server to listen", || {
            server.log.lock().unwrap().contains("listening")
                || server.child.try_wait().ok().flatten().is_some()
        });
        server
    }

    /// Waits (at most a minute, as a hang guard) for the server to exit;
    /// returns its exit code and everything it logged.
    #[track_caller]
    pub fn wait(mut self) -> (Option<i32>, String) {
        wait_until("the server to exit", || {
            self.child.try_wait().ok().flatten().is_some()
        });
        let status = self.child.wait().unwrap();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let log = self.log.lock().unwrap().clone();
        (status.code(), log)
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory with a memory file of `mib` MiB (seed 1) and
/// the path of a server socket beside it.
pub struct Setup {
    /// The directory (removed on drop).
    pub dir: snapfault::testkit::harness::TempDir,
    /// The memory file.
    pub mem: PathBuf,
    /// The socket path.
    pub sock: PathBuf,
    /// The memory file's size in MiB.
    pub mib: u64,
}

impl Setup {
    /// Makes the directory and the memory file.
    pub fn new(tag: &str, mib: u64) -> Setup {
        let dir = snapfault::testkit::harness::TempDir::new(tag).unwrap();
        let mem = memfile(dir.path(), mib);
        let sock = dir.path().join("sock");
        Setup {
            dir,
            mem,
            sock,
            mib,
        }
    }

    /// `snapfault serve SOCK MEM EXTRA…`, started and listening.
    #[track_caller]
    pub fn serve(&self, extra: &[&str]) -> ServerProcess {
        let mut args = vec![
            "serve",
            self.sock.to_str().unwrap(),
            self.mem.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ServerProcess::start(&args, &self.sock)
    }

    /// A peer for this socket and memory size, with `more` arguments.
    #[track_caller]
    pub fn peer(&self, more: &[&str]) -> snapfault::testkit::harness::PeerProcess {
        let args = peer_args(&self.sock, self.mib, more);
        snapfault::testkit::harness::PeerProcess::spawn(&exe(), &args).unwrap()
    }
}

/// Writes a memory file of `mib` MiB (seed 1) in `dir`.
pub fn memfile(dir: &std::path::Path, mib: u64) -> PathBuf {
    let path = dir.join("mem");
    snapfault::testkit::snapshot::write_memfile(&path, mib << 20, 1, &[]).unwrap();
    path
}

/// Peer arguments for `socket`, a 4 KiB region of `mib` MiB, and `more`.
pub fn peer_args(socket: &std::path::Path, mib: u64, more: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--socket",
        &socket.display().to_string(),
        "--region-mib",
        &mib.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

/// Runs `cmd` on a new peer thread `name` and waits until it sleeps in
/// the kernel on the userfaultfd (a fault, or a REMOVE not yet read).
#[track_caller]
pub fn queue_blocked(rig: &mut Rig, name: &str, cmd: &str) {
    rig.peer.ok(&format!("spawn {name} {cmd}"));
    rig.peer.ok(&format!("wait-blocked {name}"));
}

/// Queues two commands' events while the serve loop is held at `gate`,
/// so that it reads them in one batch, then lets it go and joins both
/// threads (`a` and `b`).
#[track_caller]
pub fn in_one_batch(rig: &mut Rig, gate: &ReaderGate, a: &str, b: &str) {
    gate.hold();
    queue_blocked(rig, "a", a);
    queue_blocked(rig, "b", b);
    gate.release();
    rig.peer.ok("join b");
    rig.peer.ok("join a");
}

/// Declares each named test function `f(page)` twice: `small::f` with
/// 4 KiB pages and `huge::f` with 2 MiB hugetlb pages.
#[macro_export]
macro_rules! both_page_sizes {
    ($($name:ident),* $(,)?) => {
        mod small {
            $(#[test] fn $name() { super::$name("4k"); })*
        }
        mod huge {
            $(#[test] fn $name() { super::$name("2m"); })*
        }
    };
}
