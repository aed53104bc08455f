//! The command line as Firecracker's test harness and a user start it.

mod common;

use std::os::unix::process::ExitStatusExt;

use common::{ServerProcess, Setup, exe};

/// `snapfault SOCKET MEMFILE`, the way Firecracker's tests start their
/// example handler: serves a VM, exits 0 when it exits, logs one summary
/// line, writes the metrics file.
#[test]
fn drop_in_command_line_serves_and_exits_with_its_vm() {
    let setup = Setup::new("cli", 8);
    let (mem, sock) = (&setup.mem, &setup.sock);
    let metrics = setup.dir.path().join("metrics.prom");
    // No `serve` word: the command line Firecracker's tests use.
    let server = ServerProcess::start(
        &[
            sock.to_str().unwrap(),
            mem.to_str().unwrap(),
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
        sock,
    );
    let mut peer = setup.peer(&[]);
    peer.ready().unwrap();
    peer.ok("read 0 8m threads=2");
    peer.ok("remove 2m 2m");
    peer.ok("read 2m 2m expect=zero");
    peer.exit().unwrap();
    let (code, log) = server.wait();
    assert_eq!(code, Some(0), "{log}");
    let summary: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("session summary"))
        .collect();
    assert_eq!(summary.len(), 1, "{log}");
    for key in [
        "faults=",
        "zero_pages=512",
        "pages_removed=512",
        "retries=",
        "bytes_from_source=",
        "duration_ms=",
    ] {
        assert!(
            summary[0].contains(key),
            "summary lacks {key}: {}",
            summary[0]
        );
    }
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(prom.contains("snapfault_pages_removed 512"), "{prom}");
    assert!(!sock.exists(), "the socket file was left behind");
}

/// Firecracker v1.10/v1.11 close the connection right after the handshake
/// and go on running: the server keeps serving until the process exits.
#[test]
fn legacy_peer_closing_its_connection_is_still_served() {
    let setup = Setup::new("cli", 8);
    let server = setup.serve(&[]);
    let mut peer = setup.peer(&["--legacy"]);
    peer.ready().unwrap();
    peer.ok("read 0 8m");
    peer.ok("remove 0 4m");
    peer.ok("read 0 8m");
    peer.exit().unwrap();
    let (code, log) = server.wait();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("handshake connection closed"), "{log}");
    assert!(log.contains("end=PeerExited"), "{log}");
}

/// SIGTERM while a VM is served: the server cannot go on, so it kills the
/// VM (rather than leave it hanging on its next fault) and exits 1.
#[test]
fn termination_signal_fails_closed() {
    let setup = Setup::new("cli", 8);
    let server = setup.serve(&[]);
    let mut peer = setup.peer(&[]);
    peer.ready().unwrap();
    peer.ok("read 0 1m");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status();
    assert!(status.unwrap().success());
    let peer_status = peer.wait().unwrap();
    assert_eq!(peer_status.signal(), Some(libc::SIGKILL));
    let (code, log) = server.wait();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("stop requested while the VM was running"),
        "{log}"
    );
    assert!(log.contains("session summary"), "{log}");
}

/// JSON logs: every line is one JSON object.
#[test]
fn json_logs() {
    let setup = Setup::new("cli", 4);
    let server = setup.serve(&["--log-format", "json"]);
    let mut peer = setup.peer(&[]);
    peer.ready().unwrap();
    peer.exit().unwrap();
    let (code, log) = server.wait();
    assert_eq!(code, Some(0), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let summary = lines
        .iter()
        .find(|v| v["message"] == "session summary")
        .expect("summary line");
    assert!(summary["faults"].as_u64().unwrap() >= 2);
}

#[test]
fn help_explains_the_options() {
    let out = std::process::Command::new(exe())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "SOCKET",
        "MEMFILE",
        "--workers",
        "--log-format",
        "--metrics-file",
        "Exit status",
    ] {
        assert!(text.contains(word), "help lacks {word}:\n{text}");
    }
}

#[test]
fn missing_memory_file_is_a_clear_error() {
    let out = std::process::Command::new(exe())
        .args(["/tmp/snapfault-nowhere.sock", "/nonexistent/mem"])
        .output();
    let out = out.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("opening memory file /nonexistent/mem"),
        "{log}"
    );
}

/// The README's first command.
#[test]
fn demo_checks_every_byte() {
    let out = std::process::Command::new(exe())
        .args(["demo", "--mem-mib", "32"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("every byte checked: ok"), "{text}");
    assert!(text.contains("summary: faults="), "{text}");
}
