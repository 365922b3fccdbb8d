//! Command line.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{event::Proto, filter::Cidr};

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

impl From<BackendArg> for crate::backend::Choice {
    fn from(b: BackendArg) -> Self {
        use crate::backend::Choice;
        match b {
            BackendArg::Auto => Choice::Auto,
            BackendArg::Fexit => Choice::Fexit,
            BackendArg::Tracepoint => Choice::Tracepoint,
            BackendArg::Counters => Choice::Counters,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// How to observe conntrack (see README "Backends").
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// Stop after this long (e.g. 30s, 5m, 1h30m; a bare number is seconds).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Refresh interval of the live header.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
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
    /// Only this L4 protocol (udp, tcp, icmp, icmpv6, sctp, or a number).
    #[arg(long, value_parser = parse_proto)]
    pub proto: Option<Proto>,
    /// Only packets with this source or destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only sources in this prefix (e.g. 10.0.0.0/8, fd00::/64).
    #[arg(long, value_name = "CIDR")]
    pub src: Option<Cidr>,
    /// Create this file once every program is attached (for scripts).
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Track evictions (early_drop).
    #[arg(long, value_enum, default_value = "on")]
    pub evictions: OnOff,
    /// Also emit packets of confirmed entries dropped by rules.
    #[arg(long)]
    pub rule_drops: bool,
    /// Kernel BTF to use instead of /sys/kernel/btf/vmlinux.
    #[arg(long, value_name = "FILE")]
    pub btf: Option<PathBuf>,
    /// Ring buffer size in bytes (power of two, >= page size).
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_size: Option<u32>,
}

/// Parses `1h30m`, `5m`, `30s`, `250ms`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration `{s}` (examples: 30s, 500ms, 5m, 1h30m)");
    let s = s.trim();
    if s.is_empty() {
        return Err(err());
    }
    if let Ok(secs) = s.parse::<f64>() {
        return if secs.is_finite() && secs > 0.0 {
            Ok(Duration::from_secs_f64(secs))
        } else {
            Err(err())
        };
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| err())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        rest = &rest[unit_end..];
        total += Duration::from_secs_f64(n * mult);
    }
    if total.is_zero() {
        Err(err())
    } else {
        Ok(total)
    }
}

fn parse_proto(s: &str) -> Result<Proto, String> {
    Proto::parse(s)
        .ok_or_else(|| format!("unknown protocol `{s}` (udp, tcp, icmp, icmpv6, sctp or a number)"))
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u64 = s.parse().map_err(|_| format!("invalid ring size `{s}`"))?;
    if !crate::backend::valid_ring_bytes(n) {
        return Err(format!(
            "ring size {n} must be a power of two between the page size and 1 GiB"
        ));
    }
    Ok(n as u32)
}

#[cfg(test)]
mod tests {
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
        let Command::Trace(t) = cli.command;
        assert_eq!(t.duration, Some(Duration::from_secs(10)));
        assert_eq!(t.proto, Some(Proto::UDP));
        assert_eq!(t.port, Some(53));
        assert_eq!(t.format, Some(Format::Ndjson));
        assert_eq!(t.evictions, OnOff::Off);
        assert_eq!(t.backend, BackendArg::Counters);
        let cli = Cli::try_parse_from(["conntrack-trace", "trace"]).unwrap();
        let Command::Trace(t) = cli.command;
        assert_eq!(t.backend, BackendArg::Auto, "auto by default");
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
            vec!["conntrack-trace", "trace", "--backend", "kprobe"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?}");
        }
    }
}
