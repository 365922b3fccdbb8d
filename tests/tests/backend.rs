//! `--backend`: what `auto` picks on this kernel and why, a clear error when
//! the asked-for backend is refused, and the counters backend's totals
//! against the kernel's own counters.
//!
//! The fexit backend itself can only be proven where the kernel accepts
//! trampolines (the VM kernels of `cargo xtask vm-test`); here the tests
//! adapt to what this kernel accepts and check the reasons given.

use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{Sysctl, Topology, binary, json, kernel_test};

/// Runs a one-second trace with `args`; returns (exit code, stdout, stderr).
fn run_trace(args: &[&str]) -> Result<(i32, String, String)> {
    let bin = binary();
    ensure!(bin.exists(), "{} not built", bin.display());
    let out = Command::new(&bin)
        .args(["trace", "--duration", "1s", "--format", "ndjson"])
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Whether this kernel accepts the fexit backend at all.
fn fexit_accepted() -> Result<bool> {
    Ok(run_trace(&["--backend", "fexit"])?.0 == 0)
}

#[test]
fn auto_says_which_backend_and_why() -> Result<()> {
    let Some(_lock) = kernel_test("auto_says_which_backend_and_why")? else {
        return Ok(());
    };
    let (code, stdout, stderr) = run_trace(&["--backend", "auto"])?;
    ensure!(code == 0, "exit {code}: {stderr}");
    let s = json::Output::parse(&stdout)?.summary;
    eprintln!(
        "auto: {} {:?}; stderr: {}",
        s.hooks,
        s.backend_refused,
        stderr.trim()
    );
    let line = stderr
        .lines()
        .find(|l| l.starts_with("conntrack-trace: backend "))
        .context("no backend line on stderr")?;
    if s.backend == "counters" {
        // A kernel where neither per-packet backend can work (Debian 5.10:
        // no module BTF for fexit, no kfree_skb drop reason before 5.17):
        // auto falls back to the kernel's counters and says why, twice.
        assert!(!s.per_packet);
        let names: Vec<&str> = s
            .backend_refused
            .iter()
            .map(|r| r.backend.as_str())
            .collect();
        assert_eq!(names, ["fexit", "tracepoint"], "{:?}", s.backend_refused);
        for r in &s.backend_refused {
            assert!(!r.reason.is_empty());
            assert!(
                line.contains(&format!("; {} refused: {}", r.backend, r.reason)),
                "{line}"
            );
        }
        return Ok(());
    }
    assert!(s.per_packet);
    if fexit_accepted()? {
        // A kernel with trampolines: auto's first choice runs.
        assert_eq!(s.backend, "fexit");
        assert!(s.backend_refused.is_empty(), "{:?}", s.backend_refused);
        return Ok(());
    }
    // This host (and 5.10): fexit refused, so the tracepoint backend runs
    // and the refusal is reported on stderr and in the summary.
    assert_eq!(s.backend, "tracepoint");
    assert!(
        s.hooks.starts_with("tracepoint (tp_btf/kfree_skb"),
        "{}",
        s.hooks
    );
    assert_eq!(s.backend_refused.len(), 1, "{:?}", s.backend_refused);
    let r = &s.backend_refused[0];
    assert_eq!(r.backend, "fexit");
    // This host: the kernel's answer and the hook; Debian 5.10 (no module
    // BTF): the function that BTF lacks.
    assert!(
        (r.reason.contains("refused") && (r.reason.contains("fexit") || r.reason.contains("fentry")))
            || r.reason.contains("kernel BTF has no function"),
        "the reason names the hook and the kernel's answer, or what BTF lacks: {}",
        r.reason
    );
    assert!(
        line.starts_with("conntrack-trace: backend tracepoint ("),
        "{line}"
    );
    assert!(
        line.contains(&format!("; fexit refused: {}", r.reason)),
        "{line}"
    );
    Ok(())
}

#[test]
fn refused_backend_is_a_one_line_error() -> Result<()> {
    let Some(_lock) = kernel_test("refused_backend_is_a_one_line_error")? else {
        return Ok(());
    };
    let (code, stdout, stderr) = run_trace(&["--backend", "fexit"])?;
    if code == 0 {
        let s = json::Output::parse(&stdout)?.summary;
        assert_eq!(s.backend, "fexit");
        eprintln!("SKIPPED refused_backend_is_a_one_line_error: this kernel accepts fexit");
        return Ok(());
    }
    // Refused at load or attach (5), or a missing function/BTF (4).
    assert!(code == 5 || code == 4, "exit {code}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    if code == 4 {
        // Nothing to load: the kernel's BTF lacks what the programs hook
        // (e.g. no module BTF for nf_conntrack on Debian 5.10).
        assert!(
            lines[0].starts_with("conntrack-trace: error: kernel BTF has no "),
            "{stderr}"
        );
        assert!(stdout.is_empty(), "no partial output: {stdout}");
        return Ok(());
    }
    assert!(
        lines[0].starts_with("conntrack-trace: error: kernel refused to"),
        "{stderr}"
    );
    assert!(
        lines[0].contains("fexit ") || lines[0].contains("fentry "),
        "names the hook: {stderr}"
    );
    assert!(lines[0].contains("os error"), "gives the errno: {stderr}");
    assert!(stdout.is_empty(), "no partial output: {stdout}");
    Ok(())
}

/// A table_full flood traced by the counters backend: no events, and its
/// per-kind totals are the kernel's counter deltas.
#[test]
fn counters_backend_reports_kernel_totals() -> Result<()> {
    let Some(_lock) = kernel_test("counters_backend_reports_kernel_totals")? else {
        return Ok(());
    };
    let topo = Topology::new("cb", 40)?;
    const MAX: u64 = 64;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let (sent, out, delta) = topo.udp_flood(
        false,
        26_000..26_300,
        &["--backend", "counters", "--interval", "200ms"],
    )?;
    let s = &out.summary;
    eprintln!(
        "counters: sent {sent}, observed {:?}, kernel drop +{}, early_drop +{}, insert_failed +{}",
        s.observed, delta.drop, delta.early_drop, delta.insert_failed
    );
    assert!(
        delta.drop >= (sent - MAX) / 2,
        "the table must have overflowed: {delta:?}"
    );
    assert_eq!(s.backend, "counters");
    assert!(!s.per_packet);
    assert!(out.events.is_empty(), "no per-packet events");
    assert!(s.top.is_empty());
    assert_eq!(
        s.observed.table_full,
        delta.drop + delta.chaintoolong - delta.insert_failed,
        "table_full = drop - (insert_failed - chaintoolong)"
    );
    assert_eq!(s.observed.early_drop, delta.early_drop);
    assert_eq!(s.observed.insert_failed, delta.insert_failed);
    assert_eq!(s.kernel.drop, delta.drop);
    assert_eq!(s.events, json::Kinds::default());
    assert!(!s.complete, "no events: never complete");
    Ok(())
}
