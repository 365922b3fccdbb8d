//! `cargo xtask bench memory`: the tracer's peak RSS when a million
//! distinct sources are dropped. A table-full flood ([`super::flood`]'s
//! server) from [`SOURCES`] client addresses x 65 534 destination ports:
//! each datagram is a distinct (source, proto, destination port) key of
//! the top-sources table and a distinct flow of the amplification
//! detector, sent once (the count bound is one cycle). The tracer's
//! whole-life peak is its VmHWM at ready (start-up's) or over the flood,
//! whichever is larger; its RSS once ready and its summary (events
//! received and lost, sources it did not track) say what the peak covers.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_tests::{KernelLock, Sysctl, Topology};

use super::{Bound, Traced, Traffic, client_sources, fmt_spread, generate_all, kinds_total};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Measurements (a fresh tracer each).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

impl Default for Args {
    fn default() -> Self {
        Args { rounds: 3 }
    }
}

/// Client addresses: 16 x 65 534 ports = 1 048 544 keys.
const SOURCES: u8 = 16;
/// Generator threads (the sources split between them).
const GENERATORS: usize = 2;
/// Longest flood per measurement.
const FLOOD_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Sample {
    keys: u64,
    drops: u64,
    ready_kib: u64,
    peak_kib: u64,
    /// VmHWM reset at ready (`clear_refs` 5), read at the end of the flood:
    /// the peak the sources and flows made, without start-up's BTF parsing.
    flood_peak_kib: u64,
    /// At the end of the flood: the heap and other private memory, and the
    /// rest (the ring's pages, mapped twice; the binary).
    anon_kib: u64,
    mapped_kib: u64,
    events: u64,
    lost: u64,
    untracked: u64,
}

fn measure(bin: &Path, topo: &Topology, gens: &[Traffic]) -> Result<Sample> {
    let tracer = Traced::tracer(bin, &["--format", "ndjson", "--netns", &topo.server.name])?;
    let ready_kib = tracer.rss_kib().unwrap_or(0);
    let startup_peak_kib = tracer
        .status_kib("VmHWM")
        .context("reading the tracer's VmHWM")?;
    // Start-up (parsing the kernel's BTF) has its own peak, before ready;
    // from here on the high-water mark is the flood's.
    std::fs::write(format!("/proc/{}/clear_refs", tracer.pid()), "5")
        .context("resetting the tracer's peak RSS (/proc/PID/clear_refs)")?;
    let before = topo.server.ct_stats()?.drop;
    let per_gen = gens.iter().map(Traffic::cycle).min().unwrap_or(0);
    let keys = generate_all(
        topo,
        gens,
        Bound {
            until: Instant::now() + FLOOD_LIMIT,
            max: per_gen,
            pace: None,
        },
    )?;
    let drops = topo.server.ct_stats()?.drop - before;
    let anon_kib = tracer.status_kib("RssAnon").unwrap_or(0);
    let flood_peak_kib = tracer
        .status_kib("VmHWM")
        .context("reading the tracer's VmHWM")?;
    let mapped_kib = tracer.rss_kib().unwrap_or(0).saturating_sub(anon_kib);
    let (summary, usage) = tracer.stop()?;
    let summary = summary.context("the tracer printed no summary")?;
    if drops < keys {
        bail!("{keys} datagrams sent but only {drops} dropped: is the server's table full?");
    }
    Ok(Sample {
        keys,
        drops,
        ready_kib,
        peak_kib: startup_peak_kib.max(usage.peak_rss_kib),
        flood_peak_kib,
        anon_kib,
        mapped_kib,
        events: kinds_total(&summary, "events").unwrap_or(0),
        lost: kinds_total(&summary, "lost").unwrap_or(0),
        untracked: summary["untracked_sources"].as_u64().unwrap_or(0),
    })
}

pub fn run(bin: &Path, args: &Args) -> Result<String> {
    let _lock = KernelLock::acquire()?;
    const TAG: &str = "bm";
    const SUBNET: u8 = 94;
    let topo = Topology::new(TAG, SUBNET)?;
    const MAX: u64 = 64;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let _filler = topo.fill_assured(MAX)?;
    let srcs = client_sources(&topo, TAG, SUBNET, SOURCES)?;
    let gens: Vec<Traffic> = srcs
        .chunks(srcs.len() / GENERATORS)
        .map(|c| Traffic {
            srcs: c.to_vec(),
            dst: topo.server_ip,
            ports: 1..65535,
        })
        .collect();
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        let s = measure(bin, &topo, &gens).with_context(|| format!("round {round}"))?;
        eprintln!(
            "round {round}: {} keys sent, {} dropped; RSS {} KiB ready, {} KiB peak over the flood, {} KiB whole-life peak; {} events, {} lost, {} sources untracked",
            s.keys,
            s.drops,
            s.ready_kib,
            s.flood_peak_kib,
            s.peak_kib,
            s.events,
            s.lost,
            s.untracked
        );
        samples.push(s);
    }
    let col = |f: fn(&Sample) -> f64, prec| fmt_spread(samples.iter().map(f).collect(), prec);
    fn mib(kib: u64) -> f64 {
        kib as f64 / 1024.0
    }
    Ok(format!(
        "A table-full flood from {SOURCES} client addresses x 65 534 destination ports, each \
         (source, udp, port) once: distinct keys for the top-sources table and distinct flows for \
         the amplification detector. Tracer: `trace --format ndjson` (output read and discarded); \
         peak RSS over the flood is its VmHWM, reset when it was ready (start-up's peak, \
         parsing the kernel's BTF, read as VmHWM before that reset, is in the whole-life column); at the end of the \
         flood, its RSS split into private \
         (`RssAnon`: heap, tables) and mapped (the ring's pages, mapped twice; the binary). {} \
         rounds, a fresh tracer each; median [min–max].\n\n\
         | distinct keys sent | kernel drops | RSS at ready MiB | peak RSS over the flood MiB | private at end MiB | mapped at end MiB | whole-life peak MiB | events received | lost events | sources untracked |\n\
         |---|---|---|---|---|---|---|---|---|---|\n\
         | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
        args.rounds,
        col(|s| s.keys as f64, 0),
        col(|s| s.drops as f64, 0),
        col(|s| mib(s.ready_kib), 1),
        col(|s| mib(s.flood_peak_kib), 1),
        col(|s| mib(s.anon_kib), 1),
        col(|s| mib(s.mapped_kib), 1),
        col(|s| mib(s.peak_kib), 1),
        col(|s| s.events as f64, 0),
        col(|s| s.lost as f64, 0),
        col(|s| s.untracked as f64, 0),
    ))
}
