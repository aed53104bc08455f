//! The human-readable report: one table per section, ratios from medians
//! measured side by side in the same run.

use std::fmt::Write as _;

use super::figures::Figures;
use super::plan::{REMOVE_GAP_US, Shape, size_label, spin_label, spin_shapes};
use super::report::{Results, med};
use super::spec::{Faulter, Page};
use super::stats::Spread;

/// A number with about three significant digits.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn range(s: Option<&Spread>) -> String {
    s.map_or(String::new(), |s| {
        format!("({}-{})", num(s.min), num(s.max))
    })
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

fn get<'f>(f: &'f Figures, key: &str, metric: &str) -> Option<&'f Spread> {
    f.get(key)?.get(metric)
}

/// Renders rows, the first column left-aligned and the rest right-aligned.
pub fn render(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let cols = header.len();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(cols) {
            width[i] = width[i].max(cell.len());
        }
    }
    let line = |out: &mut String, cells: &[String]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate().take(cols) {
            if i < 2 {
                let _ = write!(s, "{cell:<w$}  ", w = width[i]);
            } else {
                let _ = write!(s, "{cell:>w$}  ", w = width[i]);
            }
        }
        let _ = writeln!(out, "{}", s.trim_end());
    };
    line(
        out,
        &header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for row in rows {
        line(out, row);
    }
}

fn shape_label(s: &Shape) -> String {
    format!(
        "{} {} {} {}",
        s.faulter.label(),
        s.threads,
        s.pattern.label(),
        s.page.label()
    )
}

fn faults(out: &mut String, r: &Results) {
    let f = &r.cases;
    let _ = writeln!(
        out,
        "\nOn-demand first touches: us per page = wall time / pages (median (min-max) over \
         {} reps);\np50/p99 per touch (threads only); sf/min and sf/kern = snapfault us/page over \
         the\nminimal handler's and the kernel's (cow for 4k threads, else zero-fill; a vCPU reads \
         never-\ntouched anonymous memory); below 1 is faster.",
        r.reps
    );
    let servers = [
        "kernel-read",
        "kernel-cow",
        "kernel-zero",
        "minimal",
        "snapfault",
        "snapfault-nocheck",
    ];
    let mut rows = Vec::new();
    for shape in Shape::all(r.kvm, r.hugepages) {
        let base = shape.key();
        let small_thread = shape.page == Page::Small && shape.faulter == Faulter::Thread;
        let kernel = if small_thread {
            "kernel-cow"
        } else {
            "kernel-zero"
        };
        let mut first = true;
        for server in servers {
            let key = format!("{base}/{server}");
            let Some(cost) = get(f, &key, "us_per_page") else {
                continue;
            };
            let snapfault = server.starts_with("snapfault");
            let lat = |m| get(f, &key, m).map_or("-".into(), |s| num(s.median));
            let vs = |other: &str| {
                let theirs = med(f, &format!("{base}/{other}"), "us_per_page");
                if snapfault {
                    ratio(Some(cost.median), theirs)
                } else {
                    String::new()
                }
            };
            let label = if first {
                shape_label(&shape)
            } else {
                String::new()
            };
            rows.push(vec![
                label,
                server.to_string(),
                num(cost.median),
                range(Some(cost)),
                lat("p50_us"),
                lat("p99_us"),
                lat("kpages_per_s"),
                vs("minimal"),
                vs(kernel),
            ]);
            first = false;
        }
    }
    let header = [
        "case",
        "server",
        "us/page",
        "(min-max)",
        "p50",
        "p99",
        "kpage/s",
        "sf/min",
        "sf/kern",
    ];
    render(out, &header, &rows);
}

