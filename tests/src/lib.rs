//! Scenario helpers for the root integration tests: namespaces and veths,
//! sysctl guards that always restore, traffic generators, the kernel's own
//! counters, and a handle on a running `conntrack-trace`.
//!
//! Every guard undoes its change in `Drop`, so a failing assertion (panic)
//! still restores the machine. `cargo xtask test` additionally restores the
//! sysctls and removes leftover `ctt-` namespaces after the run, for the case
//! where the test process itself is killed.

pub mod agent;
pub mod dns;
pub mod json;
pub mod manifest;
pub mod prometheus;
pub mod traffic;

use std::{
    fs,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// Prefix of every namespace and interface the tests create.
pub const PREFIX: &str = "ctt-";

/// True when the test can use root-only kernel features. Otherwise prints
/// why it is skipped — and fails instead when CONNTRACK_TRACE_REQUIRE_ROOT is
/// set (CI), so a misconfigured runner cannot pass by skipping.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CONNTRACK_TRACE_REQUIRE_ROOT").is_some() {
        panic!("{test}: needs root, and CONNTRACK_TRACE_REQUIRE_ROOT is set");
    }
    eprintln!("SKIPPED {test}: needs root (CAP_SYS_ADMIN, CAP_BPF, CAP_NET_ADMIN)");
    false
}

/// Serialises tests that touch global kernel state, across processes.
/// Holds the flock until dropped.
pub struct KernelLock(#[allow(dead_code, reason = "held for its flock")] fs::File);

impl KernelLock {
    pub fn acquire() -> Result<KernelLock> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/conntrack-trace-tests.lock")
            .context("opening /run/conntrack-trace-tests.lock")?;
        // SAFETY: flock on an owned fd.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("flock: {}", std::io::Error::last_os_error());
        }
        Ok(KernelLock(f))
    }
}

pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Netns> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Loads an nft ruleset into this namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let file = std::env::temp_dir().join(format!("{}-{}.nft", self.name, std::process::id()));
        fs::write(&file, ruleset)?;
        let r = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "nft",
                "-f",
                file.to_str().unwrap_or_default(),
            ],
        );
        let _ = fs::remove_file(&file);
        r.map(|_| ())
    }

    /// Inode of the namespace (what events carry in `netns`).
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(fs::metadata(self.path())?.ino())
    }

    /// The kernel's conntrack counters in this namespace, summed over CPUs.
    pub fn ct_stats(&self) -> Result<CtStats> {
        in_netns(&self.path(), || -> Result<CtStats> {
            let text = fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack")?;
            CtStats::parse(&text)
        })?
    }

    pub fn ct_count(&self) -> Result<u64> {
        in_netns(&self.path(), || -> Result<u64> {
            Ok(
                fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")?
                    .trim()
                    .parse()?,
            )
        })?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `f` on a thread inside the namespace at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on an owned fd; affects this thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}

/// Counters from /proc/net/stat/nf_conntrack, summed over CPUs. Parsed here
/// rather than with conntrack-trace's own `kstats` on purpose: the tests
/// check the tool against an independent reading of the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtStats {
    pub drop: u64,
    pub early_drop: u64,
    pub insert_failed: u64,
    pub chaintoolong: u64,
    pub clashres: u64,
    pub invalid: u64,
}

