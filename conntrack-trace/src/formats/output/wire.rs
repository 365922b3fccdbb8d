//! The ndjson schema: every line of `trace --format ndjson` and `export
//! --format ndjson` is one [`Line`], tagged by `type`. Documented in
//! README.md ("ndjson schema"); pinned by `every_line_type_is_pinned` in
//! crate::formats::output::ndjson.

use std::net::IpAddr;

use serde::Serialize;

use crate::{
    analysis::forecast::Forecast,
    kernel::workload::NetnsNames,
    model::event::{Event, Kind, Nat, Proto},
    model::{Finding, Summary},
};

/// One ndjson line: the wire schema of `trace --format ndjson` and
/// `export --format ndjson`, tagged by `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line<'a> {
    Event(EventLine<'a>),
    Finding(&'a Finding),
    Forecast(ForecastLine<'a>),
    /// The interval's exact per-source counts (under `--event-budget`).
    Counts(&'a crate::model::IntervalCounts),
    Summary(&'a Summary),
}

/// An event's address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Ipv4,
    Ipv6,
    /// No parsable IP header.
    Unknown,
}

/// The JSON shape of one event.
#[derive(Debug, Serialize)]
pub struct EventLine<'a> {
    pub kind: Kind,
    pub ts_ns: u64,
    pub cpu: u32,
    pub netns: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<&'a str>,
    /// The container / pod owning the namespace (see crate::kernel::workload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a crate::kernel::workload::Container>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<&'a crate::kernel::workload::Pod>,
    pub family: Family,
    // Proto and IpAddr serialize as strings without a per-event allocation.
    pub proto: Proto,
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_id: Option<u16>,
    /// The entry's reply tuple and what NAT did (events with an entry
    /// only; absent on `table_full`, which has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_src: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_dst: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<Nat>,
    /// Drops this event stands for (1 unless `--event-budget` sampled).
    pub sample: u16,
}

impl<'a> EventLine<'a> {
    pub fn new(e: &Event, names: &'a NetnsNames) -> Self {
        let ports = e.proto.has_ports();
        let icmp = e.proto.is_icmp();
        let w = names.workload(e.netns);
        EventLine {
            kind: e.kind,
            ts_ns: e.ts_ns,
            cpu: e.cpu,
            netns: e.netns,
            netns_name: names.get(&e.netns).map(String::as_str),
            container: w.and_then(|w| w.container.as_ref()),
            pod: w.and_then(|w| w.pod.as_ref()),
            family: match e.src {
                Some(IpAddr::V4(_)) => Family::Ipv4,
                Some(IpAddr::V6(_)) => Family::Ipv6,
                None => Family::Unknown,
            },
            proto: e.proto,
            src: e.src,
            dst: e.dst,
            sport: ports.then_some(e.sport),
            dport: ports.then_some(e.dport),
            icmp_type: icmp.then(|| e.icmp_type()),
            icmp_code: icmp.then(|| e.icmp_code()),
            icmp_id: icmp.then(|| e.icmp_id()),
            reply_src: e.reply.map(|r| r.src),
            reply_sport: e.reply.filter(|_| ports).map(|r| r.sport),
            reply_dst: e.reply.map(|r| r.dst),
            reply_dport: e.reply.filter(|_| ports).map(|r| r.dport),
            nat: e.nat(),
            sample: e.sample,
        }
    }
}

impl EventLine<'_> {
    /// Appends `{"type":"event",...}` (without the newline) to `out`: the
    /// bytes `serde_json` writes for `Line::Event(self)`, field for field
    /// (pinned by `hand_written_event_lines_are_serdes`), without its
    /// per-field string escaping and `fmt` calls: the event line is the
    /// one written per dropped packet, and serde's was most of the ndjson
    /// sink's time (issue 15). The rare parts that may need escaping
    /// (names, containers, pods) still go through serde_json.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(b"{\"type\":\"event\",\"kind\":\"");
        out.extend_from_slice(self.kind.as_str().as_bytes());
        out.extend_from_slice(b"\",\"ts_ns\":");
        out.extend_from_slice(n.format(self.ts_ns).as_bytes());
        out.extend_from_slice(b",\"cpu\":");
        out.extend_from_slice(n.format(self.cpu).as_bytes());
        out.extend_from_slice(b",\"netns\":");
        out.extend_from_slice(n.format(self.netns).as_bytes());
        if let Some(name) = self.netns_name {
            out.extend_from_slice(b",\"netns_name\":");
            json_value(out, &name);
        }
        if let Some(c) = self.container {
            out.extend_from_slice(b",\"container\":");
            json_value(out, c);
        }
        if let Some(p) = self.pod {
            out.extend_from_slice(b",\"pod\":");
            json_value(out, p);
        }
        out.extend_from_slice(b",\"family\":\"");
        out.extend_from_slice(match self.family {
            Family::Ipv4 => b"ipv4".as_slice(),
            Family::Ipv6 => b"ipv6",
            Family::Unknown => b"unknown",
        });
        // Protocol names are ASCII letters, digits and '-': no escaping.
        out.extend_from_slice(b"\",\"proto\":\"");
        out.extend_from_slice(self.proto.name().as_bytes());
        out.push(b'"');
        address(out, "src", self.src, true);
        address(out, "dst", self.dst, true);
        let mut num = |key: &str, v: Option<u64>| {
            if let Some(v) = v {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(b"\":");
                out.extend_from_slice(n.format(v).as_bytes());
            }
        };
        num("sport", self.sport.map(u64::from));
        num("dport", self.dport.map(u64::from));
        num("icmp_type", self.icmp_type.map(u64::from));
        num("icmp_code", self.icmp_code.map(u64::from));
        num("icmp_id", self.icmp_id.map(u64::from));
        address(out, "reply_src", self.reply_src, false);
        if let Some(v) = self.reply_sport {
            out.extend_from_slice(b",\"reply_sport\":");
            out.extend_from_slice(n.format(v).as_bytes());
        }
        address(out, "reply_dst", self.reply_dst, false);
        if let Some(v) = self.reply_dport {
            out.extend_from_slice(b",\"reply_dport\":");
            out.extend_from_slice(n.format(v).as_bytes());
        }
        if let Some(nat) = self.nat {
            out.extend_from_slice(b",\"nat\":\"");
            out.extend_from_slice(nat.as_str().as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b",\"sample\":");
        out.extend_from_slice(n.format(self.sample).as_bytes());
        out.push(b'}');
    }
}

/// `,"key":"addr"`, `,"key":null` when `null_if_none`, else nothing. An
/// address's text is digits, hex, '.' and ':': no escaping.
fn address(out: &mut Vec<u8>, key: &str, a: Option<IpAddr>, null_if_none: bool) {
    use std::io::Write as _;
    if a.is_none() && !null_if_none {
        return;
    }
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    match a {
        // Dotted quads by hand (fmt was a fifth of this sink's time);
        // IPv6's compression rules are left to std's Display.
        Some(IpAddr::V4(v4)) => {
            let mut n = itoa::Buffer::new();
            out.push(b'"');
            for (i, o) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(n.format(o).as_bytes());
            }
            out.push(b'"');
        }
        // Writing into a Vec cannot fail.
        Some(a) => {
            let _ = write!(out, "\"{a}\"");
        }
        None => out.extend_from_slice(b"null"),
    }
}

fn json_value(out: &mut Vec<u8>, v: &impl Serialize) {
    // Serialising these types into a Vec cannot fail (no maps with
    // non-string keys, no failing Serialize impls).
    let _ = serde_json::to_writer(&mut *out, v);
}

/// `{"type":"forecast",...}`: a namespace's time to full or to relief,
/// when it changes materially (another trend, or a time that moved by more
/// than 25 % and 2 s): `trend` (`unknown`, `full`, `filling`, `draining`,
/// `steady`), `eta_s` with `eta_low_s`/`eta_high_s` (null = unbounded),
/// the fitted `slope_per_s` and its `slope_stderr`, the fitted `entries`
/// and `max`, `samples`, `span_s`, `insert_per_s`/`expire_per_s` (null
/// when unknown); `count` is the entry count read at this tick, `ts_ns`
/// when (CLOCK_MONOTONIC, as events).
#[derive(Debug, Serialize)]
pub struct ForecastLine<'a> {
    pub ts_ns: u64,
    pub netns: u32,
    pub netns_name: &'a str,
    pub count: u64,
    #[serde(flatten)]
    pub forecast: &'a Forecast,
}
