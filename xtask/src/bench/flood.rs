//! `cargo xtask bench flood`: what the tracer costs a host that is already
//! dropping. A client namespace floods a server namespace whose conntrack
//! table is full of assured entries (every datagram is a new flow, so every
//! one is a `table_full` drop in nf_conntrack_in()); rounds alternate
//! between no tracer and the tracer (and optionally a second binary, e.g. a
//! build from before a change), and each figure is the median of the
//! rounds with its min and max:
//!
//! - the kernel's drop rate (the server's `drop` counter) and its ratio to
//!   the rate without a tracer: a tracer must not slow a host that sheds
//!   load;
//! - events the tracer emitted, lost and shed (beyond `--event-budget`,
//!   counted only; issue 21), from its summary, and its context switches
//!   and CPU during the flood, with the default budget and without one
//!   (`--event-budget 0`) side by side;
//! - in separate rounds with `kernel.bpf_stats_enabled=1` (restored
//!   afterwards; the statistics themselves cost two clock reads per run,
//!   which is why the rate rounds run without them): each program's
//!   `run_time_ns / run_cnt` over the flood, from `bpftool prog show`:
//!   without a budget (every run emits), with the default budget, and with
//!   `--event-budget 1` (after its first quarter second nearly every run
//!   sheds: the cost of a drop that is only counted).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_tests::{KernelLock, Sysctl, Topology};

use super::{
    Bound, Rounds, Traced, Traffic, fmt_spread, generate_all, hook_costs, human_lost, human_shed,
    kinds_total, prog_stats, ratios,
};

#[derive(clap::Args, Clone)]
pub struct Args {
    #[command(flatten)]
    pub timed: Rounds,
    /// A second conntrack-trace binary measured in the same rounds (e.g. a
    /// build of the previous commit), for before/after ratios.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// More arguments for the `--compare` binary, in all of its rounds
    /// (e.g. "--event-budget 1" to measure its shed path).
    #[arg(long, allow_hyphen_values = true, requires = "compare")]
    pub compare_args: Option<String>,
}

/// One measurement of one configuration.
#[derive(Default, Clone)]
struct Sample {
    drops_per_s: f64,
    events: Option<u64>,
    lost: Option<u64>,
    shed: Option<u64>,
    ctx_switches_per_s: Option<f64>,
    cpu_pct: Option<f64>,
    /// (program name, ns per run, runs) for the stats rounds.
    ns_per_run: Vec<(String, f64, u64)>,
    /// The backend the tracer chose (its summary).
    backend: Option<String>,
}

struct Config {
    label: String,
    bin: Option<PathBuf>,
    stats: bool,
    /// More tracer arguments: another sink or ring size (see `run`).
    extra: Vec<String>,
    /// `--format human` instead of ndjson: lost events from its summary
    /// table.
    human: bool,
    /// `agent` instead of `trace`: events, lost and shed from its
    /// `/metrics` just before it stops.
    agent: bool,
}

/// Where the bench's agent serves (the bench holds the kernel lock, so no
/// test's agent is running).
const AGENT_LISTEN: &str = "127.0.0.1:19578";

/// The sum of every series of `name` in a Prometheus text exposition.
fn metric_sum(text: &str, name: &str) -> Option<u64> {
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        sum += value;
        found = true;
    }
    found.then_some(sum as u64)
}

/// `GET /metrics` of the bench's agent.
fn scrape_agent() -> Result<String> {
    let addr = AGENT_LISTEN.parse().context("the bench's agent address")?;
    let (status, body) = conntrack_trace_tests::agent::http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("the agent's /metrics answered {status}");
    }
    Ok(body)
}

/// Generator `g` of `n`: its own 8192 destination ports, so no two
/// generators send the same tuple.
pub fn flood_traffic(topo: &Topology, generators: u8) -> Vec<Traffic> {
    (0..u16::from(generators))
        .map(|g| {
            let base = 1024 + g * 8192;
            Traffic {
                srcs: vec![topo.client_ip],
                dst: topo.server_ip,
                ports: base..base + 8192,
            }
        })
        .collect()
}

