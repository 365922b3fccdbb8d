//! `agent --autopilot` against the founding incident: dnsmasq behind a
//! small global `nf_conntrack_max`, dig clients retrying.
//!
//! * `on`: the table full of assured connections, dig's queries and
//!   retries are dropped; the agent raises the max to doctor's sizing for
//!   the facts it logged, the drops stop, the decision is in the flight
//!   recorder's incident;
//! * `on` with `--autopilot-memory` below the need: raised only to what
//!   fits (`autopilot_capped`); then the test lowers the max again, as
//!   kube-proxy would, and the agent leaves it alone ("lowered by someone
//!   else");
//! * `dry-run`: the would-be raise is logged and nothing is written.
//!
//! Every sysctl comes back through the harness's `Sysctl` guards.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conntrack_trace::drivers::{
    agent::autopilot::MemoryLimit,
    doctor::memory::{self, Budget, EntryCost},
};
use conntrack_trace_tests::{
    Daemon, Scratch, Sysctl, Topology,
    agent::{Agent, sample},
    dns,
    json::{self, AutopilotRaise, AutopilotReason, State},
    kernel_test, path_str, spawn_in, traffic,
};

const MAX_KEY: &str = "net.netfilter.nf_conntrack_max";
const BUCKETS_KEY: &str = "net.netfilter.nf_conntrack_buckets";
/// The small global table of the incident.
const SMALL: u64 = 128;
/// Bound on every wait for the agent to act.
const ACT_WITHIN: Duration = Duration::from_secs(10);

/// The entry cost as the agent measures it (slabinfo, else BTF).
fn entry_cost() -> EntryCost {
    let c = memory::measure(None);
    if c.object_source.starts_with("assumed") {
        let btf = conntrack_trace::kernel::btf::KernelBtf::load(std::path::Path::new(
            conntrack_trace::kernel::btf::VMLINUX_BTF,
        ))
        .ok();
        return memory::measure(btf.as_ref());
    }
    c
}

fn actions(agent: &Agent, action: &str) -> Result<f64> {
    let m = agent.metrics()?;
    Ok(sample(
        &m,
        &format!("conntrack_trace_autopilot_actions_total{{action=\"{action}\"}}"),
    )
    .unwrap_or(0.0))
}

/// Polls `f` every 50 ms until it says yes (bounded by `within`).
fn until(within: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f()? {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(false)
}

/// dig clients, `per_s` a second, each retrying every second up to 4
/// times from a new port (the founding incident's resolvers), until `stop`
/// (bounded: 20 s).
fn dig_clients(topo: &Topology, per_s: f64, stop: &AtomicBool) -> Result<u64> {
    let server = format!("@{}", topo.server_ip);
    let mut running: Vec<Daemon> = Vec::new();
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(20) {
        let due = start + Duration::from_secs_f64(n as f64 / per_s);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
            continue;
        }
        let name = format!("host{n}.example.test");
        let argv = ["dig", &server, "+tries=4", "+timeout=1", "+short", &name];
        running.push(Daemon(spawn_in(&topo.client, &argv)?));
        n += 1;
        running.retain_mut(|d| matches!(d.0.try_wait(), Ok(None)));
    }
    Ok(n)
}

/// A UDP/53 flood at dnsmasq (300 queries/s) until `stop` (at most 10 s).
fn flood(topo: &Topology, stop: &AtomicBool) -> Result<u64> {
    traffic::udp_paced(
        &topo.client.path(),
        topo.client_ip,
        topo.server_ip,
        53,
        20_000..23_000,
        300.0,
        |p| dns::query(p, &format!("q{p}.example.test")),
        Some(stop),
    )
}

/// The agent's state lines (its autopilot lines echoed for the log).
fn lines(stderr: &str) -> Result<Vec<State>> {
    for l in stderr
        .lines()
        .filter(|l| l.contains("\"event\":\"autopilot_"))
    {
        eprintln!("{l}");
    }
    Ok(json::state_lines(stderr, true)?
        .into_iter()
        .map(|l| l.state)
        .collect())
}

