//! The fleet's alerting path with real parts, in one table-full flood: a
//! real Prometheus evaluates the shipped rules
//! (deploy/prometheus/conntrack-trace.rules.yml) against the agent and
//! sends to a real Alertmanager, whose webhook receiver is the agent's
//! `POST /alertmanager`; the firing ConntrackTableFullDrops pins an
//! incident capture with the alert in it. The same Prometheus then answers
//! every query of the Grafana dashboard (deploy/grafana/conntrack-trace.json),
//! and its drops panel sums to the kernel's drop delta.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{
    Sysctl, Topology,
    agent::{Agent, http_send},
    json, kernel_test, path_str,
    prometheus::{Alertmanager, Prometheus, needs, temp_dir},
    traffic,
};

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn incident_dirs(dir: &Path) -> Result<BTreeSet<PathBuf>> {
    Ok(fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("incident-"))
        })
        .collect())
}

/// Milliseconds since the epoch of an RFC 3339 UTC time as Alertmanager
/// writes it (`2026-12-06T12:50:01.234567Z`).
fn unix_ms(t: &str) -> Option<i64> {
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut h = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (h.next()?.ok()?, h.next()?.ok()?, h.next()?.ok()?);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

/// Every panel target's `expr` in the dashboard, with Grafana's variables
/// as the test's values.
fn dashboard_queries(netns: &str) -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string(repo_file("deploy/grafana/conntrack-trace.json"))?;
    let d: serde_json::Value = serde_json::from_str(&text)?;
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .context("templating")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "node", "netns"]);
    let mut out = Vec::new();
    for p in d["panels"].as_array().context("panels")? {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or_default();
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        for t in p["targets"].as_array().context("targets")? {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().context("expr")?;
            let q = expr
                .replace("$__rate_interval", "1m")
                .replace("$__range", "5m")
                .replace("$node", ".*")
                .replace("$netns", netns);
            ensure!(!q.contains('$'), "{title}: a variable left in {q}");
            out.push((title.to_owned(), q));
        }
    }
    Ok(out)
}

/// The incident whose `alert*.json` names `alert`: its directory, every
/// alert name written there, and when the agent received `alert`'s
/// notification.
fn alert_note(rec: &Path, alert: &str) -> Result<Option<(PathBuf, BTreeSet<String>, i64)>> {
    for d in &incident_dirs(rec)? {
        let mut names = BTreeSet::new();
        let mut received = None;
        for f in fs::read_dir(d)?.flatten().map(|e| e.path()) {
            let n = f
                .file_name()
                .context("name")?
                .to_string_lossy()
                .into_owned();
            if !n.starts_with("alert") {
                continue;
            }
            // Being written: read at the next poll.
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&fs::read(&f)?) else {
                continue;
            };
            for a in v["alerts"].as_array().context("alerts")? {
                let name = a["labels"]["alertname"].as_str().unwrap_or_default();
                if name == alert {
                    received = v["received_unix_ms"].as_i64();
                }
                names.insert(name.to_owned());
            }
        }
        if let Some(r) = received {
            return Ok(Some((d.clone(), names, r)));
        }
    }
    Ok(None)
}

