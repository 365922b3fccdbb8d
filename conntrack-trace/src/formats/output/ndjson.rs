//! Newline-delimited JSON: one `{"type":"event",...}` per event, findings
//! and forecasts as they change, then one `{"type":"summary",...}`. Every
//! line is a [`Line`]; the schema is documented in README.md and pinned by
//! `every_line_type_is_pinned` below.

use std::io::Write;

use super::{
    LiveView, NetnsNames, Sink,
    wire::{EventLine, ForecastLine, Line},
};
use crate::model::{Finding, Summary, event::Event};

pub struct Ndjson<W: Write> {
    out: W,
    /// The event line being written (kept: no allocation per event).
    line: Vec<u8>,
}

impl<W: Write> Ndjson<W> {
    pub fn new(out: W) -> Self {
        Ndjson {
            out,
            line: Vec::with_capacity(512),
        }
    }
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Ndjson<W> {
    fn line(&mut self, l: &Line<'_>) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, l)?;
        self.out.write_all(b"\n")
    }
}

impl<W: Write> Sink for Ndjson<W> {
    fn event(&mut self, e: &Event, names: &NetnsNames) -> std::io::Result<()> {
        self.line.clear();
        EventLine::new(e, names).write_json(&mut self.line);
        self.line.push(b'\n');
        self.out.write_all(&self.line)
    }

    fn finding(&mut self, f: &Finding) -> std::io::Result<()> {
        self.line(&Line::Finding(f))
    }

    fn forecast(&mut self, ns: &super::NsView) -> std::io::Result<()> {
        let Some(f) = &ns.forecast else {
            return Ok(());
        };
        let line = ForecastLine {
            ts_ns: crate::model::clock::monotonic_ns(),
            netns: ns.inode,
            netns_name: &ns.name,
            count: ns.fill.count,
            forecast: f,
        };
        self.line(&Line::Forecast(line))
    }

    fn counts(&mut self, c: &crate::model::IntervalCounts) -> std::io::Result<()> {
        self.line(&Line::Counts(c))
    }

    fn tick(&mut self, _view: &LiveView<'_>) -> std::io::Result<()> {
        // Events are the stream; make them visible to `tail -f` / jq once
        // per interval rather than per line.
        self.out.flush()
    }

