//! Newline-delimited JSON: one `{"type":"event",...}` per event, then one
//! `{"type":"summary",...}`. The schema is documented in README.md.

use std::{io::Write, net::IpAddr};

use serde::Serialize;

use super::{LiveView, NetnsNames, Sink, Summary};
use crate::{
    amplify::Finding,
    event::{Event, Kind, Proto},
};

/// The JSON shape of one event.
#[derive(Debug, Serialize)]
pub struct EventLine<'a> {
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub kind: Kind,
    pub ts_ns: u64,
    pub cpu: u32,
    pub netns: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<&'a str>,
    /// The container / pod owning the namespace (see crate::workload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a crate::workload::Container>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<&'a crate::workload::Pod>,
    /// `ipv4`, `ipv6`, or `unknown` (no parsable IP header).
    pub family: &'static str,
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
    pub nat: Option<&'static str>,
}

impl<'a> EventLine<'a> {
    pub fn new(e: &Event, names: &'a NetnsNames) -> Self {
        let ports = e.proto.has_ports();
        let icmp = e.proto.is_icmp();
        let w = names.workload(e.netns);
        EventLine {
            ty: "event",
            kind: e.kind,
            ts_ns: e.ts_ns,
            cpu: e.cpu,
            netns: e.netns,
            netns_name: names.get(&e.netns).map(String::as_str),
            container: w.and_then(|w| w.container.as_ref()),
            pod: w.and_then(|w| w.pod.as_ref()),
            family: match e.src {
                Some(IpAddr::V4(_)) => "ipv4",
                Some(IpAddr::V6(_)) => "ipv6",
                None => "unknown",
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
            nat: e.nat().map(|n| n.as_str()),
        }
    }
}

/// `{"type":"forecast",...}`: a namespace's time to full or to relief,
/// when it changes materially (another trend, or a time that moved by more
/// than 25 % and 2 s): `trend` (`unknown`, `full`, `filling`, `draining`,
/// `steady`), `eta_s` with `eta_low_s`/`eta_high_s` (null = unbounded),
/// the fitted `slope_per_s` and its `slope_stderr`, the fitted `entries`
/// and `max`, `samples`, `span_s`, `insert_per_s`/`expire_per_s` (null
/// when unknown); `count` is the entry count read at this tick, `ts_ns`
/// when (CLOCK_MONOTONIC, as events).
#[derive(Serialize)]
struct ForecastLine<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    ts_ns: u64,
    netns: u32,
    netns_name: &'a str,
    count: u64,
    #[serde(flatten)]
    forecast: &'a crate::forecast::Forecast,
}

pub struct Ndjson<W: Write> {
    out: W,
}