#[test]
fn alertmanager_pins_an_incident_and_the_dashboard_answers() -> Result<()> {
    let test = "alertmanager_pins_an_incident_and_the_dashboard_answers";
    if !needs("prometheus and prometheus-alertmanager", test) {
        return Ok(());
    }
    let Some(_lock) = kernel_test(test)? else {
        return Ok(());
    };
    let t0 = Instant::now();
    let topo = Topology::new("al", 87)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let rec = temp_dir("alert-rec")?;
    // A short --incident-after: the incident drops starting open is closed
    // (within 0.5 s) before the alert can arrive (increase() needs two
    // scrapes 1 s apart, then an evaluation and group_wait: 2 s at the
    // least), so the webhook makes its own.
    let agent = Agent::start(&[
        "--record-dir",
        path_str(&rec),
        "--record-max-size",
        "4M",
        "--interval",
        "200ms",
        "--incident-after",
        "300ms",
    ])?;

    // Refused notifications change nothing.
    let (code, _) = http_send(agent.addr, "GET", "/alertmanager", b"")?;
    assert_eq!(code, 405, "GET");
    let (code, body) = http_send(agent.addr, "POST", "/alertmanager", b"{\"version\":")?;
    assert_eq!(code, 400, "malformed: {body}");
    let (code, body) = http_send(
        agent.addr,
        "POST",
        "/alertmanager",
        br#"{"version":"3","status":"firing","alerts":[]}"#,
    )?;
    assert_eq!(code, 400, "version 3: {body}");
    let big = vec![b' '; (256 << 10) + 1];
    let (code, _) = http_send(agent.addr, "POST", "/alertmanager", &big)?;
    assert_eq!(code, 413, "oversized");
    assert!(incident_dirs(&rec)?.is_empty(), "4xx made an incident");

    let am = Alertmanager::start(&format!(
        "route:\n  receiver: agent\n  group_by: [alertname, instance, netns]\n\
         \x20 group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
         receivers:\n  - name: agent\n    webhook_configs:\n\
         \x20     - url: 'http://{}/alertmanager'\n        send_resolved: false\n",
        agent.addr
    ))?;
    let prom = Prometheus::start_config(&format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files: ['{}']\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{}']\n\
         scrape_configs:\n  - job_name: conntrack-trace\n    static_configs:\n      - targets: ['{}']\n",
        repo_file("deploy/prometheus/conntrack-trace.rules.yml").display(),
        am.addr,
        agent.addr
    ))?;
    ensure!(
        prom.wait_for("up{job=\"conntrack-trace\"}", 1.0, Duration::from_secs(30))? == Some(1.0),
        "prometheus never scraped the agent"
    );

    // Clients retrying: three passes over the same 250 flows, 3 s in all,
    // so the drops counter grows over several scrapes (increase() needs
    // two samples) and the retries make an amplification finding.
    let before = topo.server.ct_stats()?;
    let flood_at = std::time::SystemTime::now();
    let mut sent = 0;
    for _ in 0..3 {
        sent += traffic::udp_paced(
            &topo.client.path(),
            topo.client_ip,
            topo.server_ip,
            53,
            30_000..30_250,
            250.0,
            |_| b"ctt".to_vec(),
            None,
        )?;
    }
    let delta = topo.server.ct_stats()?.since(&before)?;
    ensure!(
        delta.drop > 300,
        "the table overflowed: sent {sent}, {delta:?}"
    );

    // Alertmanager has the alert, labelled with the namespace.
    let netns = topo.server.name.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let alert = loop {
        let found = am.alerts()?.into_iter().find(|a| {
            a["labels"]["alertname"] == "ConntrackTableFullDrops"
                && a["labels"]["netns"] == netns.as_str()
                && a["labels"]["instance"] == agent.addr.to_string().as_str()
        });
        if let Some(a) = found {
            break a;
        }
        ensure!(
            Instant::now() < deadline,
            "no ConntrackTableFullDrops for {netns} in Alertmanager after 30 s: {:?}\n{}",
            am.alerts()?,
            am.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(alert["status"]["state"], "active", "{alert}");
    // ... and its webhook delivery made an incident with the alert in it
    // (another rule's alert, amplification, may have made it first: the
    // table-full one then joined it as alert-2.json).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (dir, names, received) = loop {
        if let Some(f) = alert_note(&rec, "ConntrackTableFullDrops")? {
            break f;
        }
        ensure!(
            Instant::now() < deadline,
            "no incident with ConntrackTableFullDrops 20 s after the alert fired: {:?}\n{}",
            incident_dirs(&rec)?,
            am.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let captures = fs::read_dir(&dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".ctt"))
        .count();
    assert!(
        captures >= 1,
        "the incident holds the capture: {}",
        dir.display()
    );
    let starts = alert["startsAt"]
        .as_str()
        .and_then(unix_ms)
        .context("startsAt")?;
    let flood_ms = flood_at.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    eprintln!(
        "{test}: {} drops (kernel), alert {names:?} firing {} ms after the flood began; alert to capture (startsAt to the webhook's alert.json): {} ms; incident {} ({captures} capture files)",
        delta.drop,
        starts - flood_ms,
        received - starts,
        dir.display()
    );

    // The dashboard: every query parses and answers, over the test's
    // window, as Grafana's panels ask. The retries' amplification finding
    // opens once the second pass is done (factor 2): wait until
    // Prometheus scraped it.
    let open = prom.wait_for(
        "max(conntrack_trace_amplification_open)",
        1.0,
        Duration::from_secs(15),
    )?;
    ensure!(open == Some(1.0), "the retries opened a finding: {open:?}");
    let window = t0.elapsed() + Duration::from_secs(5);
    let served = agent.metrics()?;
    for (title, q) in dashboard_queries(&netns)? {
        for name in q
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("conntrack_trace_"))
        {
            assert!(served.contains(name), "{title}: {name} is not served");
        }
        // Bounded retry (5 s): a series the last scrape brought may not be
        // queryable yet.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut tries = 1;
        while prom.query_range(&q, window)?.is_empty() {
            ensure!(
                Instant::now() < deadline,
                "{title}: no series for {q} ({tries} tries)"
            );
            tries += 1;
            std::thread::sleep(Duration::from_millis(250));
        }
        if tries > 1 {
            eprintln!("{title}: {q} answered at try {tries}");
        }
    }
    // The drops panel sums to the kernel's delta.
    let drops = dashboard_queries(&netns)?
        .into_iter()
        .find(|(t, _)| t == "Drops since the agent started")
        .context("drops panel")?
        .1;
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let r = prom.query(&drops)?;
        let tf = r
            .iter()
            .find(|(l, _)| l["kind"] == "table_full")
            .map(|x| x.1);
        if tf == Some(delta.drop as f64) || Instant::now() > deadline {
            break tf;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "dashboard drops panel: table_full {got:?}, kernel drop delta {}",
        delta.drop
    );
    assert_eq!(
        got,
        Some(delta.drop as f64),
        "the drops panel is the kernel's delta"
    );

    let err = agent.stop()?;
    json::state_lines(&err, true)?;
    // The webhook made that incident (drops starting made one before,
    // closed 0.3 s later, long before any alert).
    let made = err.lines().find(|l| {
        l.contains("\"event\":\"incident_started\"")
            && l.contains(&format!("\"dir\":\"{}\"", dir.display()))
    });
    assert!(
        made.is_some_and(|l| l.contains("\"reason\":\"alert ")),
        "{made:?}: {err}"
    );
    let _ = fs::remove_dir_all(&rec);
    eprintln!(
        "{test}: {:.1} s with the kernel lock held",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
