//! The races of HAZARDS.md, each driven through a real userfaultfd with
//! the faulting threads in a second process (the `fc-peer`), in 4 KiB and
//! 2 MiB variants.
//!
//! Where a hazard needs several events read in one batch, the serve loop
//! is held before its read ([`common::ReaderGate`]) until the peer's
//! threads are asleep in the kernel (`wait-blocked`), so the batch is made
//! deterministically rather than by timing.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use common::{ReaderGate, in_one_batch, page_bytes, queue_blocked, rig, wait_until};
use snapfault::pagestate::PageState;
use snapfault::serve::{Config, End, ServeError};
use snapfault::source::PageSource;
use snapfault::testkit::gated::GatedSource;
use snapfault::testkit::harness::{Rig, RigOptions};

both_page_sizes!(
    served_page_faults_again_after_remove,
    remove_and_fault_in_one_batch_get_zeros,
    write_in_the_window_before_the_zap_never_brings_back_snapshot_bytes,
    eagain_install_is_kept_and_retried_without_other_events,
    duplicate_faults_both_wake,
    removed_page_never_waits_for_storage,
    reader_is_never_held_by_a_slow_fetch,
    failing_storage_fails_closed_without_holding_the_reader,
    remove_spanning_two_regions,
    exit_with_a_fault_pending_ends_cleanly,
    stop_while_serving_kills_the_vm,
    install_into_memory_gone_ends_cleanly_and_installs_nothing,
);

/// A rig whose serve loop can be held before its reads.
fn held_rig(page: &'static str, config: Config) -> (Rig, std::sync::Arc<ReaderGate>) {
    let gate = ReaderGate::new();
    let rig = rig(
        page,
        RigOptions {
            hooks: gate.hooks(),
            config,
            ..RigOptions::default()
        },
    );
    (rig, gate)
}

fn state_at(rig: &snapfault::testkit::harness::Rig, offset: u64) -> PageState {
    state_in(&rig.layout, offset)
}

/// The state of the page at file offset `offset`. Read it only once the
/// session has ended (or from the serve loop's own hooks): the loop records
/// a page's new state just after the install that wakes the faulting
/// thread.
fn state_in(layout: &snapfault::region::Layout, offset: u64) -> PageState {
    let r = layout
        .regions()
        .iter()
        .find(|r| offset >= r.spec.offset && offset < r.spec.offset + r.spec.size);
    let r = r.expect("offset in a region");
    r.states.get((offset - r.spec.offset) / r.spec.page_size)
}

/// HAZARDS 4: a page served, removed, touched again faults again and gets
/// zeros; the kernel pin that a removed range stays registered.
fn served_page_faults_again_after_remove(page: &'static str) {
    let p = page_bytes(page);
    let mut rig = rig(page, RigOptions::default());
    let at = 2 * p;
    rig.peer.ok(&format!("read {at} {p} expect=snapshot"));
    let faults = rig.metrics.faults.load(Relaxed);
    rig.peer.ok(&format!("remove {at} {p}"));
    rig.peer.ok(&format!("read {at} {p} expect=zero"));
    // The fault counter is bumped before the install that woke the reader.
    assert!(
        rig.metrics.faults.load(Relaxed) > faults,
        "the re-read raised no fault"
    );
    rig.peer.ok(&format!("read {at} {p} expect=zero threads=2"));
    let layout = rig.layout.clone();
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    assert!(report.summary.metrics.zero_pages >= 1);
    assert_eq!(state_in(&layout, at), PageState::Removed);
}

/// HAZARDS 2: a fault and a REMOVE of its page read in one batch: the
/// REMOVE is applied first, so the fault gets zeros, not snapshot bytes.
fn remove_and_fault_in_one_batch_get_zeros(page: &'static str) {
    let p = page_bytes(page);
    let (mut rig, gate) = held_rig(page, Config::default());
    for i in 0..3 {
        let at = (3 + i) * p;
        let (read, remove) = (
            format!("read {at} {p} expect=zero"),
            format!("remove {at} {p}"),
        );
        in_one_batch(&mut rig, &gate, &read, &remove);
        rig.peer.ok(&format!("read {at} {p} expect=zero"));
    }
    let layout = rig.layout.clone();
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    for i in 0..3 {
        assert_eq!(state_in(&layout, (3 + i) * p), PageState::Removed);
    }
}

