//! Totals, per-second rates and the top drop sources.
//!
//! A "source" is (source address, protocol, destination port) — what an
//! on-call engineer acts on ("10.0.0.7 is hammering udp/53"). For ICMP the
//! "port" is the ICMP type. For `early_drop` it is the evicted entry's
//! original-direction source.
//!
//! Sources live in a [`SourceTable`] of at most `max_sources`: beyond it,
//! the top sources are a Space-Saving estimate with a stated error (see
//! [`crate::analysis::sources`]); totals and rates per kind stay exact.

use std::{net::IpAddr, time::Duration};

use crate::{
    analysis::sources::{Entry, SourceKey, SourceTable},
    model::event::{Event, Kind, Nat},
    model::{KindCounts, SourceCount, TopSource},
};

/// Default cap on distinct sources held in memory (~180 B each, see
/// [`SourceTable::memory_ceiling`]): as many as the programs' exact
/// per-source map holds (`SOURCE_COUNTS_MAX`), where the top sources come
/// from once the events are a sample. Sized from `cargo xtask bench
/// memory` (issue 21): at a million distinct sources, 100 000 entries
/// took the tracer past 64 MiB.
pub const DEFAULT_MAX_SOURCES: usize = conntrack_trace_common::SOURCE_COUNTS_MAX as usize;

/// What the events said of one source since it entered the source table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceStats {
    /// Events per kind since the source entered the table (they sum to its
    /// entry's `count - error`).
    pub counts: KindCounts,
    /// Events in the current interval.
    pub interval: u64,
    /// Events per second over the last completed interval.
    pub rate: f64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The server behind the service address, when this source's entries
    /// were DNATed (the last one seen: reply source address and port).
    pub dnat: Option<(IpAddr, u16)>,
}

#[derive(Debug)]
pub struct Aggregator {
    pub totals: KindCounts,
    interval_start: KindCounts,
    rates_f: [f64; Kind::ALL.len()],
    sources: SourceTable<SourceStats>,
}

impl Aggregator {
    pub fn new(max_sources: usize) -> Self {
        Aggregator {
            totals: KindCounts::default(),
            interval_start: KindCounts::default(),
            rates_f: [0.0; Kind::ALL.len()],
            sources: SourceTable::new(max_sources),
        }
    }

    /// What the events said of one source (timing, DNAT), if it is in the
    /// table.
    pub fn source(&self, k: &SourceKey) -> Option<&SourceStats> {
        self.sources.get(k).map(|e| &e.value)
    }

    pub fn record(&mut self, e: &Event) {
        *self.totals.get_mut(e.kind) += 1;
        let stats = &mut self
            .sources
            .record(SourceKey::of(e), || SourceStats {
                first_ns: e.ts_ns,
                ..Default::default()
            })
            .value;
        *stats.counts.get_mut(e.kind) += 1;
        stats.interval += 1;
        stats.last_ns = stats.last_ns.max(e.ts_ns);
        if let (Some(Nat::Dnat | Nat::Both), Some(r)) = (e.nat(), e.reply) {
            stats.dnat = Some((r.src, r.sport));
        }
    }

    /// Adds failures known only as totals (the counters backend): they
    /// count in totals and rates, not in any source.
    pub fn record_totals(&mut self, n: &KindCounts) {
        for k in Kind::ALL {
            *self.totals.get_mut(k) += n.get(k);
        }
    }

    /// Closes an interval of length `elapsed`: computes rates, starts anew.
    pub fn tick(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let delta = self.totals.sub(&self.interval_start);
        for (i, k) in Kind::ALL.iter().enumerate() {
            self.rates_f[i] = delta.get(*k) as f64 / secs;
        }
        self.interval_start = self.totals;
        for s in self.sources.values_mut() {
            s.rate = s.interval as f64 / secs;
            s.interval = 0;
        }
    }

    /// Events/s of `kind` over the last completed interval.
    pub fn rate(&self, kind: Kind) -> f64 {
        let i = Kind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.rates_f[i]
    }

    /// Events of sources that left the table (their counts live on only as
    /// the `error` of the entries that replaced them); 0 while it never
    /// overflowed. They are still in `totals`.
    pub fn untracked(&self) -> u64 {
        self.sources.evicted()
    }

    /// Once the table overflowed, the bound ⌊N/m⌋ of every top entry's
    /// `error` (see [`SourceTable::error_bound`]); None while exact.
    pub fn error_bound(&self) -> Option<u64> {
        self.sources.error_bound()
    }

    /// The `n` sources with most events (Space-Saving counts, ties broken
    /// by key, so output is stable).
    pub fn top(&self, n: usize) -> Vec<&Entry<SourceStats>> {
        self.sources.top(n)
    }
}

/// Exact per-source counts (the kernel's `SOURCE_COUNTS`, used when the
/// ring lost events and the event stream is only a sample), gathered one
/// map entry at a time: the map holds up to `SOURCE_COUNTS_MAX` keys, and
/// a list of them all next to this table was 12 MB more peak RSS at every
/// interval (issue 15).
#[derive(Default)]
pub struct ExactCounts {
    by: std::collections::BTreeMap<crate::analysis::sources::SourceKey, KindCounts>,
}

