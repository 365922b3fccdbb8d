//! Typed views of what the tool prints as JSON: the ndjson stream, the
//! `doctor --format json` and `report --format json` documents, and the
//! agent's state lines on stderr. Written from README and kept apart from
//! the tool's own types on purpose: `deny_unknown_fields` on every struct
//! makes a schema change that README does not document fail the tests.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail, ensure};
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
    /// Drops the event stands for (1 unless `--event-budget` sampled).
    pub sample: u16,
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
    pub gc_evict: u64,
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

/// One source of a `counts` line.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceCount {
    pub netns: u64,
    pub kind: String,
    pub src: Option<String>,
    pub proto: String,
    pub port: u16,
    pub count: u64,
}

/// `{"type":"counts",...}`: an interval's exact per-source counts, while
/// the event budget is on.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CountsLine {
    #[serde(rename = "type")]
    pub ty: String,
    pub ts_ns: u64,
    pub sources: Vec<SourceCount>,
}

#[derive(Debug)]
pub struct Output {
    pub events: Vec<Event>,
    /// Finding lines of the stream, in order (not the summary's list).
    pub findings: Vec<Finding>,
    /// Forecast lines, in order.
    pub forecasts: Vec<ForecastLine>,
    /// Counts lines, in order.
    pub counts: Vec<CountsLine>,
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
        let mut counts = Vec::new();
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
                Some("counts") => counts
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
            counts,
            summary: summary.context("no summary line")?,
            text: text.to_owned(),
        })
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Event> {
        self.events.iter().filter(|e| e.kind == kind).collect()
    }
}

/// A backend's name (README "ndjson schema": `fexit`, `tracepoint` or
/// `counters`).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Fexit,
    Tracepoint,
    Counters,
}

/// `doctor --format json` (README "Doctor: forecast and remedy", JSON).
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Doctor {
    #[serde(rename = "type")]
    pub ty: DoctorType,
    pub version: String,
    pub source: DoctorSource,
    /// The captures read (empty when live).
    pub files: Vec<String>,
    pub hostname: String,
    pub kernel_release: String,
    pub backend: DoctorBackend,
    pub duration_s: f64,
    pub sampled_unix_ns: u128,
    pub settings: DoctorSettings,
    pub status: DoctorStatus,
    pub exit_code: i32,
    pub namespaces: Vec<DoctorNs>,
    pub memory: DoctorMemory,
    pub advice: Vec<Advice>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DoctorType {
    Doctor,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DoctorSource {
    Live,
    Capture,
}

/// Worst namespace wins; exit 0 / 6 / 7.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum DoctorStatus {
    Healthy,
    AtRisk,
    Dropping,
}

#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DoctorBackend {
    pub chosen: Backend,
    pub hooks: String,
    pub refused: Vec<Refusal>,
    pub not_tried: Vec<Backend>,
    pub per_packet: bool,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DoctorSettings {
    pub at_risk_fill_percent: f64,
    pub at_risk_within_s: f64,
    pub sample_interval_s: f64,
    pub forecast_window_s: f64,
    pub forecast_min_samples: usize,
}

/// `namespaces[]` of the doctor document.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DoctorNs {
    pub netns: String,
    pub inode: u32,
    pub exec_prefix: String,
    pub entries: u64,
    pub max: u64,
    pub buckets: u64,
    pub fill_percent: f64,
    pub peak: u64,
    pub forecast: Forecast,
    pub status: DoctorStatus,
    pub reasons: Vec<String>,
    pub failures: Kinds,
    pub counters: Vec<Counter>,
    pub holders: Option<Holders>,
    /// Why `holders` is null.
    #[serde(default)]
    pub holders_unavailable: Option<String>,
    pub victims: Vec<Victim>,
    pub timeouts: Timeouts,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Trend {
    Unknown,
    Full,
    Filling,
    Draining,
    Steady,
}

/// A namespace's `forecast` (the fields of a `forecast` line, less the
/// line's own).
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Forecast {
    pub trend: Trend,
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

/// One per-CPU counter of /proc/net/stat/nf_conntrack.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Counter {
    pub name: String,
    pub column: String,
    pub total: u64,
    pub delta: u64,
    pub per_cpu_delta: Vec<u64>,
    pub meaning: String,
}

/// What holds a namespace's table.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Holders {
    /// `netlink` or `/proc/net/nf_conntrack`.
    pub source: String,
    pub total: u64,
    pub groups: Vec<Group>,
    pub summary: String,
    pub udp_share: f64,
    pub udp_unassured_share: f64,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub proto: String,
    /// Null for protocols without ports (ICMP: the type).
    pub port: Option<u16>,
    pub state: String,
    pub count: u64,
    pub share: f64,
}

