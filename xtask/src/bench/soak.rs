//! `cargo xtask bench soak [--minutes N]`: the tracer over a long, steady
//! table-full flood (one paced generator into [`super::flood`]'s server).
//! Its RSS is sampled every 10 s (it should stay flat), and at the end the
//! events it received plus those it counted lost must equal the kernel's
//! `drop` delta over the flood, and its own kernel reading must agree.
//! Opt-in: not part of the default `cargo xtask bench`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_tests::{KernelLock, Sysctl, Topology};

use super::{Bound, Traced, flood::flood_traffic, generate, kinds_total};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Length of the flood.
    #[arg(long, default_value_t = 10)]
    pub minutes: u32,
    /// Datagrams (drops) per second.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u32,
}

const SAMPLE_EVERY: Duration = Duration::from_secs(10);

pub fn run(bin: &Path, args: &Args) -> Result<String> {
    if args.minutes == 0 || args.rate == 0 {
        bail!("--minutes and --rate must be at least 1");
    }
    let _lock = KernelLock::acquire()?;
    let topo = Topology::new("bs", 93)?;
    const MAX: u64 = 64;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let _filler = topo.fill_assured(MAX)?;
    let tracer = Traced::tracer(bin, &["--format", "ndjson", "--netns", &topo.server.name])?;
    let before = topo.server.ct_stats()?.drop;
    let length = Duration::from_secs(u64::from(args.minutes) * 60);
    let started = Instant::now();
    let bound = Bound {
        until: started + length,
        max: u64::from(args.rate) * length.as_secs(),
        pace: Some(f64::from(args.rate)),
    };
    let traffic = flood_traffic(&topo, 1).remove(0);
    let path = topo.client.path();
    let mut rss: Vec<(u64, u64)> = Vec::new();
    let sent = std::thread::scope(|s| -> Result<u64> {
        let h = s.spawn(|| conntrack_trace_tests::in_netns(&path, || generate(&traffic, bound)));
        let mut next = started;
        while !h.is_finished() {
            if Instant::now() >= next {
                let kib = tracer.rss_kib().context("reading the tracer's VmRSS")?;
                let at = started.elapsed().as_secs();
                eprintln!("soak: {at:>5} s: tracer RSS {kib} KiB");
                rss.push((at, kib));
                next += SAMPLE_EVERY;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        h.join()
            .map_err(|_| anyhow::anyhow!("generator panicked"))??
    })?;
    let secs = started.elapsed().as_secs_f64();
    let drops = topo.server.ct_stats()?.drop - before;
    let (summary, usage) = tracer.stop()?;
    let summary = summary.context("the tracer printed no summary")?;
    let events = kinds_total(&summary, "events").unwrap_or(0);
    let lost = kinds_total(&summary, "lost").unwrap_or(0);
    let its_kernel = summary["kernel"]["drop"].as_u64().unwrap_or(0);
    let exact = events + lost == drops && its_kernel == drops;
    let (first, last) = (
        rss.first().map_or(0, |r| r.1),
        rss.last().map_or(0, |r| r.1),
    );
    let max = rss.iter().map(|r| r.1).max().unwrap_or(0);
    let md = format!(
        "Soak: {} min of table-full flood at {} datagrams/s (paced), tracer `trace --format ndjson`.\n\n\
         | datagrams sent | kernel drops | drops/s | events | lost | tracer's kernel drop | totals exact | RSS first / last / max MiB | peak RSS MiB | samples |\n\
         |---|---|---|---|---|---|---|---|---|---|\n\
         | {sent} | {drops} | {:.0} | {events} | {lost} | {its_kernel} | {} | {:.1} / {:.1} / {:.1} | {:.1} | {} |\n",
        args.minutes,
        args.rate,
        drops as f64 / secs,
        if exact { "yes" } else { "**no**" },
        first as f64 / 1024.0,
        last as f64 / 1024.0,
        max as f64 / 1024.0,
        usage.peak_rss_kib as f64 / 1024.0,
        rss.len(),
    );
    if !exact {
        println!("{md}");
        bail!(
            "totals differ: {events} events + {lost} lost vs {drops} kernel drops (the tracer read {its_kernel})"
        );
    }
    Ok(md)
}
