//! Identical TCP SYNs sent from two CPUs at once race to confirm the same
//! tuple in the server's namespace; the loser is dropped with its entry
//! unconfirmed: an `insert_failed` event per loss, equal to the kernel's
//! `insert_failed` delta.

use conntrack_trace_tests::{Topology, assert_events_from, kernel_test, traced, traffic};

#[test]
fn syn_race_clashes() -> anyhow::Result<()> {
    let Some(_lock) = kernel_test("syn_race_clashes")? else {
        return Ok(());
    };
    let topo = Topology::new("if", 33)?;
    // The race is won by chance (a few in a thousand to one in ten here):
    // race batches of 4000 tuples until one clash, at most 5 batches.
    const BATCH: u16 = 4_000;
    let first = 40_000;
    let (last, out, delta) = traced(&topo, || {
        let start = topo.server.ct_stats()?;
        let mut end = first;
        for _ in 0..5 {
            traffic::syn_race(
                &topo.client.path(),
                topo.client_ip,
                topo.server_ip,
                80,
                end..end + BATCH,
            )?;
            end += BATCH;
            if topo.server.ct_stats()?.since(&start).insert_failed > 0 {
                break;
            }
        }
        Ok(end)
    })?;
    let sports = first..last;
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
