//! Kernel behaviour the server relies on, pinned on this kernel with a
//! real second process (the `fc-peer`) holding the memory, and this test
//! playing the server by hand on the userfaultfd it was handed.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::{ensure_hugepages, exe, page_bytes, peer_args};
use snapfault::handshake::{self, Handshake};
use snapfault::sys::poll::{PollFd, READABLE, poll};
use snapfault::sys::uffd::{Event, EventBuf, Outcome, fault_flag, register_mode};
use snapfault::testkit::harness::{PeerProcess, TempDir};
use snapfault::testkit::snapshot::fill_snapshot;

struct Bare {
    peer: PeerProcess,
    hs: Handshake,
    buf: EventBuf,
    _dir: TempDir,
}

impl Bare {
    fn start(page: &str, mib: u64) -> Bare {
        if page == "2m" {
            ensure_hugepages(mib / 2 + 2);
        }
        let dir = TempDir::new("kernel").unwrap();
        let sock = dir.path().join("sock");
        let listener = snapfault::server::listen(&sock).unwrap();
        let args = peer_args(&sock, mib, &["--no-boot-writes", "--page", page]);
        let mut peer = PeerProcess::spawn(&exe(), &args).unwrap();
        let hs = handshake::accept(&listener, Duration::from_secs(10))
            .map_err(|r| r.error)
            .unwrap();
        peer.ready().unwrap();
        Bare {
            peer,
            hs,
            buf: EventBuf::new(16),
            _dir: dir,
        }
    }

    fn base(&self) -> u64 {
        self.hs.regions[0].base
    }