/// HAZARDS 5: a write fault answered between the REMOVE being read and
/// the kernel's zap. Whatever the order, the page afterwards holds zeros
/// or what was written, never snapshot bytes.
fn write_in_the_window_before_the_zap_never_brings_back_snapshot_bytes(page: &'static str) {
    let p = page_bytes(page);
    let (mut rig, gate) = held_rig(page, Config::default());
    for i in 0..6 {
        let at = (2 + i) * p;
        let (write, remove) = (
            format!("write {at} 4k {}", 100 + i),
            format!("remove {at} {p}"),
        );
        in_one_batch(&mut rig, &gate, &write, &remove);
        rig.peer
            .ok(&format!("read {at} 4k expect=zero-or-{}", 100 + i));
        rig.peer
            .ok(&format!("read {at} 4k expect=zero-or-{}", 100 + i));
    }
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
}

/// HAZARDS 7: an install refused with EAGAIN (a REMOVE queued, unread) is
/// kept and retried, even when no further event ever comes. With one event
/// per read, the fault is read (faults come before events) while the
/// REMOVE still waits in the queue, so the kernel must refuse the install.
fn eagain_install_is_kept_and_retried_without_other_events(page: &'static str) {
    let p = page_bytes(page);
    let (mut rig, gate) = held_rig(
        page,
        Config {
            batch: 1,
            ..Config::default()
        },
    );
    let (at, other) = (2 * p, 5 * p);
    let (read, remove) = (
        format!("read {at} {p} expect=snapshot"),
        format!("remove {other} {p}"),
    );
    in_one_batch(&mut rig, &gate, &read, &remove);
    let layout = rig.layout.clone();
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    let m = report.summary.metrics;
    assert!(m.deferred >= 1, "the install was never refused: {m:?}");
    assert!(m.retries >= 1);
    assert_eq!(state_in(&layout, at), PageState::Clean);
}

/// HAZARDS 9: two threads fault the same page in one batch; the second
/// install gets EEXIST and its thread must still be woken.
fn duplicate_faults_both_wake(page: &'static str) {
    let p = page_bytes(page);
    let (mut rig, gate) = held_rig(page, Config::default());
    let at = 4 * p;
    let read = format!("read {at} 4k expect=snapshot");
    in_one_batch(&mut rig, &gate, &read, &read);
    // Both threads were woken by the first install; one more fault makes
    // sure the loop has answered the second event before the VM exits
    // (an install after the exit would end with ESRCH instead).
    rig.peer.ok(&format!("read {} 4k", 6 * p));
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    let m = report.summary.metrics;
    assert!(m.already_present >= 1, "no duplicate was answered: {m:?}");
}

fn gated_rig(
    page: &'static str,
    gated: Vec<u64>,
) -> (snapfault::testkit::harness::Rig, Arc<GatedSource>) {
    let slot: Arc<std::sync::Mutex<Option<Arc<GatedSource>>>> = Arc::default();
    let keep = slot.clone();
    let wrap = Box::new(move |file| {
        let g = Arc::new(GatedSource::new(file, gated));
        *keep.lock().unwrap() = Some(g.clone());
        g as Arc<dyn PageSource>
    });
    let rig = rig(
        page,
        RigOptions {
            wrap: Some(wrap),
            ..RigOptions::default()
        },
    );
    let gated = slot.lock().unwrap().take().expect("source built");
    (rig, gated)
}

/// HAZARDS 1 and 3: a fault whose bytes are being fetched, then a REMOVE
/// of its page: the REMOVE is read at once, the fault gets zeros without
/// waiting for storage, and when the fetch ends no snapshot bytes land.
fn removed_page_never_waits_for_storage(page: &'static str) {
    let p = page_bytes(page);
    let at = 3 * p;
    let (mut rig, gated) = gated_rig(page, vec![at]);
    rig.peer
        .ok(&format!("spawn reader read {at} {p} expect=zero"));
    gated.wait_started(1);
    rig.peer.ok(&format!("remove {at} {p}"));
    rig.peer.ok("join reader");
    gated.open();
    rig.peer.ok(&format!("read {at} {p} expect=zero"));
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.summary.metrics.source_misses, 1);
}

