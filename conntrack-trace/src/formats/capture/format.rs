//! The capture file format (`.ctt`), version 2 (version 1 files read the
//! same: they never set the `flags` bit version 2 added).
//!
//! ```text
//! file    := MAGIC record*
//! MAGIC   := 89 'C' 'T' 'T' 0d 0a 1a 0a        (8 bytes; PNG-style: catches
//!                                               text-mode and 7-bit mangling)
//! record  := len:u32le crc:u32le body[len]
//! body    := type:u8 payload
//! crc     := CRC-32 (IEEE) of body
//! ```
//!
//! Record types: `HEADER` (first record of every file, JSON [`Header`]),
//! `NAMES` (JSON map netns inode -> name, written at start and whenever the
//! tracer learns new names, so readers name events exactly as the live
//! output did), `EVENT` (binary, below), `TRAILER` (JSON [`Trailer`], last
//! record of a finished capture) and `NEXT` (last record of a file that was
//! rotated; the capture continues in the file with the next `seq`).
//!
//! Every record carries its own length and checksum, so a reader can stop at
//! the first torn or corrupt record (crash, full disk, truncation) and keep
//! everything before it. A length is checked against [`MAX_RECORD`] before
//! anything is allocated for it.
//!
//! EVENT payload (little endian), 38 bytes + packet for IPv4, 62 for IPv6:
//!
//! ```text
//! ts_ns u64 | netns u32 | cpu u32 | kind u8 | l3 u8 | l4 u8 | flags u8
//! sport u16 | dport u16 | src [4 or 16, none if l3 = 0] | dst [same]
//! [flags & REPLY: reply_src [same] | reply_dst [same] | reply_sport u16 | reply_dport u16]
//! wire_len u32 | caplen u16 | packet [caplen <= 96]
//! ```
//!
//! `flags` bit 0 (`REPLY`, version 2): the entry's reply tuple follows the
//! addresses (events with an entry; 12 more bytes for IPv4, 36 for IPv6).

use std::{collections::BTreeMap, net::IpAddr};

use conntrack_trace_common::{PKT_BYTES, RawEvent, l3};
use serde::{Deserialize, Serialize};

use crate::{
    analysis::filter::{Cidr, Filter},
    kernel::kstats::{CtStats, Fill},
    kernel::workload::NetnsNames,
    model::event::{DecodeError, Event, Kind, Proto},
    model::{IntervalCounts, KindCounts, Name, Scope, SourceCount},
};

pub const MAGIC: [u8; 8] = *b"\x89CTT\r\n\x1a\n";
/// Current format version (in [`Header::format_version`]). 3: an event may
/// carry its sampling weight ([`EVENT_SAMPLED`]) and the trailer the drops
/// the event budget shed; versions 1 and 2 read as unsampled. 4: an event's
/// kind may be `gc_evict` (4) and the kind counts have a `gc_evict` field
/// (absent in older files: 0), and COUNTS records carry the interval's
/// exact per-source counts under a budget. A reader of version 3 would take
/// a kind-4 event or a COUNTS record for damage and stop there, keeping
/// what came before as if it were the whole capture; the version tells it
/// to refuse the file instead, with one clear error.
pub const FORMAT_VERSION: u32 = 4;
/// Oldest format version this reader reads.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// EVENT `flags`: the reply tuple follows the addresses.
pub const EVENT_REPLY: u8 = 1;
/// EVENT `flags`: the event's sampling weight (u16, > 1) follows the
/// packet (`--event-budget`); absent, the event stands for one drop —
/// as every event of a capture written before sampling existed.
pub const EVENT_SAMPLED: u8 = 2;
/// Frame: length + checksum.
pub const FRAME_BYTES: usize = 8;
/// No record may be longer than this (JSON header/trailer with a few
/// thousand namespaces fits easily; events are < 200 bytes).
pub const MAX_RECORD: u32 = 4 << 20;

