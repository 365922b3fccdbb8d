//! Retransmission amplification: clients re-sending requests that conntrack
//! dropped, so that each drop breeds more packets (the incident this tool
//! exists for: a full table drops DNS queries, resolvers retry, the retries
//! keep the table full).
//!
//! A *retransmission* is a dropped packet (`table_full` or `insert_failed`)
//! whose flow was already dropped within the window. The flow is:
//! * for a DNS query (UDP to any port, carrying a standard query with one
//!   question in the captured packet bytes): netns, client address, server
//!   address and port, and the question (name and type). Clients such as dig,
//!   unbound and BIND retry a query from a *new* source port, so the 5-tuple
//!   alone would call every retry a new flow;
//! * otherwise the 5-tuple in its netns: protocol, addresses, ports (ICMP:
//!   echo id and type). The kernel's TCP SYN retransmissions keep it.
//!
//! Per source (client address, protocol, destination port) the detector
//! keeps attempts, distinct flows, retransmissions and recent retry
//! intervals; *amplification factor* = attempts / distinct flows. A source is
//! flagged once the factor reaches the threshold with at least a minimum
//! number of retransmissions.
//!
//! Memory is bounded (see [`AmpConfig::memory_ceiling`]): flows live in a
//! fixed-size 4-way set-associative table of 64-bit fingerprints, sources in a
//! Space-Saving [`SourceTable`] of `max_sources` (the aggregator's type). The
//! approximations, all documented in README.md:
//! * when every slot of a flow's set holds a flow still inside the window,
//!   the least recently dropped one is forgotten (`flows_forgotten`); its
//!   next retry then counts as a new flow. This only *under*-counts
//!   retransmissions: a flood of distinct flows cannot create a finding;
//! * two flows with the same 64-bit fingerprint are one flow (probability
//!   about n²/2⁶⁵ for n live flows: ~3·10⁻⁸ at a million);
//! * with more sources than `max_sources`, a new source takes over the entry
//!   with the fewest drops, and the state of the source it replaces resets
//!   (`untracked_drops` counts the drops that state held). Space-Saving never
//!   replaces a source with more than N/m of the N drops (m = `max_sources`),
//!   so a retransmitting source that matters is kept while floods of one-off
//!   sources churn through the rest; what is replaced is a source at the
//!   minimum, which had too few drops to be flagged or will rebuild its
//!   state from its next drops. A replacing source starts afresh, and
//!   treats a retry of a flow it has not seen (dropped before it entered)
//!   as a new flow: a reset can only *under*-count, never flag a source.

use std::{
    hash::{BuildHasher as _, Hash, Hasher},
    net::IpAddr,
    time::Duration,
};

use crate::{
    analysis::sources::SourceKey,
    analysis::sources::SourceTable,
    model::clock::Clock,
    model::event::{Event, Kind},
    model::{AmpSummary, Backoff, Finding, FindingStatus},
};

/// Settings of the detector (`trace --amp-*` flags).
#[derive(Clone, Debug, PartialEq)]
pub struct AmpConfig {
    /// A drop of a flow already dropped this recently is a retransmission.
    pub window: Duration,
    /// Flag a source when attempts / distinct flows reaches this.
    pub threshold: f64,
    /// ... and it has at least this many retransmissions.
    pub min_retries: u64,
    /// Flow slots (rounded up to a multiple of [`WAYS`]).
    pub max_flows: usize,
    /// Sources tracked at once; beyond it, a new source replaces the one
    /// with the fewest drops (Space-Saving), whose state resets.
    pub max_sources: usize,
}

impl Default for AmpConfig {
    fn default() -> Self {
        AmpConfig {
            window: Duration::from_secs(10),
            threshold: 2.0,
            min_retries: 5,
            max_flows: 1 << 18,
            max_sources: 50_000,
        }
    }
}

/// Ways per set of the flow table.
pub const WAYS: usize = 4;
/// Longest accepted window: retry gaps are kept as u32 microseconds.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

