//! Command line.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    analysis::{
        aggregate::DEFAULT_MAX_SOURCES,
        amplify::AmpConfig,
        filter::{Cidr, Filter},
    },
    drivers::agent::autopilot::{self, MemoryLimit},
    drivers::trace::TraceOptions,
    formats::capture::WriteOptions,
    kernel::{
        backend::{self, bpflog::BpfLog},
        btf::VMLINUX_BTF,
    },
    model::event::Proto,
};

#[derive(Debug, Parser)]
#[command(
    name = "conntrack-trace",
    version,
    about = "Who is netfilter conntrack dropping, and why"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace conntrack failures live (needs root or CAP_BPF+CAP_PERFMON).
    Trace(TraceArgs),
    /// Summarise a capture (`trace --write`): totals, top sources, timeline,
    /// metadata and the capture-vs-kernel counter check.
    Report(ReportArgs),
    /// Convert a capture to ndjson (the live schema) or pcapng.
    Export(ExportArgs),
    /// Diagnose the table: fill, forecast, what holds it, who is dropped,
    /// memory, and ranked advice with commands (exit 6 at risk, 7 dropping).
    Doctor(DoctorArgs),
    /// Run always-on: Prometheus metrics, JSON state changes on stderr, and
    /// an optional flight recorder (needs root or CAP_BPF+CAP_PERFMON).
    Agent(AgentArgs),
    /// Print the shell completion script for SHELL (bash, zsh, fish,
    /// elvish, powershell) on stdout.
    Completions {
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (conntrack-trace.1 and one per subcommand) into
    /// DIR; without DIR, print the main page on stdout.
    Man {
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `agent` (see docs/agent.md).
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub observe: BackendArgs,
    /// Events per second per CPU; beyond it events are sampled by flow and
    /// the rest only counted (0: every drop an event).
    #[arg(long, value_name = "N", default_value_t = backend::DEFAULT_AGENT_EVENT_BUDGET,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(conntrack_trace_common::MAX_EVENT_BUDGET)))]
    pub event_budget: u32,
    /// Serve /metrics, /healthz and /readyz here.
    #[arg(long, default_value = "127.0.0.1:9637", value_name = "ADDR:PORT")]
    pub metrics_addr: std::net::SocketAddr,
    /// Per-source series of conntrack_trace_source_drops_total; later
    /// sources are summed into src="other".
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_series: usize,
    /// How often the kernel is read and the metrics refreshed.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Drops count as stopped after this long without one.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub quiet: Duration,
    /// Flight recorder: keep a rolling capture and incident captures here.
    #[arg(long, value_name = "DIR")]
    pub record_dir: Option<PathBuf>,
    /// Bound on the rolling capture's files (e.g. 256M; at least 512k).
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "SIZE", requires = "record_dir")]
    pub record_max_size: u64,
    /// Delete rolling files older than this.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION", requires = "record_dir")]
    pub record_max_age: Option<Duration>,
    /// An incident capture keeps this long before the trigger...
    #[arg(long, default_value = "2m", value_parser = parse_duration, value_name = "DURATION")]
    pub incident_before: Duration,
    /// ... and this long after it.
    #[arg(long, default_value = "2m", value_parser = parse_duration, value_name = "DURATION")]
    pub incident_after: Duration,
    /// Incident captures kept (the oldest is removed first).
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub max_incidents: usize,
    /// Create this file once attached and serving (for scripts).
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Label per-namespace and per-source series with the namespace's pod
    /// (pod_namespace, pod_name) and container (container_name); empty
    /// where the namespace is not a pod's or a container's.
    #[arg(long)]
    pub metrics_label_pod: bool,
    /// TLS and basic authentication for the HTTP server, in Prometheus'
    /// exporter-toolkit format (tls_server_config, basic_auth_users).
    #[arg(long, value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,
    #[command(flatten)]
    pub amp: AmpArgs,
    #[command(flatten)]
    pub autopilot: AutopilotArgs,
}