pub mod rtype {
    pub const HEADER: u8 = 1;
    pub const NAMES: u8 = 2;
    pub const EVENT: u8 = 3;
    pub const TRAILER: u8 = 4;
    pub const NEXT: u8 = 5;
    /// JSON `{inode: workload}`: the containers/pods behind the names of
    /// the NAMES record just before (see crate::kernel::workload). Written only
    /// when there is one, so captures of hosts without containers stay
    /// readable by readers older than this record.
    pub const WORKLOADS: u8 = 6;
    /// Binary [`crate::model::IntervalCounts`] (see [`super::encode_counts`]):
    /// written once per interval while the event budget is on (format 4).
    pub const COUNTS: u8 = 7;
}

/// Conntrack fill of one traced namespace at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsFill {
    pub netns: String,
    pub inode: u32,
    #[serde(flatten)]
    pub fill: Fill,
}

/// The live filter the capture was recorded with (`--netns/--proto/--port/
/// --src`); every event is recorded, the filter is re-applied by readers so
/// that `matched` equals the live summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedFilter {
    pub netns: Option<u32>,
    pub proto: Option<String>,
    pub port: Option<u16>,
    pub src: Option<String>,
}

impl RecordedFilter {
    pub fn of(f: &Filter) -> Self {
        RecordedFilter {
            netns: f.netns,
            proto: f.proto.map(|p| p.to_string()),
            port: f.port,
            src: f.src.map(|c| c.to_string()),
        }
    }

    pub fn to_filter(&self) -> Result<Filter, String> {
        Ok(Filter {
            netns: self.netns,
            proto: match &self.proto {
                Some(p) => Some(Proto::parse(p).ok_or_else(|| format!("bad protocol `{p}`"))?),
                None => None,
            },
            port: self.port,
            src: match &self.src {
                Some(s) => Some(s.parse::<Cidr>().map_err(|e| e.to_string())?),
                None => None,
            },
        })
    }
}

/// First record of every file: everything needed to read the capture
/// without the machine it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    pub tool_version: String,
    pub hostname: String,
    pub kernel_release: String,
    /// The backend with its hooks, as in the live header.
    #[serde(rename = "backend")]
    pub hooks: String,
    pub evictions: String,
    /// Wall clock (Unix ns) and CLOCK_MONOTONIC at the same instant, taken
    /// right after attach: `wall = start_unix_ns + (ts_ns - start_mono_ns)`.
    pub start_unix_ns: u128,
    pub start_mono_ns: u64,
    /// Identifies one recording across its rotated files.
    pub capture_id: u64,
    /// Index of this file in the rotated set (0 for the first).
    pub seq: u32,
    pub scope: Scope,
    pub filter: RecordedFilter,
    /// Conntrack entries / max / buckets of the traced namespaces at start.
    pub conntrack: Vec<NsFill>,
    /// /proc/net/stat/nf_conntrack of each traced namespace (by inode) just
    /// before the programs were attached.
    pub kernel_start: BTreeMap<u32, CtStats>,
    /// Backends `--backend auto` passed over, and why.
    #[serde(default)]
    pub backend_refused: Vec<crate::model::Refusal>,
    /// False for the counters backend (a capture then holds no events).
    #[serde(default = "yes")]
    pub per_packet: bool,
    /// The backend's name (`backend` holds it with its hooks). Absent in
    /// captures written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_name: Option<Name>,
}

fn yes() -> bool {
    true
}

impl Header {
    /// The recording session's facts, as the live summary had them.
    pub fn facts(&self, trailer: Option<&Trailer>) -> crate::model::SessionFacts {
        // Older captures name the backend only with its hooks
        // ("tracepoint (tp_btf/...)") and, when finished, in the trailer.
        let backend = self
            .backend_name
            .or_else(|| trailer.map(|t| t.backend))
            .unwrap_or_else(|| {
                Name::parse(self.hooks.split_whitespace().next().unwrap_or_default())
            });
        crate::model::SessionFacts {
            version: self.tool_version.clone(),
            backend,
            hooks: self.hooks.clone(),
            refused: self.backend_refused.clone(),
            per_packet: self.per_packet,
            evictions: self.evictions.clone(),
            clock: crate::model::clock::Clock {
                start_unix_ns: self.start_unix_ns,
                start_mono_ns: self.start_mono_ns,
            },
            scope: self.scope.clone(),
        }
    }
}

