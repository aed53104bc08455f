//! From figures to verdicts: the spin choice, the targets, page-state
//! memory. Every ratio here is taken within each repetition (cases side
//! by side) and then summarized over repetitions.

use std::collections::BTreeMap;

use serde::Serialize;

use super::figures::{Figures, Raw, paired, ratio};
use super::plan::{Shape, Sizes, size_label, spin_label, spin_shapes};
use super::spec::{Faulter, Pattern};
use super::stats::Spread;
use crate::pagestate::PageStates;

/// Page-state memory per GiB of guest memory.
#[derive(Debug, Clone, Serialize)]
pub struct Footprint {
    /// Bytes for one GiB of 4 KiB pages.
    pub bytes_per_gib_4k: u64,
    /// Bits per 4 KiB page.
    pub bits_per_page_4k: f64,
    /// Bytes for one GiB of 2 MiB pages.
    pub bytes_per_gib_2m: u64,
}

impl Footprint {
    /// Measures `PageStates::footprint` for one GiB.
    pub fn measure() -> Footprint {
        let small = (1u64 << 30) / 4096;
        let bytes = PageStates::new(small).footprint() as u64;
        Footprint {
            bytes_per_gib_4k: bytes,
            bits_per_page_4k: bytes as f64 * 8.0 / small as f64,
            bytes_per_gib_2m: PageStates::new(512).footprint() as u64,
        }
    }
}

/// Which `Config::spin` wins over the spin shapes.
#[derive(Debug, Clone, Serialize)]
pub struct SpinChoice {
    /// `Config::default().spin` now, in us.
    pub default_us: u64,
    /// The spin with the lowest median score, in us.
    pub recommended_us: Option<u64>,
    /// Per spin: per repetition, the geometric mean over the shapes of its
    /// us/page over that of the first spin tried (below 1: faster).
    pub scores: BTreeMap<u64, Spread>,
    /// Per spin: per repetition, the geometric mean over the shapes of the
    /// minimal handler's us/page over snapfault's (above 1: faster).
    pub vs_minimal: BTreeMap<u64, Spread>,
    /// The shapes scored.
    pub shapes: Vec<String>,
}

/// One target, checked.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// The measured ratio over repetitions (`None`: a figure is missing).
    pub ratio: Option<Spread>,
    /// The bound.
    pub threshold: f64,
    /// `true`: the ratio must be at least the bound; `false`: at most.
    pub at_least: bool,
    /// Whether the median ratio holds.
    pub pass: bool,
    /// Counters that explain the ratio, one line per case.
    pub counts: Vec<String>,
}

/// The median of `metric` of case `key`.
pub fn med(f: &Figures, key: &str, metric: &str) -> Option<f64> {
    f.get(key)?.get(metric).map(|s| s.median)
}

/// Scores every spin of `sizes.spins_us` over the spin shapes.
pub fn choose_spin(raw: &Raw, sizes: &Sizes, kvm: bool) -> SpinChoice {
    let shapes = spin_shapes(kvm);
    let base = sizes.spins_us.first().copied().unwrap_or(0);
    let mut scores = BTreeMap::new();
    let mut vs_minimal = BTreeMap::new();
    for &spin in &sizes.spins_us {
        let against: Vec<(String, String)> = shapes
            .iter()
            .map(|s| {
                (
                    format!("{}/minimal-sweep", s.key()),
                    format!("{}/{}", s.key(), spin_label(spin)),
                )
            })
            .collect();
        if let Some(r) = paired(raw, &against, "us_per_page") {
            vs_minimal.insert(spin, r);
        }
        let pairs: Vec<(String, String)> = shapes
            .iter()
            .map(|s| {
                (
                    format!("{}/{}", s.key(), spin_label(spin)),
                    format!("{}/{}", s.key(), spin_label(base)),
                )
            })
            .collect();
        if let Some(score) = paired(raw, &pairs, "us_per_page") {
            scores.insert(spin, score);
        }
    }
    let recommended = scores
        .iter()
        .min_by(|a, b| a.1.median.total_cmp(&b.1.median).then(a.0.cmp(b.0)))
        .map(|(&spin, _)| spin);
    SpinChoice {
        default_us: super::plan::default_spin_us(),
        recommended_us: recommended,
        scores,
        vs_minimal,
        shapes: shapes.iter().map(Shape::key).collect(),
    }
}