impl CtStats {
    pub fn parse(text: &str) -> Result<CtStats> {
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .context("empty stat file")?
            .split_whitespace()
            .collect();
        let mut s = CtStats::default();
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let get = |name: &str| -> Result<u64> {
                match header.iter().position(|h| *h == name) {
                    Some(i) => Ok(u64::from_str_radix(f.get(i).context("short row")?, 16)?),
                    None => Ok(0),
                }
            };
            s.drop += get("drop")?;
            s.early_drop += get("early_drop")?;
            s.insert_failed += get("insert_failed")?;
            // 5.15+ print st->chaintoolong under `chainlength`.
            s.chaintoolong += get("chaintoolong")? + get("chainlength")?;
            s.clashres += get("clashres")?;
            s.invalid += get("invalid")?;
        }
        Ok(s)
    }

    /// `self - before`, counter by counter. A counter that went backwards
    /// (the two readings are of different namespaces, or the namespace was
    /// recreated in between) is an error naming it, not a panic in a debug
    /// build or a delta near 2^64 in a release one.
    pub fn since(&self, before: &CtStats) -> Result<CtStats> {
        let sub = |name: &str, now: u64, then: u64| -> Result<u64> {
            now.checked_sub(then).with_context(|| {
                format!(
                    "kernel counter `{name}` went backwards ({then} before, {now} after): \
                     the readings are not of the same namespace"
                )
            })
        };
        Ok(CtStats {
            drop: sub("drop", self.drop, before.drop)?,
            early_drop: sub("early_drop", self.early_drop, before.early_drop)?,
            insert_failed: sub("insert_failed", self.insert_failed, before.insert_failed)?,
            chaintoolong: sub("chaintoolong", self.chaintoolong, before.chaintoolong)?,
            clashres: sub("clashres", self.clashres, before.clashres)?,
            invalid: sub("invalid", self.invalid, before.invalid)?,
        })
    }
}

/// Sets an init-netns sysctl and restores the old value on drop (also when
/// the test panics).
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    pub fn set(name: &str, value: u64) -> Result<Sysctl> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let old =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        fs::write(&path, value.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Sysctl {
            path,
            old: old.trim().to_owned(),
        })
    }

    /// Remembers a sysctl's value and restores it on drop, without
    /// changing it now (for commands the test runs that may change it).
    pub fn keep(name: &str) -> Result<Sysctl> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let old =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Sysctl {
            path,
            old: old.trim().to_owned(),
        })
    }

    pub fn read(name: &str) -> Result<u64> {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        Ok(fs::read_to_string(&path)?.trim().parse()?)
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.old) {
            eprintln!(
                "FAILED to restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}

/// Client and server namespaces joined by a veth pair; the server has an nft
/// ruleset that uses `ct state`, which turns conntrack on in its namespace.
pub struct Topology {
    pub client: Netns,
    pub server: Netns,
    pub client_ip: std::net::Ipv4Addr,
    pub server_ip: std::net::Ipv4Addr,
    pub client_ip6: std::net::Ipv6Addr,
    pub server_ip6: std::net::Ipv6Addr,
}

/// Server ruleset: conntrack on (ct state), everything accepted.
pub const SERVER_RULES: &str = "
table inet ctt {
    chain input {
        type filter hook input priority 0; policy accept;
        ct state established,related accept
        udp dport 53 accept
        tcp dport 80 accept
    }
}
";

impl Topology {
    /// `tag` keeps names unique per test (interface names max 15 chars);
    /// `subnet` is the third octet of 10.77.X.0/24.
    pub fn new(tag: &str, subnet: u8) -> Result<Topology> {
        let client = Netns::new(&format!("{PREFIX}{tag}-cli"))?;
        let server = Netns::new(&format!("{PREFIX}{tag}-srv"))?;
        let (vc, vs) = (format!("{PREFIX}{tag}c"), format!("{PREFIX}{tag}s"));
        run(
            "ip",
            &[
                "link",
                "add",
                &vc,
                "netns",
                &client.name,
                "type",
                "veth",
                "peer",
                "name",
                &vs,
                "netns",
                &server.name,
            ],
        )?;
        let client_ip = std::net::Ipv4Addr::new(10, 77, subnet, 2);
        let server_ip = std::net::Ipv4Addr::new(10, 77, subnet, 1);
        client.ip(&["addr", "add", &format!("{client_ip}/24"), "dev", &vc])?;
        client.ip(&["link", "set", &vc, "up"])?;
        server.ip(&["addr", "add", &format!("{server_ip}/24"), "dev", &vs])?;
        server.ip(&["link", "set", &vs, "up"])?;
        // nodad: usable at once, no duplicate-address-detection delay.
        let client_ip6: std::net::Ipv6Addr = format!("fd77:{subnet}::2").parse()?;
        let server_ip6: std::net::Ipv6Addr = format!("fd77:{subnet}::1").parse()?;
        client.ip(&[
            "addr",
            "add",
            &format!("{client_ip6}/64"),
            "dev",
            &vc,
            "nodad",
        ])?;
        server.ip(&[
            "addr",
            "add",
            &format!("{server_ip6}/64"),
            "dev",
            &vs,
            "nodad",
        ])?;
        server.nft(SERVER_RULES)?;
        Ok(Topology {
            client,
            server,
            client_ip,
            server_ip,
            client_ip6,
            server_ip6,
        })
    }
}

/// The `conntrack-trace` binary under test.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CONNTRACK_TRACE_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/conntrack-trace")
}

/// `--backend <CONNTRACK_TRACE_BACKEND>` when that variable is set.
pub fn backend_args() -> Vec<String> {
    match std::env::var("CONNTRACK_TRACE_BACKEND") {
        Ok(b) if !b.is_empty() => vec!["--backend".to_owned(), b],
        _ => Vec::new(),
    }
}

/// The release build (`cargo xtask test` builds it and sets
/// CONNTRACK_TRACE_RELEASE_BIN), for tests about what the shipped binary
/// sustains; None when not built.
pub fn release_binary() -> Option<PathBuf> {
    std::env::var_os("CONNTRACK_TRACE_RELEASE_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/conntrack-trace"))
        })
        .filter(|p| p.exists())
}

