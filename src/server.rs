//! From a socket path and a memory file to a session summary: what
//! `snapfault serve` runs.
//!
//! # Design
//!
//! The server binds before anything else (Firecracker must find it
//! listening when `PUT /snapshot/load` runs), accepts one connection,
//! checks the handshake against the memory file, serves that one VM and
//! returns. A refused handshake whose peer did hand over a userfaultfd
//! leaves a VM that would hang on its first fault, so that peer is killed
//! (fail closed) before the error is returned.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::handshake::{self, HandshakeError, Refused};
use crate::metrics::Metrics;
use crate::region::{Layout, LayoutError};
use crate::serve::{Config, Hooks, Report, ServeError, Session, StopHandle, error_chain};
use crate::source::PageSource;
use crate::sys::poll::{PollFd, READABLE, poll};
use crate::sys::proc::PidFd;

/// Why the server could not serve a VM.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding the socket failed.
    #[error("binding {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// Another server is listening on the path.
    #[error("{path} is in use by a listening server")]
    SocketInUse {
        /// Socket path.
        path: PathBuf,
    },
    /// Opening the memory file failed.
    #[error("opening memory file {path}")]
    MemFile {
        /// File path.
        path: PathBuf,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// The handshake was refused.
    #[error("handshake refused")]
    Handshake {
        /// What was wrong.
        source: HandshakeError,
    },
    /// The regions do not fit each other or the memory file.
    #[error("memory layout refused")]
    Layout {
        /// What was wrong.
        source: LayoutError,
    },
    /// Setting up the session or waiting for a connection failed.
    #[error("session set-up")]
    Setup {
        /// What failed.
        source: ServeError,
    },
    /// Stopped before any VM connected.
    #[error("stopped before a VM connected")]
    Stopped,
}

/// Binds a listening socket at `path`. A stale socket file left by a dead
/// server is replaced; a live one is an error.
pub fn listen(path: &Path) -> Result<UnixListener, ServerError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if is_listening(path) {
                return Err(ServerError::SocketInUse { path: path.into() });
            }
            std::fs::remove_file(path).map_err(|source| ServerError::Bind {
                path: path.into(),
                source,
            })?;
            UnixListener::bind(path).map_err(|source| ServerError::Bind {
                path: path.into(),
                source,
            })
        }
        Err(source) => Err(ServerError::Bind {
            path: path.into(),
            source,
        }),
    }
}

/// Whether a socket bound at `path` is listening, as `/proc/net/unix`
/// tells. (Connecting to find out would hand a live server a bogus VM.)
/// A server that bound the same file through another relative path is not
/// recognised.
fn is_listening(path: &Path) -> bool {
    const ACCEPTING: u32 = 1 << 16;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let canonical = std::fs::canonicalize(path).ok();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(flags), Some(bound)) = (fields.get(3), fields.get(7)) else {
            return false;
        };
        let listening = u32::from_str_radix(flags, 16).is_ok_and(|f| f & ACCEPTING != 0);
        let same = Path::new(bound) == path || canonical.as_deref() == Some(Path::new(bound));
        listening && same
    })
}

/// What to serve and how.
#[derive(Clone)]
pub struct Options {
    /// Serve loop settings.
    pub config: Config,
    /// Longest wait for the handshake message once connected.
    pub handshake_timeout: Duration,
    /// Test hooks for the session.
    pub hooks: Hooks,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            config: Config::default(),
            handshake_timeout: Duration::from_secs(10),
            hooks: Hooks::default(),
        }
    }
}

/// A VM connected and checked, ready to serve.
pub struct Accepted {
    /// The session, not yet running.
    pub session: Session,
    /// The VM's pid as the socket reported it.
    pub peer_pid: i32,
}

/// Waits for one VM on `listener` and checks its handshake against
/// `source`. Returns early with [`ServerError::Stopped`] on a stop request.
pub fn accept(
    listener: &UnixListener,
    source: Arc<dyn PageSource>,
    options: &Options,
    stop: &StopHandle,
) -> Result<Accepted, ServerError> {
    let mut fds = [
        PollFd::new(listener.as_fd(), READABLE),
        PollFd::new(stop.fd().as_fd(), READABLE),
    ];
    loop {
        poll(&mut fds, None).map_err(|source| ServerError::Setup {
            source: ServeError::Poll { source },
        })?;
        if fds[1].ready() {
            return Err(ServerError::Stopped);
        }
        if fds[0].ready() {
            break;
        }
    }
    let hs = match handshake::accept(listener, options.handshake_timeout) {
        Ok(hs) => hs,
        Err(Refused {
            error,
            pidfd,
            had_uffd,
        }) => {
            if had_uffd {
                fail_closed(pidfd.as_ref(), &error);
            }
            return Err(ServerError::Handshake { source: error });
        }
    };
    tracing::info!(
        pid = hs.peer_pid,
        regions = hs.regions.len(),
        "VM connected"
    );
    let layout = match Layout::new(&hs.regions, source.len()) {
        Ok(layout) => layout,
        Err(error) => {
            fail_closed(hs.pidfd.as_ref(), &error);
            return Err(ServerError::Layout { source: error });
        }
    };
    for r in layout.regions() {
        let spec = r.spec;
        tracing::info!(
            region = r.index,
            base = spec.base,
            size = spec.size,
            offset = spec.offset,
            page_size = spec.page_size,
            "region"
        );
    }
    if hs.pidfd.is_none() {
        tracing::warn!(
            pid = hs.peer_pid,
            "no pidfd for the VM: liveness from the connection only"
        );
    }
    stop.fd().drain();
    let mut session = Session::new(
        hs.uffd,
        layout,
        source,
        hs.pidfd,
        Some(hs.stream),
        options.config.clone(),
    )
    .map_err(|source| ServerError::Setup { source })?
    .with_stop(stop);
    session.hooks = options.hooks.clone();
    Ok(Accepted {
        session,
        peer_pid: hs.peer_pid,
    })
}

fn fail_closed(pidfd: Option<&PidFd>, error: &dyn std::error::Error) {
    let killed = pidfd.map(|p| p.kill());
    tracing::error!(error = %error_chain(error), killed = matches!(killed, Some(Ok(true))),
        "refusing the VM: it cannot be served, killing it");
}

/// Logs the one summary line of a session.
pub fn log_summary(report: &Report) {
    let m = &report.summary.metrics;
    let s = &report.summary;
    let end = match (&s.end, &report.error) {
        (Some(end), _) => format!("{end:?}"),
        (None, Some(e)) => format!("failed: {}", error_chain(e)),
        (None, None) => "unknown".into(),
    };
    tracing::info!(
        faults = m.faults,
        pages_from_source = m.pages_from_source,
        zero_pages = m.zero_pages,
        pages_removed = m.pages_removed,
        deferred = m.deferred,
        retries = m.retries,
        bytes_from_source = m.bytes_from_source,
        duration_ms = s.duration.as_millis() as u64,
        end = %end,
        "session summary"
    );
}

/// Writes `metrics` in the Prometheus text format to `path`.
pub fn write_metrics(path: &Path, metrics: &Metrics) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, metrics.snapshot().to_prometheus())?;
    std::fs::rename(tmp, path)
}
