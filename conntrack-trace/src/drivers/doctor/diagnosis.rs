//! What a diagnosis says: the document `doctor --format json` prints and
//! `doctor`'s human view renders.

use serde::Serialize;

use super::{
    advice::{Advice, Victim},
    memory::EntryCost,
    table::Holders,
};
use crate::{
    analysis::forecast::Forecast,
    kernel::{
        error::exit,
        kstats::{Columns, CtStats},
    },
    model::{KindCounts, Name, Refusal},
};

/// `doctor --format json`: one document, tagged by `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Document<'a> {
    Doctor(&'a Diagnosis),
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

pub(super) fn counters(start: Option<&Columns>, end: &Columns) -> Vec<Counter> {
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

pub(super) fn stats_of(c: &Columns) -> CtStats {
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
    pub chosen: Name,
    pub hooks: String,
    pub refused: Vec<Refusal>,
    /// Backends after the chosen one, which auto does not try.
    pub not_tried: Vec<Name>,
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

/// The whole diagnosis: `--format json` prints it as [`Document::Doctor`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diagnosis {
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
