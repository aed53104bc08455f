//! Driving a peer process and a server session together, for tests and
//! for `snapfault demo`.
//!
//! [`Rig::start`] writes a synthetic snapshot, binds the socket, starts the
//! peer (this crate's binary, `fc-peer`), accepts it and runs the session
//! on a thread of this process, so a test can look at page states and
//! counters while the peer, in its own process, plays the VM.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::region::Layout;
use crate::serve::{Config, Hooks, Report, StopHandle};
use crate::server::{self, Options};
use crate::source::{FileSource, PageSource};
use crate::testkit::snapshot::write_memfile;

/// How long a peer may take to answer one command before the rig gives
/// up: a safety net against a hung VM, not a measurement.
pub const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory under the system's temp dir.
    pub fn new(tag: &str) -> std::io::Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("snapfault-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The lines `out` yields, read on a thread of their own, so that a
/// reader can wait for the next one with a time limit.
pub fn line_channel(out: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// A peer process and its command pipe.
pub struct PeerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// The peer's pid.
    pub pid: i32,
}

impl PeerProcess {
    /// Starts `exe fc-peer ARGS…` with piped stdin and stdout.
    pub fn spawn(exe: &Path, args: &[String]) -> std::io::Result<PeerProcess> {
        let mut child = Command::new(exe)
            .arg("fc-peer")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let lines = line_channel(child.stdout.take().expect("piped"));
        let stdin = child.stdin.take();
        let pid = child.id() as i32;
        Ok(PeerProcess {
            child,
            stdin,
            lines,
            pid,
        })
    }

    fn next_line(&mut self, what: &str) -> Result<String, String> {
        match self.lines.recv_timeout(ANSWER_LIMIT) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "peer gave no answer to `{what}` in {ANSWER_LIMIT:?}"
            )),
            Err(RecvTimeoutError::Disconnected) => {
                Err(format!("peer exited before answering `{what}`"))
            }
        }
    }

    /// Waits for the peer's `ready` line (after its handshake and boot
    /// writes were served).
    pub fn ready(&mut self) -> Result<(), String> {
        let line = self.next_line("ready")?;
        if line.starts_with("ready") {
            Ok(())
        } else {
            Err(format!("unexpected first line {line:?}"))
        }
    }

    /// Sends one command; its answer, or the error it reported.
    pub fn send(&mut self, cmd: &str) -> Result<String, String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{cmd}").map_err(|e| format!("writing `{cmd}`: {e}"))?;
        stdin.flush().map_err(|e| e.to_string())?;
        let line = self.next_line(cmd)?;
        if line.starts_with("ok") {
            Ok(line)
        } else {
            Err(format!("`{cmd}`: {line}"))
        }
    }

    /// Sends a command whose answer will never come (`exec`).
    pub fn send_only(&mut self, cmd: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{cmd}").map_err(|e| format!("writing `{cmd}`: {e}"))?;
        stdin.flush().map_err(|e| e.to_string())
    }

    /// Sends a command that must succeed.
    #[track_caller]
    pub fn ok(&mut self, cmd: &str) -> String {
        match self.send(cmd) {
            Ok(line) => line,
            Err(e) => panic!("{e}"),
        }
    }

    /// Asks the peer to exit and waits for it.
    pub fn exit(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "exit");
        }
        self.child.wait()
    }

    /// Waits for the peer to end (for instance, killed by the server),
    /// keeping its stdin open so that it does not end by itself.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait()
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Turns the rig's file source into the source served (e.g. a gated one).
pub type WrapSource = Box<dyn FnOnce(FileSource) -> Arc<dyn PageSource>>;

/// What a rig sets up.
pub struct RigOptions {
    /// Region sizes in MiB, in handshake order.
    pub regions_mib: Vec<u64>,
    /// `4k` or `2m`.
    pub page: &'static str,
    /// Play Firecracker v1.10/v1.11.
    pub legacy: bool,
    /// Snapshot seed.
    pub seed: u64,
    /// Serve loop settings.
    pub config: Config,
    /// Session hooks.
    pub hooks: Hooks,
    /// Wraps the file source, e.g. in a gated one.
    pub wrap: Option<WrapSource>,
    /// More peer arguments.
    pub peer_args: Vec<String>,
    /// Run a KVM VM with this many vCPUs in the peer (0: none); the memory
    /// file is then a `testkit::kvm` image.
    pub kvm_vcpus: u32,
    /// Holes `(offset, len)` in the memory file, 1 MiB aligned.
    pub holes: Vec<(u64, u64)>,
}

impl Default for RigOptions {
    fn default() -> RigOptions {
        RigOptions {
            regions_mib: vec![16],
            page: "4k",
            legacy: false,
            seed: 1,
            config: Config::default(),
            hooks: Hooks::default(),
            wrap: None,
            peer_args: Vec::new(),
            kvm_vcpus: 0,
            holes: Vec::new(),
        }
    }
}

