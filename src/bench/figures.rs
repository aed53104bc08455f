//! The named figures of each run, kept per repetition, and what is made of
//! them: medians with ranges, and ratios taken within a repetition.

use std::collections::BTreeMap;
use std::time::Duration;

use super::host::{Host, Run};
use super::plan::{Case, Work, size_label};
use super::spec::{ChildSpec, Role};
use super::stats::Spread;

/// One run's figures, by name.
pub type RunFigures = BTreeMap<String, f64>;

/// Per case, one entry per repetition (empty where the run failed).
pub type Raw = BTreeMap<String, Vec<RunFigures>>;

/// Medians and ranges of every figure, per case.
pub type Figures = BTreeMap<String, BTreeMap<String, Spread>>;

/// Runs `case` once; its figures.
pub fn run_case(host: &Host, case: &Case) -> Result<RunFigures, String> {
    match &case.work {
        Work::Memcpy(len) => {
            let (fresh, hot) = host.memcpy(*len)?;
            Ok(RunFigures::from([
                ("gbps".into(), gbps(*len, fresh)),
                ("gbps_hot".into(), gbps(*len, hot)),
            ]))
        }
        Work::Child {
            role,
            spec,
            server,
            server_cpu,
        } => {
            let run = host.run(*role, spec, server, *server_cpu)?;
            Ok(figures(*role, spec, &run))
        }
    }
}

fn gbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-9) / 1e9
}

/// The figures of one run. Counters are per page (per `madvise` call for
/// REMOVE, per 2 MiB chunk for a bulk install).
fn figures(role: Role, spec: &ChildSpec, run: &Run) -> RunFigures {
    let c = &run.child;
    let mut out = RunFigures::new();
    let mut put = |name: &str, v: f64| {
        out.insert(name.to_string(), v);
    };
    let units = match role {
        Role::Hold => spec.len.div_ceil(2 << 20),
        _ => c.touches,
    }
    .max(1) as f64;
    match role {
        Role::Touch => {
            put("us_per_page", c.wall_ns as f64 / 1e3 / units);
            put(
                "kpages_per_s",
                c.touches as f64 / (c.wall_ns.max(1) as f64 / 1e9) / 1e3,
            );
            if let Some(l) = c.latency {
                put("p50_us", l.p50_ns as f64 / 1e3);
                put("p99_us", l.p99_ns as f64 / 1e3);
                put("mean_us", l.mean_ns as f64 / 1e3);
            }
        }
        Role::Remove => {
            for r in &c.removes {
                put(
                    &format!("us_{}", size_label(r.len)),
                    r.median_ns as f64 / 1e3,
                );
            }
        }
        Role::Hold => {
            if let Some(took) = run.server.and_then(|s| s.install) {
                put("gbps", gbps(spec.len, took));
            }
        }
        Role::Ready => {
            put("ms", c.wall_ns as f64 / 1e6);
            put("faults", run.server.map_or(0, |s| s.faults) as f64);
        }
    }
    if role != Role::Hold {
        put("cli_sleeps", c.counts.voluntary as f64 / units);
        put("cli_preempt", c.counts.involuntary as f64 / units);
        put("cli_cpu_us", c.counts.cpu_ns as f64 / 1e3 / units);
        put("cli_minflt", c.counts.minflt as f64 / units);
    }
    if let Some(s) = run.server {
        put("srv_sleeps", s.counts.voluntary as f64 / units);
        put("srv_preempt", s.counts.involuntary as f64 / units);
        put("srv_cpu_us", s.counts.cpu_ns as f64 / 1e3 / units);
        put("srv_reads", s.counts.reads as f64 / units);
    }
    out
}

/// Medians and ranges of `raw`.
pub fn summarize(raw: &Raw) -> Figures {
    let mut out = Figures::new();
    for (case, reps) in raw {
        let mut by_name: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for run in reps {
            for (name, &v) in run {
                by_name.entry(name).or_default().push(v);
            }
        }
        let figs = by_name
            .into_iter()
            .filter_map(|(name, v)| Spread::of(&v).map(|s| (name.to_string(), s)))
            .collect();
        out.insert(case.clone(), figs);
    }
    out
}

/// One figure of one case in repetition `rep`.
pub fn at(raw: &Raw, case: &str, metric: &str, rep: usize) -> Option<f64> {
    raw.get(case)?.get(rep)?.get(metric).copied()
}

/// The geometric mean, per repetition, of `num / den` over `pairs`
/// (`(numerator case, denominator case)`, same metric), and its spread
/// over the repetitions where every pair has both figures. With one pair
/// it is just the ratio measured side by side in each repetition.
pub fn paired(raw: &Raw, pairs: &[(String, String)], metric: &str) -> Option<Spread> {
    let reps = pairs
        .iter()
        .filter_map(|(a, _)| raw.get(a).map(Vec::len))
        .max()?;
    let per_rep: Vec<f64> = (0..reps)
        .filter_map(|rep| {
            let logs: Option<Vec<f64>> = pairs
                .iter()
                .map(|(a, b)| Some((at(raw, a, metric, rep)? / at(raw, b, metric, rep)?).ln()))
                .collect();
            let logs = logs.filter(|l| !l.is_empty())?;
            Some((logs.iter().sum::<f64>() / logs.len() as f64).exp())
        })
        .collect();
    Spread::of(&per_rep)
}

/// [`paired`] for one pair.
pub fn ratio(raw: &Raw, num: &str, den: &str, metric: &str) -> Option<Spread> {
    paired(raw, &[(num.to_string(), den.to_string())], metric)
}
