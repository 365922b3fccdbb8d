//! `cargo xtask bench`: what the tracer costs the rest of the system, and
//! how fast its user-space side is. Each figure is one module; with no
//! subcommand every figure but the soak runs and `BENCHMARKS.md` is
//! written from that run:
//!
//! - [`evictions`]: the slab hook's cost on a socket churn loop;
//! - [`flood`]: a table-full flood (the kernel's drop rate with and without
//!   the tracer, lost events, each program's ns per run);
//! - [`newflow`]: the kernel's new-flow rate without drops, per backend
//!   setting and against a bpftrace one-liner, and per-hook cost idle and
//!   under that load;
//! - [`pipeline`]: the live consumer's user space per sink, on synthetic
//!   ring records;
//! - [`userspace`]: `report` and `export` events/s on a recorded capture;
//! - [`memory`]: the tracer's peak RSS with 1 M distinct sources;
//! - [`soak`] (opt-in): RSS over minutes at a steady drop rate, totals
//!   checked against the kernel.
//!
//! Shared here: the datagram generator, a handle on a traced process
//! (tracer or bpftrace) with its resource usage, `bpftool` program
//! statistics, and median/min/max formatting.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, Command, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_tests::{PREFIX, Topology, in_netns};

mod evictions;
mod flood;
mod memory;
mod newflow;
mod pipeline;
mod sampling;
mod soak;
mod userspace;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Option<What>,
    /// Socket create/send/close iterations per eviction-hook measurement
    /// (default run).
    #[arg(long, default_value_t = 100_000)]
    iterations: u32,
    /// Measurements per configuration (default run, every figure).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
}

#[derive(clap::Subcommand)]
enum What {
    /// Capture files: bytes per event, events/s written and read
    /// (conntrack-trace/examples/capture_bench.rs, release mode).
    Capture {
        /// Synthetic events to write and read back.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
    },
    /// The amplification detector: events/s and memory on retrying,
    /// one-shot and DNS streams of 2 M drops
    /// (conntrack-trace/examples/amplify_bench.rs, release mode).
    Amplify,
    /// The eviction hook on a socket churn loop.
    Evictions(evictions::Args),
    /// Table-full flood: the kernel's drop rate with and without the
    /// tracer, lost events, the tracer's wakeups and CPU, and each
    /// program's ns per run (bpf_stats).
    Flood(flood::Args),
    /// New-flow rate without drops: no tracer, the tracer with evictions
    /// on and off, a bpftrace one-liner; per-hook ns/run idle and under it.
    Newflow(newflow::Args),
    /// The live consumer's user space per sink (none, human, ndjson,
    /// capture writer): events per CPU-second on synthetic ring records
    /// (conntrack-trace/examples/pipeline.rs, release mode).
    Pipeline(pipeline::Args),
    /// `report` and `export` (ndjson, pcapng) events/s, CPU and peak RSS
    /// on a capture of a real flood.
    Userspace(userspace::Args),
    /// The tracer's peak RSS under a flood from 1 M distinct sources.
    Memory(memory::Args),
    /// Answers under sampling: 16 known sources among a million spoofed
    /// one-off sources, and the amplification factor of a retried DNS
    /// flood with and without the budget.
    Sampling(sampling::Args),
    /// Minutes at a steady drop rate: RSS every 10 s, totals checked
    /// against the kernel's counter (not part of the default run).
    Soak(soak::Args),
}

