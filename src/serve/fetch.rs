//! Fetch workers: threads that wait on a slow page source so that the
//! serve loop never does.
//!
//! Workers only make bytes available (`PageSource::fetch`); they never
//! install pages. They hold the completion lock just long enough to push a
//! result, and signal an eventfd the serve loop polls.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::log::RateLimit;
use crate::metrics::Metrics;
use crate::source::{PageSource, SourceError};
use crate::sys::proc::EventFd;

/// A fetch that finished.
#[derive(Debug)]
pub struct Done {
    /// File offset.
    pub offset: u64,
    /// Bytes.
    pub len: usize,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's result.
    pub result: Result<(), SourceError>,
}

struct Shared {
    done: Mutex<Vec<Done>>,
    wake: EventFd,
}

/// The worker pool.
pub struct Pool {
    jobs: Option<Sender<(u64, usize)>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

static RETRY_LOG: RateLimit = RateLimit::new(5);

impl Pool {
    /// Starts `workers` threads (at least one) fetching from `source`.
    pub fn start(
        source: Arc<dyn PageSource>,
        workers: usize,
        attempts: u32,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            done: Mutex::new(Vec::new()),
            wake: EventFd::new()?,
        });
        let (tx, rx) = channel::<(u64, usize)>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..workers.max(1))
            .map(|i| {
                let (source, shared, rx, metrics) =
                    (source.clone(), shared.clone(), rx.clone(), metrics.clone());
                std::thread::Builder::new()
                    .name(format!("snapfault-fetch-{i}"))
                    .spawn(move || worker(&*source, &shared, &rx, attempts.max(1), &metrics))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Pool {
            jobs: Some(tx),
            shared,
            threads,
        })
    }

    /// Queues a fetch of `[offset, offset+len)`.
    pub fn submit(&self, offset: u64, len: usize) {
        if let Some(jobs) = &self.jobs {
            // Fails only if every worker has gone, which happens only on drop.
            let _ = jobs.send((offset, len));
        }
    }

    /// The eventfd that turns readable when fetches finish.
    pub fn wake_fd(&self) -> &EventFd {
        &self.shared.wake
    }

    /// Moves finished fetches into `out`.
    pub fn take_done(&self, out: &mut Vec<Done>) {
        self.shared.wake.drain();
        let mut done = self.shared.done.lock().unwrap_or_else(|p| p.into_inner());
        out.append(&mut done);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the channel ends each worker after its current fetch.
        // They are not joined: a fetch stuck in storage must not keep the
        // server from ending its session (the VM is gone or killed by
        // then); a worker that finishes later finds no one to tell.
        self.jobs = None;
        self.threads.clear();
    }
}

fn worker(
    source: &dyn PageSource,
    shared: &Shared,
    jobs: &Mutex<Receiver<(u64, usize)>>,
    attempts: u32,
    metrics: &Metrics,
) {
    loop {
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((offset, len)) = job else { return };
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match source.fetch(offset, len) {
                Ok(()) => break Ok(()),
                Err(e) if attempt >= attempts => break Err(e),
                Err(e) => {
                    Metrics::inc(&metrics.fetch_retries);
                    if let Some(held) = RETRY_LOG.check() {
                        tracing::warn!(offset, len, attempt, held, error = %e, "fetch failed; retrying");
                    }
                    std::thread::sleep(Duration::from_millis(10) * attempt);
                }
            }
        };
        if result.is_err() {
            Metrics::inc(&metrics.fetch_failures);
        }
        let done = Done {
            offset,
            len,
            attempts: attempt,
            result,
        };
        shared
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(done);
        shared.wake.signal();
    }
}
