//! Serving real vCPUs: a KVM guest (long mode with paging, user mode)
//! whose memory, page tables and code included, is served by snapfault
//! from a snapshot image, in 4 KiB and 2 MiB variants. The balloon path is
//! Firecracker's: the guest posts a report and kicks an ioeventfd, the
//! VMM's own thread calls `madvise(MADV_DONTNEED)` while vCPUs run on.
//!
//! When `/dev/kvm` is missing these tests say so and pass; CI checks that
//! it exists before running them.

mod common;

use common::rig;
use snapfault::testkit::harness::{Rig, RigOptions};
use snapfault::testkit::kvm::DATA_START;

const MIB: u64 = 1 << 20;

fn kvm_rig(page: &'static str, vcpus: u32) -> Option<Rig> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is missing");
        return None;
    }
    Some(rig(
        page,
        RigOptions {
            regions_mib: vec![64],
            kvm_vcpus: vcpus,
            ..RigOptions::default()
        },
    ))
}

both_page_sizes!(
    vcpus_read_the_snapshot,
    balloon_report_then_guest_reads_zeros,
    two_vcpus_race_faults_and_reports_on_the_same_pages,
);

/// Sequential, strided, random and listed reads, from two vCPUs at once:
/// every checksum matches the image (page tables and code came through
/// too).
fn vcpus_read_the_snapshot(page: &'static str) {
    let Some(mut rig) = kvm_rig(page, 2) else {
        return;
    };
    let data_pages = (64 * MIB - DATA_START) / 4096;
    rig.peer.ok(&format!(
        "spawn a vcpu 0 sum {DATA_START} {} 1",
        data_pages / 2
    ));
    rig.peer.ok(&format!(
        "spawn b vcpu 1 random {DATA_START} {data_pages} 2000 7"
    ));
    rig.peer.ok("join a");
    rig.peer.ok("join b");
    rig.peer
        .ok(&format!("vcpu 0 sum {DATA_START} {} 3", data_pages / 3));
    rig.peer
        .ok(&format!("vcpu 1 sum {DATA_START} {data_pages} 1"));
    rig.peer
        .ok(&format!("vcpu 0 list {DATA_START} {data_pages} 500 9"));
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    assert!(report.summary.metrics.pages_from_source > 0);
}

/// A free-page report through the balloon: afterwards the guest reads
/// zeros there, and its own writes elsewhere stay.
fn balloon_report_then_guest_reads_zeros(page: &'static str) {
    let Some(mut rig) = kvm_rig(page, 1) else {
        return;
    };
    let (range, len) = (DATA_START + 8 * MIB, 4 * MIB);
    rig.peer
        .ok(&format!("vcpu 0 sum {range} {} 1", 2 * len / 4096));
    rig.peer.ok(&format!("vcpu 0 write {} 16 1 5", range + len));
    rig.peer.ok(&format!("vcpu 0 report {range} {len} wait"));
    rig.peer
        .ok(&format!("vcpu 0 sum {range} {} 1", 2 * len / 4096));
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    let m = report.summary.metrics;
    assert_eq!(
        m.pages_removed,
        len / if page == "4k" { 4096 } else { 2 * MIB }
    );
    assert!(m.zero_pages > 0, "{m:?}");
}

/// One vCPU reads pages at random while the other reports them free,
/// without waiting, again and again: REMOVEs overlap faults (EAGAIN comes
/// from there). Once every report is done, every reported page reads as
/// zeros: no snapshot bytes came back after a REMOVE.
fn two_vcpus_race_faults_and_reports_on_the_same_pages(page: &'static str) {
    let Some(mut rig) = kvm_rig(page, 2) else {
        return;
    };
    let first = DATA_START + 16 * MIB;
    let pages = 8 * MIB / 4096;
    for round in 0..4 {
        rig.peer.ok(&format!(
            "spawn reader vcpu 0 random {first} {pages} 3000 {round} any"
        ));
        for chunk in 0..4 {
            let gpa = first + chunk * 2 * MIB;
            rig.peer
                .ok(&format!("vcpu 1 report {gpa} {} nowait", 2 * MIB));
        }
        rig.peer.ok("join reader");
        // A waited report after the others: the balloon thread handles
        // reports in order, so all of them are done after this one.
        rig.peer.ok(&format!(
            "vcpu 1 report {} {} wait",
            first + 8 * MIB,
            2 * MIB
        ));
        rig.peer.ok(&format!("assume-zero {first} {}", 8 * MIB));
        rig.peer.ok(&format!("vcpu 0 sum {first} {pages} 1"));
    }
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    let m = report.summary.metrics;
    eprintln!("race: {m:?}");
    assert!(m.remove_events >= 16);
}
