//! `snapfault bench`: every fault path measured side by side in one run,
//! against the kernel's own faults and against a minimal handler.
//!
//! # Design
//!
//! The bench's process plays the memory server; each measurement starts a
//! child process (`snapfault bench-child`, hidden) that plays Firecracker:
//! it maps guest memory with Firecracker's flags, opens a userfaultfd with
//! `EVENT_REMOVE` only, registers it MISSING-only, sends the handshake,
//! waits for `go` on stdin, runs its timed part and prints one JSON line.
//! The parent serves it with a snapfault session (`server::accept` and
//! `Session::run` on a thread, as `snapfault serve` does, with
//! `Config::default()` and the `mincore` residency check on unless a case
//! says otherwise) or with the minimal handler (`minimal.rs`: `ppoll`,
//! `read` one message, one `UFFDIO_COPY`); a kernel baseline has no
//! server. Snapfault and the minimal handler thus cross the same process
//! boundary and copy from the same hot memory file, whose mappings are
//! touched in full before anything is timed.
//!
//! Every case runs once per repetition, cases in a fixed order, so the
//! run is `A B C ... A B C ...` and drift of this shared machine hits all
//! alike; cases compared with each other run next to each other. Each
//! figure is the median over repetitions with its min-max. A target's
//! ratio is taken within each repetition (the two cases seconds apart) and
//! then summarized the same way; the table's ratio columns divide medians.
//! The figures:
//!
//! - **us/page** of a fault case: wall time of the timed part (first
//!   faulter's start to last one's end) over pages first touched; the
//!   inverse is **kpage/s**, the throughput two faulters are judged by.
//!   A thread touches one byte per page; a vCPU (test-kit KVM, CPL 3)
//!   reads one whole 4 KiB page per page (one per 2 MiB page with 2m).
//! - **p50/p99**: per-touch latency, each touch of a thread timed with
//!   `Instant::now`, the percentiles of one run, then medians over runs.
//! - **Kernel baselines**: `kernel-read` and `kernel-cow` touch a
//!   `MAP_PRIVATE` mapping of the hot memory file from a thread (a read
//!   maps the page cache, with fault-around; a write copies the page, the
//!   same work as a `UFFDIO_COPY`); `kernel-zero` is anonymous memory
//!   without a userfaultfd (`MADV_NOHUGEPAGE` for 4k, hugetlb for 2m),
//!   written by a thread, read by a vCPU.
//! - **sf/min, sf/kern**: snapfault's us/page over the minimal handler's,
//!   and over `kernel-cow` (4k threads) or `kernel-zero`: below 1 is
//!   faster.
//! - **Spin sweep**: snapfault with each `Config::spin` on four 4k shapes
//!   (1 thread seq, 2 threads random, 1 and 2 vCPUs seq), next to a run of
//!   the minimal handler on each; a spin's score is, per repetition, the
//!   geometric mean over the shapes of its us/page over that of the first
//!   spin tried. The lowest median score is the recommended default: it
//!   weighs the faster wake-up of a spinning loop against the core it
//!   takes from a vCPU on two cores.
//! - **REMOVE**: the `madvise(MADV_DONTNEED)` caller's time, which blocks
//!   until the server has read the event, at each length, on never-touched
//!   memory (the round trip, no zap work): `isolated` sleeps before each
//!   call so that the server is asleep when it comes (free page
//!   reporting), `burst` calls back to back (balloon inflation); `kernel`
//!   has no userfaultfd.
//! - **Bulk install**: GB/s of snapfault's install-ahead of a whole region
//!   (session start until `install_ahead_finished`), of raw 2 MiB
//!   `UFFDIO_COPY`s by the minimal handler, and of `memcpy` of the same
//!   bytes into fresh and into populated anonymous memory.
//! - **Page states**: `PageStates::footprint` for 1 GiB of guest memory.
//! - **Ready time**: from `go` until one vCPU has read a whole working set
//!   (4k pages), on demand and with install-ahead of all of it.
//! - **Placement** (`placement.rs`): a few cases again with the serving
//!   thread and the child pinned to one CPU or to two, because the
//!   scheduler, left alone, switches between the two and a cross-CPU
//!   wake-up costs this VM a hypervisor round trip: it is what makes the
//!   free-running figures bimodal.
//! - **Counts** beside the targets, per fault (per `madvise` call, per
//!   2 MiB chunk): the serving thread's sleeps (voluntary context
//!   switches), preemptions, CPU us and `read` calls, and the faulting
//!   threads' sleeps, preemptions and CPU us, from `/proc/thread-self`
//!   (`stats.rs`); they include a few reads of `/proc` per run.
//!
//! # Limitations
//!
//! - vCPU rows have no p50/p99: the test kit's guest has no clock, and a
//!   `KVM_RUN` per touch would add an exit to every page. Their us/page
//!   includes the shadow page fault every first guest touch pays.
//! - `kernel-read` maps up to 16 pages per fault (fault-around): it is the
//!   cost per page the kernel gets, not per fault (`cli_minflt` in the
//!   JSON gives faults per page).
//! - The minimal handler keeps no page state: a removed page would get
//!   snapshot bytes again. No case touches a removed page.
//! - The install-ahead time is seen by polling a counter every 0.5 ms and
//!   includes the session's set-up (its fetch threads); the raw copy is
//!   timed around its loop.
//! - Timing runs on a shared, noisy VM with two cores (other work on it
//!   shows as wide min-max); servers run as threads of the bench process,
//!   which otherwise only waits.

