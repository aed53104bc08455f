//! Logging set-up and rate limiting.
//!
//! Level policy: `error` = the VM or the server is hurt (it is killed, or
//! the server exits); `warn` = degraded but recovered (an install retried
//! many times, a storage retry); `info` = lifecycle (listening, connected,
//! session summary); `debug`/`trace` = per-event detail.
//!
//! Anything a guest can trigger at a high rate and that is logged above
//! `debug` goes through a [`RateLimit`], which also says how many lines it
//! held back. Every logged failure is counted in [`crate::metrics`] too.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber, writing to stderr. `filter` is an
/// `EnvFilter` directive such as `info` or `snapfault=debug`; `RUST_LOG`
/// overrides it when set.
pub fn init(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    // Colours only for a terminal: logs read by a program stay plain.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Lets through at most `per_second` events each second, counting the rest.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u64,
    window: AtomicU64,
    used: AtomicU64,
    held: AtomicU64,
}

impl RateLimit {
    /// A limit of `per_second` lines a second.
    pub const fn new(per_second: u64) -> RateLimit {
        RateLimit {
            per_second,
            window: AtomicU64::new(u64::MAX),
            used: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(held_back)` if a line may be written now, with the number of
    /// lines held back since the last one written; `None` if not.
    pub fn check(&self) -> Option<u64> {
        let window = now_ms() / 1000;
        if self.window.swap(window, Relaxed) != window {
            self.used.store(0, Relaxed);
        }
        if self.used.fetch_add(1, Relaxed) < self.per_second {
            Some(self.held.swap(0, Relaxed))
        } else {
            self.held.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_past_the_limit() {
        let limit = RateLimit::new(3);
        let passed = (0..10).filter(|_| limit.check().is_some()).count();
        // A window boundary may fall inside the loop and let a few more by.
        assert!((3..=6).contains(&passed), "{passed}");
    }
}
