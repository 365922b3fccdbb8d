//! A crash loses at most 100 ms (issue 24 §3): the capture writer hands its
//! records to the kernel at least every 100 ms whatever `--interval` is, so
//! a tracer SIGKILLed mid-flood with `--interval 10s` leaves a capture that
//! ends within 100 ms of the kill, not up to an interval (or a 256 KiB
//! chunk) before it.
//!
//! The bound is derived from what was measured, never a guessed slack: the
//! kernel's drop rate during the flood turns time into events, and the
//! time the tracer's threads spent runnable but not running during the
//! flood (their schedstat `run_delay`, which a loaded machine or TCG makes
//! large) is added to the 100 ms, as are the ring's batching pause and the
//! drops counted while the kill itself was in flight.

use std::{
    fs,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{
    Scratch, Sysctl, Topology, Tracer, ctt, kernel_test, path_str as s, traffic,
};
use serde_json::Value;

/// The writer's handover period (conntrack-trace/src/capture/writer.rs,
/// `HANDOVER`).
const HANDOVER: Duration = Duration::from_millis(100);
/// The longest the consumer waits after draining the ring before it polls
/// again (conntrack-trace/src/live.rs, `ring_pause`).
const RING_PAUSE: Duration = Duration::from_millis(5);
/// Datagrams per second of the flood: every one beyond the table's 32
/// entries is a `table_full` drop.
const RATE: f64 = 1000.0;

/// CLOCK_MONOTONIC, the clock of the events' `ts_ns` (bpf_ktime_get_ns).
fn mono_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The process whose command line names `marker` (the capture path is
/// unique to this test run).
fn pid_naming(marker: &str) -> Result<u32> {
    for e in fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|a| a == marker.as_bytes()) {
            return Ok(pid);
        }
    }
    anyhow::bail!("no process names {marker}")
}

/// Nanoseconds the process's threads spent waiting on a run queue, summed
/// (/proc/PID/task/TID/schedstat: on-CPU ns, run_delay ns, slices).
fn run_delay_ns(pid: u32) -> Result<u64> {
    let mut sum = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let stat = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        sum += stat
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(sum)
}

/// write(2) calls so far of the tracer's capture I/O thread (its `comm` is
/// `capture-io`; /proc/PID/task/TID/io `syscw`): what handing records over
/// every 100 ms costs.
fn capture_writes(pid: u32) -> Result<u64> {
    for t in fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        if fs::read_to_string(t.path().join("comm"))
            .unwrap_or_default()
            .trim()
            == "capture-io"
        {
            let io = fs::read_to_string(t.path().join("io"))?;
            return io
                .lines()
                .find_map(|l| l.strip_prefix("syscw:"))
                .and_then(|v| v.trim().parse().ok())
                .context("no syscw in /proc/PID/task/TID/io");
        }
    }
    anyhow::bail!("no capture-io thread in {pid}")
}

/// (table_full events, last event's ts_ns) of a capture, by `export`.
fn captured(file: &Path) -> Result<(u64, u64)> {
    let (code, out, err) = ctt(&["export", s(file), "--format", "ndjson"])?;
    ensure!(code == 0, "export of a killed capture: {err}");
    let (mut full, mut last) = (0, 0);
    for line in out.lines() {
        let v: Value = serde_json::from_str(line)?;
        if let Some(ts) = v["ts_ns"].as_u64() {
            last = last.max(ts);
            full += u64::from(v["kind"] == "table_full");
        }
    }
    Ok((full, last))
}