#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Victim {
    pub service: String,
    pub proto: String,
    pub port: u16,
    pub drops: u64,
    pub sources: u64,
    pub top_src: Option<String>,
}

#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub udp: Option<u64>,
    pub udp_stream: Option<u64>,
    pub tcp_syn_sent: Option<u64>,
}

/// The doctor's `memory`: the cost of an entry and of today's table.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DoctorMemory {
    pub object_bytes: u64,
    pub object_source: String,
    pub extension_bytes: u64,
    pub bucket_bytes: u64,
    pub per_entry_bytes: u64,
    pub ram_bytes: u64,
    pub current_max: u64,
    pub current_buckets: u64,
    pub current_bytes: u64,
    pub budget_share: f64,
    /// When the figures are not the diagnosed host's (a capture).
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AdviceId {
    Notrack,
    RaiseMax,
    UdpTimeouts,
}

/// `advice[]`, ranked.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Advice {
    pub id: AdviceId,
    pub rank: usize,
    pub netns: String,
    pub title: String,
    pub why: String,
    pub cost: String,
    pub risk: String,
    pub commands: Vec<String>,
    pub persist: Vec<Persist>,
    /// `raise_max` only.
    #[serde(default)]
    pub sizing: Option<Sizing>,
}

#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Persist {
    pub file: String,
    pub content: String,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sizing {
    pub max: u64,
    pub buckets: u64,
    pub bytes: u64,
    pub ram_share: f64,
    pub demand: u64,
    pub capped: bool,
}

impl Doctor {
    /// The whole of `doctor --format json`'s stdout.
    pub fn parse(text: &str) -> Result<Doctor> {
        serde_json::from_str(text).context("the doctor document against its typed view")
    }
}

/// `report --format json` (README "Record, report, export").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    #[serde(rename = "type")]
    pub ty: ReportType,
    pub capture: CaptureMeta,
    pub files: Vec<FileReport>,
    pub warnings: Vec<String>,
    pub filters: Vec<String>,
    /// The ndjson summary line, recomputed (`type` `summary`).
    pub summary: Summary,
    pub check: Check,
    pub timeline: Timeline,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReportType {
    Report,
}

/// The capture's header, as recorded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureMeta {
    pub format_version: u32,
    pub tool_version: String,
    pub hostname: String,
    pub kernel_release: String,
    pub backend: String,
    pub evictions: String,
    pub start_unix_ns: u128,
    pub start_mono_ns: u64,
    pub start_utc: String,
    pub capture_id: u64,
    pub recorded_filter: RecordedFilter,
    pub conntrack: Vec<NsFill>,
    /// Per namespace inode.
    pub kernel_start: BTreeMap<u32, Kernel>,
    /// Null without a trailer.
    pub kernel_end: Option<BTreeMap<u32, Kernel>>,
}

#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RecordedFilter {
    pub netns: Option<u32>,
    pub proto: Option<String>,
    pub port: Option<u16>,
    pub src: Option<String>,
}

/// A namespace's count/max/buckets at the capture's start.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NsFill {
    pub netns: String,
    pub inode: u32,
    pub count: u64,
    pub max: u64,
    pub buckets: u64,
}

#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileReport {
    pub path: String,
    pub seq: u32,
    pub bytes: u64,
    pub events: u64,
    /// `trailer`, `rotated`, or `cut short at offset N: why`.
    pub ended: String,
}

/// Did the capture hold everything the kernel counted?
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub trailer: bool,
    pub events_in_files: u64,
    pub events_written: Option<u64>,
    pub lost: u64,
    pub kernel_drop: Option<u64>,
    pub expected_drop: u64,
    pub kernel_early_drop: Option<u64>,
    pub early_drop_events: u64,
    pub all_captured: bool,
    pub verdict: String,
}

