//! Child processes: how one is started, and its pipes: `go` in, the
//! result line out.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use super::spec::{ChildResult, ChildSpec, ERROR_TAG, RESULT_TAG, Role};
use crate::sys::poll::{PollFd, READABLE, poll};
use crate::sys::proc::PidFd;

/// Longest wait for any one step of a child: a safety net, not a figure.
pub const STEP_LIMIT: Duration = Duration::from_secs(180);

/// How a child process is started.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The executable.
    pub exe: PathBuf,
    /// Arguments before the role and spec.
    pub args: Vec<String>,
    /// When set, the role and spec travel in this environment variable
    /// instead of arguments (a test binary as the child).
    pub env: Option<&'static str>,
}

impl Launcher {
    /// This executable's hidden `bench-child` subcommand. The global
    /// flags come first, so that the command line is never mistaken for
    /// `snapfault SOCKET MEMFILE`.
    pub fn this_exe() -> std::io::Result<Launcher> {
        Ok(Launcher {
            exe: std::env::current_exe()?,
            args: ["--log-format", "text", "--log-level", "warn", "bench-child"]
                .map(String::from)
                .to_vec(),
            env: None,
        })
    }

    fn command(&self, role: Role, spec: &str) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args);
        match self.env {
            Some(var) => cmd.env(var, format!("{}\n{spec}", role.name())),
            None => cmd.args(["--role", role.name(), "--spec", spec]),
        };
        cmd
    }
}

/// A child process and its pipes. Killed (by its handle) if dropped
/// before it exited.
pub struct ChildProc {
    child: Child,
    /// Its stdin; dropping it tells the child to end (`hold`).
    pub stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pidfd: PidFd,
}

impl ChildProc {
    /// Starts `role` with `spec`.
    pub fn spawn(launcher: &Launcher, role: Role, spec: &ChildSpec) -> Result<ChildProc, String> {
        let json = serde_json::to_string(spec).map_err(|e| e.to_string())?;
        let mut child = launcher
            .command(role, &json)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", launcher.exe.display()))?;
        let pidfd = PidFd::open(child.id() as i32).map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no child stdout")?;
        let lines = crate::testkit::harness::line_channel(stdout);
        let stdin = child.stdin.take();
        Ok(ChildProc {
            child,
            stdin,
            lines,
            pidfd,
        })
    }

    /// Waits until the child connects to `listener`.
    pub fn wait_connect(&mut self, listener: &UnixListener) -> Result<(), String> {
        let mut fds = [
            PollFd::new(listener.as_fd(), READABLE),
            PollFd::new(self.pidfd.as_fd(), READABLE),
        ];
        poll(&mut fds, Some(STEP_LIMIT)).map_err(|e| e.to_string())?;
        if fds[0].ready() {
            Ok(())
        } else if fds[1].ready() {
            Err(format!(
                "the child exited before connecting: {}",
                self.drain_error()
            ))
        } else {
            Err("the child did not connect".into())
        }
    }

    /// Writes one line to the child.
    pub fn say(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("child stdin closed")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("telling the child {line}: {e}"))
    }

    fn drain_error(&mut self) -> String {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            if let Some((_, e)) = line.split_once(ERROR_TAG) {
                return e.to_string();
            }
        }
        "no error reported".into()
    }

    /// The child's result line.
    pub fn result(&mut self) -> Result<ChildResult, String> {
        loop {
            match self.lines.recv_timeout(STEP_LIMIT) {
                Ok(line) => {
                    if let Some((_, json)) = line.split_once(RESULT_TAG) {
                        return serde_json::from_str(json).map_err(|e| e.to_string());
                    }
                    if let Some((_, e)) = line.split_once(ERROR_TAG) {
                        return Err(format!("child: {e}"));
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err("the child gave no result".into()),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("the child exited without a result".into());
                }
            }
        }
    }

    /// Closes stdin and waits for the child to exit successfully.
    pub fn wait(&mut self) -> Result<(), String> {
        self.stdin = None;
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("the child ended with {status}"))
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
