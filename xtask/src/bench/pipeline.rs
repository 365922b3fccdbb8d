//! `cargo xtask bench pipeline`: the live consumer's user-space half per
//! sink, without a kernel. `conntrack-trace/examples/pipeline.rs` decodes
//! synthetic ring records (a DNS-like table-full flood with retries),
//! feeds them through the pipeline (aggregate + amplification) and one
//! sink: none, the human view, ndjson to a file, the capture writer
//! (`--write`, which takes every event). Rounds alternate between the
//! sinks; the figure is events per CPU-second of the loop (the capture's
//! I/O thread included), the per-core rate the consumer can sustain.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_tests::Scratch;

use super::fmt_spread;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Measurements per sink.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Synthetic events per measurement.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Distinct client addresses in the stream.
    #[arg(long, default_value_t = 1_000)]
    pub sources: u32,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            rounds: 5,
            events: 2_000_000,
            sources: 1_000,
        }
    }
}

/// What the example prints.
struct Run {
    events: u64,
    selected: u64,
    seconds: f64,
    cpu_seconds: f64,
    retransmissions: u64,
}

const SINKS: [(&str, &str); 4] = [
    ("none", "pipeline only"),
    ("human", "human view"),
    ("ndjson", "ndjson to a file"),
    ("capture", "capture writer (--write)"),
];

fn once(example: &Path, sink: &str, out: &Path, a: &Args) -> Result<Run> {
    let o = Command::new(example)
        .args(["--sink", sink, "--events", &a.events.to_string()])
        .args(["--sources", &a.sources.to_string()])
        .arg("--out")
        .arg(out)
        .output()
        .context("running the pipeline example")?;
    if !o.status.success() {
        bail!(
            "pipeline --sink {sink} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).context("the pipeline example's output")?;
    let u = |k: &str| {
        v[k].as_u64()
            .with_context(|| format!("the example printed no {k}"))
    };
    let f = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("the example printed no {k}"))
    };
    let r = Run {
        events: u("events")?,
        selected: u("selected")?,
        seconds: f("seconds")?,
        cpu_seconds: f("cpu_seconds")?,
        retransmissions: u("retransmissions")?,
    };
    // A pipeline that skipped its work must not look fast: every event
    // selected, and the retries the stream holds (3 of each 4 sends
    // of a query) found by the amplification detector.
    let want_retries =
        a.events - a.events.div_ceil(u64::from(a.sources) * 4) * u64::from(a.sources);
    if r.events != a.events || r.selected != a.events || r.retransmissions < want_retries {
        bail!(
            "pipeline --sink {sink}: {} events, {} selected, {} retransmissions (want {} / {} / ≥ {want_retries})",
            r.events,
            r.selected,
            r.retransmissions,
            a.events,
            a.events
        );
    }
    Ok(r)
}

pub fn run(a: &Args) -> Result<String> {
    let example = super::build_example("pipeline")?;
    let scratch = Scratch::new("bench", "pipeline")?;
    let mut runs: Vec<Vec<Run>> = SINKS.iter().map(|_| Vec::new()).collect();
    for round in 0..a.rounds {
        for (i, (sink, _)) in SINKS.iter().enumerate() {
            let out = scratch.path(&format!("out.{sink}"));
            let r = once(&example, sink, &out, a).with_context(|| format!("round {round}"))?;
            eprintln!(
                "round {round}: {sink:<8} {:.3} s wall {:.3} s CPU",
                r.seconds, r.cpu_seconds
            );
            let _ = std::fs::remove_file(&out);
            runs[i].push(r);
        }
    }
    let per_cpu = |r: &Run| r.events as f64 / r.cpu_seconds.max(1e-6);
    let base: Vec<f64> = runs[0].iter().map(per_cpu).collect();
    let mut md = format!(
        "Synthetic ring records ({} events, a table-full flood from {} client addresses, each query \
         sent 4 times) decoded and fed through the pipeline (aggregate + amplification) and one \
         sink, in one thread as the live consumer does (`conntrack-trace/examples/pipeline.rs`); \
         no kernel. Per core: events / CPU seconds of the loop (the capture's I/O thread \
         included). {} rounds, sinks alternating; median [min–max].\n\n\
         | sink | events per CPU-second | events/s (wall) | CPU per event vs no sink |\n\
         |---|---|---|---|\n",
        a.events, a.sources, a.rounds
    );
    for ((sink, label), r) in SINKS.iter().zip(&runs) {
        let rates: Vec<f64> = r.iter().map(per_cpu).collect();
        md.push_str(&format!(
            "| {label} (`{sink}`) | {} | {} | {} |\n",
            fmt_spread(rates.clone(), 0),
            fmt_spread(r.iter().map(|r| r.events as f64 / r.seconds).collect(), 0),
            fmt_spread(base.iter().zip(&rates).map(|(b, x)| b / x).collect(), 2),
        ));
    }
    Ok(md)
}
