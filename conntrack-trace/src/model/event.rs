//! The typed event model: what user space makes of a [`RawEvent`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use conntrack_trace_common::{PKT_BYTES, RawEvent, kind, l3};
use serde::{Deserialize, Serialize};

/// What conntrack did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// No entry could be allocated: the table was full (kernel stat `drop`).
    TableFull,
    /// An unassured entry was evicted to make room (kernel stat `early_drop`).
    EarlyDrop,
    /// A new entry clashed at confirm time (kernel stat `insert_failed`).
    InsertFailed,
    /// A confirmed entry's packet was dropped by a rule (not a conntrack
    /// failure; only emitted with `--rule-drops`).
    RuleDrop,
    /// conntrack's garbage collector evicted a live entry early (the table
    /// was at or above 95 % after an allocation failed). No kernel stat
    /// counts these: the kind has no matching counter.
    GcEvict,
}

impl Kind {
    /// The conntrack failure kinds, in display order (the GC's evictions
    /// last: they came after the table was full).
    pub const FAILURES: [Kind; 4] = [
        Kind::TableFull,
        Kind::EarlyDrop,
        Kind::InsertFailed,
        Kind::GcEvict,
    ];
    /// Every kind, in the order of their raw values.
    pub const ALL: [Kind; 5] = [
        Kind::TableFull,
        Kind::EarlyDrop,
        Kind::InsertFailed,
        Kind::RuleDrop,
        Kind::GcEvict,
    ];

    pub fn from_raw(k: u8) -> Option<Kind> {
        match k {
            kind::TABLE_FULL => Some(Kind::TableFull),
            kind::EARLY_DROP => Some(Kind::EarlyDrop),
            kind::INSERT_FAILED => Some(Kind::InsertFailed),
            kind::RULE_DROP => Some(Kind::RuleDrop),
            kind::GC_EVICT => Some(Kind::GcEvict),
            _ => None,
        }
    }

    pub fn raw(self) -> u8 {
        match self {
            Kind::TableFull => kind::TABLE_FULL,
            Kind::EarlyDrop => kind::EARLY_DROP,
            Kind::InsertFailed => kind::INSERT_FAILED,
            Kind::RuleDrop => kind::RULE_DROP,
            Kind::GcEvict => kind::GC_EVICT,
        }
    }

    /// The kernel stat (`/proc/net/stat/nf_conntrack`) that counts this
    /// kind, if any: `gc_evict` has none, so the checks that compare events
    /// with the kernel's counters leave it out (docs/schema.md).
    pub fn has_kernel_counter(self) -> bool {
        !matches!(self, Kind::GcEvict | Kind::RuleDrop)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TableFull => "table_full",
            Kind::EarlyDrop => "early_drop",
            Kind::InsertFailed => "insert_failed",
            Kind::RuleDrop => "rule_drop",
            Kind::GcEvict => "gc_evict",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Layer-4 protocol, by IANA number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proto(pub u8);

impl Proto {
    pub const ICMP: Proto = Proto(1);
    pub const TCP: Proto = Proto(6);
    pub const UDP: Proto = Proto(17);
    pub const ICMPV6: Proto = Proto(58);
    pub const SCTP: Proto = Proto(132);

    /// Protocols whose tuple carries ports.
    pub fn has_ports(self) -> bool {
        matches!(self.0, 6 | 17 | 33 | 132 | 136)
    }

    pub fn is_icmp(self) -> bool {
        matches!(self.0, 1 | 58)
    }

    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self.0 {
            1 => "icmp".into(),
            6 => "tcp".into(),
            17 => "udp".into(),
            33 => "dccp".into(),
            47 => "gre".into(),
            58 => "icmpv6".into(),
            132 => "sctp".into(),
            136 => "udplite".into(),
            n => format!("proto-{n}").into(),
        }
    }

    pub fn parse(s: &str) -> Option<Proto> {
        Some(match s.to_ascii_lowercase().as_str() {
            "icmp" => Proto::ICMP,
            "tcp" => Proto::TCP,
            "udp" => Proto::UDP,
            "icmpv6" | "ipv6-icmp" => Proto::ICMPV6,
            "sctp" => Proto::SCTP,
            "dccp" => Proto(33),
            "gre" => Proto(47),
            "udplite" => Proto(136),
            other => Proto(other.strip_prefix("proto-").unwrap_or(other).parse().ok()?),
        })
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Proto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Proto::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown protocol {s}")))
    }
}

/// One conntrack failure, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cpu: u32,
    /// Network namespace inode (0 if unknown).
    pub netns: u32,
    pub proto: Proto,
    /// None when the packet had no parsable IP header.
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    /// Ports for port protocols; ICMP echo id in `sport`, `type<<8|code` in
    /// `dport`; zero otherwise.
    pub sport: u16,
    pub dport: u16,
    /// The entry's reply-direction tuple, for events that have an entry
    /// (`insert_failed`, `early_drop`, `rule_drop` of a confirmed entry);
    /// None for `table_full` (no entry could be made).
    pub reply: Option<Reply>,
    /// The first bytes of the dropped packet (empty for evictions).
    pub packet: Packet,
    /// How many drops of its kind this event stands for: 1 while every
    /// drop is an event; N while the programs keep one flow in N
    /// (`--event-budget`: a sampled flow's events all arrive, so counts per
    /// flow stay whole and ratios over flows unbiased).
    pub sample: u16,
}