mod child;
mod figures;
mod host;
mod minimal;
mod placement;
mod plan;
mod proc;
#[allow(unsafe_code)]
mod raw;
mod report;
mod spec;
mod stats;
mod table;
#[cfg(test)]
mod tests;
mod vcpu;

use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::time::Instant;

use figures::Raw;
use host::Host;
use plan::Sizes;
use proc::Launcher;
use report::{Footprint, Results};
use spec::{ChildSpec, ERROR_TAG, RESULT_TAG, Role};

/// `snapfault bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Repetitions of every case (each figure is their median).
    #[arg(long, default_value_t = 7)]
    pub reps: u32,
    /// MiB each 4 KiB fault case touches.
    #[arg(long, default_value_t = 16)]
    pub fault_mib: u64,
    /// MiB each 2 MiB fault case touches (needs hugepages; raised if few).
    #[arg(long, default_value_t = 64)]
    pub huge_mib: u64,
    /// MiB of the ready-time working set.
    #[arg(long, default_value_t = 256)]
    pub working_set_mib: u64,
    /// MiB installed by the bulk cases.
    #[arg(long, default_value_t = 256)]
    pub bulk_mib: u64,
    /// MiB of the largest REMOVE (the others are 4 KiB and 2 MiB).
    #[arg(long, default_value_t = 64)]
    pub remove_mib: u64,
    /// `madvise` calls per REMOVE length per repetition.
    #[arg(long, default_value_t = 20)]
    pub remove_calls: u32,
    /// `Config::spin` values to try, in microseconds.
    #[arg(long, value_delimiter = ',', default_value = "0,20,50,100,200")]
    pub spins_us: Vec<u64>,
    /// Let the server's info logs through.
    #[arg(long)]
    pub server_logs: bool,
    /// Skip the vCPU cases.
    #[arg(long)]
    pub no_kvm: bool,
    /// Skip the 2 MiB cases.
    #[arg(long)]
    pub no_hugepages: bool,
    /// Run only the cases whose key contains one of these (e.g.
    /// `vcpu1/seq/4k,remove`; a final `$` asks for a key that ends so);
    /// targets lacking a figure show `-`.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// Arguments of the hidden child process the bench starts.
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    /// What the child does: touch, remove, hold or ready.
    #[arg(long)]
    pub role: String,
    /// Its parameters, as JSON.
    #[arg(long)]
    pub spec: String,
}

