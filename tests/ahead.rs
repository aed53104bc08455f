//! Install-ahead: ranges installed before the guest touches them, never
//! over pages the guest has written or given back.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use common::{page_bytes, rig, wait_until};
use snapfault::pagestate::PageState;
use snapfault::serve::{Config, Hooks};
use snapfault::testkit::harness::RigOptions;

#[test]
fn installs_ahead_4k() {
    installs_ahead("4k");
}

#[test]
fn installs_ahead_2m() {
    installs_ahead("2m");
}

/// Install-ahead over a region after the guest removed and wrote some of
/// its pages: afterwards the whole region reads without a single fault,
/// removed pages read as zeros and written ones as written.
fn installs_ahead(page: &'static str) {
    let p = page_bytes(page);
    let allowed = Arc::new(AtomicBool::new(false));
    let gate = allowed.clone();
    let hooks = Hooks {
        ahead_allowed: Some(Arc::new(move || gate.load(Relaxed))),
        ..Hooks::default()
    };
    let config = Config {
        install_ahead: vec![(0, 16 << 20)],
        ..Config::default()
    };
    let opts = RigOptions {
        regions_mib: vec![16, 8],
        config,
        hooks,
        ..RigOptions::default()
    };
    let mut rig = rig(page, opts);
    rig.peer.ok(&format!("remove {} {}", 4 * p, 2 * p));
    rig.peer.ok(&format!("write {} 4k 5", 7 * p));
    let faults = rig.metrics.faults.load(Relaxed);
    allowed.store(true, Relaxed);
    wait_until("install-ahead to finish", || {
        rig.metrics.install_ahead_finished.load(Relaxed) == 1
    });
    rig.peer.ok(&format!("read 0 {}", 4 * p));
    rig.peer
        .ok(&format!("read {} {}", 6 * p, (16 << 20) - 6 * p));
    assert_eq!(
        rig.metrics.faults.load(Relaxed),
        faults,
        "a page installed ahead faulted"
    );
    // Removed pages are left to faults, which get zeros.
    rig.peer
        .ok(&format!("read {} {} expect=zero", 4 * p, 2 * p));
    // The second region was not in the list: it still faults on demand.
    rig.peer.ok("read 16m 1m");
    assert!(rig.metrics.faults.load(Relaxed) > faults);
    let layout = rig.layout.clone();
    let report = rig.finish();
    assert!(report.error.is_none(), "{:?}", report.error);
    let m = report.summary.metrics;
    let pages = (16 << 20) / p;
    // Everything but the boot-write page(s), the removed and the written pages.
    let boot = if page == "4k" { 2 } else { 1 };
    assert_eq!(m.pages_installed_ahead, pages - boot - 2 - 1, "{m:?}");
    let region = layout
        .regions()
        .iter()
        .find(|r| r.spec.offset == 0)
        .unwrap();
    assert_eq!(region.states.get(4), PageState::Removed);
    assert_eq!(region.states.get(7), PageState::Written);
    assert_eq!(region.states.get(3), PageState::Clean);
}