/// The reply direction of a conntrack entry: who answers, and to whom.
/// Without NAT it is the original tuple reversed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// What NAT did to an entry, derived from its two tuples (the kernel's
/// IPS_SRC_NAT/IPS_DST_NAT say the same: nf_nat_setup_info() sets them when
/// it changes the reply tuple).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Nat {
    None,
    /// The destination was translated (a service address to a server).
    Dnat,
    /// The source was translated (masquerade).
    Snat,
    #[serde(rename = "snat+dnat")]
    Both,
}

impl Nat {
    pub fn as_str(self) -> &'static str {
        match self {
            Nat::None => "none",
            Nat::Dnat => "dnat",
            Nat::Snat => "snat",
            Nat::Both => "snat+dnat",
        }
    }
}

/// Leading bytes of a dropped packet, from its network header on. Kept
/// inline (no allocation per event).
#[derive(Clone, PartialEq, Eq)]
pub struct Packet {
    len: u16,
    /// Length of the whole packet on the wire (from the network header).
    pub wire_len: u32,
    buf: [u8; PKT_BYTES],
}

impl Packet {
    pub const EMPTY: Packet = Packet {
        len: 0,
        wire_len: 0,
        buf: [0; PKT_BYTES],
    };

    /// A packet from captured bytes (at most [`PKT_BYTES`] are kept).
    pub fn new(bytes: &[u8], wire_len: u32) -> Packet {
        let n = bytes.len().min(PKT_BYTES);
        let mut buf = [0; PKT_BYTES];
        buf[..n].copy_from_slice(&bytes[..n]);
        Packet {
            len: n as u16,
            wire_len: wire_len.max(n as u32),
            buf,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Default for Packet {
    fn default() -> Self {
        Packet::EMPTY
    }
}

impl std::fmt::Debug for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packet({} of {} bytes)", self.len, self.wire_len)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event record is {got} bytes, expected {want}")]
    Size { got: usize, want: usize },
    #[error("event has unknown kind {0}")]
    Kind(u8),
}

