//! Output formats. Each lives in its own file behind [`Sink`].

pub mod human;
pub mod ndjson;
pub mod pipe;
pub mod wire;

use crate::{
    analysis::aggregate::Aggregator,
    formats::text,
    kernel::kstats::{CtStats, Fill},
    model::event::Event,
    model::{AmpSummary, Finding, KindCounts, Refusal, Sampling, Scope, Summary, TopSource},
};

/// Known namespace names by inode (and the containers/pods behind them).
pub use crate::kernel::workload::NetnsNames;

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
    /// Drops the event budget shed so far: counted, never events.
    pub shed: KindCounts,
    /// The programs were sampling during the last interval (None: every
    /// drop was an event).
    pub sampling: Option<Sampling>,
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
    /// Time to full / relief ([`crate::analysis::forecast`]); None until sampled.
    pub forecast: Option<crate::analysis::forecast::Forecast>,
    /// The kernel's counters now (None: unreadable).
    pub stats: Option<CtStats>,
}

pub trait Sink {
    fn event(&mut self, e: &Event, names: &NetnsNames) -> std::io::Result<()>;
    fn tick(&mut self, view: &LiveView<'_>) -> std::io::Result<()>;
    /// Whether [`Sink::tick`] shows the top sources: only then is the live
    /// view's exact top (a read and a sort of the programs' per-source
    /// map, tens of thousands of keys under a flood) worth making.
    fn shows_top(&self) -> bool {
        false
    }
    /// A source newly flagged, or whose counts grew since its last report.
    fn finding(&mut self, f: &Finding) -> std::io::Result<()>;
    /// A namespace's forecast changed materially since it was last
    /// reported (ndjson streams it; the human header shows it anyway).
    fn forecast(&mut self, _ns: &NsView) -> std::io::Result<()> {
        Ok(())
    }
    /// An interval's exact per-source counts, while the event budget is
    /// on (ndjson streams them; the human view shows the top anyway).
    fn counts(&mut self, _c: &crate::model::IntervalCounts) -> std::io::Result<()> {
        Ok(())
    }
    fn finish(&mut self, summary: &Summary) -> std::io::Result<()>;
}
