//! The same cases with the CPUs fixed: the serving thread and the child
//! on one CPU, or on two.
//!
//! Left alone, the scheduler puts a faulting thread and the thread that
//! serves it sometimes on one CPU (a wake-up is a local context switch)
//! and sometimes on two (a wake-up is an IPI to a CPU that may be halted,
//! which in this VM costs a hypervisor round trip). Runs switch between
//! the two at random and figures come out bimodal; these cases show each
//! placement on its own, so that a ratio of the free-running cases can be
//! read against them.

use std::fmt::Write as _;

use super::figures::Figures;
use super::host::Server;
use super::plan::{
    Case, REMOVE_GAP_US, Shape, Sizes, Work, default_spin_us, remove_spec, snap, spec, spin_label,
};
use super::report::{Results, med};
use super::spec::{Access, Faulter, Memory, Pattern, Role};

/// The placements: (name, server CPU, child CPU).
pub const PLACEMENTS: [(&str, usize, usize); 2] = [("same", 0, 0), ("split", 0, 1)];

/// The non-zero spin the placement cases try: the middle of the sweep.
pub fn probe_spin_us(sizes: &Sizes) -> Option<u64> {
    let spins: Vec<u64> = sizes.spins_us.iter().copied().filter(|&s| s > 0).collect();
    spins.get(spins.len() / 2).copied()
}

/// The workloads of the placement cases, by name.
pub fn workloads(kvm: bool) -> Vec<&'static str> {
    if kvm {
        vec!["thread1-4k", "vcpu1-4k", "remove"]
    } else {
        vec!["thread1-4k", "remove"]
    }
}

/// One thread or vCPU faulting, and isolated REMOVEs, with the serving
/// thread and the child pinned to the same CPU or to different ones: the
/// two placements the scheduler switches between when left alone.
pub fn cases(out: &mut Vec<Case>, sizes: &Sizes, kvm: bool) {
    let mut servers = vec![
        ("minimal".to_string(), Server::Minimal { bulk: false }),
        (
            "snapfault".to_string(),
            snap(default_spin_us(), true, false),
        ),
    ];
    if let Some(spin) = probe_spin_us(sizes) {
        servers.push((spin_label(spin), snap(spin, true, false)));
    }
    for (place, server_cpu, child_cpu) in PLACEMENTS {
        for workload in workloads(kvm) {
            for (label, server) in &servers {
                let (role, mut spec) = match workload {
                    "remove" => (Role::Remove, remove_spec(sizes, REMOVE_GAP_US)),
                    w => {
                        let f = if w == "vcpu1-4k" {
                            Faulter::Vcpu
                        } else {
                            Faulter::Thread
                        };
                        let shape = Shape::small(f, 1, Pattern::Seq);
                        (
                            Role::Touch,
                            spec(shape, sizes.fault, Memory::Uffd, Access::Read),
                        )
                    }
                };
                spec.cpu = Some(child_cpu);
                let server = server.clone();
                let work = Work::Child {
                    role,
                    spec,
                    server,
                    server_cpu: Some(server_cpu),
                };
                out.push(Case {
                    key: format!("place/{place}/{workload}/{label}"),
                    work,
                });
            }
        }
    }
}

/// `server`'s us per page (or per 4 KiB call) over the minimal handler's
/// in each placement, as one line; `None` without placement figures.
pub fn ratios(f: &Figures, workload: &str, server: &str) -> Option<String> {
    let metric = if workload == "remove" {
        "us_4k"
    } else {
        "us_per_page"
    };
    let mut parts = Vec::new();
    for (place, _, _) in PLACEMENTS {
        let mine = med(f, &format!("place/{place}/{workload}/{server}"), metric)?;
        let minimal = med(f, &format!("place/{place}/{workload}/minimal"), metric)?;
        parts.push(format!("{place} {:.2}x", mine / minimal));
    }
    Some(format!(
        "pinned {workload}, {server} / minimal: {}",
        parts.join(", ")
    ))
}

/// The placement table: us per page (faults) or per call (4 KiB REMOVE).
pub fn render(out: &mut String, r: &Results) {
    let f = &r.cases;
    let Some(first) = PLACEMENTS.first() else {
        return;
    };
    if !f
        .keys()
        .any(|k| k.starts_with(&format!("place/{}/", first.0)))
    {
        return;
    }
    let _ = writeln!(
        out,
        "\nPlacement (4k, pinned): same = serving thread and child on CPU 0, split = server on \
         CPU 0,\nchild on CPU 1; us per page (faults) or per 4 KiB madvise call (REMOVE, \
         isolated), medians."
    );
    let mut servers = vec!["minimal".to_string(), "snapfault".to_string()];
    if let Some(spin) = probe_spin_us(&r.sizes) {
        servers.push(spin_label(spin));
    }
    let mut rows = Vec::new();
    for workload in workloads(r.kvm) {
        let metric = if workload == "remove" {
            "us_4k"
        } else {
            "us_per_page"
        };
        for server in &servers {
            let mut row = vec![workload.to_string(), server.clone()];
            for (place, _, _) in PLACEMENTS {
                let key = format!("place/{place}/{workload}/{server}");
                let mine = med(f, &key, metric);
                row.push(mine.map_or("-".into(), |v| format!("{v:.1}")));
                let minimal = med(f, &format!("place/{place}/{workload}/minimal"), metric);
                let vs = match (mine, minimal) {
                    (Some(a), Some(b)) if server != "minimal" => format!("{:.2}x", a / b),
                    _ => String::new(),
                };
                row.push(vs);
            }
            rows.push(row);
        }
    }
    let header = ["workload", "server", "same", "sf/min", "split", "sf/min"];
    super::table::render(out, &header, &rows);
}
