//! Output formats. Each lives in its own file behind [`Sink`].

pub mod human;
pub mod ndjson;
pub mod pipe;
pub mod text;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    aggregate::{Aggregator, KindCounts},
    amplify::{AmpSummary, Finding},
    backend::Refusal,
    event::Event,
    kstats::{CtStats, Fill},
};

/// Known namespace names by inode.
pub type NetnsNames = BTreeMap<u32, String>;

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
    /// (namespace name, fill) for the traced namespace(s), fullest first.
    pub fills: &'a [(String, Fill)],
    pub agg: &'a Aggregator,
    pub lost: KindCounts,
    /// Rule drops counted so far; None when the backend cannot see them
    /// (only the tracepoint backend hooks kfree_skb).
    pub rule_drops: Option<u64>,
    pub top_n: usize,
    /// Sources flagged for retransmission amplification, most drops first.
    pub findings: &'a [Finding],
    pub amp: &'a AmpSummary,
}

/// One row of the top-sources table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TopSource {
    pub src: Option<String>,
    pub proto: String,
    /// Destination port (ICMP: type; other protocols: 0).
    pub port: u16,
    pub service: String,
    pub counts: KindCounts,
    pub total: u64,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    /// Events/s over the last completed interval.
    pub rate_per_s: f64,
    /// `ADDR:PORT` behind the service address when the source's entries
    /// were DNATed (the last seen); absent without DNAT.
    #[serde(skip_serializing_if = "Option::is_none")]
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
    /// Events whose source was not tracked (source table at its cap).
    pub untracked_sources: u64,
    /// Retransmission figures over the whole trace.
    pub amplification: AmpSummary,
    /// Every source flagged for amplification (status `final`).
    pub findings: Vec<Finding>,
}

pub trait Sink {
    fn event(&mut self, e: &Event, names: &NetnsNames) -> std::io::Result<()>;
    fn tick(&mut self, view: &LiveView<'_>) -> std::io::Result<()>;
    /// A source newly flagged, or whose counts grew since its last report.
    fn finding(&mut self, f: &Finding) -> std::io::Result<()>;
    fn finish(&mut self, summary: &Summary) -> std::io::Result<()>;
}

pub fn top_sources(agg: &Aggregator, n: usize) -> Vec<TopSource> {
    agg.top(n)
        .into_iter()
        .map(|(k, s)| TopSource {
            src: k.src.map(|a| a.to_string()),
            proto: k.proto.to_string(),
            port: k.port,
            service: k.service(),
            total: s.counts.total(),
            counts: s.counts,
            first_ts_ns: s.first_ns,
            last_ts_ns: s.last_ns,
            rate_per_s: s.rate,
            dnat: s.dnat.map(|(a, p)| std::net::SocketAddr::new(a, p).to_string()),
        })
        .collect()
}