    fn finish(&mut self, summary: &Summary) -> std::io::Result<()> {
        self.line(&Line::Summary(summary))?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{kernel::kstats::CtStats, model::event::Proto};
    use crate::{
        model::event::Kind,
        model::{KindCounts, Scope},
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
            sample: 1,
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
            r#"{"type":"event","kind":"table_full","ts_ns":123,"cpu":1,"netns":4026532000,"netns_name":"srv","family":"ipv4","proto":"udp","src":"10.0.0.7","dst":"10.0.0.53","sport":40001,"dport":53,"sample":1}"#
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

    /// The hand-written event line is byte for byte what serde_json writes
    /// for `Line::Event`, over every shape an event takes: families,
    /// port and ICMP protocols, an unknown protocol, reply tuples with and
    /// without NAT, names that need escaping, containers and pods.
    #[test]
    fn hand_written_event_lines_are_serdes() {
        use crate::{
            kernel::workload::{Container, Pod, Runtime, Source, Workload},
            model::event::{Packet, Reply},
        };
        let mut names = NetnsNames::new();
        names.insert(1, "srv \"q\"\n\u{7}é".into());
        names.insert(2, "plain".into());
        names.set_workload(
            2,
            Workload {
                container: Some(Container {
                    runtime: Runtime::Docker,
                    id: "ab".repeat(32),
                    name: Some("dns\\1".into()),
                    image: Some("coredns:1".into()),
                    namespace: None,
                    source: Source::Api,
                }),
                pod: Some(Pod {
                    namespace: Some("kube-system".into()),
                    name: Some("coredns-x".into()),
                    uid: "u-1".into(),
                    containers: vec!["coredns".into()],
                    source: Source::Kubelet,
                }),
            },
        );
        let v4: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        let v6: std::net::IpAddr = "fd00::1:2".parse().unwrap();
        let mut n = 0;
        for kind in [
            Kind::TableFull,
            Kind::EarlyDrop,
            Kind::InsertFailed,
            Kind::RuleDrop,
        ] {
            for proto in [
                Proto::UDP,
                Proto::TCP,
                Proto::ICMP,
                Proto(58),
                Proto(47),
                Proto(250),
            ] {
                for (src, dst) in [(Some(v4), Some(v4)), (Some(v6), Some(v6)), (None, None)] {
                    for reply in [
                        None,
                        src.map(|s| Reply {
                            src: dst.unwrap(),
                            sport: 53,
                            dst: s,
                            dport: 40000,
                        }),
                        src.map(|s| Reply {
                            src: "10.9.9.9".parse().unwrap(),
                            sport: 5353,
                            dst: s,
                            dport: 1,
                        }),
                    ] {
                        for netns in [0, 1, 2] {
                            let e = Event {
                                kind,
                                ts_ns: u64::MAX - n,
                                cpu: n as u32,
                                netns,
                                proto,
                                src,
                                dst,
                                sport: 0x2201,
                                dport: (8 << 8) | 3,
                                reply,
                                packet: Packet::EMPTY,
                                sample: 1,
                            };
                            let line = EventLine::new(&e, &names);
                            let mut hand = Vec::new();
                            line.write_json(&mut hand);
                            let serde = serde_json::to_string(&Line::Event(line)).unwrap();
                            assert_eq!(String::from_utf8(hand).unwrap(), serde, "{e:?}");
                            n += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(n, 4 * 6 * 3 * 3 * 3);
    }

    fn sample_summary() -> Summary {
        Summary {
            version: "0.1.0".into(),
            backend: "counters".into(),
            hooks: "counters".into(),
            backend_refused: vec![crate::model::Refusal {
                backend: crate::model::Name::Fexit,
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
            shed: KindCounts::default(),
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
            amplification: crate::model::AmpSummary::default(),
            findings: vec![],
        }
    }

    #[test]
    fn summary_line_is_last_and_typed() {
        let mut s = Ndjson::new(Vec::new());
        let summary = sample_summary();
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

    /// The keys of `line`'s JSON, its `type` first.
    fn keys(line: &[u8]) -> (String, Vec<String>) {
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        let o = v.as_object().unwrap();
        let mut k: Vec<String> = o.keys().cloned().collect();
        k.sort();
        (o["type"].as_str().unwrap().to_owned(), k)
    }

    fn pinned(ty: &str, keys: &str) -> (String, Vec<String>) {
        let mut k: Vec<String> = keys.split_whitespace().map(str::to_owned).collect();
        k.sort();
        (ty.to_owned(), k)
    }

    /// Every line type the stream has, with every field it can carry: a
    /// field added, renamed or dropped fails here first (and must be
    /// documented in README's ndjson schema and tests/src/json.rs).
    #[test]
    fn every_line_type_is_pinned() {
        let mut names = NetnsNames::new();
        names.insert(4026532000, "srv".into());
        let mut e = event(Proto::UDP, 40001, 53);
        e.kind = Kind::InsertFailed;
        e.reply = Some(crate::model::event::Reply {
            src: "10.0.0.9".parse().unwrap(),
            dst: "10.0.0.7".parse().unwrap(),
            sport: 53,
            dport: 40001,
        });
        let mut s = Ndjson::new(Vec::new());
        s.event(&e, &names).unwrap();
        let finding = Finding {
            finding: "amplification",
            status: crate::model::FindingStatus::New,
            src: Some("10.0.0.7".into()),
            proto: "udp".into(),
            port: 53,
            service: "udp/53".into(),
            attempts: 6,
            flows: 2,
            retransmissions: 4,
            factor: 3.0,
            median_interval_s: Some(1.0),
            first_retry_s: Some(1.0),
            backoff: crate::model::Backoff::Constant,
            first_ts_ns: 1,
            last_ts_ns: 2,
            since: "2026-12-01T00:00:00Z".into(),
            message: "m".into(),
        };
        s.finding(&finding).unwrap();
        let forecast = crate::analysis::forecast::Estimator::default().forecast();
        s.forecast(&super::super::NsView {
            inode: 4026532000,
            name: "srv".into(),
            fill: crate::kernel::kstats::Fill {
                count: 1,
                max: 64,
                buckets: 64,
            },
            forecast: Some(forecast),
            stats: None,
        })
        .unwrap();
        let mut summary = sample_summary();
        summary.findings = vec![finding];
        s.finish(&summary).unwrap();
        let out = s.into_inner();
        let lines: Vec<&[u8]> = out
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let got: Vec<_> = lines.iter().map(|l| keys(l)).collect();
        let finding_keys = "type finding status src proto port service attempts flows \
            retransmissions factor median_interval_s first_retry_s backoff first_ts_ns \
            last_ts_ns since message";
        assert_eq!(
            got,
            [
                pinned(
                    "event",
                    "type kind ts_ns cpu netns netns_name family proto src dst sport dport \
                     reply_src reply_sport reply_dst reply_dport nat sample"
                ),
                pinned("finding", finding_keys),
                pinned(
                    "forecast",
                    "type ts_ns netns netns_name count trend eta_s eta_low_s eta_high_s \
                     slope_per_s slope_stderr entries max samples span_s insert_per_s \
                     expire_per_s"
                ),
                pinned(
                    "summary",
                    "type version backend hooks backend_refused per_packet evictions \
                     duration_s start_unix_ns start_mono_ns events matched lost shed observed \
                     complete kernel unclassified_drops unmatched_drop_counts scope \
                     decode_errors top untracked_sources sampled exact_sources \
                     amplification findings"
                ),
            ]
        );
        // Statuses are typed: the wire values are the documented ones.
        let v: serde_json::Value = serde_json::from_slice(lines[0]).unwrap();
        assert_eq!(
            (v["family"].as_str(), v["nat"].as_str()),
            (Some("ipv4"), Some("dnat"))
        );
        let v: serde_json::Value = serde_json::from_slice(lines[3]).unwrap();
        assert_eq!(
            keys(serde_json::to_string(&v["findings"][0]).unwrap().as_bytes()),
            pinned("finding", finding_keys)
        );
        assert_eq!(v["findings"][0]["status"], "new");
        let v: serde_json::Value = serde_json::from_slice(lines[2]).unwrap();
        assert_eq!(v["trend"], "unknown");
    }
}