/// HAZARDS 3: while a fetch is stuck, other faults are served and a
/// REMOVE elsewhere completes; when it ends, its fault gets its bytes.
fn reader_is_never_held_by_a_slow_fetch(page: &'static str) {
    let p = page_bytes(page);
    let at = 3 * p;
    let (mut rig, gated) = gated_rig(page, vec![at]);
    rig.peer
        .ok(&format!("spawn reader read {at} {p} expect=snapshot"));
    gated.wait_started(1);
    rig.peer.ok(&format!("read {} {p} expect=snapshot", 5 * p));
    rig.peer.ok(&format!("remove {} {p}", 6 * p));
    rig.peer.ok(&format!("read {} {p} expect=zero", 6 * p));
    gated.open();
    rig.peer.ok("join reader");
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
}

/// HAZARDS 19: storage that keeps failing: bounded retries, then the VM
/// is killed with a clear error; meanwhile REMOVEs are still read.
fn failing_storage_fails_closed_without_holding_the_reader(page: &'static str) {
    let p = page_bytes(page);
    let at = 3 * p;
    let (mut rig, gated) = gated_rig(page, vec![at]);
    rig.peer.ok(&format!("spawn reader read {at} {p}"));
    gated.wait_started(1);
    rig.peer.ok(&format!("remove {} {p}", 6 * p));
    gated.fail();
    let status = rig.peer.wait().expect("peer ends");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the VM was not killed: {status:?}"
    );
    let report = rig.join();
    assert!(
        matches!(report.error, Some(ServeError::Fetch { attempts: 3, .. })),
        "{:?}",
        report.error
    );
    assert_eq!(report.summary.metrics.fail_closed, 1);
    assert_eq!(report.summary.metrics.fetch_failures, 1);
    assert_eq!(report.summary.metrics.fetch_retries, 2);
}

/// HAZARDS 6: one REMOVE over the end of one region and the start of the
/// next (the kernel merged their mappings): both sides become zeros, and
/// pages just outside the range keep their bytes.
fn remove_spanning_two_regions(page: &'static str) {
    let p = page_bytes(page);
    let mut rig = rig(
        page,
        RigOptions {
            regions_mib: vec![16, 16],
            ..RigOptions::default()
        },
    );
    rig.peer.ok("read 0 32m");
    let answer = rig.peer.send(&format!("remove-joint {}", 2 * p));
    let answer = match answer {
        Ok(a) => a,
        // The kernel placed the two mappings apart: nothing spans them.
        Err(e) if e.contains("no two regions are adjacent") => panic!("mappings not adjacent: {e}"),
        Err(e) => panic!("{e}"),
    };
    let lo = common::field(&answer, "lo").unwrap();
    let hi = common::field(&answer, "hi").unwrap();
    let lo_end = if lo == 0 { 16 << 20 } else { 32 << 20 };
    rig.peer
        .ok(&format!("read {} {} expect=zero", lo_end - 2 * p, 2 * p));
    rig.peer.ok(&format!("read {hi} {} expect=zero", 2 * p));
    rig.peer
        .ok(&format!("read {} {p} expect=snapshot", lo_end - 3 * p));
    rig.peer
        .ok(&format!("read {} {p} expect=snapshot", hi + 2 * p));
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    // Anonymous mappings merge into one VMA, so one madvise gives one
    // REMOVE spanning both regions; hugetlb mappings stay apart (one each).
    let events = if page == "4k" { 1 } else { 2 };
    assert_eq!(report.summary.metrics.remove_events, events);
    assert_eq!(report.summary.metrics.pages_removed, 4);
}

