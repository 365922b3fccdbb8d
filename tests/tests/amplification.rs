//! Retransmission amplification with real clients behind a full table: the
//! kernel's own TCP SYN retransmissions, and dig retrying DNS queries against
//! dnsmasq. Each must be flagged with the right source, service and a retry
//! interval close to the client's timer; one-shot flows must not be.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use conntrack_trace_tests::{
    Sysctl, Topology, binary, dns, in_netns, json, kernel_test, spawn_in, traced, traced_with,
    wait_bounded,
};

const MAX: u64 = 32;

/// The one finding for `src` → `service`, checked against the stream: a
/// `new` finding line was emitted live, and the summary's counts equal the
/// events of that source.
fn finding_for<'a>(
    out: &'a json::Output,
    src: &str,
    proto: &str,
    dport: u16,
) -> anyhow::Result<&'a json::Finding> {
    let service = format!("{proto}/{dport}");
    let f = out
        .summary
        .findings
        .iter()
        .find(|f| f.src.as_deref() == Some(src) && f.service == service)
        .with_context(|| format!("no finding for {src} {service}: {:#?}", out.summary))?;
    let events = out
        .events
        .iter()
        .filter(|e| {
            e.kind == "table_full"
                && e.src.as_deref() == Some(src)
                && e.proto == proto
                && e.dport == Some(dport)
        })
        .count() as u64;
    ensure!(
        f.attempts == events,
        "finding counts {} attempts, the stream has {events} such drops",
        f.attempts
    );
    ensure!(f.status == "final" && f.ty == "finding" && f.finding == "amplification");
    ensure!(
        out.findings
            .iter()
            .any(|l| l.status == "new" && l.src == f.src && l.service == f.service),
        "no live `new` finding line: {:?}",
        out.findings
    );
    ensure!(
        f.message
            .starts_with(&format!("AMPLIFICATION {src} -> {service}: ")),
        "{}",
        f.message
    );
    Ok(f)
}

