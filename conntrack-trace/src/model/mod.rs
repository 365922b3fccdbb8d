//! The value types every layer shares: what a session established, the
//! counts per kind, the summary and its parts, findings. They live below
//! everything that uses them — backends, the capture format, the pipeline,
//! the outputs — and depend only on the event model and the kernel's
//! counters. The ndjson schema built from them is
//! `crate::formats::output::wire`.

pub mod clock;
pub mod ct;
pub mod event;

use serde::{Deserialize, Serialize};

use self::{
    clock::Clock,
    ct::{CtStats, Uncovered},
    event::Kind,
};

/// A backend's name, as printed and in the ndjson summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Name {
    Fexit,
    Tracepoint,
    Counters,
    /// Read from a capture that names a backend this version does not
    /// know (a newer tool's, or a damaged file).
    #[default]
    #[serde(other)]
    Unknown,
}

impl Name {
    /// The order `--backend auto` tries them in (the first that loads and
    /// attaches wins; `counters` needs no BPF).
    pub const AUTO_ORDER: [Name; 3] = [Name::Fexit, Name::Tracepoint, Name::Counters];

    pub fn as_str(self) -> &'static str {
        match self {
            Name::Fexit => "fexit",
            Name::Tracepoint => "tracepoint",
            Name::Counters => "counters",
            Name::Unknown => "unknown",
        }
    }

    /// The name `s` spells, or [`Name::Unknown`].
    pub fn parse(s: &str) -> Name {
        Name::AUTO_ORDER
            .into_iter()
            .find(|n| n.as_str() == s)
            .unwrap_or(Name::Unknown)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name::parse(s)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A backend `auto` tried and the kernel (or the machine) refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Refusal {
    pub backend: Name,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.backend.as_str(), self.reason)
    }
}

/// Per-kind counts, indexed by `Kind as usize` order of [`Kind::ALL`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindCounts {
    pub table_full: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub rule_drop: u64,
    /// Absent from documents written before the kind existed.
    #[serde(default)]
    pub gc_evict: u64,
}

impl KindCounts {
    pub fn get(&self, k: Kind) -> u64 {
        match k {
            Kind::TableFull => self.table_full,
            Kind::EarlyDrop => self.early_drop,
            Kind::InsertFailed => self.insert_failed,
            Kind::RuleDrop => self.rule_drop,
            Kind::GcEvict => self.gc_evict,
        }
    }
    pub fn get_mut(&mut self, k: Kind) -> &mut u64 {
        match k {
            Kind::TableFull => &mut self.table_full,
            Kind::EarlyDrop => &mut self.early_drop,
            Kind::InsertFailed => &mut self.insert_failed,
            Kind::RuleDrop => &mut self.rule_drop,
            Kind::GcEvict => &mut self.gc_evict,
        }
    }
    pub fn total(&self) -> u64 {
        Kind::ALL.iter().map(|k| self.get(*k)).sum()
    }
    pub fn sub(&self, o: &KindCounts) -> KindCounts {
        let mut r = KindCounts::default();
        for k in Kind::ALL {
            *r.get_mut(k) = self.get(k).saturating_sub(o.get(k));
        }
        r
    }
}

/// What a session established at start, said once and borrowed by the
/// stderr line, the live view, the capture header and the summary (no
/// string is split later to recover a part of it).
#[derive(Clone, Debug)]
pub struct SessionFacts {
    /// Tool version that ran the session.
    pub version: String,
    /// The backend that runs.
    pub backend: Name,
    /// The backend with its hooks, as in the live header.
    pub hooks: String,
    pub refused: Vec<Refusal>,
    pub per_packet: bool,
    pub evictions: String,
    pub clock: Clock,
    pub scope: Scope,
}

/// The counts a summary reports next to the pipeline's analyses: live,
/// from the programs' counters and the kernel's; offline, from the
/// capture's trailer.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub events: KindCounts,
    pub matched: KindCounts,
    pub lost: KindCounts,
    pub shed: KindCounts,
    pub observed: KindCounts,
    pub kernel: CtStats,
    pub unclassified_drops: u64,
    pub unmatched_drop_counts: u64,
    pub decode_errors: u64,
    /// Namespaces whose kernel counters are in `kernel`.
    pub namespaces: usize,
    pub uncovered: Vec<Uncovered>,
    /// `events + lost + shed == observed` for every kind, and (offline) the
    /// capture holds all of it.
    pub complete: bool,
    /// See [`Summary::sampled`], [`Summary::exact_sources`].
    pub sampled: bool,
    pub exact_sources: u64,
}

