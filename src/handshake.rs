//! The Firecracker handshake: one message on a Unix socket, compact JSON
//! describing the guest memory regions, with the userfaultfd attached.
//!
//! # Design
//!
//! Firecracker (v1.10 on) connects, sends one `sendmsg` and never sends
//! again; v1.12 and later keep the connection open until they exit, v1.10
//! and v1.11 close it at once. The peer's pid comes from `SO_PEERCRED` and a
//! pidfd is taken for it straight away, so liveness and the fail-closed kill
//! work the same for every version and can never hit a recycled pid.
//!
//! The payload is read until it parses as JSON, so that a stream socket
//! delivering it in pieces still works; a second descriptor-carrying piece,
//! a payload over [`MAX_PAYLOAD`] or silence past the timeout is refused.
//! Unknown JSON fields are ignored: later Firecracker versions may add some.
//!
//! # Limitations
//!
//! A peer in a PID namespace this process cannot see reports pid 0; the
//! session is then served without a pidfd, ending on the connection's EOF
//! only, and cannot kill its VM when it fails.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::region::RegionSpec;
use crate::sys::proc::PidFd;
use crate::sys::sock;
use crate::sys::uffd::{self, Uffd};

/// How long the rest of a handshake cut short may take to arrive.
const REST_OF_MESSAGE: Duration = Duration::from_secs(1);

/// The largest handshake accepted. Firecracker's is about 110 bytes per
/// region.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// One region on the wire, as Firecracker serializes `GuestRegionUffdMapping`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRegion {
    /// Address of the region in Firecracker's process.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region's bytes in the memory file.
    pub offset: u64,
    /// Page size in bytes (v1.12 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Page size in bytes despite the name (v1.10 on, deprecated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Accepting the connection failed.
    #[error("accepting a connection failed")]
    Accept {
        /// The kernel's answer.
        source: io::Error,
    },
    /// Receiving the message failed.
    #[error("receiving the handshake failed")]
    Receive {
        /// The kernel's answer.
        source: io::Error,
    },
    /// No complete message arrived in time.
    #[error("no complete handshake within {timeout:?} ({received} bytes received)")]
    Timeout {
        /// The limit.
        timeout: Duration,
        /// Bytes that did arrive.
        received: usize,
    },
    /// The message stopped in the middle of its JSON.
    #[error("the handshake's {received} bytes are not complete JSON")]
    Incomplete {
        /// Bytes that did arrive.
        received: usize,
        /// Where the parser ran out.
        source: serde_json::Error,
    },
    /// The peer closed the connection before a complete message.
    #[error("the peer closed the connection after {received} bytes, before a complete handshake")]
    Closed {
        /// Bytes that did arrive.
        received: usize,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("the handshake is larger than {MAX_PAYLOAD} bytes")]
    TooLarge,
    /// No descriptor came with the message.
    #[error("the handshake carried no file descriptor (expected one userfaultfd)")]
    NoFd,
    /// More than one descriptor came, or some were lost.
    #[error("the handshake carried {count} file descriptors (expected one userfaultfd)")]
    ExtraFds {
        /// How many arrived (at least; control data may have been cut).
        count: usize,
    },
    /// The descriptor is not a userfaultfd.
    #[error("the descriptor sent is not a userfaultfd")]
    NotUffd,
    /// Checking the descriptor's kind failed.
    #[error("inspecting the descriptor sent failed")]
    Inspect {
        /// The kernel's answer.
        source: io::Error,
    },
    /// The payload is not the expected JSON.
    #[error("the handshake is not a JSON array of regions")]
    Json {
        /// The parser's answer, with line and column.
        source: serde_json::Error,
    },
    /// A region has no page size field.
    #[error("region {index}: neither page_size nor page_size_kib is given")]
    NoPageSize {
        /// Region position.
        index: usize,
    },
    /// The two page size fields disagree.
    #[error("region {index}: page_size {page_size} and page_size_kib {page_size_kib} disagree")]
    PageSizeMismatch {
        /// Region position.
        index: usize,
        /// `page_size`.
        page_size: u64,
        /// `page_size_kib`.
        page_size_kib: u64,
    },
    /// Reading the peer's credentials failed.
    #[error("reading the peer's credentials (SO_PEERCRED) failed")]
    PeerCred {
        /// The kernel's answer.
        source: io::Error,
    },
}

