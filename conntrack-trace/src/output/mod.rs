//! Output formats. Each lives in its own file behind [`Sink`].

pub mod human;
pub mod ndjson;
pub mod pipe;
pub mod text;

use serde::{Deserialize, Serialize};

use crate::{
    aggregate::{Aggregator, KindCounts},
    amplify::{AmpSummary, Finding},
    backend::Refusal,
    clock::Clock,
    event::Event,
    kstats::{CtStats, Fill},
    pipeline::Pipeline,
};

/// What a session established at start, said once and borrowed by the
/// stderr line, the live view, the capture header and the summary (no
/// string is split later to recover a part of it).
#[derive(Clone, Debug)]
pub struct SessionFacts {
    /// Tool version that ran the session.
    pub version: String,
    /// `fexit`, `tracepoint` or `counters` ([`crate::backend::Name::as_str`]).
    pub backend: String,
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
    pub observed: KindCounts,
    pub kernel: CtStats,
    pub unclassified_drops: u64,
    pub unmatched_drop_counts: u64,
    pub decode_errors: u64,
    /// Namespaces whose kernel counters are in `kernel`.
    pub namespaces: usize,
    pub uncovered: Vec<Uncovered>,
    /// `events + lost == observed` for every kind, and (offline) the
    /// capture holds all of it.
    pub complete: bool,
    /// See [`Summary::sampled`], [`Summary::exact_sources`].
    pub sampled: bool,
    pub exact_sources: u64,
}

impl Summary {
    /// The one way a summary is made, live and offline: the session's
    /// facts, the driver's totals, and the pipeline's analyses.
    pub fn assemble<S>(
        facts: &SessionFacts,
        duration_s: f64,
        t: Totals,
        top: Vec<TopSource>,
        pipe: &Pipeline<S>,
    ) -> Summary {
        Summary {
            kind: "summary",
            version: facts.version.clone(),
            backend: facts.backend.clone(),
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
                .then(|| pipe.agg.error_bound())
                .flatten(),
            top,
            untracked_sources: pipe.agg.untracked(),
            sampled: t.sampled,
            exact_sources: t.exact_sources,
            amplification: pipe.amp.summary(),
            findings: pipe.amp.findings(&facts.clock),
        }
    }
}

/// Known namespace names by inode (and the containers/pods behind them).
pub use crate::workload::NetnsNames;

/// What the live header shows at each interval.
pub struct LiveView<'a> {
    /// Backend and hooks.
    pub backend: &'a str,
    /// Backends `auto` tried first, and why they were refused.
    pub refused: &'a [Refusal],
    /// False for the counters backend: totals only, no sources.
    pub per_packet: bool,
    pub evictions: &'a str,
    pub elapsed_s: f64,
    /// The traced namespace(s) with conntrack, fullest first.
    pub fills: &'a [NsView],
    /// Failures per kind in each of the last intervals (oldest first),
    /// covering about the last 60 s: the header's sparkline.
    pub history: &'a [KindCounts],
    pub agg: &'a Aggregator,
    pub lost: KindCounts,
    /// Rule drops counted so far; None when the backend cannot see them
    /// (only the tracepoint backend hooks kfree_skb).
    pub rule_drops: Option<u64>,
    /// The kernel's counters since the start, summed over the namespaces
    /// shown (None: not read).
    pub kernel: Option<CtStats>,
    pub top_n: usize,
    /// The top sources from the programs' exact per-source counts, when
    /// the ring lost events (None: from the events).
    pub exact_top: Option<&'a [TopSource]>,
    /// Sources flagged for retransmission amplification, most drops first.
    pub findings: &'a [Finding],
    pub amp: &'a AmpSummary,
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

/// A namespace the kernel counters do not cover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uncovered {
    pub netns: String,
    pub inode: u32,
    pub reason: String,
}

impl Scope {
    /// One line about what the kernel counters leave out, if anything.
    pub fn uncovered_line(&self) -> Option<String> {
        let first = self.uncovered.first()?;
        // Names and reasons stay on this one line (see text::field).
        let mut names: Vec<std::borrow::Cow<'_, str>> = self
            .uncovered
            .iter()
            .take(3)
            .map(|u| text::field(&u.netns))
            .collect();
        let more = self.uncovered.len().saturating_sub(names.len());
        let extra = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        names.dedup();
        Some(format!(
            "kernel counters do not cover {} namespace(s) ({}{extra}): {}",
            self.uncovered.len(),
            names.join(", "),
            text::field(&first.reason)
        ))
    }
}

