//! Bad handshakes against the real `snapfault serve`: each gets a clear
//! error naming what was wrong, the server exits (status 1) instead of
//! crashing or hanging, and a peer that handed over a userfaultfd (and so
//! would hang on its first fault) is killed.

mod common;

use std::os::unix::process::ExitStatusExt;

use common::Setup;

/// Runs one bad handshake; returns the server's log.
#[track_caller]
fn refused(more: &[&str], want: &str, peer_killed: bool) -> String {
    let setup = Setup::new("hs", 4);
    let server = setup.serve(&[]);
    let mut peer = setup.peer(&[&["--no-boot-writes"], more].concat());
    let (code, log) = server.wait();
    assert_eq!(code, Some(1), "server status; log:\n{log}");
    assert!(log.contains(want), "log lacks {want:?}:\n{log}");
    if peer_killed {
        let status = peer.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "peer should be killed: {status:?}\n{log}"
        );
    } else {
        peer.ready().expect("peer should live on");
    }
    log
}

fn region_json(base: u64, size: u64, offset: u64, page: &str) -> String {
    format!(r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},{page}}}"#)
}

#[test]
fn malformed_json() {
    refused(
        &["--payload", r#"[{"base_host_virt_addr":1,"size""#],
        "are not complete JSON",
        true,
    );
    refused(
        &["--payload", r#"[{"base_host_virt_addr":"x"}]"#],
        "not a JSON array",
        true,
    );
    refused(
        &["--payload", r#"{"regions":[]}"#],
        "not a JSON array",
        true,
    );
}

#[test]
fn oversized_payload() {
    let big = format!(
        "[{}]",
        vec![region_json(4096, 4096, 0, r#""page_size":4096"#); 1000].join(",")
    );
    assert!(big.len() > 64 * 1024);
    refused(&["--payload", &big], "larger than 65536 bytes", true);
}

#[test]
fn no_descriptor() {
    refused(&["--fds", "none"], "carried no file descriptor", false);
}

#[test]
fn two_descriptors() {
    refused(&["--fds", "two"], "carried 2 file descriptors", false);
}

#[test]
fn descriptor_not_a_userfaultfd() {
    refused(&["--fds", "file"], "not a userfaultfd", false);
}

#[test]
fn no_regions() {
    refused(&["--payload", "[]"], "lists no memory region", true);
}

#[test]
fn overlapping_regions() {
    let a = region_json(1 << 30, 2 << 20, 0, r#""page_size":4096"#);
    let b = region_json(
        (1 << 30) + (1 << 20),
        1 << 20,
        2 << 20,
        r#""page_size":4096"#,
    );
    refused(
        &["--payload", &format!("[{a},{b}]")],
        "regions 0 and 1 overlap",
        true,
    );
}

#[test]
fn unsupported_page_size() {
    let a = region_json(1 << 30, 1 << 20, 0, r#""page_size":65536"#);
    refused(
        &["--payload", &format!("[{a}]")],
        "page size 65536 is neither",
        true,
    );
}

#[test]
fn unaligned_address_or_size() {
    let a = region_json((1 << 30) + 512, 1 << 20, 0, r#""page_size":4096"#);
    refused(
        &["--payload", &format!("[{a}]")],
        "base_host_virt_addr 0x40000200 is not a multiple",
        true,
    );
    let b = region_json(1 << 30, (1 << 20) + 100, 0, r#""page_size":4096"#);
    refused(
        &["--payload", &format!("[{b}]")],
        "size 0x100064 is not a multiple",
        true,
    );
    let c = region_json(1 << 30, 2 << 20, 0, r#""page_size":2097152"#);
    let huge_unaligned = c.replace("1073741824", "1074790400");
    refused(
        &["--payload", &format!("[{huge_unaligned}]")],
        "is not a multiple of the page size 2097152",
        true,
    );
}

#[test]
fn region_past_the_end_of_the_memory_file() {
    let a = region_json(1 << 30, 8 << 20, 0, r#""page_size":4096"#);
    refused(
        &["--payload", &format!("[{a}]")],
        "past the end of the memory file",
        true,
    );
}

#[test]
fn no_page_size_field() {
    let a = region_json(1 << 30, 1 << 20, 0, r#""x":1"#);
    refused(
        &["--payload", &format!("[{a}]")],
        "neither page_size nor page_size_kib",
        true,
    );
}

#[test]
fn silence_times_out_and_an_early_close_is_reported() {
    let setup = Setup::new("hs", 4);
    let (args, sock) = (["--handshake-timeout-ms", "300"], &setup.sock);
    let server = setup.serve(&args);
    let client = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let (code, log) = server.wait();
    drop(client);
    assert_eq!(code, Some(1));
    assert!(log.contains("no complete handshake within"), "{log}");

    let server = setup.serve(&args);
    drop(std::os::unix::net::UnixStream::connect(sock).unwrap());
    let (code, log) = server.wait();
    assert_eq!(code, Some(1));
    assert!(log.contains("closed the connection after 0 bytes"), "{log}");
}

#[test]
fn a_live_socket_is_not_stolen_and_a_stale_one_is_replaced() {
    let setup = Setup::new("hs", 4);
    let first = setup.serve(&[]);
    let (code, log) = setup.serve(&[]).wait();
    assert_eq!(code, Some(1));
    assert!(log.contains("in use by a listening server"), "{log}");
    drop(first);
    // The killed server left its socket file behind.
    assert!(setup.sock.exists());
    let second = setup.serve(&[]);
    let mut peer = setup.peer(&[]);
    peer.ready().unwrap();
    peer.ok("read 0 4m");
    peer.exit().unwrap();
    let (code, log) = second.wait();
    assert_eq!(code, Some(0), "{log}");
}
