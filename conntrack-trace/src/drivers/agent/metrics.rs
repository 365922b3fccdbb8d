//! What `/metrics` says: a snapshot the agent's loop updates once per tick,
//! encoded at scrape time by a prometheus-client [`Collector`] (no
//! hand-written exposition code).
//!
//! Counters are the pipeline's exact totals since the agent started (never
//! deltas), so `increase()` over any window is exact as long as the agent
//! runs; a restart is a counter reset, which Prometheus handles.
//!
//! With `--metrics-label-pod` every per-namespace series (and the
//! per-source ones, which are per namespace too) also carries the
//! namespace's workload as `pod_namespace`, `pod_name` and
//! `container_name` ([`WorkloadLabels`]), empty where there is none. They
//! add no series: a namespace has one workload, so they are a function of
//! the `netns` label. The names avoid `namespace`, `pod` and `container`,
//! which Kubernetes scrape configurations put on every series as *target*
//! labels (the agent's own pod); an exposed label of the same name would be
//! renamed `exported_pod` and so on.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use crate::{
    analysis::sources::SourceKey,
    kernel::kstats::{CtStats, Fill},
    kernel::workload::Workload,
    model::event::{Event, Kind},
    model::{KindCounts, Name},
};

/// Label of the series every source beyond the cap is summed into.
pub const OTHER: &str = "other";

/// Distinct folded series remembered to count them once each; beyond it
/// every event of a series not remembered counts as a new fold (an
/// over-count, never an under-count), so memory stays bounded.
const FOLDED_MEMORY: usize = 100_000;

/// One per-source series: (kind, netns inode, source).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub kind: Kind,
    pub netns: u32,
    pub source: SourceKey,
}

/// Drops per source with bounded cardinality: the first `cap` series seen
/// get their own counter and keep it (a counter that moved between series
/// would go backwards); every later series is summed into `src="other"` of
/// its kind and namespace, and counted once in `folded`.
///
/// First-come rather than top-N on purpose: a series that is demoted later
/// would vanish (its past drops leaving the sum) or jump into `other`.
/// `trace`/`report` and the flight recorder name every source; the metric
/// says *that* the cap was hit (`source_series_folded_total > 0`).
#[derive(Debug, Default)]
pub struct SeriesTable {
    cap: usize,
    kept: HashMap<SeriesKey, u64>,
    other: HashMap<(Kind, u32), u64>,
    folded_seen: HashSet<SeriesKey>,
    /// Distinct series summed into `other`.
    pub folded: u64,
}

impl SeriesTable {
    pub fn new(cap: usize) -> SeriesTable {
        SeriesTable {
            cap,
            ..SeriesTable::default()
        }
    }

    /// Takes the programs' exact per-source counts (cumulative since the
    /// programs loaded) instead of the events' once the events are a sample
    /// (lost or shed): every kept series gets its exact count, every other
    /// source is summed into its `other`. A count never goes down (a
    /// source the kernel's LRU map forgot keeps its last value), so the
    /// series stay Prometheus counters.
    pub fn set_exact(&mut self, exact: &HashMap<SeriesKey, u64>) {
        let mut other: HashMap<(Kind, u32), u64> = HashMap::new();
        for (key, n) in exact {
            if let Some(v) = self.kept.get_mut(key) {
                *v = (*v).max(*n);
            } else if self.kept.len() < self.cap {
                self.kept.insert(*key, *n);
            } else {
                *other.entry((key.kind, key.netns)).or_default() += n;
                if self.folded_seen.len() < FOLDED_MEMORY && self.folded_seen.insert(*key) {
                    self.folded += 1;
                }
            }
        }
        for (k, n) in other {
            let v = self.other.entry(k).or_default();
            *v = (*v).max(n);
        }
    }

    pub fn record(&mut self, e: &Event) {
        let key = SeriesKey {
            kind: e.kind,
            netns: e.netns,
            source: SourceKey::of(e),
        };
        if let Some(n) = self.kept.get_mut(&key) {
            *n += 1;
            return;
        }
        if self.kept.len() < self.cap {
            self.kept.insert(key, 1);
            return;
        }
        *self.other.entry((key.kind, key.netns)).or_default() += 1;
        if self.folded_seen.len() < FOLDED_MEMORY {
            if self.folded_seen.insert(key) {
                self.folded += 1;
            }
        } else if !self.folded_seen.contains(&key) {
            self.folded += 1;
        }
    }

