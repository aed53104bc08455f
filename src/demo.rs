//! `snapfault demo`: the main job on built-in defaults, end to end.
//!
//! It writes a synthetic snapshot, starts a child process that plays
//! Firecracker (two regions, mapped as Firecracker maps them, handshake,
//! boot writes), serves it, and drives it: reads from several threads,
//! writes, REMOVEs shaped like free page reporting (2 and 4 MiB blocks)
//! and like balloon inflation (runs of 4 KiB pages), re-reads of removed
//! pages (zeros), and a final read of everything. The child checks every
//! byte against its model of what each page must hold.

use std::process::ExitCode;

use crate::server::log_summary;
use crate::testkit::harness::{Rig, RigOptions};

/// `snapfault demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Guest memory in MiB, at least 32 (split into two regions, as
    /// Firecracker does for VMs over 3 GiB).
    #[arg(long, default_value_t = 64)]
    pub mem_mib: u64,
    /// Threads reading at once.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// Page size: 4k, or 2m (needs 2 MiB hugepages reserved).
    #[arg(long, default_value = "4k")]
    pub page: String,
}

/// Runs the demo; prints the steps and the session summary.
pub fn run(args: &DemoArgs) -> ExitCode {
    match drive(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn drive(args: &DemoArgs) -> Result<(), String> {
    let page: &'static str = match args.page.as_str() {
        "4k" => "4k",
        "2m" => "2m",
        other => return Err(format!("--page {other}: use 4k or 2m")),
    };
    // The script's offsets need 32 MiB at least.
    let mem = args.mem_mib.max(32) / 4 * 4;
    let (low, high) = (mem * 3 / 4, mem / 4);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let opts = RigOptions {
        regions_mib: vec![low, high],
        page,
        seed: 42,
        ..RigOptions::default()
    };
    let mut rig = Rig::start(&exe, opts)?;
    let total = mem << 20;
    let t = args.threads.max(1);
    let mut step = |what: &str, cmd: &str| -> Result<(), String> {
        let answer = rig.peer.send(cmd)?;
        println!("  {what:<52} {answer}");
        Ok(())
    };
    println!("snapfault demo: {mem} MiB guest in two regions ({low} + {high} MiB), {page} pages");
    step(
        "read the first half from threads, check bytes",
        &format!("read 0 {} threads={t}", total / 2),
    )?;
    step("write 4 MiB", "write 8m 4m 7")?;
    step("free page report: remove a 4 MiB block", "remove 8m 4m")?;
    step("free page report: remove a 2 MiB block", "remove 16m 2m")?;
    if page == "4k" {
        step(
            "balloon inflation: remove a run of 4 KiB pages",
            "remove 20m 64k",
        )?;
    }
    step("re-read the removed pages: zeros", "read 8m 16m")?;
    step(
        "remove pages never touched (in the 2nd region)",
        &format!("remove {}m 2m", low + 2),
    )?;
    step(
        "read everything from threads, check bytes",
        &format!("read 0 {total} threads={t}"),
    )?;
    step("write over a removed block, read it back", "write 16m 2m 9")?;
    step("check it", "read 16m 2m")?;
    let report = rig.finish();
    log_summary(&report);
    let m = &report.summary.metrics;
    println!(
        "summary: faults={} from_source={} zero_pages={} pages_removed={} deferred={} retries={} \
         bytes_from_source={} duration_ms={}",
        m.faults,
        m.pages_from_source,
        m.zero_pages,
        m.pages_removed,
        m.deferred,
        m.retries,
        m.bytes_from_source,
        report.summary.duration.as_millis()
    );
    match report.error {
        None => {
            println!("every byte checked: ok");
            Ok(())
        }
        Some(e) => Err(crate::serve::error_chain(&e)),
    }
}