/// Last record of a finished capture (SIGINT, SIGTERM, --duration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trailer {
    /// The backend as the live summary names it (the header's `backend`
    /// names the hooks).
    pub backend: Name,
    pub duration_s: f64,
    pub end_mono_ns: u64,
    /// Events read from the ring (every one of them is in the capture).
    pub events: KindCounts,
    /// Events that passed the live filter.
    pub matched: KindCounts,
    pub lost: KindCounts,
    /// Drops the event budget shed: counted, never events (absent before
    /// format 3).
    #[serde(default)]
    pub shed: KindCounts,
    pub observed: KindCounts,
    pub complete: bool,
    pub decode_errors: u64,
    /// Kernel counters of each traced namespace just after detach.
    pub kernel_end: BTreeMap<u32, CtStats>,
    /// Sum of end - start over the namespaces present at both ends.
    pub kernel: CtStats,
    /// Namespaces summed into `kernel`.
    pub namespaces: usize,
    /// Namespaces of the scope not summed into `kernel`, and why.
    #[serde(default)]
    pub uncovered: Vec<crate::kernel::kstats::Uncovered>,
    /// Event records written over the whole (rotated) capture.
    pub events_written: u64,
    /// See [`crate::model::Summary::unclassified_drops`] (absent in
    /// captures written before it existed: 0).
    #[serde(default)]
    pub unclassified_drops: u64,
    /// See [`crate::model::Summary::unmatched_drop_counts`].
    #[serde(default)]
    pub unmatched_drop_counts: u64,
    /// Events were lost: the live top sources, from the programs' exact
    /// per-source counts (the capture holds only the events that arrived).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_top: Option<Vec<crate::model::TopSource>>,
    #[serde(default)]
    pub exact_sources: u64,
}

impl Trailer {
    /// The trailer of a finished capture: the same totals as the live
    /// summary, plus what only the file needs.
    pub fn of(
        s: &crate::model::Summary,
        end_mono_ns: u64,
        kernel_end: BTreeMap<u32, CtStats>,
        events_written: u64,
    ) -> Trailer {
        Trailer {
            backend: s.backend,
            duration_s: s.duration_s,
            end_mono_ns,
            events: s.events,
            matched: s.matched,
            lost: s.lost,
            shed: s.shed,
            observed: s.observed,
            complete: s.complete,
            decode_errors: s.decode_errors,
            kernel_end,
            kernel: s.kernel,
            namespaces: s.scope.namespaces,
            uncovered: s.scope.uncovered.clone(),
            events_written,
            unclassified_drops: s.unclassified_drops,
            unmatched_drop_counts: s.unmatched_drop_counts,
            exact_top: s.sampled.then(|| s.top.clone()),
            exact_sources: s.exact_sources,
        }
    }
}

/// Marks the end of a rotated file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Next {
    pub next_seq: u32,
    pub events_written: u64,
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Header(Box<Header>),
    Names(NetnsNames),
    Event(Event),
    Trailer(Box<Trailer>),
    Next(Next),
    Workloads(BTreeMap<u32, crate::kernel::workload::Workload>),
    Counts(IntervalCounts),
}

