//! `doctor`: is the conntrack table healthy, when will it be full, what
//! holds it, and what to change — with the commands.
//!
//! Live, it opens the backend `trace` would ([`crate::backend::open`], the
//! same probe: the refusals are the ones `auto` met), samples every traced
//! namespace's count, limits and per-CPU counters for `--duration`, feeds
//! the [`crate::forecast`] estimator, attributes the failures to services
//! from the events, reads which entries hold the table ([`table`]), prices
//! entries ([`memory`]) and selects advice ([`advice`]). From a capture it
//! does the same with the recorded header and events (no forecast: a
//! capture holds the count at its start only).
//!
//! Status per namespace, worst wins for the exit code:
//! * `dropping` (exit [`exit::DROPPING`]): the kernel dropped packets
//!   (`drop` moved) during the window;
//! * `at_risk` (exit [`exit::AT_RISK`]): fill at or above `--at-risk-fill`,
//!   full in less than `--at-risk-within`, or entries evicted
//!   (`early_drop`) or clashing (`insert_failed`);
//! * `healthy` (exit 0).

pub mod advice;
pub mod human;
pub mod memory;
pub mod table;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    aggregate::{Aggregator, DEFAULT_MAX_SOURCES},
    backend::{self, Choice, counters::kinds_from_stats},
    btf::KernelBtf,
    error::{TraceError, exit},
    event::Event,
    filter::OfflineSpec,
    forecast::{self, Estimator, Forecast, Sample},
    kstats::{self, Columns, CtStats, Fill},
    model::{KindCounts, Refusal},
    netns::{self, NetnsInfo},
};
use advice::{Advice, NsFacts, Place, Victim};
use memory::EntryCost;
use table::Holders;

/// Settings of a diagnosis (plain values; the CLI builds them).
#[derive(Clone, Debug)]
pub struct Options {
    pub netns: Option<String>,
    /// How long to sample live.
    pub duration: Duration,
    /// Time between samples.
    pub interval: Duration,
    pub choice: Choice,
    pub backend: backend::Options,
    /// Fill (percent) at or above which a namespace is at risk.
    pub at_risk_fill: f64,
    /// A table full sooner than this is at risk.
    pub at_risk_within: Duration,
    /// Victims listed per namespace.
    pub top: usize,
    /// Capture files: diagnose the recording instead of the live host.
    pub files: Vec<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Healthy,
    AtRisk,
    Dropping,
}

impl Status {
    pub fn exit_code(self) -> i32 {
        match self {
            Status::Healthy => exit::OK,
            Status::AtRisk => exit::AT_RISK,
            Status::Dropping => exit::DROPPING,
        }
    }
    pub fn describe(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::AtRisk => "AT RISK",
            Status::Dropping => "DROPPING NOW",
        }
    }
}

/// One per-CPU counter of /proc/net/stat/nf_conntrack.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Counter {
    /// conntrack-trace's name (`chaintoolong`, `clash_resolve`, ...).
    pub name: &'static str,
    /// The kernel's column (`chainlength`, `clashres`, ...).
    pub column: &'static str,
    /// Sum over CPUs at the end, and its change over the window.
    pub total: u64,
    pub delta: u64,
    /// Change per CPU over the window.
    pub per_cpu_delta: Vec<u64>,
    pub meaning: &'static str,
}

/// (name, column, meaning) of the counters shown, per
/// net/netfilter/nf_conntrack_core.c.
pub const COUNTERS: [(&str, &str, &str); 8] = [
    (
        "drop",
        "drop",
        "packets dropped: no entry could be allocated (table full), or an unresolvable clash at confirm",
    ),
    (
        "early_drop",
        "early_drop",
        "unassured entries evicted to make room for a new one (early_drop()); the new packet passed",
    ),
    (
        "insert_failed",
        "insert_failed",
        "entries that failed to insert at confirm: a clash with an entry another CPU inserted, or a chain too long",
    ),
    (
        "clash_resolve",
        "clashres",
        "clashes resolved without a drop (the packet reused the winner's entry)",
    ),
    (
        "chaintoolong",
        "chainlength",
        "inserts refused because a hash chain was too long (also counted in insert_failed): too few buckets, or a hash flood",
    ),
    (
        "search_restart",
        "search_restart",
        "lookups restarted because an entry moved (a resize or a concurrent delete); high values mean hash churn",
    ),
    (
        "invalid",
        "invalid",
        "packets conntrack could not classify (bad or out-of-window headers); they get no entry",
    ),
    (
        "insert",
        "insert",
        "entries confirmed (new connections admitted) — the rate the table fills at",
    ),
];

