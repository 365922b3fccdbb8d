//! `cargo xtask bench userspace`: how fast the offline commands read a
//! capture. The capture is real: a table-full flood ([`super::flood`]'s
//! topology and generators) traced with `--write` until the kernel has
//! dropped twice the wanted events (the tracer loses some under a flood);
//! its event count is then read back with `report --format json`
//! (`check.events_in_files`).
//!
//! With the file in the page cache (read once first), rounds alternate
//! between `report FILE`, `export --format ndjson FILE` and `export
//! --format pcapng FILE` (output to /dev/null); each is timed as a whole
//! command, with its CPU time (user + system) and peak RSS (its VmHWM, polled).
//! Events per CPU-second is the per-core figure.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_tests::{KernelLock, Scratch, Sysctl, Topology};

use super::{Bound, Traced, Usage, flood::flood_traffic, fmt_spread, generate_all, run_timed};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Measurements per command.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Events the capture must hold at least.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            rounds: 5,
            events: 1_000_000,
        }
    }
}

/// Longest flood spent making the capture.
const FLOOD_LIMIT: Duration = Duration::from_secs(60);
/// Longest one timed command may run.
const COMMAND_LIMIT: Duration = Duration::from_secs(300);

/// Traces a table-full flood into `file` until the kernel has dropped
/// `2 * events` datagrams (at most [`FLOOD_LIMIT`]); returns the
/// kernel's drop count over the flood.
fn record(bin: &Path, file: &Path, events: u64) -> Result<u64> {
    let topo = Topology::new("bu", 95)?;
    const MAX: u64 = 64;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let _filler = topo.fill_assured(MAX)?;
    let path = file.to_str().context("capture path is not UTF-8")?;
    let tracer = Traced::tracer(
        bin,
        &[
            "--format",
            "ndjson",
            "--netns",
            &topo.server.name,
            "--write",
            path,
            "--force",
            // Every drop an event: the figure is events/s through
            // report and export, on a capture of a million of them.
            "--event-budget",
            "0",
        ],
    )?;
    let before = topo.server.ct_stats()?.drop;
    let deadline = Instant::now() + FLOOD_LIMIT;
    let gens = flood_traffic(&topo, 2);
    let mut drops = 0;
    while drops < 2 * events && Instant::now() < deadline {
        let bound = Bound {
            until: (Instant::now() + Duration::from_secs(1)).min(deadline),
            max: u64::MAX,
            pace: None,
        };
        generate_all(&topo, &gens, bound)?;
        drops = topo.server.ct_stats()?.drop - before;
    }
    tracer.stop().context("stopping the recording tracer")?;
    Ok(drops)
}

/// Events in a capture, by `report --format json` (its check's
/// `events_in_files`).
fn events_in(bin: &Path, file: &Path) -> Result<u64> {
    let out = Command::new(bin)
        .args(["report", "--format", "json"])
        .arg(file)
        .output()
        .context("running report")?;
    if !out.status.success() {
        bail!(
            "report --format json failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("report's JSON")?;
    v["check"]["events_in_files"]
        .as_u64()
        .context("report's JSON has no check.events_in_files")
}

pub fn run(bin: &Path, args: &Args) -> Result<String> {
    let scratch = Scratch::new("bench", "userspace")?;
    let file = scratch.path("flood.ctt");
    let drops = {
        let _lock = KernelLock::acquire()?;
        record(bin, &file, args.events)?
    };
    let events = events_in(bin, &file)?;
    if events < args.events {
        bail!(
            "the capture holds {events} events ({drops} kernel drops in {} s), fewer than the {} wanted",
            FLOOD_LIMIT.as_secs(),
            args.events
        );
    }
    let bytes = std::fs::metadata(&file)?.len();
    // Into the page cache: the figure is the reader's, not the disk's.
    std::io::copy(&mut std::fs::File::open(&file)?, &mut std::io::sink())?;
    let commands: [(&str, &[&str]); 3] = [
        ("report", &["report"]),
        ("export --format ndjson", &["export", "--format", "ndjson"]),
        ("export --format pcapng", &["export", "--format", "pcapng"]),
    ];
    let mut results: Vec<Vec<Usage>> = vec![Vec::new(); commands.len()];
    for round in 0..args.rounds {
        for (i, (label, a)) in commands.iter().enumerate() {
            let u = run_timed(Command::new(bin).args(*a).arg(&file), COMMAND_LIMIT)
                .with_context(|| format!("round {round}, {label}"))?;
            eprintln!(
                "round {round}: {label:<24} {:.3} s wall {:.3} s CPU {} KiB peak RSS",
                u.wall_s, u.cpu_s, u.peak_rss_kib
            );
            results[i].push(u);
        }
    }
    let mut md = format!(
        "Offline commands on a capture of a real table-full flood ({events} events, {:.1} MiB, \
         in the page cache), output to /dev/null; each timed as a whole command (start-up \
         included). {} rounds, alternating; median [min–max]. Per core: events / (user + system \
         CPU seconds).\n\n\
         | command | events/s | events per CPU-second | wall s | peak RSS MiB |\n\
         |---|---|---|---|---|\n",
        bytes as f64 / f64::from(1 << 20),
        args.rounds
    );
    let n = events as f64;
    for ((label, _), r) in commands.iter().zip(&results) {
        md.push_str(&format!(
            "| `{label}` | {} | {} | {} | {} |\n",
            fmt_spread(r.iter().map(|u| n / u.wall_s).collect(), 0),
            fmt_spread(r.iter().map(|u| n / u.cpu_s.max(1e-6)).collect(), 0),
            fmt_spread(r.iter().map(|u| u.wall_s).collect(), 3),
            fmt_spread(
                r.iter().map(|u| u.peak_rss_kib as f64 / 1024.0).collect(),
                1
            ),
        ));
    }
    Ok(md)
}
