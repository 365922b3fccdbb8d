//! `cargo xtask bench newflow`: what the tracer costs a host that is *not*
//! dropping. A client namespace sends UDP datagrams, every one a new
//! tuple, through a veth to a server namespace whose `ct state` ruleset
//! makes conntrack track them; nothing is dropped (the table is far from
//! full). The figure is the kernel's new-entry rate: the growth of the
//! server's entry count over the measurement, which also proves each
//! datagram was a new entry (its ratio to the datagrams sent is in the
//! table). The count, not the `insert` statistic: 6.x kernels no longer
//! increment `insert` (it reads 0).
//!
//! For the growth to be the number of new entries, none may expire during
//! a measurement and the table starts empty: the server's UDP timeout (a
//! per-namespace sysctl) is a little longer than a measurement, and each
//! measurement first flushes the previous one's entries (`conntrack -F`).
//! Tuples do not repeat within a measurement (the count bound is one
//! generator cycle, [`SOURCES`] addresses x 65 534 ports). The global
//! `nf_conntrack_max` is raised for the run (restored on drop).
//!
//! Rounds alternate between no tracer, the tracer with `--evictions on`
//! and `off` (tracepoint backend: fexit is not available everywhere), and
//! the bpftrace one-liner a user would write instead. A further
//! configuration runs with `kernel.bpf_stats_enabled=1` (restored
//! afterwards; the statistics cost two clock reads per run, hence not in
//! the rate rounds) for each program's ns per run under this load, and
//! once per round on the idle system.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_tests::{KernelLock, Sysctl, Topology};

use super::{
    Bound, Rounds, Traced, Tracefs, Traffic, client_sources, fmt_spread, generate_all, hook_costs,
    prog_stats, ratios,
};

#[derive(clap::Args, Clone, Default)]
pub struct Args {
    #[command(flatten)]
    pub timed: Rounds,
}