fn raises(states: &[State], capped: bool) -> Vec<AutopilotRaise> {
    states
        .iter()
        .filter_map(|s| match s {
            State::AutopilotRaised(r) if !capped => Some(r.clone()),
            State::AutopilotCapped(r) if capped => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// The decision line's `to` is doctor's sizing for the facts it logged.
fn doctors_sizing(r: &AutopilotRaise, cost: &EntryCost, budget: &Budget) -> Result<memory::Sizing> {
    let ram = memory::ram_bytes().context("no MemTotal")?;
    memory::propose_within(r.from, r.buckets_from, r.demand, cost, ram, budget)
        .map_err(|e| anyhow::anyhow!("doctor would not raise: {e}"))
}

#[test]
fn autopilot_on_raises_to_doctors_sizing_and_the_dig_drops_stop() -> Result<()> {
    let Some(_lock) = kernel_test("autopilot_on_raises_to_doctors_sizing_and_the_dig_drops_stop")?
    else {
        return Ok(());
    };
    let t0 = Instant::now();
    let topo = Topology::new("apon", 72)?;
    let _dnsmasq = dns::start_dnsmasq(&topo)?;
    let _buckets = Sysctl::keep(BUCKETS_KEY)?;
    let _max = Sysctl::set(MAX_KEY, SMALL)?;
    let rec = Scratch::new("autopilot", "rec")?;
    let agent = Agent::start(&[
        "--autopilot",
        "on",
        "--interval",
        "500ms",
        "--record-dir",
        path_str(&rec.0),
        "--record-max-size",
        "512k",
    ])?;
    // The table full of assured connections (never evicted): every new
    // query is dropped, and dig retries it from a new port.
    let filler = topo.fill_assured(SMALL)?;
    let before = topo.server.ct_stats()?.drop;
    let stop = AtomicBool::new(false);
    let (first_drop, raised_at, late_drops) = std::thread::scope(|s| -> Result<_> {
        let clients = s.spawn(|| dig_clients(&topo, 4.0, &stop));
        let r = (|| -> Result<_> {
            let mut first_drop = None;
            let mut raised_at = None;
            until(ACT_WITHIN, || {
                if first_drop.is_none() && topo.server.ct_stats()?.drop > before {
                    first_drop = Some(Instant::now());
                }
                if Sysctl::read(MAX_KEY)? != SMALL {
                    raised_at = Some(Instant::now());
                }
                Ok(raised_at.is_some())
            })?;
            let raised_at = raised_at.context("nf_conntrack_max not raised")?;
            // Packets already in flight at the raise may still meet the
            // small table: settle 0.5 s, then 3 s of dig without a drop.
            std::thread::sleep(Duration::from_millis(500));
            let settled = topo.server.ct_stats()?.drop;
            std::thread::sleep(Duration::from_secs(3));
            Ok((
                first_drop,
                raised_at,
                topo.server.ct_stats()?.drop - settled,
            ))
        })();
        stop.store(true, Ordering::Relaxed);
        let n = clients
            .join()
            .map_err(|_| anyhow::anyhow!("dig clients panicked"))??;
        eprintln!("{n} dig clients ran");
        r
    })?;
    let raised = actions(&agent, "raised")?;
    let stderr = agent.stop()?;
    drop(filler);
    let first_drop = first_drop.context("no drop before the raise: the incident did not happen")?;
    let took = raised_at.saturating_duration_since(first_drop);
    eprintln!(
        "first drop -> nf_conntrack_max raised: {:.2} s; drops in the 3 s after: {late_drops}",
        took.as_secs_f64()
    );
    ensure!(
        took < Duration::from_secs(5),
        "raised {took:?} after the first drop (want < 5 s)"
    );
    ensure!(late_drops == 0, "{late_drops} drops after the raise");
    ensure!(raised == 1.0, "raised counter {raised}");
    let states = lines(&stderr)?;
    ensure!(
        states.iter().any(|s| matches!(
            s,
            State::AutopilotArmed {
                mode: json::AutopilotMode::On,
                max: SMALL,
                ..
            }
        )),
        "no autopilot_armed line: {stderr}"
    );
    let r = match raises(&states, false).as_slice() {
        [r] => r.clone(),
        v => bail!("want one autopilot_raised, got {v:#?}: {stderr}"),
    };
    eprintln!("{r:#?}");
    ensure!(
        r.netns == topo.server.name && r.reason == AutopilotReason::TableFull,
        "{r:?}"
    );
    ensure!(r.from == SMALL && !r.dry_run, "{r:?}");
    let now = Sysctl::read(MAX_KEY)?;
    ensure!(r.to == now, "logged {} but the max is {now}", r.to);
    let cost = entry_cost();
    let ram = memory::ram_bytes().context("no MemTotal")?;
    let want = doctors_sizing(&r, &cost, &MemoryLimit::Share(0.02).budget(ram))?;
    ensure!(
        (r.to, r.buckets_to, r.memory_bytes)
            == (want.max, want.buckets.max(r.buckets_from), want.bytes),
        "autopilot {r:?}, doctor's sizing {want:?}"
    );
    // The decision is in the incident that the drops opened.
    let incident = std::fs::read_dir(&rec.0)?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("incident-"))
        .context("no incident directory")?;
    let record = std::fs::read_to_string(incident.path().join("autopilot-1.json"))
        .context("no autopilot-1.json in the incident")?;
    ensure!(record.contains("\"autopilot_raised\""), "{record}");
    eprintln!("test took {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

#[test]
fn autopilot_caps_at_its_memory_and_leaves_a_lowered_max_alone() -> Result<()> {
    let Some(_lock) = kernel_test("autopilot_caps_at_its_memory_and_leaves_a_lowered_max_alone")?
    else {
        return Ok(());
    };
    let t0 = Instant::now();
    let topo = Topology::new("apcap", 73)?;
    let _dnsmasq = dns::start_dnsmasq(&topo)?;
    let _buckets = Sysctl::keep(BUCKETS_KEY)?;
    let _max = Sysctl::set(MAX_KEY, SMALL)?;
    // Room for 2 × SMALL entries over today's buckets, not for more.
    let cost = entry_cost();
    let buckets = Sysctl::read(BUCKETS_KEY)?;
    let budget = cost.table_bytes(2 * SMALL, buckets);
    let agent = Agent::start(&[
        "--autopilot",
        "on",
        "--interval",
        "500ms",
        "--autopilot-memory",
        &budget.to_string(),
    ])?;
    let stop = AtomicBool::new(false);
    let r = std::thread::scope(|s| -> Result<_> {
        let h = s.spawn(|| flood(&topo, &stop));
        let r = (|| -> Result<_> {
            ensure!(
                until(ACT_WITHIN, || Ok(actions(&agent, "capped")? >= 1.0))?,
                "no capped raise within {ACT_WITHIN:?}"
            );
            let capped_to = Sysctl::read(MAX_KEY)?;
            // Still dropping at the cap: the next change waits for the
            // cooldown (skipped once, saying so).
            ensure!(
                until(ACT_WITHIN, || Ok(actions(&agent, "skipped")? >= 1.0))?,
                "no cooldown skip"
            );
            // Someone else (kube-proxy) puts its own limit back.
            std::fs::write(
                "/proc/sys/net/netfilter/nf_conntrack_max",
                SMALL.to_string(),
            )?;
            ensure!(
                until(ACT_WITHIN, || Ok(actions(&agent, "skipped")? >= 2.0))?,
                "no second skip (cooldown, then lowered by someone else)"
            );
            std::thread::sleep(Duration::from_secs(1));
            Ok((capped_to, Sysctl::read(MAX_KEY)?))
        })();
        stop.store(true, Ordering::Relaxed);
        let sent = h.join().map_err(|_| anyhow::anyhow!("flood panicked"))??;
        eprintln!("flood: {sent} queries");
        r
    })?;
    let (capped_to, left) = r;
    let stderr = agent.stop()?;
    let states = lines(&stderr)?;
    let c = match raises(&states, true).as_slice() {
        [c] => c.clone(),
        v => bail!("want one autopilot_capped, got {v:#?}: {stderr}"),
    };
    eprintln!("{c:#?}");
    ensure!(
        raises(&states, false).is_empty(),
        "raised beyond the cap: {stderr}"
    );
    ensure!(
        c.from == SMALL && c.to == 2 * SMALL && capped_to == 2 * SMALL,
        "{c:?}"
    );
    ensure!(
        c.memory_bytes <= budget && c.budget_bytes == budget,
        "{c:?}"
    );
    let want = doctors_sizing(
        &c,
        &cost,
        &Budget {
            bytes: budget,
            what: String::new(),
        },
    )?;
    ensure!(want.capped && want.max == c.to, "doctor's sizing {want:?}");
    let skips: Vec<&str> = states
        .iter()
        .filter_map(|s| match s {
            State::AutopilotSkipped { why, .. } => Some(why.as_str()),
            _ => None,
        })
        .collect();
    eprintln!("skipped: {skips:#?}");
    ensure!(
        skips
            .iter()
            .any(|w| w.starts_with("lowered by someone else")),
        "{skips:?}"
    );
    ensure!(
        left == SMALL,
        "the autopilot fought the lowered max: {left}"
    );
    eprintln!("test took {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

#[test]
fn autopilot_dry_run_logs_the_raise_and_writes_nothing() -> Result<()> {
    let Some(_lock) = kernel_test("autopilot_dry_run_logs_the_raise_and_writes_nothing")? else {
        return Ok(());
    };
    let t0 = Instant::now();
    let topo = Topology::new("apdry", 74)?;
    let _dnsmasq = dns::start_dnsmasq(&topo)?;
    let _buckets = Sysctl::keep(BUCKETS_KEY)?;
    let _max = Sysctl::set(MAX_KEY, SMALL)?;
    let buckets = Sysctl::read(BUCKETS_KEY)?;
    let agent = Agent::start(&["--autopilot", "dry-run", "--interval", "500ms"])?;
    let stop = AtomicBool::new(false);
    let seen = std::thread::scope(|s| -> Result<_> {
        let h = s.spawn(|| flood(&topo, &stop));
        let r = until(ACT_WITHIN, || Ok(actions(&agent, "dry_run")? >= 1.0));
        // A tick more: a dry run that wrote would show now.
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        h.join().map_err(|_| anyhow::anyhow!("flood panicked"))??;
        r
    })?;
    let stderr = agent.stop()?;
    ensure!(seen, "no dry-run decision within {ACT_WITHIN:?}: {stderr}");
    ensure!(Sysctl::read(MAX_KEY)? == SMALL, "dry-run changed the max");
    ensure!(
        Sysctl::read(BUCKETS_KEY)? == buckets,
        "dry-run changed the buckets"
    );
    let states = lines(&stderr)?;
    let r = match raises(&states, false).as_slice() {
        [r, ..] => r.clone(),
        [] => bail!("no would-be raise logged: {stderr}"),
    };
    eprintln!("{r:#?}");
    ensure!(r.dry_run && r.from == SMALL && r.to > SMALL, "{r:?}");
    eprintln!("test took {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
