//! Counters for everything the server does and every failure it logs.
//!
//! # Design
//!
//! Plain relaxed atomic counters, one struct per session: the fault path
//! bumps them without a lock or an allocation, and a test asserts on them
//! instead of on log text. They are written out in the Prometheus text
//! format (`--metrics-file`) and summarized in one log line at exit.
//! A counting crate would add a registry and a global recorder for what is
//! here a dozen integers.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($(#[doc = $doc:literal] $name:ident,)*) => {
        /// A session's counters.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(#[doc = $doc] pub $name: AtomicU64,)*
        }

        /// A copy of the counters at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct Snapshot {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl Metrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }

        impl Snapshot {
            /// The counters in the Prometheus text format.
            pub fn to_prometheus(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP snapfault_{} {}", stringify!($name), $doc.trim());
                    let _ = writeln!(out, "# TYPE snapfault_{} counter", stringify!($name));
                    let _ = writeln!(out, "snapfault_{} {}", stringify!($name), self.$name);
                )*
                out
            }
        }
    };
}

counters! {
    /// Page fault events read.
    faults,
    /// Page fault events for writes.
    write_faults,
    /// Write-protect fault events.
    wp_faults,
    /// Pages installed with bytes from the page source.
    pages_from_source,
    /// Pages installed ahead of faults (install-ahead ranges).
    pages_installed_ahead,
    /// Install-ahead lists finished (0 or 1 per session).
    install_ahead_finished,
    /// Pages installed with zeros (removed pages).
    zero_pages,
    /// Installs that found the page present already (duplicate faults).
    already_present,
    /// Installs put off because the memory was changing (EAGAIN).
    deferred,
    /// Retries of put-off installs.
    retries,
    /// REMOVE events read.
    remove_events,
    /// Pages newly marked removed.
    pages_removed,
    /// Bytes copied from the page source into the guest.
    bytes_from_source,
    /// Faults handed to fetch workers because the source was not ready.
    source_misses,
    /// Fetches from the page source that failed and were retried.
    fetch_retries,
    /// Fetches from the page source that failed for good.
    fetch_failures,
    /// Events of a kind the server does not handle.
    unexpected_events,
    /// Faults at addresses outside every region.
    faults_outside_regions,
    /// Install ioctls that failed with an unexpected error.
    install_errors,
    /// Times the server killed its VM because it could not serve it.
    fail_closed,
}

impl Metrics {
    /// Adds `n` to `counter`.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Adds one to `counter`.
    #[inline]
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}