impl ExactCounts {
    /// Adds one map entry (the event carries its key), if selected.
    pub fn add(&mut self, e: &Event, count: u64) {
        let c = self
            .by
            .entry(crate::analysis::sources::SourceKey::of(e))
            .or_default();
        *c.get_mut(e.kind) = c.get(e.kind).saturating_add(count);
    }

    /// The top `n` sources: counts from the map, first/last time, rate
    /// and DNAT from the events that did arrive (`agg`). Also returns how
    /// many sources the counts hold.
    pub fn top(&self, agg: &Aggregator, n: usize) -> (Vec<TopSource>, u64) {
        let sources = self.by.len() as u64;
        let mut v: Vec<_> = self.by.iter().map(|(k, c)| (*k, *c)).collect();
        v.sort_by(|a, b| b.1.total().cmp(&a.1.total()).then(a.0.cmp(&b.0)));
        let top = v
            .into_iter()
            .take(n)
            .map(|(k, counts)| {
                let seen = agg.source(&k);
                TopSource {
                    src: k.src.map(|a| a.to_string()),
                    proto: k.proto.to_string(),
                    port: k.port,
                    service: k.service(),
                    total: counts.total(),
                    error: None,
                    counts,
                    first_ts_ns: seen.map_or(0, |s| s.first_ns),
                    last_ts_ns: seen.map_or(0, |s| s.last_ns),
                    rate_per_s: seen.map_or(0.0, |s| s.rate),
                    dnat: seen
                        .and_then(|s| s.dnat)
                        .map(|(a, p)| std::net::SocketAddr::new(a, p).to_string()),
                }
            })
            .collect();
        (top, sources)
    }
}

impl ExactCounts {
    /// Adds one interval's count of a source (a COUNTS record of a capture).
    pub fn add_count(&mut self, c: &SourceCount) {
        let key = SourceKey {
            src: c.src,
            proto: c.proto,
            port: c.port,
        };
        let k = self.by.entry(key).or_default();
        *k.get_mut(c.kind) = k.get(c.kind).saturating_add(c.count);
    }

    /// Whether any count was added.
    pub fn is_empty(&self) -> bool {
        self.by.is_empty()
    }
}

/// Turns the programs' cumulative per-source counts, read once per
/// interval, into what each source added in the interval
/// ([`IntervalCounts`]). The map is an LRU: an entry evicted and made again
/// starts over from its first drop, so a count below the last one read is
/// all new; an entry gone from the map is forgotten.
///
/// It holds as many keys as the map (`SOURCE_COUNTS_MAX`), so each is a
/// 64-bit fingerprint of (netns, kind, source) with its last count and a
/// seen bit in one u64: 16 bytes a key instead of 48 (issue 21, memory at
/// a million sources). Two keys share a fingerprint with probability
/// ~n²/2⁶⁵ (10⁻¹⁰ for 65 536 keys); the interval's delta of both would
/// then be wrong, never the programs' own counts.
#[derive(Default)]
pub struct ExactDeltas {
    /// Fingerprint → last count << 1 | seen in this interval's read.
    last: hashbrown::HashMap<u64, u64>,
    hasher: foldhash::quality::RandomState,
}

impl ExactDeltas {
    /// One entry of this interval's read (the event carries its key).
    pub fn see(&mut self, e: &Event, cumulative: u64, out: &mut Vec<SourceCount>) {
        use std::hash::BuildHasher as _;
        let key = SourceKey::of(e);
        let fp = self.hasher.hash_one((e.netns, e.kind, key));
        let cumulative = cumulative.min(u64::MAX >> 1);
        let last = self.last.entry(fp).or_insert(0);
        let before = *last >> 1;
        let added = if cumulative >= before {
            cumulative - before
        } else {
            cumulative
        };
        *last = cumulative << 1 | 1;
        if added > 0 {
            out.push(SourceCount {
                netns: e.netns,
                kind: e.kind,
                src: key.src,
                proto: key.proto,
                port: key.port,
                count: added,
            });
        }
    }

    /// Ends the interval's read: keys it did not see left the map.
    pub fn finish(&mut self) {
        self.last.retain(|_, v| {
            let seen = *v & 1 == 1;
            *v &= !1;
            seen
        });
    }
}

