//! `doctor --file`: a capture diagnosed through the offline path
//! ([`crate::drivers::offline`]) — the recorded header (fill at start,
//! kernel counters at start and end, backend choice) and events. No
//! forecast: a capture holds the count at its start only.

use std::{collections::HashMap, path::PathBuf};

use super::{
    BackendReport, Diagnosis, NsAcc, NsInfoLite, NsReport, Options, Status, finish, memory_report,
    settings, status_of,
};
use crate::{
    analysis::{
        aggregate::{Aggregator, DEFAULT_MAX_SOURCES},
        forecast::{self, Sample, Watcher},
    },
    drivers::offline::OfflineSpec,
    drivers::{doctor::advice::Place, offline},
    formats::capture::{Header, format::NsFill},
    kernel::{
        backend::counters::kinds_from_stats,
        error::TraceError,
        kstats::{CtStats, Fill},
    },
    model::Summary,
};

/// Diagnoses a capture: the recorded header (fill at start, kernel
/// counters at start and end, backend choice) and events.
pub(super) fn diagnose(opts: &Options) -> Result<Diagnosis, TraceError> {
    let usage = |e: String| TraceError::Usage(e);
    let set = crate::formats::capture::open_set(&opts.files).map_err(|e| usage(e.to_string()))?;
    let args = OfflineSpec {
        netns: opts.netns.clone(),
        ..Default::default()
    };
    let mut aggs: HashMap<u32, Aggregator> = HashMap::new();
    let read = offline::read(set, &args, |e, _, matched| {
        if matched {
            aggs.entry(e.netns)
                .or_insert_with(|| Aggregator::new(DEFAULT_MAX_SOURCES))
                .record(e);
        }
    })
    .map_err(|e| usage(e.to_string()))?;
    let summary = read.summary(opts.top);
    let header = &read.info.header;
    let mut forecasts = Watcher::new(forecast::Config::default());
    let kernel_end = read
        .info
        .trailer
        .as_ref()
        .map(|t| t.kernel_end.clone())
        .unwrap_or_default();
    let mut accs = Vec::new();
    let mut kernels = Vec::new();
    for ns in &header.conntrack {
        if let Some(spec) = &opts.netns
            && *spec != ns.netns
            && *spec != ns.inode.to_string()
        {
            continue;
        }
        let first = Sample {
            t_s: 0.0,
            entries: ns.fill.count,
            inserted: None,
        };
        forecasts.push(ns.inode, first, ns.fill.max);
        let recorded = match (
            header.kernel_start.get(&ns.inode),
            kernel_end.get(&ns.inode),
        ) {
            (Some(s), Some(e)) => e.delta(s),
            _ => None,
        };
        let (a, r, k) = namespace(opts, ns, &forecasts, aggs.get(&ns.inode), recorded);
        accs.push(a);
        kernels.push((r, k));
    }
    let mut warnings = read.info.warnings.clone();
    warnings.push("from a capture: the table size is recorded at the start only, so there is no forecast; the status is what happened during the capture".into());
    let global = accs.first().map(|a| a.last_fill).unwrap_or_default();
    let d = document(opts, header, &summary, global, warnings);
    Ok(finish(d, &accs, kernels, opts))
}

/// One recorded namespace's report: its kernel counters as recorded at
/// start and end (`recorded`), else counted from its events (`agg`).
fn namespace(
    opts: &Options,
    ns: &NsFill,
    forecasts: &Watcher,
    agg: Option<&Aggregator>,
    recorded: Option<CtStats>,
) -> (NsAcc, NsReport, CtStats) {
    let place = if ns.netns == "init" {
        Place::Init
    } else if let Some(pid) = ns
        .netns
        .strip_prefix("pid ")
        .and_then(|r| r.split_whitespace().next())
    {
        Place::Path(format!("/proc/{pid}/ns/net"))
    } else {
        Place::Named(ns.netns.clone())
    };
    let a = NsAcc {
        info: NsInfoLite {
            inode: ns.inode,
            name: ns.netns.clone(),
            place,
            path: PathBuf::new(),
        },
        last_fill: ns.fill,
        start_cols: None,
        end_cols: None,
    };
    let (mut r, _) = a.report(opts, forecasts, agg);
    let k = recorded.unwrap_or_else(|| {
        // No trailer: count the events instead.
        let t = agg.map(|a| a.totals).unwrap_or_default();
        CtStats {
            drop: t.table_full + t.insert_failed,
            early_drop: t.early_drop,
            insert_failed: t.insert_failed,
            ..Default::default()
        }
    });
    r.failures = kinds_from_stats(&k);
    // No kernel counter: the GC's evictions are known from the events only.
    r.failures.gc_evict = agg.map_or(0, |a| a.totals.gc_evict);
    let (st, why) = status_of(&r, &k, opts.at_risk_fill, opts.at_risk_within.as_secs_f64());
    r.status = st;
    r.reasons = why;
    r.holders_unavailable = Some("a capture does not record the table's entries".into());
    (a, r, k)
}

/// The diagnosis of a capture, before its namespaces and advice: what the
/// header recorded, the entry size measured here (said so when the capture
/// is another host's).
fn document(
    opts: &Options,
    header: &Header,
    summary: &Summary,
    global: Fill,
    warnings: Vec<String>,
) -> Diagnosis {
    let mut memory = memory_report(&opts.backend.btf_path, global.max, global.buckets);
    if header.hostname != crate::formats::capture::hostname()
        || header.kernel_release != crate::formats::capture::kernel_release()
    {
        memory.note = Some(format!(
            "entry size measured on this host ({}, {}), not the capture's ({}, {})",
            crate::formats::capture::hostname(),
            crate::formats::capture::kernel_release(),
            header.hostname,
            header.kernel_release
        ));
    }
    Diagnosis {
        version: env!("CARGO_PKG_VERSION").into(),
        source: "capture".into(),
        files: opts.files.iter().map(|p| p.display().to_string()).collect(),
        hostname: header.hostname.clone(),
        kernel_release: header.kernel_release.clone(),
        backend: BackendReport {
            chosen: summary.backend,
            hooks: header.hooks.clone(),
            refused: header.backend_refused.clone(),
            not_tried: Vec::new(),
            per_packet: header.per_packet,
        },
        duration_s: summary.duration_s,
        sampled_unix_ns: header
            .start_unix_ns
            .saturating_add((summary.duration_s.max(0.0) * 1e9) as u128),
        settings: settings(opts, &forecast::Config::default()),
        status: Status::Healthy,
        exit_code: 0,
        namespaces: Vec::new(),
        memory,
        advice: Vec::new(),
        warnings,
    }
}
