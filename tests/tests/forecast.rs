//! The live forecast (issue 13): while a namespace's table fills at a
//! steady rate, `trace --format ndjson` streams `forecast` lines whose time
//! to full matches when the table actually filled, then says `full`.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{Sysctl, Topology, Tracer, kernel_test, traffic};

/// CLOCK_MONOTONIC in ns (the clock of events and forecast lines).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn live_forecast_of_a_steady_fill() -> Result<()> {
    let Some(_lock) = kernel_test("live_forecast_of_a_steady_fill")? else {
        return Ok(());
    };
    const MAX: u64 = 200;
    const RATE: f64 = 40.0; // full after 5 s
    let topo = Topology::new("fc", 72)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let tracer = Tracer::start(&["--netns", &topo.server.name, "--interval", "250ms"])?;
    // One-shot datagrams to a closed port: each leaves an unreplied entry
    // for nf_conntrack_udp_timeout (30 s), longer than the test. Bounded:
    // MAX + 40 datagrams, ~6 s.
    let client = topo.client.path();
    let mut full_ns = None;
    std::thread::scope(|s| -> Result<()> {
        let h = s.spawn(|| {
            traffic::udp_paced(
                &client,
                topo.client_ip,
                topo.server_ip,
                53,
                30_000..30_000 + MAX as u16 + 40,
                RATE,
                |_| b"conntrack-trace forecast test\0".to_vec(),
                None,
            )
        });
        while !h.is_finished() {
            if full_ns.is_none() && topo.server.ct_count()? >= MAX {
                full_ns = Some(mono_ns());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        h.join().map_err(|_| anyhow::anyhow!("fill panicked"))??;
        Ok(())
    })?;
    // Two more intervals for the `full` line.
    std::thread::sleep(Duration::from_millis(600));
    let out = tracer.stop()?;
    let full_ns = full_ns.context("the table never filled")?;
    let filling: Vec<_> = out
        .forecasts
        .iter()
        .filter(|f| f.trend == "filling" && f.eta_s.is_some())
        .collect();
    ensure!(
        !filling.is_empty(),
        "no filling forecast: {:?}",
        out.forecasts
    );
    let mut last_err = None;
    for f in &filling {
        ensure!(f.netns_name == topo.server.name && f.max == MAX);
        ensure!(f.samples >= 5, "never from fewer than 5 samples: {f:?}");
        // The time to full said then vs the time it took.
        let said = f.eta_s.unwrap_or_default();
        let took = full_ns.saturating_sub(f.ts_ns) as f64 / 1e9;
        let err = said - took;
        eprintln!(
            "forecast at {} entries: full in {said:.2} s [{:?} – {:?}] at {:.1}/s; it took {took:.2} s: error {err:+.2} s",
            f.count, f.eta_low_s, f.eta_high_s, f.slope_per_s
        );
        last_err = Some((err, took, f));
    }
    // Judged on the last forecast before full: the pacing thread can be
    // late on a loaded machine (a VM under TCG), which the fill, not the
    // estimator, would then show; the last forecast has the least time
    // left for that. The slope must be the rate sent.
    let (err, took, f) = last_err.context("no forecast")?;
    ensure!(
        (f.slope_per_s - RATE).abs() <= 0.25 * RATE,
        "slope {:.1}/s for {RATE}/s sent: {f:?}",
        f.slope_per_s
    );
    ensure!(
        err.abs() <= (0.25 * took).max(1.0),
        "forecast off by {err:+.2} s: {f:?}"
    );
    ensure!(
        out.forecasts.iter().any(|f| f.trend == "full"),
        "then full: {:?}",
        out.forecasts
    );
    Ok(())
}