/// Appends one framed record with body `rtype || payload` to `out`.
pub fn frame(out: &mut Vec<u8>, rtype: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_BYTES]);
    out.push(rtype);
    payload(out);
    let body = &out[start + FRAME_BYTES..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

pub fn frame_json<T: Serialize>(out: &mut Vec<u8>, rtype: u8, v: &T) {
    frame(out, rtype, |o| {
        // Serializing our own plain structs into a Vec cannot fail.
        let _ = serde_json::to_writer(o, v);
    })
}

/// Appends a WORKLOADS record for `names`' workloads, if it has any (and
/// they fit one record; the names alone are kept otherwise).
pub fn frame_workloads(out: &mut Vec<u8>, names: &NetnsNames) {
    if names.workloads().is_empty() {
        return;
    }
    let mut rec = Vec::new();
    frame_json(&mut rec, rtype::WORKLOADS, names.workloads());
    if rec.len() - FRAME_BYTES <= MAX_RECORD as usize {
        out.extend_from_slice(&rec);
    }
}

/// Appends the EVENT payload of `e`.
pub fn encode_event(out: &mut Vec<u8>, e: &Event) {
    out.extend_from_slice(&e.ts_ns.to_le_bytes());
    out.extend_from_slice(&e.netns.to_le_bytes());
    out.extend_from_slice(&e.cpu.to_le_bytes());
    let fam = match e.src {
        Some(IpAddr::V4(_)) => l3::IPV4,
        Some(IpAddr::V6(_)) => l3::IPV6,
        None => 0,
    };
    let reply = e.reply.filter(|_| fam != 0);
    let mut flags = if reply.is_some() { EVENT_REPLY } else { 0 };
    if e.sample > 1 {
        flags |= EVENT_SAMPLED;
    }
    out.extend_from_slice(&[e.kind.raw(), fam, e.proto.0, flags]);
    out.extend_from_slice(&e.sport.to_le_bytes());
    out.extend_from_slice(&e.dport.to_le_bytes());
    let addr = |out: &mut Vec<u8>, a: Option<IpAddr>| match (fam, a) {
        (l3::IPV4, Some(IpAddr::V4(a))) => out.extend_from_slice(&a.octets()),
        (l3::IPV4, _) => out.extend_from_slice(&[0; 4]),
        (l3::IPV6, Some(IpAddr::V6(a))) => out.extend_from_slice(&a.octets()),
        (l3::IPV6, Some(IpAddr::V4(a))) => out.extend_from_slice(&a.to_ipv6_mapped().octets()),
        (l3::IPV6, None) => out.extend_from_slice(&[0; 16]),
        _ => {}
    };
    addr(out, e.src);
    addr(out, e.dst);
    if let Some(r) = reply {
        addr(out, Some(r.src));
        addr(out, Some(r.dst));
        out.extend_from_slice(&r.sport.to_le_bytes());
        out.extend_from_slice(&r.dport.to_le_bytes());
    }
    let pkt = e.packet.bytes();
    out.extend_from_slice(&e.packet.wire_len.to_le_bytes());
    out.extend_from_slice(&(pkt.len() as u16).to_le_bytes());
    out.extend_from_slice(pkt);
    if e.sample > 1 {
        out.extend_from_slice(&e.sample.to_le_bytes());
    }
}

/// Appends the COUNTS payload of `c`, little endian:
///
/// ```text
/// ts_ns u64 | entry*
/// entry := kind u8 | l3 u8 | proto u8 | 0 u8 | netns u32 | port u16
///          | src [4 or 16, none if l3 = 0] | count u64
/// ```
pub fn encode_counts(out: &mut Vec<u8>, c: &[SourceCount], ts_ns: u64) {
    out.extend_from_slice(&ts_ns.to_le_bytes());
    for s in c {
        let fam = match s.src {
            Some(IpAddr::V4(_)) => l3::IPV4,
            Some(IpAddr::V6(_)) => l3::IPV6,
            None => 0,
        };
        out.extend_from_slice(&[s.kind.raw(), fam, s.proto.0, 0]);
        out.extend_from_slice(&s.netns.to_le_bytes());
        out.extend_from_slice(&s.port.to_le_bytes());
        match s.src {
            Some(IpAddr::V4(a)) => out.extend_from_slice(&a.octets()),
            Some(IpAddr::V6(a)) => out.extend_from_slice(&a.octets()),
            None => {}
        }
        out.extend_from_slice(&s.count.to_le_bytes());
    }
}

/// Counts entries per COUNTS record: the largest record (IPv6, 34 bytes an
/// entry) stays far below [`MAX_RECORD`].
pub const COUNTS_PER_RECORD: usize = 65_536;

/// Decodes a COUNTS payload.
pub fn decode_counts(payload: &[u8]) -> Result<IntervalCounts, EventError> {
    let mut c = Cur(payload);
    let ts_ns = c.u64()?;
    let mut sources = Vec::new();
    while !c.0.is_empty() {
        let [kind, fam, proto, _] = c.arr::<4>()?;
        let kind = Kind::from_raw(kind).ok_or(EventError::Decode(DecodeError::Kind(kind)))?;
        let netns = c.u32()?;
        let port = c.u16()?;
        let src = match fam {
            l3::IPV4 => Some(IpAddr::from(c.arr::<4>()?)),
            l3::IPV6 => Some(IpAddr::from(c.arr::<16>()?)),
            0 => None,
            f => return Err(EventError::Family(f)),
        };
        let count = c.u64()?;
        sources.push(SourceCount {
            netns,
            kind,
            src,
            proto: Proto(proto),
            port,
            count,
        });
    }
    Ok(IntervalCounts { ts_ns, sources })
}

/// Why an EVENT payload could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("event record too short")]
    Short,
    #[error("event record has {0} trailing bytes")]
    Trailing(usize),
    #[error("event has unknown address family {0}")]
    Family(u8),
    #[error("event packet length {0} exceeds {PKT_BYTES}")]
    Caplen(u16),
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

/// A bounds-checked little-endian cursor.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EventError> {
        if self.0.len() < n {
            return Err(EventError::Short);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], EventError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, EventError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, EventError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, EventError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, EventError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
}

