//! `doctor`: is the conntrack table healthy, when will it be full, what
//! holds it, and what to change — with the commands.
//!
//! Live, it opens the backend `trace` would ([`crate::kernel::backend::open`], the
//! same probe: the refusals are the ones `auto` met), samples every traced
//! namespace's count, limits and per-CPU counters for `--duration`, feeds
//! the [`crate::analysis::forecast`] estimator, attributes the failures to services
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
mod capture;
mod diagnosis;
pub mod human;
mod live;
pub mod memory;
pub mod table;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

pub use self::diagnosis::{
    BackendReport, COUNTERS, Counter, Diagnosis, Document, MemoryReport, NsReport, Settings,
    Status, Timeouts,
};
use self::diagnosis::{counters, stats_of};
use crate::{
    analysis::{
        aggregate::Aggregator,
        forecast::{self, Watcher},
    },
    kernel::{
        backend::{self, Choice, counters::kinds_from_stats},
        btf::KernelBtf,
        error::TraceError,
        kstats::{Columns, CtStats, Fill},
        netns::{self, NetnsInfo},
    },
    model::Name,
};
use advice::{NsFacts, Place, Victim};

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
/// Per-namespace accumulation while sampling or reading.
struct NsAcc {
    info: NsInfoLite,
    last_fill: Fill,
    start_cols: Option<Columns>,
    end_cols: Option<Columns>,
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
    if r.failures.gc_evict > 0 {
        // gc_worker() evicts only while a namespace is at ≥ 95 % of
        // nf_conntrack_max after an allocation failed: the table is full
        // and the GC is purging unassured entries (no kernel counter says so).
        risk(format!(
            "{} live entries evicted by the garbage collector (gc_evict): the table reached 95 % of nf_conntrack_max after an allocation failed, and the GC is purging unassured entries",
            r.failures.gc_evict
        ));
    }
    if kernel.insert_failed > 0 && kernel.drop == 0 {
        risk(format!("{} failed inserts", kernel.insert_failed));
    }
    (st, why)
}

impl NsAcc {
    /// The namespace's report: its forecast and peak from `forecasts`, its
    /// victims from `agg` (the events of the namespace).
    fn report(
        &self,
        opts: &Options,
        forecasts: &Watcher,
        agg: Option<&Aggregator>,
    ) -> (NsReport, CtStats) {
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
            peak: forecasts.peak(self.info.inode).max(f.count),
            forecast: forecasts.forecast(self.info.inode),
            status: Status::Healthy,
            reasons: Vec::new(),
            failures: crate::model::KindCounts {
                // Events only: no kernel counter counts the GC's evictions.
                gc_evict: agg.map_or(0, |a| a.totals.gc_evict),
                ..kinds_from_stats(&kernel)
            },
            counters,
            holders: None,
            holders_unavailable: None,
            victims: agg.map(|a| victims(a, opts.top)).unwrap_or_default(),
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
        return capture::diagnose(opts);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TraceError::io("starting the runtime"))?;
    rt.block_on(async {
        let mut session = live::Live::start(opts)?;
        session.sample().await?;
        session.finish()
    })
}

/// The backends `auto` would try after `chosen` (none with `--backend`).
fn not_tried(choice: Choice, chosen: Name) -> Vec<Name> {
    match choice {
        Choice::Auto => Name::AUTO_ORDER
            .into_iter()
            .skip_while(|n| *n != chosen)
            .skip(1)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analysis::{
            aggregate::Aggregator,
            forecast::{Estimator, Sample},
        },
        model::{KindCounts, event::Event},
    };

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
        // The GC's evictions (from events: no kernel counter) put the
        // namespace at risk and say why.
        r.failures.gc_evict = 51;
        let (s, why) = status_of(&r, &CtStats::default(), 80.0, 600.0);
        assert_eq!(s, Status::AtRisk);
        assert!(
            why[0].starts_with("51 live entries evicted by the garbage collector (gc_evict)")
                && why[0].contains("95 %"),
            "{why:?}"
        );
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
            proto: crate::model::event::Proto::UDP,
            src: Some(src.parse().unwrap()),
            dst: Some("10.0.0.1".parse().unwrap()),
            sport: 4000,
            dport,
            reply: None,
            packet: Default::default(),
            sample: 1,
        };
        for _ in 0..5 {
            a.record(&ev("10.0.0.2", 53, crate::model::event::Kind::TableFull));
        }
        for _ in 0..3 {
            a.record(&ev("10.0.0.3", 53, crate::model::event::Kind::TableFull));
        }
        a.record(&ev("10.0.0.3", 123, crate::model::event::Kind::EarlyDrop));
        a.record(&ev("10.0.0.3", 9, crate::model::event::Kind::RuleDrop));
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
        use crate::formats::capture::{
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
        let in_srv = |k: crate::model::event::Kind| {
            evs.iter().filter(|e| e.netns == ino && e.kind == k).count() as u64
        };
        t.kernel_end = BTreeMap::from([(
            ino,
            CtStats {
                drop: in_srv(crate::model::event::Kind::TableFull)
                    + in_srv(crate::model::event::Kind::InsertFailed),
                early_drop: in_srv(crate::model::event::Kind::EarlyDrop),
                insert_failed: in_srv(crate::model::event::Kind::InsertFailed),
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
                ring_wakeup: backend::RingWakeup::Adaptive,
                bpf_log: backend::bpflog::BpfLog::Off,
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