fn measure(topo: &Topology, cfg: &Config, args: &Args) -> Result<Sample> {
    // `--write`: a fresh capture per round, removed afterwards.
    let capture = std::env::temp_dir().join(format!("ctt-bench-{}.ctt", std::process::id()));
    let extra: Vec<String> = cfg
        .extra
        .iter()
        .map(|a| a.replace("{capture}", &capture.display().to_string()))
        .collect();
    let tracer = match &cfg.bin {
        Some(bin) if cfg.agent => {
            let mut cmd = std::process::Command::new(bin);
            cmd.args(["agent", "--metrics-addr", AGENT_LISTEN])
                .args(&extra);
            Some(Traced::until_ready(cmd).context("starting the agent")?)
        }
        Some(bin) => {
            let format = if cfg.human { "human" } else { "ndjson" };
            let mut a = vec!["--format", format, "--netns", &topo.server.name];
            a.extend(extra.iter().map(String::as_str));
            Some(Traced::tracer(bin, &a)?)
        }
        None => None,
    };
    let _stats = if cfg.stats {
        Some(Sysctl::set("kernel.bpf_stats_enabled", 1)?)
    } else {
        None
    };
    let progs_before = if cfg.stats { prog_stats()? } else { Vec::new() };
    let usage_before = tracer.as_ref().and_then(Traced::proc_usage);
    let drop_before = topo.server.ct_stats()?.drop;
    let started = std::time::Instant::now();
    let bound = Bound {
        until: started + std::time::Duration::from_secs_f64(args.timed.seconds),
        max: u64::MAX,
        pace: None,
    };
    let sent = generate_all(topo, &flood_traffic(topo, args.timed.generators), bound)?;
    let secs = started.elapsed().as_secs_f64();
    let drops = topo.server.ct_stats()?.drop - drop_before;
    let usage_after = tracer.as_ref().and_then(Traced::proc_usage);
    let progs_after = if cfg.stats { prog_stats()? } else { Vec::new() };
    let mut sample = Sample {
        drops_per_s: drops as f64 / secs,
        ns_per_run: hook_costs(&progs_before, &progs_after),
        ..Sample::default()
    };
    if drops * 10 < sent {
        bail!("only {drops} of {sent} datagrams were dropped: is the server's table full?");
    }
    if let (Some((c0, t0)), Some((c1, t1))) = (usage_before, usage_after) {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        sample.ctx_switches_per_s = Some((c1 - c0) as f64 / secs);
        sample.cpu_pct = Some((t1 - t0) as f64 / hz / secs * 100.0);
    }
    if let Some(t) = tracer {
        if cfg.agent {
            let text = scrape_agent()?;
            sample.lost = metric_sum(&text, "conntrack_trace_lost_events_total");
            sample.shed = metric_sum(&text, "conntrack_trace_shed_events_total");
            t.stop_tail()?;
        } else if cfg.human {
            let (text, _) = t.stop_tail()?;
            let Some(lost) = human_lost(&text) else {
                let end = text.len().saturating_sub(2000);
                let end = (end..text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                bail!(
                    "the human summary has no events/lost/observed table; its output ended:\n{}",
                    &text[end..]
                );
            };
            sample.lost = Some(lost);
            sample.shed = Some(human_shed(&text));
        } else if let (Some(sum), _) = t.stop()? {
            sample.events = kinds_total(&sum, "events");
            sample.lost = kinds_total(&sum, "lost");
            // A binary from before the budget has no `shed`: None.
            sample.shed = kinds_total(&sum, "shed");
            sample.backend = sum["backend"].as_str().map(str::to_owned);
        }
    }
    for f in capture_files(&capture) {
        let _ = std::fs::remove_file(f);
    }
    Ok(sample)
}

/// Runs the flood rounds; returns the result as Markdown (a table) and
/// the backend the tracer chose.
pub fn run(bin: &Path, args: &Args) -> Result<(String, String)> {
    let _lock = KernelLock::acquire()?;
    let topo = Topology::new("bf", 97)?;
    const MAX: u64 = 64;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let _filler = topo.fill_assured(MAX)?;
    let mut configs = vec![Config {
        label: "no tracer".into(),
        bin: None,
        stats: false,
        extra: Vec::new(),
        human: false,
        agent: false,
    }];
    let mut bins = vec![("tracer".to_owned(), bin.to_path_buf())];
    if let Some(c) = &args.compare {
        bins.push((format!("tracer ({})", c.display()), c.clone()));
    }
    // The default budget and none, side by side; an older binary (which
    // knows no --event-budget) with its own defaults.
    let budgets: [(&str, Vec<String>); 2] = [
        ("", Vec::new()),
        (
            ", --event-budget 0",
            vec!["--event-budget".into(), "0".into()],
        ),
    ];
    for (suffix, extra) in &budgets {
        configs.push(Config {
            label: format!("tracer{suffix}"),
            bin: Some(bin.to_path_buf()),
            stats: false,
            extra: extra.clone(),
            human: false,
            agent: false,
        });
    }
    let compare_extra: Vec<String> = args
        .compare_args
        .iter()
        .flat_map(|a| a.split_whitespace().map(str::to_owned))
        .collect();
    let compare_label = |label: &str| match &args.compare_args {
        Some(a) => format!("{label} {a}"),
        None => label.to_owned(),
    };
    if let Some((label, b)) = bins.get(1) {
        configs.push(Config {
            label: compare_label(label),
            bin: Some(b.clone()),
            stats: false,
            extra: compare_extra.clone(),
            human: false,
            agent: false,
        });
    }
    // Where loss starts, and what the other sinks cost: the human view
    // (the default), the capture writer as well as ndjson, and a ring an
    // eighth of the default.
    for (label, extra, human) in [
        ("tracer, --format human", vec![], true),
        (
            "tracer, ndjson + --write",
            vec!["--write", "{capture}"],
            false,
        ),
        (
            "tracer, --ring-size 1048576",
            vec!["--ring-size", "1048576"],
            false,
        ),
    ] {
        for (suffix, budget) in &budgets {
            // The small ring only with the default budget: it shows where
            // loss starts, which `--event-budget 0` already shows.
            if !budget.is_empty() && label.contains("ring-size") {
                continue;
            }
            let mut extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
            extra.extend(budget.iter().cloned());
            configs.push(Config {
                label: format!("{label}{suffix}"),
                bin: Some(bin.to_path_buf()),
                stats: false,
                extra,
                human,
                agent: false,
            });
        }
    }
    // The kfree_skb run emitting (no budget), as it comes with the
    // default budget, and shedding (a budget of 1/s: after its first
    // quarter second nearly every drop is shed).
    for (suffix, extra) in budgets.iter().cloned().chain([(
        ", --event-budget 1",
        vec!["--event-budget".to_owned(), "1".to_owned()],
    )]) {
        configs.push(Config {
            label: format!("tracer{suffix}, bpf_stats"),
            bin: Some(bin.to_path_buf()),
            stats: true,
            extra,
            human: false,
            agent: false,
        });
    }
    if let Some((label, b)) = bins.get(1) {
        configs.push(Config {
            label: format!("{}, bpf_stats", compare_label(label)),
            bin: Some(b.clone()),
            stats: true,
            extra: compare_extra,
            human: false,
            agent: false,
        });
    }
    // The ring's wakeups (issue 21): the kernel's adaptive wakeup with the
    // reader's bounded wait (the default, measured above) against no
    // wakeups and a polling reader, with and without bpf_stats.
    for stats in [false, true] {
        configs.push(Config {
            label: format!(
                "tracer, --ring-wakeup poll{}",
                if stats { ", bpf_stats" } else { "" }
            ),
            bin: Some(bin.to_path_buf()),
            stats,
            extra: vec!["--ring-wakeup".into(), "poll".into()],
            human: false,
            agent: false,
        });
    }
    // The always-on agent, node-wide, with its own default budget (its
    // HTTP server, forecasts and per-source series included).
    configs.push(Config {
        label: "agent".into(),
        bin: Some(bin.to_path_buf()),
        stats: false,
        extra: Vec::new(),
        human: false,
        agent: true,
    });
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
    for round in 0..args.timed.rounds {
        for (i, cfg) in configs.iter().enumerate() {
            let s = measure(&topo, cfg, args)
                .with_context(|| format!("round {round}, {}", cfg.label))?;
            eprintln!(
                "round {round}: {:<48} {:>9.0} drops/s events {:?} lost {:?} shed {:?} ctx/s {:?} {:?}",
                cfg.label,
                s.drops_per_s,
                s.events,
                s.lost,
                s.shed,
                s.ctx_switches_per_s.map(|c| c as u64),
                s.ns_per_run
            );
            results[i].push(s);
        }
    }
    let base: Vec<f64> = results[0].iter().map(|s| s.drops_per_s).collect();
    let mut md = format!(
        "Table-full flood: {} generator(s) (UDP sendmmsg, a new tuple per datagram) into a \
         server namespace whose table (max {MAX}) is full of assured entries; {} s x {} rounds, \
         rounds alternating; median [min–max]. Ratios are per round (rate with / rate without \
         in the same round).\n\n\
         | configuration | kernel drops/s | ratio to no tracer | events | lost events | shed drops | tracer context switches/s | tracer CPU % | kfree_skb ns/run | kmem_cache_free ns/run |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        args.timed.generators, args.timed.seconds, args.timed.rounds
    );
    for (cfg, samples) in configs.iter().zip(&results) {
        let rates: Vec<f64> = samples.iter().map(|s| s.drops_per_s).collect();
        let ratio = ratios(&rates, &base);
        let ns = |name: &str| -> Vec<f64> {
            samples
                .iter()
                .filter_map(|s| {
                    s.ns_per_run
                        .iter()
                        .find(|(n, _, _)| n == name)
                        .map(|(_, v, _)| *v)
                })
                .collect()
        };
        let count = |f: fn(&Sample) -> Option<u64>| -> Vec<f64> {
            samples
                .iter()
                .filter_map(|s| f(s).map(|l| l as f64))
                .collect()
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            cfg.label,
            fmt_spread(rates, 0),
            if cfg.bin.is_none() {
                "1".into()
            } else {
                fmt_spread(ratio, 2)
            },
            fmt_spread(count(|s| s.events), 0),
            fmt_spread(count(|s| s.lost), 0),
            fmt_spread(count(|s| s.shed), 0),
            fmt_spread(
                samples
                    .iter()
                    .filter_map(|s| s.ctx_switches_per_s)
                    .collect(),
                0
            ),
            fmt_spread(samples.iter().filter_map(|s| s.cpu_pct).collect(), 0),
            fmt_spread(ns("kfree_skb"), 0),
            fmt_spread(ns("kmem_cache_free"), 0),
        ));
    }
    let backend = results
        .iter()
        .flatten()
        .find_map(|s| s.backend.clone())
        .unwrap_or_else(|| "unknown".into());
    Ok((md, backend))
}

/// A capture and its rotated files (`FILE`, `FILE.1`, ...).
fn capture_files(first: &Path) -> Vec<PathBuf> {
    let mut v = vec![first.to_path_buf()];
    for i in 1..1000 {
        let p = PathBuf::from(format!("{}.{i}", first.display()));
        if !p.exists() {
            break;
        }
        v.push(p);
    }
    v
}
