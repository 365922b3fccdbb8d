//! Output formats. Each lives in its own file behind [`Sink`].

pub mod human;
pub mod ndjson;
pub mod pipe;
pub mod text;

use crate::{
    aggregate::Aggregator,
    event::Event,
    kstats::{CtStats, Fill},
    model::{
        AmpSummary, Finding, KindCounts, Refusal, Scope, SessionFacts, Summary, TopSource, Totals,
    },
    pipeline::Pipeline,
};

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

/// Exact per-source counts (the kernel's `SOURCE_COUNTS`, used when the
/// ring lost events and the event stream is only a sample), gathered one
/// map entry at a time: the map holds up to `SOURCE_COUNTS_MAX` keys, and
/// a list of them all next to this table was 12 MB more peak RSS at every
/// interval (issue 15).
#[derive(Default)]
pub struct ExactCounts {
    by: std::collections::BTreeMap<crate::sources::SourceKey, KindCounts>,
}

impl ExactCounts {
    /// Adds one map entry (the event carries its key), if selected.
    pub fn add(&mut self, e: &Event, count: u64) {
        let c = self.by.entry(crate::sources::SourceKey::of(e)).or_default();
        *c.get_mut(e.kind) = c.get(e.kind).saturating_add(count);
    }

    /// The top `n` sources: counts from the map, first/last time, rate
    /// and DNAT from the events that did arrive (`agg`). Also returns how
    /// many sources the counts hold.
    pub fn top(self, agg: &Aggregator, n: usize) -> (Vec<TopSource>, u64) {
        let sources = self.by.len() as u64;
        let mut v: Vec<_> = self.by.into_iter().collect();
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