#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Timeline {
    pub bucket_s: u64,
    pub rows: Vec<TimelineRow>,
}

#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TimelineRow {
    pub t_s: u64,
    pub counts: Kinds,
}

impl Report {
    /// The whole of `report --format json`'s stdout; the nested summary
    /// and its findings carry their ndjson `type`s.
    pub fn parse(text: &str) -> Result<Report> {
        let r: Report =
            serde_json::from_str(text).context("the report document against its typed view")?;
        ensure!(r.summary.ty == "summary", "summary.type {:?}", r.summary.ty);
        for f in &r.summary.findings {
            ensure!(f.ty == "finding", "summary.findings[].type {:?}", f.ty);
        }
        Ok(r)
    }
}

/// `report --format json` checked against [`Report`], returned untyped
/// for the assertions that index it.
pub fn report_value(text: &str) -> Result<serde_json::Value> {
    Report::parse(text)?;
    Ok(serde_json::from_str(text)?)
}

/// `doctor --format json` checked against [`Doctor`], returned untyped.
pub fn doctor_value(text: &str) -> Result<serde_json::Value> {
    Doctor::parse(text)?;
    Ok(serde_json::from_str(text)?)
}

/// An agent log line: `{"type":"state","ts_unix_ms":...,"event":...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateLine {
    pub ts_unix_ms: u64,
    pub state: State,
}

/// The state changes of README "Agent", tagged by `event`;
/// `deny_unknown_fields` holds for every variant's fields.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum State {
    Started {
        version: String,
        /// The backend with its hooks (`tracepoint (tp_btf/...)`).
        backend: String,
        refused: Vec<String>,
        metrics_addr: String,
        namespaces: usize,
        uncovered: Vec<String>,
    },
    BackendFellBack {
        backend: Backend,
        refused: Vec<String>,
    },
    CapabilitiesDropped {
        kept: Vec<String>,
    },
    NetnsAdded {
        netns: String,
        inode: u32,
    },
    NetnsRemoved {
        netns: String,
        inode: u32,
    },
    TableHigh {
        netns: String,
        entries: u64,
        max: u64,
        fill_percent: f64,
    },
    TableNormal {
        netns: String,
        entries: u64,
        max: u64,
        fill_percent: f64,
    },
    DropsStarted {
        drops: u64,
    },
    DropsStopped {
        drops: u64,
        quiet_s: f64,
    },
    AmplificationOpened {
        src: String,
        service: String,
        factor: f64,
        message: String,
    },
    AmplificationClosed {
        src: String,
        service: String,
        attempts: u64,
    },
    IncidentStarted {
        dir: String,
        reason: String,
    },
    IncidentClosed {
        dir: String,
        files: usize,
    },
    AutopilotArmed {
        mode: AutopilotMode,
        horizon_s: f64,
        cooldown_s: f64,
        memory_budget_bytes: u64,
        memory_budget: String,
        max: u64,
    },
    AutopilotRaised(AutopilotRaise),
    AutopilotCapped(AutopilotRaise),
    AutopilotSkipped {
        netns: String,
        why: String,
        dry_run: bool,
    },
    Warning {
        message: String,
    },
    Stopping {
        signal: String,
    },
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AutopilotMode {
    DryRun,
    On,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AutopilotReason {
    TableFull,
    Forecast,
}

/// `autopilot_raised` / `autopilot_capped` (docs/agent.md "Autopilot").
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutopilotRaise {
    pub netns: String,
    pub reason: AutopilotReason,
    pub from: u64,
    pub to: u64,
    pub buckets_from: u64,
    pub buckets_to: u64,
    pub demand: f64,
    pub demand_why: String,
    pub forecast_eta_s: Option<f64>,
    pub memory_bytes: u64,
    pub memory: String,
    pub budget_bytes: u64,
    pub dry_run: bool,
}

impl StateLine {
    /// One line. `type` and `ts_unix_ms` are taken off first: serde's
    /// `flatten` would switch `deny_unknown_fields` off.
    pub fn parse(line: &str) -> Result<StateLine> {
        let mut m: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).context("not a JSON object")?;
        let ty = m.remove("type");
        ensure!(
            ty.as_ref().and_then(|t| t.as_str()) == Some("state"),
            "type {ty:?}, not \"state\""
        );
        let ts_unix_ms = m
            .remove("ts_unix_ms")
            .and_then(|t| t.as_u64())
            .context("no ts_unix_ms")?;
        let state = serde_json::from_value(serde_json::Value::Object(m))?;
        Ok(StateLine { ts_unix_ms, state })
    }
}

