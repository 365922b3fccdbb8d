//! `cargo xtask bench evictions`: the slab hook's cost.
//! `tp_btf/kmem_cache_free` runs on every slab free on the machine; this
//! measures a socket churn loop (create a UDP socket, send one datagram,
//! close it: several slab frees per iteration) without the tracer, with the
//! tracer and `--evictions off`, and with `--evictions on` before and after
//! the hook has learned the nf_conntrack cache. Rounds alternate between
//! configurations and the median per-iteration time is reported.

use std::{
    net::UdpSocket,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use conntrack_trace_tests::{KernelLock, Netns, PREFIX, in_netns};

use super::{Traced, spread};

#[derive(clap::Args)]
pub struct Args {
    /// Socket create/send/close iterations per measurement.
    #[arg(long, default_value_t = 100_000)]
    pub iterations: u32,
    /// Measurements per configuration.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
}

fn churn(n: u32) -> Result<Duration> {
    let start = Instant::now();
    for _ in 0..n {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        // Port 9 (discard): nobody listens; the datagram is freed either way.
        let _ = s.send_to(b"x", "127.0.0.1:9");
    }
    Ok(start.elapsed())
}

/// Makes the kernel allocate and free one conntrack entry, so the hook
/// learns the nf_conntrack cache: a throwaway namespace whose ruleset uses
/// `ct state`, one datagram on its loopback, then the namespace is deleted
/// (its entries are freed with it).
fn conntrack_churn_once() -> Result<()> {
    let ns = Netns::new(&format!("{PREFIX}bench"))?;
    ns.nft("table inet b {\n  chain c {\n    type filter hook output priority 0; ct state new accept\n  }\n}\n")?;
    in_netns(&ns.path(), || -> Result<()> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        s.send_to(b"x", "127.0.0.1:9")?;
        Ok(())
    })?
}

pub fn run(bin: &Path, args: &Args) -> Result<String> {
    let _lock = KernelLock::acquire()?;
    let configs = [
        ("no tracer", None),
        ("tracer, --evictions off", Some("off")),
        ("evictions on, not learned", Some("on")),
        ("evictions on, learned", Some("on")),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    churn(args.iterations / 10)?; // warm caches
    for round in 0..args.rounds {
        for (i, (label, evictions)) in configs.iter().enumerate() {
            let tracer = match evictions {
                None => None,
                Some(e) => Some(Traced::tracer(
                    bin,
                    &["--format", "ndjson", "--evictions", e],
                )?),
            };
            if i == 3 {
                // The hook learns the nf_conntrack cache on the first
                // conntrack free; on a host with conntrack traffic that is
                // immediate. "not learned" measures a host with none.
                conntrack_churn_once()?;
                // netns teardown frees entries asynchronously (cleanup_net).
                std::thread::sleep(Duration::from_millis(500));
            }
            let d = churn(args.iterations)?;
            if let Some(t) = tracer {
                t.stop()
                    .with_context(|| format!("stopping the tracer ({label})"))?;
            }
            let ns = d.as_nanos() as f64 / f64::from(args.iterations);
            eprintln!("round {round}: {label:<28} {ns:.0} ns/iteration");
            results[i].push(ns);
        }
    }
    let median = |v: &[f64]| spread(v.to_vec()).map_or(f64::NAN, |(m, _, _)| m);
    let base = median(&results[0]);
    let mut md = format!(
        "Socket churn (UDP socket, one datagram, close; several slab frees per iteration), \
         {} iterations x {} rounds, rounds alternating; median ns per iteration.\n\n\
         | configuration | ns/iteration | vs no tracer |\n|---|---|---|\n",
        args.iterations, args.rounds
    );
    for ((label, _), r) in configs.iter().zip(&results) {
        let m = median(r);
        md.push_str(&format!(
            "| {label} | {m:.0} | {:+.1} % |\n",
            (m / base - 1.0) * 100.0
        ));
    }
    Ok(md)
}