impl AmpConfig {
    /// Checks user-supplied values; the message is for a one-line error.
    pub fn validate(&self) -> Result<(), String> {
        if self.window.is_zero() || self.window > MAX_WINDOW {
            return Err(format!(
                "--amp-window must be between 1ms and {}s",
                MAX_WINDOW.as_secs()
            ));
        }
        if !(self.threshold.is_finite() && self.threshold > 1.0) {
            return Err("--amp-threshold must be a number greater than 1".into());
        }
        if self.max_flows < WAYS || self.max_sources == 0 {
            return Err("amplification tables must hold at least one set".into());
        }
        Ok(())
    }

    /// Upper bound of the detector's heap use in bytes: the flow table plus
    /// a full source table ([`SourceTable::memory_ceiling`]).
    pub fn memory_ceiling(&self) -> usize {
        let flows = self.max_flows.div_ceil(WAYS) * WAYS * size_of::<FlowSlot>();
        flows + SourceTable::<SourceAmp>::memory_ceiling(self.max_sources)
    }
}

/// One remembered flow.
#[derive(Clone, Copy, Debug, Default)]
struct FlowSlot {
    /// 0 = empty (a real fingerprint of 0 is remapped to 1).
    fp: u64,
    /// Time of the flow's last drop.
    last_ns: u64,
    /// Gap before that drop (µs), 0 if it was the flow's first.
    prev_gap_us: u32,
}

/// What the table said about a drop.
enum Seen {
    /// First drop of this flow inside the window.
    New,
    /// A retransmission `gap_us` after the previous drop (at `prev_ns`),
    /// whose own gap was `prev_gap_us` (0: this is the flow's first retry).
    Retry {
        prev_ns: u64,
        gap_us: u32,
        prev_gap_us: u32,
    },
}

struct FlowTable {
    slots: Vec<FlowSlot>,
    sets: usize,
    /// Live flows displaced before their window ended.
    forgotten: u64,
}

impl FlowTable {
    fn new(max_flows: usize) -> Self {
        let sets = max_flows.div_ceil(WAYS).max(1);
        FlowTable {
            slots: vec![FlowSlot::default(); sets * WAYS],
            sets,
            forgotten: 0,
        }
    }

    fn set_of(&self, fp: u64) -> usize {
        ((fp >> 32) as usize ^ fp as usize) % self.sets
    }

    /// Starts loading `fp`'s set into the cache: the table is megabytes
    /// and flows arrive in no order, so [`FlowTable::see`] would otherwise
    /// wait for memory on almost every drop (a quarter of the consumer's
    /// time, issue 15).
    fn prefetch(&self, fp: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            let p = self.slots[self.set_of(fp.max(1)) * WAYS..].as_ptr();
            // SAFETY: a prefetch is a hint; it cannot fault and reads
            // nothing the program sees. SSE is in x86_64's baseline.
            unsafe {
                use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
                _mm_prefetch::<_MM_HINT_T0>(p.cast());
                _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().add(64));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = fp;
    }

    fn see(&mut self, fp: u64, now: u64, window_ns: u64) -> Seen {
        let fp = fp.max(1);
        let set = self.set_of(fp);
        let ways = &mut self.slots[set * WAYS..(set + 1) * WAYS];
        let live = |s: &FlowSlot| s.fp != 0 && now.saturating_sub(s.last_ns) <= window_ns;
        if let Some(s) = ways.iter_mut().find(|s| s.fp == fp && live(s)) {
            let prev_ns = s.last_ns;
            let gap_us = (now.saturating_sub(prev_ns) / 1000).min(u32::MAX as u64) as u32;
            let prev_gap_us = s.prev_gap_us;
            s.last_ns = now;
            s.prev_gap_us = gap_us.max(1);
            return Seen::Retry {
                prev_ns,
                gap_us,
                prev_gap_us,
            };
        }
        // A free or expired slot, else the least recently dropped flow.
        let victim = match ways.iter().position(|s| !live(s)) {
            Some(i) => i,
            None => {
                self.forgotten += 1;
                (0..WAYS).min_by_key(|&i| ways[i].last_ns).unwrap_or(0)
            }
        };
        ways[victim] = FlowSlot {
            fp,
            last_ns: now,
            prev_gap_us: 0,
        };
        Seen::New
    }
}

/// Recent values, overwritten in a ring.
#[derive(Clone, Copy, Debug)]
struct Recent<const N: usize> {
    v: [u32; N],
    len: u8,
    pos: u8,
}

impl<const N: usize> Default for Recent<N> {
    fn default() -> Self {
        Recent {
            v: [0; N],
            len: 0,
            pos: 0,
        }
    }
}

