//! Identical TCP SYNs sent from two CPUs at once race to confirm the same
//! tuple in the server's namespace; the loser is dropped with its entry
//! unconfirmed: an `insert_failed` event per loss, equal to the kernel's
//! `insert_failed` delta.

use std::net::Ipv4Addr;

use anyhow::ensure;
use conntrack_trace_tests::{
    CtStats, Topology, assert_events_from, json, kernel_test, traced, traffic,
};

/// Races identical SYNs to `dst:80` until one clash; returns the source
/// ports raced, the trace and the server's counter delta. The race is won
/// by chance (a few in a thousand to one in ten here): batches of 4000
/// tuples until one clash, at most 5 batches — bounded, and the number of
/// batches it took is printed.
fn race(
    topo: &Topology,
    dst: Ipv4Addr,
) -> anyhow::Result<(std::ops::Range<u16>, json::Output, CtStats)> {
    const BATCH: u16 = 4_000;
    let first = 40_000;
    let (last, out, delta) = traced(topo, || {
        let start = topo.server.ct_stats()?;
        let mut end = first;
        for batch in 1..=5 {
            traffic::syn_race(
                &topo.client.path(),
                topo.client_ip,
                dst,
                80,
                end..end + BATCH,
            )?;
            end += BATCH;
            if topo.server.ct_stats()?.since(&start)?.insert_failed > 0 {
                eprintln!("race: first clash in batch {batch} of at most 5");
                break;
            }
        }
        Ok(end)
    })?;
    Ok((first..last, out, delta))
}

#[test]
fn syn_race_clashes() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("syn_race_clashes")? else {
        return Ok(());
    };
    let topo = Topology::new("if", 33)?;
    let (sports, out, delta) = race(&topo, topo.server_ip)?;
    let s = &out.summary;

    let failed = out.of_kind("insert_failed");
    eprintln!(
        "insert_failed: {} races, events {}, kernel insert_failed +{} drop +{} clash_resolve +{} chaintoolong +{}",
        sports.len(),
        failed.len(),
        delta.insert_failed,
        delta.drop,
        delta.clashres,
        delta.chaintoolong
    );
    assert!(
        delta.insert_failed > 0,
        "no clash in {} races: {delta:?}",
        sports.len()
    );
    assert_eq!(
        failed.len() as u64,
        delta.insert_failed,
        "one event per insert failure"
    );
    let ports = assert_events_from(&failed, &topo, "tcp", 80, sports)?;
    assert_eq!(ports.len(), failed.len(), "one loser per raced tuple");
    // nf_ct_resolve_clash() counts an unresolvable clash as drop and
    // insert_failed; chain-too-long failures count only insert_failed. So
    // drop = table_full + (insert_failed - chaintoolong).
    assert_eq!(
        out.of_kind("table_full").len() as u64 + delta.insert_failed - delta.chaintoolong,
        delta.drop
    );
    assert_eq!(s.kernel.insert_failed, delta.insert_failed);
    assert_eq!(s.events.insert_failed, delta.insert_failed);
    assert_eq!(s.lost.insert_failed, 0);
    assert!(s.complete);
    Ok(())
}

/// The same race behind a service address (issue 10): an nft `dnat` maps
/// 10.96.34.10:80 to the server's 8080, as kube-proxy or a Docker port map
/// would. The original tuple names the service; the insert_failed events
/// must also name the server that was chosen (the entry's reply tuple).
#[test]
fn syn_race_behind_dnat_names_the_server() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("syn_race_behind_dnat_names_the_server")? else {
        return Ok(());
    };
    let topo = Topology::new("in", 34)?;
    let service = Ipv4Addr::new(10, 96, 34, 10);
    topo.server.nft(&format!(
        "table ip ctt_nat {{
            chain prerouting {{
                type nat hook prerouting priority dstnat; policy accept;
                ip daddr {service} tcp dport 80 dnat to {}:8080
            }}
        }}",
        topo.server_ip
    ))?;
    // The client reaches the service address through the server (a route,
    // as to a cluster's service range).
    topo.client.ip(&[
        "route",
        "add",
        &format!("{service}/32"),
        "via",
        &topo.server_ip.to_string(),
    ])?;
    let (sports, out, delta) = race(&topo, service)?;
    let failed = out.of_kind("insert_failed");
    eprintln!(
        "insert_failed behind DNAT: {} races, events {}, kernel insert_failed +{} drop +{} clash_resolve +{}",
        sports.len(),
        failed.len(),
        delta.insert_failed,
        delta.drop,
        delta.clashres
    );
    ensure!(
        delta.insert_failed > 0,
        "no clash in {} races: {delta:?}",
        sports.len()
    );
    ensure!(
        failed.len() as u64 == delta.insert_failed,
        "one event per insert failure"
    );
    let client = topo.client_ip.to_string();
    let server = topo.server_ip.to_string();
    let svc = service.to_string();
    for e in &failed {
        ensure!(e.src.as_deref() == Some(client.as_str()), "client: {e:?}");
        ensure!(
            e.dst.as_deref() == Some(svc.as_str()) && e.dport == Some(80),
            "service: {e:?}"
        );
        ensure!(
            e.reply_src.as_deref() == Some(server.as_str()) && e.reply_sport == Some(8080),
            "the chosen server in the reply tuple: {e:?}"
        );
        ensure!(e.reply_dst.as_deref() == Some(client.as_str()) && e.reply_dport == e.sport);
        ensure!(e.nat.as_deref() == Some("dnat"), "{e:?}");
    }
    // Totals as without NAT.
    ensure!(
        out.of_kind("table_full").len() as u64 + delta.insert_failed - delta.chaintoolong
            == delta.drop
    );
    let s = &out.summary;
    ensure!(s.kernel.insert_failed == delta.insert_failed && s.complete);
    let top = s
        .top
        .iter()
        .find(|t| t.src.as_deref() == Some(client.as_str()))
        .ok_or_else(|| anyhow::anyhow!("client not in top: {:?}", s.top))?;
    ensure!(
        top.dnat.as_deref() == Some(format!("{server}:8080").as_str()),
        "{top:?}"
    );
    Ok(())
}