/// One row of the top-sources table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopSource {
    pub src: Option<String>,
    pub proto: String,
    /// Destination port (ICMP: type; other protocols: 0).
    pub port: u16,
    pub service: String,
    /// Events per kind (once the source table overflowed: since this
    /// source entered it; they sum to `total - error`).
    pub counts: KindCounts,
    /// Events from this source (with `error`: the Space-Saving estimate, an
    /// upper bound).
    pub total: u64,
    /// Present once the source table overflowed (the top is then a
    /// Space-Saving estimate): the true total lies in `[total - error,
    /// total]`. Absent while every count is exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<u64>,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    /// Events/s over the last completed interval.
    pub rate_per_s: f64,
    /// `ADDR:PORT` behind the service address when the source's entries
    /// were DNATed (the last seen); absent without DNAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dnat: Option<String>,
}

/// Scope of the kernel counters in a summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    /// `all` or the traced namespace's name.
    pub netns: String,
    /// Inode of the traced namespace (absent when tracing all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_inode: Option<u32>,
    /// Namespaces whose counters were summed.
    pub namespaces: usize,
    /// Namespaces of the scope whose counters are *not* in the sum, and
    /// why (e.g. no CAP_SYS_ADMIN to enter them): never a silent zero.
    #[serde(default)]
    pub uncovered: Vec<Uncovered>,
}

/// The last ndjson line, and the final human summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub version: String,
    /// `fexit`, `tracepoint` or `counters`.
    pub backend: Name,
    /// The backend's hooks, as in the live header.
    pub hooks: String,
    /// Backends `--backend auto` tried before this one, and why each was
    /// refused (empty when the first choice ran).
    pub backend_refused: Vec<Refusal>,
    /// False for the counters backend: no events, only the kernel's totals
    /// (in `observed`).
    pub per_packet: bool,
    pub evictions: String,
    pub duration_s: f64,
    /// Wall clock at start (Unix ns) and CLOCK_MONOTONIC at the same
    /// instant: `wall = start_unix_ns + (ts_ns - start_mono_ns)`.
    pub start_unix_ns: u128,
    pub start_mono_ns: u64,
    /// Events read from the ring, per kind (before filters).
    pub events: KindCounts,
    /// Events that passed the filters (what was printed).
    pub matched: KindCounts,
    /// Events the kernel could not put in the ring buffer.
    pub lost: KindCounts,
    /// Drops beyond the event budget (`--event-budget`): counted in
    /// `observed` and in the exact per-source counts, not emitted.
    pub shed: KindCounts,
    /// The programs' exact counters (every kind, emitted or not); for the
    /// counters backend, the kernel's counters per kind.
    pub observed: KindCounts,
    /// `events + lost + shed == observed` for every kind (always false for the
    /// counters backend, which has no events).
    pub complete: bool,
    /// Deltas of /proc/net/stat/nf_conntrack over the trace window.
    pub kernel: CtStats,
    /// Netfilter drops without a conntrack entry whose cause the programs
    /// could not establish (conntrack's counters of the packet's netns were
    /// unreadable): counted as `table_full`. 0 on a healthy host.
    pub unclassified_drops: u64,
    /// Increments of conntrack's per-CPU `drop` counter that no netfilter
    /// drop seen on that CPU accounted for (conntrack run outside the
    /// netfilter hooks, e.g. OVS or tc `ct`; a task migrated between the
    /// increment and the free). Each could have made one later rule drop
    /// on that CPU look like `table_full`; 0 means none did.
    pub unmatched_drop_counts: u64,
    pub scope: Scope,
    pub decode_errors: u64,
    pub top: Vec<TopSource>,
    /// Present when `top` is a Space-Saving estimate (more sources than the
    /// table holds): ⌊N/m⌋ for N matched events and m table entries, the
    /// bound of every row's `error`; any source with more events is in the
    /// table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_error_bound: Option<u64>,
    /// Events of sources that left the source table (replaced by others
    /// once it was full; their counts live on as those rows' `error`).
    pub untracked_sources: u64,
    /// Events were lost (the ring overflowed): the per-event analyses
    /// (amplification, first/last times) saw a sample, and `top`'s counts
    /// come from the programs' exact per-source counts instead.
    pub sampled: bool,
    /// Sources in those exact counts (0 when not sampled).
    pub exact_sources: u64,
    /// Retransmission figures over the whole trace.
    pub amplification: AmpSummary,
    /// Every source flagged for amplification (status `final`).
    #[serde(serialize_with = "tagged::findings")]
    pub findings: Vec<Finding>,
}

