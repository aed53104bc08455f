//! The `snapfault` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use snapfault::log::LogFormat;
use snapfault::serve::{Config, StopHandle};
use snapfault::server::{self, Options};
use snapfault::source::{FileSource, PageSource};
use snapfault::testkit::peer::{Peer, PeerArgs};

/// A userfaultfd memory server for Firecracker snapshots.
///
/// Firecracker restores a snapshot with the `Uffd` memory backend, connects
/// to snapfault's socket and hands over a userfaultfd; snapfault serves each
/// guest page on first touch from the snapshot's memory file, and zeros for
/// pages the guest's balloon gave back.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter, e.g. `info` or `snapfault=debug` (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one VM: listen on SOCKET, serve pages from MEMFILE, exit when
    /// the VM exits. `snapfault SOCKET MEMFILE` does the same, as
    /// Firecracker's example handler is started.
    ///
    /// Exit status: 0 when the VM exited; 1 when serving failed (the VM was
    /// killed, the log says why) or the handshake was refused; 2 on bad
    /// usage.
    Serve(ServeArgs),
    /// Show the whole thing working: make a synthetic snapshot, play
    /// Firecracker in a child process, serve it, run reads, writes and
    /// balloon-style removes from several threads, check every byte.
    Demo(snapfault::demo::DemoArgs),
    /// Measure every fault path against the kernel's own and against a
    /// minimal handler, side by side in one run.
    Bench(snapfault::bench::BenchArgs),
    /// Play Firecracker's part (for tests and the demo).
    #[command(hide = true)]
    FcPeer(PeerArgs),
    /// The bench's child process.
    #[command(hide = true)]
    BenchChild(snapfault::bench::ChildArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Unix socket to listen on: Firecracker's `mem_backend.backend_path`.
    socket: PathBuf,
    /// The snapshot's memory file (`mem_file_path` of the snapshot).
    memfile: PathBuf,
    /// Fetch worker threads (they wait on storage so the serve loop does not).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Events read per read(2) at most.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Microseconds to keep polling for events before sleeping (0: sleep
    /// at once). Polling saves the serve loop's wake-up on the next fault;
    /// on a machine with few cores it takes CPU time from the vCPUs.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Longest wait for the handshake after a connection, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Write counters in the Prometheus text format to this file at exit.
    #[arg(long)]
    metrics_file: Option<PathBuf>,
    /// Copy from the memory file without asking whether its pages are in
    /// the page cache (saves a syscall per fault for a file known hot).
    #[arg(long)]
    no_residency_check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(with_default_subcommand(std::env::args_os().collect()));
    snapfault::log::init(cli.log_format, &cli.log_level);
    match cli.command {
        Cmd::Serve(args) => serve(args),
        Cmd::Demo(args) => snapfault::demo::run(&args),
        Cmd::Bench(args) => snapfault::bench::run(&args),
        Cmd::BenchChild(args) => snapfault::bench::run_child(&args),
        Cmd::FcPeer(args) => match Peer::start(&args).and_then(Peer::serve_stdin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fc-peer: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `snapfault SOCKET MEMFILE` means `snapfault serve SOCKET MEMFILE`.
fn with_default_subcommand(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const KNOWN: [&str; 10] = [
        "serve",
        "demo",
        "bench",
        "bench-child",
        "fc-peer",
        "help",
        "-h",
        "--help",
        "-V",
        "--version",
    ];
    let first_positional = args
        .iter()
        .skip(1)
        .position(|a| !a.to_string_lossy().starts_with('-'));
    let Some(i) = first_positional.map(|i| i + 1) else {
        return args;
    };
    let word = args[i].to_string_lossy();
    let flag_value =
        i > 1 && ["--log-format", "--log-level"].contains(&&*args[i - 1].to_string_lossy());
    if !flag_value && !KNOWN.contains(&&*word) {
        args.insert(i, "serve".into());
    }
    args
}

fn serve(args: ServeArgs) -> ExitCode {
    if let Err(e) = snapfault::sys::proc::block_termination_signals() {
        tracing::warn!(error = %e, "cannot block termination signals");
    }
    let stop = match StopHandle::new() {
        Ok(s) => s,
        Err(e) => return fail(&format!("creating the stop eventfd: {e}")),
    };
    let signal_stop = stop.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = snapfault::sys::proc::wait_termination() {
            tracing::warn!(signal = sig, "termination signal: stopping");
            signal_stop.stop();
        }
    });
    let source = match FileSource::open(&args.memfile) {
        Ok(s) => s.check_resident(!args.no_residency_check),
        Err(e) => {
            return fail(&format!(
                "opening memory file {}: {e}",
                args.memfile.display()
            ));
        }
    };
    let source: Arc<dyn PageSource> = Arc::new(source);
    match snapfault::sys::uffd::Uffd::probe_features() {
        Ok(features) if features & snapfault::sys::uffd::feature::EVENT_REMOVE == 0 => {
            tracing::warn!(features, "this kernel's userfaultfd has no REMOVE events")
        }
        Ok(features) => tracing::debug!(features, "userfaultfd features"),
        Err(e) => tracing::warn!(error = %e, "cannot probe userfaultfd features"),
    }
    let listener = match server::listen(&args.socket) {
        Ok(l) => l,
        Err(e) => return fail(&snapfault::serve::error_chain(&e)),
    };
    tracing::info!(socket = %args.socket.display(), memfile = %args.memfile.display(),
        bytes = source.len(), "listening");
    let options = Options {
        config: Config {
            batch: args.batch.max(1),
            workers: args.workers.max(1),
            spin: Duration::from_micros(args.spin_us),
            ..Config::default()
        },
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        ..Options::default()
    };
    let result = server::accept(&listener, source, &options, &stop);
    let _ = std::fs::remove_file(&args.socket);
    drop(listener);
    let accepted = match result {
        Ok(a) => a,
        Err(e) => return fail(&snapfault::serve::error_chain(&e)),
    };
    let metrics = accepted.session.metrics.clone();
    let report = accepted.session.run();
    server::log_summary(&report);
    if let Some(path) = &args.metrics_file {
        if let Err(e) = server::write_metrics(path, &metrics) {
            tracing::error!(path = %path.display(), error = %e, "writing metrics failed");
        }
    }
    if report.error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn fail(message: &str) -> ExitCode {
    tracing::error!(error = message, "snapfault cannot serve");
    ExitCode::FAILURE
}
