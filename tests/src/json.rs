//! Typed view of the ndjson stream. `deny_unknown_fields` makes a schema
//! change that README does not document fail the tests.

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Event {
    #[serde(rename = "type")]
    pub ty: String,
    pub kind: String,
    pub ts_ns: u64,
    pub cpu: u32,
    pub netns: u64,
    pub netns_name: Option<String>,
    /// The container / pod owning the namespace (issue 14).
    pub container: Option<Container>,
    pub pod: Option<Pod>,
    pub family: String,
    pub proto: String,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub icmp_id: Option<u16>,
    #[serde(default)]
    pub reply_src: Option<String>,
    #[serde(default)]
    pub reply_sport: Option<u16>,
    #[serde(default)]
    pub reply_dst: Option<String>,
    #[serde(default)]
    pub reply_dport: Option<u16>,
    #[serde(default)]
    pub nat: Option<String>,
}

/// `container` of an event (README "ndjson schema").
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Container {
    pub runtime: String,
    pub id: String,
    pub name: Option<String>,
    pub image: Option<String>,
    pub namespace: Option<String>,
    pub source: String,
}

/// `pod` of an event.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: String,
    pub containers: Vec<String>,
    pub source: String,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Kinds {
    pub table_full: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub rule_drop: u64,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub drop: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub clash_resolve: u64,
    pub chaintoolong: u64,
    pub invalid: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    pub netns: String,
    pub netns_inode: Option<u64>,
    pub namespaces: usize,
    /// Namespaces whose kernel counters are not in the sum, and why.
    pub uncovered: Vec<Uncovered>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uncovered {
    pub netns: String,
    pub inode: u64,
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopSource {
    pub src: Option<String>,
    pub proto: String,
    pub port: u16,
    pub service: String,
    pub counts: Kinds,
    pub total: u64,
    /// Present once the source table overflowed (Space-Saving estimate).
    #[serde(default)]
    pub error: Option<u64>,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    pub rate_per_s: f64,
    #[serde(default)]
    pub dnat: Option<String>,
}

/// A backend `--backend auto` passed over, and why.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub backend: String,
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    #[serde(rename = "type")]
    pub ty: String,
    pub version: String,
    pub backend: String,
    pub hooks: String,
    pub backend_refused: Vec<Refusal>,
    pub per_packet: bool,
    pub evictions: String,
    pub duration_s: f64,
    pub start_unix_ns: u128,
    pub start_mono_ns: u64,
    pub events: Kinds,
    pub matched: Kinds,
    pub lost: Kinds,
    pub shed: Kinds,
    pub observed: Kinds,
    pub complete: bool,
    pub kernel: Kernel,
    pub unclassified_drops: u64,
    pub unmatched_drop_counts: u64,
    pub scope: Scope,
    pub decode_errors: u64,
    pub top: Vec<TopSource>,
    /// Present when `top` is a Space-Saving estimate: ⌊N/m⌋.
    #[serde(default)]
    pub top_error_bound: Option<u64>,
    pub untracked_sources: u64,
    pub sampled: bool,
    pub exact_sources: u64,
    pub amplification: Amplification,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Amplification {
    pub drops: u64,
    pub retransmissions: u64,
    pub retransmission_share: f64,
    pub window_s: f64,
    pub threshold: f64,
    pub min_retries: u64,
    pub flows_forgotten: u64,
    pub untracked_drops: u64,
    pub memory_ceiling_bytes: u64,
}

/// `{"type":"finding",...}`, also the entries of `summary.findings`.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Finding {
    #[serde(rename = "type")]
    pub ty: String,
    pub finding: String,
    pub status: String,
    pub src: Option<String>,
    pub proto: String,
    pub port: u16,
    pub service: String,
    pub attempts: u64,
    pub flows: u64,
    pub retransmissions: u64,
    pub factor: f64,
    pub median_interval_s: Option<f64>,
    pub first_retry_s: Option<f64>,
    pub backoff: String,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    pub since: String,
    pub message: String,
}

/// `{"type":"forecast",...}`: a namespace's time to full or relief.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForecastLine {
    #[serde(rename = "type")]
    pub ty: String,
    pub ts_ns: u64,
    pub netns: u64,
    pub netns_name: String,
    pub count: u64,
    pub trend: String,
    pub eta_s: Option<f64>,
    pub eta_low_s: Option<f64>,
    pub eta_high_s: Option<f64>,
    pub slope_per_s: f64,
    pub slope_stderr: f64,
    pub entries: f64,
    pub max: u64,
    pub samples: usize,
    pub span_s: f64,
    pub insert_per_s: Option<f64>,
    pub expire_per_s: Option<f64>,
}

#[derive(Debug)]
pub struct Output {
    pub events: Vec<Event>,
    /// Finding lines of the stream, in order (not the summary's list).
    pub findings: Vec<Finding>,
    /// Forecast lines, in order.
    pub forecasts: Vec<ForecastLine>,
    pub summary: Summary,
    /// The stream as printed (for byte-for-byte comparisons).
    pub text: String,
}

impl Output {
    /// Events first, exactly one summary last.
    pub fn parse(text: &str) -> Result<Output> {
        let mut events = Vec::new();
        let mut findings = Vec::new();
        let mut forecasts = Vec::new();
        let mut summary = None;
        for (i, line) in text.lines().enumerate() {
            if summary.is_some() {
                bail!("line {}: output continues after the summary", i + 1);
            }
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("line {}", i + 1))?;
            match v["type"].as_str() {
                Some("event") => events
                    .push(serde_json::from_value(v).with_context(|| format!("line {}", i + 1))?),
                Some("finding") => findings
                    .push(serde_json::from_value(v).with_context(|| format!("line {}", i + 1))?),
                Some("forecast") => forecasts
                    .push(serde_json::from_value(v).with_context(|| format!("line {}", i + 1))?),
                Some("summary") => {
                    summary =
                        Some(serde_json::from_value(v).with_context(|| format!("line {}", i + 1))?)
                }
                other => bail!("line {}: unexpected type {other:?}", i + 1),
            }
        }
        Ok(Output {
            events,
            findings,
            forecasts,
            summary: summary.context("no summary line")?,
            text: text.to_owned(),
        })
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Event> {
        self.events.iter().filter(|e| e.kind == kind).collect()
    }
}
