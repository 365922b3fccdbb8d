//! `cargo xtask bench`: what the tracer costs the rest of the system. With
//! no subcommand it runs the socket churn below and the table-full flood
//! ([`flood`]) and writes `BENCHMARKS.md` from that run.
//!
//! `tp_btf/kmem_cache_free` runs on every slab free on the machine; this
//! measures a socket churn loop (create a UDP socket, send one datagram,
//! close it: several slab frees per iteration) without the tracer, with the
//! tracer and `--evictions off`, and with `--evictions on`. Rounds alternate
//! between configurations and the median per-iteration time is reported.

use std::{
    net::UdpSocket,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

mod flood;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: Option<What>,
    /// Socket create/send/close iterations per measurement.
    #[arg(long, default_value_t = 100_000)]
    iterations: u32,
    /// Measurements per configuration.
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
    /// Table-full flood: the kernel's drop rate with and without the
    /// tracer, lost events, the tracer's wakeups and CPU, and each
    /// program's ns per run (bpf_stats).
    Flood(flood::Args),
}

fn churn(n: u32) -> Result<Duration> {
    let start = Instant::now();
    for _ in 0..n {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        // Port 9 (discard): nobody listens; the datagram is freed either way.
        let _ = s.send_to(b"x", "127.0.0.1:9");
    }
    Ok(start.elapsed())
}

fn start_tracer(bin: &Path, evictions: &str) -> Result<Child> {
    let ready = std::env::temp_dir().join(format!("ctt-bench-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(bin)
        .args([
            "trace",
            "--format",
            "ndjson",
            "--evictions",
            evictions,
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting conntrack-trace")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            bail!("conntrack-trace did not become ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&ready);
    Ok(child)
}

fn stop(mut c: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    let _ = c.wait();
}

/// Makes the kernel allocate and free one conntrack entry, so the hook
/// learns the nf_conntrack cache: a throwaway namespace whose ruleset uses
/// `ct state`, one datagram on its loopback, then the namespace is deleted
/// (its entries are freed with it).
fn conntrack_churn_once() -> Result<()> {
    const NS: &str = "ctt-bench";
    let run = |args: &[&str]| -> Result<()> {
        let st = Command::new(args[0])
            .args(&args[1..])
            .stderr(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("{} failed", args.join(" "));
        }
        Ok(())
    };
    let _ = run(&["ip", "netns", "del", NS]);
    run(&["ip", "netns", "add", NS])?;
    let r = (|| -> Result<()> {
        run(&["ip", "-n", NS, "link", "set", "lo", "up"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            NS,
            "nft",
            "add table inet b; add chain inet b c { type filter hook output priority 0; ct state new accept; }",
        ])?;
        let ns = std::fs::File::open(format!("/run/netns/{NS}"))?;
        std::thread::scope(|s| {
            s.spawn(|| -> Result<()> {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on an owned fd; this thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                let s = UdpSocket::bind("127.0.0.1:0")?;
                s.send_to(b"x", "127.0.0.1:9")?;
                Ok(())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread panicked"))?
        })
    })();
    let _ = run(&["ip", "netns", "del", NS]);
    r
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    match args.what {
        Some(What::Amplify) => return example("amplify_bench", &[]),
        Some(What::Capture { events }) => {
            return example("capture_bench", &[&events.to_string()]);
        }
        Some(What::Flood(f)) => {
            let bin = crate::build_release()?;
            let (md, _) = flood::run(&bin, &f)?;
            println!("{md}");
            return Ok(());
        }
        None => {}
    }
    let bin = crate::build_release()?;
    let configs = ["none", "off", "on-cold", "on"];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    churn(args.iterations / 10)?; // warm caches
    for round in 0..args.rounds {
        for (i, cfg) in configs.iter().enumerate() {
            let tracer = match *cfg {
                "none" => None,
                "off" => Some(start_tracer(&bin, "off")?),
                _ => Some(start_tracer(&bin, "on")?),
            };
            if *cfg == "on" {
                // The hook learns the nf_conntrack cache on the first
                // conntrack free; on a host with conntrack traffic that is
                // immediate. "on-cold" measures a host with none.
                conntrack_churn_once()?;
                // netns teardown frees entries asynchronously (cleanup_net).
                std::thread::sleep(Duration::from_millis(500));
            }
            let d = churn(args.iterations)?;
            if let Some(t) = tracer {
                stop(t);
            }
            let ns = d.as_nanos() as f64 / args.iterations as f64;
            eprintln!("round {round}: {cfg:>4}: {ns:.0} ns/iteration");
            results[i].push(ns);
        }
    }
    let base = median(&mut results[0]);
    let mut md = format!(
        "Socket churn (UDP socket, one datagram, close; several slab frees per iteration), \
         {} iterations x {} rounds, rounds alternating; median ns per iteration.\n\n\
         | configuration | ns/iteration | vs no tracer |\n|---|---|---|\n",
        args.iterations, args.rounds
    );
    for (i, cfg) in configs.iter().enumerate() {
        let m = median(&mut results[i]);
        let label = match *cfg {
            "none" => "no tracer",
            "off" => "tracer, --evictions off",
            "on-cold" => "evictions on, not learned",
            _ => "evictions on, learned",
        };
        md.push_str(&format!(
            "| {label} | {m:.0} | {:+.1} % |\n",
            (m / base - 1.0) * 100.0
        ));
    }
    println!("{md}");
    let flood_args = flood::Args {
        seconds: 3.0,
        rounds: args.rounds,
        generators: 2,
        compare: None,
    };
    let (flood_md, backend) = flood::run(&bin, &flood_args)?;
    println!("{flood_md}");
    let doc = format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench` from one run; do not edit by hand.\n\n\
         - date: {}\n- kernel: {}\n- machine: {} CPUs, {}\n- backend: {backend}\n- tracer: {}\n\n\
         ## Eviction hook\n\n{md}\n## Table-full flood\n\n{flood_md}",
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
