//! `snapfault bench` (being written).

use std::process::ExitCode;

/// `snapfault bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of the hidden child process the bench starts.
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    /// What the child does.
    #[arg(long)]
    pub role: String,
}

/// Runs the bench.
pub fn run(_args: &BenchArgs) -> ExitCode {
    ExitCode::FAILURE
}

/// Runs the bench's child process.
pub fn run_child(_args: &ChildArgs) -> ExitCode {
    ExitCode::FAILURE
}
