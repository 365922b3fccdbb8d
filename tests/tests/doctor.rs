//! `doctor` against real incidents: a UDP/53 flood at dnsmasq behind a full
//! table, whose printed advice — applied exactly as printed — must stop the
//! drops of a replay of the same flood; and a slow fill whose forecast must
//! come close to the moment the table actually filled.

use std::{
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conntrack_trace_tests::{
    Sysctl, Topology, backend_args, binary, dns, json, kernel_test, traffic, wait_bounded,
};
use serde_json::Value;

const MAX_KEY: &str = "net.netfilter.nf_conntrack_max";

/// Runs `doctor` (bounded) and returns its exit code, stdout and stderr.
fn doctor(args: &[&str]) -> Result<(i32, String, String)> {
    let child = Command::new(binary())
        .arg("doctor")
        .args(backend_args())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning conntrack-trace doctor")?;
    let o = wait_bounded(child, Instant::now() + Duration::from_secs(90))?;
    Ok((
        o.status.code().unwrap_or(-1),
        String::from_utf8(o.stdout)?,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    ))
}

fn doctor_json(args: &[&str]) -> Result<(i32, Value)> {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    let (code, out, err) = doctor(&a)?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("doctor (exit {code}) printed no JSON: {out:?} {err}"))?;
    json::Doctor::parse(&out)?;
    Ok((code, v))
}

fn namespace<'a>(d: &'a Value, name: &str) -> Result<&'a Value> {
    d["namespaces"]
        .as_array()
        .and_then(|v| v.iter().find(|n| n["netns"] == name))
        .with_context(|| format!("no namespace {name} in {d:#}"))
}

fn advice<'a>(d: &'a Value, id: &str) -> Result<&'a Value> {
    let all = d["advice"].as_array().context("no advice[]")?;
    let mut it = all.iter().filter(|a| a["id"] == id);
    let a = it
        .next()
        .with_context(|| format!("no `{id}` advice in {all:#?}"))?;
    ensure!(it.next().is_none(), "`{id}` advised twice");
    Ok(a)
}

