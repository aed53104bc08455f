//! The parent's side of one measurement: start the child, serve it with
//! snapfault or the minimal handler (or nothing, for a kernel baseline),
//! say `go`, collect both sides' results.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::minimal::{self, Served};
use super::proc::{ChildProc, Launcher, STEP_LIMIT};
use super::spec::{ChildResult, ChildSpec, Role};
use super::stats::Counts;
use crate::handshake;
use crate::metrics::Metrics;
use crate::serve::{Config, Report, StopHandle, error_chain};
use crate::server::{self, Options};
use crate::source::PageSource;
use crate::sys::mem::Mapping;
use crate::testkit::harness::TempDir;

/// Who serves the child's faults.
#[derive(Debug, Clone, PartialEq)]
pub enum Server {
    /// Nobody: the kernel's own faults.
    Kernel,
    /// The minimal handler; with `bulk`, it copies all memory first.
    Minimal {
        /// Copy every region in 2 MiB chunks before serving, timed.
        bulk: bool,
    },
    /// A snapfault session.
    Snapfault(SnapConfig),
}

/// The snapfault settings a case varies.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapConfig {
    /// `Config::spin`.
    pub spin: Duration,
    /// Whether the file source asks `mincore` before each copy.
    pub check_resident: bool,
    /// Install the whole region ahead (`Config::install_ahead`).
    pub install_ahead: bool,
}

/// The server side of one measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerRun {
    /// The serve thread's kernel counters.
    pub counts: Counts,
    /// Faults it answered.
    pub faults: u64,
    /// Time to install the whole region ahead, when asked.
    pub install: Option<Duration>,
}

/// Both sides of one measurement.
#[derive(Debug, Clone)]
pub struct Run {
    /// What the child measured.
    pub child: ChildResult,
    /// What the server did, if there was one.
    pub server: Option<ServerRun>,
}

/// What every measurement shares: the hot memory file and its mappings.
pub struct Host {
    /// How children are started.
    pub launcher: Launcher,
    /// Sockets and the memory file live here.
    pub dir: TempDir,
    /// The memory file.
    pub memfile: PathBuf,
    /// The memory file as snapfault serves it by default (`mincore` check).
    pub checked: Arc<dyn PageSource>,
    /// The same without the residency check.
    pub unchecked: Arc<dyn PageSource>,
    /// The memory file mapped for the minimal handler and `memcpy`.
    pub file: Arc<Mapping>,
    /// Hold the server's info logs back.
    pub quiet: bool,
    next: AtomicU64,
}

/// A log filter for the serving threads: warnings and errors only.
fn quiet_guard(quiet: bool) -> Option<tracing::subscriber::DefaultGuard> {
    quiet.then(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(std::io::stderr)
            .finish();
        tracing::subscriber::set_default(subscriber)
    })
}

enum Serving {
    Snapfault {
        thread: JoinHandle<(Report, Counts)>,
        metrics: Arc<Metrics>,
        started: Arc<OnceLock<Instant>>,
    },
    Minimal {
        thread: JoinHandle<Result<Served, String>>,
        bulk: Option<Receiver<Duration>>,
    },
}

impl Host {
    /// A host over `memfile`, already written and hot.
    pub fn new(
        launcher: Launcher,
        dir: TempDir,
        memfile: PathBuf,
        quiet: bool,
    ) -> Result<Host, String> {
        let err = |e: std::io::Error| format!("memory file {}: {e}", memfile.display());
        let source = crate::source::FileSource::open(&memfile).map_err(err)?;
        let len = source.len();
        // Touch every page of each mapping once, so that no measurement
        // pays for the server's own page table.
        source.fetch(0, len as usize).map_err(|e| e.to_string())?;
        let unchecked = crate::source::FileSource::open(&memfile).map_err(err)?;
        unchecked
            .fetch(0, len as usize)
            .map_err(|e| e.to_string())?;
        let file = std::fs::File::open(&memfile).map_err(err)?;
        let map = Mapping::file_read_only(&file, len as usize).map_err(err)?;
        let sum: u64 = map
            .bytes()
            .iter()
            .step_by(4096)
            .map(|&b| u64::from(b))
            .sum();
        std::hint::black_box(sum);
        Ok(Host {
            launcher,
            dir,
            memfile,
            checked: Arc::new(source),
            unchecked: Arc::new(unchecked.check_resident(false)),
            file: Arc::new(map),
            quiet,
            next: AtomicU64::new(0),
        })
    }

    /// Runs one measurement: `role` in a child with `spec`, served by
    /// `server`, whose thread is pinned to `server_cpu` if given.
    pub fn run(
        &self,
        role: Role,
        spec: &ChildSpec,
        server: &Server,
        server_cpu: Option<usize>,
    ) -> Result<Run, String> {
        let mut spec = spec.clone();
        spec.memfile = self.memfile.clone();
        let listener = if *server == Server::Kernel {
            None
        } else {
            let path = self
                .dir
                .path()
                .join(format!("s{}.sock", self.next.fetch_add(1, Relaxed)));
            let l = server::listen(&path).map_err(|e| error_chain(&e))?;
            spec.socket = Some(path);
            Some(l)
        };
        let mut child = ChildProc::spawn(&self.launcher, role, &spec)?;
        let serving = match &listener {
            Some(l) => {
                child.wait_connect(l)?;
                Some(self.serve(l, server, spec.len, server_cpu)?)
            }
            None => None,
        };
        child.say("go")?;
        let mut install = None;
        if role == Role::Hold {
            install = match &serving {
                Some(Serving::Snapfault {
                    metrics, started, ..
                }) => Some(installed(metrics, started)?),
                Some(Serving::Minimal { bulk: Some(rx), .. }) => Some(
                    rx.recv_timeout(STEP_LIMIT)
                        .map_err(|_| "the raw bulk copy did not finish")?,
                ),
                _ => None,
            };
            child.stdin = None;
        }
        let result = child.result()?;
        child.wait()?;
        let server = serving.map(join).transpose()?.map(|mut s| {
            s.install = install;
            s
        });
        if let Some(path) = &spec.socket {
            let _ = std::fs::remove_file(path);
        }
        Ok(Run {
            child: result,
            server,
        })
    }

