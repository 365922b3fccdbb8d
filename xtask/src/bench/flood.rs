//! `cargo xtask bench flood`: what the tracer costs a host that is already
//! dropping. A client namespace floods a server namespace whose conntrack
//! table is full of assured entries (every datagram is a new flow, so every
//! one is a `table_full` drop in nf_conntrack_in()); rounds alternate
//! between no tracer and the tracer (and optionally a second binary, e.g. a
//! build from before a change), and each figure is the median of the
//! rounds with its min and max:
//!
//! - the kernel's drop rate (the server's `drop` counter) and its ratio to
//!   the rate without a tracer: a tracer must not slow a host that sheds
//!   load;
//! - events the tracer lost (from its summary) and its context switches
//!   and CPU during the flood;
//! - in separate rounds with `kernel.bpf_stats_enabled=1` (restored
//!   afterwards; the statistics themselves cost two clock reads per run,
//!   which is why the rate rounds run without them): each program's
//!   `run_time_ns / run_cnt` over the flood, from `bpftool prog show`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_tests::{KernelLock, Sysctl, Topology, in_netns};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Seconds of flood per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Measurements per configuration.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Generator threads (each one UDP socket, sendmmsg batches).
    #[arg(long, default_value_t = 2)]
    pub generators: u16,
    /// A second conntrack-trace binary measured in the same rounds (e.g. a
    /// build of the previous commit), for before/after ratios.
    #[arg(long)]
    pub compare: Option<PathBuf>,
}

/// One measurement of one configuration.
#[derive(Default, Clone)]
struct Sample {
    drops_per_s: f64,
    lost: Option<u64>,
    ctx_switches_per_s: Option<f64>,
    cpu_pct: Option<f64>,
    /// (program name, ns per run) for the stats rounds.
    ns_per_run: Vec<(String, f64)>,
    /// The backend the tracer chose (its summary).
    backend: Option<String>,
}

struct Config {
    label: String,
    bin: Option<PathBuf>,
    stats: bool,
}

/// Datagrams per sendmmsg call.
const BATCH: usize = 256;

/// Sends datagrams from one socket to `dst`, cycling the destination port
/// through `ports` (a new conntrack tuple each time), until `until`.
fn generate(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ports: std::ops::Range<u16>,
    until: Instant,
) -> Result<u64> {
    let sock = std::net::UdpSocket::bind(SocketAddrV4::new(src, 0)).context("bind")?;
    let payload = *b"conntrack-trace bench\0";
    let mut addrs: Vec<libc::sockaddr_in> = Vec::with_capacity(BATCH);
    // SAFETY: all-zero is a valid sockaddr_in / iovec / mmsghdr.
    let zero_addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut port = ports.start;
    let mut sent = 0u64;
    while Instant::now() < until {
        addrs.clear();
        for _ in 0..BATCH {
            let mut a = zero_addr;
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = port.to_be();
            a.sin_addr.s_addr = u32::from(dst).to_be();
            addrs.push(a);
            port = if port + 1 >= ports.end {
                ports.start
            } else {
                port + 1
            };
        }
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
        // SAFETY: msgs, addrs, iov and payload outlive the call.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // A full socket buffer or a neighbour not yet resolved: retry.
            if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                continue;
            }
            bail!("sendmmsg: {e}");
        }
        sent += n as u64;
    }
    Ok(sent)
}