/// How the retries of a source are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// Successive retries of a flow about the same time apart (dig +timeout).
    Constant,
    /// Each retry about twice as long after the previous (TCP SYN: 1, 2, 4 s).
    Exponential,
    /// Neither pattern dominates.
    Irregular,
    /// No flow was retried twice yet, so there is no pair to compare.
    Unknown,
}

/// Where a finding stands in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingStatus {
    /// First flagged.
    New,
    /// Its counts grew since the last report.
    Update,
    /// In the summary.
    Final,
}

/// A flagged source. Also the ndjson line `{"type":"finding",...}`
/// ([`crate::formats::output::ndjson::Line::Finding`]).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    /// Always `amplification` (room for other findings).
    pub finding: &'static str,
    pub status: FindingStatus,
    pub src: Option<String>,
    pub proto: String,
    /// Destination port (ICMP: type).
    pub port: u16,
    pub service: String,
    /// Drops from this source.
    pub attempts: u64,
    /// Distinct flows among them (a flow seen again after the window counts
    /// again).
    pub flows: u64,
    /// Drops of a flow already dropped within the window.
    pub retransmissions: u64,
    /// attempts / flows.
    pub factor: f64,
    /// Median of the recent retry intervals (seconds).
    pub median_interval_s: Option<f64>,
    /// Median interval before a flow's first retry: the client's timer.
    pub first_retry_s: Option<f64>,
    pub backoff: Backoff,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    /// Wall clock of the first drop, RFC 3339 UTC.
    pub since: String,
    /// The one-line statement shown to people.
    pub message: String,
}

/// Global retransmission figures (the `amplification` object of the
/// summary).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AmpSummary {
    /// Dropped packets considered (table_full + insert_failed).
    pub drops: u64,
    pub retransmissions: u64,
    /// retransmissions / drops (0 when nothing was dropped).
    pub retransmission_share: f64,
    pub window_s: f64,
    pub threshold: f64,
    pub min_retries: u64,
    /// Live flows forgotten because their set was full (each can turn one
    /// later retransmission into a "new" flow).
    pub flows_forgotten: u64,
    /// Drops of sources whose state was reset when another source took over
    /// their entry (`max_sources` were held); 0 while it never overflowed.
    pub untracked_drops: u64,
    /// The detector's memory bound in bytes.
    pub memory_ceiling_bytes: usize,
}

/// What the per-event analyses concluded, for a summary
/// (`crate::analysis::pipeline::Pipeline::analyses`).
#[derive(Clone, Debug, Default)]
pub struct Analyses {
    /// The source table's error bound once it overflowed (None: exact).
    pub error_bound: Option<u64>,
    /// Sources the bounded table could not hold.
    pub untracked_sources: u64,
    pub amplification: AmpSummary,
    /// Every flagged source, final.
    pub findings: Vec<Finding>,
}

impl Summary {
    /// The one way a summary is made, live and offline: the session's
    /// facts, the driver's totals, and the pipeline's analyses.
    pub fn assemble(
        facts: &SessionFacts,
        duration_s: f64,
        t: Totals,
        top: Vec<TopSource>,
        a: Analyses,
    ) -> Summary {
        Summary {
            version: facts.version.clone(),
            backend: facts.backend,
            hooks: facts.hooks.clone(),
            backend_refused: facts.refused.clone(),
            per_packet: facts.per_packet,
            evictions: facts.evictions.clone(),
            duration_s,
            start_unix_ns: facts.clock.start_unix_ns,
            start_mono_ns: facts.clock.start_mono_ns,
            events: t.events,
            matched: t.matched,
            lost: t.lost,
            shed: t.shed,
            observed: t.observed,
            complete: t.complete,
            kernel: t.kernel,
            unclassified_drops: t.unclassified_drops,
            unmatched_drop_counts: t.unmatched_drop_counts,
            scope: Scope {
                namespaces: t.namespaces,
                uncovered: t.uncovered,
                ..facts.scope.clone()
            },
            decode_errors: t.decode_errors,
            top_error_bound: top
                .iter()
                .any(|t| t.error.is_some())
                .then_some(a.error_bound)
                .flatten(),
            top,
            untracked_sources: a.untracked_sources,
            sampled: t.sampled,
            exact_sources: t.exact_sources,
            amplification: a.amplification,
            findings: a.findings,
        }
    }
}

