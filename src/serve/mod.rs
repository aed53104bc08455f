//! Serving one VM: the session around the serve loop.
//!
//! # Design
//!
//! One thread, the serve loop (`event_loop`), reads every event and does
//! every install. That is what makes REMOVE ordering simple and exact: the
//! choice of bytes for a page and its install happen between two reads, so
//! no REMOVE can land between them unseen (HAZARDS items 1, 2 and 5), and
//! while a REMOVE is queued but unread the kernel refuses installs with
//! `EAGAIN` rather than letting them race the zap (item 7).
//!
//! What may be slow is kept off that thread: a page whose bytes the source
//! cannot give at once goes to fetch workers (`fetch`), and the fault
//! waits in a list while the loop goes on reading events (item 3). Installs
//! refused with `EAGAIN` wait in the deferred queue (`deferred`), retried
//! after the next read with a backoff that sleeps in `ppoll`, never spins.
//!
//! A session ends when the VM process exits (its pidfd turns readable, or
//! an install gets `ESRCH`). If it cannot go on serving (a fault outside
//! every region, an unexpected event, a failing source or ioctl, a stop
//! request) it fails closed: the VM is killed through its pidfd, so that it
//! neither hangs nor runs on wrong bytes, and the error says why.

mod ahead;
mod deferred;
mod event_loop;
mod fetch;
mod install;

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{Metrics, Snapshot};
use crate::pagestate::StateCounts;
use crate::region::Layout;
use crate::source::{PageSource, SourceError};
use crate::sys::proc::{EventFd, PidFd};
use crate::sys::uffd::{Uffd, UffdError};

/// How the serve loop behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Events read per `read` call at most.
    pub batch: usize,
    /// Fetch worker threads, for sources that can be slow.
    pub workers: usize,
    /// How long the loop keeps polling for events without sleeping after
    /// its last event (0: sleep at once).
    pub spin: Duration,
    /// First delay before retrying an install refused with `EAGAIN`.
    pub retry_min: Duration,
    /// Longest delay between such retries.
    pub retry_max: Duration,
    /// Attempts at a failing fetch before the session fails closed.
    pub fetch_attempts: u32,
    /// Ranges of the memory file, `(offset, len)`, to install before the
    /// guest touches them: a 2 MiB chunk at a time between reads of
    /// events, skipping pages already served or removed.
    pub install_ahead: Vec<(u64, u64)>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            batch: 64,
            workers: 2,
            spin: Duration::from_micros(50),
            retry_min: Duration::from_micros(20),
            retry_max: Duration::from_millis(10),
            fetch_attempts: 3,
            install_ahead: Vec::new(),
        }
    }
}

/// Why a session stopped serving before its VM exited.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A fault at an address no region covers.
    #[error("fault at {addr:#x} is outside every memory region")]
    OutsideRegions {
        /// The faulting address.
        addr: u64,
    },
    /// An event the server cannot handle.
    #[error("unexpected userfaultfd event {event}")]
    UnexpectedEvent {
        /// The event, as read.
        event: String,
    },
    /// An install or wake failed with an unexpected error.
    #[error("installing the page at {addr:#x} failed")]
    Install {
        /// Page address.
        addr: u64,
        /// The ioctl's error.
        source: UffdError,
    },
    /// Reading events failed.
    #[error("reading events failed")]
    Read {
        /// The read's error.
        source: UffdError,
    },
    /// Waiting for events failed.
    #[error("waiting for events failed")]
    Poll {
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// The page source failed for good.
    #[error("fetching {len:#x} bytes at file offset {offset:#x} failed after {attempts} attempts")]
    Fetch {
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        source: SourceError,
    },
    /// The page source never had bytes it had fetched.
    #[error(
        "the page source failed to keep {len:#x} bytes at {offset:#x} after {attempts} fetches"
    )]
    SourceNeverReady {
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Fetches made.
        attempts: u32,
    },
    /// Setting up the session failed.
    #[error("setting up the session failed: {what}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// The server was asked to stop while its VM still ran.
    #[error("stop requested while the VM was running")]
    Stopped,
}

/// How a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum End {
    /// The VM process exited (its pidfd).
    PeerExited,
    /// The VM's memory is gone (`ESRCH` from an install).
    MemoryGone,
    /// The connection closed and no pidfd tells liveness.
    ConnectionClosed,
}