/// A connected VM, after a handshake that parsed.
#[derive(Debug)]
pub struct Handshake {
    /// The connection; kept open while Firecracker (v1.12 on) runs.
    pub stream: UnixStream,
    /// The userfaultfd for the VM's memory.
    pub uffd: Uffd,
    /// The regions, in handshake order.
    pub regions: Vec<RegionSpec>,
    /// The peer's pid from `SO_PEERCRED` (0 if not visible).
    pub peer_pid: i32,
    /// A pidfd on the peer, if its pid is visible.
    pub pidfd: Option<PidFd>,
}

/// The peer of a refused handshake, so the caller can fail closed.
#[derive(Debug)]
pub struct Refused {
    /// What was wrong.
    pub error: HandshakeError,
    /// A pidfd on the peer, taken at connect time, if any.
    pub pidfd: Option<PidFd>,
    /// Whether a valid userfaultfd had arrived: the peer's memory then
    /// waits on a server that will not serve it.
    pub had_uffd: bool,
}

/// Accepts one connection on `listener` and reads its handshake.
pub fn accept(listener: &UnixListener, timeout: Duration) -> Result<Handshake, Refused> {
    let refuse = |error| Refused {
        error,
        pidfd: None,
        had_uffd: false,
    };
    let (stream, _) = listener
        .accept()
        .map_err(|source| refuse(HandshakeError::Accept { source }))?;
    let peer_pid = sock::peer_pid(stream.as_fd())
        .map_err(|source| refuse(HandshakeError::PeerCred { source }))?;
    // The pidfd is taken before anything else can delay us, while the
    // connecting process is certainly alive (it is blocked in or just past
    // connect, waiting to send).
    let pidfd = if peer_pid > 0 {
        PidFd::open(peer_pid).ok()
    } else {
        None
    };
    match read_handshake(&stream, timeout) {
        Ok((uffd, regions)) => Ok(Handshake {
            stream,
            uffd,
            regions,
            peer_pid,
            pidfd,
        }),
        Err((error, had_uffd)) => Err(Refused {
            error,
            pidfd,
            had_uffd,
        }),
    }
}

type Partial = (HandshakeError, bool);

fn read_handshake(
    stream: &UnixStream,
    timeout: Duration,
) -> Result<(Uffd, Vec<RegionSpec>), Partial> {
    let no = |e| (e, false);
    let deadline = Instant::now() + timeout;
    let mut payload = vec![0u8; MAX_PAYLOAD + 1];
    let mut len = 0;
    let mut fd: Option<OwnedFd> = None;
    let mut incomplete: Option<serde_json::Error> = None;
    loop {
        let mut left = deadline.saturating_duration_since(Instant::now());
        if incomplete.is_some() {
            // Firecracker sends the whole message at once: the rest of a
            // message cut by the socket comes at once too, or never.
            left = left.min(REST_OF_MESSAGE);
        }
        if left.is_zero() || (incomplete.is_some() && left < Duration::from_millis(1)) {
            return Err((
                match incomplete {
                    Some(source) => HandshakeError::Incomplete {
                        received: len,
                        source,
                    },
                    None => HandshakeError::Timeout {
                        timeout,
                        received: len,
                    },
                },
                holds_uffd(&fd),
            ));
        }
        sock::set_recv_timeout(stream.as_fd(), left.max(Duration::from_millis(1)))
            .map_err(|source| no(HandshakeError::Receive { source }))?;
        let got = match sock::recv_with_fds(stream.as_fd(), &mut payload[len..]) {
            Ok(got) => got,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN)) && incomplete.is_some() => {
                let source = incomplete.take().expect("checked");
                let error = HandshakeError::Incomplete {
                    received: len,
                    source,
                };
                return Err((error, holds_uffd(&fd)));
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) => {
                continue;
            }
            Err(source) => return Err(no(HandshakeError::Receive { source })),
        };
        if got.control_truncated || got.fds.len() > 1 || (fd.is_some() && !got.fds.is_empty()) {
            let count = got.fds.len() + usize::from(fd.is_some());
            return Err(no(HandshakeError::ExtraFds {
                count: count.max(2),
            }));
        }
        fd = fd.or(got.fds.into_iter().next());
        if got.len == 0 {
            return Err((HandshakeError::Closed { received: len }, holds_uffd(&fd)));
        }
        len += got.len;
        if got.truncated || len > MAX_PAYLOAD {
            return Err((HandshakeError::TooLarge, holds_uffd(&fd)));
        }
        match serde_json::from_slice::<Vec<WireRegion>>(&payload[..len]) {
            Ok(wire) => {
                let uffd = check_uffd(fd.ok_or(HandshakeError::NoFd).map_err(no)?).map_err(no)?;
                return Ok((uffd, to_specs(&wire).map_err(|e| (e, true))?));
            }
            Err(e) if e.is_eof() => incomplete = Some(e),
            Err(source) => {
                // Report a missing or wrong descriptor first: it is the
                // more basic fault, and decides whether the peer waits on us.
                check_uffd(fd.ok_or(HandshakeError::NoFd).map_err(no)?).map_err(no)?;
                return Err((HandshakeError::Json { source }, true));
            }
        }
    }
}