fn counters(start: Option<&Columns>, end: &Columns) -> Vec<Counter> {
    COUNTERS
        .iter()
        .filter_map(|(name, col, meaning)| {
            let e = end.per_cpu(col)?;
            let s = start
                .and_then(|s| s.per_cpu(col))
                .unwrap_or_else(|| vec![0; e.len()]);
            let per_cpu_delta: Vec<u64> = e
                .iter()
                .zip(s.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.wrapping_sub(*b))
                .collect();
            Some(Counter {
                name,
                column: col,
                total: e.iter().sum(),
                delta: per_cpu_delta.iter().sum(),
                per_cpu_delta,
                meaning,
            })
        })
        .collect()
}

fn stats_of(c: &Columns) -> CtStats {
    let g = |n: &str| c.sum(n).unwrap_or(0);
    CtStats {
        drop: g("drop"),
        early_drop: g("early_drop"),
        insert_failed: g("insert_failed"),
        clash_resolve: g("clashres"),
        chaintoolong: c.sum("chaintoolong").unwrap_or_else(|| g("chainlength")),
        invalid: g("invalid"),
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timeouts {
    pub udp: Option<u64>,
    pub udp_stream: Option<u64>,
    pub tcp_syn_sent: Option<u64>,
}

/// The diagnosis of one namespace.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NsReport {
    pub netns: String,
    pub inode: u32,
    /// What its commands are prefixed with (`ip netns exec NAME `, empty
    /// for the init namespace).
    pub exec_prefix: String,
    pub entries: u64,
    pub max: u64,
    pub buckets: u64,
    pub fill_percent: f64,
    /// Highest count sampled.
    pub peak: u64,
    pub forecast: Forecast,
    pub status: Status,
    /// Why the status is what it is.
    pub reasons: Vec<String>,
    /// Failures in the window per kind, from the kernel's counters.
    pub failures: KindCounts,
    pub counters: Vec<Counter>,
    pub holders: Option<Holders>,
    /// Why `holders` is absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holders_unavailable: Option<String>,
    /// Dropped services, most failures first (empty for the counters backend).
    pub victims: Vec<Victim>,
    pub timeouts: Timeouts,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendReport {
    /// What `auto` (or `--backend`) runs here.
    pub chosen: String,
    pub hooks: String,
    pub refused: Vec<Refusal>,
    /// Backends after the chosen one, which auto does not try.
    pub not_tried: Vec<String>,
    pub per_packet: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryReport {
    #[serde(flatten)]
    pub cost: EntryCost,
    pub per_entry_bytes: u64,
    pub ram_bytes: u64,
    /// A full table at today's global max and buckets.
    pub current_max: u64,
    pub current_buckets: u64,
    pub current_bytes: u64,
    /// The share of RAM a proposal may take.
    pub budget_share: f64,
    /// Where the figures come from when they are not the diagnosed host's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    pub at_risk_fill_percent: f64,
    pub at_risk_within_s: f64,
    pub sample_interval_s: f64,
    pub forecast_window_s: f64,
    pub forecast_min_samples: usize,
}

/// The whole diagnosis: `--format json` prints it as it is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diagnosis {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub version: String,
    /// `live` or `capture`.
    pub source: String,
    pub files: Vec<String>,
    pub hostname: String,
    pub kernel_release: String,
    pub backend: BackendReport,
    pub duration_s: f64,
    /// Wall clock (Unix ns) of the last sample: forecasts count from here
    /// (for a capture, its end).
    pub sampled_unix_ns: u128,
    pub settings: Settings,
    pub status: Status,
    pub exit_code: i32,
    pub namespaces: Vec<NsReport>,
    pub memory: MemoryReport,
    pub advice: Vec<Advice>,
    pub warnings: Vec<String>,
}

/// Per-namespace accumulation while sampling or reading.
struct NsAcc {
    info: NsInfoLite,
    est: Estimator,
    last_fill: Fill,
    start_cols: Option<Columns>,
    end_cols: Option<Columns>,
    agg: Aggregator,
}

#[derive(Clone, Debug)]
struct NsInfoLite {
    inode: u32,
    name: String,
    place: Place,
    path: PathBuf,
}

fn place_of(info: &NetnsInfo, init_inode: Option<u32>) -> Place {
    if Some(info.inode) == init_inode || info.name == "init" {
        Place::Init
    } else if info.path.starts_with(netns::RUN_NETNS) {
        Place::Named(info.name.clone())
    } else {
        Place::Path(info.path.display().to_string())
    }
}

/// Groups a namespace's sources into services.
fn victims(agg: &Aggregator, top: usize) -> Vec<Victim> {
    let mut by: BTreeMap<(String, u16), Victim> = BTreeMap::new();
    for (k, s) in agg.top(usize::MAX).into_iter().map(|e| (e.key(), &e.value)) {
        let drops = s.counts.table_full + s.counts.insert_failed + s.counts.early_drop;
        if drops == 0 {
            continue;
        }
        let v = by
            .entry((k.proto.to_string(), k.port))
            .or_insert_with(|| Victim {
                service: k.service(),
                proto: k.proto.to_string(),
                port: k.port,
                drops: 0,
                sources: 0,
                top_src: None,
            });
        v.drops += drops;
        v.sources += 1;
        // agg.top is ordered by count: the first source seen is the top one.
        if v.top_src.is_none() {
            v.top_src = k.src.map(|a| a.to_string());
        }
    }
    let mut v: Vec<Victim> = by.into_values().collect();
    v.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.service.cmp(&b.service)));
    v.truncate(top);
    v
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_timeouts() -> Timeouts {
    let p = "/proc/sys/net/netfilter/";
    Timeouts {
        udp: read_u64(&format!("{p}nf_conntrack_udp_timeout")),
        udp_stream: read_u64(&format!("{p}nf_conntrack_udp_timeout_stream")),
        tcp_syn_sent: read_u64(&format!("{p}nf_conntrack_tcp_timeout_syn_sent")),
    }
}

fn status_of(
    r: &NsReport,
    kernel: &CtStats,
    opts_fill: f64,
    within_s: f64,
) -> (Status, Vec<String>) {
    let mut why = Vec::new();
    let mut st = Status::Healthy;
    if kernel.drop > 0 {
        st = Status::Dropping;
        why.push(format!(
            "{} packets dropped in the window (table_full {}, insert_failed {})",
            kernel.drop, r.failures.table_full, r.failures.insert_failed
        ));
    }
    let mut risk = |s: String| {
        why.push(s);
        if st < Status::AtRisk {
            st = Status::AtRisk;
        }
    };
    if r.max > 0 && r.fill_percent >= opts_fill {
        risk(format!("fill {:.1} % ≥ {opts_fill:.0} %", r.fill_percent));
    }
    match (r.forecast.trend, r.forecast.eta_s) {
        (forecast::Trend::Full, _) => risk("at the limit (full now)".into()),
        (forecast::Trend::Filling, Some(e)) if e <= within_s => risk(format!(
            "full in ~{} (< {})",
            forecast::fmt_secs(e),
            forecast::fmt_secs(within_s)
        )),
        _ => {}
    }
    if kernel.early_drop > 0 {
        risk(format!("{} evictions (early_drop)", kernel.early_drop));
    }
    if kernel.insert_failed > 0 && kernel.drop == 0 {
        risk(format!("{} failed inserts", kernel.insert_failed));
    }
    (st, why)
}

impl NsAcc {
    fn report(&self, opts: &Options) -> (NsReport, CtStats) {
        let end = self.end_cols.as_ref();
        let kernel = match (self.start_cols.as_ref().map(stats_of), end.map(stats_of)) {
            // A counter that went backwards (another namespace reusing the
            // inode) is no delta at all.
            (Some(s), Some(e)) => e.delta(&s).unwrap_or_default(),
            _ => CtStats::default(),
        };
        let counters = end
            .map(|e| counters(self.start_cols.as_ref(), e))
            .unwrap_or_default();
        let f = self.last_fill;
        let mut r = NsReport {
            netns: self.info.name.clone(),
            inode: self.info.inode,
            exec_prefix: self.info.place.prefix(),
            entries: f.count,
            max: f.max,
            buckets: f.buckets,
            fill_percent: f.percent(),
            peak: self.est.peak().max(f.count),
            forecast: self.est.forecast(),
            status: Status::Healthy,
            reasons: Vec::new(),
            failures: kinds_from_stats(&kernel),
            counters,
            holders: None,
            holders_unavailable: None,
            victims: victims(&self.agg, opts.top),
            timeouts: Timeouts {
                udp: None,
                udp_stream: None,
                tcp_syn_sent: None,
            },
        };
        let (st, why) = status_of(
            &r,
            &kernel,
            opts.at_risk_fill,
            opts.at_risk_within.as_secs_f64(),
        );
        r.status = st;
        r.reasons = why;
        (r, kernel)
    }
}

fn unix_now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn settings(opts: &Options, cfg: &forecast::Config) -> Settings {
    Settings {
        at_risk_fill_percent: opts.at_risk_fill,
        at_risk_within_s: opts.at_risk_within.as_secs_f64(),
        sample_interval_s: opts.interval.as_secs_f64(),
        forecast_window_s: cfg.window_s,
        forecast_min_samples: cfg.min_samples,
    }
}

fn memory_report(btf_path: &std::path::Path, max: u64, buckets: u64) -> MemoryReport {
    let btf = KernelBtf::load(btf_path).ok();
    let cost = memory::measure(btf.as_ref());
    let ram = memory::ram_bytes().unwrap_or(0);
    MemoryReport {
        per_entry_bytes: cost.per_entry(),
        ram_bytes: ram,
        current_max: max,
        current_buckets: buckets,
        current_bytes: cost.table_bytes(max, buckets),
        budget_share: memory::RAM_BUDGET,
        cost,
        note: None,
    }
}

fn finish(
    mut d: Diagnosis,
    accs: &[NsAcc],
    kernels: Vec<(NsReport, CtStats)>,
    opts: &Options,
) -> Diagnosis {
    let facts: Vec<NsFacts<'_>> = kernels
        .iter()
        .zip(accs)
        .map(|((r, _), a)| NsFacts {
            name: &r.netns,
            place: a.info.place.clone(),
            entries: r.entries,
            max: r.max,
            buckets: r.buckets,
            peak: r.peak,
            duration_s: d.duration_s,
            drops: r.failures,
            victims: &r.victims,
            holders: r.holders.as_ref(),
            forecast: Some(&r.forecast),
            udp_timeout: r.timeouts.udp,
            tcp_syn_sent_timeout: r.timeouts.tcp_syn_sent,
            troubled: r.status != Status::Healthy,
        })
        .collect();
    d.advice = advice::select(
        &facts,
        &d.memory.cost,
        &advice::Settings {
            horizon_s: opts.at_risk_within.as_secs_f64(),
            ram: d.memory.ram_bytes,
        },
    );
    d.namespaces = kernels.into_iter().map(|(r, _)| r).collect();
    d.status = d
        .namespaces
        .iter()
        .map(|n| n.status)
        .max()
        .unwrap_or(Status::Healthy);
    d.exit_code = d.status.exit_code();
    d
}

/// Diagnoses the live host (or, with `opts.files`, a capture).
pub fn run(opts: &Options) -> Result<Diagnosis, TraceError> {
    if !opts.files.is_empty() {
        return from_capture(opts);
    }
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(TraceError::io("reading /proc/self/status"))?;
    crate::error::check_privileges(&status)?;
    let init_inode = netns::list()
        .values()
        .find(|i| i.name == "init")
        .map(|i| i.inode);
    let scope: Vec<NetnsInfo> = match &opts.netns {
        Some(spec) => vec![netns::resolve(spec)?],
        None => netns::list().into_values().collect(),
    };
    let fcfg = forecast::Config::default();
    let sample = |path: &std::path::Path| {
        netns::in_netns(path, || (kstats::read_fill(), kstats::read_columns().ok()))
            .ok()
            .and_then(|(f, c)| Some((f?, c)))
    };
    let mut accs: Vec<NsAcc> = scope
        .iter()
        .filter_map(|ns| {
            let (fill, cols) = sample(&ns.path)?;
            Some(NsAcc {
                info: NsInfoLite {
                    inode: ns.inode,
                    name: ns.name.clone(),
                    place: place_of(ns, init_inode),
                    path: ns.path.clone(),
                },
                est: Estimator::new(fcfg),
                last_fill: fill,
                start_cols: cols,
                end_cols: None,
                agg: Aggregator::new(DEFAULT_MAX_SOURCES),
            })
        })
        .collect();
    if accs.is_empty() {
        return Err(TraceError::Unsupported(
            "no namespace with conntrack to diagnose (is nf_conntrack loaded?)".into(),
        ));
    }
    let held = crate::netns::hold(&scope);
    let (mut tp, refused) = backend::open(opts.choice, &opts.backend, &held, &|| {})?;
    let mut ring = tp.take_ring()?;
    let chosen = tp.name();
    let mut warnings = Vec::new();
    let index: HashMap<u32, usize> = accs
        .iter()
        .enumerate()
        .map(|(i, a)| (a.info.inode, i))
        .collect();
    let mut decode_errors = 0u64;
    let mut drain = |ring: &mut Option<aya::maps::RingBuf<aya::maps::MapData>>,
                     accs: &mut [NsAcc]| {
        let Some(ring) = ring.as_mut() else { return };
        while let Some(item) = ring.next() {
            match Event::decode(&item) {
                Ok(e) => {
                    if let Some(i) = index.get(&e.netns) {
                        accs[*i].agg.record(&e);
                    }
                }
                Err(_) => decode_errors += 1,
            }
        }
    };
    // The window starts now that the programs are attached: the kernel's
    // counters, the events and the samples then cover the same time.
    for a in accs.iter_mut() {
        if let Some((_, cols)) = sample(&a.info.path) {
            a.start_cols = cols;
        }
    }
    let started = Instant::now();
    let t0 = monotonic_ns();
    let mut sampled_unix_ns;
    loop {
        // The samples' time (the forecast counts from the last one).
        sampled_unix_ns = unix_now_ns();
        let t_s = (monotonic_ns() - t0) as f64 / 1e9;
        for a in accs.iter_mut() {
            if let Some((fill, cols)) = sample(&a.info.path) {
                a.est.push(
                    Sample {
                        t_s,
                        entries: fill.count,
                        inserted: cols.as_ref().and_then(|c| c.sum("insert")),
                    },
                    fill.max,
                );
                a.last_fill = fill;
                a.end_cols = cols;
            }
        }
        drain(&mut ring, &mut accs);
        if started.elapsed() >= opts.duration {
            break;
        }
        std::thread::sleep(
            opts.interval
                .min(opts.duration.saturating_sub(started.elapsed())),
        );
    }
    tp.detach();
    drain(&mut ring, &mut accs);
    // The counters' window ends after the last event could happen.
    for a in accs.iter_mut() {
        if let Some((_, Some(cols))) = sample(&a.info.path) {
            a.end_cols = Some(cols);
        }
    }
    let bpf = tp.counters()?;
    if bpf.lost.total() > 0 {
        warnings.push(format!(
            "{} events lost in the ring buffer: victims are undercounted",
            bpf.lost.total()
        ));
    }
    if decode_errors > 0 {
        warnings.push(format!("{decode_errors} ring records could not be decoded"));
    }
    let duration_s = started.elapsed().as_secs_f64();
    let mut kernels = Vec::new();
    for a in &accs {
        let (mut r, k) = a.report(opts);
        match netns::in_netns(&a.info.path, || (table::read(), read_timeouts())) {
            Ok((holders, timeouts)) => {
                match holders {
                    Ok(h) => r.holders = Some(h),
                    Err(why) => r.holders_unavailable = Some(why),
                }
                r.timeouts = timeouts;
            }
            Err(e) => r.holders_unavailable = Some(format!("entering the namespace: {e}")),
        }
        kernels.push((r, k));
    }
    // Without --netns, show the namespaces that use conntrack.
    if opts.netns.is_none() {
        let keep: Vec<bool> = kernels
            .iter()
            .map(|(r, k)| r.peak > 0 || k.drop > 0 || k.early_drop > 0 || k.insert_failed > 0)
            .collect();
        if keep.iter().any(|k| *k) {
            let mut i = 0;
            accs.retain(|_| {
                i += 1;
                keep[i - 1]
            });
            let mut i = 0;
            kernels.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        } else {
            accs.truncate(1);
            kernels.truncate(1);
        }
    }
    let global = accs
        .iter()
        .find(|a| a.info.place == Place::Init)
        .or(accs.first())
        .map(|a| a.last_fill)
        .unwrap_or_default();
    let order = [
        crate::model::Name::Fexit,
        crate::model::Name::Tracepoint,
        crate::model::Name::Counters,
    ];
    let not_tried = match opts.choice {
        Choice::Auto => order
            .iter()
            .skip_while(|n| **n != chosen)
            .skip(1)
            .map(|n| n.as_str().to_owned())
            .collect(),
        _ => Vec::new(),
    };
    let d = Diagnosis {
        ty: "doctor",
        version: env!("CARGO_PKG_VERSION").into(),
        source: "live".into(),
        files: Vec::new(),
        hostname: crate::capture::hostname(),
        kernel_release: crate::capture::kernel_release(),
        backend: BackendReport {
            chosen: chosen.as_str().into(),
            hooks: tp.describe(),
            refused,
            not_tried,
            per_packet: tp.per_packet(),
        },
        duration_s,
        sampled_unix_ns,
        settings: settings(opts, &fcfg),
        status: Status::Healthy,
        exit_code: 0,
        namespaces: Vec::new(),
        memory: memory_report(&opts.backend.btf_path, global.max, global.buckets),
        advice: Vec::new(),
        warnings,
    };
    Ok(finish(d, &accs, kernels, opts))
}

/// Diagnoses a capture: the recorded header (fill at start, kernel
/// counters at start and end, backend choice) and events.
fn from_capture(opts: &Options) -> Result<Diagnosis, TraceError> {
    let usage = |e: crate::report::ReportError| TraceError::Usage(e.to_string());
    let header =
        crate::report::first_header(&opts.files).map_err(|e| TraceError::Usage(e.to_string()))?;
    let args = OfflineSpec {
        netns: opts.netns.clone(),
        ..Default::default()
    };
    let mut aggs: HashMap<u32, Aggregator> = HashMap::new();
    let report = crate::report::build(&opts.files, &args, opts.top, |e, _, matched| {
        if matched {
            aggs.entry(e.netns)
                .or_insert_with(|| Aggregator::new(DEFAULT_MAX_SOURCES))
                .record(e);
        }
    })
    .map_err(usage)?;
    let fcfg = forecast::Config::default();
    let kernel_end = report.capture.kernel_end.clone().unwrap_or_default();
    let mut accs = Vec::new();
    let mut kernels = Vec::new();
    for ns in &header.conntrack {
        if let Some(spec) = &opts.netns
            && *spec != ns.netns
            && *spec != ns.inode.to_string()
        {
            continue;
        }
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
        let mut est = Estimator::new(fcfg);
        est.push(
            Sample {
                t_s: 0.0,
                entries: ns.fill.count,
                inserted: None,
            },
            ns.fill.max,
        );
        let a = NsAcc {
            info: NsInfoLite {
                inode: ns.inode,
                name: ns.netns.clone(),
                place,
                path: PathBuf::new(),
            },
            est,
            last_fill: ns.fill,
            start_cols: None,
            end_cols: None,
            agg: aggs.remove(&ns.inode).unwrap_or_else(|| Aggregator::new(1)),
        };
        let (mut r, _) = a.report(opts);
        // The kernel's counters as recorded at start and end.
        let recorded = match (
            header.kernel_start.get(&ns.inode),
            kernel_end.get(&ns.inode),
        ) {
            (Some(s), Some(e)) => e.delta(s),
            _ => None,
        };
        let k = recorded.unwrap_or_else(|| {
            // No trailer: count the events instead.
            let t = a.agg.totals;
            CtStats {
                drop: t.table_full + t.insert_failed,
                early_drop: t.early_drop,
                insert_failed: t.insert_failed,
                ..Default::default()
            }
        });
        r.failures = kinds_from_stats(&k);
        let (st, why) = status_of(&r, &k, opts.at_risk_fill, opts.at_risk_within.as_secs_f64());
        r.status = st;
        r.reasons = why;
        r.holders_unavailable = Some("a capture does not record the table's entries".into());
        accs.push(a);
        kernels.push((r, k));
    }
    let mut warnings = report.warnings.clone();
    warnings.push("from a capture: the table size is recorded at the start only, so there is no forecast; the status is what happened during the capture".into());
    let global = accs.first().map(|a| a.last_fill).unwrap_or_default();
    let mut memory = memory_report(&opts.backend.btf_path, global.max, global.buckets);
    if header.hostname != crate::capture::hostname()
        || header.kernel_release != crate::capture::kernel_release()
    {
        memory.note = Some(format!(
            "entry size measured on this host ({}, {}), not the capture's ({}, {})",
            crate::capture::hostname(),
            crate::capture::kernel_release(),
            header.hostname,
            header.kernel_release
        ));
    }
    let d = Diagnosis {
        ty: "doctor",
        version: env!("CARGO_PKG_VERSION").into(),
        source: "capture".into(),
        files: opts.files.iter().map(|p| p.display().to_string()).collect(),
        hostname: header.hostname.clone(),
        kernel_release: header.kernel_release.clone(),
        backend: BackendReport {
            chosen: report.summary.backend.clone(),
            hooks: header.backend.clone(),
            refused: header.backend_refused.clone(),
            not_tried: Vec::new(),
            per_packet: header.per_packet,
        },
        duration_s: report.summary.duration_s,
        sampled_unix_ns: header
            .start_unix_ns
            .saturating_add((report.summary.duration_s.max(0.0) * 1e9) as u128),
        settings: settings(opts, &fcfg),
        status: Status::Healthy,
        exit_code: 0,
        namespaces: Vec::new(),
        memory,
        advice: Vec::new(),
        warnings,
    };
    Ok(finish(d, &accs, kernels, opts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(drop: u64, insert: u64) -> Columns {
        Columns {
            names: [
                "entries",
                "clashres",
                "chainlength",
                "insert",
                "insert_failed",
                "drop",
                "early_drop",
                "invalid",
                "search_restart",
            ]
            .map(String::from)
            .to_vec(),
            rows: vec![
                vec![64, 0, 0, insert / 2, 0, drop / 2, 0, 0, 0],
                vec![64, 0, 0, insert - insert / 2, 0, drop - drop / 2, 0, 0, 0],
            ],
        }
    }

    #[test]
    fn counters_show_per_cpu_deltas_with_meaning() {
        let c = counters(Some(&cols(10, 100)), &cols(960, 164));
        let drop = c.iter().find(|c| c.name == "drop").unwrap();
        assert_eq!((drop.total, drop.delta), (960, 950));
        assert_eq!(drop.per_cpu_delta, [475, 475]);
        assert!(drop.meaning.contains("table full"));
        let chain = c.iter().find(|c| c.name == "chaintoolong").unwrap();
        assert_eq!(chain.column, "chainlength");
        assert_eq!(c.iter().find(|c| c.name == "insert").unwrap().delta, 64);
        assert_eq!(stats_of(&cols(960, 0)).drop, 960);
    }

    #[test]
    fn status_dropping_at_risk_healthy() {
        let mut est = Estimator::default();
        for i in 0..10 {
            est.push(
                Sample {
                    t_s: i as f64 * 0.5,
                    entries: 64,
                    inserted: None,
                },
                64,
            );
        }
        let mut r = NsReport {
            netns: "x".into(),
            inode: 1,
            exec_prefix: String::new(),
            entries: 64,
            max: 64,
            buckets: 1024,
            fill_percent: 100.0,
            peak: 64,
            forecast: est.forecast(),
            status: Status::Healthy,
            reasons: Vec::new(),
            failures: KindCounts::default(),
            counters: Vec::new(),
            holders: None,
            holders_unavailable: None,
            victims: Vec::new(),
            timeouts: Timeouts {
                udp: None,
                udp_stream: None,
                tcp_syn_sent: None,
            },
        };
        let dropping = CtStats {
            drop: 950,
            ..Default::default()
        };
        let (s, why) = status_of(&r, &dropping, 80.0, 600.0);
        assert_eq!(s, Status::Dropping);
        assert!(why[0].starts_with("950 packets dropped"), "{why:?}");
        assert!(why.iter().any(|w| w.contains("full now")));
        let (s, _) = status_of(&r, &CtStats::default(), 80.0, 600.0);
        assert_eq!(s, Status::AtRisk);
        r.entries = 10;
        r.fill_percent = 10.0 * 100.0 / 64.0;
        let mut est = Estimator::default();
        for i in 0..10 {
            est.push(
                Sample {
                    t_s: i as f64 * 0.5,
                    entries: 10,
                    inserted: None,
                },
                64,
            );
        }
        r.forecast = est.forecast();
        let (s, why) = status_of(&r, &CtStats::default(), 80.0, 600.0);
        assert_eq!((s, why.len()), (Status::Healthy, 0));
        assert_eq!(Status::Dropping.exit_code(), 7);
        assert_eq!(Status::AtRisk.exit_code(), 6);
    }

    #[test]
    fn victims_group_sources_by_service() {
        let mut a = Aggregator::new(100);
        let ev = |src: &str, dport: u16, kind| Event {
            kind,
            ts_ns: 1,
            cpu: 0,
            netns: 1,
            proto: crate::event::Proto::UDP,
            src: Some(src.parse().unwrap()),
            dst: Some("10.0.0.1".parse().unwrap()),
            sport: 4000,
            dport,
            reply: None,
            packet: Default::default(),
        };
        for _ in 0..5 {
            a.record(&ev("10.0.0.2", 53, crate::event::Kind::TableFull));
        }
        for _ in 0..3 {
            a.record(&ev("10.0.0.3", 53, crate::event::Kind::TableFull));
        }
        a.record(&ev("10.0.0.3", 123, crate::event::Kind::EarlyDrop));
        a.record(&ev("10.0.0.3", 9, crate::event::Kind::RuleDrop));
        let v = victims(&a, 5);
        assert_eq!(v.len(), 2, "rule drops are not victims: {v:?}");
        assert_eq!(
            (v[0].service.as_str(), v[0].drops, v[0].sources),
            ("udp/53", 8, 2)
        );
        assert_eq!(v[0].top_src.as_deref(), Some("10.0.0.2"));
    }

    #[test]
    fn from_a_capture_uses_its_header_and_events() {
        use crate::capture::{
            WriteOptions, Writer,
            format::{NsFill, tests::sample_event},
            tests::{TempDir, header, trailer},
        };
        let dir = TempDir::new("doctor");
        let path = dir.0.join("dns.ctt");
        let mut h = header();
        let ino = 4026532000;
        h.conntrack = vec![NsFill {
            netns: "srv".into(),
            inode: ino,
            fill: Fill {
                count: 64,
                max: 64,
                buckets: 1024,
            },
        }];
        h.kernel_start = BTreeMap::from([(ino, CtStats::default())]);
        let mut w = Writer::create(
            WriteOptions {
                path: path.clone(),
                force: false,
                max_size: None,
            },
            h,
        )
        .unwrap();
        // Every third event is in srv (sample_event spreads over 3 netns).
        let evs: Vec<Event> = (0..300).map(sample_event).collect();
        for e in &evs {
            w.event(e);
        }
        let mut t = trailer(&evs);
        let in_srv = |k: crate::event::Kind| {
            evs.iter().filter(|e| e.netns == ino && e.kind == k).count() as u64
        };
        t.kernel_end = BTreeMap::from([(
            ino,
            CtStats {
                drop: in_srv(crate::event::Kind::TableFull)
                    + in_srv(crate::event::Kind::InsertFailed),
                early_drop: in_srv(crate::event::Kind::EarlyDrop),
                insert_failed: in_srv(crate::event::Kind::InsertFailed),
                ..Default::default()
            },
        )]);
        w.finish(t).unwrap();
        let opts = Options {
            netns: None,
            duration: Duration::from_secs(1),
            interval: Duration::from_millis(250),
            choice: Choice::Auto,
            backend: backend::Options {
                btf_path: "/nonexistent".into(),
                btf_explicit: false,
                evictions: true,
                rule_drops: false,
                ring_bytes: 1 << 20,
                event_budget: 0,
            },
            at_risk_fill: 80.0,
            at_risk_within: Duration::from_secs(600),
            top: 5,
            files: vec![path],
        };
        let d = run(&opts).unwrap();
        assert_eq!(d.source, "capture");
        assert_eq!((d.status, d.exit_code), (Status::Dropping, 7));
        assert_eq!(d.namespaces.len(), 1);
        let n = &d.namespaces[0];
        assert_eq!((n.netns.as_str(), n.entries, n.max), ("srv", 64, 64));
        assert_eq!(n.victims[0].service, "udp/53");
        assert_eq!(n.forecast.trend, forecast::Trend::Unknown);
        assert!(n.holders_unavailable.is_some());
        let ids: Vec<&str> = d.advice.iter().map(|a| a.id.as_str()).collect();
        assert!(
            ids.contains(&"notrack") && ids.contains(&"raise_max"),
            "{ids:?}"
        );
        let notrack = d.advice.iter().find(|a| a.id == "notrack").unwrap();
        assert!(
            notrack.commands[0].starts_with("ip netns exec srv nft"),
            "{:?}",
            notrack.commands
        );
        assert!(d.memory.note.is_some(), "the capture is from another host");
        assert!(human::render(&d).contains("capture "));
    }
}
