//! Totals, per-second rates and the top drop sources.
//!
//! A "source" is (source address, protocol, destination port) — what an
//! on-call engineer acts on ("10.0.0.7 is hammering udp/53"). For ICMP the
//! "port" is the ICMP type. For `early_drop` it is the evicted entry's
//! original-direction source.

use crate::model::KindCounts;
use std::{collections::HashMap, net::IpAddr, time::Duration};

use crate::event::{Event, Kind, Nat, Proto};

/// Default cap on distinct sources held in memory (~100 B each).
pub const DEFAULT_MAX_SOURCES: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub src: Option<IpAddr>,
    pub proto: Proto,
    /// Destination port, ICMP type, or 0.
    pub port: u16,
}

impl SourceKey {
    pub fn of(e: &Event) -> SourceKey {
        let port = if e.proto.has_ports() {
            e.dport
        } else if e.proto.is_icmp() {
            e.icmp_type() as u16
        } else {
            0
        };
        SourceKey {
            src: e.src,
            proto: e.proto,
            port,
        }
    }

    /// `udp/53`, `icmp/8`, `gre`.
    pub fn service(&self) -> String {
        if self.proto.has_ports() || self.proto.is_icmp() {
            format!("{}/{}", self.proto, self.port)
        } else {
            self.proto.to_string()
        }
    }

    pub fn src_string(&self) -> String {
        self.src.map_or_else(|| "?".to_owned(), |a| a.to_string())
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceStats {
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
    rates_f: [f64; 4],
    sources: HashMap<SourceKey, SourceStats>,
    max_sources: usize,
    /// Events whose source could not be tracked because `max_sources`
    /// distinct sources were already held (they are still in `totals`).
    pub untracked: u64,
}

impl Aggregator {
    pub fn new(max_sources: usize) -> Self {
        Aggregator {
            totals: KindCounts::default(),
            interval_start: KindCounts::default(),
            rates_f: [0.0; 4],
            sources: HashMap::new(),
            max_sources,
            untracked: 0,
        }
    }

    /// What the events said of one source (timing, DNAT), if any arrived.
    pub fn source(&self, k: &SourceKey) -> Option<&SourceStats> {
        self.sources.get(k)
    }

    pub fn record(&mut self, e: &Event) {
        *self.totals.get_mut(e.kind) += 1;
        let key = SourceKey::of(e);
        let len = self.sources.len();
        let stats = match self.sources.get_mut(&key) {
            Some(s) => s,
            None if len >= self.max_sources => {
                self.untracked += 1;
                return;
            }
            None => self.sources.entry(key).or_insert_with(|| SourceStats {
                first_ns: e.ts_ns,
                ..Default::default()
            }),
        };
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

    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    /// The `n` sources with most events (ties broken by key, so output is
    /// stable).
    pub fn top(&self, n: usize) -> Vec<(SourceKey, SourceStats)> {
        let mut v: Vec<(&SourceKey, &SourceStats)> = self.sources.iter().collect();
        v.sort_by(|a, b| {
            b.1.counts
                .total()
                .cmp(&a.1.counts.total())
                .then(a.0.cmp(b.0))
        });
        v.into_iter()
            .take(n)
            .map(|(k, s)| (*k, s.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        }
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
        assert_eq!(top[0].0.src_string(), "10.0.0.7");
        assert_eq!(top[0].0.service(), "udp/53");
        assert_eq!(top[0].1.counts.table_full, 5);
        assert_eq!((top[0].1.first_ns, top[0].1.last_ns), (0, 4));
        assert_eq!(top[1].1.counts.table_full, 3);
        assert_eq!(top[2].0.service(), "tcp/80");
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
        assert_eq!(a.top(1)[0].1.rate, 5.0);
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
        assert_eq!(a.top(1)[0].0.service(), "icmp/8");
    }

    #[test]
    fn source_table_is_bounded() {
        let mut a = Aggregator::new(2);
        for (i, src) in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]
            .iter()
            .enumerate()
        {
            a.record(&ev(Kind::TableFull, src, Proto::UDP, 53, i as u64));
        }
        assert_eq!(a.source_count(), 2);
        assert_eq!(a.untracked, 1);
        assert_eq!(
            a.totals.table_full, 4,
            "totals stay exact when sources overflow"
        );
        assert_eq!(a.top(5)[0].1.counts.table_full, 2);
    }
}