impl Event {
    /// Decodes one ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
        let want = std::mem::size_of::<RawEvent>();
        if bytes.len() < want {
            return Err(DecodeError::Size {
                got: bytes.len(),
                want,
            });
        }
        // SAFETY: RawEvent is repr(C) plain-old-data; length checked above;
        // read_unaligned because ring records are only 8-byte aligned by
        // contract and we do not rely on it.
        let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Event::from_raw(&raw)
    }

    pub fn from_raw(raw: &RawEvent) -> Result<Event, DecodeError> {
        let kind = Kind::from_raw(raw.kind).ok_or(DecodeError::Kind(raw.kind))?;
        let (src, dst) = match raw.l3 {
            l3::IPV4 => (
                Some(IpAddr::V4(Ipv4Addr::new(
                    raw.src[0], raw.src[1], raw.src[2], raw.src[3],
                ))),
                Some(IpAddr::V4(Ipv4Addr::new(
                    raw.dst[0], raw.dst[1], raw.dst[2], raw.dst[3],
                ))),
            ),
            l3::IPV6 => (
                Some(IpAddr::V6(Ipv6Addr::from(raw.src))),
                Some(IpAddr::V6(Ipv6Addr::from(raw.dst))),
            ),
            _ => (None, None),
        };
        Ok(Event {
            kind,
            ts_ns: raw.ts_ns,
            cpu: raw.cpu,
            netns: raw.netns,
            proto: Proto(raw.l4),
            src,
            dst,
            sport: raw.sport,
            dport: raw.dport,
            reply: match (raw.has_reply, src) {
                (0, _) | (_, None) => None,
                (_, Some(IpAddr::V4(_))) => Some(Reply {
                    src: IpAddr::V4(Ipv4Addr::new(
                        raw.reply_src[0],
                        raw.reply_src[1],
                        raw.reply_src[2],
                        raw.reply_src[3],
                    )),
                    sport: raw.reply_sport,
                    dst: IpAddr::V4(Ipv4Addr::new(
                        raw.reply_dst[0],
                        raw.reply_dst[1],
                        raw.reply_dst[2],
                        raw.reply_dst[3],
                    )),
                    dport: raw.reply_dport,
                }),
                (_, Some(IpAddr::V6(_))) => Some(Reply {
                    src: IpAddr::V6(Ipv6Addr::from(raw.reply_src)),
                    sport: raw.reply_sport,
                    dst: IpAddr::V6(Ipv6Addr::from(raw.reply_dst)),
                    dport: raw.reply_dport,
                }),
            },
            packet: if raw.caplen == 0 {
                Packet::EMPTY
            } else {
                // The kernel clamps caplen; clamp again so a corrupt record
                // cannot index past the buffer.
                Packet::new(
                    &raw.pkt[..(raw.caplen as usize).min(PKT_BYTES)],
                    raw.wire_len,
                )
            },
            sample: raw.weight(),
        })
    }

    /// What NAT did, when the event has an entry. Ports count only for
    /// port protocols (an ICMP reply tuple differs in type by design).
    pub fn nat(&self) -> Option<Nat> {
        let r = self.reply?;
        let ports = self.proto.has_ports();
        let dnat = Some(r.src) != self.dst || (ports && r.sport != self.dport);
        let snat = Some(r.dst) != self.src || (ports && r.dport != self.sport);
        Some(match (snat, dnat) {
            (false, false) => Nat::None,
            (false, true) => Nat::Dnat,
            (true, false) => Nat::Snat,
            (true, true) => Nat::Both,
        })
    }

    pub fn icmp_type(&self) -> u8 {
        (self.dport >> 8) as u8
    }
    pub fn icmp_code(&self) -> u8 {
        (self.dport & 0xff) as u8
    }
    pub fn icmp_id(&self) -> u16 {
        self.sport
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn raw_v4(
        kind: u8,
        src: [u8; 4],
        sport: u16,
        dst: [u8; 4],
        dport: u16,
        l4: u8,
    ) -> RawEvent {
        let mut r = RawEvent::zeroed();
        r.kind = kind;
        r.l3 = l3::IPV4;
        r.l4 = l4;
        r.src[..4].copy_from_slice(&src);
        r.dst[..4].copy_from_slice(&dst);
        r.sport = sport;
        r.dport = dport;
        r.ts_ns = 42;
        r.netns = 4026531840;
        r.cpu = 1;
        r
    }

    fn bytes(r: &RawEvent) -> Vec<u8> {
        // SAFETY: RawEvent is POD.
        unsafe {
            std::slice::from_raw_parts((r as *const RawEvent).cast::<u8>(), size_of::<RawEvent>())
        }
        .to_vec()
    }

    #[test]
    fn nat_is_derived_from_the_two_tuples() {
        let mut e = Event::from_raw(&raw_v4(
            kind::INSERT_FAILED,
            [10, 0, 0, 7],
            40001,
            [10, 96, 0, 10],
            80,
            6,
        ))
        .unwrap();
        assert_eq!(e.reply, None);
        assert_eq!(e.nat(), None, "no entry, no NAT to speak of");
        let reply = |src: &str, sport, dst: &str, dport| Reply {
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
        };
        e.reply = Some(reply("10.96.0.10", 80, "10.0.0.7", 40001));
        assert_eq!(e.nat(), Some(Nat::None));
        e.reply = Some(reply("10.244.2.3", 8080, "10.0.0.7", 40001));
        assert_eq!(e.nat(), Some(Nat::Dnat));
        e.reply = Some(reply("10.96.0.10", 80, "192.0.2.1", 61000));
        assert_eq!(e.nat(), Some(Nat::Snat));
        e.reply = Some(reply("10.244.2.3", 80, "192.0.2.1", 40001));
        assert_eq!(e.nat(), Some(Nat::Both));
        // ICMP: the reply tuple's type differs by design, addresses decide.
        e.proto = Proto::ICMP;
        e.reply = Some(reply("10.96.0.10", 0, "10.0.0.7", 40001));
        assert_eq!(e.nat(), Some(Nat::None));
    }

    #[test]
    fn decodes_ipv4_udp() {
        let r = raw_v4(
            kind::TABLE_FULL,
            [10, 0, 0, 7],
            40001,
            [10, 0, 0, 53],
            53,
            17,
        );
        let e = Event::decode(&bytes(&r)).unwrap();
        assert_eq!(e.kind, Kind::TableFull);
        assert_eq!(e.src, Some("10.0.0.7".parse().unwrap()));
        assert_eq!(e.dst, Some("10.0.0.53".parse().unwrap()));
        assert_eq!((e.sport, e.dport), (40001, 53));
        assert_eq!(e.proto, Proto::UDP);
        assert_eq!((e.ts_ns, e.cpu, e.netns), (42, 1, 4026531840));
    }

    #[test]
    fn decodes_ipv6() {
        let mut r = RawEvent::zeroed();
        r.kind = kind::INSERT_FAILED;
        r.l3 = l3::IPV6;
        r.l4 = 6;
        r.src = "fd00::7".parse::<Ipv6Addr>().unwrap().octets();
        r.dst = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        let e = Event::decode(&bytes(&r)).unwrap();
        assert_eq!(e.src, Some("fd00::7".parse().unwrap()));
        assert_eq!(e.kind, Kind::InsertFailed);
    }

    #[test]
    fn icmp_fields_split() {
        let r = raw_v4(
            kind::EARLY_DROP,
            [1, 1, 1, 1],
            0x1234,
            [2, 2, 2, 2],
            8 << 8,
            1,
        );
        let e = Event::decode(&bytes(&r)).unwrap();
        assert_eq!((e.icmp_type(), e.icmp_code(), e.icmp_id()), (8, 0, 0x1234));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert_eq!(
            Event::decode(&[0u8; 10]),
            Err(DecodeError::Size {
                got: 10,
                want: size_of::<RawEvent>()
            })
        );
        let mut r = RawEvent::zeroed();
        r.kind = 99;
        assert_eq!(Event::decode(&bytes(&r)), Err(DecodeError::Kind(99)));
    }

    #[test]
    fn gc_evict_is_kind_4_without_a_kernel_counter() {
        let r = raw_v4(kind::GC_EVICT, [10, 0, 0, 7], 40001, [10, 0, 0, 53], 53, 17);
        let e = Event::decode(&bytes(&r)).unwrap();
        assert_eq!(e.kind, Kind::GcEvict);
        assert_eq!((e.kind.as_str(), e.kind.raw()), ("gc_evict", 4));
        assert!(!Kind::GcEvict.has_kernel_counter());
        assert!(Kind::EarlyDrop.has_kernel_counter());
        assert_eq!(Kind::ALL.len(), kind::COUNT as usize);
        for k in Kind::ALL {
            assert_eq!(Kind::from_raw(k.raw()), Some(k));
        }
        assert_eq!(
            serde_json::to_string(&Kind::GcEvict).unwrap(),
            r#""gc_evict""#
        );
    }

    #[test]
    fn no_l3_means_no_addresses() {
        let r = RawEvent::zeroed();
        let e = Event::decode(&bytes(&r)).unwrap();
        assert_eq!((e.src, e.dst), (None, None));
    }

    #[test]
    fn proto_names_round_trip() {
        for p in [1u8, 6, 17, 33, 47, 58, 132, 136, 200] {
            assert_eq!(Proto::parse(&Proto(p).name()), Some(Proto(p)));
        }
        assert_eq!(Proto::parse("UDP"), Some(Proto::UDP));
        assert_eq!(Proto::parse("bogus"), None);
    }
}