impl<const N: usize> Recent<N> {
    fn push(&mut self, x: u32) {
        self.v[self.pos as usize] = x;
        self.pos = ((self.pos as usize + 1) % N) as u8;
        self.len = (self.len as usize + 1).min(N) as u8;
    }

    fn median(&self) -> Option<u32> {
        let mut v = self.v;
        let s = &mut v[..self.len as usize];
        if s.is_empty() {
            return None;
        }
        s.sort_unstable();
        Some(s[s.len() / 2])
    }
}

/// Amplification state of one source.
#[derive(Clone, Debug, Default)]
struct SourceAmp {
    attempts: u64,
    flows: u64,
    retries: u64,
    first_ns: u64,
    last_ns: u64,
    /// When the source took over another's entry (0: it took a free one):
    /// a flow last dropped before then is one it has not counted.
    replaced_at_ns: u64,
    /// Retry gaps (µs), all retries.
    gaps: Recent<16>,
    /// Gaps of each flow's *first* retry: the client's initial timer.
    first_gaps: Recent<8>,
    /// Consecutive gap pairs of one flow: ratio ~2 (backoff) or ~1 (steady).
    doubling: u32,
    steady: u32,
    pairs: u32,
    /// Attempts when last reported (a finding is re-reported on change).
    reported_attempts: u64,
}

impl SourceAmp {
    fn factor(&self) -> f64 {
        self.attempts as f64 / self.flows.max(1) as f64
    }
}

/// Classifies one pair of consecutive gaps of a flow.
fn gap_ratio(prev_us: u32, gap_us: u32) -> Option<Backoff> {
    if prev_us == 0 {
        return None;
    }
    let r = gap_us as f64 / prev_us as f64;
    Some(if (1.6..=2.5).contains(&r) {
        Backoff::Exponential
    } else if (0.75..=1.33).contains(&r) {
        Backoff::Constant
    } else {
        Backoff::Irregular
    })
}

/// An event's flow fingerprint, its slot prefetched (None: not a drop
/// the detector counts).
#[derive(Clone, Copy, Debug)]
pub struct Prepared(Option<u64>);

/// See [`flow_fingerprint`].
const FINGERPRINT_SEED: u64 = 0x636f_6e6e_7472_6163;

pub struct Detector {
    cfg: AmpConfig,
    window_ns: u64,
    flows: FlowTable,
    sources: SourceTable<SourceAmp>,
    drops: u64,
    retries: u64,
}

impl Detector {
    pub fn new(cfg: AmpConfig) -> Self {
        Detector {
            window_ns: cfg.window.as_nanos().min(u64::MAX as u128) as u64,
            flows: FlowTable::new(cfg.max_flows),
            sources: SourceTable::new(cfg.max_sources),
            drops: 0,
            retries: 0,
            cfg,
        }
    }

    pub fn config(&self) -> &AmpConfig {
        &self.cfg
    }

    /// Feeds one event (events must arrive in time order per flow; the ring
    /// buffer delivers them so per CPU, and a flow's packets are dropped on
    /// the CPU that received them).
    pub fn record(&mut self, e: &Event) {
        let p = self.prepare(e);
        self.record_prepared(e, p);
    }

    /// The first half of [`Detector::record`]: the event's flow, whose
    /// slot starts loading now; work done before
    /// [`Detector::record_prepared`] hides the memory's latency.
    pub fn prepare(&self, e: &Event) -> Prepared {
        if !matches!(e.kind, Kind::TableFull | Kind::InsertFailed) {
            return Prepared(None);
        }
        let fp = flow_fingerprint(e);
        self.flows.prefetch(fp);
        Prepared(Some(fp))
    }