/// Per-fault (or per-call) counters of a case, as one line: the serving
/// thread's sleeps, preemptions, CPU time and reads, then the faulters'.
fn counts(f: &Figures, key: &str) -> String {
    let g = |m| med(f, key, m).map_or("-".into(), |v| format!("{v:.2}"));
    let short = key.strip_prefix("fault/").unwrap_or(key);
    let mut line = format!(
        "{short}: server {} sleep {} preempt {} us {} reads",
        g("srv_sleeps"),
        g("srv_preempt"),
        g("srv_cpu_us"),
        g("srv_reads"),
    );
    if med(f, key, "cli_cpu_us").is_some() {
        let client = format!(
            " | faulter {} sleep {} preempt {} us",
            g("cli_sleeps"),
            g("cli_preempt"),
            g("cli_cpu_us")
        );
        line.push_str(&client);
    }
    line
}

/// How two faulters are capped by CPU time: per fault, the faulters' and
/// the server's CPU; two cores then allow at most `2 / cpu` faults a
/// second, shown against the one-faulter rate.
fn cpu_ceiling(f: &Figures, one: &str, two: &str) -> Option<String> {
    let cpu = med(f, two, "cli_cpu_us")? + med(f, two, "srv_cpu_us")?;
    let ceiling = 2.0 / cpu * 1e3;
    let single = med(f, one, "kpages_per_s")?;
    Some(format!(
        "CPU per fault with two: {cpu:.1} us (faulters and server): two cores cap them at \
         {ceiling:.1} kpage/s = {:.2}x one",
        ceiling / single
    ))
}

fn target(name: String, ratio: Option<Spread>, threshold: f64, at_least: bool) -> Target {
    let pass = ratio.is_some_and(|r| {
        if at_least {
            r.median >= threshold
        } else {
            r.median <= threshold
        }
    });
    Target {
        name,
        ratio,
        threshold,
        at_least,
        pass,
        counts: Vec::new(),
    }
}

fn with_counts(mut t: Target, f: &Figures, keys: &[String]) -> Target {
    t.counts = keys.iter().map(|k| counts(f, k)).collect();
    t
}

/// `{shape key}/{server}` for every shape.
fn per_shape(shapes: &[Shape], server: &str) -> Vec<String> {
    shapes
        .iter()
        .map(|s| format!("{}/{server}", s.key()))
        .collect()
}

/// The pinned ratios of `server` against the minimal handler, one line
/// per placement workload among `workloads`.
fn pinned(f: &Figures, workloads: &[&str], server: &str) -> Vec<String> {
    workloads
        .iter()
        .filter_map(|w| super::placement::ratios(f, w, server))
        .collect()
}