/// Decodes an EVENT payload through the same path as a ring record
/// ([`Event::from_raw`]), so a captured event is exactly the live one.
pub fn decode_event(payload: &[u8]) -> Result<Event, EventError> {
    let mut c = Cur(payload);
    let mut r = RawEvent::zeroed();
    r.ts_ns = c.u64()?;
    r.netns = c.u32()?;
    r.cpu = c.u32()?;
    r.kind = c.u8()?;
    r.l3 = c.u8()?;
    r.l4 = c.u8()?;
    let flags = c.u8()?;
    r.sport = c.u16()?;
    r.dport = c.u16()?;
    let alen = match r.l3 {
        l3::IPV4 => 4,
        l3::IPV6 => 16,
        0 => 0,
        f => return Err(EventError::Family(f)),
    };
    r.src[..alen].copy_from_slice(c.take(alen)?);
    r.dst[..alen].copy_from_slice(c.take(alen)?);
    if flags & EVENT_REPLY != 0 {
        r.reply_src[..alen].copy_from_slice(c.take(alen)?);
        r.reply_dst[..alen].copy_from_slice(c.take(alen)?);
        r.reply_sport = c.u16()?;
        r.reply_dport = c.u16()?;
        r.has_reply = 1;
    }
    r.wire_len = c.u32()?;
    let caplen = c.u16()?;
    if caplen as usize > PKT_BYTES {
        return Err(EventError::Caplen(caplen));
    }
    r.caplen = caplen;
    r.pkt[..caplen as usize].copy_from_slice(c.take(caplen as usize)?);
    if flags & EVENT_SAMPLED != 0 {
        r.sample_denom = c.u16()?;
    }
    if !c.0.is_empty() {
        return Err(EventError::Trailing(c.0.len()));
    }
    Ok(Event::from_raw(&r)?)
}

/// Decodes a record body (type byte + payload).
pub fn decode_body(body: &[u8]) -> Result<Record, String> {
    let (&t, payload) = body.split_first().ok_or("empty record")?;
    let json_err = |what: &str, e: serde_json::Error| format!("bad {what} record: {e}");
    Ok(match t {
        rtype::HEADER => Record::Header(Box::new(
            serde_json::from_slice(payload).map_err(|e| json_err("header", e))?,
        )),
        rtype::NAMES => {
            Record::Names(serde_json::from_slice(payload).map_err(|e| json_err("names", e))?)
        }
        rtype::EVENT => Record::Event(decode_event(payload).map_err(|e| e.to_string())?),
        rtype::TRAILER => Record::Trailer(Box::new(
            serde_json::from_slice(payload).map_err(|e| json_err("trailer", e))?,
        )),
        rtype::NEXT => {
            Record::Next(serde_json::from_slice(payload).map_err(|e| json_err("next", e))?)
        }
        rtype::WORKLOADS => Record::Workloads(
            serde_json::from_slice(payload).map_err(|e| json_err("workloads", e))?,
        ),
        rtype::COUNTS => Record::Counts(decode_counts(payload).map_err(|e| e.to_string())?),
        t => return Err(format!("unknown record type {t}")),
    })
}