/// Sampling as the last interval saw it: about one flow in `denom` was
/// kept (the interval's drops over its events), under `budget` events/s
/// per CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub denom: u64,
    pub budget: u32,
}

impl Sampling {
    /// From the interval's drops seen, events emitted and drops shed
    /// (None when nothing was shed).
    pub fn of(seen: u64, emitted: u64, shed: u64, budget: u32) -> Option<Sampling> {
        (shed > 0).then(|| Sampling {
            denom: seen.div_ceil(emitted.max(1)),
            budget,
        })
    }
}

/// The programs' exact count of one source's drops of one kind over an
/// interval — events, shed and lost drops alike (`SOURCE_COUNTS`): what
/// the top sources come from once the events are a sample.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceCount {
    pub netns: u32,
    pub kind: Kind,
    pub src: Option<std::net::IpAddr>,
    pub proto: event::Proto,
    /// Destination port, ICMP type, or 0 (as in the top sources).
    pub port: u16,
    pub count: u64,
}

impl SourceCount {
    /// An event with this count's key (its packet empty), for the filters
    /// that select events (`--netns/--proto/--port/--src`, time windows).
    pub fn as_event(&self, ts_ns: u64) -> event::Event {
        event::Event {
            kind: self.kind,
            ts_ns,
            cpu: 0,
            netns: self.netns,
            proto: self.proto,
            src: self.src,
            dst: None,
            sport: 0,
            // SourceKey::of()'s port back in the event's field: ICMP keeps
            // its type in the high byte.
            dport: if self.proto.is_icmp() {
                self.port << 8
            } else {
                self.port
            },
            reply: None,
            packet: Default::default(),
            sample: 1,
        }
    }
}

/// One interval's exact per-source counts, written while the event budget
/// is on (ndjson `{"type":"counts",...}`, the capture's COUNTS record), so
/// that a reader of a sampled stream gets the live run's top sources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IntervalCounts {
    /// CLOCK_MONOTONIC ns when the counts were read: the interval ends.
    pub ts_ns: u64,
    /// Only sources whose count grew in the interval.
    pub sources: Vec<SourceCount>,
}

/// Values nested in a document are tagged by `type` as their own ndjson
/// lines are (`crate::formats::output::wire::Line`; the ndjson tests pin
/// both to the same bytes).
pub mod tagged {
    use serde::{Serialize, Serializer};

    use super::{Finding, Summary};

    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Tagged<'a> {
        Finding(&'a Finding),
        Summary(&'a Summary),
    }

    /// Findings nested in a summary.
    pub fn findings<S: Serializer>(v: &[Finding], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(Tagged::Finding))
    }

    /// A summary nested in a report.
    pub fn summary<S: Serializer>(v: &Summary, s: S) -> Result<S::Ok, S::Error> {
        Tagged::Summary(v).serialize(s)
    }
}

#[cfg(test)]
mod sampling_tests {
    use super::Sampling;

    #[test]
    fn sampling_is_the_intervals_drops_over_its_events() {
        assert_eq!(Sampling::of(1000, 1000, 0, 50), None, "nothing shed");
        let p = Sampling::of(10_000, 2_500, 7_500, 20_000).unwrap();
        assert_eq!((p.denom, p.budget), (4, 20_000));
        // Everything shed (the bucket empty): no division by zero.
        assert_eq!(Sampling::of(300, 0, 300, 50).unwrap().denom, 300);
    }
}

#[cfg(test)]
mod kind_counts_tests {
    use super::{Kind, KindCounts};

    #[test]
    fn kind_counts_written_before_gc_evict_read_as_zero() {
        let old: KindCounts = serde_json::from_str(
            r#"{"table_full":3,"early_drop":1,"insert_failed":0,"rule_drop":0}"#,
        )
        .unwrap();
        assert_eq!((old.table_full, old.gc_evict), (3, 0));
        let mut k = KindCounts::default();
        *k.get_mut(Kind::GcEvict) += 2;
        assert_eq!((k.gc_evict, k.total()), (2, 2));
    }
}