/// Checks the targets.
pub fn targets(
    raw: &Raw,
    f: &Figures,
    spin: &SpinChoice,
    foot: &Footprint,
    sizes: &Sizes,
    kvm: bool,
) -> Vec<Target> {
    let mut out = Vec::new();
    let faults = super::placement::workloads(kvm);
    let faults: Vec<&str> = faults.into_iter().filter(|w| *w != "remove").collect();

    let small = Shape::all(kvm, false);
    let pairs: Vec<_> = per_shape(&small, "minimal")
        .into_iter()
        .zip(per_shape(&small, "snapfault"))
        .collect();
    let name = format!(
        "on-demand 4 KiB: minimal / snapfault, default spin ({} shapes)",
        small.len()
    );
    let mut keys = vec![Shape::small(Faulter::Thread, 1, Pattern::Seq)];
    if kvm {
        keys.push(Shape::small(Faulter::Vcpu, 1, Pattern::Seq));
    }
    let keys: Vec<String> = keys
        .iter()
        .flat_map(|s| {
            [
                format!("{}/snapfault", s.key()),
                format!("{}/minimal", s.key()),
            ]
        })
        .collect();
    let mut t = with_counts(
        target(name, paired(raw, &pairs, "us_per_page"), 1.0, true),
        f,
        &keys,
    );
    t.counts.extend(pinned(f, &faults, "snapfault"));
    out.push(t);

    let rec = spin.recommended_us.unwrap_or(spin.default_us);
    let shapes = spin_shapes(kvm);
    let name = format!(
        "on-demand 4 KiB: minimal / snapfault, spin {rec} us ({} shapes)",
        shapes.len()
    );
    let r = spin.vs_minimal.get(&rec).copied();
    let mut t = with_counts(
        target(name, r, 1.5, true),
        f,
        &per_shape(&shapes, &spin_label(rec)),
    );
    if let Some(probe) = super::placement::probe_spin_us(sizes) {
        t.counts.extend(pinned(f, &faults, &spin_label(probe)));
    }
    out.push(t);

    let faulter = if kvm { Faulter::Vcpu } else { Faulter::Thread };
    let one = format!(
        "{}/{}",
        Shape::small(faulter, 1, Pattern::Seq).key(),
        spin_label(rec)
    );
    let two = format!(
        "{}/{}",
        Shape::small(faulter, 2, Pattern::Seq).key(),
        spin_label(rec)
    );
    let name = format!(
        "2 faulting {}s / 1, pages per second, spin {rec} us",
        faulter.label()
    );
    let r = ratio(raw, &two, &one, "kpages_per_s");
    let mut t = with_counts(target(name, r, 2.0, true), f, &[one.clone(), two.clone()]);
    t.counts.extend(cpu_ceiling(f, &one, &two));
    out.push(t);

    let name = "bulk install: install-ahead / raw 2 MiB UFFDIO_COPY".to_string();
    let r = ratio(raw, "bulk/snapfault", "bulk/raw-copy", "gbps");
    let keys = ["bulk/snapfault".to_string(), "bulk/raw-copy".to_string()];
    out.push(with_counts(target(name, r, 0.9, true), f, &keys));

    let mut worst: Option<Spread> = None;
    for mode in ["remove", "remove-burst"] {
        for &len in &sizes.remove_lens {
            let m = format!("us_{}", size_label(len));
            let (sf, min) = (format!("{mode}/snapfault"), format!("{mode}/minimal"));
            if let Some(r) = ratio(raw, &sf, &min, &m) {
                if worst.is_none_or(|w| r.median > w.median) {
                    worst = Some(r);
                }
            }
        }
    }
    let keys: Vec<String> = ["remove", "remove-burst"]
        .iter()
        .flat_map(|m| [format!("{m}/snapfault"), format!("{m}/minimal")])
        .collect();
    let name = "REMOVE round trip: snapfault / minimal (worst length and mode)".to_string();
    let mut t = with_counts(target(name, worst, 1.2, false), f, &keys);
    t.counts.extend(pinned(f, &["remove"], "snapfault"));
    out.push(t);

    let bits = foot.bits_per_page_4k;
    let bits = Spread {
        median: bits,
        min: bits,
        max: bits,
        n: 1,
    };
    let mut t = target(
        "page states: bits per 4 KiB page".into(),
        Some(bits),
        2.0,
        false,
    );
    t.counts = vec![format!(
        "{} bytes per GiB of guest memory",
        foot.bytes_per_gib_4k
    )];
    out.push(t);
    out
}

/// Everything one bench run found.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// Repetitions of every case.
    pub reps: u32,
    /// Wall time of the whole run.
    pub seconds: f64,
    /// Sizes and counts used.
    pub sizes: Sizes,
    /// Whether the vCPU cases ran.
    pub kvm: bool,
    /// Whether the 2 MiB cases ran.
    pub hugepages: bool,
    /// Per case, per figure: median, min, max over repetitions.
    pub cases: Figures,
    /// Page-state memory.
    pub page_states: Footprint,
    /// The spin sweep's verdict.
    pub spin: SpinChoice,
    /// The targets, checked.
    pub targets: Vec<Target>,
    /// Cases that failed, with why.
    pub errors: Vec<String>,
}
