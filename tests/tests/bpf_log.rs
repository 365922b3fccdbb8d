//! `--bpf-log` (issue 24 §4): the programs' own diagnostic log reaches
//! stderr as `bpf: LEVEL ...` lines, and the decisions it names are the
//! ones the scenario makes. A raw-table rule drops udp/9999 before
//! conntrack sees it (no entry, conntrack's `drop` untouched: a rule drop,
//! said with the check that decided); a small table with few buckets makes
//! early_drop() evict unreplied entries. With the default (off) no `bpf:`
//! line appears.
//!
//! Tracepoint backend only: the fexit programs carry no log calls (see
//! conntrack-trace/src/kernel/backend/bpflog.rs); in the fexit cells of the
//! VM matrix the test checks the one-line refusal instead.

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{Sysctl, Topology, Tracer, ctt, kernel_test, traffic};

const RAW_DROP: &str = "
table inet ctt_raw {
    chain raw {
        type filter hook prerouting priority raw; policy accept;
        udp dport 9999 drop
    }
}
";

/// Runs the scenario under `trace --netns <server> EXTRA` and returns the
/// tracer's stderr.
fn scenario(topo: &Topology, extra: &[&str]) -> Result<String> {
    let mut args = vec!["--netns", topo.server.name.as_str()];
    args.extend_from_slice(extra);
    let tracer = Tracer::start(&args)?;
    let cli = topo.client.path();
    traffic::udp_oneshots(&cli, topo.client_ip, topo.server_ip, 9999, 25_000..25_020)?;
    // Few buckets: early_drop() finds an unreplied (unassured) entry near
    // every new tuple once the table is at its limit.
    let max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let buckets = Sysctl::set("net.netfilter.nf_conntrack_buckets", 16)?;
    traffic::udp_oneshots(&cli, topo.client_ip, topo.server_ip, 53, 25_100..25_300)?;
    drop(buckets);
    drop(max);
    let (_, stderr) = tracer.stop_with_stderr(libc::SIGINT)?;
    Ok(stderr)
}

#[test]
fn bpf_log_names_the_decisions() -> Result<()> {
    let Some(_lock) = kernel_test("bpf_log_names_the_decisions")? else {
        return Ok(());
    };
    if std::env::var("CONNTRACK_TRACE_BACKEND").as_deref() == Ok("fexit") {
        let (code, _, err) = ctt(&["trace", "--backend", "fexit", "--bpf-log", "debug"])?;
        ensure!(
            code == 2
                && err.trim().lines().count() == 1
                && err.contains("needs the tracepoint backend"),
            "fexit with --bpf-log: exit {code}, {err}"
        );
        eprintln!(
            "bpf_log: skipped on fexit (its programs do not log); the refusal is one line, exit 2"
        );
        return Ok(());
    }
    let topo = Topology::new("bl", 91)?;
    topo.server.nft(RAW_DROP).context("raw-table rule")?;
    let inode = topo.server.inode()?;

    let log = scenario(&topo, &["--backend", "tracepoint", "--bpf-log", "debug"])?;
    let bpf: Vec<&str> = log.lines().filter(|l| l.starts_with("bpf: ")).collect();
    let has = |needle: &str| bpf.iter().any(|l| l.contains(needle));
    let first = |needle: &str| bpf.iter().find(|l| l.contains(needle)).copied();
    eprintln!(
        "bpf_log: {} bpf: lines; {:?}; {:?}; {:?}",
        bpf.len(),
        first("kfree_skb ("),
        first("rule_drop:"),
        first("early_drop:")
    );
    // Logged once, at the first netfilter drop: the variant and the
    // settings and offsets user space wrote.
    ensure!(
        has("bpf: info tracepoint: kfree_skb ("),
        "no start line: {log}"
    );
    ensure!(has("bpf: info config: flags "), "no config line: {log}");
    ensure!(
        has("bpf: info offsets: sk_buff._nfct "),
        "no offsets line: {log}"
    );
    // The raw-table drop: no entry, and why it is not table_full (freed by
    // the rule itself on nftables since 6.7, else conntrack's drop counter
    // did not move).
    let rule = format!("bpf: debug rule_drop: netns {inode} no entry, ");
    ensure!(
        bpf.iter()
            .any(|l| l.starts_with(&rule) && l.ends_with(": not table_full")),
        "no rule_drop decision for netns {inode}: {log}"
    );
    // The evictions, each named with the step that decided.
    let evict = format!(
        "bpf: debug early_drop: netns {inode} live entry freed with early_drop() on the kernel stack"
    );
    ensure!(
        has(&evict),
        "no early_drop decision for netns {inode}: {log}"
    );

    // Off (the default): the programs log nothing and nothing is read.
    let quiet = scenario(&topo, &["--backend", "tracepoint"])?;
    ensure!(
        !quiet.lines().any(|l| l.starts_with("bpf:")),
        "bpf: lines with --bpf-log off: {quiet}"
    );
    Ok(())
}