/// Bytes an event takes on disk, frame included.
pub fn event_record_len(e: &Event) -> usize {
    let alen = match e.src {
        Some(IpAddr::V4(_)) => 8,
        Some(IpAddr::V6(_)) => 32,
        None => 0,
    };
    let reply = if e.reply.is_some() && alen > 0 {
        alen + 4
    } else {
        0
    };
    let sample = if e.sample > 1 { 2 } else { 0 };
    FRAME_BYTES + 1 + 24 + alen + reply + 6 + e.packet.bytes().len() + sample
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::model::event::{Kind, Packet};

    pub fn sample_event(i: u64) -> Event {
        let v6 = i % 5 == 4;
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            ("fd77:1::2".parse().unwrap(), "fd77:1::1".parse().unwrap())
        } else {
            (
                IpAddr::V4(Ipv4Addr::new(10, 77, (i % 7) as u8, 2)),
                "10.77.1.1".parse().unwrap(),
            )
        };
        let kind = [Kind::TableFull, Kind::EarlyDrop, Kind::InsertFailed][(i % 3) as usize];
        let packet = if kind == Kind::EarlyDrop {
            Packet::EMPTY
        } else {
            let n = 28 + (i % 60) as usize;
            let bytes: Vec<u8> = (0..n).map(|b| (b as u64 ^ i) as u8).collect();
            Packet::new(&bytes, n as u32 + 100)
        };
        Event {
            kind,
            ts_ns: 1_000_000_000 + i * 1_000,
            cpu: (i % 2) as u32,
            netns: 4026532000 + (i % 3) as u32,
            proto: Proto::UDP,
            src: Some(src),
            dst: Some(dst),
            sport: 20_000 + (i % 1000) as u16,
            dport: 53,
            // Entries (insert_failed) carry their reply tuple: every other
            // one DNATed to a server.
            reply: (kind == Kind::InsertFailed).then(|| crate::model::event::Reply {
                src: if i.is_multiple_of(2) {
                    if v6 {
                        "fd77:2::9".parse().unwrap()
                    } else {
                        "10.77.2.9".parse().unwrap()
                    }
                } else {
                    dst
                },
                sport: if i.is_multiple_of(2) { 8053 } else { 53 },
                dst: src,
                dport: 20_000 + (i % 1000) as u16,
            }),
            packet,
            sample: 1,
        }
    }

    #[test]
    fn events_round_trip() {
        for i in 0..200 {
            let e = sample_event(i);
            let mut buf = Vec::new();
            frame(&mut buf, rtype::EVENT, |o| encode_event(o, &e));
            assert_eq!(buf.len(), event_record_len(&e));
            let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
            assert_eq!(len, buf.len() - FRAME_BYTES);
            let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
            assert_eq!(crc, crc32fast::hash(&buf[8..]));
            assert_eq!(decode_body(&buf[8..]), Ok(Record::Event(e)));
        }
    }

    /// Issue 21: a sampled event keeps its weight through a capture, and
    /// an unsampled one is written as before (no weight bytes).
    #[test]
    fn sampled_events_keep_their_weight() {
        for (i, sample) in [(0, 1), (1, 7), (4, u16::MAX)] {
            let mut e = sample_event(i);
            e.sample = sample;
            let mut buf = Vec::new();
            frame(&mut buf, rtype::EVENT, |o| encode_event(o, &e));
            assert_eq!(buf.len(), event_record_len(&e));
            assert_eq!(buf[8 + 1 + 19] & EVENT_SAMPLED != 0, sample > 1);
            assert_eq!(decode_body(&buf[8..]), Ok(Record::Event(e)));
        }
    }

    /// Issue 21: an interval's exact per-source counts survive a capture
    /// (both families, no address, every kind), and a torn payload is an
    /// error, never a wrong count.
    #[test]
    fn counts_round_trip() {
        let sources: Vec<SourceCount> = Kind::ALL
            .iter()
            .enumerate()
            .map(|(i, &kind)| SourceCount {
                netns: 4026532000 + i as u32,
                kind,
                src: match i % 3 {
                    0 => Some("10.0.0.7".parse().unwrap()),
                    1 => Some("fd77:1::2".parse().unwrap()),
                    _ => None,
                },
                proto: Proto(if i % 2 == 0 { 17 } else { 1 }),
                port: 53 + i as u16,
                count: u64::MAX - i as u64,
            })
            .collect();
        let mut buf = Vec::new();
        frame(&mut buf, rtype::COUNTS, |o| encode_counts(o, &sources, 123));
        let want = IntervalCounts {
            ts_ns: 123,
            sources: sources.clone(),
        };
        assert_eq!(decode_body(&buf[8..]), Ok(Record::Counts(want)));
        let mut payload = Vec::new();
        encode_counts(&mut payload, &sources, 123);
        // Every cut inside the header or the first entry (22 bytes: IPv4).
        for cut in (0..8 + 22).filter(|&c| c != 8) {
            assert!(decode_counts(&payload[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = payload.clone();
        bad[8 + 1] = 9;
        assert_eq!(decode_counts(&bad), Err(EventError::Family(9)));
    }

    /// Format 4: a GC eviction (kind 4, an entry: reply tuple, no packet)
    /// is written and read back like the other evictions.
    #[test]
    fn gc_evict_events_round_trip() {
        let mut e = sample_event(2);
        e.kind = Kind::GcEvict;
        e.packet = Packet::EMPTY;
        let mut buf = Vec::new();
        frame(&mut buf, rtype::EVENT, |o| encode_event(o, &e));
        assert_eq!(buf.len(), event_record_len(&e));
        assert_eq!(buf[8 + 1 + 16], conntrack_trace_common::kind::GC_EVICT);
        assert_eq!(decode_body(&buf[8..]), Ok(Record::Event(e)));
        assert_eq!(
            FORMAT_VERSION, 4,
            "kind 4 needs format 4 (see FORMAT_VERSION)"
        );
    }

    #[test]
    fn event_without_addresses_round_trips() {
        let mut e = sample_event(0);
        e.src = None;
        e.dst = None;
        let mut buf = Vec::new();
        encode_event(&mut buf, &e);
        assert_eq!(decode_event(&buf), Ok(e));
    }

    #[test]
    fn bad_event_payloads_are_errors() {
        let e = sample_event(1);
        let mut buf = Vec::new();
        encode_event(&mut buf, &e);
        for cut in 0..buf.len() {
            assert!(decode_event(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(decode_event(&long), Err(EventError::Trailing(1)));
        let mut fam = buf.clone();
        fam[17] = 9;
        assert_eq!(decode_event(&fam), Err(EventError::Family(9)));
        let mut kind = buf.clone();
        kind[16] = 77;
        assert_eq!(
            decode_event(&kind),
            Err(EventError::Decode(DecodeError::Kind(77)))
        );
        // caplen 0xffff must be refused before it is used as a length.
        let mut cap = Vec::new();
        let mut e2 = sample_event(0);
        e2.packet = Packet::EMPTY;
        encode_event(&mut cap, &e2);
        let n = cap.len();
        cap[n - 2..].copy_from_slice(&0xffffu16.to_le_bytes());
        assert_eq!(decode_event(&cap), Err(EventError::Caplen(0xffff)));
    }

    #[test]
    fn bytes_per_event() {
        // Pinned so a format change is a deliberate decision (README states
        // these numbers): IPv4 UDP table_full with a 28-byte packet, an
        // IPv4 eviction (no packet), IPv6 with a 48-byte packet.
        let mut e = sample_event(0);
        e.packet = Packet::new(&[0; 28], 28);
        assert_eq!(event_record_len(&e), 75);
        e.packet = Packet::EMPTY;
        assert_eq!(event_record_len(&e), 47);
        let mut e6 = sample_event(4);
        e6.packet = Packet::new(&[0; 48], 48);
        assert_eq!(event_record_len(&e6), 119);
    }

    #[test]
    fn recorded_filter_round_trips() {
        let f = Filter {
            netns: Some(7),
            proto: Some(Proto::TCP),
            port: Some(80),
            src: Some("10.0.0.0/8".parse().unwrap()),
        };
        assert_eq!(RecordedFilter::of(&f).to_filter(), Ok(f));
        let bad = RecordedFilter {
            proto: Some("bogus".into()),
            ..Default::default()
        };
        assert!(bad.to_filter().is_err());
    }
}
