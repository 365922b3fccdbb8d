//! A UDP/53 flood from many source ports fills the server's conntrack table:
//! every packet beyond nf_conntrack_max is a `table_full` event naming its
//! sender, and the events equal the kernel's `drop` delta exactly.

use conntrack_trace_tests::{Sysctl, Topology, assert_events_from, kernel_test};

#[test]
fn udp_flood_fills_table() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("udp_flood_fills_table")? else {
        return Ok(());
    };
    let topo = Topology::new("tf", 31)?;
    const MAX: u64 = 64;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let sports = 20_000..20_400;

    let (sent, out, delta) = topo.udp_flood(false, sports.clone(), &[])?;
    let s = &out.summary;

    let full = out.of_kind("table_full");
    let ports = assert_events_from(&full, &topo, "udp", 53, sports.clone())?;
    eprintln!(
        "table_full: sent {sent}, events {}, kernel drop +{}, early_drop +{}, insert_failed +{}",
        full.len(),
        delta.drop,
        delta.early_drop,
        delta.insert_failed
    );
    assert!(
        delta.drop >= (sent - MAX) / 2,
        "the table must have overflowed: {delta:?}"
    );
    assert_eq!(
        full.len() as u64,
        delta.drop,
        "one event per dropped packet"
    );
    assert_eq!(
        ports.len(),
        full.len(),
        "each dropped packet came from its own port"
    );
    assert_eq!(s.events.table_full, delta.drop);
    assert_eq!(
        s.kernel.drop, delta.drop,
        "summary reports the kernel's delta"
    );
    assert_eq!(s.kernel.early_drop, delta.early_drop);
    assert_eq!(out.of_kind("early_drop").len() as u64, delta.early_drop);
    assert_eq!(s.lost.table_full, 0);
    assert!(s.complete, "events + lost == observed");
    assert_eq!(s.scope.netns, topo.server.name);
    // The first MAX datagrams got entries; drops are among the later ports.
    assert!(
        ports.iter().all(|p| *p >= sports.start + MAX as u16 - 1),
        "{ports:?}"
    );
    let top = s.top.first().expect("a top source");
    assert_eq!(
        top.src.as_deref(),
        Some(topo.client_ip.to_string().as_str())
    );
    assert_eq!(top.service, "udp/53");
    Ok(())
}

/// With a one-page ring the kernel cannot reserve every event: whatever is
/// lost is counted, so events + lost still equals the kernel's drop delta.
#[test]
fn tiny_ring_counts_what_it_loses() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("tiny_ring_counts_what_it_loses")? else {
        return Ok(());
    };
    let topo = Topology::new("tr", 34)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 16)?;
    let sports = 22_000..24_000;
    let (_, out, delta) = topo.udp_flood(false, sports.clone(), &["--ring-size", "4096"])?;
    let s = &out.summary;
    let events = out.of_kind("table_full").len() as u64;
    eprintln!(
        "tiny ring: events {events}, lost {}, observed {}, kernel drop +{}",
        s.lost.table_full, s.observed.table_full, delta.drop
    );
    assert!(delta.drop > 1000, "{delta:?}");
    assert_eq!(events, s.events.table_full);
    assert_eq!(
        events + s.lost.table_full,
        delta.drop,
        "nothing vanishes silently"
    );
    assert_eq!(s.observed.table_full, delta.drop);
    assert!(s.complete);
    // Exact past the ring's capacity (issue 15): whether or not this run
    // lost events, the top source's count is the kernel's — from the
    // events when none were lost, from the programs' per-source counts
    // when some were (then the summary says it is a sample).
    // `sampled` is about every kind: an eviction event the page could not
    // take makes the stream a sample too (seen on 7.3/tracepoint in the
    // VM: early_drop lost 1, table_full lost 0).
    let lost = s.lost.table_full + s.lost.early_drop + s.lost.insert_failed + s.lost.rule_drop;
    let shed = s.shed.table_full + s.shed.early_drop + s.shed.insert_failed + s.shed.rule_drop;
    assert_eq!(s.sampled, lost + shed > 0, "{s:?}");
    let client = topo.client_ip.to_string();
    let top = s
        .top
        .iter()
        .find(|t| t.src.as_deref() == Some(client.as_str()) && t.port == 53)
        .ok_or_else(|| anyhow::anyhow!("client not in top: {:?}", s.top))?;
    eprintln!(
        "tiny ring: sampled {}, top source {} table_full {} (exact sources {})",
        s.sampled, client, top.counts.table_full, s.exact_sources
    );
    assert_eq!(top.counts.table_full, delta.drop, "exact per-source count");
    Ok(())
}

/// The same flood over IPv6: the kernel program parses the IPv6 header of
/// the dropped packet (no conntrack entry to read it from).
#[test]
fn udp6_flood_fills_table() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("udp6_flood_fills_table")? else {
        return Ok(());
    };
    let topo = Topology::new("t6", 35)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let sports = 25_000..25_300;
    let (sent, out, delta) = topo.udp_flood(true, sports.clone(), &[])?;
    let full = out.of_kind("table_full");
    eprintln!(
        "table_full ipv6: sent {sent}, events {}, kernel drop +{}",
        full.len(),
        delta.drop
    );
    // IPv6 neighbour discovery also creates entries (icmpv6); only our
    // datagrams are asserted on, but every drop must be accounted for.
    assert!(delta.drop > 0, "{delta:?}");
    assert_eq!(full.len() as u64, delta.drop);
    let udp: Vec<_> = full.iter().copied().filter(|e| e.proto == "udp").collect();
    assert!(
        udp.len() as u64 >= delta.drop.saturating_sub(4),
        "nearly all drops are our datagrams"
    );
    let ports = conntrack_trace_tests::assert_events_between(
        &udp,
        &topo,
        topo.client_ip6.into(),
        topo.server_ip6.into(),
        "udp",
        53,
        sports,
    )?;
    assert_eq!(ports.len(), udp.len());
    assert!(out.summary.complete);
    Ok(())
}