fn start_tracer(bin: &Path, server_ns: &str, out: &Path) -> Result<Child> {
    let ready = std::env::temp_dir().join(format!("ctt-bench-flood-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(bin)
        .args([
            "trace",
            "--format",
            "ndjson",
            "--netns",
            server_ns,
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(std::fs::File::create(out).context("tracer output file")?)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            bail!("{} did not become ready", bin.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&ready);
    Ok(child)
}

/// (context switches, CPU ticks) of a process so far.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
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

/// (name, run_time_ns, run_cnt) of every loaded BPF program, by bpftool.
fn prog_stats() -> Result<Vec<(String, u64, u64)>> {
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
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
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

/// The tracer's ndjson summary (its last line).
fn summary(out: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(out).ok()?;
    serde_json::from_str(text.lines().last()?).ok()
}

fn ct_drop(topo: &Topology) -> Result<u64> {
    Ok(topo.server.ct_stats()?.drop)
}

fn measure(topo: &Topology, cfg: &Config, args: &Args) -> Result<Sample> {
    let out = std::env::temp_dir().join(format!("ctt-bench-flood-{}.ndjson", std::process::id()));
    let tracer = match &cfg.bin {
        Some(bin) => Some(start_tracer(bin, &topo.server.name, &out)?),
        None => None,
    };
    let _stats = if cfg.stats {
        Some(Sysctl::set("kernel.bpf_stats_enabled", 1)?)
    } else {
        None
    };
    let progs_before = if cfg.stats { prog_stats()? } else { Vec::new() };
    let usage_before = tracer.as_ref().and_then(|t| proc_usage(t.id()));
    let drop_before = ct_drop(topo)?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(args.seconds);
    let path = topo.client.path();
    let (src, dst) = (topo.client_ip, topo.server_ip);
    let sent: u64 = std::thread::scope(|s| -> Result<u64> {
        let handles: Vec<_> = (0..args.generators)
            .map(|g| {
                let path = &path;
                s.spawn(move || {
                    let base = 1024 + g * 8192;
                    in_netns(path, || generate(src, dst, base..base + 8192, until))
                })
            })
            .collect();
        let mut sent = 0;
        for h in handles {
            sent += h
                .join()
                .map_err(|_| anyhow::anyhow!("generator panicked"))???;
        }
        Ok(sent)
    })?;
    let secs = started.elapsed().as_secs_f64();
    let drops = ct_drop(topo)? - drop_before;
    let usage_after = tracer.as_ref().and_then(|t| proc_usage(t.id()));
    let progs_after = if cfg.stats { prog_stats()? } else { Vec::new() };
    let mut sample = Sample {
        drops_per_s: drops as f64 / secs,
        ..Sample::default()
    };
    if drops * 10 < sent {
        bail!("only {drops} of {sent} datagrams were dropped: is the server's table full?");
    }
    if let (Some((c0, t0)), Some((c1, t1))) = (usage_before, usage_after) {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        sample.ctx_switches_per_s = Some((c1 - c0) as f64 / secs);
        sample.cpu_pct = Some((t1 - t0) as f64 / hz / secs * 100.0);
    }
    for name in ["kfree_skb", "kmem_cache_free"] {
        let sum = |v: &[(String, u64, u64)]| {
            v.iter()
                .filter(|(n, _, _)| n == name)
                .fold((0u64, 0u64), |(t, c), (_, rt, rc)| (t + rt, c + rc))
        };
        let (t0, c0) = sum(&progs_before);
        let (t1, c1) = sum(&progs_after);
        if c1 > c0 {
            sample
                .ns_per_run
                .push((name.to_owned(), (t1 - t0) as f64 / (c1 - c0) as f64));
        }
    }
    if let Some(mut t) = tracer {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(t.id() as i32, libc::SIGINT) };
        let _ = t.wait();
        if let Some(sum) = summary(&out) {
            sample.lost = sum["lost"]
                .as_object()
                .map(|o| o.values().filter_map(|v| v.as_u64()).sum());
            sample.backend = sum["backend"].as_str().map(str::to_owned);
        }
    }
    let _ = std::fs::remove_file(&out);
    Ok(sample)
}

/// Median, min and max.
fn spread(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some((v[v.len() / 2], v[0], v[v.len() - 1]))
}

fn fmt_spread(v: Vec<f64>, prec: usize) -> String {
    match spread(v) {
        Some((m, lo, hi)) => format!("{m:.prec$} [{lo:.prec$}–{hi:.prec$}]"),
        None => "—".into(),
    }
}

/// Runs the flood rounds; returns the result as Markdown (a table) and
/// the backend the tracer chose.
pub fn run(bin: &Path, args: &Args) -> Result<(String, String)> {
    let _lock = KernelLock::acquire()?;
    let topo = Topology::new("bf", 97)?;
    const MAX: u64 = 64;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let _filler = topo.fill_assured(MAX)?;
    let mut configs = vec![Config {
        label: "no tracer".into(),
        bin: None,
        stats: false,
    }];
    let mut bins = vec![("tracer".to_owned(), bin.to_path_buf())];
    if let Some(c) = &args.compare {
        bins.push((format!("tracer ({})", c.display()), c.clone()));
    }
    for (label, b) in &bins {
        configs.push(Config {
            label: label.clone(),
            bin: Some(b.clone()),
            stats: false,
        });
    }
    for (label, b) in &bins {
        configs.push(Config {
            label: format!("{label}, bpf_stats"),
            bin: Some(b.clone()),
            stats: true,
        });
    }
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); configs.len()];
    for round in 0..args.rounds {
        for (i, cfg) in configs.iter().enumerate() {
            let s = measure(&topo, cfg, args)
                .with_context(|| format!("round {round}, {}", cfg.label))?;
            eprintln!(
                "round {round}: {:<40} {:>9.0} drops/s lost {:?} ctx/s {:?} {:?}",
                cfg.label,
                s.drops_per_s,
                s.lost,
                s.ctx_switches_per_s.map(|c| c as u64),
                s.ns_per_run
            );
            results[i].push(s);
        }
    }
    let base: Vec<f64> = results[0].iter().map(|s| s.drops_per_s).collect();
    let mut md = format!(
        "Table-full flood: {} generator(s) (UDP sendmmsg, a new tuple per datagram) into a \
         server namespace whose table (max {MAX}) is full of assured entries; {} s x {} rounds, \
         rounds alternating; median [min–max]. Ratios are per round (rate with / rate without \
         in the same round).\n\n\
         | configuration | kernel drops/s | ratio to no tracer | lost events | tracer context switches/s | tracer CPU % | kfree_skb ns/run | kmem_cache_free ns/run |\n\
         |---|---|---|---|---|---|---|---|\n",
        args.generators, args.seconds, args.rounds
    );
    for (cfg, samples) in configs.iter().zip(&results) {
        let ratio: Vec<f64> = samples
            .iter()
            .zip(&base)
            .map(|(s, b)| s.drops_per_s / b)
            .collect();
        let ns = |name: &str| -> Vec<f64> {
            samples
                .iter()
                .filter_map(|s| {
                    s.ns_per_run
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| *v)
                })
                .collect()
        };
        let lost: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.lost.map(|l| l as f64))
            .collect();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            cfg.label,
            fmt_spread(samples.iter().map(|s| s.drops_per_s).collect(), 0),
            if cfg.bin.is_none() {
                "1".into()
            } else {
                fmt_spread(ratio, 2)
            },
            fmt_spread(lost, 0),
            fmt_spread(
                samples
                    .iter()
                    .filter_map(|s| s.ctx_switches_per_s)
                    .collect(),
                0
            ),
            fmt_spread(samples.iter().filter_map(|s| s.cpu_pct).collect(), 0),
            fmt_spread(ns("kfree_skb"), 0),
            fmt_spread(ns("kmem_cache_free"), 0),
        ));
    }
    let backend = results
        .iter()
        .flatten()
        .find_map(|s| s.backend.clone())
        .unwrap_or_else(|| "unknown".into());
    Ok((md, backend))
}