impl<W: Write> Ndjson<W> {
    pub fn new(out: W) -> Self {
        Ndjson { out }
    }
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Sink for Ndjson<W> {
    fn event(&mut self, e: &Event, names: &NetnsNames) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, &EventLine::new(e, names))?;
        self.out.write_all(b"\n")
    }

    fn finding(&mut self, f: &Finding) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, f)?;
        self.out.write_all(b"\n")
    }

    fn forecast(&mut self, ns: &super::NsView) -> std::io::Result<()> {
        let Some(f) = &ns.forecast else {
            return Ok(());
        };
        let line = ForecastLine {
            ty: "forecast",
            ts_ns: crate::clock::monotonic_ns(),
            netns: ns.inode,
            netns_name: &ns.name,
            count: ns.fill.count,
            forecast: f,
        };
        serde_json::to_writer(&mut self.out, &line)?;
        self.out.write_all(b"\n")
    }

    fn tick(&mut self, _view: &LiveView<'_>) -> std::io::Result<()> {
        // Events are the stream; make them visible to `tail -f` / jq once
        // per interval rather than per line.
        self.out.flush()
    }

    fn finish(&mut self, summary: &Summary) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, summary)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::KindCounts,
        event::Proto,
        kstats::CtStats,
        output::{Scope, Summary},
    };

    fn event(proto: Proto, sport: u16, dport: u16) -> Event {
        Event {
            kind: Kind::TableFull,
            ts_ns: 123,
            cpu: 1,
            netns: 4026532000,
            proto,
            src: Some("10.0.0.7".parse().unwrap()),
            dst: Some("10.0.0.53".parse().unwrap()),
            sport,
            dport,
            reply: None,
            packet: Default::default(),
        }
    }

    #[test]
    fn udp_event_line() {
        let mut names = NetnsNames::new();
        names.insert(4026532000, "srv".into());
        let mut s = Ndjson::new(Vec::new());
        s.event(&event(Proto::UDP, 40001, 53), &names).unwrap();
        let line = String::from_utf8(s.into_inner()).unwrap();
        assert_eq!(
            line,
            r#"{"type":"event","kind":"table_full","ts_ns":123,"cpu":1,"netns":4026532000,"netns_name":"srv","family":"ipv4","proto":"udp","src":"10.0.0.7","dst":"10.0.0.53","sport":40001,"dport":53}"#
                .to_owned()
                + "\n"
        );
    }

    #[test]
    fn zero_ports_are_not_omitted() {
        // pwru's omitempty lesson: a zero is a value, not an absence.
        let mut s = Ndjson::new(Vec::new());
        s.event(&event(Proto::TCP, 0, 0), &NetnsNames::new())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.into_inner()).unwrap();
        assert_eq!(v["sport"], 0);
        assert_eq!(v["dport"], 0);
        assert!(v.get("netns_name").is_none());
    }

    #[test]
    fn icmp_event_has_type_code_id() {
        let mut s = Ndjson::new(Vec::new());
        s.event(&event(Proto::ICMP, 0x22, 8 << 8), &NetnsNames::new())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.into_inner()).unwrap();
        assert_eq!(
            (
                v["icmp_type"].as_u64(),
                v["icmp_code"].as_u64(),
                v["icmp_id"].as_u64()
            ),
            (Some(8), Some(0), Some(0x22))
        );
        assert!(v.get("sport").is_none());
    }

    #[test]
    fn summary_line_is_last_and_typed() {
        let mut s = Ndjson::new(Vec::new());
        let summary = Summary {
            kind: "summary",
            version: "0.1.0".into(),
            backend: "counters".into(),
            hooks: "counters".into(),
            backend_refused: vec![crate::backend::Refusal {
                backend: crate::backend::Name::Fexit,
                reason: "no BTF".into(),
            }],
            per_packet: false,
            evictions: "on".into(),
            duration_s: 1.5,
            start_unix_ns: 1,
            start_mono_ns: 2,
            events: KindCounts {
                table_full: 3,
                ..Default::default()
            },
            matched: KindCounts {
                table_full: 3,
                ..Default::default()
            },
            lost: KindCounts::default(),
            observed: KindCounts {
                table_full: 3,
                ..Default::default()
            },
            complete: true,
            kernel: CtStats {
                drop: 3,
                ..Default::default()
            },
            unclassified_drops: 0,
            unmatched_drop_counts: 0,
            scope: Scope {
                netns: "all".into(),
                netns_inode: None,
                namespaces: 2,
                uncovered: vec![],
            },
            decode_errors: 0,
            top: vec![],
            top_error_bound: None,
            untracked_sources: 0,
            sampled: false,
            exact_sources: 0,
            amplification: crate::amplify::AmpSummary::default(),
            findings: vec![],
        };
        s.finish(&summary).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&s.into_inner()).unwrap();
        assert_eq!(v["type"], "summary");
        assert_eq!(v["events"]["table_full"], 3);
        assert_eq!(v["events"]["early_drop"], 0);
        assert_eq!(v["lost"]["insert_failed"], 0);
        assert_eq!(v["kernel"]["drop"], 3);
        assert_eq!(v["kernel"]["early_drop"], 0);
        assert_eq!(v["complete"], true);
        assert_eq!(v["backend"], "counters");
        assert_eq!(v["per_packet"], false);
        assert_eq!(v["backend_refused"][0]["backend"], "fexit");
        assert_eq!(v["backend_refused"][0]["reason"], "no BTF");
    }
}