    /// The next events, waiting for at least one (a minute at most).
    fn events(&mut self) -> Vec<Event> {
        let mut fds = [PollFd::new(self.hs.uffd.as_fd(), READABLE)];
        let n = poll(&mut fds, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(n, 1, "no event came");
        let mut out = Vec::new();
        self.hs.uffd.read_events(&mut self.buf, &mut out).unwrap();
        out
    }
}

fn snapshot_page(offset: u64, len: u64) -> Vec<u8> {
    let mut page = vec![0u8; len as usize];
    fill_snapshot(1, offset, &mut page);
    page
}

#[test]
fn copy_with_wp_protects_a_page_of_a_peer_that_registered_missing_only_4k() {
    copy_with_wp_protects(page_bytes("4k"), "4k");
}

#[test]
fn copy_with_wp_protects_a_page_of_a_peer_that_registered_missing_only_2m() {
    copy_with_wp_protects(page_bytes("2m"), "2m");
}

/// Re-registering the peer's range MISSING|WP through the received uffd
/// works from this process; `COPY` with `MODE_WP` leaves the page
/// protected, so the peer's write raises a WP fault, and unprotect + wake
/// lets the write land.
fn copy_with_wp_protects(p: u64, page: &str) {
    let mut bare = Bare::start(page, 8);
    let base = bare.base();
    let size = bare.hs.regions[0].size;
    bare.hs
        .uffd
        .register(base, size, register_mode::MISSING | register_mode::WP)
        .expect("re-register with WP");
    bare.peer
        .ok(&format!("spawn r read {p} 4k expect=snapshot"));
    let ev = bare.events();
    assert!(
        matches!(ev[..], [Event::Pagefault { flags: 0, .. }]),
        "{ev:?}"
    );
    let outcome = bare
        .hs
        .uffd
        .copy(base + p, &snapshot_page(p, p), true, true)
        .unwrap();
    assert_eq!(outcome, Outcome::Done);
    bare.peer.ok("join r");
    bare.peer.ok(&format!("spawn w write {p} 4k 3"));
    let ev = bare.events();
    let [Event::Pagefault { addr, flags }] = ev[..] else {
        panic!("{ev:?}")
    };
    assert_eq!(
        flags & (fault_flag::WP | fault_flag::WRITE),
        fault_flag::WP | fault_flag::WRITE
    );
    assert_eq!(addr & !(p - 1), base + p);
    assert_eq!(
        bare.hs
            .uffd
            .write_protect(base + p, p, false, true)
            .unwrap(),
        Outcome::Done
    );
    bare.peer.ok("join w");
    bare.peer.ok(&format!("read {p} 4k"));
    // Zeros installed protected: a 2 MiB page has no zero page, so this is
    // a copy from a zero buffer, protected in the same call.
    bare.peer.ok(&format!("spawn z write {} 4k 4", 2 * p));
    let ev = bare.events();
    assert!(matches!(ev[..], [Event::Pagefault { .. }]), "{ev:?}");
    let zeros = vec![0u8; p as usize];
    assert_eq!(
        bare.hs.uffd.copy(base + 2 * p, &zeros, true, true).unwrap(),
        Outcome::Done
    );
    let ev = bare.events();
    let [Event::Pagefault { flags, .. }] = ev[..] else {
        panic!("{ev:?}")
    };
    assert_ne!(flags & fault_flag::WP, 0, "the zero page was not protected");
    bare.hs
        .uffd
        .write_protect(base + 2 * p, p, false, true)
        .unwrap();
    bare.peer.ok("join z");
}

#[test]
fn install_fails_with_eagain_while_a_remove_is_unread_4k() {
    eagain_while_remove_unread("4k");
}

#[test]
fn install_fails_with_eagain_while_a_remove_is_unread_2m() {
    eagain_while_remove_unread("2m");
}

/// While a REMOVE is queued and unread, installs on that mm are refused
/// with `EAGAIN`; once it is read they go through, and the removed range
/// is still registered (a touch faults again).
fn eagain_while_remove_unread(page: &str) {
    let p = page_bytes(page);
    let mut bare = Bare::start(page, 8);
    let base = bare.base();
    bare.peer
        .ok(&format!("spawn r read {p} 4k expect=snapshot"));
    assert!(matches!(bare.events()[..], [Event::Pagefault { .. }]));
    assert_eq!(
        bare.hs
            .uffd
            .copy(base + p, &snapshot_page(p, p), true, false)
            .unwrap(),
        Outcome::Done
    );
    bare.peer.ok("join r");
    bare.peer.ok(&format!("spawn b remove {p} {p}"));
    bare.peer.ok("wait-blocked b");
    let zeros = vec![0u8; p as usize];
    let refused = bare
        .hs
        .uffd
        .copy(base + 3 * p, &zeros, true, false)
        .unwrap();
    assert_eq!(refused, Outcome::Again { done: 0 });
    let ev = bare.events();
    assert_eq!(
        ev,
        vec![Event::Remove {
            start: base + p,
            end: base + 2 * p
        }]
    );
    bare.peer.ok("join b");
    assert_eq!(
        bare.hs
            .uffd
            .copy(base + 3 * p, &zeros, true, false)
            .unwrap(),
        Outcome::Done
    );
    bare.peer.ok(&format!("spawn r2 read {p} 4k expect=zero"));
    let ev = bare.events();
    assert!(
        matches!(ev[..], [Event::Pagefault { addr, .. }] if addr & !(p - 1) == base + p),
        "{ev:?}"
    );
    assert_eq!(
        bare.hs.uffd.copy(base + p, &zeros, true, false).unwrap(),
        Outcome::Done
    );
    bare.peer.ok("join r2");
}

/// On 2 MiB hugetlb memory: `MADV_DONTNEED` of a range that ends inside a
/// huge page drops only the whole huge pages (the REMOVE says so); one
/// that starts inside a huge page fails with EINVAL and sends nothing;
/// `UFFDIO_ZEROPAGE` is refused (zeros must be copied).
#[test]
fn hugetlb_dontneed_rounds_to_whole_huge_pages() {
    let p = page_bytes("2m");
    let mut bare = Bare::start("2m", 8);
    let base = bare.base();
    for i in 0..4u64 {
        bare.peer.ok(&format!("spawn r{i} read {} 4k", i * p));
        assert!(matches!(bare.events()[..], [Event::Pagefault { .. }]));
        bare.hs
            .uffd
            .copy(base + i * p, &snapshot_page(i * p, p), true, false)
            .unwrap();
        bare.peer.ok(&format!("join r{i}"));
    }
    bare.peer.ok(&format!("spawn b remove {p} {}", p + p / 2));
    let ev = bare.events();
    assert_eq!(
        ev,
        vec![Event::Remove {
            start: base + p,
            end: base + 2 * p
        }],
        "REMOVE not rounded down"
    );
    bare.peer.ok("join b");
    let unaligned = bare.peer.send(&format!("remove {} {p}", 2 * p + 4096));
    assert!(unaligned.is_err_and(|e| e.contains("Invalid argument")));
    let zero = bare.hs.uffd.zeropage(base + p, p, true);
    assert!(zero.is_err(), "ZEROPAGE on hugetlb: {zero:?}");
}

/// Why the server wakes after `EEXIST`: a page made present without a
/// wake (`DONTWAKE`) leaves its faulting thread asleep, and a second
/// install that finds it present wakes no one either; only `UFFDIO_WAKE`
/// does.
#[test]
fn eexist_does_not_wake_the_faulting_thread() {
    let mut bare = Bare::start("4k", 4);
    let (base, p) = (bare.base(), 4096);
    bare.peer
        .ok(&format!("spawn r read {p} 4k expect=snapshot"));
    assert!(matches!(bare.events()[..], [Event::Pagefault { .. }]));
    let page = snapshot_page(p, p);
    assert_eq!(
        bare.hs.uffd.copy(base + p, &page, false, false).unwrap(),
        Outcome::Done
    );
    assert_eq!(
        bare.hs.uffd.copy(base + p, &page, true, false).unwrap(),
        Outcome::Exists { done: 0 }
    );
    let still = bare.peer.ok("wait-blocked r");
    assert!(still.contains("userfault"), "{still}");
    bare.hs.uffd.wake(base + p, p).unwrap();
    bare.peer.ok("join r");
}

/// `UFFDIO_POISON` on the peer's memory: its touch gets `SIGBUS`.
#[test]
fn poison_makes_the_peer_touch_raise_sigbus() {
    use std::os::unix::process::ExitStatusExt;
    let mut bare = Bare::start("4k", 4);
    let base = bare.base();
    assert_eq!(
        bare.hs.uffd.poison(base + 8192, 4096, true).unwrap(),
        Outcome::Done
    );
    let _ = bare.peer.send("read 8192 4k");
    let status = bare.peer.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
}

/// After `UFFDIO_UNREGISTER` a missing page is the kernel's again: the
/// peer reads zeros and no event comes.
#[test]
fn unregister_hands_pages_back_to_the_kernel() {
    let mut bare = Bare::start("4k", 4);
    let (base, size) = (bare.base(), bare.hs.regions[0].size);
    bare.hs.uffd.unregister(base, size).unwrap();
    bare.peer.ok("read 0 16k expect=zero");
    let mut out = Vec::new();
    assert_eq!(
        bare.hs.uffd.read_events(&mut bare.buf, &mut out).unwrap(),
        0
    );
}

/// A copy over several pages that meets a present one stops there: the
/// ioctl then fails with `EAGAIN` (not `EEXIST`), its count saying how
/// many bytes went in before the present page (a short copy); a copy that
/// starts at the present page gets `EEXIST` with a negative count.
#[test]
fn copy_stops_at_a_present_page_and_counts_what_it_did() {
    let mut bare = Bare::start("4k", 4);
    let (base, p) = (bare.base(), 4096u64);
    bare.peer
        .ok(&format!("spawn r read {} 4k expect=snapshot", 2 * p));
    assert!(matches!(bare.events()[..], [Event::Pagefault { .. }]));
    assert_eq!(
        bare.hs
            .uffd
            .copy(base + 2 * p, &snapshot_page(2 * p, p), true, false)
            .unwrap(),
        Outcome::Done
    );
    bare.peer.ok("join r");
    let four = snapshot_page(0, 4 * p);
    let outcome = bare.hs.uffd.copy(base, &four, true, false).unwrap();
    assert_eq!(outcome, Outcome::Again { done: 2 * p });
    let rest = bare
        .hs
        .uffd
        .copy(base + 2 * p, &four[2 * p as usize..], true, false)
        .unwrap();
    assert_eq!(rest, Outcome::Exists { done: 0 });
    bare.peer.ok(&format!("read 0 {} expect=snapshot", 2 * p));
}