/// The last ndjson line, and the final human summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub version: String,
    /// `fexit`, `tracepoint` or `counters` (a [`crate::backend::Name`]).
    pub backend: String,
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
    /// The programs' exact counters (every kind, emitted or not); for the
    /// counters backend, the kernel's counters per kind.
    pub observed: KindCounts,
    /// `events + lost == observed` for every kind (always false for the
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
    pub findings: Vec<Finding>,
}

/// One namespace's table as the live view shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct NsView {
    pub inode: u32,
    pub name: String,
    pub fill: Fill,
    /// Time to full / relief ([`crate::forecast`]); None until sampled.
    pub forecast: Option<crate::forecast::Forecast>,
    /// The kernel's counters now (None: unreadable).
    pub stats: Option<CtStats>,
}

pub trait Sink {
    fn event(&mut self, e: &Event, names: &NetnsNames) -> std::io::Result<()>;
    fn tick(&mut self, view: &LiveView<'_>) -> std::io::Result<()>;
    /// A source newly flagged, or whose counts grew since its last report.
    fn finding(&mut self, f: &Finding) -> std::io::Result<()>;
    /// A namespace's forecast changed materially since it was last
    /// reported (ndjson streams it; the human header shows it anyway).
    fn forecast(&mut self, _ns: &NsView) -> std::io::Result<()> {
        Ok(())
    }
    fn finish(&mut self, summary: &Summary) -> std::io::Result<()>;
}

/// The top sources from exact per-source counts (the kernel's
/// `SOURCE_COUNTS`, used when the ring lost events and the event stream is
/// only a sample): counts from `exact` (those `select` keeps), first/last
/// time, rate and DNAT from the events that did arrive. Also returns how
/// many sources the counts hold.
pub fn top_sources_exact(
    agg: &Aggregator,
    exact: &[(Event, u64)],
    select: impl Fn(&Event) -> bool,
    n: usize,
) -> (Vec<TopSource>, u64) {
    let mut by: std::collections::BTreeMap<crate::aggregate::SourceKey, KindCounts> =
        std::collections::BTreeMap::new();
    for (e, count) in exact.iter().filter(|(e, _)| select(e)) {
        let c = by.entry(crate::aggregate::SourceKey::of(e)).or_default();
        *c.get_mut(e.kind) = c.get(e.kind).saturating_add(*count);
    }
    let sources = by.len() as u64;
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.total().cmp(&a.1.total()).then(a.0.cmp(&b.0)));
    let top = v
        .into_iter()
        .take(n)
        .map(|(k, counts)| {
            let seen = agg.source(&k);
            TopSource {
                src: k.src.map(|a| a.to_string()),
                proto: k.proto.to_string(),
                port: k.port,
                service: k.service(),
                total: counts.total(),
                error: None,
                counts,
                first_ts_ns: seen.map_or(0, |s| s.first_ns),
                last_ts_ns: seen.map_or(0, |s| s.last_ns),
                rate_per_s: seen.map_or(0.0, |s| s.rate),
                dnat: seen
                    .and_then(|s| s.dnat)
                    .map(|(a, p)| std::net::SocketAddr::new(a, p).to_string()),
            }
        })
        .collect();
    (top, sources)
}

/// The top sources from the events; with an `error` once the source table
/// overflowed.
pub fn top_sources(agg: &Aggregator, n: usize) -> Vec<TopSource> {
    let approximate = agg.error_bound().is_some();
    agg.top(n)
        .into_iter()
        .map(|e| (e.key(), &e.value, e.count(), e.error()))
        .map(|(k, s, count, error)| TopSource {
            src: k.src.map(|a| a.to_string()),
            proto: k.proto.to_string(),
            port: k.port,
            service: k.service(),
            total: count,
            error: approximate.then_some(error),
            counts: s.counts,
            first_ts_ns: s.first_ns,
            last_ts_ns: s.last_ns,
            rate_per_s: s.rate,
            dnat: s
                .dnat
                .map(|(a, p)| std::net::SocketAddr::new(a, p).to_string()),
        })
        .collect()
}
