//! Rule drops are not `table_full` (issue 10). The server runs the everyday
//! firewall — `ct state invalid drop`, established/related and new accepted —
//! plus a raw-table rule dropping udp/9999, with `nf_conntrack_tcp_loose=0`.
//! TCP ACKs that belong to no connection (conntrack: invalid, `_nfct`
//! cleared, `invalid` counted; then the rule drops them) and datagrams to
//! udp/9999 (dropped before conntrack sees them) arrive with no conntrack
//! entry, exactly like a table-full drop. They must come out as
//! `rule_drop`, while a real table-full flood into the same namespace is
//! still counted exactly (`table_full` == the kernel's `drop` delta).
//!
//! Once with nftables (since 6.7 nft_do_chain() frees what it drops; before,
//! nf_hook_slow() does) and once with legacy iptables (always freed by
//! nf_hook_slow(), so only conntrack's own counters tell the two apart).

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{
    Sysctl, Topology, assert_events_from, json, kernel_test, run, traced_with, traffic,
};

const NFT_RULES: &str = "
flush ruleset
table inet ctt {
    chain raw {
        type filter hook prerouting priority raw; policy accept;
        udp dport 9999 drop
    }
    chain input {
        type filter hook input priority 0; policy accept;
        ct state invalid drop
        ct state established,related accept
        ct state new accept
    }
}
";

/// The same ruleset in legacy iptables (`iptables-legacy`, Debian's
/// iptables package).
const IPTABLES_RULES: &[&[&str]] = &[
    &[
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-p",
        "udp",
        "--dport",
        "9999",
        "-j",
        "DROP",
    ],
    &[
        "-A",
        "INPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "INVALID",
        "-j",
        "DROP",
    ],
    &[
        "-A",
        "INPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ],
    &[
        "-A",
        "INPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-j",
        "ACCEPT",
    ],
];

const ACKS: u64 = 300;
const RAW_DROPS: u64 = 300;
const MAX: u64 = 64;

/// Rule drops first (with room in the table), then a table-full flood; all
/// in one trace of the server namespace.
fn scenario(topo: &Topology, label: &str) -> Result<()> {
    topo.server
        .sysctl("net/netfilter/nf_conntrack_tcp_loose", 0)
        .context("nf_conntrack_tcp_loose")?;
    let flood_ports = 22_000..22_300;
    let (sent, out, delta) = traced_with(topo, &["--rule-drops"], || {
        let cli = topo.client.path();
        let acks = traffic::tcp_oneshots(
            &cli,
            topo.client_ip,
            topo.server_ip,
            80,
            23_000..23_000 + ACKS as u16,
            traffic::TCP_ACK,
        )?;
        let raw = traffic::udp_oneshots(
            &cli,
            topo.client_ip,
            topo.server_ip,
            9999,
            24_000..24_000 + RAW_DROPS as u16,
        )?;
        let max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
        let filler = topo.fill_assured(MAX)?;
        let flood = traffic::udp_oneshots(
            &cli,
            topo.client_ip,
            topo.server_ip,
            53,
            flood_ports.clone(),
        )?;
        drop(filler);
        drop(max);
        Ok((acks, raw, flood))
    })?;
    let s = &out.summary;
    let full = out.of_kind("table_full");
    let rule = out.of_kind("rule_drop");
    eprintln!(
        "{label} ({}): sent {sent:?}; events table_full {} rule_drop {} (observed {}); kernel drop +{} invalid +{}; unclassified {} unmatched {}",
        s.backend,
        full.len(),
        rule.len(),
        s.observed.rule_drop,
        delta.drop,
        delta.invalid,
        s.unclassified_drops,
        s.unmatched_drop_counts
    );
    ensure!(
        delta.invalid >= ACKS,
        "the ACKs were invalid to conntrack: {delta:?}"
    );
    // The heart of it: every table_full event is a real one.
    ensure!(
        full.len() as u64 == delta.drop,
        "table_full events {} != kernel drop +{}",
        full.len(),
        delta.drop
    );
    ensure!(delta.drop > 0, "the flood met a full table: {delta:?}");
    assert_events_from(&full, topo, "udp", 53, flood_ports)?;
    ensure!(
        s.unclassified_drops == 0 && s.unmatched_drop_counts == 0,
        "{s:?}"
    );
    if s.backend == "fexit" {
        // The fexit backend hooks conntrack's own failure points; it does
        // not see rule drops at all.
        ensure!(s.observed.rule_drop == 0);
        return Ok(());
    }
    ensure!(
        s.observed.rule_drop == ACKS + RAW_DROPS && rule.len() as u64 == ACKS + RAW_DROPS,
        "every rule drop is a rule_drop: observed {}, events {}",
        s.observed.rule_drop,
        rule.len()
    );
    let acks: Vec<&json::Event> = rule.iter().copied().filter(|e| e.proto == "tcp").collect();
    let raw: Vec<&json::Event> = rule.iter().copied().filter(|e| e.proto == "udp").collect();
    assert_events_from(&acks, topo, "tcp", 80, 23_000..23_000 + ACKS as u16)?;
    assert_events_from(&raw, topo, "udp", 9999, 24_000..24_000 + RAW_DROPS as u16)?;
    ensure!(acks.len() as u64 == ACKS && raw.len() as u64 == RAW_DROPS);
    Ok(())
}

#[test]
fn nftables_rule_drops_are_not_table_full() -> Result<()> {
    let Some(_lock) = kernel_test("nftables_rule_drops_are_not_table_full")? else {
        return Ok(());
    };
    let topo = Topology::new("rn", 38)?;
    topo.server.nft(NFT_RULES)?;
    scenario(&topo, "nftables")
}

#[test]
fn iptables_legacy_rule_drops_are_not_table_full() -> Result<()> {
    let Some(_lock) = kernel_test("iptables_legacy_rule_drops_are_not_table_full")? else {
        return Ok(());
    };
    if run("iptables-legacy", &["--version"]).is_err() {
        // The VM images carry nft but not iptables; on the host setup
        // installs it (and CI requires it).
        ensure!(
            std::env::var_os("CONNTRACK_TRACE_VM").is_some(),
            "iptables-legacy is missing (cargo xtask setup installs Debian's iptables)"
        );
        eprintln!(
            "iptables_legacy_rule_drops_are_not_table_full: SKIPPED: no iptables-legacy in this VM image"
        );
        return Ok(());
    }
    let topo = Topology::new("ri", 39)?;
    topo.server.nft("flush ruleset\n")?;
    for rule in IPTABLES_RULES {
        let mut args = vec![
            "netns",
            "exec",
            topo.server.name.as_str(),
            "iptables-legacy",
        ];
        args.extend_from_slice(rule);
        run("ip", &args)?;
    }
    scenario(&topo, "iptables-legacy")
}
