//! Summaries of samples, and the kernel's per-thread counters.
//!
//! The counters come from `/proc/thread-self` (`status`, `schedstat`,
//! `io`, `stat`), which needs no privilege, no extra syscall on the
//! measured path and no `perf` support from the hypervisor. They count for
//! the calling thread only, so each measured thread reads them itself
//! before and after its timed part.

use serde::{Deserialize, Serialize};

/// Kernel counters of one thread, or a sum over threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Voluntary context switches: the thread went to sleep (a fault
    /// waiting for its server, a `ppoll` waiting for events).
    pub voluntary: u64,
    /// Involuntary context switches: the thread was preempted.
    pub involuntary: u64,
    /// CPU time, nanoseconds (`schedstat`).
    pub cpu_ns: u64,
    /// `read`-family syscalls (`io: syscr`), e.g. reads of the uffd.
    pub reads: u64,
    /// Minor page faults the kernel resolved itself (`stat: minflt`).
    pub minflt: u64,
}

impl Counts {
    /// The calling thread's counters now. A counter whose file is missing
    /// (a kernel without task I/O accounting) reads as zero.
    pub fn this_thread() -> Counts {
        let read = |name: &str| {
            std::fs::read_to_string(format!("/proc/thread-self/{name}")).unwrap_or_default()
        };
        let status = read("status");
        let io = read("io");
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let schedstat = read("schedstat");
        let stat = read("stat");
        // Fields after the command name, which may hold spaces but ends at
        // the last ')'; minflt is the tenth field, the eighth after it.
        let minflt = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(7))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Counts {
            voluntary: field(&status, "voluntary_ctxt_switches:"),
            involuntary: field(&status, "nonvoluntary_ctxt_switches:"),
            cpu_ns: schedstat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            reads: field(&io, "syscr:"),
            minflt,
        }
    }

    /// What happened since `before` (same thread).
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
            cpu_ns: self.cpu_ns.saturating_sub(before.cpu_ns),
            reads: self.reads.saturating_sub(before.reads),
            minflt: self.minflt.saturating_sub(before.minflt),
        }
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counts) {
        self.voluntary += other.voluntary;
        self.involuntary += other.involuntary;
        self.cpu_ns += other.cpu_ns;
        self.reads += other.reads;
        self.minflt += other.minflt;
    }
}

/// Per-touch latency of one child run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median touch.
    pub p50_ns: u64,
    /// 99th percentile touch.
    pub p99_ns: u64,
    /// Mean touch.
    pub mean_ns: u64,
}

impl Latency {
    /// The latency of `samples` (nanoseconds; sorted here).
    pub fn of(samples: &mut [u64]) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let sum: u64 = samples.iter().sum();
        Some(Latency {
            p50_ns: percentile(samples, 0.50),
            p99_ns: percentile(samples, 0.99),
            mean_ns: sum / samples.len() as u64,
        })
    }
}

/// The nearest-rank percentile `p` (0..=1) of sorted `samples`.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median and range of one figure over repetitions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Median (the mean of the two middle values for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Number of repetitions.
    pub n: usize,
}

impl Spread {
    /// The spread of `values`; `None` if there are none.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let mut s: Vec<u64> = (1..=100).rev().collect();
        let l = Latency::of(&mut s).unwrap();
        assert_eq!((l.p50_ns, l.p99_ns, l.mean_ns), (50, 99, 50));
        let sp = Spread::of(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((sp.median, sp.min, sp.max, sp.n), (2.5, 1.0, 10.0, 4));
        assert!(Spread::of(&[]).is_none());
    }

    #[test]
    fn own_counters_move() {
        let before = Counts::this_thread();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let d = Counts::this_thread().since(&before);
        assert!(d.voluntary >= 1, "{d:?}");
    }
}