    fn serve(
        &self,
        listener: &UnixListener,
        server: &Server,
        len: u64,
        cpu: Option<usize>,
    ) -> Result<Serving, String> {
        match server {
            Server::Kernel => Err("no server for a kernel baseline".into()),
            Server::Snapfault(cfg) => {
                let source = if cfg.check_resident {
                    &self.checked
                } else {
                    &self.unchecked
                };
                let config = Config {
                    spin: cfg.spin,
                    install_ahead: if cfg.install_ahead {
                        vec![(0, len)]
                    } else {
                        Vec::new()
                    },
                    ..Config::default()
                };
                let options = Options {
                    config,
                    ..Options::default()
                };
                let stop = StopHandle::new().map_err(|e| e.to_string())?;
                let accepted = {
                    let _quiet = quiet_guard(self.quiet);
                    server::accept(listener, source.clone(), &options, &stop)
                        .map_err(|e| error_chain(&e))?
                };
                let metrics = accepted.session.metrics.clone();
                let started = Arc::new(OnceLock::new());
                let start = started.clone();
                let quiet = self.quiet;
                let thread = std::thread::Builder::new()
                    .name("bench-snapfault".into())
                    .spawn(move || {
                        let _quiet = quiet_guard(quiet);
                        pin(cpu);
                        let before = Counts::this_thread();
                        let _ = start.set(Instant::now());
                        let report = accepted.session.run();
                        (report, Counts::this_thread().since(&before))
                    })
                    .map_err(|e| e.to_string())?;
                Ok(Serving::Snapfault {
                    thread,
                    metrics,
                    started,
                })
            }
            Server::Minimal { bulk } => {
                let hs =
                    handshake::accept(listener, STEP_LIMIT).map_err(|r| error_chain(&r.error))?;
                let pidfd = hs.pidfd.ok_or("no pidfd for the child")?;
                let file = self.file.clone();
                let (tx, rx) = channel();
                let tx: Option<Sender<Duration>> = bulk.then_some(tx);
                let thread = std::thread::Builder::new()
                    .name("bench-minimal".into())
                    .spawn(move || {
                        pin(cpu);
                        let _conn = hs.stream;
                        minimal::serve(&hs.uffd, &hs.regions, file.bytes(), &pidfd, tx.as_ref())
                    })
                    .map_err(|e| e.to_string())?;
                Ok(Serving::Minimal {
                    thread,
                    bulk: bulk.then_some(rx),
                })
            }
        }
    }

    /// `memcpy` of `len` bytes of the memory file into fresh anonymous
    /// memory (4 KiB pages, each first store a zero-fill fault), then again
    /// into the same, now populated, memory.
    pub fn memcpy(&self, len: u64) -> Result<(Duration, Duration), String> {
        let len = (len as usize).min(self.file.len());
        let mut dst =
            Mapping::anonymous(len, crate::sys::mem::Backing::Small).map_err(|e| e.to_string())?;
        super::raw::no_huge_pages(&dst).map_err(|e| e.to_string())?;
        let src = &self.file.bytes()[..len];
        let t = Instant::now();
        dst.bytes_mut().copy_from_slice(src);
        let fresh = t.elapsed();
        std::hint::black_box(dst.bytes()[len - 1]);
        let t = Instant::now();
        dst.bytes_mut().copy_from_slice(src);
        let hot = t.elapsed();
        std::hint::black_box(dst.bytes()[len - 1]);
        Ok((fresh, hot))
    }
}

/// Pins the calling (serving) thread to `cpu`, if given.
fn pin(cpu: Option<usize>) {
    if let Some(cpu) = cpu
        && let Err(e) = super::raw::pin_to_cpu(cpu)
    {
        tracing::warn!(cpu, error = %e, "cannot pin the serving thread");
    }
}

/// Waits until install-ahead has finished; the time since the session
/// started.
fn installed(metrics: &Metrics, started: &OnceLock<Instant>) -> Result<Duration, String> {
    let deadline = Instant::now() + STEP_LIMIT;
    while metrics.install_ahead_finished.load(Relaxed) == 0 {
        if Instant::now() > deadline {
            return Err("install-ahead did not finish".into());
        }
        // Not a spin, nor a fine poll: each wake-up of this thread may
        // preempt the serve loop it times. The end is seen up to 0.5 ms
        // late, under 1% of a 256 MiB install here.
        std::thread::sleep(Duration::from_micros(500));
    }
    let end = Instant::now();
    let start = started.get().ok_or("the session never started")?;
    Ok(end.duration_since(*start))
}

fn join(serving: Serving) -> Result<ServerRun, String> {
    match serving {
        Serving::Snapfault { thread, .. } => {
            let (report, counts) = thread.join().map_err(|_| "the serve thread panicked")?;
            if let Some(e) = &report.error {
                return Err(format!("snapfault failed: {}", error_chain(e)));
            }
            let m = report.summary.metrics;
            Ok(ServerRun {
                counts,
                faults: m.faults,
                install: None,
            })
        }
        Serving::Minimal { thread, .. } => {
            let served = thread
                .join()
                .map_err(|_| "the minimal handler panicked")??;
            Ok(ServerRun {
                counts: served.counts,
                faults: served.faults,
                install: served.bulk,
            })
        }
    }
}