    /// Feeds `e`, prepared by [`Detector::prepare`].
    pub fn record_prepared(&mut self, e: &Event, p: Prepared) {
        let Prepared(Some(fp)) = p else {
            return;
        };
        self.drops += 1;
        let seen = self.flows.see(fp, e.ts_ns, self.window_ns);
        if matches!(seen, Seen::Retry { .. }) {
            self.retries += 1;
        }
        let entry = self.sources.record(SourceKey::of(e), || SourceAmp {
            first_ns: e.ts_ns,
            ..Default::default()
        });
        let replaced = entry.error() > 0;
        let s = &mut entry.value;
        if replaced && s.attempts == 0 {
            s.replaced_at_ns = e.ts_ns;
        }
        s.attempts += 1;
        s.first_ns = s.first_ns.min(e.ts_ns);
        s.last_ns = s.last_ns.max(e.ts_ns);
        match seen {
            Seen::Retry { prev_ns, .. } if prev_ns < s.replaced_at_ns => s.flows += 1,
            Seen::New => s.flows += 1,
            Seen::Retry {
                gap_us,
                prev_gap_us,
                ..
            } => {
                s.retries += 1;
                s.gaps.push(gap_us);
                match gap_ratio(prev_gap_us, gap_us) {
                    None => s.first_gaps.push(gap_us),
                    Some(b) => {
                        s.pairs += 1;
                        match b {
                            Backoff::Exponential => s.doubling += 1,
                            Backoff::Constant => s.steady += 1,
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    fn flagged(&self, s: &SourceAmp) -> bool {
        s.retries >= self.cfg.min_retries && s.factor() >= self.cfg.threshold
    }

    /// Findings that are new or changed since the last call (for the live
    /// stream), marking them reported.
    pub fn take_changed(&mut self, clock: &Clock) -> Vec<Finding> {
        let mut keys: Vec<SourceKey> = self
            .sources
            .iter()
            .filter(|e| self.flagged(&e.value) && e.value.attempts != e.value.reported_attempts)
            .map(|e| *e.key())
            .collect();
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(s) = self.sources.get_mut(&k).map(|e| &mut e.value) else {
                continue;
            };
            let status = if s.reported_attempts == 0 {
                FindingStatus::New
            } else {
                FindingStatus::Update
            };
            s.reported_attempts = s.attempts;
            out.push(finding(&k, s, status, clock));
        }
        out
    }

    /// Every flagged source, most attempts first.
    pub fn findings(&self, clock: &Clock) -> Vec<Finding> {
        let mut v: Vec<(&SourceKey, &SourceAmp)> = self
            .sources
            .iter()
            .filter(|e| self.flagged(&e.value))
            .map(|e| (e.key(), &e.value))
            .collect();
        v.sort_by(|a, b| b.1.attempts.cmp(&a.1.attempts).then(a.0.cmp(b.0)));
        v.into_iter()
            .map(|(k, s)| finding(k, s, FindingStatus::Final, clock))
            .collect()
    }

    pub fn summary(&self) -> AmpSummary {
        AmpSummary {
            drops: self.drops,
            retransmissions: self.retries,
            retransmission_share: if self.drops == 0 {
                0.0
            } else {
                self.retries as f64 / self.drops as f64
            },
            window_s: self.cfg.window.as_secs_f64(),
            threshold: self.cfg.threshold,
            min_retries: self.cfg.min_retries,
            flows_forgotten: self.flows.forgotten,
            untracked_drops: self.sources.evicted(),
            memory_ceiling_bytes: self.cfg.memory_ceiling(),
        }
    }
}

fn finding(k: &SourceKey, s: &SourceAmp, status: FindingStatus, clock: &Clock) -> Finding {
    let backoff = if s.pairs == 0 {
        Backoff::Unknown
    } else if s.doubling * 2 > s.pairs {
        Backoff::Exponential
    } else if s.steady * 2 > s.pairs {
        Backoff::Constant
    } else {
        Backoff::Irregular
    };
    let secs = |us: u32| us as f64 / 1e6;
    let median = s.gaps.median().map(secs);
    let first = s.first_gaps.median().map(secs);
    let src = k.src.map(|a| a.to_string());
    let rhythm = match (backoff, first, median) {
        (Backoff::Exponential, Some(f), _) => {
            format!("retries back off exponentially from ~{}", fmt_secs(f))
        }
        (_, _, Some(m)) => format!("retries every ~{}", fmt_secs(m)),
        _ => "no retry interval yet".into(),
    };
    let message = format!(
        "AMPLIFICATION {} -> {}: {} drops from {} flows ({:.1}x), {}, since {}",
        src.as_deref().unwrap_or("?"),
        k.service(),
        s.attempts,
        s.flows,
        s.factor(),
        rhythm,
        clock.hms(s.first_ns)
    );
    Finding {
        finding: "amplification",
        status,
        src,
        proto: k.proto.to_string(),
        port: k.port,
        service: k.service(),
        attempts: s.attempts,
        flows: s.flows,
        retransmissions: s.retries,
        factor: (s.factor() * 100.0).round() / 100.0,
        median_interval_s: median,
        first_retry_s: first,
        backoff,
        first_ts_ns: s.first_ns,
        last_ts_ns: s.last_ns,
        since: clock.rfc3339(s.first_ns),
        message,
    }
}

/// `1.0 s`, `250 ms`.
fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.1} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

/// The flow identity of a dropped packet (see the module documentation).
/// A fixed seed, not a random one: the flow table's set is the
/// fingerprint's, so which flows a full set forgets must be the same live
/// and in a report of the capture.
fn flow_fingerprint(e: &Event) -> u64 {
    let mut h = foldhash::quality::FixedState::with_seed(FINGERPRINT_SEED).build_hasher();
    e.netns.hash(&mut h);
    e.src.hash(&mut h);
    e.dst.hash(&mut h);
    e.proto.0.hash(&mut h);
    match dns_question(e) {
        Some(q) => {
            1u8.hash(&mut h);
            e.dport.hash(&mut h);
            q.hash(&mut h);
        }
        None => {
            0u8.hash(&mut h);
            e.sport.hash(&mut h);
            e.dport.hash(&mut h);
        }
    }
    h.finish()
}

/// The question (name labels and, if captured, type) of a DNS query carried
/// in the event's packet bytes: UDP, standard query (QR=0, opcode 0), one
/// question. A name cut off by the capture length is used as far as it goes.
fn dns_question(e: &Event) -> Option<&[u8]> {
    if e.proto.0 != 17 {
        return None;
    }
    let p = e.packet.bytes();
    let l4 = match (p.first()? >> 4, e.src?) {
        (4, IpAddr::V4(_)) => ((p[0] & 0x0f) as usize) * 4,
        // Only a UDP header right after the fixed header: extension headers
        // are rare on DNS queries and would need a walk.
        (6, IpAddr::V6(_)) if *p.get(6)? == 17 => 40,
        _ => return None,
    };
    let dns = p.get(l4 + 8..)?;
    if dns.len() < 13 {
        return None;
    }
    let flags = u16::from_be_bytes([dns[2], dns[3]]);
    let qdcount = u16::from_be_bytes([dns[4], dns[5]]);
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || qdcount != 1 {
        return None;
    }
    // Walk the labels: lengths 1..=63, ending with a zero byte.
    let q = &dns[12..];
    let mut i = 0;
    while i < q.len() {
        let l = q[i] as usize;
        if l == 0 {
            // Name plus QTYPE when captured.
            return Some(&q[..(i + 3).min(q.len())]);
        }
        if l > 63 {
            return None;
        }
        i += 1 + l;
    }
    // Cut off by the capture: the name so far.
    (i > 0).then_some(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Packet, Proto};

    const S: u64 = 1_000_000_000;

    fn ev(kind: Kind, ts: u64, src: &str, sport: u16, dport: u16, proto: Proto) -> Event {
        Event {
            kind,
            ts_ns: ts,
            cpu: 0,
            netns: 1,
            proto,
            src: Some(src.parse().unwrap()),
            dst: Some("10.0.0.53".parse().unwrap()),
            sport,
            dport,
            reply: None,
            packet: Packet::EMPTY,
            sample: 1,
        }
    }

    fn syn(ts: u64, src: &str, sport: u16) -> Event {
        ev(Kind::TableFull, ts, src, sport, 80, Proto::TCP)
    }

    /// An IPv4/UDP DNS query for `name` (A), id `id`, from `sport`.
    fn dns_query(ts: u64, sport: u16, id: u16, name: &str) -> Event {
        let mut dns = id.to_be_bytes().to_vec();
        dns.extend_from_slice(&[0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1]);
        for l in name.split('.') {
            dns.push(l.len() as u8);
            dns.extend_from_slice(l.as_bytes());
        }
        dns.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 7, 10, 0, 0, 53,
        ];
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&53u16.to_be_bytes());
        p.extend_from_slice(&((8 + dns.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&dns);
        let mut e = ev(Kind::TableFull, ts, "10.0.0.7", sport, 53, Proto::UDP);
        e.packet = Packet::new(&p, p.len() as u32);
        e
    }

    fn clock() -> Clock {
        Clock {
            start_unix_ns: 1_795_608_067 * S as u128,
            start_mono_ns: 0,
        }
    }

    #[test]
    fn tcp_syn_backoff_is_flagged_as_exponential() {
        let mut d = Detector::new(AmpConfig::default());
        // Four connects, each SYN sent at 0, 1, 3, 7 s (RTO 1 s doubling).
        for c in 0..4u16 {
            for t in [0, 1, 3, 7] {
                d.record(&syn(t * S + c as u64 * 1000, "10.0.0.7", 40000 + c));
            }
        }
        let f = d.findings(&clock());
        assert_eq!(f.len(), 1);
        let f = &f[0];
        assert_eq!((f.attempts, f.flows, f.retransmissions), (16, 4, 12));
        assert_eq!(f.factor, 4.0);
        assert_eq!(f.backoff, Backoff::Exponential);
        assert_eq!(f.first_retry_s, Some(1.0));
        assert_eq!(f.service, "tcp/80");
        assert_eq!(
            f.message,
            "AMPLIFICATION 10.0.0.7 -> tcp/80: 16 drops from 4 flows (4.0x), \
             retries back off exponentially from ~1.0 s, since 12:01:07"
        );
        let s = d.summary();
        assert_eq!((s.drops, s.retransmissions), (16, 12));
        assert_eq!(s.retransmission_share, 0.75);
    }

    #[test]
    fn dns_retries_from_new_ports_are_one_flow() {
        let mut d = Detector::new(AmpConfig::default());
        // dig +tries=3 +timeout=1: same id and question, a new port each try.
        for q in 0..5u16 {
            for t in 0..3u64 {
                let sport = 30000 + q * 10 + t as u16;
                d.record(&dns_query(
                    t * S + q as u64,
                    sport,
                    100 + q,
                    &format!("q{q}.example.test"),
                ));
            }
        }
        let f = d.findings(&clock());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!((f[0].attempts, f[0].flows), (15, 5));
        assert_eq!(f[0].backoff, Backoff::Constant);
        assert_eq!(f[0].median_interval_s, Some(1.0));
        assert!(
            f[0].message.contains("retries every ~1.0 s"),
            "{}",
            f[0].message
        );
    }

    #[test]
    fn distinct_dns_queries_from_one_socket_are_distinct_flows() {
        let mut d = Detector::new(AmpConfig::default());
        for i in 0..50u16 {
            d.record(&dns_query(
                i as u64 * S / 10,
                5353,
                i,
                &format!("n{i}.test"),
            ));
        }
        assert!(d.findings(&clock()).is_empty());
        assert_eq!(d.summary().retransmissions, 0);
    }

    #[test]
    fn one_shot_flows_are_never_flagged() {
        let mut d = Detector::new(AmpConfig::default());
        for i in 0..10_000u32 {
            d.record(&ev(
                Kind::TableFull,
                i as u64 * 1000,
                "10.0.0.9",
                (1024 + i % 60000) as u16,
                53,
                Proto::UDP,
            ));
        }
        assert!(d.findings(&clock()).is_empty());
        assert_eq!(d.summary().retransmissions, 0);
    }

    #[test]
    fn threshold_and_min_retries_both_apply() {
        let cfg = AmpConfig {
            threshold: 3.0,
            min_retries: 4,
            ..Default::default()
        };
        let mut d = Detector::new(cfg);
        // Two flows, each sent 3 times: factor 3.0 but only 4 retries.
        for f in 0..2u16 {
            for t in 0..3 {
                d.record(&syn(t * S, "10.0.0.7", 1000 + f));
            }
        }
        assert_eq!(d.findings(&clock()).len(), 1);
        // A third flow sent once: factor 7/3 < 3.
        d.record(&syn(5 * S, "10.0.0.7", 2000));
        assert!(d.findings(&clock()).is_empty());
        // Retries alone are not enough below min_retries.
        let mut d = Detector::new(AmpConfig {
            min_retries: 10,
            ..Default::default()
        });
        for t in 0..5 {
            d.record(&syn(t * S, "10.0.0.8", 1));
        }
        assert!(d.findings(&clock()).is_empty());
    }

    #[test]
    fn window_expiry_starts_a_new_flow() {
        let mut d = Detector::new(AmpConfig {
            window: Duration::from_secs(2),
            min_retries: 1,
            ..Default::default()
        });
        d.record(&syn(0, "10.0.0.7", 1));
        d.record(&syn(3 * S, "10.0.0.7", 1)); // 3 s later: outside the window
        let s = d.summary();
        assert_eq!(s.retransmissions, 0);
        d.record(&syn(4 * S, "10.0.0.7", 1)); // 1 s later: a retry
        assert_eq!(d.summary().retransmissions, 1);
        let f = d.findings(&clock());
        // 3 attempts from 2 flows: 1.5x < 2.0.
        assert!(f.is_empty());
    }

    #[test]
    fn other_kinds_are_not_drops() {
        let mut d = Detector::new(AmpConfig::default());
        for t in 0..10 {
            d.record(&ev(Kind::EarlyDrop, t * S, "10.0.0.7", 1, 53, Proto::UDP));
            d.record(&ev(Kind::RuleDrop, t * S, "10.0.0.7", 1, 53, Proto::UDP));
        }
        assert_eq!(d.summary().drops, 0);
        let mut d = Detector::new(AmpConfig::default());
        for t in 0..10 {
            d.record(&ev(
                Kind::InsertFailed,
                t * S,
                "10.0.0.7",
                1,
                80,
                Proto::TCP,
            ));
        }
        assert_eq!(d.summary().retransmissions, 9);
    }

    #[test]
    fn changed_findings_are_reported_once_per_change() {
        let mut d = Detector::new(AmpConfig::default());
        for t in 0..6 {
            d.record(&syn(t * S, "10.0.0.7", 1));
        }
        let c = clock();
        let first = d.take_changed(&c);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].status, FindingStatus::New);
        assert!(d.take_changed(&c).is_empty());
        d.record(&syn(7 * S, "10.0.0.7", 1));
        let again = d.take_changed(&c);
        assert_eq!(
            (again[0].status, again[0].attempts),
            (FindingStatus::Update, 7)
        );
    }

    #[test]
    fn memory_stays_bounded_under_millions_of_flows() {
        let cfg = AmpConfig {
            max_flows: 1024,
            max_sources: 100,
            ..Default::default()
        };
        let ceiling = cfg.memory_ceiling();
        let mut d = Detector::new(cfg);
        for i in 0..2_000_000u64 {
            let src = format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
            d.record(&ev(
                Kind::TableFull,
                i * 100,
                &src,
                (i % 50000) as u16,
                53,
                Proto::UDP,
            ));
        }
        assert_eq!(d.flows.slots.len(), 1024);
        assert_eq!(d.sources.len(), 100);
        let s = d.summary();
        assert_eq!(s.drops, 2_000_000);
        assert_eq!(s.untracked_drops, 2_000_000 - 100);
        // Forgetting flows never invents retransmissions.
        assert_eq!(s.retransmissions, 0);
        assert!(s.flows_forgotten > 0);
        assert!(ceiling < 1024 * 24 + 100 * 1000, "{ceiling}");
    }

    #[test]
    fn heavy_amplifier_is_flagged_while_one_off_sources_churn() {
        // 100 source entries; 200 000 drops over 10 s from random one-off
        // sources, except every 20th after the first 1000 (when the table
        // is full): from 10.0.0.7, whose SYNs are each dropped 4 times 1 ms
        // apart. N/m = 2000 < its 9950 drops.
        let mut d = Detector::new(AmpConfig {
            max_sources: 100,
            ..Default::default()
        });
        let mut rng = crate::analysis::sources::tests::Rng(0xc0ffee);
        let mut heavy = 0u64;
        for i in 0..200_000u64 {
            let ts = i * 50_000;
            if i >= 1000 && i % 20 == 0 {
                d.record(&syn(ts, "10.0.0.7", 1000 + (heavy / 4) as u16));
                heavy += 1;
            } else {
                let src = std::net::Ipv4Addr::from(0x0b00_0000 | (rng.next() as u32 >> 8));
                let sport = rng.next() as u16;
                d.record(&ev(
                    Kind::TableFull,
                    ts,
                    &src.to_string(),
                    sport,
                    53,
                    Proto::UDP,
                ));
            }
        }
        assert_eq!(d.sources.len(), 100);
        let s = d.summary();
        assert!(
            s.untracked_drops > 150_000,
            "the one-off sources churned: {s:?}"
        );
        let f = d.findings(&clock());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].src.as_deref(), Some("10.0.0.7"));
        // Never replaced once in, so it saw every one of its drops.
        assert_eq!(heavy, 9950);
        assert_eq!(f[0].attempts, heavy);
        assert_eq!(f[0].flows + f[0].retransmissions, heavy);
        assert!(f[0].factor >= 3.0, "{:?}", f[0]);
    }