fn holds_uffd(fd: &Option<OwnedFd>) -> bool {
    fd.as_ref()
        .is_some_and(|f| uffd::is_userfaultfd(f.as_fd()).unwrap_or(false))
}

fn check_uffd(fd: OwnedFd) -> Result<Uffd, HandshakeError> {
    match uffd::is_userfaultfd(fd.as_fd()) {
        Ok(true) => Ok(Uffd::from_owned(fd)),
        Ok(false) => Err(HandshakeError::NotUffd),
        Err(source) => Err(HandshakeError::Inspect { source }),
    }
}

/// Turns wire regions into specs, resolving the two page size fields.
pub fn to_specs(wire: &[WireRegion]) -> Result<Vec<RegionSpec>, HandshakeError> {
    wire.iter()
        .enumerate()
        .map(|(index, w)| {
            let page_size = match (w.page_size, w.page_size_kib) {
                (Some(a), Some(b)) if a != b => {
                    return Err(HandshakeError::PageSizeMismatch {
                        index,
                        page_size: a,
                        page_size_kib: b,
                    });
                }
                (Some(a), _) | (None, Some(a)) => a,
                (None, None) => return Err(HandshakeError::NoPageSize { index }),
            };
            Ok(RegionSpec {
                base: w.base_host_virt_addr,
                size: w.size,
                offset: w.offset,
                page_size,
            })
        })
        .collect()
}

/// Which Firecracker's message to write (for the test kit and demo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// v1.12 on: both page size fields.
    Current,
    /// v1.10 and v1.11: `page_size_kib` only.
    Legacy,
}

/// Encodes regions as Firecracker does: compact JSON, no terminator.
pub fn encode(regions: &[RegionSpec], flavor: Flavor) -> String {
    let wire: Vec<WireRegion> = regions
        .iter()
        .map(|r| WireRegion {
            base_host_virt_addr: r.base,
            size: r.size,
            offset: r.offset,
            page_size: (flavor == Flavor::Current).then_some(r.page_size),
            page_size_kib: Some(r.page_size),
        })
        .collect();
    serde_json::to_string(&wire).expect("regions serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firecracker_example() {
        let json = r#"[{"base_host_virt_addr":139888158572544,"size":3221225472,"offset":0,
            "page_size":4096,"page_size_kib":4096},
            {"base_host_virt_addr":139882789863424,"size":1073741824,
            "offset":3221225472,"page_size":4096,"page_size_kib":4096}]"#;
        let wire: Vec<WireRegion> = serde_json::from_str(json).unwrap();
        let specs = to_specs(&wire).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[1].offset, 3 << 30);
        assert_eq!(specs[1].page_size, 4096);
    }

    #[test]
    fn legacy_field_alone_and_unknown_fields_are_accepted() {
        let json = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":2097152,"x":1}]"#;
        let wire: Vec<WireRegion> = serde_json::from_str(json).unwrap();
        assert_eq!(to_specs(&wire).unwrap()[0].page_size, 2 << 20);
    }

    #[test]
    fn missing_or_conflicting_page_sizes_are_refused() {
        let none = [WireRegion {
            base_host_virt_addr: 0,
            size: 1,
            offset: 0,
            page_size: None,
            page_size_kib: None,
        }];
        assert!(matches!(
            to_specs(&none),
            Err(HandshakeError::NoPageSize { index: 0 })
        ));
        let both = [WireRegion {
            page_size: Some(4096),
            page_size_kib: Some(8),
            ..none[0].clone()
        }];
        assert!(matches!(
            to_specs(&both),
            Err(HandshakeError::PageSizeMismatch { .. })
        ));
    }

    #[test]
    fn encode_round_trips() {
        let r = [RegionSpec {
            base: 0x7000_0000,
            size: 1 << 20,
            offset: 0,
            page_size: 4096,
        }];
        let s = encode(&r, Flavor::Current);
        assert!(s.starts_with("[{\"base_host_virt_addr\":"), "{s}");
        let wire: Vec<WireRegion> = serde_json::from_str(&s).unwrap();
        assert_eq!(to_specs(&wire).unwrap(), r);
        let legacy = encode(&r, Flavor::Legacy);
        assert!(!legacy.contains("\"page_size\":"), "{legacy}");
    }
}