/// Runs the bench and prints its table (or JSON).
pub fn run(args: &BenchArgs) -> ExitCode {
    let results = Launcher::this_exe()
        .map_err(|e| format!("finding this executable: {e}"))
        .and_then(|launcher| measure(args, &launcher, true));
    match results {
        Ok(results) => {
            if args.json {
                match serde_json::to_string_pretty(&results) {
                    Ok(json) => println!("{json}"),
                    Err(e) => eprintln!("bench: {e}"),
                }
            } else {
                print!("{}", table::render_all(&results));
            }
            if results.errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the bench's child process: its one result line on stdout.
pub fn run_child(args: &ChildArgs) -> ExitCode {
    if child_main(args) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn child_main(args: &ChildArgs) -> bool {
    let result = Role::parse(&args.role)
        .ok_or_else(|| format!("unknown role {:?}", args.role))
        .and_then(|role| {
            let spec: ChildSpec = serde_json::from_str(&args.spec).map_err(|e| e.to_string())?;
            child::run(role, &spec)
        })
        .and_then(|r| serde_json::to_string(&r).map_err(|e| e.to_string()));
    match result {
        Ok(json) => {
            println!("{RESULT_TAG}{json}");
            true
        }
        Err(e) => {
            println!("{ERROR_TAG}{e}");
            false
        }
    }
}

/// Makes sure `n` 2 MiB hugepages are free, raising the pool if needed
/// (never lowering it). Whether they are.
fn ensure_hugepages(n: u64) -> bool {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let free_path = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
    let free = read(free_path).unwrap_or(0);
    if free >= n {
        return true;
    }
    let total = read("/proc/sys/vm/nr_hugepages").unwrap_or(0);
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", (total + n - free).to_string());
    read(free_path).unwrap_or(0) >= n
}

/// Runs every case `args.reps` times and checks the targets.
fn measure(args: &BenchArgs, launcher: &Launcher, progress: bool) -> Result<Results, String> {
    let started = Instant::now();
    let mib = |m: u64| (m.max(2) << 20).next_multiple_of(2 << 20);
    let sizes = Sizes {
        fault: mib(args.fault_mib),
        huge: mib(args.huge_mib),
        working_set: mib(args.working_set_mib),
        bulk: mib(args.bulk_mib),
        remove_lens: vec![4 << 10, 2 << 20, mib(args.remove_mib)],
        remove_calls: args.remove_calls.max(1),
        spins_us: if args.spins_us.is_empty() {
            vec![0]
        } else {
            args.spins_us.clone()
        },
    };
    let kvm = !args.no_kvm && std::path::Path::new("/dev/kvm").exists();
    let huge = !args.no_hugepages && ensure_hugepages(plan::hugepages_needed(&sizes));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cases = plan::cases(&sizes, kvm, huge, cpus >= 2);
    if !args.only.is_empty() {
        cases.retain(|c| {
            args.only.iter().any(|o| match o.strip_suffix('$') {
                Some(end) => c.key.ends_with(end),
                None => c.key.contains(o.as_str()),
            })
        });
    }
    let dir = crate::testkit::harness::TempDir::new("bench").map_err(|e| e.to_string())?;
    let memfile = dir.path().join("mem");
    let file = std::fs::File::create(&memfile).map_err(|e| e.to_string())?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    crate::testkit::kvm::write_image(&mut out, plan::memfile_len(&cases))
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing the memory file: {e}"))?;
    drop(out);
    let host = Host::new(launcher.clone(), dir, memfile, !args.server_logs)?;
    // One untimed pass over the first cases: code, caches and the
    // hypervisor's shadow state settle before the first repetition.
    for case in cases.iter().take(6) {
        let _ = figures::run_case(&host, case);
    }
    let reps = args.reps.max(1);
    let mut raw = Raw::new();
    let mut errors = Vec::new();
    for rep in 0..reps {
        let t = Instant::now();
        for case in &cases {
            let run = figures::run_case(&host, case).unwrap_or_else(|e| {
                errors.push(format!("{} (rep {}): {e}", case.key, rep + 1));
                figures::RunFigures::new()
            });
            raw.entry(case.key.clone()).or_default().push(run);
        }
        if progress {
            let took = t.elapsed().as_secs_f64();
            eprintln!(
                "bench: rep {}/{reps}: {} cases in {took:.1} s",
                rep + 1,
                cases.len()
            );
        }
    }
    let figures = figures::summarize(&raw);
    let page_states = Footprint::measure();
    let spin = report::choose_spin(&raw, &sizes, kvm);
    let targets = report::targets(&raw, &figures, &spin, &page_states, &sizes, kvm);
    Ok(Results {
        reps,
        seconds: started.elapsed().as_secs_f64(),
        sizes,
        kvm,
        hugepages: huge,
        cases: figures,
        page_states,
        spin,
        targets,
        errors,
    })
}
