//! `cargo xtask demo`: the founding incident, in throwaway network
//! namespaces, under the live view — then `doctor` on it.
//!
//! A server namespace runs a real DNS server (dnsmasq) behind an nftables
//! ruleset that turns conntrack on; a client namespace runs real resolver
//! clients (dig, which retries a query from a new source port every
//! `+timeout`). The global `nf_conntrack_max` is lowered to a small table,
//! and established TCP connections (assured entries, never evicted) fill
//! it at a steady pace, so the live header forecasts *full in ~N s* before
//! it is. Once it is full every query is dropped, dig retries, and the
//! tracer attributes the drops to the client and flags the amplification.
//! Then `doctor` diagnoses the same namespace and prints its advice;
//! nothing is applied.
//!
//! The scenario is built from the tests' own harness
//! (`conntrack-trace-tests`: [`Topology`], [`dns::start_dnsmasq`],
//! [`Sysctl`]), whose guards undo every change on drop, under the tests'
//! kernel lock.
//! SIGINT, SIGTERM and SIGHUP only set a flag here, so Ctrl-C unwinds
//! through those guards too: the sysctls are restored, the namespaces
//! deleted and dnsmasq stopped on every exit path but SIGKILL (after which
//! `cargo xtask test` removes leftover `ctt-` namespaces and restores the
//! sysctls it finds lowered).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conntrack_trace_tests::{Daemon, Sysctl, Topology, dns, in_netns, spawn_in};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The table size during the demo (the global nf_conntrack_max,
    /// restored at exit).
    #[arg(long, default_value_t = 128, value_name = "N", value_parser = clap::value_parser!(u64).range(32..=2048))]
    pub max: u64,
    /// How long the live view runs.
    #[arg(long, default_value = "30", value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(10..=600))]
    pub seconds: u64,
}

/// Set by SIGINT, SIGTERM or SIGHUP.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn step(msg: impl std::fmt::Display) {
    eprintln!("xtask demo: {msg}");
}

/// The table is filled over this long: the forecast has time to say so.
const FILL: Duration = Duration::from_secs(12);
/// New dig clients per second (each tries 4 times, 1 s apart).
const CLIENTS_PER_S: u64 = 2;

pub fn run(a: &Args) -> Result<()> {
    catch_signals();
    let t_build = Instant::now();
    step("building the release binary");
    let bin = crate::build_release()?;
    let built = Instant::now();
    step(format!(
        "built {} in {:.0} s",
        bin.display(),
        (built - t_build).as_secs_f64()
    ));
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the demo needs root (namespaces, a sysctl, eBPF): run it as root"
    );
    let _lock = kernel_lock()?;
    check_host_table(a.max)?;
    step(
        "creating namespaces ctt-demo-cli and ctt-demo-srv (a veth pair, conntrack on in the server)",
    );
    let topo = Topology::new("demo", 90)?;
    step(format!(
        "starting dnsmasq on {} (answers *.example.test)",
        topo.server_ip
    ));
    let _dnsmasq = dns::start_dnsmasq(&topo)?;
    let _buckets = Sysctl::keep("net.netfilter.nf_conntrack_buckets")?;
    let old_max = Sysctl::read("net.netfilter.nf_conntrack_max")?;
    step(format!(
        "lowering nf_conntrack_max {old_max} -> {} (global; restored at exit)",
        a.max
    ));
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", a.max)?;
    let ready = std::env::temp_dir().join(format!("ctt-demo-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    step(format!(
        "live view for {} s: `conntrack-trace trace --netns {}` (Ctrl-C ends the demo cleanly)",
        a.seconds, topo.server.name
    ));
    let mut trace = Reaped(
        Command::new(&bin)
            .args(["trace", "--netns", &topo.server.name, "--format", "human"])
            .args(["--duration", &format!("{}s", a.seconds)])
            .arg("--ready-file")
            .arg(&ready)
            .spawn()
            .context("starting conntrack-trace trace")?,
    );
    wait_ready(&mut trace.0, &ready)?;
    let _ = std::fs::remove_file(&ready);
    let traffic_stop = AtomicBool::new(false);
    let (first_drop, doctor) = std::thread::scope(|s| -> Result<_> {
        let filler = s.spawn(|| fill_paced(&topo, a.max, &traffic_stop));
        let clients = s.spawn(|| dig_clients(&topo, &traffic_stop));
        let watch = s.spawn(|| first_drop(&topo, &traffic_stop));
        let r = (|| -> Result<Option<i32>> {
            let status = wait_child(&mut trace.0)?;
            if stopping() {
                return Ok(None);
            }
            ensure!(status.success(), "conntrack-trace trace failed ({status})");
            step(format!(
                "`conntrack-trace doctor --netns {}`: diagnosis and advice, nothing applied",
                topo.server.name
            ));
            let mut doctor = Reaped(
                Command::new(&bin)
                    .args(["doctor", "--netns", &topo.server.name])
                    .spawn()
                    .context("starting conntrack-trace doctor")?,
            );
            Ok(Some(wait_child(&mut doctor.0)?.code().unwrap_or(-1)))
        })();
        traffic_stop.store(true, Ordering::SeqCst);
        let filled = join(filler)?;
        let clients = join(clients)?;
        let drop = join(watch)?;
        let doctor = r?;
        step(format!(
            "{filled} assured TCP connections filled the table; {clients} dig clients ran"
        ));
        Ok((drop, doctor))
    })?;
    if stopping() {
        step("interrupted: cleaning up");
    } else {
        if let Some(code) = doctor {
            step(format!(
                "doctor exited {code} (7: dropping now, 6: at risk, 0: healthy)"
            ));
        }
        match first_drop {
            Some(t) => step(format!(
                "drops began {:.1} s after the build finished",
                (t - built).as_secs_f64()
            )),
            None => bail!("the table never dropped a packet: the demo did not work"),
        }
    }
    step(format!(
        "cleaning up: nf_conntrack_max back to {old_max}, namespaces deleted, dnsmasq stopped"
    ));
    // The guards above undo everything as this returns.
    ensure!(!stopping(), "interrupted");
    Ok(())
}

