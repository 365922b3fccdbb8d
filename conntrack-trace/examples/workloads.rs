//! Lists this host's network namespaces with the workload each resolves
//! to, and measures the resolver under namespace churn.
//!
//! ```sh
//! cargo run -p conntrack-trace --example workloads              # list
//! cargo run -p conntrack-trace --example workloads -- --churn 200 --rounds 5
//! ```
//!
//! `--churn N`: each round starts N processes each in a new network
//! namespace (`unshare --net sleep`), resolves all namespaces (cold: N
//! misses), resolves again (warm: all cached), then stops them; prints
//! lookups/s, the warm refresh time and the process's RSS growth.
//! `--docker N` does the same with N Docker containers (`docker run
//! --network none`, image `--image`), so the Docker API is on the path.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use conntrack_trace::{
    kernel::netns,
    kernel::workload::{Config, Resolver},
};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn arg(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let churn: usize = arg(&args, "--churn").map_or(0, |v| v.parse().expect("--churn N"));
    let dockers: usize = arg(&args, "--docker").map_or(0, |v| v.parse().expect("--docker N"));
    let rounds: usize = arg(&args, "--rounds").map_or(3, |v| v.parse().expect("--rounds N"));
    let image = arg(&args, "--image").unwrap_or_else(|| "ctt-busybox:test".into());
    let mut r = Resolver::new(Config::from_env());
    if churn == 0 && dockers == 0 {
        let list = netns::list();
        r.refresh(&list);
        for n in r.take_notes() {
            eprintln!("note: {n}");
        }
        let w: std::collections::BTreeMap<u32, _> =
            r.workloads(list.keys().copied()).into_iter().collect();
        for (ino, ns) in &list {
            match w.get(ino) {
                Some(w) => println!(
                    "{ino} {} (was {}) {}",
                    w.display(),
                    ns.name,
                    serde_json::to_string(w).unwrap_or_default()
                ),
                None => println!("{ino} {}", ns.name),
            }
        }
        return;
    }
    let base = rss_kib();
    for round in 0..rounds {
        let mut children: Vec<Child> = Vec::new();
        let mut containers: Vec<String> = Vec::new();
        for _ in 0..churn {
            children.push(
                Command::new("unshare")
                    .args(["--net", "sleep", "60"])
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("unshare"),
            );
        }
        for i in 0..dockers {
            let name = format!("ctt-churn-{}-{round}-{i}", std::process::id());
            let out = Command::new("docker")
                .args([
                    "run",
                    "-d",
                    "--network",
                    "none",
                    "--name",
                    &name,
                    &image,
                    "/bin/sleep",
                    "60",
                ])
                .output()
                .expect("docker run");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            containers.push(name);
        }
        // Let every child reach its namespace.
        let want = churn + dockers;
        let deadline = Instant::now() + Duration::from_secs(20);
        let list = loop {
            let l = netns::list();
            if l.len() >= want || Instant::now() > deadline {
                break l;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let before = r.stats();
        let t = Instant::now();
        r.refresh(&list);
        let cold = t.elapsed();
        let misses = r.stats().lookups - before.lookups;
        let t = Instant::now();
        r.refresh(&list);
        let warm = t.elapsed();
        let named = r.workloads(list.keys().copied()).len();
        println!(
            "round {round}: {} namespaces, {misses} looked up in {:.1} ms ({:.0} lookups/s), warm refresh {:.2} ms, {named} with a workload, cache {}, RSS +{} KiB, docker calls {}",
            list.len(),
            cold.as_secs_f64() * 1e3,
            misses as f64 / cold.as_secs_f64(),
            warm.as_secs_f64() * 1e3,
            r.len(),
            rss_kib().saturating_sub(base),
            r.stats().docker_calls - before.docker_calls,
        );
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !containers.is_empty() {
            let mut cmd = Command::new("docker");
            cmd.args(["rm", "-f"])
                .args(&containers)
                .stdout(Stdio::null());
            let _ = cmd.status();
        }
        r.take_notes();
    }
    // The gone namespaces leave the cache at the next refresh.
    r.refresh(&netns::list());
    println!(
        "after churn: cache {} entries, RSS +{} KiB",
        r.len(),
        rss_kib().saturating_sub(base)
    );
}