/// `agent --autopilot`: raise nf_conntrack_max as `doctor` would advise.
#[derive(Debug, clap::Args)]
pub struct AutopilotArgs {
    /// Raise nf_conntrack_max (and the hash buckets) when a table drops
    /// packets because it is full, or will be within the horizon: off,
    /// dry-run (log what on would do, write nothing) or on.
    #[arg(long, value_enum, default_value = "off", value_name = "MODE")]
    pub autopilot: AutopilotMode,
    /// A table the forecast says is full within this long is raised now.
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub autopilot_horizon: Duration,
    /// Memory a full table may take at most: a share of RAM (2%) or a
    /// size (512MiB, 1G).
    #[arg(long, default_value = "2%", value_parser = parse_memory_limit, value_name = "SHARE|SIZE")]
    pub autopilot_memory: MemoryLimit,
    /// At most one change per this long.
    #[arg(long, default_value = "1m", value_parser = parse_duration, value_name = "DURATION")]
    pub autopilot_cooldown: Duration,
    /// Where nf_conntrack_max and nf_conntrack_buckets are: another mount
    /// of the initial namespace's /proc/sys/net/netfilter (a container's
    /// /proc/sys is read-only).
    #[arg(long, default_value = autopilot::SYSCTL_DIR, value_name = "DIR")]
    pub autopilot_sysctl_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AutopilotMode {
    Off,
    DryRun,
    On,
}

impl AutopilotArgs {
    pub fn options(&self) -> autopilot::Options {
        autopilot::Options {
            mode: match self.autopilot {
                AutopilotMode::Off => autopilot::Mode::Off,
                AutopilotMode::DryRun => autopilot::Mode::DryRun,
                AutopilotMode::On => autopilot::Mode::On,
            },
            horizon: self.autopilot_horizon,
            memory: self.autopilot_memory,
            cooldown: self.autopilot_cooldown,
            sysctl_dir: self.autopilot_sysctl_dir.clone(),
        }
    }
}

/// `--autopilot-memory`: `2%` (0 < share ≤ 100 %) or a size (`512MiB`,
/// `512M`, `1G`).
pub fn parse_memory_limit(s: &str) -> Result<MemoryLimit, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(v) if v > 0.0 && v <= 100.0 => Ok(MemoryLimit::Share(v / 100.0)),
            _ => Err(format!(
                "invalid share `{s}` (a percentage above 0 and at most 100, e.g. 2%)"
            )),
        };
    }
    let size = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    parse_size(size).map(MemoryLimit::Bytes).map_err(|_| {
        format!("invalid memory `{s}` (a share of RAM like 2%, or a size like 512MiB or 1G)")
    })
}