/// HAZARDS 10: the VM process dies with a fault queued: the session ends
/// as a normal ending, and the page is not recorded as installed.
fn exit_with_a_fault_pending_ends_cleanly(page: &'static str) {
    let p = page_bytes(page);
    let (mut rig, gate) = held_rig(page, Config::default());
    let at = 5 * p;
    gate.hold();
    queue_blocked(&mut rig, "reader", &format!("read {at} {p}"));
    let _ = std::process::Command::new("kill")
        .args(["-9", &rig.peer.pid.to_string()])
        .status();
    let _ = rig.peer.wait();
    gate.release();
    let report = rig.join();
    assert!(report.error.is_none(), "{:?}", report.error);
    assert!(matches!(
        report.summary.end,
        Some(End::PeerExited | End::MemoryGone)
    ));
    assert_eq!(state_at(&rig, at), PageState::Never);
}

/// HAZARDS 16 and 17: a stop request while the VM waits on a fault: the
/// session fails closed, killing the VM rather than leaving it hung.
fn stop_while_serving_kills_the_vm(page: &'static str) {
    let p = page_bytes(page);
    let (mut rig, gate) = held_rig(page, Config::default());
    gate.hold();
    queue_blocked(&mut rig, "reader", &format!("read {} {p}", 2 * p));
    rig.stop.stop();
    gate.release();
    let status = rig.peer.wait().expect("peer ends");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let report = rig.join();
    assert!(
        matches!(report.error, Some(ServeError::Stopped)),
        "{:?}",
        report.error
    );
    assert_eq!(report.summary.metrics.fail_closed, 1);
}

/// HAZARDS 17: a fault outside every declared region cannot be served:
/// the VM is killed, the error names the address.
#[test]
fn fault_outside_regions_fails_closed() {
    let opts = RigOptions {
        peer_args: vec!["--undeclared-mib".into(), "2".into()],
        ..RigOptions::default()
    };
    let mut rig = rig("4k", opts);
    let _ = rig.peer.send("touch-undeclared");
    let status = rig.peer.wait().expect("peer ends");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let report = rig.join();
    assert!(
        matches!(report.error, Some(ServeError::OutsideRegions { .. })),
        "{:?}",
        report.error
    );
    assert_eq!(report.summary.metrics.faults_outside_regions, 1);
}

/// Several regions, the last a hotplug region whose unplugged parts are
/// holes in the memory file: every page reads as the file says, holes as
/// zeros, from two threads at once.
#[test]
fn regions_with_a_hotplug_region_with_holes() {
    let holes = vec![(20 << 20, 8 << 20)];
    let opts = RigOptions {
        regions_mib: vec![8, 8, 16],
        holes,
        ..RigOptions::default()
    };
    let mut rig = rig("4k", opts);
    rig.peer.ok("read 0 32m threads=2");
    rig.peer.ok("read 20m 8m expect=zero");
    rig.peer.ok("read 18m 2m expect=snapshot");
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.summary.metrics.pages_from_source, (32 << 20) / 4096);
}

/// HAZARDS 10, the `ESRCH` path: a deferred install whose memory is gone
/// (the process replaced its image with `exec`, so it lives on and its
/// pidfd stays quiet) ends the session as a normal ending, and the page is
/// not recorded as installed.
fn install_into_memory_gone_ends_cleanly_and_installs_nothing(page: &'static str) {
    let p = page_bytes(page);
    let (mut rig, gate) = held_rig(
        page,
        Config {
            batch: 1,
            ..Config::default()
        },
    );
    let at = 2 * p;
    gate.hold();
    queue_blocked(&mut rig, "reader", &format!("read {at} {p}"));
    queue_blocked(&mut rig, "balloon", &format!("remove {} {p}", 5 * p));
    // One read: the fault (faults are read before events). Its install is
    // refused while the REMOVE waits unread, so it is deferred.
    gate.allow(1);
    wait_until("the install to be deferred", || {
        rig.metrics.deferred.load(Relaxed) >= 1
    });
    rig.peer.send_only("exec").unwrap();
    let comm = format!("/proc/{}/comm", rig.peer.pid);
    wait_until("the exec", || {
        std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")
    });
    gate.release();
    let report = rig.join();
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.summary.end, Some(End::MemoryGone));
    assert_eq!(state_at(&rig, at), PageState::Never);
}