/// What a session did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// How it ended, if it ended without an error.
    pub end: Option<End>,
    /// Its counters.
    pub metrics: Snapshot,
    /// Pages per state at the end.
    #[serde(skip)]
    pub states: StateCounts,
    /// From the start of serving to the end.
    pub duration: Duration,
}

/// Hooks for tests, called on the serve loop.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called before each read of events.
    pub before_read: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Asked before each install-ahead chunk; `false` puts it off.
    pub ahead_allowed: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("before_read", &self.before_read.is_some())
            .field("ahead_allowed", &self.ahead_allowed.is_some())
            .finish()
    }
}

/// Asks a running session to stop (it then fails closed).
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<EventFd>);

impl StopHandle {
    /// A new handle, not yet tied to a session.
    pub fn new() -> std::io::Result<StopHandle> {
        Ok(StopHandle(Arc::new(EventFd::new()?)))
    }

    /// Requests the stop.
    pub fn stop(&self) {
        self.0.signal();
    }

    /// The eventfd that turns readable on a stop request.
    pub fn fd(&self) -> &EventFd {
        &self.0
    }
}

/// A session's summary and, if it failed, why.
#[derive(Debug)]
pub struct Report {
    /// What the session did.
    pub summary: Summary,
    /// Why it stopped serving, if it failed (the VM was then killed).
    pub error: Option<ServeError>,
}

/// Everything one VM's serving needs.
pub struct Session {
    /// The VM's userfaultfd.
    pub uffd: Uffd,
    /// Its regions and page states.
    pub layout: Arc<Layout>,
    /// Where snapshot bytes come from.
    pub source: Arc<dyn PageSource>,
    /// The VM process, if its pid is visible.
    pub pidfd: Option<PidFd>,
    /// The handshake connection, if still open.
    pub conn: Option<UnixStream>,
    /// Counters, shared with whoever reports them.
    pub metrics: Arc<Metrics>,
    /// Loop settings.
    pub config: Config,
    /// Test hooks.
    pub hooks: Hooks,
    stop: Arc<EventFd>,
}

impl Session {
    /// A session for one VM.
    pub fn new(
        uffd: Uffd,
        layout: Layout,
        source: Arc<dyn PageSource>,
        pidfd: Option<PidFd>,
        conn: Option<UnixStream>,
        config: Config,
    ) -> Result<Session, ServeError> {
        let stop = EventFd::new().map_err(|source| ServeError::Setup {
            what: "stop eventfd",
            source,
        })?;
        Ok(Session {
            uffd,
            layout: Arc::new(layout),
            source,
            pidfd,
            conn,
            metrics: Arc::new(Metrics::default()),
            config,
            hooks: Hooks::default(),
            stop: Arc::new(stop),
        })
    }

    /// A handle that stops this session from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Makes `stop` this session's stop handle.
    pub fn with_stop(mut self, stop: &StopHandle) -> Session {
        self.stop = stop.0.clone();
        self
    }

    /// Serves until the VM exits. On an error the VM is killed first
    /// (fail closed) and the error is in the report.
    pub fn run(self) -> Report {
        let start = Instant::now();
        let result = event_loop::run(&self);
        let summary = |end| Summary {
            end,
            metrics: self.metrics.snapshot(),
            states: self.state_counts(),
            duration: start.elapsed(),
        };
        match result {
            Ok(end) => Report {
                summary: summary(Some(end)),
                error: None,
            },
            Err(error) => {
                Metrics::inc(&self.metrics.fail_closed);
                let killed = self.pidfd.as_ref().map(|p| (p.pid(), p.kill()));
                match killed {
                    Some((pid, Ok(true))) => {
                        tracing::error!(pid, error = %error_chain(&error), "cannot serve: killed the VM")
                    }
                    Some((pid, Ok(false))) => {
                        tracing::error!(pid, error = %error_chain(&error), "cannot serve; VM had exited")
                    }
                    Some((pid, Err(e))) => tracing::error!(
                        pid, error = %error_chain(&error), kill_error = %e, "cannot serve; killing the VM failed"
                    ),
                    None => {
                        tracing::error!(error = %error_chain(&error), "cannot serve; no pidfd to kill the VM")
                    }
                }
                Report {
                    summary: summary(None),
                    error: Some(error),
                }
            }
        }
    }

    fn state_counts(&self) -> StateCounts {
        let mut total = StateCounts::default();
        for r in self.layout.regions() {
            let c = r.states.counts();
            total.never += c.never;
            total.clean += c.clean;
            total.written += c.written;
            total.removed += c.removed;
        }
        total
    }
}

/// An error and its sources, joined with ": ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