#[test]
fn tcp_syn_retransmissions_are_flagged() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("tcp_syn_retransmissions_are_flagged")? else {
        return Ok(());
    };
    let topo = Topology::new("at", 36)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let filler = topo.fill_assured(MAX)?;
    // SYNs at 0, 1, 3 and 7 s (initial RTO 1 s, doubling); connect gives up
    // at 7.5 s, before the fifth. Since 6.8 the first
    // tcp_syn_linear_timeouts (default 4) retries are 1 s apart instead
    // (net/ipv4/tcp_timer.c): turn that off where it exists, so the test
    // sees the classic backoff on every kernel.
    topo.client.sysctl("net/ipv4/tcp_syn_retries", 3)?;
    if std::path::Path::new("/proc/sys/net/ipv4/tcp_syn_linear_timeouts").exists() {
        topo.client.sysctl("net/ipv4/tcp_syn_linear_timeouts", 0)?;
    }
    const CLIENTS: usize = 4;
    let server = std::net::SocketAddr::from((topo.server_ip, 80));
    let (results, out, delta) = traced(&topo, || {
        let path = topo.client.path();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..CLIENTS)
                .map(|_| {
                    s.spawn(|| {
                        in_netns(&path, || {
                            std::net::TcpStream::connect_timeout(
                                &server,
                                Duration::from_millis(7500),
                            )
                            .map(|_| ())
                            .map_err(|e| e.kind())
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
                .collect::<anyhow::Result<Vec<_>>>()
        })
    })?;
    let src = topo.client_ip.to_string();
    let f = finding_for(&out, &src, "tcp", 80)?;
    eprintln!(
        "tcp: filler {} connections; connects {results:?}; kernel drop +{}; {}; {f:?}",
        filler.connections, delta.drop, f.message
    );
    ensure!(
        results.iter().all(|r| r.is_err()),
        "every connect must fail: the table is full"
    );
    ensure!(f.flows == CLIENTS as u64, "one flow per connect: {f:?}");
    ensure!(f.attempts == 4 * f.flows, "SYNs at 0, 1, 3 and 7 s: {f:?}");
    ensure!(f.factor >= 2.0);
    ensure!(f.retransmissions == f.attempts - f.flows);
    ensure!(f.backoff == "exponential", "TCP doubles its RTO: {f:?}");
    let first = f.first_retry_s.context("no first retry interval")?;
    ensure!(
        (0.8..=1.6).contains(&first),
        "first SYN retry after ~1 s (TCP_TIMEOUT_INIT), saw {first} s"
    );
    ensure!(out.summary.events.table_full == delta.drop);
    ensure!(out.summary.amplification.retransmissions == f.retransmissions);
    Ok(())
}

#[test]
fn dns_query_retries_are_flagged() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("dns_query_retries_are_flagged")? else {
        return Ok(());
    };
    let topo = Topology::new("ad", 37)?;
    let server = topo.server_ip.to_string();
    let _dnsmasq = dns::start_dnsmasq(&topo)?;

    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let filler = topo.fill_assured(MAX)?;
    const QUERIES: usize = 5;
    const TRIES: usize = 4;
    let dir = std::env::temp_dir().join(format!("ctt-amp-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let capture = dir.join("dns.ctt");
    let _ = std::fs::remove_file(&capture);
    let cap = capture.to_str().context("temp path")?;
    let (outputs, out, delta) = traced_with(&topo, &["--write", cap], || {
        // dig retries a query from a new source port with the same id and
        // question, +timeout seconds apart.
        let children = (0..QUERIES)
            .map(|i| {
                spawn_in(
                    &topo.client,
                    &[
                        "dig",
                        &format!("@{server}"),
                        &format!("+tries={TRIES}"),
                        "+timeout=1",
                        &format!("q{i}.example.test"),
                    ],
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        children
            .into_iter()
            .map(|c| wait_bounded(c, deadline))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let src = topo.client_ip.to_string();
    let f = finding_for(&out, &src, "udp", 53)?;
    eprintln!(
        "dns: filler {} connections; kernel drop +{}; {}; {f:?}",
        filler.connections, delta.drop, f.message
    );
    for o in &outputs {
        ensure!(
            String::from_utf8_lossy(&[o.stdout.as_slice(), o.stderr.as_slice()].concat())
                .contains("timed out"),
            "dig got through a full table: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
    ensure!(
        f.flows == QUERIES as u64,
        "one flow per question, although each try used a new port: {f:?}"
    );
    ensure!(
        f.attempts == (QUERIES * TRIES) as u64,
        "every try was dropped: {f:?}"
    );
    ensure!(f.factor == TRIES as f64);
    ensure!(
        f.backoff == "constant",
        "dig retries at a fixed timeout: {f:?}"
    );
    let median = f.median_interval_s.context("no retry interval")?;
    ensure!(
        (0.8..=1.6).contains(&median),
        "dig +timeout=1 retries about every second, saw {median} s"
    );
    // Each try came from its own port: the 5-tuple alone sees no retries.
    let ports: std::collections::BTreeSet<_> = out
        .events
        .iter()
        .filter(|e| e.dport == Some(53))
        .filter_map(|e| e.sport)
        .collect();
    ensure!(
        ports.len() as u64 == f.attempts,
        "dig reuses no port: {ports:?}"
    );
    ensure!(out.summary.events.table_full == delta.drop);

    // The postmortem says the same: `report` of the capture finds the same
    // amplification (DNS questions come from the recorded packet bytes).
    let report = |format: &str| -> anyhow::Result<String> {
        let o = std::process::Command::new(binary())
            .args(["report", cap, "--format", format])
            .output()?;
        ensure!(
            o.status.success(),
            "report: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8(o.stdout)?)
    };
    let rep: serde_json::Value = json::report_value(&report("json")?)?;
    let offline: Vec<json::Finding> = serde_json::from_value(rep["summary"]["findings"].clone())?;
    ensure!(
        offline == out.summary.findings,
        "report findings {offline:?} != live {:?}",
        out.summary.findings
    );
    let amp: json::Amplification = serde_json::from_value(rep["summary"]["amplification"].clone())?;
    ensure!(amp == out.summary.amplification, "{amp:?}");
    ensure!(report("human")?.contains(&f.message));
    ensure!(report("markdown")?.contains("| constant |"));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn one_shot_flows_are_not_flagged() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("one_shot_flows_are_not_flagged")? else {
        return Ok(());
    };
    let topo = Topology::new("an", 38)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let (sent, out, delta) = topo.udp_flood(false, 21_000..21_400, &[])?;
    let amp = &out.summary.amplification;
    eprintln!(
        "one-shots: sent {sent}, kernel drop +{}, {amp:?}",
        delta.drop
    );
    ensure!(delta.drop > 200, "the table overflowed: {delta:?}");
    ensure!(
        amp.drops == delta.drop,
        "every drop was considered: {amp:?}"
    );
    ensure!(amp.retransmissions == 0, "no flow was sent twice: {amp:?}");
    ensure!(
        out.summary.findings.is_empty(),
        "{:?}",
        out.summary.findings
    );
    ensure!(out.findings.is_empty(), "{:?}", out.findings);
    Ok(())
}