/// Waits until `listener` has a connection, or fails if the peer `pid`
/// exits first or nothing comes within [`ANSWER_LIMIT`].
fn wait_for_connect(listener: &std::os::unix::net::UnixListener, pid: i32) -> Result<(), String> {
    use crate::sys::poll::{PollFd, READABLE, poll};
    use std::os::fd::AsFd;
    let pidfd = crate::sys::proc::PidFd::open(pid).map_err(|e| e.to_string())?;
    let mut fds = [
        PollFd::new(listener.as_fd(), READABLE),
        PollFd::new(pidfd.as_fd(), READABLE),
    ];
    poll(&mut fds, Some(ANSWER_LIMIT)).map_err(|e| e.to_string())?;
    if fds[0].ready() {
        Ok(())
    } else if fds[1].ready() {
        Err("the peer exited before connecting".into())
    } else {
        Err(format!("the peer did not connect within {ANSWER_LIMIT:?}"))
    }
}

/// A peer and a server session serving it.
pub struct Rig {
    /// The peer.
    pub peer: PeerProcess,
    /// The session's counters.
    pub metrics: Arc<Metrics>,
    /// The session's regions and page states.
    pub layout: Arc<Layout>,
    /// Stops the session (it then kills the peer).
    pub stop: StopHandle,
    server: Option<JoinHandle<Report>>,
    _dir: TempDir,
}

impl Rig {
    /// Writes the snapshot, starts the peer and the session, and waits for
    /// the peer's `ready`.
    pub fn start(exe: &Path, opts: RigOptions) -> Result<Rig, String> {
        let dir = TempDir::new("rig").map_err(|e| e.to_string())?;
        let memfile = dir.path().join("mem");
        let socket = dir.path().join("mem.sock");
        let total: u64 = opts.regions_mib.iter().sum::<u64>() << 20;
        if opts.kvm_vcpus > 0 {
            let mut out = std::io::BufWriter::new(
                std::fs::File::create(&memfile).map_err(|e| e.to_string())?,
            );
            crate::testkit::kvm::write_image(&mut out, total).map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())?;
        } else {
            write_memfile(&memfile, total, opts.seed, &opts.holes).map_err(|e| e.to_string())?;
        }
        let file = FileSource::open(&memfile).map_err(|e| e.to_string())?;
        let source: Arc<dyn PageSource> = match opts.wrap {
            Some(wrap) => wrap(file),
            None => Arc::new(file),
        };
        let listener = server::listen(&socket).map_err(|e| e.to_string())?;
        let mut args = vec![
            "--socket".into(),
            socket.display().to_string(),
            "--seed".into(),
            opts.seed.to_string(),
            "--region-mib".into(),
            opts.regions_mib
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(","),
            "--page".into(),
            opts.page.into(),
        ];
        if opts.legacy {
            args.push("--legacy".into());
        }
        if opts.kvm_vcpus > 0 {
            args.extend(["--kvm-vcpus".into(), opts.kvm_vcpus.to_string()]);
        }
        if !opts.holes.is_empty() {
            let holes: Vec<String> = opts.holes.iter().map(|(o, l)| format!("{o}:{l}")).collect();
            args.extend(["--holes".into(), holes.join(",")]);
        }
        args.extend(opts.peer_args);
        let mut peer = PeerProcess::spawn(exe, &args).map_err(|e| e.to_string())?;
        wait_for_connect(&listener, peer.pid)?;
        let options = Options {
            config: opts.config,
            hooks: opts.hooks,
            ..Options::default()
        };
        let stop = StopHandle::new().map_err(|e| e.to_string())?;
        let accepted =
            server::accept(&listener, source, &options, &stop).map_err(|e| e.to_string())?;
        let metrics = accepted.session.metrics.clone();
        let layout = accepted.session.layout.clone();
        let session = accepted.session;
        let server = std::thread::Builder::new()
            .name("snapfault-serve".into())
            .spawn(move || session.run())
            .map_err(|e| e.to_string())?;
        peer.ready()?;
        Ok(Rig {
            peer,
            metrics,
            layout,
            stop,
            server: Some(server),
            _dir: dir,
        })
    }

    /// Ends the peer and returns the session's report.
    pub fn finish(mut self) -> Report {
        let _ = self.peer.exit();
        self.join()
    }

    /// Waits for the session to end by itself and returns its report.
    pub fn join(&mut self) -> Report {
        self.server
            .take()
            .expect("joined once")
            .join()
            .expect("serve thread panicked")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.peer.child.kill();
            let _ = self.peer.child.wait();
            let _ = server.join();
        }
    }
}