    #[test]
    fn a_replacing_source_counts_a_flow_it_did_not_see_as_new() {
        let mut d = Detector::new(AmpConfig {
            max_sources: 2,
            min_retries: 1,
            ..Default::default()
        });
        d.record(&syn(0, "10.0.0.1", 7));
        d.record(&syn(1, "10.0.0.2", 1));
        d.record(&syn(2, "10.0.0.2", 2));
        // 10.0.0.3 replaces 10.0.0.1 (the smallest count).
        d.record(&syn(3, "10.0.0.3", 1));
        // 10.0.0.1 is back (replacing 10.0.0.2, at count 2 the longest):
        // its flow's first drop was counted in a state since reset, so
        // this retry is a new flow for it, and only the next a retry.
        d.record(&syn(4, "10.0.0.1", 7));
        d.record(&syn(5, "10.0.0.1", 7));
        assert_eq!(d.summary().retransmissions, 2);
        assert_eq!(d.summary().untracked_drops, 3);
        let f = d.findings(&clock());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(
            (
                f[0].src.as_deref(),
                f[0].attempts,
                f[0].flows,
                f[0].retransmissions
            ),
            (Some("10.0.0.1"), 2, 1, 1)
        );
    }

    #[test]
    fn forgotten_flows_undercount_but_do_not_break_retries() {
        // A tiny table: 1 set of 4 ways. Five live flows: the oldest goes.
        let mut d = Detector::new(AmpConfig {
            max_flows: 4,
            min_retries: 1,
            ..Default::default()
        });
        for f in 0..5u16 {
            d.record(&syn(f as u64, "10.0.0.7", f));
        }
        assert_eq!(d.summary().flows_forgotten, 1);
        d.record(&syn(S, "10.0.0.7", 4)); // still remembered
        d.record(&syn(S, "10.0.0.7", 0)); // forgotten: counts as new
        assert_eq!(d.summary().retransmissions, 1);
    }

