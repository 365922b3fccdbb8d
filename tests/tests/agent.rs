//! `conntrack-trace agent` with real parts: a real Prometheus server
//! scrapes it during a table-full flood, and PromQL through its HTTP API
//! returns exactly the kernel's `drop` delta for the flood's source; the
//! per-source cardinality cap holds with thousands of sources; the flight
//! recorder survives SIGKILL and a restart, and its rolling bound holds
//! under a sustained flood.

use std::{
    fs,
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{
    Sysctl, Topology,
    agent::{Agent, sample},
    binary, in_netns, json, kernel_test,
    prometheus::{Prometheus, needs, temp_dir},
    traffic,
};

/// A real Prometheus scrapes the agent during a table-full flood; PromQL
/// for the flood's source returns exactly the kernel's drop delta.
#[test]
fn prometheus_sees_exactly_the_kernels_drops() -> Result<()> {
    if !needs("prometheus", "prometheus_sees_exactly_the_kernels_drops") {
        return Ok(());
    }
    let Some(_lock) = kernel_test("prometheus_sees_exactly_the_kernels_drops")? else {
        return Ok(());
    };
    let topo = Topology::new("ag", 81)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let agent = Agent::start(&[])?;
    let prom = Prometheus::start(agent.addr)?;
    ensure!(
        prom.wait_for("up{job=\"conntrack-trace\"}", 1.0, Duration::from_secs(30))? == Some(1.0),
        "prometheus never scraped the agent"
    );
    let before = topo.server.ct_stats()?;
    let sent = traffic::udp_oneshots(
        &topo.client.path(),
        topo.client_ip,
        topo.server_ip,
        53,
        30_000..30_500,
    )?;
    let delta = topo.server.ct_stats()?.since(&before)?;
    ensure!(
        delta.drop > 100,
        "the table overflowed: sent {sent}, {delta:?}"
    );
    let src = topo.client_ip.to_string();
    let q = format!(
        "conntrack_trace_source_drops_total{{kind=\"table_full\",src=\"{src}\",proto=\"udp\",port=\"53\",netns=\"{}\"}}",
        topo.server.name
    );
    let got = prom.wait_for(&q, delta.drop as f64, Duration::from_secs(20))?;
    eprintln!(
        "PromQL {q} = {got:?}; kernel drop delta {} (sent {sent})",
        delta.drop
    );
    assert_eq!(
        got,
        Some(delta.drop as f64),
        "PromQL equals the kernel's drop delta"
    );
    let per_ns = format!(
        "conntrack_trace_drops_total{{kind=\"table_full\",netns=\"{}\"}}",
        topo.server.name
    );
    assert_eq!(
        prom.wait_for(&per_ns, delta.drop as f64, Duration::from_secs(5))?,
        Some(delta.drop as f64)
    );
    // The kernel's own counter, as exported, moved by the same amount.
    let kq = format!(
        "conntrack_trace_kernel_drop_total{{netns=\"{}\"}}",
        topo.server.name
    );
    let k = prom.query(&kq)?;
    assert_eq!(k.len(), 1, "{kq}: {k:?}");
    assert_eq!(
        k[0].1 as u64,
        topo.server.ct_stats()?.drop,
        "absolute kernel counter"
    );
    let fill = prom.query(&format!(
        "conntrack_trace_entries{{netns=\"{}\"}} / conntrack_trace_max_entries{{netns=\"{}\"}}",
        topo.server.name, topo.server.name
    ))?;
    assert!(
        fill.first().is_some_and(|f| f.1 >= 0.9),
        "table full: {fill:?}"
    );
    let err = agent.stop()?;
    json::state_lines(&err, true)?;
    assert!(err.contains("\"event\":\"drops_started\""), "{err}");
    assert!(err.contains("\"event\":\"table_high\""), "{err}");
    Ok(())
}

/// One datagram to each destination port in `dports` from an ephemeral
/// source port: each is its own source (address, proto, port) series.
fn udp_many_ports(topo: &Topology, dports: std::ops::Range<u16>) -> Result<u64> {
    let (src, dst) = (topo.client_ip, topo.server_ip);
    in_netns(&topo.client.path(), move || -> Result<u64> {
        let s = UdpSocket::bind(SocketAddr::from((src, 0)))?;
        let mut n = 0;
        for p in dports {
            s.send_to(b"ctt", SocketAddr::from((dst, p)))?;
            n += 1;
        }
        Ok(n)
    })?
}

/// Thousands of sources, a cap of 50: at most 50 series plus `other`, no
/// drop lost from the sum, and the folded series counted.
#[test]
fn cardinality_cap_holds_with_thousands_of_sources() -> Result<()> {
    if !needs(
        "prometheus",
        "cardinality_cap_holds_with_thousands_of_sources",
    ) {
        return Ok(());
    }
    let Some(_lock) = kernel_test("cardinality_cap_holds_with_thousands_of_sources")? else {
        return Ok(());
    };
    let topo = Topology::new("ac", 82)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    const CAP: usize = 50;
    let agent = Agent::start(&["--max-series", &CAP.to_string()])?;
    let prom = Prometheus::start(agent.addr)?;
    ensure!(
        prom.wait_for("up{job=\"conntrack-trace\"}", 1.0, Duration::from_secs(30))? == Some(1.0),
        "prometheus never scraped the agent"
    );
    let before = topo.server.ct_stats()?;
    let sent = udp_many_ports(&topo, 2000..6000)?;
    let delta = topo.server.ct_stats()?.since(&before)?;
    ensure!(
        delta.drop > 3000,
        "thousands of sources dropped: sent {sent}, {delta:?}"
    );
    let sum = format!(
        "sum(conntrack_trace_source_drops_total{{kind=\"table_full\",netns=\"{}\"}})",
        topo.server.name
    );
    let got = prom.wait_for(&sum, delta.drop as f64, Duration::from_secs(20))?;
    let series = prom.query("count(conntrack_trace_source_drops_total)")?;
    let folded = prom.query("conntrack_trace_source_series_folded_total")?;
    eprintln!(
        "{} sources dropped (kernel drop +{}): PromQL sum {got:?}, series {series:?}, folded {folded:?}",
        delta.drop, delta.drop
    );
    assert_eq!(got, Some(delta.drop as f64), "folding loses no drop");
    let n = series.first().map_or(0.0, |s| s.1) as usize;
    // One `other` per (kind, netns): table_full here, and early_drop
    // should an eviction happen elsewhere.
    assert!(n <= CAP + 2, "{n} series for a cap of {CAP}");
    let other = prom.query(&format!(
        "conntrack_trace_source_drops_total{{src=\"other\",kind=\"table_full\",netns=\"{}\"}}",
        topo.server.name
    ))?;
    assert_eq!(other.len(), 1, "{other:?}");
    let f = folded.first().map_or(0.0, |x| x.1) as u64;
    // Every dropped port is its own series; those past the cap are folded.
    assert!(
        f >= delta.drop - CAP as u64,
        "folded {f} of {} sources",
        delta.drop
    );
    // The exposition itself is bounded too.
    let text = agent.metrics()?;
    let lines = text
        .lines()
        .filter(|l| l.starts_with("conntrack_trace_source_drops_total{"))
        .count();
    assert!(lines <= CAP + 2, "{lines} exposed series");
    json::state_lines(&agent.stop()?, true)?;
    Ok(())
}

fn report_json(files: &[PathBuf]) -> Result<(serde_json::Value, String)> {
    let out = Command::new(binary())
        .arg("report")
        .args(files)
        .args(["--format", "json"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "report failed: {err}");
    Ok((json::report_value(&String::from_utf8(out.stdout)?)?, err))
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    Ok(v)
}

fn incident_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("incident-"))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn run_files(dir: &Path) -> Result<std::collections::BTreeMap<String, Vec<PathBuf>>> {
    let mut runs = std::collections::BTreeMap::<String, Vec<PathBuf>>::new();
    for p in files_in(&dir.join("rolling"))? {
        let name = p
            .file_name()
            .context("name")?
            .to_string_lossy()
            .into_owned();
        let run = name.split(".ctt").next().unwrap_or_default().to_owned();
        runs.entry(run).or_default().push(p);
    }
    Ok(runs)
}

/// SIGKILL mid-flood: the recorder's files read back up to the last write
/// and the drops made an incident; a restart continues in the same
/// directory and deletes no incident.
#[test]
fn recorder_survives_sigkill_and_restart() -> Result<()> {
    let Some(_lock) = kernel_test("recorder_survives_sigkill_and_restart")? else {
        return Ok(());
    };
    let topo = Topology::new("ak", 83)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let dir = temp_dir("rec")?;
    let d = dir.to_string_lossy().into_owned();
    let args = [
        "--record-dir",
        &d,
        "--record-max-size",
        "4M",
        "--interval",
        "200ms",
    ];
    let agent = Agent::start(&args)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, killed_at) = std::thread::scope(|s| -> Result<(u64, Instant)> {
        let flood = s.spawn(|| {
            traffic::udp_paced(
                &topo.client.path(),
                topo.client_ip,
                topo.server_ip,
                53,
                40_000..52_000,
                4000.0,
                |_| b"ctt".to_vec(),
                Some(&stop),
            )
        });
        std::thread::sleep(Duration::from_millis(1500));
        let at = Instant::now();
        let pid = agent.pid();
        // SAFETY: SIGKILL to our own child, mid-flood.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = flood
            .join()
            .map_err(|_| anyhow::anyhow!("flood panicked"))??;
        Ok((sent, at))
    })?;
    let _ = killed_at;
    let err = agent.kill().unwrap_or_default();
    // SIGKILL may cut the last line short: the complete ones are typed.
    json::state_lines(&err, false)?;
    let runs = run_files(&dir)?;
    ensure!(runs.len() == 1, "one run: {runs:?}");
    let files: Vec<PathBuf> = runs.values().next().cloned().unwrap_or_default();
    let (r, warn) = report_json(&files)?;
    let events = r["events"]
        .as_u64()
        .or_else(|| r["totals"]["events"].as_u64());
    eprintln!(
        "after SIGKILL ({sent} sent): {} files, report warnings: {}",
        files.len(),
        warn.trim()
    );
    assert!(
        warn.contains("no trailer"),
        "a killed run has no trailer: {warn}"
    );
    let incidents = incident_dirs(&dir)?;
    assert_eq!(incidents.len(), 1, "drops started an incident: {err}");
    let inc_files = files_in(&incidents[0])?;
    let (ri, _) = report_json(&inc_files)?;
    let _ = (events, ri);
    // Restart in the same directory: a new run, the incident untouched.
    let agent = Agent::start(&args)?;
    // SAFETY: SIGUSR1 to our own child: keep an incident now.
    unsafe { libc::kill(agent.pid(), libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(600));
    let err2 = agent.stop()?;
    json::state_lines(&err2, true)?;
    assert!(err2.contains("\"reason\":\"SIGUSR1\""), "{err2}");
    let runs = run_files(&dir)?;
    assert_eq!(runs.len(), 2, "the first run's files are kept: {runs:?}");
    assert_eq!(
        files_in(&incidents[0])?,
        inc_files,
        "the first incident is untouched"
    );
    assert_eq!(
        incident_dirs(&dir)?.len(),
        2,
        "SIGUSR1 kept a second incident"
    );
    // The clean run ends with a trailer.
    let second: Vec<PathBuf> = runs.values().nth(1).cloned().unwrap_or_default();
    let (_, warn2) = report_json(&second)?;
    assert!(!warn2.contains("no trailer"), "{warn2}");
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// Under a sustained flood the rolling files never exceed the bound by
/// more than one file.
#[test]
fn recorder_size_bound_holds_under_flood() -> Result<()> {
    let Some(_lock) = kernel_test("recorder_size_bound_holds_under_flood")? else {
        return Ok(());
    };
    let topo = Topology::new("ab", 84)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 16)?;
    let dir = temp_dir("bound")?;
    let d = dir.to_string_lossy().into_owned();
    const MAX: u64 = 512 << 10;
    const FILE: u64 = 64 << 10;
    let agent = Agent::start(&["--record-dir", &d, "--record-max-size", "512k"])?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut peak = 0u64;
    let mut samples = 0;
    let sent = std::thread::scope(|s| -> Result<u64> {
        let flood = s.spawn(|| {
            traffic::udp_oneshots(
                &topo.client.path(),
                topo.client_ip,
                topo.server_ip,
                53,
                1025..60_000,
            )
        });
        while !flood.is_finished() {
            let bytes: u64 = files_in(&dir.join("rolling"))?
                .iter()
                .filter_map(|p| p.metadata().ok())
                .map(|m| m.len())
                .sum();
            peak = peak.max(bytes);
            samples += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flood
            .join()
            .map_err(|_| anyhow::anyhow!("flood panicked"))?
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    let text = agent.metrics()?;
    let recorded = sample(
        &text,
        &format!(
            "conntrack_trace_drops_total{{kind=\"table_full\",netns=\"{}\"}}",
            topo.server.name
        ),
    )
    .unwrap_or(0.0);
    json::state_lines(&agent.stop()?, true)?;
    let end: u64 = files_in(&dir.join("rolling"))?
        .iter()
        .filter_map(|p| p.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "sent {sent}, {recorded} drops; rolling files peaked at {peak} bytes over {samples} samples (bound {MAX} + one file {FILE}); {end} at the end"
    );
    assert!(recorded > 20_000.0, "a sustained flood: {recorded}");
    assert!(peak <= MAX + FILE, "peak {peak} > {MAX} + {FILE}");
    assert!(end <= MAX + FILE, "end {end}");
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

/// CPU seconds (user + system) and resident bytes of `pid`.
fn cost_of(pid: i32) -> Result<(f64, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok((ticks as f64 / hz, rss_kb * 1024))
}

/// The agent's steady cost with no drops and at 10 000 drops/s (the
/// release build when there is one; the numbers are printed for the
/// README, the bounds are the DaemonSet's limits).
#[test]
fn agent_cost_idle_and_under_flood() -> Result<()> {
    if std::env::var_os("CONNTRACK_TRACE_VM").is_some() {
        eprintln!(
            "SKIPPED agent_cost_idle_and_under_flood: a cost measured under TCG emulation says nothing about the agent's (it runs on the host)"
        );
        return Ok(());
    }
    let Some(_lock) = kernel_test("agent_cost_idle_and_under_flood")? else {
        return Ok(());
    };
    let topo = Topology::new("ao", 85)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let bin = conntrack_trace_tests::release_binary().unwrap_or_else(binary);
    let agent = Agent::start_bin(&bin, &[])?;
    let pid = agent.pid();
    std::thread::sleep(Duration::from_secs(2));
    const IDLE: Duration = Duration::from_secs(10);
    let (c0, _) = cost_of(pid)?;
    // Scraped once a second, like the Prometheus test does.
    let t0 = Instant::now();
    while t0.elapsed() < IDLE {
        agent.metrics()?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let (c1, rss_idle) = cost_of(pid)?;
    let idle_cpu = (c1 - c0) / t0.elapsed().as_secs_f64();
    let before = topo.server.ct_stats()?;
    let t1 = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut rss_flood = 0;
    let (c3, sent) = std::thread::scope(|s| -> Result<(f64, u64)> {
        let flood = s.spawn(|| {
            traffic::udp_paced(
                &topo.client.path(),
                topo.client_ip,
                topo.server_ip,
                53,
                1025..61_025,
                10_000.0,
                |_| b"ctt".to_vec(),
                Some(&stop),
            )
        });
        while !flood.is_finished() {
            agent.metrics()?;
            rss_flood = rss_flood.max(cost_of(pid)?.1);
            std::thread::sleep(Duration::from_secs(1));
        }
        let sent = flood
            .join()
            .map_err(|_| anyhow::anyhow!("flood panicked"))??;
        Ok((cost_of(pid)?.0, sent))
    })?;
    let secs = t1.elapsed().as_secs_f64();
    let delta = topo.server.ct_stats()?.since(&before)?;
    let flood_cpu = (c3 - c1) / secs;
    let rate = delta.drop as f64 / secs;
    eprintln!(
        "agent cost ({}): idle {:.2} % CPU, RSS {:.1} MiB; flood {sent} sent, {} drops in {secs:.1} s ({rate:.0}/s): {:.1} % CPU, peak RSS {:.1} MiB",
        bin.display(),
        idle_cpu * 100.0,
        rss_idle as f64 / (1 << 20) as f64,
        delta.drop,
        flood_cpu * 100.0,
        rss_flood as f64 / (1 << 20) as f64
    );
    json::state_lines(&agent.stop()?, true)?;
    assert!(rate > 5000.0, "a flood of thousands of drops/s: {rate}");
    assert!(rss_flood < 256 << 20, "within the DaemonSet's memory limit");
    assert!(idle_cpu < 0.05, "idle costs little: {idle_cpu}");
    Ok(())
}

/// Open file descriptors of `pid`.
fn fds(pid: i32) -> Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Issue 12: namespaces created after the agent started get their table's
/// gauges and kernel counters within a few intervals, equal to what the
/// kernel says inside them; deleted, their series go and the agent closes
/// their files (an open stat file would keep a gone namespace alive).
#[test]
fn namespaces_that_appear_later_get_table_metrics() -> Result<()> {
    let test = "namespaces_that_appear_later_get_table_metrics";
    let Some(_lock) = kernel_test(test)? else {
        return Ok(());
    };
    let agent = Agent::start(&["--interval", "200ms"])?;
    let fds_before = fds(agent.pid())?;
    let topo = Topology::new("an", 86)?;
    let sent = traffic::udp_oneshots(
        &topo.client.path(),
        topo.client_ip,
        topo.server_ip,
        53,
        40_000..40_020,
    )?;
    let server = topo.server.name.clone();
    let series = |family: &str| format!("conntrack_trace_{family}{{netns=\"{server}\"}}");
    // Poll (bounded) until the agent's gauge equals the kernel's count,
    // read before and after the scrape (nothing else runs in there; the
    // unreplied UDP entries live 30 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (text, count) = loop {
        let before = topo.server.ct_count()?;
        let text = agent.metrics()?;
        let after = topo.server.ct_count()?;
        let got = sample(&text, &series("entries"));
        if before == after && got == Some(before as f64) {
            break (text, before);
        }
        ensure!(
            Instant::now() < deadline,
            "{}: {got:?} after 20 s, the kernel says {before}..{after}",
            series("entries")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let max = Sysctl::read("net.netfilter.nf_conntrack_max")?;
    let stats = topo.server.ct_stats()?;
    eprintln!(
        "{test}: {sent} datagrams; {} = {count} (kernel {count}), max_entries {:?} (sysctl {max}), kernel_drop_total {:?} (kernel {})",
        series("entries"),
        sample(&text, &series("max_entries")),
        sample(&text, &series("kernel_drop_total")),
        stats.drop
    );
    ensure!(count >= sent, "one entry per datagram: {count} < {sent}");
    assert_eq!(sample(&text, &series("max_entries")), Some(max as f64));
    assert!(sample(&text, &series("buckets")).is_some_and(|b| b > 0.0));
    assert_eq!(
        sample(&text, &series("kernel_drop_total")),
        Some(stats.drop as f64)
    );
    assert_eq!(
        sample(&text, &series("kernel_invalid_total")),
        Some(stats.invalid as f64)
    );
    let client = topo.client.name.clone();
    ensure!(
        text.contains(&format!("conntrack_trace_entries{{netns=\"{client}\"}} 0")),
        "the client's namespace (no conntrack rule: an empty table) too: {text}"
    );
    drop(topo);
    let ours = |l: &str| {
        l.contains(&format!("netns=\"{server}\"")) || l.contains(&format!("netns=\"{client}\""))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = agent.metrics()?;
        let left: Vec<&str> = text.lines().filter(|l| ours(l)).collect();
        let open = fds(agent.pid())?;
        if left.is_empty() && open == fds_before {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "20 s after `ip netns del`: {left:?} still exposed, {open} fds open ({fds_before} before)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = agent.stop()?;
    json::state_lines(&err, true)?;
    for (event, ns) in [
        ("netns_added", &server),
        ("netns_removed", &server),
        ("netns_removed", &client),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("\"event\":\"{event}\""))
                    && l.contains(&format!("\"netns\":\"{ns}\""))),
            "{event} {ns}: {err}"
        );
    }
    Ok(())
}