/// Source addresses per generator.
const SOURCES: u8 = 32;
/// The one-liner a user would run to count drops by reason.
pub const BPFTRACE: &str = "tracepoint:skb:kfree_skb { @[args->reason] = count(); }";
/// nf_conntrack_max during the run: above what a measurement can create.
const MAX: u64 = 1 << 22;
/// Longest wait for the table to be empty after the flush.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Empties the server's table: `conntrack -F` (synchronous; waiting for
/// the garbage collector to reap expired entries took up to a minute per
/// measurement), then waits until the count reads 0 (at most
/// [`DRAIN_LIMIT`]).
fn drain(topo: &Topology) -> Result<()> {
    conntrack_trace_tests::run(
        "ip",
        &["netns", "exec", &topo.server.name, "conntrack", "-F"],
    )
    .context(
        "flushing the server's table (Debian package conntrack; cargo xtask setup installs it)",
    )?;
    let deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let n = topo.server.ct_count()?;
        if n == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{n} entries still in the server's table {} s after the flush",
                DRAIN_LIMIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Tracer {
    None,
    Ours(&'static str),
    Bpftrace,
    /// Empty programs on both hooks (examples/empty_hooks.rs): the floor.
    Empty,
}

struct Config {
    label: &'static str,
    tracer: Tracer,
    stats: bool,
    traffic: bool,
}

const CONFIGS: [Config; 7] = [
    Config {
        label: "no tracer",
        tracer: Tracer::None,
        stats: false,
        traffic: true,
    },
    Config {
        label: "tracer, --evictions on",
        tracer: Tracer::Ours("on"),
        stats: false,
        traffic: true,
    },
    Config {
        label: "tracer, --evictions off",
        tracer: Tracer::Ours("off"),
        stats: false,
        traffic: true,
    },
    Config {
        label: "bpftrace one-liner",
        tracer: Tracer::Bpftrace,
        stats: false,
        traffic: true,
    },
    Config {
        label: "tracer, --evictions on, bpf_stats",
        tracer: Tracer::Ours("on"),
        stats: true,
        traffic: true,
    },
    Config {
        label: "empty programs on both hooks, bpf_stats",
        tracer: Tracer::Empty,
        stats: true,
        traffic: true,
    },
    Config {
        label: "idle, tracer --evictions on, bpf_stats",
        tracer: Tracer::Ours("on"),
        stats: true,
        traffic: false,
    },
];

#[derive(Default)]
struct Sample {
    new_per_s: f64,
    /// New entries per datagram sent.
    new_share: f64,
    /// (program, ns per run, runs per second).
    hooks: Vec<(String, f64, f64)>,
    /// Seconds the flush of the previous entries took.
    drained_s: f64,
}

/// The programs whose ns/run a configuration's columns show.
fn programs(cfg: &Config) -> (&'static str, &'static str) {
    match cfg.tracer {
        Tracer::Empty => ("kfree_skb_empty", "kmem_free_empty"),
        _ => ("kfree_skb", "kmem_cache_free"),
    }
}

fn measure(
    bin: &Path,
    empty_hooks: &Path,
    topo: &Topology,
    gens: &[Traffic],
    cfg: &Config,
    args: &Args,
) -> Result<Sample> {
    let tracer = match cfg.tracer {
        Tracer::None => None,
        Tracer::Ours(e) => Some(Traced::tracer(
            bin,
            &[
                "--backend",
                "tracepoint",
                "--evictions",
                e,
                "--format",
                "ndjson",
                "--netns",
                &topo.server.name,
            ],
        )?),
        Tracer::Bpftrace => Some(Traced::bpftrace(BPFTRACE)?),
        Tracer::Empty => Some(
            Traced::until_ready(std::process::Command::new(empty_hooks))
                .context("examples/empty_hooks")?,
        ),
    };
    // The previous measurement's entries are flushed with the tracer
    // attached: freeing them teaches its slab hook the nf_conntrack cache,
    // as entries expiring do on any real host within seconds. (Flushed
    // before the tracer started, no entry was freed while it ran, and
    // every slab free in the system paid the not-yet-learned name check.)
    let drain_started = Instant::now();
    drain(topo)?;
    let drained_s = drain_started.elapsed().as_secs_f64();
    let _stats = if cfg.stats {
        Some(Sysctl::set("kernel.bpf_stats_enabled", 1)?)
    } else {
        None
    };
    let progs_before = if cfg.stats { prog_stats()? } else { Vec::new() };
    let before = topo.server.ct_stats()?;
    let count_before = topo.server.ct_count()?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.timed.seconds);
    let sent = if cfg.traffic {
        // Bounded by time; the count bound is one cycle per generator, so
        // no tuple repeats within a measurement whatever the rate.
        let max = gens.iter().map(Traffic::cycle).min().unwrap_or(0);
        generate_all(
            topo,
            gens,
            Bound {
                until,
                max,
                pace: None,
            },
        )?
    } else {
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        0
    };
    let secs = started.elapsed().as_secs_f64();
    let new = topo.server.ct_count()?.saturating_sub(count_before);
    let d = topo.server.ct_stats()?.since(&before)?;
    let progs_after = if cfg.stats { prog_stats()? } else { Vec::new() };
    if let Some(t) = tracer {
        t.stop()
            .with_context(|| format!("stopping {}", cfg.label))?;
    }
    if d.drop != 0 || d.early_drop != 0 {
        bail!(
            "the server dropped {} and evicted {} entries: the table filled (max {MAX})",
            d.drop,
            d.early_drop
        );
    }
    if cfg.traffic && new * 2 < sent {
        bail!("only {new} of {sent} datagrams became new entries");
    }
    Ok(Sample {
        new_per_s: new as f64 / secs,
        new_share: if sent > 0 {
            new as f64 / sent as f64
        } else {
            0.0
        },
        hooks: hook_costs(&progs_before, &progs_after)
            .into_iter()
            .map(|(n, ns, runs)| (n, ns, runs as f64 / secs))
            .collect(),
        drained_s,
    })
}

pub fn run(bin: &Path, args: &Args) -> Result<String> {
    let empty_hooks = super::build_example("empty_hooks")?;
    let _lock = KernelLock::acquire()?;
    let _tracefs = Tracefs::ensure()?;
    const TAG: &str = "bn";
    const SUBNET: u8 = 96;
    let topo = Topology::new(TAG, SUBNET)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    // Longer than a measurement (and its tracer's start), so no entry
    // expires while it is counted.
    let timeout = args.timed.seconds.ceil() as u64 + 2;
    topo.server
        .sysctl("net/netfilter/nf_conntrack_udp_timeout", timeout)?;
    let srcs = client_sources(&topo, TAG, SUBNET, SOURCES * args.timed.generators)?;
    let gens: Vec<Traffic> = srcs
        .chunks(usize::from(SOURCES))
        .map(|c| Traffic {
            srcs: c.to_vec(),
            dst: topo.server_ip,
            ports: 1..65535,
        })
        .collect();
    let mut results: Vec<Vec<Sample>> = CONFIGS.iter().map(|_| Vec::new()).collect();
    for round in 0..args.timed.rounds {
        for (i, cfg) in CONFIGS.iter().enumerate() {
            let s = measure(bin, &empty_hooks, &topo, &gens, cfg, args)
                .with_context(|| format!("round {round}, {}", cfg.label))?;
            eprintln!(
                "round {round}: {:<40} {:>9.0} new entries/s ({:.3} per datagram; flush {:.1} s) {:?}",
                cfg.label, s.new_per_s, s.new_share, s.drained_s, s.hooks
            );
            results[i].push(s);
        }
    }
    let rates = |r: &[Sample]| r.iter().map(|s| s.new_per_s).collect::<Vec<f64>>();
    let hook = |r: &[Sample], name: &str, runs: bool| -> String {
        fmt_spread(
            r.iter()
                .filter_map(|s| s.hooks.iter().find(|(n, _, _)| n == name))
                .map(|(_, ns, per_s)| if runs { *per_s } else { *ns })
                .collect(),
            0,
        )
    };
    let base = rates(&results[0]);
    let mut md = format!(
        "New flows without drops: {} generator(s) (UDP sendmmsg from {SOURCES} source addresses \
         each, a new tuple per datagram) through a veth into a server namespace with a `ct state` \
         ruleset (nf_conntrack_max {MAX}: nothing dropped or evicted); the rate is the growth of \
         the server's entry count, from an empty table. Tracer: `--backend tracepoint`; bpftrace: `bpftrace -e \
         '{BPFTRACE}'`. {} s x {} rounds, rounds alternating; median [min–max]; ratios per round.\n\n\
         | configuration | new entries/s | ratio to no tracer | new entries per datagram | kfree_skb ns/run | kmem_cache_free ns/run |\n\
         |---|---|---|---|---|---|\n",
        args.timed.generators, args.timed.seconds, args.timed.rounds
    );
    for (cfg, r) in CONFIGS.iter().zip(&results).filter(|(c, _)| c.traffic) {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            cfg.label,
            fmt_spread(rates(r), 0),
            if cfg.tracer == Tracer::None {
                "1".into()
            } else {
                fmt_spread(ratios(&rates(r), &base), 3)
            },
            fmt_spread(r.iter().map(|s| s.new_share).collect(), 3),
            hook(r, programs(cfg).0, false),
            hook(r, programs(cfg).1, false),
        ));
    }
    md.push_str(
        "\nPer-hook cost (`run_time_ns / run_cnt` with `kernel.bpf_stats_enabled=1`, tracer \
         `--evictions on`), beside empty programs on the same hooks \
         (`conntrack-trace/examples/empty_hooks.rs`): what a run costs with nothing in it, \
         the statistics' own clock reads included. The table-full flood's is in its own \
         table.\n\n\
         | condition | kfree_skb ns/run | kfree_skb runs/s | kmem_cache_free ns/run | kmem_cache_free runs/s |\n\
         |---|---|---|---|---|\n",
    );
    for (cfg, r) in CONFIGS.iter().zip(&results).filter(|(c, _)| c.stats) {
        let condition = match (cfg.tracer, cfg.traffic) {
            (Tracer::Empty, _) => "empty programs (the hooks' floor), new-flow traffic",
            (_, true) => "tracer, new-flow traffic (above)",
            (_, false) => "tracer, idle system",
        };
        let (kfree, kmem) = programs(cfg);
        md.push_str(&format!(
            "| {condition} | {} | {} | {} | {} |\n",
            hook(r, kfree, false),
            hook(r, kfree, true),
            hook(r, kmem, false),
            hook(r, kmem, true),
        ));
    }
    Ok(md)
}
