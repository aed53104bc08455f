//! The child's vCPU parts: first touches from the test kit's guest, and
//! the ready time of a working set.
//!
//! Each vCPU reads its share of the data area in one `KVM_RUN` (ascending
//! with `ReadSum`, or a permutation with `ReadList`), timed from outside
//! by the thread that runs it, and the guest's checksum is checked against
//! what the memory should hold: the image's pattern when served from the
//! memory file, zeros for the kernel's anonymous baseline.

use std::sync::Barrier;
use std::time::Instant;

use super::child::{Timed, combine, page_order, split};
use super::raw::GuestVm;
use super::spec::{ChildResult, ChildSpec, Memory, Pattern};
use super::stats::Counts;
use crate::testkit::kvm::{
    DATA_START, GuestOp, LIST_GPA, LIST_LEN, PAGE_SIZE, PageContent, expected_sum,
};

/// The guest operation of one vCPU's share, with its page list placed in
/// the list area for a random order.
fn vcpu_op(vm: &GuestVm<'_>, part: &[u64], spec: &ChildSpec, slot: u64) -> Result<GuestOp, String> {
    let ps = spec.page.bytes();
    let gpa = |p: u64| DATA_START + p * ps;
    Ok(match spec.pattern {
        Pattern::Seq => GuestOp::ReadSum {
            first_gpa: gpa(part[0]),
            pages: part.len() as u64,
            stride_pages: ps / PAGE_SIZE,
        },
        Pattern::Random => {
            let per_vcpu = LIST_LEN / 8 / u64::from(spec.threads.max(1));
            if part.len() as u64 > per_vcpu {
                return Err(format!(
                    "{} pages do not fit the guest's list area",
                    part.len()
                ));
            }
            let list_gpa = LIST_GPA + slot * per_vcpu * 8;
            let gpas: Vec<u64> = part.iter().map(|&p| gpa(p)).collect();
            vm.write_words(list_gpa, &gpas).map_err(|e| e.to_string())?;
            GuestOp::ReadList {
                list_gpa,
                count: gpas.len() as u64,
            }
        }
    })
}

/// Checks a guest checksum over `pages` (gpas) against the content the
/// memory should have.
fn check_sum(
    spec: &ChildSpec,
    value: u64,
    pages: impl IntoIterator<Item = u64>,
) -> Result<(), String> {
    let content = if spec.memory == Memory::Anon {
        PageContent::Zero
    } else {
        PageContent::Image
    };
    if value == expected_sum(pages, |_| content) {
        Ok(())
    } else {
        Err("the guest read wrong bytes".into())
    }
}

/// Every vCPU first-touches its share of the data area at once.
pub fn touch(vm: &GuestVm<'_>, spec: &ChildSpec) -> Result<ChildResult, String> {
    let ps = spec.page.bytes();
    let data_pages = (spec.len - DATA_START) / ps;
    let order = page_order(data_pages, spec.pattern, spec.seed);
    let parts = split(&order, spec.threads);
    let mut ops = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        ops.push(vcpu_op(vm, part, spec, i as u64)?);
    }
    let barrier = Barrier::new(parts.len());
    let results: Vec<Result<(Timed, u64), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = ops
            .iter()
            .enumerate()
            .map(|(i, &op)| {
                let barrier = &barrier;
                s.spawn(move || {
                    // Untimed, and on the thread that runs the vCPU after
                    // it (KVM waits for an RCU grace period when a vCPU
                    // changes threads): fault code and page tables in.
                    let warm = GuestOp::ReadSum {
                        first_gpa: LIST_GPA,
                        pages: 1,
                        stride_pages: 0,
                    };
                    let warm = vm.run(i as u32, warm).map_err(|e| e.to_string());
                    barrier.wait();
                    warm?;
                    timed_run(vm, i as u32, op)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("vCPU thread"))
            .collect()
    });
    let mut timed = Vec::new();
    for (r, part) in results.into_iter().zip(&parts) {
        let (t, value) = r?;
        check_sum(spec, value, part.iter().map(|&p| DATA_START + p * ps))?;
        timed.push(t);
    }
    Ok(combine(timed, order.len() as u64))
}

/// Runs `op` on `vcpu`, timed and with this thread's counts; returns the
/// timing and the guest's result.
fn timed_run(vm: &GuestVm<'_>, vcpu: u32, op: GuestOp) -> Result<(Timed, u64), String> {
    let before = Counts::this_thread();
    let start = Instant::now();
    let out = vm.run(vcpu, op).map_err(|e| e.to_string())?;
    let end = Instant::now();
    let counts = Counts::this_thread().since(&before);
    let t = Timed {
        start,
        end,
        counts,
        samples: Vec::new(),
        exits: out.exits,
    };
    Ok((t, out.value))
}

/// One vCPU reads the whole data area, from right after `go`: nothing was
/// faulted in before, not even the guest's code and page tables.
pub fn ready(vm: &GuestVm<'_>, spec: &ChildSpec) -> Result<ChildResult, String> {
    let pages = (spec.len - DATA_START) / PAGE_SIZE;
    let op = GuestOp::ReadSum {
        first_gpa: DATA_START,
        pages,
        stride_pages: 1,
    };
    let (t, value) = timed_run(vm, 0, op)?;
    check_sum(spec, value, op.visited_pages().unwrap_or_default())?;
    Ok(combine(vec![t], pages))
}
