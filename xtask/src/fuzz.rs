//! `cargo xtask fuzz`: runs each cargo-fuzz target in `fuzz/` for a bounded
//! time and keeps what it finds.
//!
//! Each target starts from its seeds, its regressions and the corpus of
//! earlier runs (`fuzz/corpus/<target>`, not committed). An input that
//! crashed, hung or exhausted memory (libFuzzer's `crash-`, `timeout-`,
//! `oom-` and `leak-` artifacts) is copied to `fuzz/regressions/<target>/`,
//! which the unit tests replay (`capture::fuzz_regressions` in
//! conntrack-trace), and the run fails. Not part of `cargo xtask test`: a
//! minute per target is too slow for every run.

use std::{
    collections::BTreeSet,
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::workspace_root;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fuzzing time per target, in seconds (the build comes on top).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (repeatable; default: every target in
    /// fuzz/fuzz_targets).
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
}

/// libFuzzer's artifact prefixes that mean "this input broke the target"
/// (`slow-unit-` only says an input was slow, and is not kept).
const FAILURES: [&str; 4] = ["crash-", "timeout-", "oom-", "leak-"];

/// Seconds one input may run before libFuzzer calls it a hang (its default,
/// 1200 s, would let one hang eat the whole budget).
const INPUT_TIMEOUT_S: u64 = 10;

struct Outcome {
    target: String,
    runs: Option<u64>,
    seconds: Option<u64>,
    found: Vec<PathBuf>,
    log: PathBuf,
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// The targets, from `fuzz/fuzz_targets/*.rs` (one `[[bin]]` each).
fn all_targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut v: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    v.sort();
    ensure!(!v.is_empty(), "no fuzz targets in {}", dir.display());
    Ok(v)
}

/// The failure artifacts of `target` now (names only).
fn artifacts(target: &str) -> BTreeSet<String> {
    fs::read_dir(fuzz_dir().join("artifacts").join(target))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| FAILURES.iter().any(|p| n.starts_with(p)))
                .collect()
        })
        .unwrap_or_default()
}

/// `cargo +nightly fuzz` in fuzz/, with the environment of the outer cargo
/// (which runs xtask on the stable toolchain) taken out.
fn cargo_fuzz() -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly").arg("fuzz").current_dir(fuzz_dir());
    for v in ["RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN"] {
        c.env_remove(v);
    }
    c
}

/// A number after `key` in libFuzzer's output (`stat::number_of_executed_units: 123`,
/// `Done 123 runs in 60 second(s)`).
fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.trim().parse().ok())
}

fn done_seconds(log: &str) -> Option<u64> {
    // "Done 2014567 runs in 61 second(s)"
    log.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("Done ")?;
        let (_, after) = rest.split_once(" runs in ")?;
        after.split_whitespace().next()?.parse().ok()
    })
}

fn run_target(target: &str, seconds: u64) -> Result<Outcome> {
    let dir = fuzz_dir();
    let corpus = dir.join("corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let regressions = dir.join("regressions").join(target);
    fs::create_dir_all(&regressions)?;
    let logs = dir.join("target/xtask-fuzz");
    fs::create_dir_all(&logs)?;
    let log = logs.join(format!("{target}.log"));
    let before = artifacts(target);
    eprintln!(
        "xtask fuzz: {target} for {seconds} s (log: {})",
        log.display()
    );
    let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    // report_file writes its input to a scratch file in the temporary
    // directory; keep it under fuzz/target rather than leaving one in /tmp
    // per run.
    let tmp = logs.join("tmp");
    fs::create_dir_all(&tmp)?;
    // The first corpus directory receives new inputs; seeds and
    // regressions are only read (so every regression is replayed first).
    let status = cargo_fuzz()
        .args(["run", "-O", "-a", target])
        .arg(format!("corpus/{target}"))
        .arg(format!("seeds/{target}"))
        .arg(format!("regressions/{target}"))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg("-print_final_stats=1")
        .env("TMPDIR", &tmp)
        .stdout(Stdio::null())
        .stderr(out)
        .status()
        .context("running cargo fuzz run")?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    let mut found = Vec::new();
    for name in artifacts(target).difference(&before) {
        let src = dir.join("artifacts").join(target).join(name);
        let dst = regressions.join(name);
        fs::copy(&src, &dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        found.push(dst);
    }
    if !status.success() && found.is_empty() {
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "cargo fuzz run {target} failed ({status}) without an artifact:\n{}",
            tail.join("\n")
        );
    }
    Ok(Outcome {
        target: target.to_owned(),
        runs: stat(&text, "stat::number_of_executed_units:"),
        seconds: done_seconds(&text),
        found,
        log,
    })
}

pub fn run(a: &Args) -> Result<()> {
    ensure!(a.seconds > 0, "--seconds must be at least 1");
    let known = all_targets()?;
    let targets = if a.targets.is_empty() {
        known.clone()
    } else {
        for t in &a.targets {
            ensure!(
                known.contains(t),
                "no fuzz target {t} (targets: {})",
                known.join(", ")
            );
        }
        a.targets.clone()
    };
    // One build for every target (the instrumented conntrack-trace library).
    eprintln!("xtask fuzz: building the fuzz targets (nightly, ASan, debug assertions)");
    let status = cargo_fuzz()
        .args(["build", "-O", "-a"])
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    let mut outcomes = Vec::new();
    for t in &targets {
        outcomes.push(run_target(t, a.seconds)?);
    }
    eprintln!("xtask fuzz: results");
    let mut failed = false;
    for o in &outcomes {
        let runs = o.runs.map_or_else(|| "?".to_owned(), |n| n.to_string());
        let secs = o.seconds.map_or_else(|| "?".to_owned(), |n| n.to_string());
        if o.found.is_empty() {
            eprintln!(
                "  {:<14} {runs:>10} runs in {secs} s, nothing found",
                o.target
            );
        } else {
            failed = true;
            eprintln!(
                "  {:<14} {runs:>10} runs in {secs} s, FOUND {} (log: {}):",
                o.target,
                o.found.len(),
                o.log.display()
            );
            for p in &o.found {
                eprintln!("      {}", p.display());
            }
        }
    }
    if failed {
        bail!(
            "fuzzing found inputs that break a target; they are in fuzz/regressions/ \
             (commit them with the fix: `cargo test -p conntrack-trace fuzz_regressions` replays them)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_stats() {
        let log = "#1024\tpulse  cov: 10\nDone 2014567 runs in 61 second(s)\nstat::number_of_executed_units: 2014567\nstat::peak_rss_mb: 80\n";
        assert_eq!(
            stat(log, "stat::number_of_executed_units:"),
            Some(2_014_567)
        );
        assert_eq!(done_seconds(log), Some(61));
        assert_eq!(stat("", "stat::number_of_executed_units:"), None);
    }
}