/// A child killed (and reaped) on drop, also on an early return.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("a demo thread panicked"))?
}

/// The flock the scenario tests hold (tests/src/lib.rs `KernelLock`), taken
/// without blocking in the kernel, so Ctrl-C while another run holds it
/// ends the demo at once (a blocked flock(2) is restarted after the
/// signal handler).
fn kernel_lock() -> Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    const PATH: &str = "/run/conntrack-trace-tests.lock";
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PATH)
        .with_context(|| format!("opening {PATH}"))?;
    let mut said = false;
    loop {
        // SAFETY: flock on an owned fd.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        let e = std::io::Error::last_os_error();
        ensure!(
            e.raw_os_error() == Some(libc::EWOULDBLOCK),
            "flock {PATH}: {e}"
        );
        if !said {
            step(format!(
                "waiting for {PATH}: a test or another demo is changing the kernel's state"
            ));
            said = true;
        }
        ensure!(!stopping(), "interrupted while waiting for {PATH}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Refuses a small table when the host's own is larger: lowering the
/// global limit below its count would drop the host's new flows.
fn check_host_table(max: u64) -> Result<()> {
    let Ok(count) = Sysctl::read("net.netfilter.nf_conntrack_count") else {
        return Ok(()); // conntrack not loaded in the host: nothing to drop
    };
    ensure!(
        count < max / 2,
        "this host's own conntrack table holds {count} entries; a global nf_conntrack_max of {max} \
         would drop its new flows during the demo: pass --max {} or more",
        (count * 2 + 64).next_power_of_two().min(2048)
    );
    Ok(())
}

fn wait_ready(child: &mut Child, ready: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("conntrack-trace exited before it was attached ({status})");
        }
        ensure!(!stopping(), "interrupted");
        ensure!(
            Instant::now() < deadline,
            "conntrack-trace not attached after 60 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits for `child`; on a signal it got too (same process group), it
/// exits by itself — a bounded wait, then kill.
fn wait_child(child: &mut Child) -> Result<std::process::ExitStatus> {
    let mut since_stop = None;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if stopping() {
            let t = *since_stop.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Opens client -> server:9 connections at a steady pace until the
/// server's table holds `max` entries; keeps them open until `stop`.
/// Returns how many it opened.
fn fill_paced(topo: &Topology, max: u64, stop: &AtomicBool) -> Result<u64> {
    let addr = SocketAddr::from((topo.server_ip, 9));
    let listener = in_netns(&topo.server.path(), || TcpListener::bind(addr))?
        .context("listening on server:9")?;
    listener.set_nonblocking(true)?;
    let done = || stop.load(Ordering::SeqCst) || stopping();
    let mut accepted = Vec::new();
    let mut streams = Vec::new();
    let start = Instant::now();
    let pace = FILL.as_secs_f64() / max as f64;
    while !done() {
        // Accept as they come: a full backlog would drop SYNs itself.
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
        if topo.server.ct_count()? >= max {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let due = start + Duration::from_secs_f64(streams.len() as f64 * pace);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // A SYN dropped by the full table (a DNS entry took the last
        // slot) times out; the next tick re-checks the count.
        if let Ok(Ok(s)) = in_netns(&topo.client.path(), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        }) {
            streams.push(s);
        }
    }
    Ok(streams.len() as u64)
}

/// Starts CLIENTS_PER_S dig clients a second, each asking a new name and
/// retrying from a new source port every second, up to 4 tries; reaps
/// them as they end. Returns how many ran.
fn dig_clients(topo: &Topology, stop: &AtomicBool) -> Result<u64> {
    let server = format!("@{}", topo.server_ip);
    let mut running: Vec<Daemon> = Vec::new();
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) && !stopping() {
        let due = start + Duration::from_secs_f64(n as f64 / CLIENTS_PER_S as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait.min(Duration::from_millis(100)));
            continue;
        }
        let name = format!("host{n}.example.test");
        let child = spawn_in(
            &topo.client,
            &[
                "dig",
                &server,
                "+tries=4",
                "+timeout=1",
                "+short",
                name.as_str(),
            ],
        )?;
        running.push(Daemon(child));
        n += 1;
        running.retain_mut(|d| matches!(d.0.try_wait(), Ok(None)));
    }
    Ok(n)
}

/// When the server's kernel `drop` counter first moves.
fn first_drop(topo: &Topology, stop: &AtomicBool) -> Result<Option<Instant>> {
    let before = topo.server.ct_stats()?.drop;
    while !stop.load(Ordering::SeqCst) && !stopping() {
        if topo.server.ct_stats()?.drop > before {
            return Ok(Some(Instant::now()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(None)
}