/// Every JSON line of the agent's stderr (the others are its human
/// lines: the backend chosen, ...) through [`StateLine`]. `complete`
/// false: a last line without its newline (a killed agent) is skipped.
pub fn state_lines(stderr: &str, complete: bool) -> Result<Vec<StateLine>> {
    let mut lines: Vec<&str> = stderr.split_inclusive('\n').collect();
    if !complete && lines.last().is_some_and(|l| !l.ends_with('\n')) {
        lines.pop();
    }
    lines
        .iter()
        .map(|l| l.trim_end_matches('\n'))
        .enumerate()
        .filter(|(_, l)| l.starts_with('{'))
        .map(|(i, l)| {
            StateLine::parse(l).with_context(|| format!("agent stderr line {}: {l}", i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// Adds `"extra": 1` at `path` (object keys) of `v`.
    fn with_extra(mut v: Value, path: &[&str]) -> String {
        let mut at = &mut v;
        for k in path {
            at = match at {
                Value::Array(a) => &mut a[0],
                o => &mut o[*k],
            };
            if let Value::Array(a) = at {
                at = &mut a[0];
            }
        }
        at.as_object_mut()
            .expect("an object")
            .insert("extra".into(), json!(1));
        v.to_string()
    }

    fn kinds() -> Value {
        json!({"table_full": 3, "early_drop": 0, "insert_failed": 0, "rule_drop": 0, "gc_evict": 0})
    }

    fn kernel() -> Value {
        json!({"drop": 3, "early_drop": 0, "insert_failed": 0, "clash_resolve": 0,
               "chaintoolong": 0, "invalid": 0})
    }

    fn doctor() -> Value {
        json!({
            "type": "doctor", "version": "0.1.0", "source": "live", "files": [],
            "hostname": "vm", "kernel_release": "6.18.0",
            "backend": {"chosen": "tracepoint", "hooks": "tp_btf/kfree_skb",
                        "refused": [{"backend": "fexit", "reason": "EPERM"}],
                        "not_tried": ["counters"], "per_packet": true},
            "duration_s": 3.0, "sampled_unix_ns": 1_764_000_000_000_000_000_u64,
            "settings": {"at_risk_fill_percent": 80.0, "at_risk_within_s": 600.0,
                         "sample_interval_s": 0.25, "forecast_window_s": 30.0,
                         "forecast_min_samples": 5},
            "status": "dropping", "exit_code": 7,
            "namespaces": [{
                "netns": "srv", "inode": 4026532453_u32, "exec_prefix": "ip netns exec srv ",
                "entries": 64, "max": 64, "buckets": 262144, "fill_percent": 100.0, "peak": 64,
                "forecast": {"trend": "full", "eta_s": 0.0, "eta_low_s": null, "eta_high_s": null,
                             "slope_per_s": 0.0, "slope_stderr": 0.0, "entries": 64.0, "max": 64,
                             "samples": 13, "span_s": 3.0, "insert_per_s": null,
                             "expire_per_s": null},
                "status": "dropping", "reasons": ["at the limit"], "failures": kinds(),
                "counters": [{"name": "drop", "column": "drop", "total": 9, "delta": 3,
                              "per_cpu_delta": [2, 1], "meaning": "packets dropped"}],
                "holders": {"source": "netlink", "total": 64,
                            "groups": [{"proto": "udp", "port": 53, "state": "replied",
                                        "count": 63, "share": 0.98},
                                       {"proto": "gre", "port": null, "state": "-",
                                        "count": 1, "share": 0.02}],
                            "summary": "98 % are UDP", "udp_share": 0.98,
                            "udp_unassured_share": 0.98},
                "victims": [{"service": "udp/53", "proto": "udp", "port": 53, "drops": 3,
                             "sources": 1, "top_src": "10.0.0.2"}],
                "timeouts": {"udp": 30, "udp_stream": 120, "tcp_syn_sent": null}
            }],
            "memory": {"object_bytes": 256, "object_source": "/proc/slabinfo",
                       "extension_bytes": 128, "bucket_bytes": 8, "per_entry_bytes": 392,
                       "ram_bytes": 1_u64 << 34, "current_max": 64, "current_buckets": 262144,
                       "current_bytes": 2_000_000, "budget_share": 0.05},
            "advice": [{"id": "raise_max", "rank": 1, "netns": "srv", "title": "raise",
                        "why": "full", "cost": "memory", "risk": "none",
                        "commands": ["sysctl -w net.netfilter.nf_conntrack_max=16384"],
                        "persist": [{"file": "/etc/sysctl.d/90-conntrack.conf",
                                     "content": "net.netfilter.nf_conntrack_max = 16384\n"}],
                        "sizing": {"max": 16384, "buckets": 262144, "bytes": 8_000_000,
                                   "ram_share": 0.0003, "demand": 9051, "capped": false}}],
            "warnings": []
        })
    }

    fn summary() -> Value {
        json!({
            "type": "summary", "version": "0.1.0", "backend": "tracepoint", "hooks": "tp",
            "backend_refused": [], "per_packet": true, "evictions": "on", "duration_s": 1.0,
            "start_unix_ns": 1_764_000_000_000_000_000_u64, "start_mono_ns": 5,
            "events": kinds(), "matched": kinds(), "lost": kinds(), "shed": kinds(), "observed": kinds(),
            "complete": true, "kernel": kernel(), "unclassified_drops": 0,
            "unmatched_drop_counts": 0,
            "scope": {"netns": "all", "netns_inode": null, "namespaces": 1, "uncovered": []},
            "decode_errors": 0, "top": [], "untracked_sources": 0, "sampled": false,
            "exact_sources": 0,
            "amplification": {"drops": 3, "retransmissions": 0, "retransmission_share": 0.0,
                              "window_s": 10.0, "threshold": 3.0, "min_retries": 3,
                              "flows_forgotten": 0, "untracked_drops": 0,
                              "memory_ceiling_bytes": 1000},
            "findings": []
        })
    }

    fn report() -> Value {
        json!({
            "type": "report",
            "capture": {"format_version": 2, "tool_version": "0.1.0", "hostname": "vm",
                        "kernel_release": "6.18.0", "backend": "tracepoint", "evictions": "on",
                        "start_unix_ns": 1_764_000_000_000_000_000_u64, "start_mono_ns": 5,
                        "start_utc": "2025-11-24T16:00:00.000Z", "capture_id": 7,
                        "recorded_filter": {"netns": null, "proto": "udp", "port": 53,
                                            "src": null},
                        "conntrack": [{"netns": "srv", "inode": 4026532453_u32, "count": 1,
                                       "max": 64, "buckets": 1024}],
                        "kernel_start": {"4026532453": kernel()},
                        "kernel_end": null},
            "files": [{"path": "a.ctt", "seq": 0, "bytes": 100, "events": 3,
                       "ended": "trailer"}],
            "warnings": [], "filters": [],
            "summary": summary(),
            "check": {"trailer": true, "events_in_files": 3, "events_written": 3, "lost": 0,
                      "kernel_drop": 3, "expected_drop": 3, "kernel_early_drop": 0,
                      "early_drop_events": 0, "all_captured": true, "verdict": "complete"},
            "timeline": {"bucket_s": 1, "rows": [{"t_s": 0, "counts": kinds()}]}
        })
    }

    #[test]
    fn the_doctor_view_holds_the_documented_document() {
        let d = Doctor::parse(&doctor().to_string()).expect("parses");
        assert_eq!(d.status, DoctorStatus::Dropping);
        assert_eq!(d.advice[0].id, AdviceId::RaiseMax);
        assert_eq!(
            d.namespaces[0].holders.as_ref().map(|h| h.groups[1].port),
            Some(None)
        );
        // `holders` null with `holders_unavailable`; a capture's `note`.
        let mut v = doctor();
        v["namespaces"][0]["holders"] = Value::Null;
        v["namespaces"][0]["holders_unavailable"] = json!("no ctnetlink");
        v["memory"]["note"] = json!("this host's entry size");
        v["source"] = json!("capture");
        Doctor::parse(&v.to_string()).expect("parses");
    }

    #[test]
    fn an_undocumented_doctor_field_fails() {
        for path in [
            &[][..],
            &["backend"],
            &["backend", "refused"],
            &["settings"],
            &["namespaces"],
            &["namespaces", "forecast"],
            &["namespaces", "counters"],
            &["namespaces", "holders"],
            &["namespaces", "holders", "groups"],
            &["namespaces", "victims"],
            &["namespaces", "timeouts"],
            &["namespaces", "failures"],
            &["memory"],
            &["advice"],
            &["advice", "persist"],
            &["advice", "sizing"],
        ] {
            assert!(
                Doctor::parse(&with_extra(doctor(), path)).is_err(),
                "extra field at {path:?} accepted"
            );
        }
        let mut v = doctor();
        v["type"] = json!("report");
        assert!(Doctor::parse(&v.to_string()).is_err(), "another type");
        v = doctor();
        v["status"] = json!("unwell");
        assert!(Doctor::parse(&v.to_string()).is_err(), "an unknown status");
    }

    #[test]
    fn the_report_view_holds_the_documented_document() {
        let r = Report::parse(&report().to_string()).expect("parses");
        assert_eq!(r.capture.kernel_start[&4026532453].drop, 3);
        let mut v = report();
        v["capture"]["kernel_end"] = json!({"4026532453": kernel()});
        Report::parse(&v.to_string()).expect("parses");
        for path in [
            &[][..],
            &["capture"],
            &["capture", "recorded_filter"],
            &["capture", "conntrack"],
            &["capture", "kernel_start", "4026532453"],
            &["files"],
            &["summary"],
            &["summary", "scope"],
            &["check"],
            &["timeline"],
            &["timeline", "rows"],
            &["timeline", "rows", "counts"],
        ] {
            assert!(
                Report::parse(&with_extra(report(), path)).is_err(),
                "extra field at {path:?} accepted"
            );
        }
        v = report();
        v["summary"]["type"] = json!("report");
        assert!(
            Report::parse(&v.to_string()).is_err(),
            "summary keeps its type"
        );
    }

    #[test]
    fn agent_state_lines_are_typed_by_event() {
        let err = "backend tracepoint (tp_btf/kfree_skb)\n\
            {\"type\":\"state\",\"ts_unix_ms\":5,\"event\":\"drops_started\",\"drops\":3}\n\
            {\"type\":\"state\",\"ts_unix_ms\":6,\"event\":\"table_high\",\"netns\":\"srv\",\
             \"entries\":60,\"max\":64,\"fill_percent\":93.75}\n\
            {\"type\":\"state\",\"ts_unix_ms\":7,\"event\":\"stopping\",\"sig";
        let s = state_lines(err, false).expect("parses");
        assert_eq!(
            s[0],
            StateLine {
                ts_unix_ms: 5,
                state: State::DropsStarted { drops: 3 }
            }
        );
        assert!(matches!(s[1].state, State::TableHigh { max: 64, .. }));
        assert_eq!(s.len(), 2, "the cut last line of a killed agent is skipped");
        assert!(state_lines(err, true).is_err(), "but not when it exited");
        for bad in [
            r#"{"type":"state","ts_unix_ms":5,"event":"drops_started","drops":3,"extra":1}"#,
            r#"{"type":"state","ts_unix_ms":5,"event":"drops_begun","drops":3}"#,
            r#"{"type":"status","ts_unix_ms":5,"event":"drops_started","drops":3}"#,
            r#"{"type":"state","event":"drops_started","drops":3}"#,
            r#"{"type":"state","ts_unix_ms":5,"event":"backend_fell_back","backend":"kprobe","refused":[]}"#,
        ] {
            assert!(StateLine::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