impl AgentArgs {
    /// The agent's settings, or a one-line usage error.
    pub fn options(&self) -> Result<crate::drivers::agent::AgentOptions, String> {
        const MIN_RECORD: u64 = 512 << 10;
        if self.record_dir.is_some() && self.record_max_size < MIN_RECORD {
            return Err(format!(
                "--record-max-size {} is below the minimum of {MIN_RECORD} bytes",
                self.record_max_size
            ));
        }
        if self.max_series == 0 {
            return Err("--max-series must be at least 1".into());
        }
        Ok(crate::drivers::agent::AgentOptions {
            choice: self.observe.backend.into(),
            backend: self.observe.options(false, self.event_budget),
            metrics_addr: self.metrics_addr,
            max_series: self.max_series,
            amp: self.amp.config()?,
            interval: self.interval,
            record: self.record_dir.as_ref().map(|dir| {
                crate::drivers::agent::recorder::RecordOptions {
                    dir: dir.clone(),
                    max_size: self.record_max_size,
                    max_age: self.record_max_age,
                    before: self.incident_before,
                    after: self.incident_after,
                    max_incidents: self.max_incidents.max(1),
                }
            }),
            ready_file: self.ready_file.clone(),
            quiet: self.quiet,
            label_pod: self.metrics_label_pod,
            autopilot: self.autopilot.options(),
            web_config: self.web_config_file.clone(),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DoctorFormat {
    Human,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Diagnose a capture (`trace --write`) instead of the live host.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Only this network namespace (live: name, path or inode; capture:
    /// recorded name or inode). Default: every namespace using conntrack.
    #[arg(long, value_name = "NAME|PATH|INODE")]
    pub netns: Option<String>,
    #[arg(long, value_enum, default_value = "human")]
    pub format: DoctorFormat,
    /// How long to sample the live host.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Time between samples of the entry count.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub observe: BackendArgs,
    /// At risk at or above this fill (percent).
    #[arg(long, default_value_t = 80.0, value_name = "PERCENT")]
    pub at_risk_fill: f64,
    /// At risk when the forecast says full sooner than this.
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub at_risk_within: Duration,
    /// Dropped services listed per namespace.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
}

impl DoctorArgs {
    /// The diagnosis's settings.
    pub fn options(&self) -> crate::drivers::doctor::Options {
        crate::drivers::doctor::Options {
            netns: self.netns.clone(),
            duration: self.duration,
            interval: self.interval,
            choice: self.observe.backend.into(),
            backend: self
                .observe
                .options(false, backend::DEFAULT_TRACE_EVENT_BUDGET),
            at_risk_fill: self.at_risk_fill,
            at_risk_within: self.at_risk_within,
            top: self.top,
            files: self.files.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Live header and top sources (default on a terminal).
    Human,
    /// One JSON object per line (default when stdout is not a terminal).
    Ndjson,
}

/// `--backend`: how conntrack is observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// fexit, else tracepoint, else counters (says why each was refused).
    Auto,
    /// fentry/fexit on conntrack's functions (exact; needs BPF trampolines).
    Fexit,
    /// BTF tracepoints kfree_skb and kmem_cache_free.
    Tracepoint,
    /// Poll the kernel's counters: totals only, no per-packet attribution.
    Counters,
}

impl From<BackendArg> for crate::kernel::backend::Choice {
    fn from(b: BackendArg) -> Self {
        use crate::kernel::backend::Choice;
        match b {
            BackendArg::Auto => Choice::Auto,
            BackendArg::Fexit => Choice::Fexit,
            BackendArg::Tracepoint => Choice::Tracepoint,
            BackendArg::Counters => Choice::Counters,
        }
    }
}

/// `--bpf-log`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BpfLogArg {
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RingWakeupArg {
    Adaptive,
    Poll,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub observe: BackendArgs,
    /// Events per second per CPU; beyond it events are sampled by flow and
    /// the rest only counted (0: every drop an event).
    #[arg(long, value_name = "N", default_value_t = backend::DEFAULT_TRACE_EVENT_BUDGET,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(conntrack_trace_common::MAX_EVENT_BUDGET)))]
    pub event_budget: u32,
    /// Stop after this long (e.g. 30s, 5m, 1h30m; a bare number is seconds).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Refresh interval of the live header (at least 10ms).
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Rows in the top-sources table.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Output format [default: human on a terminal, ndjson otherwise].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Only this network namespace: a name under /run/netns, a path to a
    /// netns handle, or an inode number. Default: all namespaces.
    #[arg(long, value_name = "NAME|PATH|INODE")]
    pub netns: Option<String>,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Create this file once every program is attached (for scripts).
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Also emit packets dropped by rules (not by conntrack), kind rule_drop.
    #[arg(long)]
    pub rule_drops: bool,
    #[command(flatten)]
    pub amp: AmpArgs,
    /// Also record every event (before filters) to this capture file,
    /// created with mode 0600, for `report` and `export`.
    #[arg(long, value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// Overwrite an existing capture file (and its rotated files).
    #[arg(long, requires = "write")]
    pub force: bool,
    /// Continue the capture in FILE.1, FILE.2, ... before a file would
    /// exceed this size (e.g. 100M; at least 64k).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "write")]
    pub max_size: Option<u64>,
}

impl TraceArgs {
    /// The trace's settings, or a one-line usage error (the output format
    /// is the caller's: it depends on the terminal).
    pub fn options(&self) -> Result<TraceOptions, String> {
        Ok(TraceOptions {
            duration: self.duration,
            interval: self.interval,
            top: self.top,
            netns: self.netns.clone(),
            filter: self.select.filter(),
            ready_file: self.ready_file.clone(),
            choice: self.observe.backend.into(),
            backend: self.observe.options(self.rule_drops, self.event_budget),
            max_sources: DEFAULT_MAX_SOURCES,
            amp: self.amp.config()?,
            write: self.write.clone().map(|path| WriteOptions {
                path,
                force: self.force,
                max_size: self.max_size,
            }),
        })
    }
}

/// How conntrack is observed: `trace`, `agent` and `doctor` alike.
#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// How to observe conntrack (see docs/backends.md).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// Kernel BTF to use instead of /sys/kernel/btf/vmlinux.
    #[arg(long, value_name = "FILE")]
    pub btf: Option<PathBuf>,
    /// Track evictions (early_drop).
    #[arg(long, value_enum, default_value = "on")]
    pub evictions: OnOff,
    /// How the programs wake the reader of the ring: `adaptive` (the
    /// kernel's: only a reader that had caught up is woken) or `poll` (no
    /// wakeups until the ring is half full; the reader polls every few ms).
    #[arg(long, value_enum, default_value = "adaptive")]
    pub ring_wakeup: RingWakeupArg,
    /// Ring buffer size in bytes (power of two, >= page size). Default:
    /// a quarter second of the event budget from every CPU (1–8 MiB), 8 MiB
    /// with `--event-budget 0`.
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_size: Option<u32>,
    /// The programs' own diagnostic log (aya-log), up to this level, as
    /// `bpf: LEVEL ...` lines on stderr (agent: `bpf_log` JSON lines):
    /// why a drop was not conntrack's, which step named a rare kind, what
    /// the programs were loaded with. Off costs nothing (see
    /// docs/backends.md).
    #[arg(long, value_enum, default_value = "off")]
    pub bpf_log: BpfLogArg,
}

impl BackendArgs {
    /// The backends' settings (`rule_drops`: `trace --rule-drops`;
    /// `event_budget`: the subcommand's `--event-budget`).
    pub fn options(&self, rule_drops: bool, event_budget: u32) -> backend::Options {
        backend::Options {
            btf_explicit: self.btf.is_some(),
            btf_path: self.btf.clone().unwrap_or_else(|| VMLINUX_BTF.into()),
            evictions: self.evictions == OnOff::On,
            rule_drops,
            ring_bytes: self.ring_size.unwrap_or_else(|| {
                let cpus = aya::util::nr_cpus().map_or(1, |n| n as u32);
                backend::default_ring_bytes(event_budget, cpus)
            }),
            event_budget,
            ring_wakeup: match self.ring_wakeup {
                RingWakeupArg::Adaptive => backend::RingWakeup::Adaptive,
                RingWakeupArg::Poll => backend::RingWakeup::Poll,
            },
            bpf_log: match self.bpf_log {
                BpfLogArg::Off => BpfLog::Off,
                BpfLogArg::Error => BpfLog::Error,
                BpfLogArg::Warn => BpfLog::Warn,
                BpfLogArg::Info => BpfLog::Info,
                BpfLogArg::Debug => BpfLog::Debug,
            },
        }
    }
}

/// Which packets: `trace` live, `report` and `export` from a capture.
#[derive(Debug, Default, clap::Args)]
pub struct SelectArgs {
    /// Only this L4 protocol (udp, tcp, icmp, icmpv6, sctp, or a number).
    #[arg(long, value_parser = parse_proto)]
    pub proto: Option<Proto>,
    /// Only packets with this source or destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only sources in this prefix (e.g. 10.0.0.0/8, fd00::/64).
    #[arg(long, value_name = "CIDR")]
    pub src: Option<Cidr>,
}

impl SelectArgs {
    /// As a filter (its namespace is set where it is resolved).
    pub fn filter(&self) -> Filter {
        Filter {
            netns: None,
            proto: self.proto,
            port: self.port,
            src: self.src,
        }
    }
}

/// Settings of the retransmission-amplification detector (`trace`,
/// `report`, `export`).
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct AmpArgs {
    /// Retransmission window: a drop of a flow already dropped this
    /// recently is a retransmission.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub amp_window: Duration,
    /// Flag a source when drops / distinct flows reaches this factor.
    #[arg(long, default_value_t = 2.0, value_name = "FACTOR")]
    pub amp_threshold: f64,
    /// ... and it has at least this many retransmissions.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub amp_min_retries: u64,
}

impl Default for AmpArgs {
    fn default() -> Self {
        let c = AmpConfig::default();
        AmpArgs {
            amp_window: c.window,
            amp_threshold: c.threshold,
            amp_min_retries: c.min_retries,
        }
    }
}

impl AmpArgs {
    /// The detector's configuration, or a one-line reason it is invalid.
    pub fn config(&self) -> Result<AmpConfig, String> {
        let c = AmpConfig {
            window: self.amp_window,
            threshold: self.amp_threshold,
            min_retries: self.amp_min_retries,
            ..AmpConfig::default()
        };
        c.validate().map(|()| c)
    }
}

pub use crate::analysis::filter::TimeSpec;

/// Filters of `report` and `export` (those of `trace`, plus a time window).
#[derive(Debug, Default, clap::Args)]
pub struct OfflineFilterArgs {
    /// Only this network namespace: its name as recorded, or its inode.
    #[arg(long, value_name = "NAME|INODE")]
    pub netns: Option<String>,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Only events at or after this time: an offset from the capture's
    /// start (90s, 5m), `@UNIX_SECONDS`, or UTC `YYYY-MM-DDTHH:MM:SS[.f]Z`.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<TimeSpec>,
    /// Only events before this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<TimeSpec>,
    /// Amplification settings for the offline analysis (as in `trace`).
    #[command(flatten)]
    pub amp: AmpArgs,
}

impl OfflineFilterArgs {
    /// The flags as plain values for the library (the amplification
    /// settings checked: a bad one is a usage error).
    pub fn spec(&self) -> Result<crate::drivers::offline::OfflineSpec, String> {
        Ok(crate::drivers::offline::OfflineSpec {
            netns: self.netns.clone(),
            select: self.select.filter(),
            since: self.since,
            until: self.until,
            amp: self.amp.config()?,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Human,
    Json,
    Markdown,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Capture file(s); the files of a rotated capture, in any order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "human")]
    pub format: ReportFormat,
    /// Also draw the timeline (drops per second by kind) as SVG here
    /// (created with mode 0600; never one of the inputs).
    #[arg(long, value_name = "OUT")]
    pub svg: Option<PathBuf>,
    /// Replace an existing --svg file (a regular file that is not a
    /// capture).
    #[arg(long, requires = "svg")]
    pub force: bool,
    /// Rows in the top-sources table.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[command(flatten)]
    pub filter: OfflineFilterArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// The live `--format ndjson` stream: events, then the summary.
    Ndjson,
    /// One packet per event that has packet bytes (raw IP), the drop kind
    /// in its comment (tshark, Wireshark).
    Pcapng,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Capture file(s); the files of a rotated capture, in any order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output file (mode 0600; never one of the inputs); `-` or absent:
    /// stdout.
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Replace an existing output file (a regular file that is not a
    /// capture).
    #[arg(long)]
    pub force: bool,
    /// Rows in the summary's top sources (ndjson).
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    #[command(flatten)]
    pub filter: OfflineFilterArgs,
}

/// Parses `64k`, `100M`, `2G` (powers of 1024) or a bare byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("invalid size `{s}` (examples: 65536, 64k, 100M, 2G)");
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (
            &t[..i],
            match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => return Err(err()),
            },
        ),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    n.checked_mul(mult).filter(|v| *v > 0).ok_or_else(err)
}

/// Parses `--since/--until`.
pub fn parse_time(s: &str) -> Result<TimeSpec, String> {
    let err = || {
        format!(
            "invalid time `{s}` (an offset such as 90s or 5m, @UNIX_SECONDS, or 2026-11-25T14:05:00Z)"
        )
    };
    let s = s.trim();
    if let Some(unix) = s.strip_prefix('@') {
        let secs: f64 = unix.parse().map_err(|_| err())?;
        if !secs.is_finite() || secs < 0.0 {
            return Err(err());
        }
        return Ok(TimeSpec::Unix((secs * 1e9) as u128));
    }
    match duration_value(s) {
        Ok(d) if d <= MAX_DURATION => return Ok(TimeSpec::Offset(d)),
        Err(DurationError::Range) | Ok(_) => return parse_duration(s).map(TimeSpec::Offset),
        Err(DurationError::Syntax) => {}
    }
    // YYYY-MM-DDTHH:MM:SS[.fraction][Z]
    let t = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = t.split_once(['T', ' ']).ok_or_else(err)?;
    let d: Vec<&str> = date.split('-').collect();
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let h: Vec<&str> = hms.split(':').collect();
    if d.len() != 3 || h.len() != 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let num = |x: &str, lo: u32, hi: u32| -> Result<u32, String> {
        let v: u32 = x.parse().map_err(|_| err())?;
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(err())
        }
    };
    let year = num(d[0], 1970, 9999)?;
    let (mon, day) = (num(d[1], 1, 12)?, num(d[2], 1, 31)?);
    let (hh, mm, ss) = (num(h[0], 0, 23)?, num(h[1], 0, 59)?, num(h[2], 0, 60)?);
    let mut frac_ns: u128 = 0;
    for (i, b) in frac.bytes().take(9).enumerate() {
        frac_ns += u128::from(b - b'0') * 10u128.pow(8 - i as u32);
    }
    let days = crate::model::clock::days_from_civil(year as i64, mon, day);
    let secs = days * 86_400 + i64::from(hh * 3600 + mm * 60 + ss);
    Ok(TimeSpec::Unix(secs as u128 * 1_000_000_000 + frac_ns))
}

/// Longest accepted duration (`--duration`, `--interval`, `--amp-window`,
/// `--since`/`--until` offsets): 3650 days. No trace runs longer, and every
/// sum of clock values stays far from overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86_400);
/// Shortest accepted duration: 1 ms.
pub const MIN_DURATION: Duration = Duration::from_millis(1);
/// Shortest `--interval`: each one redraws the header and hands the
/// capture to the disk (with fdatasync).
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

enum DurationError {
    Syntax,
    Range,
}

/// `s` as a duration, with checked arithmetic: a value too large for the
/// bounds is a range error, never an overflow.
fn duration_value(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(DurationError::Syntax);
    }
    let max = MAX_DURATION.as_secs_f64();
    let secs = |n: f64| -> Result<Duration, DurationError> {
        if !n.is_finite() || n < 0.0 {
            Err(DurationError::Syntax)
        } else if n > max {
            Err(DurationError::Range)
        } else {
            Ok(Duration::from_secs_f64(n))
        }
    };
    if let Ok(n) = s.parse::<f64>() {
        if n.is_nan() || n <= 0.0 {
            return Err(DurationError::Syntax);
        }
        return secs(n);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or(DurationError::Syntax)?;
        if num_end == 0 {
            return Err(DurationError::Syntax);
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| DurationError::Syntax)?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(DurationError::Syntax),
        };
        rest = &rest[unit_end..];
        total = total
            .checked_add(secs(n * mult)?)
            .filter(|t| *t <= MAX_DURATION)
            .ok_or(DurationError::Range)?;
    }
    if total.is_zero() {
        return Err(DurationError::Syntax);
    }
    Ok(total)
}

fn bounded_duration(s: &str, min: Duration) -> Result<Duration, String> {
    let range = || {
        format!(
            "duration `{}` is out of range ({} to {} days)",
            s.trim(),
            human_duration(min),
            MAX_DURATION.as_secs() / 86_400
        )
    };
    match duration_value(s) {
        Ok(d) if d >= min => Ok(d),
        Ok(_) | Err(DurationError::Range) => Err(range()),
        Err(DurationError::Syntax) => Err(format!(
            "invalid duration `{s}` (examples: 30s, 500ms, 5m, 1h30m)"
        )),
    }
}

fn human_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Parses `1h30m`, `5m`, `30s`, `250ms`, or a bare number of seconds,
/// between [`MIN_DURATION`] and [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    bounded_duration(s, MIN_DURATION)
}

/// `--interval`: a duration of at least [`MIN_INTERVAL`].
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    bounded_duration(s, MIN_INTERVAL)
}