#[test]
fn sigkill_loses_at_most_100ms() -> Result<()> {
    let Some(_lock) = kernel_test("sigkill_loses_at_most_100ms")? else {
        return Ok(());
    };
    let dir = Scratch::new("crash", "kill")?;
    let file = dir.path("killed.ctt");
    let topo = Topology::new("ks", 64)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 32)?;
    // An interval far longer than the flood: before issue 24, nothing but
    // full 256 KiB chunks (~2 500 events) reached the file before it.
    let tracer = Tracer::start(&[
        "--netns",
        &topo.server.name,
        "--interval",
        "10s",
        "--write",
        s(&file),
    ])?;
    let pid = pid_naming(s(&file))?;
    let before = topo.server.ct_stats()?;
    let delay_before = run_delay_ns(pid)?;
    let writes_before = capture_writes(pid)?;
    let stop = AtomicBool::new(false);
    let (cp, cip, sip) = (topo.client.path(), topo.client_ip, topo.server_ip);
    let (flood_start, killed) = std::thread::scope(|scope| -> Result<_> {
        let flood_start = Instant::now();
        let bg = scope.spawn(|| {
            traffic::udp_paced(
                &cp,
                cip,
                sip,
                53,
                40_000..50_000,
                RATE,
                |_| vec![0; 8],
                Some(&stop),
            )
        });
        // Mid-flood: once 1 000 drops are counted (a fact, bounded wait).
        let deadline = Instant::now() + Duration::from_secs(60);
        while topo.server.ct_stats()?.since(&before)?.drop < 1000 {
            ensure!(Instant::now() < deadline, "fewer than 1000 drops in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let delay_at_kill = run_delay_ns(pid)?;
        let writes = capture_writes(pid)? - writes_before;
        let at_kill = topo.server.ct_stats()?.since(&before)?.drop;
        let kill_ns = mono_ns();
        let flood_s = flood_start.elapsed().as_secs_f64();
        tracer.kill()?;
        let after_kill = topo.server.ct_stats()?.since(&before)?.drop;
        let kill_done_ns = mono_ns();
        stop.store(true, Ordering::Relaxed);
        let sent = bg.join().map_err(|_| anyhow::anyhow!("flood thread"))??;
        Ok((
            flood_s,
            (
                at_kill,
                after_kill,
                kill_ns,
                kill_done_ns,
                delay_at_kill - delay_before,
                sent,
                writes,
            ),
        ))
    })?;
    let (at_kill, after_kill, kill_ns, kill_done_ns, run_delay, sent, writes) = killed;
    let (got, last_ns) = captured(&file)?;

    // What was measured: the drop rate up to the kill, and how long the
    // tracer could have been kept from running.
    let rate = at_kill as f64 / flood_start;
    let slack = HANDOVER + RING_PAUSE + Duration::from_nanos(run_delay);
    let lost = after_kill.saturating_sub(got);
    let allowed = (rate * slack.as_secs_f64()).ceil() as u64 + (after_kill - at_kill) + 1;
    let gap = Duration::from_nanos(kill_done_ns.saturating_sub(last_ns));
    // The flood's own spacing: the last drop before the kill can be one
    // datagram's time before it.
    let gap_allowed =
        slack + Duration::from_nanos(kill_done_ns - kill_ns) + Duration::from_secs_f64(1.0 / rate);
    let lost_at_kill = at_kill.saturating_sub(got);
    eprintln!(
        "sigkill: sent {sent} in {flood_start:.2} s ({rate:.0} drops/s); kernel drop {at_kill} at \
         the kill ({after_kill} once it returned); capture {got} table_full, last event {:.1} ms \
         before the kill returned; lost {lost_at_kill} to {lost} ({:.1} to {:.1} ms of drops), \
         allowed {allowed} (100 ms + 5 ms + {:.1} ms run delay + the kill's own {} drops); \
         capture I/O thread: {writes} write(2) in {flood_start:.2} s ({:.1}/s)",
        gap.as_secs_f64() * 1e3,
        lost_at_kill as f64 / rate * 1e3,
        lost as f64 / rate * 1e3,
        run_delay as f64 / 1e6,
        after_kill - at_kill,
        writes as f64 / flood_start,
    );
    ensure!(
        got <= after_kill,
        "the capture holds more drops ({got}) than the kernel counted ({after_kill})"
    );
    ensure!(
        got >= 32,
        "the capture must hold the flood's drops, not only its header: {got}"
    );
    ensure!(
        lost <= allowed,
        "lost {lost} drops, more than {allowed} (100 ms at {rate:.0}/s plus the measured delays)"
    );
    // One write per handover at most (the chunks here stay far below
    // 256 KiB) and one per --interval tick (a slow TCG guest can take more
    // than 10 s to reach 1 000 drops), plus the one in flight at the first
    // read.
    let max_writes = (flood_start / HANDOVER.as_secs_f64()).ceil() as u64
        + (flood_start / 10.0).ceil() as u64
        + 1;
    ensure!(
        writes <= max_writes,
        "{writes} write(2) in {flood_start:.2} s, more than one per 100 ms ({max_writes})"
    );
    ensure!(
        gap <= gap_allowed,
        "the capture ends {gap:?} before the kill returned, more than {gap_allowed:?}"
    );
    // A report reads it as cut short, as any killed capture.
    let (code, out, err) = ctt(&["report", s(&file), "--format", "json"])?;
    ensure!(code == 0, "report of a killed capture: {err}");
    let r: Value = serde_json::from_str(&out).context("report JSON")?;
    assert_eq!(r["check"]["trailer"], false);
    assert_eq!(r["summary"]["events"]["table_full"].as_u64(), Some(got));
    Ok(())
}