pub fn run(args: Args) -> Result<()> {
    // The pure user-space benchmarks are examples of the crate, run in
    // release mode.
    let example = |name: &str, extra: &[&str]| {
        let mut a = vec![
            "run",
            "--release",
            "--package",
            "conntrack-trace",
            "--example",
            name,
            "--",
        ];
        a.extend_from_slice(extra);
        crate::cmd("cargo", &a)
    };
    let one = |md: Result<String>| -> Result<()> {
        println!("{}", md?);
        Ok(())
    };
    match args.what {
        Some(What::Amplify) => return example("amplify_bench", &[]),
        Some(What::Capture { events }) => {
            return example("capture_bench", &[&events.to_string()]);
        }
        Some(What::Evictions(a)) => return one(evictions::run(&crate::build_release()?, &a)),
        Some(What::Flood(a)) => {
            return one(flood::run(&crate::build_release()?, &a).map(|(md, _)| md));
        }
        Some(What::Newflow(a)) => return one(newflow::run(&crate::build_release()?, &a)),
        Some(What::Pipeline(a)) => return one(pipeline::run(&a)),
        Some(What::Userspace(a)) => return one(userspace::run(&crate::build_release()?, &a)),
        Some(What::Memory(a)) => return one(memory::run(&crate::build_release()?, &a)),
        Some(What::Sampling(a)) => return one(sampling::run(&crate::build_release()?, &a)),
        Some(What::Soak(a)) => return one(soak::run(&crate::build_release()?, &a)),
        None => {}
    }
    let bin = crate::build_release()?;
    let rounds = args.rounds;
    let mut sections = Vec::new();
    let mut section = |title: &str, md: String| {
        println!("{md}");
        sections.push(format!("## {title}\n\n{md}"));
    };
    let evictions = evictions::Args {
        iterations: args.iterations,
        rounds,
    };
    section("Eviction hook", evictions::run(&bin, &evictions)?);
    let timed = Rounds {
        rounds,
        ..Rounds::default()
    };
    let flood_args = flood::Args {
        timed: timed.clone(),
        compare: None,
        compare_args: None,
    };
    let (flood_md, backend) = flood::run(&bin, &flood_args)?;
    section("Table-full flood", flood_md);
    let newflow_args = newflow::Args { timed };
    section("New-flow rate", newflow::run(&bin, &newflow_args)?);
    let userspace_args = userspace::Args {
        rounds,
        ..userspace::Args::default()
    };
    let pipeline_args = pipeline::Args {
        rounds,
        ..pipeline::Args::default()
    };
    section("User-space pipeline", pipeline::run(&pipeline_args)?);
    section("User space", userspace::run(&bin, &userspace_args)?);
    // Each memory round is a flood of a million sources; three show the
    // spread without tripling the bench's length.
    let memory_args = memory::Args {
        rounds: rounds.min(3),
    };
    section("Memory", memory::run(&bin, &memory_args)?);
    let sampling_args = sampling::Args {
        rounds: rounds.min(3),
    };
    section("Under sampling", sampling::run(&bin, &sampling_args)?);
    let doc = format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench` from one run; do not edit by hand.\n\n\
         - date: {}\n- kernel: {}\n- machine: {} CPUs, {}\n- backend: {backend}\n- tracer: {}\n\n{}",
        command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        command_line("uname", &["-r"]),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().next().map(|l| l
                .split_whitespace()
                .skip(1)
                .collect::<Vec<_>>()
                .join(" ")))
            .map(|m| format!("MemTotal {m}"))
            .unwrap_or_default(),
        command_line(bin.to_str().unwrap_or("conntrack-trace"), &["--version"]),
        sections.join("\n"),
    );
    let path = crate::workspace_root().join("BENCHMARKS.md");
    std::fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("xtask bench: wrote {}", path.display());
    Ok(())
}

/// First line a command prints, or "?".
fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

// ---- traffic ----

/// Rounds of timed traffic (`flood`, `newflow`).
#[derive(clap::Args, Clone)]
pub struct Rounds {
    /// Seconds of traffic per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Measurements per configuration.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Generator threads (sendmmsg batches).
    #[arg(long, default_value_t = 2)]
    pub generators: u8,
}

impl Default for Rounds {
    fn default() -> Self {
        Rounds {
            seconds: 3.0,
            rounds: 5,
            generators: 2,
        }
    }
}

/// Datagrams per sendmmsg call.
const BATCH: usize = 256;

/// One generator's traffic: a UDP socket per source address, each datagram
/// to the next destination port of `ports`; after the last port the next
/// source's socket starts again at the first. Every datagram is a new
/// conntrack tuple until the cycle (`srcs.len() * ports.len()` datagrams)
/// repeats.
#[derive(Clone)]
pub struct Traffic {
    pub srcs: Vec<Ipv4Addr>,
    pub dst: Ipv4Addr,
    pub ports: std::ops::Range<u16>,
}

impl Traffic {
    /// Datagrams before a tuple repeats.
    pub fn cycle(&self) -> u64 {
        self.srcs.len() as u64 * u64::from(self.ports.end - self.ports.start)
    }
}

/// Limits of one generator run: it stops at whichever comes first.
#[derive(Clone, Copy)]
pub struct Bound {
    pub until: Instant,
    pub max: u64,
    /// Datagrams per second; `None`: as fast as the kernel takes them.
    pub pace: Option<f64>,
}

/// Sends `t` from the current namespace within `b`; returns datagrams sent.
pub fn generate(t: &Traffic, b: Bound) -> Result<u64> {
    if t.srcs.is_empty() || t.ports.is_empty() {
        bail!("generator without sources or ports");
    }
    let socks = t
        .srcs
        .iter()
        .map(|s| {
            std::net::UdpSocket::bind(SocketAddrV4::new(*s, 0)).with_context(|| format!("bind {s}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let payload = *b"conntrack-trace bench\0";
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    // SAFETY: all-zero is a valid sockaddr_in / mmsghdr.
    let mut addrs: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
    for a in &mut addrs {
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_addr.s_addr = u32::from(t.dst).to_be();
    }
    // The headers point into `addrs` and at `iov`, neither of which moves
    // (the Vec is never resized) until the loop ends.
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .map(|a| {
            // SAFETY: as above.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            m.msg_hdr.msg_iov = &raw mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let (mut sock, mut port) = (0usize, t.ports.start);
    let mut sent = 0u64;
    let started = Instant::now();
    while sent < b.max && Instant::now() < b.until {
        if let Some(rate) = b.pace {
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait.min(b.until.saturating_duration_since(Instant::now())));
                continue;
            }
        }
        // One call sends from one socket, so a batch ends where the
        // ports wrap to the next source.
        let n = (BATCH as u64)
            .min(u64::from(t.ports.end - port))
            .min(b.max - sent) as usize;
        for (i, m) in msgs[..n].iter_mut().enumerate() {
            // SAFETY: msg_name points at addrs[i] (set above).
            let a = unsafe { &mut *m.msg_hdr.msg_name.cast::<libc::sockaddr_in>() };
            a.sin_port = (port + i as u16).to_be();
        }
        // SAFETY: msgs, addrs, iov and payload outlive the call.
        let r = unsafe { libc::sendmmsg(socks[sock].as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // A full socket buffer or a neighbour not yet resolved: retry.
            if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                continue;
            }
            bail!("sendmmsg: {e}");
        }
        sent += r as u64;
        port += r as u16;
        if port == t.ports.end {
            port = t.ports.start;
            sock = (sock + 1) % socks.len();
        }
    }
    Ok(sent)
}

/// Runs each generator on its own thread in the client namespace; returns
/// the datagrams sent in all.
pub fn generate_all(topo: &Topology, gens: &[Traffic], b: Bound) -> Result<u64> {
    let path = topo.client.path();
    std::thread::scope(|s| -> Result<u64> {
        let handles: Vec<_> = gens
            .iter()
            .map(|t| {
                let path = &path;
                s.spawn(move || in_netns(path, || generate(t, b)))
            })
            .collect();
        let mut sent = 0;
        for h in handles {
            sent += h
                .join()
                .map_err(|_| anyhow::anyhow!("generator panicked"))???;
        }
        Ok(sent)
    })
}

/// Adds `n` more addresses (10.77.SUBNET.10, .11, ...) to the client's
/// side of a [`Topology::new`]`(tag, subnet)`, so generators can vary the
/// source address.
pub fn client_sources(topo: &Topology, tag: &str, subnet: u8, n: u8) -> Result<Vec<Ipv4Addr>> {
    if n > 200 {
        bail!("at most 200 extra client addresses in a /24, not {n}");
    }
    let dev = format!("{PREFIX}{tag}c");
    (0..n)
        .map(|i| {
            let a = Ipv4Addr::new(10, 77, subnet, 10 + i);
            topo.client
                .ip(&["addr", "add", &format!("{a}/24"), "dev", &dev])?;
            Ok(a)
        })
        .collect()
}

// ---- traced processes ----

/// What a process used, from wait4().
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub wall_s: f64,
    /// User + system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set, KiB: the process's own high-water mark (VmHWM of
    /// its mm after exec), polled while it runs. Not wait4()'s ru_maxrss:
    /// at exec the kernel seeds that with the high-water mark of the memory
    /// the exec replaces (fs/exec.c, exec_mmap() → setmax_mm_hiwater_rss()),
    /// which after a fork is a copy of xtask's whole resident set — after
    /// the user-space bench read a 200 MB capture, every later child's
    /// ru_maxrss read 212.6 MiB whatever it used.
    pub peak_rss_kib: u64,
}

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `VmHWM`, `RssAnon`, ...),
/// while the process runs.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Reaps `pid`, waiting at most until `deadline` and killing it then;
/// returns its exit status and usage.
fn reap(pid: u32, started: Instant, deadline: Instant) -> Result<(i32, Usage)> {
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed = false;
    let mut peak = 0;
    let mut polls = 0u32;
    loop {
        // Every 10 ms (a high-water mark: only the last few ms before the
        // exit can be missed); a zombie has no mm left to read.
        if polls.is_multiple_of(10)
            && let Some(k) = status_kib(pid, "VmHWM")
        {
            peak = peak.max(k);
        }
        polls += 1;
        // SAFETY: pid is our child; status and ru are valid for writes.
        let r = unsafe { libc::wait4(pid as i32, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid as i32 {
            break;
        }
        if r < 0 {
            bail!("wait4({pid}): {}", std::io::Error::last_os_error());
        }
        if !killed && Instant::now() > deadline {
            // SAFETY: signalling our own, not yet reaped, child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if killed {
        bail!("process {pid} did not finish in time (killed)");
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        status,
        Usage {
            wall_s: started.elapsed().as_secs_f64(),
            cpu_s: secs(ru.ru_utime) + secs(ru.ru_stime),
            peak_rss_kib: peak,
        },
    ))
}

/// Runs a command to its end (at most `limit`), stdout to /dev/null;
/// fails on a non-zero exit.
pub fn run_timed(cmd: &mut Command, limit: Duration) -> Result<Usage> {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let (status, usage) = reap(child.id(), started, started + limit)?;
    if status != 0 {
        bail!("{cmd:?} failed (wait status {status})");
    }
    Ok(usage)
}

/// A running tracer (or bpftrace) whose stdout is read on a thread that
/// keeps only the last line (the tracer's ndjson summary); stopped with
/// SIGINT by [`Traced::stop`], killed on drop otherwise.
pub struct Traced {
    child: Child,
    started: Instant,
    reaped: bool,
    out: Option<JoinHandle<String>>,
}

/// Output kept from a traced process: its summary (a human table, or an
/// ndjson line that lists every finding: megabytes under a flood of
/// ports) with room to spare.
const TAIL_BYTES: usize = 32 << 20;

/// Reads `r` to its end; returns its last [`TAIL_BYTES`] from a line
/// start. Nothing here looks at each byte while the process runs: the
/// reader shares 2 vCPUs with the tracer and the generators it measures
/// (a per-read scan for newlines, in xtask's debug build, took over a
/// third of the machine during an ndjson flood and so lowered every
/// figure it was meant to record).
fn tail_of(mut r: impl std::io::Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut tail: Vec<u8> = Vec::new();
        let mut cut = false;
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            // Amortised: one memmove per TAIL_BYTES read.
            if tail.len() > 2 * TAIL_BYTES {
                tail.drain(..tail.len() - TAIL_BYTES);
                cut = true;
            }
        }
        if tail.len() > TAIL_BYTES {
            tail.drain(..tail.len() - TAIL_BYTES);
            cut = true;
        }
        if cut {
            let start = tail.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
            tail.drain(..start);
        }
        String::from_utf8_lossy(&tail).into_owned()
    })
}

/// The last non-empty line of `s`.
fn last_line(s: &str) -> &str {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

impl Traced {
    fn spawn(mut cmd: Command) -> Result<Traced> {
        let started = Instant::now();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let out = child.stdout.take().map(tail_of);
        Ok(Traced {
            child,
            started,
            reaped: false,
            out,
        })
    }

    /// Starts `bin trace ARGS --ready-file F` and waits (at most 60 s) for
    /// F: every program attached.
    pub fn tracer(bin: &Path, args: &[&str]) -> Result<Traced> {
        let mut cmd = Command::new(bin);
        cmd.arg("trace").args(args);
        Traced::until_ready(cmd)
            .with_context(|| format!("{} trace {}", bin.display(), args.join(" ")))
    }

    /// Starts `cmd --ready-file F` and waits (at most 60 s) for F.
    pub fn until_ready(mut cmd: Command) -> Result<Traced> {
        let ready = std::env::temp_dir().join(format!("ctt-bench-ready-{}", std::process::id()));
        let _ = std::fs::remove_file(&ready);
        cmd.arg("--ready-file").arg(&ready);
        let mut t = Traced::spawn(cmd)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            if t.child.try_wait()?.is_some() || Instant::now() > deadline {
                bail!("did not become ready");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&ready);
        Ok(t)
    }

    /// Starts `bpftrace -e SCRIPT` and waits (at most 60 s) until it has
    /// loaded a program (bpftool lists one more): bpftrace has no ready
    /// signal, and "Attaching N probes..." is printed before attaching.
    pub fn bpftrace(script: &str) -> Result<Traced> {
        // Program ids only grow: a new one is bpftrace's, whatever a tracer
        // stopped just before still unloads meanwhile (a count of programs
        // could stand still while one goes and one comes).
        let newest = prog_ids()?.into_iter().max().unwrap_or(0);
        let mut cmd = Command::new("bpftrace");
        cmd.args(["-e", script]);
        let mut t = Traced::spawn(cmd)
            .context("bpftrace (Debian package bpftrace; cargo xtask setup installs it)")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while prog_ids()?.into_iter().all(|id| id <= newest) {
            if t.child.try_wait()?.is_some() || Instant::now() > deadline {
                bail!("bpftrace -e '{script}' did not load its program");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(t)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (context switches, CPU ticks) so far.
    pub fn proc_usage(&self) -> Option<(u64, u64)> {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let ctx: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        Some((ctx, ticks))
    }

    /// Resident set now (VmRSS), KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_kib("VmRSS")
    }

    /// A `/proc/PID/status` figure in KiB (`VmRSS`, `RssAnon`, ...).
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        status_kib(self.pid(), field)
    }

    /// SIGINT, then waits (at most 60 s); returns the last line printed
    /// as JSON, if it is JSON (the tracer's summary), and the usage.
    pub fn stop(self) -> Result<(Option<serde_json::Value>, Usage)> {
        let (tail, usage) = self.stop_tail()?;
        Ok((serde_json::from_str(last_line(&tail)).ok(), usage))
    }

    /// Stops the process (SIGINT) and returns the end of its output.
    pub fn stop_tail(mut self) -> Result<(String, Usage)> {
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGINT) };
        self.reaped = true;
        let (_, usage) = reap(
            self.pid(),
            self.started,
            Instant::now() + Duration::from_secs(60),
        )?;
        let tail = self
            .out
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Ok((tail, usage))
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Lost events in a `--format human` summary: the sum of the `lost`
/// column of its `events lost observed` table (None: no such table).
pub fn human_lost(text: &str) -> Option<u64> {
    let lines: Vec<&str> = text.lines().collect();
    let head = lines.iter().rposition(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w == ["events", "lost", "observed"]
    })?;
    let mut total = 0;
    for kind in ["table_full", "early_drop", "insert_failed"] {
        let row = lines[head + 1..]
            .iter()
            .take(3)
            .find(|l| l.split_whitespace().next() == Some(kind))?;
        let cols: Vec<&str> = row.split_whitespace().collect();
        total += cols.get(2)?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Drops shed by the event budget in a `--format human` summary (its
/// "N drops shed by the event budget" line; 0 without one).
pub fn human_shed(text: &str) -> u64 {
    text.lines()
        .rev()
        .find_map(|l| {
            l.split_once(" drops shed by the event budget")
                .and_then(|(n, _)| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The sum over kinds of a summary's `events` or `lost` object.
pub fn kinds_total(summary: &serde_json::Value, field: &str) -> Option<u64> {
    summary[field]
        .as_object()
        .map(|o| o.values().filter_map(|v| v.as_u64()).sum())
}

// ---- BPF program statistics ----

/// (name, run_time_ns, run_cnt) of every loaded BPF program, by bpftool.
pub fn prog_stats() -> Result<Vec<(String, u64, u64)>> {
    let v = bpftool_progs()?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((
                        p["name"].as_str()?.to_owned(),
                        p["run_time_ns"].as_u64().unwrap_or(0),
                        p["run_cnt"].as_u64().unwrap_or(0),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// `bpftool prog show --json`.
fn bpftool_progs() -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("running bpftool (Debian package bpftool; cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("bpftool's JSON")
}

/// Ids of the loaded programs.
fn prog_ids() -> Result<Vec<u64>> {
    Ok(bpftool_progs()?
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default())
}

/// The tracer's programs, by bpftool name.
pub const HOOKS: [&str; 4] = [
    "kfree_skb",
    "kmem_cache_free",
    // The empty programs of examples/empty_hooks.rs (names cut to 15
    // characters by the kernel).
    "kfree_skb_empty",
    "kmem_free_empty",
];

/// Builds an example of the conntrack-trace crate (release) and returns
/// its path.
pub fn build_example(name: &str) -> Result<std::path::PathBuf> {
    crate::cmd(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "conntrack-trace",
            "--example",
            name,
        ],
    )?;
    Ok(crate::workspace_root()
        .join("target/release/examples")
        .join(name))
}

/// Per program of [`HOOKS`] that ran between two [`prog_stats`]
/// readings: (name, ns per run, runs).
pub fn hook_costs(
    before: &[(String, u64, u64)],
    after: &[(String, u64, u64)],
) -> Vec<(String, f64, u64)> {
    HOOKS
        .iter()
        .filter_map(|name| {
            let sum = |v: &[(String, u64, u64)]| {
                v.iter()
                    .filter(|(n, _, _)| n == name)
                    .fold((0u64, 0u64), |(t, c), (_, rt, rc)| (t + rt, c + rc))
            };
            let (t0, c0) = sum(before);
            let (t1, c1) = sum(after);
            (c1 > c0).then(|| {
                (
                    (*name).to_owned(),
                    t1.saturating_sub(t0) as f64 / (c1 - c0) as f64,
                    c1 - c0,
                )
            })
        })
        .collect()
}

/// Mounts tracefs at /sys/kernel/tracing while held, if it is not there
/// (bpftrace reads tracepoint formats from it); unmounts what it mounted.
pub struct Tracefs(bool);

impl Tracefs {
    pub fn ensure() -> Result<Tracefs> {
        const DIR: &str = "/sys/kernel/tracing";
        if Path::new(DIR).join("events").exists() {
            return Ok(Tracefs(false));
        }
        conntrack_trace_tests::run("mount", &["-t", "tracefs", "nodev", DIR])
            .context("mounting tracefs for bpftrace")?;
        Ok(Tracefs(true))
    }
}

impl Drop for Tracefs {
    fn drop(&mut self) {
        if self.0 {
            let _ = conntrack_trace_tests::run("umount", &["/sys/kernel/tracing"]);
        }
    }
}

// ---- figures ----

/// Median, min and max.
pub fn spread(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

/// `median [min–max]` with `prec` decimals, or `—` without values.
pub fn fmt_spread(v: Vec<f64>, prec: usize) -> String {
    match spread(v) {
        Some((m, lo, hi)) => format!("{m:.prec$} [{lo:.prec$}–{hi:.prec$}]"),
        None => "—".into(),
    }
}

/// Per-round ratios `v[i] / base[i]` (the same round's no-tracer figure).
pub fn ratios(v: &[f64], base: &[f64]) -> Vec<f64> {
    v.iter().zip(base).map(|(x, b)| x / b).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The summary table as `conntrack-trace trace --format human`
    /// prints it (conntrack-trace/src/output/human.rs, `summary_text`).
    const SUMMARY: &str = "\
== conntrack-trace summary: 3.0s, backend tp_btf/kfree_skb, evictions on, namespace bf-srv ==
                      events       lost   observed
table_full            812345     437001    1249346
early_drop                 0          0          0
insert_failed              2          1          3
rule drops (not conntrack's): 0
WARNING: 437002 events lost (ring buffer full; try --ring-size)
";

    #[test]
    fn human_shed_reads_the_budget_line() {
        let text = "x\n123 drops shed by the event budget (--event-budget: events sampled by flow, the rest counted only)\ny\n";
        assert_eq!(human_shed(text), 123);
        assert_eq!(human_shed("no such line\n"), 0);
    }

    #[test]
    fn human_lost_sums_the_lost_column() {
        let live = "table_full 5 lost 3 observed\n".repeat(3);
        assert_eq!(human_lost(&(live + SUMMARY)), Some(437_002));
        assert_eq!(human_lost("no summary here\n"), None);
        // A row missing: no figure rather than a wrong one.
        let cut = SUMMARY.replace("insert_failed              2          1          3\n", "");
        assert_eq!(human_lost(&cut), None);
    }

    #[test]
    fn the_tail_keeps_the_last_lines_within_its_bound() {
        let line = "a line of the live view, long enough to fill the bound soon\n";
        let mut text = line.repeat(2 * TAIL_BYTES / line.len() + 7);
        text.push_str(SUMMARY);
        let tail = tail_of(std::io::Cursor::new(text.clone().into_bytes()))
            .join()
            .unwrap();
        assert!(tail.len() <= TAIL_BYTES, "{}", tail.len());
        assert!(tail.len() > TAIL_BYTES - line.len() - 1, "{}", tail.len());
        assert!(text.ends_with(&tail));
        assert!(tail.starts_with("a line"), "cut at a line start");
        assert_eq!(human_lost(&tail), Some(437_002));
        // Short output is kept whole.
        let tail = tail_of(std::io::Cursor::new(SUMMARY.as_bytes().to_vec()))
            .join()
            .unwrap();
        assert_eq!(tail, SUMMARY);
        assert_eq!(
            last_line(&tail),
            "WARNING: 437002 events lost (ring buffer full; try --ring-size)"
        );
    }
}