/// Runs each command exactly as printed, with sh, as an operator would.
/// `cmd` with its program named by the path PATH finds. The same command
/// for every shell but busybox's, whose `sh` prefers its own applets to
/// PATH (the VM images: its `ip` applet has no `netns exec`); a program
/// that is busybox itself is left to the applet.
fn path_resolved(cmd: &str) -> String {
    let (prog, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
    if prog.contains('/') {
        return cmd.to_owned();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(prog);
        let real = std::fs::canonicalize(&p).ok();
        if p.is_file() && real.as_ref().is_some_and(|r| !r.ends_with("busybox")) {
            return format!("{} {rest}", p.display());
        }
    }
    cmd.to_owned()
}

fn apply(a: &Value) -> Result<Vec<String>> {
    let cmds: Vec<String> = a["commands"]
        .as_array()
        .context("no commands[]")?
        .iter()
        .map(|c| {
            c.as_str()
                .map(str::to_owned)
                .context("command not a string")
        })
        .collect::<Result<_>>()?;
    ensure!(!cmds.is_empty(), "advice without commands: {a:#}");
    for c in &cmds {
        let o = Command::new("sh")
            .arg("-c")
            .arg(path_resolved(c))
            .output()?;
        ensure!(
            o.status.success(),
            "`{c}` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(cmds)
}

const RATE: f64 = 300.0;
/// A replay's queries: 7 s at RATE.
const QUERIES: u16 = 2100;
const MAX: u64 = 64;

#[test]
fn doctor_advice_applied_as_printed_stops_a_dns_flood() -> Result<()> {
    let Some(_lock) = kernel_test("doctor_advice_applied_as_printed_stops_a_dns_flood")? else {
        return Ok(());
    };
    let topo = Topology::new("dd", 70)?;
    let _dnsmasq = dns::start_dnsmasq(&topo)?;
    // The raise-max advice may resize the hash too; both come back.
    let _buckets = Sysctl::keep("net.netfilter.nf_conntrack_buckets")?;
    let _max = Sysctl::set(MAX_KEY, MAX)?;
    let client = topo.client.path();
    let flood_until = |ports: std::ops::Range<u16>, stop: Option<&AtomicBool>| -> Result<u64> {
        traffic::udp_paced(
            &client,
            topo.client_ip,
            topo.server_ip,
            53,
            ports,
            RATE,
            |p| dns::query(p, &format!("q{p}.example.test")),
            stop,
        )
    };
    // A replay: the same flood (rate, queries) from new clients' ports.
    let flood = |first: u16| flood_until(first..first + QUERIES, None);
    let srv = topo.server.name.as_str();

    // 1. During the flood: dropping now, udp/53 the victim.
    let before = topo.server.ct_stats()?;
    let stop = AtomicBool::new(false);
    let (sent, diag, human) = std::thread::scope(|s| -> Result<_> {
        // The flood lasts until both diagnoses are done (their start-up
        // time varies with the machine), at most 30 s.
        let stop = &stop;
        let h = s.spawn(move || flood_until(10_000..19_000, Some(stop)));
        std::thread::sleep(Duration::from_secs(1));
        // The human rendering alongside (for the log), in the same flood.
        let hu = s.spawn(|| doctor(&["--netns", srv, "--duration", "3s"]));
        let d = doctor_json(&["--netns", srv, "--duration", "3s"]);
        let human = hu.join().map_err(|_| anyhow::anyhow!("doctor panicked"))?;
        stop.store(true, Ordering::Relaxed);
        let sent = h.join().map_err(|_| anyhow::anyhow!("flood panicked"))??;
        Ok((sent, d?, human?))
    })?;
    let delta = topo.server.ct_stats()?.since(&before)?;
    let (code, d) = diag;
    eprintln!(
        "doctor --format human during the flood (exit {}):\n{}",
        human.0, human.1
    );
    eprintln!(
        "flood: sent {sent}, kernel drop +{}, early_drop +{}",
        delta.drop, delta.early_drop
    );
    ensure!(delta.drop > 0, "the flood did not overflow the table");
    ensure!(code == 7, "exit {code}, want 7 (dropping now): {d:#}");
    ensure!(d["status"] == "dropping" && d["exit_code"] == 7);
    let ns = namespace(&d, srv)?;
    ensure!(ns["status"] == "dropping", "{ns:#}");
    ensure!(ns["max"] == MAX, "{ns:#}");
    ensure!(
        ns["failures"]["table_full"].as_u64().unwrap_or(0) > 0,
        "{ns:#}"
    );
    ensure!(
        ns["victims"][0]["service"] == "udp/53",
        "top victim: {:#}",
        ns["victims"]
    );
    ensure!(
        ns["victims"][0]["top_src"] == topo.client_ip.to_string().as_str(),
        "{:#}",
        ns["victims"]
    );
    match ns["holders"].as_object() {
        Some(h) => {
            eprintln!("holders ({}): {}", h["source"], h["summary"]);
            ensure!(
                h["groups"][0]["proto"] == "udp" && h["groups"][0]["port"] == 53,
                "{h:#?}"
            );
        }
        None => eprintln!("holders unavailable here: {}", ns["holders_unavailable"]),
    }
    for id in ["raise_max", "notrack"] {
        let a = advice(&d, id)?;
        for k in ["why", "cost", "risk"] {
            ensure!(
                a[k].as_str().is_some_and(|s| !s.is_empty()),
                "{id}.{k}: {a:#}"
            );
        }
        ensure!(
            a["persist"].as_array().is_some_and(|p| !p.is_empty()),
            "{a:#}"
        );
    }
    ensure!(
        advice(&d, "notrack")?["commands"][0]
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("ip netns exec {srv} "))),
        "notrack runs in the server's namespace"
    );

    // 2. The raise-max advice, as printed, then the same flood again
    // (new clients' ports, as a real flood's): no drop.
    let raise = advice(&d, "raise_max")?;
    let cmds = apply(raise)?;
    let new_max = Sysctl::read(MAX_KEY)?;
    let before = topo.server.ct_stats()?;
    let sent = flood(20_000)?;
    let delta = topo.server.ct_stats()?.since(&before)?;
    let count = topo.server.ct_count()?;
    eprintln!(
        "raise_max {cmds:?}: max {new_max}; replay sent {sent}, kernel drop +{}, early_drop +{}, entries now {count}",
        delta.drop, delta.early_drop
    );
    ensure!(new_max > MAX);
    ensure!(
        delta.drop == 0 && delta.early_drop == 0,
        "replay after raise_max still failed: {delta:?}"
    );

    // 3. Back to the small table, now over-full with the replay's entries;
    // the notrack advice, as printed, then the same flood again: no drop.
    let _small = Sysctl::set(MAX_KEY, MAX)?;
    ensure!(topo.server.ct_count()? >= MAX, "the table is full again");
    let notrack = advice(&d, "notrack")?;
    let cmds = apply(notrack)?;
    let before = topo.server.ct_stats()?;
    let sent = flood(23_000)?;
    let delta = topo.server.ct_stats()?.since(&before)?;
    eprintln!(
        "notrack ({} commands); replay sent {sent}, kernel drop +{}, early_drop +{}",
        cmds.len(),
        delta.drop,
        delta.early_drop
    );
    ensure!(
        delta.drop == 0 && delta.early_drop == 0,
        "replay after notrack still failed: {delta:?}"
    );
    // DNS still works untracked, through a table that is still full.
    let o = wait_bounded(
        conntrack_trace_tests::spawn_in(
            &topo.client,
            &[
                "dig",
                &format!("@{}", topo.server_ip),
                "+short",
                "+tries=2",
                "+timeout=2",
                "after.example.test",
            ],
        )?,
        Instant::now() + Duration::from_secs(10),
    )?;
    let answer = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    ensure!(answer == dns::ANSWER, "dig after notrack: {answer:?}");
    Ok(())
}

#[test]
fn doctor_forecast_of_a_slow_fill() -> Result<()> {
    let Some(_lock) = kernel_test("doctor_forecast_of_a_slow_fill")? else {
        return Ok(());
    };
    // Full after 20 s: doctor's start (BTF, kallsyms: ~10 s for a 7.x
    // kernel under emulation on a loaded host) and its 4 s of samples end
    // well before; the entries outlive the fill (nf_conntrack_udp_timeout
    // 30 s).
    const FILL_MAX: u64 = 400;
    const FILL_RATE: f64 = 20.0;
    let topo = Topology::new("df", 71)?;
    let _max = Sysctl::set(MAX_KEY, FILL_MAX)?;
    let client = topo.client.path();
    let srv = topo.server.name.as_str();
    // One-shot datagrams to a closed port: each leaves an unreplied entry
    // for nf_conntrack_udp_timeout (30 s), longer than the test.
    let started = Instant::now();
    let (forecast, code, full_after) = std::thread::scope(|s| -> Result<_> {
        let h = s.spawn(|| {
            traffic::udp_paced(
                &client,
                topo.client_ip,
                topo.server_ip,
                53,
                30_000..30_000 + 22 * FILL_RATE as u16,
                FILL_RATE,
                |_| b"conntrack-trace forecast test\0".to_vec(),
                None,
            )
        });
        // Doctor starts with the fill: its samples come after its start.
        let (code, d) = doctor_json(&["--netns", srv, "--duration", "4s"])?;
        // The forecast counts from doctor's last sample.
        let said = std::time::UNIX_EPOCH
            + Duration::from_nanos(
                d["sampled_unix_ns"]
                    .as_u64()
                    .context("no sampled_unix_ns")?,
            );
        let f = namespace(&d, srv)?["forecast"].clone();
        let deadline = Instant::now() + Duration::from_secs(40);
        while topo.server.ct_count()? < FILL_MAX {
            if Instant::now() > deadline {
                bail!(
                    "the table never filled: {} entries",
                    topo.server.ct_count()?
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let full_after = std::time::SystemTime::now()
            .duration_since(said)
            .context("clock went back")?
            .as_secs_f64();
        h.join().map_err(|_| anyhow::anyhow!("fill panicked"))??;
        Ok((f, code, full_after))
    })?;
    let eta = forecast["eta_s"]
        .as_f64()
        .with_context(|| format!("no eta: {forecast:#}"))?;
    let err = eta - full_after;
    eprintln!(
        "slow fill ({FILL_RATE}/s to {FILL_MAX}): forecast {eta:.2} s [{} – {}], slope {:.2}/s, actually full {full_after:.2} s after its last sample ({:.1} s after start): error {err:+.2} s ({:+.1} %)",
        forecast["eta_low_s"],
        forecast["eta_high_s"],
        forecast["slope_per_s"].as_f64().unwrap_or(f64::NAN),
        started.elapsed().as_secs_f64(),
        err * 100.0 / full_after
    );
    ensure!(forecast["trend"] == "filling", "{forecast:#}");
    ensure!(
        code == 6,
        "exit {code}, want 6 (at risk: full within 10 min)"
    );
    // Stated error: within 2 s or 25 % of the actual time, whichever is
    // larger (the pacing thread, doctor's own exit and the 20 ms poll add
    // jitter; see README "Forecast").
    ensure!(
        err.abs() <= (0.25 * full_after).max(2.0),
        "forecast {eta:.2} s, full after {full_after:.2} s"
    );
    Ok(())
}