/// A running `conntrack-trace trace --format ndjson`.
pub struct Tracer {
    child: Option<Child>,
    ready: PathBuf,
    /// Drain stdout/stderr continuously: a full pipe would block the tracer.
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

fn collect(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

impl Tracer {
    /// Starts the tracer and waits (bounded) until it has attached. With
    /// CONNTRACK_TRACE_BACKEND set (the VM matrix, `cargo xtask vm-test
    /// --backend`), passes `--backend <value>`; unset, the binary picks.
    pub fn start(extra: &[&str]) -> Result<Tracer> {
        Tracer::start_bin(&binary(), extra)
    }

    /// [`Tracer::start`] with another build of the binary (e.g. release).
    pub fn start_bin(bin: &Path, extra: &[&str]) -> Result<Tracer> {
        let ready = std::env::temp_dir().join(format!(
            "ctt-ready-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let _ = fs::remove_file(&ready);
        let bin = bin.to_owned();
        ensure!(
            bin.exists(),
            "{} not built (run `cargo xtask test`)",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .args([
                "trace",
                "--format",
                "ndjson",
                "--duration",
                "120s",
                "--top",
                "50",
                "--ready-file",
            ])
            .arg(&ready)
            // A test that names its backend itself keeps it.
            .args(if extra.contains(&"--backend") {
                Vec::new()
            } else {
                backend_args()
            })
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let stdout = child.stdout.take().map(collect);
        let stderr = child.stderr.take().map(collect);
        let mut t = Tracer {
            child: Some(child),
            ready: ready.clone(),
            stdout,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            let child = t.child.as_mut().context("no child")?;
            if let Some(status) = child.try_wait()? {
                let err = t
                    .stderr
                    .take()
                    .and_then(|h| h.join().ok())
                    .unwrap_or_default();
                bail!(
                    "conntrack-trace exited before ready ({status}): {}",
                    err.trim()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "conntrack-trace not ready after 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(t)
    }

    /// Sends SIGINT and collects the output (bounded wait).
    pub fn stop(self) -> Result<json::Output> {
        self.stop_with(libc::SIGINT)
    }

    /// Sends `signal` (SIGINT or SIGTERM: both end a trace cleanly) and
    /// collects the output (bounded wait).
    pub fn stop_with(self, signal: i32) -> Result<json::Output> {
        self.stop_with_stderr(signal).map(|(out, _)| out)
    }

    /// [`Tracer::stop_with`], and what the tracer wrote on stderr.
    pub fn stop_with_stderr(mut self, signal: i32) -> Result<(json::Output, String)> {
        let mut child = self.child.take().context("already stopped")?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("conntrack-trace did not exit 60 s after signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        ensure!(
            status.success(),
            "conntrack-trace failed ({status}): {}",
            stderr.trim()
        );
        Ok((json::Output::parse(&stdout)?, stderr))
    }
}

impl Tracer {
    /// SIGKILLs the tracer (no chance to flush or finish anything) and
    /// returns what it had printed.
    pub fn kill(mut self) -> Result<String> {
        let mut child = self.child.take().context("already stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(self
            .stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file(&self.ready);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Asserts that every event names exactly what the test sent: the client
/// address and one of its source ports, to the server's address and port,
/// in the server's namespace. Returns the source ports seen.
pub fn assert_events_from(
    events: &[&json::Event],
    topo: &Topology,
    proto: &str,
    dport: u16,
    sports: std::ops::Range<u16>,
) -> Result<std::collections::BTreeSet<u16>> {
    assert_events_between(
        events,
        topo,
        topo.client_ip.into(),
        topo.server_ip.into(),
        proto,
        dport,
        sports,
    )
}

/// [`assert_events_from`] for explicit addresses (e.g. the IPv6 ones).
pub fn assert_events_between(
    events: &[&json::Event],
    topo: &Topology,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    proto: &str,
    dport: u16,
    sports: std::ops::Range<u16>,
) -> Result<std::collections::BTreeSet<u16>> {
    let ino = topo.server.inode()?;
    let mut seen = std::collections::BTreeSet::new();
    for e in events {
        ensure!(
            e.netns == ino,
            "event from netns {} (server is {ino}): {e:?}",
            e.netns
        );
        ensure!(
            e.netns_name.as_deref() == Some(topo.server.name.as_str()),
            "netns name: {e:?}"
        );
        let family = if src.is_ipv4() { "ipv4" } else { "ipv6" };
        ensure!(
            e.family == family && e.proto == proto,
            "family/proto: {e:?}"
        );
        ensure!(
            e.src.as_deref() == Some(src.to_string().as_str()),
            "src: {e:?}"
        );
        ensure!(
            e.dst.as_deref() == Some(dst.to_string().as_str()),
            "dst: {e:?}"
        );
        ensure!(e.dport == Some(dport), "dport: {e:?}");
        let sport = e.sport.context("no sport")?;
        ensure!(
            sports.contains(&sport),
            "sport {sport} not sent by the test: {e:?}"
        );
        seen.insert(sport);
    }
    Ok(seen)
}

/// Runs `traffic` while `conntrack-trace --netns <server>` traces, and
/// returns its result, the tracer's output, and the delta of the server's
/// kernel counters over the same window.
pub fn traced<T>(
    topo: &Topology,
    traffic: impl FnOnce() -> Result<T>,
) -> Result<(T, json::Output, CtStats)> {
    traced_with(topo, &[], traffic)
}

/// [`traced`] with extra tracer arguments.
pub fn traced_with<T>(
    topo: &Topology,
    extra: &[&str],
    traffic: impl FnOnce() -> Result<T>,
) -> Result<(T, json::Output, CtStats)> {
    let mut args = vec!["--netns", topo.server.name.as_str()];
    args.extend_from_slice(extra);
    let tracer = Tracer::start(&args)?;
    let before = topo.server.ct_stats()?;
    // Packets cross the veth synchronously in the sender's softirq, so once
    // the generator returns they have been through the server's hooks.
    let r = traffic()?;
    let after = topo.server.ct_stats()?;
    let out = tracer.stop()?;
    Ok((r, out, after.since(&before)?))
}

/// The preamble of every kernel test: skip (with the reason) without root,
/// else take the global lock. Use as
/// `let Some(_lock) = kernel_test("name")? else { return Ok(()) };`.
pub fn kernel_test(name: &str) -> Result<Option<KernelLock>> {
    if !root_or_skip(name) {
        return Ok(None);
    }
    Ok(Some(KernelLock::acquire()?))
}

impl Topology {
    /// Traces one UDP/53 datagram from each of `sports` (IPv4, or IPv6 with
    /// `v6`), client to server; returns datagrams sent, the tracer's output
    /// and the server's counter delta.
    pub fn udp_flood(
        &self,
        v6: bool,
        sports: std::ops::Range<u16>,
        extra: &[&str],
    ) -> Result<(u64, json::Output, CtStats)> {
        let (src, dst): (std::net::IpAddr, std::net::IpAddr) = if v6 {
            (self.client_ip6.into(), self.server_ip6.into())
        } else {
            (self.client_ip.into(), self.server_ip.into())
        };
        traced_with(self, extra, || {
            traffic::udp_oneshots(&self.client.path(), src, dst, 53, sports)
        })
    }
}

/// Established TCP connections that hold a namespace's conntrack table at
/// its limit. They are *assured* entries, which `early_drop()` never evicts
/// (net/netfilter/nf_conntrack_core.c: early_drop_list() skips
/// IPS_ASSURED), so every later new flow is dropped as `table_full`
/// deterministically — unlike unreplied UDP entries, which an early drop may
/// evict and so let an occasional packet through.
pub struct Filler {
    pub connections: u64,
    _listener: std::net::TcpListener,
    _streams: Vec<std::net::TcpStream>,
}

impl Netns {
    /// Sets a per-namespace sysctl (e.g. `net/ipv4/tcp_syn_retries`); the
    /// value goes away with the namespace.
    pub fn sysctl(&self, path: &str, value: u64) -> Result<()> {
        in_netns(&self.path(), || -> Result<()> {
            let p = Path::new("/proc/sys").join(path);
            fs::write(&p, value.to_string()).with_context(|| format!("writing {}", p.display()))
        })?
    }
}

impl Topology {
    /// Opens client → server:9 connections until the server's conntrack
    /// count reaches `max` (bounded: at most `max` + 16 attempts).
    pub fn fill_assured(&self, max: u64) -> Result<Filler> {
        let addr = std::net::SocketAddr::from((self.server_ip, 9));
        let listener = in_netns(&self.server.path(), || {
            std::net::TcpListener::bind(addr).context("listening on server:9")
        })??;
        let mut streams = Vec::new();
        for _ in 0..max + 16 {
            if self.server.ct_count()? >= max {
                break;
            }
            let s = in_netns(&self.client.path(), || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            })?
            .context("filler connection")?;
            streams.push(s);
        }
        // The handshake's last ACK (which makes the entry assured) reaches
        // the server in the sender's softirq before connect() returns.
        let count = self.server.ct_count()?;
        ensure!(count >= max, "table not full: {count} of {max} entries");
        Ok(Filler {
            connections: streams.len() as u64,
            _listener: listener,
            _streams: streams,
        })
    }
}

/// A child process killed (and reaped) on drop.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` inside `ns` with piped output (pair with [`wait_bounded`]).
pub fn spawn_in(ns: &Netns, cmd: &[&str]) -> Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", cmd.join(" ")))
}

/// Waits for `child` at most until `deadline`, then kills it; returns its
/// output.
pub fn wait_bounded(mut child: Child, deadline: Instant) -> Result<std::process::Output> {
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Ok(child.wait_with_output()?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A scratch directory under the temp dir (`ctt-GROUP-TAG-PID`), removed
/// on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(group: &str, tag: &str) -> Result<Scratch> {
        let p = std::env::temp_dir().join(format!("ctt-{group}-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p)?;
        Ok(Scratch(p))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Names in the directory, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = fs::read_dir(&self.0)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        Ok(v)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A path as the `&str` a command line takes.
pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Runs `conntrack-trace ARGS` to the end (both pipes read as they fill);
/// returns (exit code, stdout, stderr).
pub fn ctt(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(binary())
        .args(args)
        .output()
        .context("running conntrack-trace")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

/// GET /metrics from 127.0.0.1:PORT (HTTP/1.0, the whole response).
pub fn http_metrics(port: u16) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut b = String::new();
    s.read_to_string(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::CtStats;

    /// Review of issue 11: `since` subtracted unchecked, so two readings of
    /// different namespaces panicked (debug) with "attempt to subtract with
    /// overflow" instead of saying what went wrong.
    #[test]
    fn since_names_a_counter_that_went_backwards() {
        let before = CtStats {
            drop: 10,
            early_drop: 3,
            ..Default::default()
        };
        let after = CtStats {
            drop: 25,
            early_drop: 3,
            invalid: 1,
            ..Default::default()
        };
        let d = after.since(&before).unwrap();
        assert_eq!((d.drop, d.early_drop, d.invalid), (15, 0, 1));
        let back = CtStats { drop: 4, ..after };
        let e = back.since(&before).unwrap_err().to_string();
        assert_eq!(
            e,
            "kernel counter `drop` went backwards (10 before, 4 after): the readings are not of the same namespace"
        );
    }
}