    pub fn series(&self) -> usize {
        self.kept.len() + self.other.len()
    }
}

/// Per-namespace table state read from the kernel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NsState {
    pub fill: Fill,
    pub stats: Option<CtStats>,
    /// Seconds until full, when filling (0 when full now).
    pub eta_s: Option<f64>,
}

/// An open amplification finding.
#[derive(Clone, Debug, PartialEq)]
pub struct AmpGauge {
    pub src: String,
    pub proto: String,
    pub port: u16,
    pub factor: f64,
    /// Retransmissions / attempts of this source.
    pub retransmission_share: f64,
}

/// What `--metrics-label-pod` adds to a namespace's series.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadLabels {
    pub pod_namespace: String,
    pub pod_name: String,
    /// The container owning the namespace: Docker's name, else the
    /// Kubernetes container name, else the id. Empty for a pod's namespace,
    /// which all of its containers share.
    pub container_name: String,
}

impl WorkloadLabels {
    pub fn of(w: &Workload) -> WorkloadLabels {
        let pod = w.pod.as_ref();
        WorkloadLabels {
            pod_namespace: pod.and_then(|p| p.namespace.clone()).unwrap_or_default(),
            pod_name: pod.and_then(|p| p.name.clone()).unwrap_or_default(),
            container_name: w
                .container
                .as_ref()
                .filter(|_| pod.is_none())
                .map(|c| c.name.clone().unwrap_or_else(|| c.id.clone()))
                .unwrap_or_default(),
        }
    }
}

/// Everything `/metrics` shows; replaced field by field each tick.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: String,
    pub backend: Name,
    pub kernel: String,
    /// Whether per-packet events flow (not the counters backend).
    pub per_packet: bool,
    /// Events per (kind, netns name).
    pub drops: BTreeMap<(Kind, String), u64>,
    /// Counters backend: totals only.
    pub drops_total_only: KindCounts,
    pub lost: KindCounts,
    /// Drops beyond `--event-budget`: counted, not emitted.
    pub shed: KindCounts,
    pub decode_errors: u64,
    /// (kind, netns, src, proto, port) → drops.
    pub sources: Vec<([String; 5], u64)>,
    pub folded: u64,
    pub series_cap: usize,
    pub namespaces: BTreeMap<String, NsState>,
    /// `--metrics-label-pod`: per-namespace series carry the workload.
    pub label_pod: bool,
    /// Workload labels by netns name (the `netns` label's value); a
    /// namespace without an entry gets empty ones.
    pub workloads: BTreeMap<String, WorkloadLabels>,
    pub amp: Vec<AmpGauge>,
    pub findings_opened: u64,
    /// Autopilot decisions by action (`raised`, `capped`, `skipped`,
    /// `dry_run`); empty when `--autopilot off`.
    pub autopilot: BTreeMap<&'static str, u64>,
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub start_unix_s: f64,
}

impl Snapshot {
    /// `netns`, then (with `--metrics-label-pod`) the workload's labels.
    fn netns_labels<'a>(&'a self, netns: &'a str) -> Labels<'a> {
        let mut l = vec![("netns", netns)];
        if self.label_pod {
            let w = self.workloads.get(netns);
            l.extend([
                ("pod_namespace", w.map_or("", |w| w.pod_namespace.as_str())),
                ("pod_name", w.map_or("", |w| w.pod_name.as_str())),
                (
                    "container_name",
                    w.map_or("", |w| w.container_name.as_str()),
                ),
            ]);
        }
        l
    }

    /// Copies the source table into the snapshot, naming namespaces.
    pub fn set_sources(&mut self, t: &SeriesTable, name: impl Fn(u32) -> String) {
        self.sources.clear();
        for (k, n) in &t.kept {
            self.sources.push((
                [
                    k.kind.as_str().to_owned(),
                    name(k.netns),
                    k.source.src_string(),
                    k.source.proto.to_string(),
                    k.source.port.to_string(),
                ],
                *n,
            ));
        }
        for ((kind, ns), n) in &t.other {
            self.sources.push((
                [
                    kind.as_str().to_owned(),
                    name(*ns),
                    OTHER.to_owned(),
                    String::new(),
                    String::new(),
                ],
                *n,
            ));
        }
        self.sources.sort();
        self.folded = t.folded;
        self.series_cap = t.cap;
    }
}