    #[test]
    fn dns_question_parsing_rejects_non_queries() {
        let q = dns_query(0, 1, 7, "a.example");
        assert_eq!(dns_question(&q), Some(&b"\x01a\x07example\x00\x00\x01"[..]));
        // The test suite's UDP payload is not DNS.
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 7, 10, 0, 0, 53,
        ];
        p.extend_from_slice(&[0, 1, 0, 53, 0, 29, 0, 0]);
        p.extend_from_slice(b"conntrack-trace test\0");
        let mut e = ev(Kind::TableFull, 0, "10.0.0.7", 1, 53, Proto::UDP);
        e.packet = Packet::new(&p, p.len() as u32);
        assert_eq!(dns_question(&e), None);
        // A response (QR=1) is not a query.
        let mut r = q.clone();
        let mut bytes = r.packet.bytes().to_vec();
        bytes[28 + 2] |= 0x80;
        r.packet = Packet::new(&bytes, bytes.len() as u32);
        assert_eq!(dns_question(&r), None);
        // Truncated captures do not panic.
        for n in 0..q.packet.bytes().len() {
            let mut t = q.clone();
            t.packet = Packet::new(&q.packet.bytes()[..n], 100);
            let _ = dns_question(&t);
        }
    }

    #[test]
    fn config_validation() {
        assert!(AmpConfig::default().validate().is_ok());
        let bad = [
            AmpConfig {
                window: Duration::ZERO,
                ..Default::default()
            },
            AmpConfig {
                window: Duration::from_secs(7200),
                ..Default::default()
            },
            AmpConfig {
                threshold: 1.0,
                ..Default::default()
            },
            AmpConfig {
                threshold: f64::NAN,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