/// The top sources from the events; with an `error` once the source table
/// overflowed.
pub fn top_sources(agg: &Aggregator, n: usize) -> Vec<TopSource> {
    let approximate = agg.error_bound().is_some();
    agg.top(n)
        .into_iter()
        .map(|e| (e.key(), &e.value, e.count(), e.error()))
        .map(|(k, s, count, error)| TopSource {
            src: k.src.map(|a| a.to_string()),
            proto: k.proto.to_string(),
            port: k.port,
            service: k.service(),
            total: count,
            error: approximate.then_some(error),
            counts: s.counts,
            first_ts_ns: s.first_ns,
            last_ts_ns: s.last_ns,
            rate_per_s: s.rate,
            dnat: s
                .dnat
                .map(|(a, p)| std::net::SocketAddr::new(a, p).to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::Proto;

    fn ev(kind: Kind, src: &str, proto: Proto, dport: u16, ts: u64) -> Event {
        Event {
            kind,
            ts_ns: ts,
            cpu: 0,
            netns: 1,
            proto,
            src: Some(src.parse().unwrap()),
            dst: Some("10.0.0.53".parse().unwrap()),
            sport: 40000,
            dport,
            reply: None,
            packet: Default::default(),
            sample: 1,
        }
    }

    #[test]
    fn exact_deltas_are_what_each_interval_added() {
        let a = ev(Kind::TableFull, "10.0.0.7", Proto::UDP, 53, 0);
        let b = ev(Kind::TableFull, "10.0.0.8", Proto::UDP, 53, 0);
        let mut d = ExactDeltas::default();
        let mut out = Vec::new();
        d.see(&a, 5, &mut out);
        d.see(&b, 2, &mut out);
        d.finish();
        assert_eq!(out.iter().map(|c| c.count).collect::<Vec<_>>(), [5, 2]);
        out.clear();
        // a grew by 3; b did not move (not written); then b leaves the map.
        d.see(&a, 8, &mut out);
        d.see(&b, 2, &mut out);
        d.finish();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].src, out[0].count), (a.src, 3));
        out.clear();
        // a was evicted and made again: its 4 are all new; b is forgotten,
        // so its return counts from 0.
        d.see(&a, 4, &mut out);
        d.finish();
        d.see(&b, 1, &mut out);
        d.finish();
        assert_eq!(out.iter().map(|c| c.count).collect::<Vec<_>>(), [4, 1]);
        // Summed by ExactCounts, the intervals give each source's drops.
        let mut sum = ExactCounts::default();
        for c in &out {
            sum.add_count(c);
        }
        assert!(!sum.is_empty());
    }

    #[test]
    fn ranks_sources_by_events() {
        let mut a = Aggregator::new(100);
        for i in 0..5 {
            a.record(&ev(Kind::TableFull, "10.0.0.7", Proto::UDP, 53, i));
        }
        for i in 0..3 {
            a.record(&ev(Kind::TableFull, "10.0.0.8", Proto::UDP, 53, i));
        }
        a.record(&ev(Kind::EarlyDrop, "10.0.0.8", Proto::TCP, 80, 9));
        let top = a.top(10);
        assert_eq!(top.len(), 3);
        assert_eq!(top[0].key().src_string(), "10.0.0.7");
        assert_eq!(top[0].key().service(), "udp/53");
        assert_eq!(top[0].value.counts.table_full, 5);
        assert_eq!((top[0].value.first_ns, top[0].value.last_ns), (0, 4));
        assert_eq!(top[1].value.counts.table_full, 3);
        assert_eq!(top[2].key().service(), "tcp/80");
        assert_eq!(a.totals.table_full, 8);
        assert_eq!(a.totals.early_drop, 1);
        assert_eq!(a.top(1).len(), 1);
    }

    #[test]
    fn rates_per_interval() {
        let mut a = Aggregator::new(100);
        for i in 0..10 {
            a.record(&ev(Kind::TableFull, "10.0.0.7", Proto::UDP, 53, i));
        }
        a.tick(Duration::from_secs(2));
        assert_eq!(a.rate(Kind::TableFull), 5.0);
        assert_eq!(a.top(1)[0].value.rate, 5.0);
        a.tick(Duration::from_secs(1));
        assert_eq!(a.rate(Kind::TableFull), 0.0);
        assert_eq!(a.totals.table_full, 10, "totals survive ticks");
    }

    #[test]
    fn icmp_keyed_by_type() {
        let mut a = Aggregator::new(100);
        let mut e = ev(Kind::TableFull, "10.0.0.7", Proto::ICMP, 8 << 8, 0);
        e.sport = 77;
        a.record(&e);
        assert_eq!(a.top(1)[0].key().service(), "icmp/8");
    }

    #[test]
    fn source_table_is_bounded() {
        let mut a = Aggregator::new(2);
        for (i, src) in ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3"]
            .iter()
            .enumerate()
        {
            a.record(&ev(Kind::TableFull, src, Proto::UDP, 53, i as u64));
        }
        assert_eq!(a.top(usize::MAX).len(), 2);
        // 10.0.0.3 took the place of 10.0.0.2 (the smallest count).
        assert_eq!(a.untracked(), 1);
        assert_eq!(a.error_bound(), Some(2));
        assert_eq!(
            a.totals.table_full, 4,
            "totals stay exact when sources overflow"
        );
        let top = a.top(5);
        let row = |e: &Entry<SourceStats>| {
            (
                e.key().src_string(),
                e.count(),
                e.error(),
                e.value.counts.table_full,
                e.value.first_ns,
            )
        };
        assert_eq!(row(top[0]), ("10.0.0.1".into(), 2, 0, 2, 0));
        assert_eq!(row(top[1]), ("10.0.0.3".into(), 2, 1, 1, 3));
    }
}