/// The collector registered with the registry; shares the snapshot.
#[derive(Debug, Clone, Default)]
pub struct Metrics(pub Arc<Mutex<Snapshot>>);

/// A registry (prefix `conntrack_trace`) holding `m`.
pub fn registry(m: &Metrics) -> Registry {
    let mut r = Registry::with_prefix("conntrack_trace");
    r.register_collector(Box::new(m.clone()));
    r
}

/// Encodes the registry in the Prometheus text format (0.0.4).
pub fn encode(r: &Registry) -> Result<String, std::fmt::Error> {
    let mut s = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut s, r)?;
    Ok(s)
}

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn family<'a, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    ty: MetricType,
    rows: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, unit, ty)?;
    for (labels, v) in rows {
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge_f(v: f64) -> ConstGauge<f64> {
    ConstGauge::new(v)
}

fn gauge_i(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Collector for Metrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let guard = match self.0.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let s: &Snapshot = &guard;
        use MetricType::{Counter, Gauge};
        family(
            &mut enc,
            "info",
            "Build and runtime information (always 1).",
            None,
            Gauge,
            [(
                vec![
                    ("version", s.version.as_str()),
                    ("backend", s.backend.as_str()),
                    ("kernel", s.kernel.as_str()),
                ],
                gauge_i(1),
            )],
        )?;
        family(
            &mut enc,
            "start_time",
            "Unix time the agent started.",
            Some(&Unit::Seconds),
            Gauge,
            [(vec![], gauge_f(s.start_unix_s))],
        )?;
        if s.per_packet {
            // Every kind of every namespace that had one; a kind with none
            // yet is absent (sum(...) or vector(0) in queries).
            family(
                &mut enc,
                "drops",
                "Conntrack failures per kind and network namespace, from per-packet events.",
                None,
                Counter,
                s.drops.iter().map(|((k, ns), n)| {
                    let mut l = vec![("kind", k.as_str())];
                    l.extend(s.netns_labels(ns));
                    (l, counter(*n))
                }),
            )?;
        } else {
            family(
                &mut enc,
                "drops",
                "Conntrack failures per kind (counters backend: totals of every traced namespace, netns=\"all\").",
                None,
                Counter,
                Kind::ALL.iter().map(|k| {
                    let mut l = vec![("kind", k.as_str())];
                    l.extend(s.netns_labels("all"));
                    (l, counter(s.drops_total_only.get(*k)))
                }),
            )?;
        }
        family(
            &mut enc,
            "lost_events",
            "Events the kernel could not hand over (ring buffer full); counted in drops_total of no namespace.",
            None,
            Counter,
            Kind::ALL
                .iter()
                .map(|k| (vec![("kind", k.as_str())], counter(s.lost.get(*k)))),
        )?;
        family(
            &mut enc,
            "shed_events",
            "Drops beyond --event-budget: counted by the kernel, not emitted; counted in drops_total of no namespace.",
            None,
            Counter,
            Kind::ALL
                .iter()
                .map(|k| (vec![("kind", k.as_str())], counter(s.shed.get(*k)))),
        )?;
        family(
            &mut enc,
            "decode_errors",
            "Ring records that did not decode as events.",
            None,
            Counter,
            [(vec![], counter(s.decode_errors))],
        )?;
        family(
            &mut enc,
            "source_drops",
            "Conntrack failures per source (address, protocol, destination port), at most --max-series series; the rest are summed into src=\"other\".",
            None,
            Counter,
            s.sources.iter().map(|(l, n)| {
                let mut labels = vec![("kind", l[0].as_str())];
                labels.extend(s.netns_labels(&l[1]));
                labels.extend([
                    ("src", l[2].as_str()),
                    ("proto", l[3].as_str()),
                    ("port", l[4].as_str()),
                ]);
                (labels, counter(*n))
            }),
        )?;
        family(
            &mut enc,
            "source_series_folded",
            "Distinct per-source series summed into src=\"other\" because --max-series was reached.",
            None,
            Counter,
            [(vec![], counter(s.folded))],
        )?;
        family(
            &mut enc,
            "source_series_max",
            "The cap on per-source series (--max-series).",
            None,
            Gauge,
            [(vec![], gauge_i(s.series_cap as u64))],
        )?;
        let ns = |f: &dyn Fn(&NsState) -> Option<u64>| {
            s.namespaces
                .iter()
                .filter_map(move |(name, st)| f(st).map(|v| (s.netns_labels(name), v)))
                .collect::<Vec<_>>()
        };
        family(
            &mut enc,
            "entries",
            "Conntrack entries in the namespace's table (nf_conntrack_count).",
            None,
            Gauge,
            ns(&|st| Some(st.fill.count))
                .into_iter()
                .map(|(l, v)| (l, gauge_i(v))),
        )?;
        family(
            &mut enc,
            "max_entries",
            "The table's limit (nf_conntrack_max).",
            None,
            Gauge,
            ns(&|st| Some(st.fill.max))
                .into_iter()
                .map(|(l, v)| (l, gauge_i(v))),
        )?;
        family(
            &mut enc,
            "buckets",
            "Hash buckets of the table (nf_conntrack_buckets).",
            None,
            Gauge,
            ns(&|st| Some(st.fill.buckets))
                .into_iter()
                .map(|(l, v)| (l, gauge_i(v))),
        )?;
        type KernelCounter = (&'static str, &'static str, fn(&CtStats) -> u64);
        let kernel: [KernelCounter; 6] = [
            (
                "kernel_drop",
                "Kernel counter `drop` (/proc/net/stat/nf_conntrack, summed over CPUs): packets dropped because no entry could be allocated or a clash was unresolvable.",
                |c| c.drop,
            ),
            (
                "kernel_early_drop",
                "Kernel counter `early_drop`: entries evicted to make room.",
                |c| c.early_drop,
            ),
            (
                "kernel_insert_failed",
                "Kernel counter `insert_failed`: confirm-time insertion failures.",
                |c| c.insert_failed,
            ),
            (
                "kernel_clash_resolve",
                "Kernel counter `clashres`: clashes resolved without a drop.",
                |c| c.clash_resolve,
            ),
            (
                "kernel_chaintoolong",
                "Kernel counter `chaintoolong`: hash chains over the limit.",
                |c| c.chaintoolong,
            ),
            (
                "kernel_invalid",
                "Kernel counter `invalid`: packets conntrack considered invalid.",
                |c| c.invalid,
            ),
        ];
        for (name, help, get) in kernel {
            family(
                &mut enc,
                name,
                help,
                None,
                Counter,
                ns(&|st| st.stats.as_ref().map(get))
                    .into_iter()
                    .map(|(l, v)| (l, counter(v))),
            )?;
        }
        family(
            &mut enc,
            "table_full_eta",
            "Forecast time until the table is full (linear fit over the last 30 s); 0 when full now, absent when not filling.",
            Some(&Unit::Seconds),
            Gauge,
            s.namespaces
                .iter()
                .filter_map(|(name, st)| st.eta_s.map(|e| (s.netns_labels(name), gauge_f(e)))),
        )?;
        let port_labels: Vec<String> = s.amp.iter().map(|a| a.port.to_string()).collect();
        fn amp_labels<'a>(port: &'a str, a: &'a AmpGauge) -> Labels<'a> {
            vec![
                ("src", a.src.as_str()),
                ("proto", a.proto.as_str()),
                ("port", port),
            ]
        }
        family(
            &mut enc,
            "amplification_factor",
            "Drops / distinct flows of a source flagged for retransmission amplification, while its finding is open.",
            None,
            Gauge,
            s.amp
                .iter()
                .zip(&port_labels)
                .map(|(a, p)| (amp_labels(p, a), gauge_f(a.factor))),
        )?;
        family(
            &mut enc,
            "amplification_retransmission_ratio",
            "Share of a flagged source's drops that were retransmissions (0..1), while its finding is open.",
            None,
            Gauge,
            s.amp
                .iter()
                .zip(&port_labels)
                .map(|(a, p)| (amp_labels(p, a), gauge_f(a.retransmission_share))),
        )?;
        family(
            &mut enc,
            "amplification_findings",
            "Amplification findings opened (a source newly flagged).",
            None,
            Counter,
            [(vec![], counter(s.findings_opened))],
        )?;
        family(
            &mut enc,
            "amplification_open",
            "Amplification findings open now (a flagged source dropped within the window).",
            None,
            Gauge,
            [(vec![], gauge_i(s.amp.len() as u64))],
        )?;
        family(
            &mut enc,
            "autopilot_actions",
            "Autopilot decisions (--autopilot dry-run|on), by action: raised, capped, skipped, dry_run.",
            None,
            Counter,
            s.autopilot
                .iter()
                .map(|(a, n)| (vec![("action", *a)], counter(*n))),
        )?;
        family(
            &mut enc,
            "process_cpu",
            "CPU time the agent used (user + system).",
            Some(&Unit::Seconds),
            Counter,
            [(vec![], ConstCounter::new(s.cpu_seconds))],
        )?;
        family(
            &mut enc,
            "process_resident_memory",
            "Resident memory of the agent.",
            Some(&Unit::Bytes),
            Gauge,
            [(vec![], gauge_i(s.rss_bytes))],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Packet, Proto};

    fn ev(src: &str, dport: u16) -> Event {
        Event {
            kind: Kind::TableFull,
            ts_ns: 1,
            cpu: 0,
            netns: 7,
            proto: Proto::UDP,
            src: Some(src.parse().unwrap()),
            dst: Some("10.0.0.53".parse().unwrap()),
            sport: 40000,
            dport,
            reply: None,
            packet: Packet::EMPTY,
            sample: 1,
        }
    }

    #[test]
    fn series_are_capped_and_sum_to_the_total() {
        let mut t = SeriesTable::new(3);
        for i in 0..1000u32 {
            let src = format!("10.1.{}.{}", i / 250, i % 250);
            t.record(&ev(&src, 53));
            t.record(&ev(&src, 53));
        }
        assert_eq!(t.kept.len(), 3);
        assert_eq!(t.series(), 4, "three sources and one `other`");
        assert_eq!(t.folded, 997);
        let sum: u64 = t.kept.values().sum::<u64>() + t.other.values().sum::<u64>();
        assert_eq!(sum, 2000, "nothing lost by folding");
        // A kept series keeps counting.
        t.record(&ev("10.1.0.0", 53));
        assert_eq!(
            t.kept[&SeriesKey {
                kind: Kind::TableFull,
                netns: 7,
                source: SourceKey::of(&ev("10.1.0.0", 53))
            }],
            3
        );
    }

    #[test]
    fn exposition_names_and_types() {
        let m = Metrics::default();
        {
            let mut s = m.0.lock().unwrap();
            s.version = "0.1.0".into();
            s.backend = Name::Fexit;
            s.kernel = "6.18.0".into();
            s.per_packet = true;
            s.drops.insert((Kind::TableFull, "ctt-srv".into()), 12);
            let mut t = SeriesTable::new(1);
            t.record(&ev("10.0.0.7", 53));
            t.record(&ev("10.0.0.8", 53));
            s.set_sources(&t, |i| format!("ns{i}"));
            s.namespaces.insert(
                "init".into(),
                NsState {
                    fill: Fill {
                        count: 90,
                        max: 100,
                        buckets: 64,
                    },
                    stats: Some(CtStats {
                        drop: 5,
                        ..CtStats::default()
                    }),
                    eta_s: Some(42.5),
                },
            );
        }
        let text = encode(&registry(&m)).unwrap();
        for line in [
            "# TYPE conntrack_trace_drops_total counter",
            "conntrack_trace_drops_total{kind=\"table_full\",netns=\"ctt-srv\"} 12",
            "conntrack_trace_info{version=\"0.1.0\",backend=\"fexit\",kernel=\"6.18.0\"} 1",
            "conntrack_trace_source_drops_total{kind=\"table_full\",netns=\"ns7\",src=\"10.0.0.7\",proto=\"udp\",port=\"53\"} 1",
            "conntrack_trace_source_drops_total{kind=\"table_full\",netns=\"ns7\",src=\"other\",proto=\"\",port=\"\"} 1",
            "conntrack_trace_source_series_folded_total 1",
            "conntrack_trace_entries{netns=\"init\"} 90",
            "conntrack_trace_max_entries{netns=\"init\"} 100",
            "conntrack_trace_kernel_drop_total{netns=\"init\"} 5",
            "conntrack_trace_table_full_eta_seconds{netns=\"init\"} 42.5",
            "# TYPE conntrack_trace_process_cpu_seconds_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        assert!(
            !text.contains("amplification_factor"),
            "absent when none is open"
        );
    }

    /// `--metrics-label-pod`: a namespace the resolver found to be a pod's
    /// gets `pod_namespace`/`pod_name`, a container's `container_name`,
    /// any other empty values; every per-namespace family carries them.
    #[test]
    fn pod_labels_come_from_the_resolved_workload() {
        use crate::kernel::workload::{Container, Pod, Runtime, Source};
        let pod = Workload {
            container: None,
            pod: Some(Pod {
                namespace: Some("prod".into()),
                name: Some("web-0".into()),
                uid: "7a4d6d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f".into(),
                containers: vec!["app".into()],
                source: Source::Api,
            }),
        };
        let container = Workload {
            container: Some(Container {
                runtime: Runtime::Docker,
                id: "bc476804eb2af2157d625626809925a1bfa429e356d96195f836ba4a4dc30f0d".into(),
                name: Some("web".into()),
                image: None,
                namespace: None,
                source: Source::Api,
            }),
            pod: None,
        };
        let by_id = Workload {
            container: Some(Container {
                runtime: Runtime::Containerd,
                id: "ctt1".into(),
                name: None,
                image: None,
                namespace: Some("default".into()),
                source: Source::Api,
            }),
            pod: None,
        };
        assert_eq!(WorkloadLabels::of(&by_id).container_name, "ctt1");
        let m = Metrics::default();
        {
            let mut s = m.0.lock().unwrap();
            s.per_packet = true;
            s.label_pod = true;
            s.workloads
                .insert("pod:prod/web-0".into(), WorkloadLabels::of(&pod));
            s.workloads
                .insert("docker:web".into(), WorkloadLabels::of(&container));
            s.drops
                .insert((Kind::TableFull, "pod:prod/web-0".into()), 3);
            s.drops.insert((Kind::TableFull, "init".into()), 1);
            let mut t = SeriesTable::new(10);
            t.record(&ev("10.0.0.7", 53));
            s.set_sources(&t, |_| "pod:prod/web-0".into());
            for ns in ["docker:web", "init"] {
                s.namespaces.insert(
                    ns.into(),
                    NsState {
                        fill: Fill {
                            count: 3,
                            max: 100,
                            buckets: 64,
                        },
                        stats: Some(CtStats::default()),
                        eta_s: None,
                    },
                );
            }
        }
        let text = encode(&registry(&m)).unwrap();
        const POD: &str =
            r#"netns="pod:prod/web-0",pod_namespace="prod",pod_name="web-0",container_name="""#;
        const WEB: &str = r#"netns="docker:web",pod_namespace="",pod_name="",container_name="web""#;
        const INIT: &str = r#"netns="init",pod_namespace="",pod_name="",container_name="""#;
        for line in [
            format!("conntrack_trace_drops_total{{kind=\"table_full\",{POD}}} 3"),
            format!("conntrack_trace_drops_total{{kind=\"table_full\",{INIT}}} 1"),
            format!(
                "conntrack_trace_source_drops_total{{kind=\"table_full\",{POD},src=\"10.0.0.7\",proto=\"udp\",port=\"53\"}} 1"
            ),
            format!("conntrack_trace_entries{{{WEB}}} 3"),
            format!("conntrack_trace_max_entries{{{WEB}}} 100"),
            format!("conntrack_trace_buckets{{{INIT}}} 64"),
            format!("conntrack_trace_kernel_drop_total{{{WEB}}} 0"),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        // Without the flag the labels are as before, workloads or not.
        m.0.lock().unwrap().label_pod = false;
        let text = encode(&registry(&m)).unwrap();
        assert!(!text.contains("pod_name"), "{text}");
        assert!(
            text.lines()
                .any(|l| l == r#"conntrack_trace_entries{netns="docker:web"} 3"#)
        );
    }
}
