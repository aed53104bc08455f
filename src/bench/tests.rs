//! A smoke test of the whole bench at tiny sizes. The test binary is its
//! own child process: it is started running only [`child_entry`], which
//! takes its job from an environment variable.

use super::*;

/// Carries a child's role and spec (`ROLE\nSPEC`) to [`child_entry`].
const CHILD_ENV: &str = "SNAPFAULT_BENCH_CHILD";

/// The child process's entry, when started by the smoke test; a no-op in
/// an ordinary test run.
#[test]
fn child_entry() {
    let Ok(job) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (role, spec) = job.split_once('\n').expect("role and spec");
    let args = ChildArgs {
        role: role.into(),
        spec: spec.into(),
    };
    std::process::exit(if child_main(&args) { 0 } else { 1 });
}

#[test]
fn random_order_is_a_permutation() {
    let order = child::page_order(1000, spec::Pattern::Random, 7);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<u64>>());
    assert_ne!(order, sorted);
    assert_eq!(order, child::page_order(1000, spec::Pattern::Random, 7));
}

#[track_caller]
fn figure(json: &serde_json::Value, case: &str, metric: &str) {
    let v = &json["cases"][case][metric]["median"];
    assert!(v.is_number(), "no {metric} for {case}");
}

#[test]
fn tiny_bench_reports_every_figure() {
    let launcher = Launcher {
        exe: std::env::current_exe().unwrap(),
        args: [
            "bench::tests::child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ]
        .map(String::from)
        .to_vec(),
        env: Some(CHILD_ENV),
    };
    let args = BenchArgs {
        json: true,
        reps: 1,
        fault_mib: 2,
        huge_mib: 4,
        working_set_mib: 2,
        bulk_mib: 4,
        remove_mib: 4,
        remove_calls: 2,
        spins_us: vec![0, 20],
        server_logs: false,
        no_kvm: false,
        no_hugepages: false,
        only: Vec::new(),
    };
    let results = measure(&args, &launcher, false).unwrap();
    assert!(results.errors.is_empty(), "{:#?}", results.errors);
    let json = serde_json::to_value(&results).unwrap();
    let mut pages = vec!["4k"];
    if results.hugepages {
        pages.push("2m");
    }
    let mut faulters = vec!["thread"];
    if results.kvm {
        faulters.push("vcpu");
    }
    for page in &pages {
        for faulter in &faulters {
            for shape in ["1/seq", "2/seq", "1/rand", "2/rand"] {
                let base = format!("fault/{faulter}{shape}/{page}");
                for server in ["minimal", "snapfault"] {
                    figure(&json, &format!("{base}/{server}"), "us_per_page");
                    figure(&json, &format!("{base}/{server}"), "kpages_per_s");
                    figure(&json, &format!("{base}/{server}"), "srv_sleeps");
                }
                if *faulter == "thread" {
                    figure(&json, &format!("{base}/snapfault"), "p99_us");
                    figure(&json, &format!("{base}/kernel-zero"), "us_per_page");
                    if *page == "4k" {
                        figure(&json, &format!("{base}/kernel-read"), "us_per_page");
                        figure(&json, &format!("{base}/kernel-cow"), "p50_us");
                    }
                }
            }
        }
    }
    figure(
        &json,
        "fault/thread1/seq/4k/snapfault-nocheck",
        "us_per_page",
    );
    let mut sweep = vec!["thread1/seq", "thread2/rand"];
    let mut placed = vec![("thread1-4k", "us_per_page"), ("remove", "us_4k")];
    if results.kvm {
        sweep.extend(["vcpu1/seq", "vcpu2/seq"]);
        placed.push(("vcpu1-4k", "us_per_page"));
        figure(&json, "ready/on-demand", "ms");
        figure(&json, "ready/install-ahead", "ms");
        for shape in ["1/seq", "2/seq", "1/rand", "2/rand"] {
            figure(
                &json,
                &format!("fault/vcpu{shape}/4k/kernel-zero"),
                "us_per_page",
            );
        }
    }
    for shape in sweep {
        for server in ["minimal-sweep", "snapfault-spin0", "snapfault-spin20"] {
            figure(&json, &format!("fault/{shape}/4k/{server}"), "us_per_page");
        }
    }
    for mode in ["remove", "remove-burst"] {
        for server in ["kernel", "minimal", "snapfault"] {
            for len in ["4k", "2m", "4m"] {
                figure(&json, &format!("{mode}/{server}"), &format!("us_{len}"));
            }
        }
    }
    for metric in ["gbps", "gbps_hot"] {
        figure(&json, "bulk/memcpy", metric);
    }
    figure(&json, "bulk/snapfault", "gbps");
    figure(&json, "bulk/raw-copy", "gbps");
    for place in ["same", "split"] {
        for (workload, metric) in &placed {
            for server in ["minimal", "snapfault", "snapfault-spin20"] {
                figure(&json, &format!("place/{place}/{workload}/{server}"), metric);
            }
        }
    }
    assert!(json["page_states"]["bits_per_page_4k"].is_number());
    assert!(json["spin"]["recommended_us"].is_number());
    let targets = json["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 6);
    let all_measured = targets.iter().all(|t| t["ratio"]["median"].is_number());
    assert!(all_measured, "{targets:#?}");
    assert!(!table::render_all(&results).is_empty());
}