fn spins(out: &mut String, r: &Results) {
    let f = &r.cases;
    let shapes = spin_shapes(r.kvm);
    let _ = writeln!(
        out,
        "\nConfig::spin sweep (4k): us per page; score = geometric mean over the shapes of \
         us/page over\nthat at the first spin; min/sf = the same of the minimal handler's us/page \
         over snapfault's\n(both taken per rep, then median (min-max))."
    );
    let mut header: Vec<String> = vec!["spin us".into(), String::new()];
    header.extend(shapes.iter().map(shape_label));
    header.extend(["score", "(min-max)", "min/sf", "(min-max)"].map(String::from));
    let mut rows = Vec::new();
    for &spin in &r.sizes.spins_us {
        let best = Some(spin) == r.spin.recommended_us;
        let mut row = vec![
            spin.to_string(),
            if best { "<- best" } else { "" }.to_string(),
        ];
        for s in &shapes {
            let key = format!("{}/{}", s.key(), spin_label(spin));
            row.push(med(f, &key, "us_per_page").map_or("-".into(), num));
        }
        for spread in [r.spin.scores.get(&spin), r.spin.vs_minimal.get(&spin)] {
            row.push(spread.map_or("-".into(), |s| format!("{:.3}", s.median)));
            row.push(spread.map_or(String::new(), |s| format!("({:.2}-{:.2})", s.min, s.max)));
        }
        rows.push(row);
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    render(out, &header, &rows);
}

fn removes(out: &mut String, r: &Results) {
    let f = &r.cases;
    let _ = writeln!(
        out,
        "\nREMOVE round trip: the madvise(MADV_DONTNEED) caller's time in us, median of {} calls \
         per rep,\nthen median (min-max) over reps; isolated = {REMOVE_GAP_US} us sleep before \
         each call, burst = back\nto back; kernel = no userfaultfd registered.",
        r.sizes.remove_calls
    );
    let lens: Vec<String> = r.sizes.remove_lens.iter().map(|&l| size_label(l)).collect();
    let mut header = vec!["mode".to_string(), "server".to_string()];
    for l in &lens {
        header.extend([l.clone(), String::new()]);
    }
    let mut rows = Vec::new();
    for (mode, label) in [("remove", "isolated"), ("remove-burst", "burst")] {
        for server in ["kernel", "minimal", "snapfault", "sf/min"] {
            let mode_cell = if server == "kernel" { label } else { "" };
            let mut row = vec![mode_cell.to_string(), server.to_string()];
            for l in &lens {
                let m = format!("us_{l}");
                if server == "sf/min" {
                    let sf = med(f, &format!("{mode}/snapfault"), &m);
                    row.extend([
                        ratio(sf, med(f, &format!("{mode}/minimal"), &m)),
                        String::new(),
                    ]);
                } else {
                    let s = get(f, &format!("{mode}/{server}"), &m);
                    row.extend([s.map_or("-".into(), |s| num(s.median)), range(s)]);
                }
            }
            rows.push(row);
        }
    }
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    render(out, &header, &rows);
}

fn bulk(out: &mut String, r: &Results) {
    let f = &r.cases;
    let _ = writeln!(
        out,
        "\nBulk install of {} MiB (GB/s, median (min-max)); vs raw = over raw 2 MiB UFFDIO_COPY.",
        r.sizes.bulk >> 20
    );
    let raw = med(f, "bulk/raw-copy", "gbps");
    let rows: Vec<Vec<String>> = [
        ("snapfault install-ahead", "bulk/snapfault", "gbps"),
        ("raw UFFDIO_COPY 2 MiB", "bulk/raw-copy", "gbps"),
        ("memcpy, fresh 4k dst", "bulk/memcpy", "gbps"),
        ("memcpy, populated dst", "bulk/memcpy", "gbps_hot"),
    ]
    .iter()
    .map(|&(what, key, m)| {
        let s = get(f, key, m);
        vec![
            what.to_string(),
            String::new(),
            s.map_or("-".into(), |s| num(s.median)),
            range(s),
            ratio(s.map(|s| s.median), raw),
        ]
    })
    .collect();
    render(out, &["install", "", "GB/s", "(min-max)", "vs raw"], &rows);
}

fn ready(out: &mut String, r: &Results) {
    let f = &r.cases;
    if !r.kvm {
        let _ = writeln!(out, "\nReady time: skipped (no /dev/kvm).");
        return;
    }
    let _ = writeln!(
        out,
        "\nReady time: one vCPU reads a {} MiB working set (4k pages) right after the handshake.",
        r.sizes.working_set >> 20
    );
    let on = med(f, "ready/on-demand", "ms");
    let rows: Vec<Vec<String>> = ["on-demand", "install-ahead"]
        .iter()
        .map(|&what| {
            let key = format!("ready/{what}");
            let s = get(f, &key, "ms");
            vec![
                what.to_string(),
                String::new(),
                s.map_or("-".into(), |s| num(s.median)),
                range(s),
                med(f, &key, "faults").map_or("-".into(), |v| format!("{v:.0}")),
                ratio(on, s.map(|s| s.median)),
            ]
        })
        .collect();
    render(
        out,
        &["serving", "", "ms", "(min-max)", "faults", "speed-up"],
        &rows,
    );
}

/// The whole report.
pub fn render_all(r: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "snapfault bench: {} reps, {:.0} s; 4k cases touch {} MiB, 2m cases {} MiB; kvm: {}, \
         2 MiB hugepages: {}",
        r.reps,
        r.seconds,
        r.sizes.fault >> 20,
        r.sizes.huge >> 20,
        r.kvm,
        r.hugepages
    );
    faults(&mut out, r);
    spins(&mut out, r);
    removes(&mut out, r);
    bulk(&mut out, r);
    ready(&mut out, r);
    super::placement::render(&mut out, r);
    let p = &r.page_states;
    let _ = writeln!(
        out,
        "\nPage states: {} KiB per GiB of 4k guest memory ({:.2} bits per page), {} bytes per GiB \
         of 2m.",
        p.bytes_per_gib_4k >> 10,
        p.bits_per_page_4k,
        p.bytes_per_gib_2m
    );
    let rec = r
        .spin
        .recommended_us
        .map_or("-".into(), |s| format!("{s} us"));
    let _ = writeln!(
        out,
        "\nSpin: default {} us, recommended {rec}.\n\nTargets (ratio median (min-max) over reps, \
         each taken within a rep; counts\nper fault, per madvise call, or per 2 MiB chunk):",
        r.spin.default_us
    );
    for t in &r.targets {
        let verdict = if t.pass { "PASS" } else { "MISS" };
        let op = if t.at_least { ">=" } else { "<=" };
        let value = t.ratio.map_or("-".into(), |s| {
            format!("{:.2} ({:.2}-{:.2})", s.median, s.min, s.max)
        });
        let _ = writeln!(
            out,
            "  {verdict}  {}: {value}, goal {op} {}",
            t.name, t.threshold
        );
        for line in &t.counts {
            let _ = writeln!(out, "        {line}");
        }
    }
    for e in &r.errors {
        let _ = writeln!(out, "ERROR {e}");
    }
    out
}
