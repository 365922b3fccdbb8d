//! With few hash buckets, early_drop() finds an unassured entry near every
//! new tuple's bucket and evicts it: `early_drop` events name the evicted
//! entries (tuples the test sent) and equal the kernel's `early_drop` delta.

use conntrack_trace_tests::{Sysctl, Topology, assert_events_from, kernel_test};

#[test]
fn few_buckets_evict() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("few_buckets_evict")? else {
        return Ok(());
    };
    let topo = Topology::new("ed", 32)?;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let _buckets = Sysctl::set("net.netfilter.nf_conntrack_buckets", 16)?;
    let sports = 21_000..21_400;

    let (sent, out, delta) = topo.udp_flood(false, sports.clone(), &[])?;
    let s = &out.summary;

    let evicted = out.of_kind("early_drop");
    let full = out.of_kind("table_full");
    eprintln!(
        "early_drop: sent {sent}, buckets {}, events early_drop {} table_full {}, kernel early_drop +{} drop +{}",
        conntrack_trace_tests::Sysctl::read("net.netfilter.nf_conntrack_buckets")?,
        evicted.len(),
        full.len(),
        delta.early_drop,
        delta.drop
    );
    assert!(
        delta.early_drop > 0,
        "eviction must have happened: {delta:?}"
    );
    assert_eq!(
        evicted.len() as u64,
        delta.early_drop,
        "one event per evicted entry"
    );
    assert_eq!(
        full.len() as u64,
        delta.drop,
        "failed evictions are table_full"
    );
    let ports = assert_events_from(&evicted, &topo, "udp", 53, sports.clone())?;
    assert_eq!(ports.len(), evicted.len(), "each entry is evicted once");
    assert_events_from(&full, &topo, "udp", 53, sports)?;
    assert_eq!(s.kernel.early_drop, delta.early_drop);
    assert_eq!(s.events.early_drop, delta.early_drop);
    assert_eq!(s.lost.early_drop, 0);
    assert!(s.complete);
    // `on`, or `on; gc_evict off (why)` where gc_worker() cannot be
    // hooked: early_drop's hooks are on either way.
    assert!(
        s.evictions == "on" || s.evictions.starts_with("on; gc_evict off ("),
        "evictions: {}",
        s.evictions
    );
    Ok(())
}