/// One line of a clap error message (README: errors are one line): its
/// first paragraph, lines joined, without clap's own `error: ` prefix;
/// a `tip:` clap gives is kept.
pub fn one_line_error(rendered: &str) -> String {
    let mut paras = rendered.split("\n\n");
    let first = paras.next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let mut line = first
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    for p in paras {
        let p = p.trim();
        if let Some(tip) = p.strip_prefix("tip: ") {
            line.push_str("; tip: ");
            line.push_str(&tip.lines().map(str::trim).collect::<Vec<_>>().join(" "));
        }
    }
    line
}

fn parse_proto(s: &str) -> Result<Proto, String> {
    Proto::parse(s)
        .ok_or_else(|| format!("unknown protocol `{s}` (udp, tcp, icmp, icmpv6, sctp or a number)"))
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u64 = s.parse().map_err(|_| format!("invalid ring size `{s}`"))?;
    if !crate::kernel::backend::valid_ring_bytes(n) {
        return Err(format!(
            "ring size {n} must be a power of two between the page size and 1 GiB"
        ));
    }
    Ok(n as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn autopilot_memory_limits() {
        use super::{MemoryLimit, parse_memory_limit as p};
        assert_eq!(p("2%"), Ok(MemoryLimit::Share(0.02)));
        assert_eq!(p("512MiB"), Ok(MemoryLimit::Bytes(512 << 20)));
        assert_eq!(p("512M"), Ok(MemoryLimit::Bytes(512 << 20)));
        assert_eq!(p("1G"), Ok(MemoryLimit::Bytes(1 << 30)));
        assert_eq!(p("65536"), Ok(MemoryLimit::Bytes(65536)));
        for bad in ["0%", "101%", "x%", "", "12 parsecs", "0"] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["", "0", "-1", "5x", "s", "1h-", "nan", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    /// Issue 11 item 5: `--interval 1e-12` and `1e19`, durations of 1e20 s
    /// and sums that overflow panicked after attach; now each is a one-line
    /// range error.
    #[test]
    fn durations_are_bounded() {
        for bad in [
            "1e-12",
            "1e19",
            "1e20",
            "100000000000000000000s",
            "18446744073709551615s18446744073709551615s",
            "3651d",
            "87601h",
            "0.0001",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            if bad != "3651d" {
                assert!(e.contains("out of range (1ms to 3650 days)"), "{bad}: {e}");
            }
        }
        assert_eq!(parse_duration("87600h"), Ok(MAX_DURATION));
        assert_eq!(parse_duration("1ms"), Ok(MIN_DURATION));
        assert!(
            parse_interval("9ms")
                .unwrap_err()
                .contains("(10ms to 3650 days)")
        );
        assert_eq!(parse_interval("10ms"), Ok(MIN_INTERVAL));
        assert!(parse_time("1e20").is_err());
        assert!(
            parse_time("100000000000000000000s")
                .unwrap_err()
                .contains("out of range")
        );
        // What clap does with them: an error, never a panic.
        for flag in ["--interval", "--duration", "--amp-window"] {
            for v in ["1e-12", "1e19", "1e20s"] {
                assert!(
                    Cli::try_parse_from(["conntrack-trace", "trace", flag, v]).is_err(),
                    "{flag} {v}"
                );
            }
        }
    }

    #[test]
    fn clap_errors_are_one_line() {
        let e = Cli::try_parse_from(["conntrack-trace", "trace", "--interval", "1e19"])
            .unwrap_err()
            .render()
            .to_string();
        assert_eq!(
            one_line_error(&e),
            "invalid value '1e19' for '--interval <INTERVAL>': duration `1e19` is out of range (10ms to 3650 days)"
        );
        let e = Cli::try_parse_from(["conntrack-trace", "export", "f"])
            .unwrap_err()
            .render()
            .to_string();
        assert_eq!(
            one_line_error(&e),
            "the following required arguments were not provided: --format <FORMAT>"
        );
    }

    #[test]
    fn trace_flags_parse() {
        let cli = Cli::try_parse_from([
            "conntrack-trace",
            "trace",
            "--duration",
            "10s",
            "--proto",
            "udp",
            "--port",
            "53",
            "--src",
            "10.0.0.0/8",
            "--format",
            "ndjson",
            "--netns",
            "srv",
            "--evictions",
            "off",
            "--backend",
            "counters",
        ])
        .unwrap();
        let Command::Trace(t) = cli.command else {
            panic!("not trace")
        };
        assert_eq!(t.duration, Some(Duration::from_secs(10)));
        assert_eq!(t.select.proto, Some(Proto::UDP));
        assert_eq!(t.select.port, Some(53));
        assert_eq!(t.format, Some(Format::Ndjson));
        assert_eq!(t.observe.evictions, OnOff::Off);
        assert_eq!(t.observe.backend, BackendArg::Counters);
        let cli = Cli::try_parse_from(["conntrack-trace", "trace"]).unwrap();
        let Command::Trace(t) = cli.command else {
            panic!("trace parses as trace")
        };
        assert_eq!(t.observe.backend, BackendArg::Auto, "auto by default");
    }

    #[test]
    fn doctor_flags_parse() {
        let cli = Cli::try_parse_from([
            "conntrack-trace",
            "doctor",
            "--netns",
            "srv",
            "--format",
            "json",
            "--duration",
            "3s",
        ])
        .unwrap();
        let Command::Doctor(d) = cli.command else {
            panic!("not doctor")
        };
        let o = d.options();
        assert_eq!(o.netns.as_deref(), Some("srv"));
        assert_eq!(d.format, DoctorFormat::Json);
        assert_eq!(o.duration, Duration::from_secs(3));
        assert_eq!(o.interval, Duration::from_millis(250));
        assert!(o.files.is_empty());
        let cli = Cli::try_parse_from(["conntrack-trace", "doctor", "a.ctt", "a.ctt.1"]).unwrap();
        let Command::Doctor(d) = cli.command else {
            panic!("not doctor")
        };
        assert_eq!(d.files.len(), 2);
        assert_eq!(d.format, DoctorFormat::Human);
    }

    #[test]
    fn sizes_and_times() {
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "k", "0", "-1", "1x", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_time("90s"),
            Ok(TimeSpec::Offset(Duration::from_secs(90)))
        );
        assert_eq!(
            parse_time("@1700000000"),
            Ok(TimeSpec::Unix(1_700_000_000_000_000_000))
        );
        // date -u -d 2023-11-14T22:13:20Z +%s = 1700000000
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z"),
            Ok(TimeSpec::Unix(1_700_000_000_000_000_000))
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20.25Z"),
            Ok(TimeSpec::Unix(1_700_000_000_250_000_000))
        );
        assert_eq!(
            parse_time("2000-02-29T00:00:00Z"),
            Ok(TimeSpec::Unix(951_782_400_000_000_000))
        );
        for bad in [
            "",
            "@x",
            "2023-13-01T00:00:00Z",
            "2023-11-14",
            "12:00",
            "2023-11-14T22:13:2x",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_flags_are_rejected() {
        for args in [
            vec!["conntrack-trace", "trace", "--proto", "bogus"],
            vec!["conntrack-trace", "trace", "--port", "70000"],
            vec!["conntrack-trace", "trace", "--src", "10.0.0.0/40"],
            vec!["conntrack-trace", "trace", "--duration", "soon"],
            vec!["conntrack-trace", "trace", "--ring-size", "1000"],
            vec!["conntrack-trace", "trace", "--format", "xml"],
            vec!["conntrack-trace", "trace", "--force"],
            vec![
                "conntrack-trace",
                "trace",
                "--write",
                "f",
                "--max-size",
                "1x",
            ],
            vec!["conntrack-trace", "report"],
            vec!["conntrack-trace", "report", "f", "--since", "yesterday"],
            vec!["conntrack-trace", "export", "f"],
            vec!["conntrack-trace", "export", "f", "--format", "pcap"],
            vec!["conntrack-trace", "trace", "--backend", "kprobe"],
            vec!["conntrack-trace", "doctor", "--format", "yaml"],
            vec!["conntrack-trace", "doctor", "--duration", "soon"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
    }
}
