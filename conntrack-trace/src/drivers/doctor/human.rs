//! `doctor --format human`.

use std::fmt::Write as _;

use super::{Diagnosis, NsReport};
use crate::{analysis::forecast::Trend, drivers::doctor::memory::fmt_bytes, formats::text::field};

/// CPUs listed per counter before `…`.
const CPUS_SHOWN: usize = 8;

fn per_cpu(v: &[u64]) -> String {
    let mut s: Vec<String> = v.iter().take(CPUS_SHOWN).map(u64::to_string).collect();
    if v.len() > CPUS_SHOWN {
        s.push(format!("… {} CPUs", v.len()));
    }
    s.join(" ")
}

fn namespace(s: &mut String, n: &NsReport, duration_s: f64) {
    let _ = writeln!(
        s,
        "\nnamespace {} (inode {}): {}",
        field(&n.netns),
        n.inode,
        super::Status::describe(n.status)
    );
    for r in &n.reasons {
        let _ = writeln!(s, "  - {}", field(r));
    }
    let _ = writeln!(
        s,
        "  entries {} / {} ({:.1} % full), peak {}, {} buckets",
        n.entries, n.max, n.fill_percent, n.peak, n.buckets
    );
    let f = &n.forecast;
    let _ = writeln!(
        s,
        "  forecast: {}{}",
        f.describe(),
        if f.trend == Trend::Unknown {
            String::new()
        } else {
            format!(" [{} samples over {:.1} s]", f.samples, f.span_s)
        }
    );
    if let (Some(i), Some(e)) = (f.insert_per_s, f.expire_per_s) {
        let _ = writeln!(s, "  new entries {i:.1}/s, leaving {e:.1}/s");
    }
    failures(s, n, duration_s);
    counters(s, n);
    holders(s, n);
    victims(s, n);
    let t = &n.timeouts;
    if let Some(u) = t.udp {
        let _ = writeln!(
            s,
            "  timeouts: udp {u} s, udp stream {} s, tcp syn_sent {} s",
            t.udp_stream.map_or("?".into(), |v| v.to_string()),
            t.tcp_syn_sent.map_or("?".into(), |v| v.to_string())
        );
    }
}

/// The failures in the window, with their rates.
fn failures(s: &mut String, n: &NsReport, duration_s: f64) {
    let rate = |n: u64| {
        if duration_s > 0.0 && n > 0 {
            format!(" ({:.0}/s)", n as f64 / duration_s)
        } else {
            String::new()
        }
    };
    let fl = &n.failures;
    let _ = writeln!(
        s,
        "  failures in {duration_s:.1} s: table_full {}{}, early_drop {}{}, insert_failed {}{}",
        fl.table_full,
        rate(fl.table_full),
        fl.early_drop,
        rate(fl.early_drop),
        fl.insert_failed,
        rate(fl.insert_failed)
    );
    // Only when seen: an older capture or the counters backend cannot see
    // them, and a 0 there would claim more than is known.
    if fl.gc_evict > 0 {
        let _ = writeln!(
            s,
            "  evicted by the garbage collector (gc_evict, no kernel counter): {}{}",
            fl.gc_evict,
            rate(fl.gc_evict)
        );
    }
}

/// The kernel's per-CPU counters, with what each means.
fn counters(s: &mut String, n: &NsReport) {
    if n.counters.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "  kernel counters (total, change in the window, per CPU):"
    );
    for c in &n.counters {
        let _ = writeln!(
            s,
            "    {:<15} {:>10} {:>+9}  [{}]  {}",
            c.name,
            c.total,
            c.delta,
            per_cpu(&c.per_cpu_delta),
            c.meaning
        );
    }
}

/// Which entries hold the table (or why that is unknown).
fn holders(s: &mut String, n: &NsReport) {
    match (&n.holders, &n.holders_unavailable) {
        (Some(h), _) => {
            let _ = writeln!(
                s,
                "  what holds the table ({}, {} entries): {}",
                h.source, h.total, h.summary
            );
            for g in h.groups.iter().take(6) {
                let svc = match g.port {
                    Some(p) => format!("{}/{p}", g.proto),
                    None => g.proto.clone(),
                };
                let _ = writeln!(
                    s,
                    "    {svc:<12} {:<12} {:>8}  {:>5.1} %",
                    g.state,
                    g.count,
                    g.share * 100.0
                );
            }
        }
        (None, Some(why)) => {
            let _ = writeln!(s, "  what holds the table: unknown ({})", field(why));
        }
        _ => {}
    }
}

/// The services dropped, most failures first.
fn victims(s: &mut String, n: &NsReport) {
    if n.victims.is_empty() {
        return;
    }
    let _ = writeln!(s, "  dropped services:");
    for v in &n.victims {
        let _ = writeln!(
            s,
            "    {:<12} {:>8} failures from {} source(s){}",
            v.service,
            v.drops,
            v.sources,
            v.top_src
                .as_ref()
                .map(|a| format!(", most from {a}"))
                .unwrap_or_default()
        );
    }
}

pub fn render(d: &Diagnosis) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "conntrack-trace {} doctor — {} on {} (kernel {}), {:.1} s",
        d.version,
        if d.source == "live" {
            "live".to_owned()
        } else {
            format!("capture {}", field(&d.files.join(" ")))
        },
        field(&d.hostname),
        field(&d.kernel_release),
        d.duration_s
    );
    let _ = writeln!(s, "status: {} (exit {})", d.status.describe(), d.exit_code);
    let _ = writeln!(s, "backend: {}", field(&d.backend.hooks));
    for r in &d.backend.refused {
        let _ = writeln!(s, "  refused {}", field(&r.to_string()));
    }
    if !d.backend.not_tried.is_empty() {
        let _ = writeln!(
            s,
            "  not tried (auto keeps the first that attaches): {}",
            d.backend
                .not_tried
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for n in &d.namespaces {
        namespace(&mut s, n, d.duration_s);
    }
    let m = &d.memory;
    let _ = writeln!(
        s,
        "\nmemory: {} B per entry ({} B nf_conn from {} + {} B extensions + {} B bucket); RAM {}; today's limit ({} entries, {} buckets) costs {} when full",
        m.per_entry_bytes,
        m.cost.object_bytes,
        m.cost.object_source,
        m.cost.extension_bytes,
        m.cost.bucket_bytes,
        fmt_bytes(m.ram_bytes),
        m.current_max,
        m.current_buckets,
        fmt_bytes(m.current_bytes)
    );
    if let Some(note) = &m.note {
        let _ = writeln!(s, "  ({})", field(note));
    }
    advice(&mut s, d);
    for w in &d.warnings {
        let _ = writeln!(s, "\nnote: {}", field(w));
    }
    s
}

/// The advice, ranked, with its commands.
fn advice(s: &mut String, d: &Diagnosis) {
    if d.advice.is_empty() {
        let _ = writeln!(s, "\nadvice: none — nothing to change");
    } else {
        let _ = writeln!(s, "\nadvice:");
    }
    for a in &d.advice {
        // Advice names namespaces (any process's `comm`, or names from a
        // capture): each line stays one line.
        let _ = writeln!(s, "{}. [{}] {}", a.rank, a.id, field(&a.title));
        let _ = writeln!(s, "   why:  {}", field(&a.why));
        if !a.cost.is_empty() {
            let _ = writeln!(s, "   cost: {}", field(&a.cost));
        }
        let _ = writeln!(s, "   risk: {}", field(&a.risk));
        if !a.commands.is_empty() {
            let _ = writeln!(s, "   run:");
            for c in &a.commands {
                let _ = writeln!(s, "     {}", field(c));
            }
        }
        for p in &a.persist {
            let _ = writeln!(s, "   persist in {}:", field(&p.file));
            for l in p.content.lines() {
                let _ = writeln!(s, "     | {}", field(l));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KindCounts;
    use crate::{
        analysis::forecast::{Estimator, Sample},
        drivers::doctor::{
            BackendReport, Document, MemoryReport, Settings, Status, Timeouts,
            advice::{self, NsFacts, Place, Victim},
            memory::EntryCost,
            table::{Entry, Tally},
        },
    };

    /// The DNS flood, as the scenario test produces it.
    pub(crate) fn dns_flood() -> Diagnosis {
        let mut est = Estimator::default();
        for i in 0..21 {
            est.push(
                Sample {
                    t_s: i as f64 * 0.25,
                    entries: 64,
                    inserted: Some(1000),
                },
                64,
            );
        }
        let mut t = Tally::default();
        for _ in 0..64 {
            t.add(&Entry {
                proto: 17,
                dport: 53,
                replied: true,
                assured: false,
                tcp_state: None,
            });
        }
        let victims = vec![Victim {
            service: "udp/53".into(),
            proto: "udp".into(),
            port: 53,
            drops: 950,
            sources: 1,
            top_src: Some("10.77.40.2".into()),
        }];
        let cost = EntryCost {
            object_bytes: 256,
            object_source: "/proc/slabinfo (nf_conntrack objsize)".into(),
            extension_bytes: 128,
            bucket_bytes: 8,
        };
        let ns = NsReport {
            netns: "ctt-dd-srv".into(),
            inode: 4026532999,
            exec_prefix: "ip netns exec ctt-dd-srv ".into(),
            entries: 64,
            max: 64,
            buckets: 262_144,
            fill_percent: 100.0,
            peak: 64,
            forecast: est.forecast(),
            status: Status::Dropping,
            reasons: vec![
                "950 packets dropped in the window (table_full 950, insert_failed 0)".into(),
                "fill 100.0 % ≥ 80 %".into(),
                "at the limit (full now)".into(),
            ],
            failures: KindCounts {
                table_full: 950,
                ..Default::default()
            },
            counters: crate::drivers::doctor::counters(
                None,
                &crate::kernel::kstats::parse_columns(
                    "x",
                    "entries drop insert\n00000040 000001db 00000020\n00000040 000001db 00000020\n",
                )
                .unwrap(),
            ),
            holders: Some(t.finish("netlink")),
            holders_unavailable: None,
            victims,
            timeouts: Timeouts {
                udp: Some(30),
                udp_stream: Some(120),
                tcp_syn_sent: Some(120),
            },
        };
        let facts = [NsFacts {
            name: &ns.netns,
            place: Place::Named(ns.netns.clone()),
            entries: 64,
            max: 64,
            buckets: 262_144,
            peak: 64,
            duration_s: 5.0,
            drops: ns.failures,
            victims: &ns.victims,
            holders: ns.holders.as_ref(),
            forecast: Some(&ns.forecast),
            udp_timeout: Some(30),
            tcp_syn_sent_timeout: Some(120),
            troubled: true,
        }];
        let advice = advice::select(
            &facts,
            &cost,
            &advice::Settings {
                horizon_s: 600.0,
                ram: 24 << 30,
            },
        );
        Diagnosis {
            version: "0.1.0".into(),
            source: "live".into(),
            files: Vec::new(),
            hostname: "host".into(),
            kernel_release: "6.18.44".into(),
            backend: BackendReport {
                chosen: "tracepoint".into(),
                hooks: "tracepoint (tp_btf/kfree_skb, tp_btf/kmem_cache_free)".into(),
                refused: vec![crate::model::Refusal {
                    backend: crate::model::Name::Fexit,
                    reason: "kernel refused to load program ct_delete_exit".into(),
                }],
                not_tried: vec!["counters".into()],
                per_packet: true,
            },
            duration_s: 5.0,
            sampled_unix_ns: 1_700_000_000_000_000_000,
            settings: Settings {
                at_risk_fill_percent: 80.0,
                at_risk_within_s: 600.0,
                sample_interval_s: 0.25,
                forecast_window_s: 30.0,
                forecast_min_samples: 5,
            },
            status: Status::Dropping,
            exit_code: 7,
            memory: MemoryReport {
                per_entry_bytes: cost.per_entry(),
                ram_bytes: 24 << 30,
                current_max: 64,
                current_buckets: 262_144,
                current_bytes: cost.table_bytes(64, 262_144),
                budget_share: 0.05,
                cost,
                note: None,
            },
            namespaces: vec![ns],
            advice,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn dns_flood_reads_top_down() {
        let text = render(&dns_flood());
        for want in [
            "status: DROPPING NOW (exit 7)",
            "  refused fexit: kernel refused to load program ct_delete_exit",
            "namespace ctt-dd-srv (inode 4026532999): DROPPING NOW",
            "  - 950 packets dropped in the window (table_full 950, insert_failed 0)",
            "  entries 64 / 64 (100.0 % full), peak 64, 262144 buckets",
            "  forecast: full now [21 samples over 5.0 s]",
            "  failures in 5.0 s: table_full 950 (190/s), early_drop 0, insert_failed 0",
            "    drop                   950      +950  [475 475]  packets dropped",
            "  what holds the table (netlink, 64 entries): 100 % are UDP entries to port 53 that got a reply but are not assured",
            "    udp/53       replied            64  100.0 %",
            "    udp/53            950 failures from 1 source(s), most from 10.77.40.2",
            "memory: 392 B per entry (256 B nf_conn from /proc/slabinfo (nf_conntrack objsize) + 128 B extensions + 8 B bucket)",
            "1. [notrack] exempt DNS (udp/53) from conntrack in ctt-dd-srv (nftables notrack)",
            "     ip netns exec ctt-dd-srv nft add rule inet conntrack_trace notrack_in udp dport 53 notrack",
            "2. [raise_max] raise nf_conntrack_max 64 → 16384",
            "     sysctl -w net.netfilter.nf_conntrack_max=16384",
            "   persist in /etc/sysctl.d/90-conntrack.conf:",
            "     | net.netfilter.nf_conntrack_max = 16384",
            "3. [udp_timeouts] shorten nf_conntrack_udp_timeout 30 s → 10 s in ctt-dd-srv",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn json_has_the_documented_shape() {
        let d = dns_flood();
        let v: serde_json::Value = serde_json::to_value(Document::Doctor(&d)).unwrap();
        assert_eq!(v["type"], "doctor");
        assert_eq!(v["status"], "dropping");
        assert_eq!(v["exit_code"], 7);
        let ns = &v["namespaces"][0];
        assert_eq!(ns["status"], "dropping");
        assert_eq!(ns["victims"][0]["service"], "udp/53");
        assert_eq!(ns["forecast"]["trend"], "full");
        assert_eq!(ns["holders"]["groups"][0]["state"], "replied");
        let a = &v["advice"][0];
        for k in ["id", "rank", "why", "cost", "risk", "commands", "persist"] {
            assert!(!a[k].is_null(), "advice lacks {k}");
        }
        assert_eq!(v["advice"][1]["sizing"]["max"], 16384);
        assert_eq!(v["memory"]["object_bytes"], 256);
        assert!(v["memory"]["per_entry_bytes"].is_u64());
    }

    /// Review of issue 11: names (any process's `comm`, a `/run/netns`
    /// file name, a capture's strings) reach the advice and headings; one
    /// with a newline must not print a line of its own.
    #[test]
    fn a_newline_in_a_name_adds_no_line() {
        const FORGED: &str = "\nWARNING: forged";
        let mut d = dns_flood();
        d.hostname = format!("host{FORGED}");
        d.namespaces[0].netns = format!("srv{FORGED}");
        d.advice[0].title = format!("exempt DNS in srv{FORGED}");
        d.advice[0].commands[0] = format!("ip netns exec 'srv{FORGED}' nft add table inet x");
        d.warnings.push(format!("srv{FORGED}"));
        let text = render(&d);
        let forged: Vec<&str> = text.lines().filter(|l| l.contains("forged")).collect();
        assert_eq!(forged.len(), 5, "{text}");
        for l in forged {
            assert!(l.contains("\\x0aWARNING: forged"), "{l:?} in\n{text}");
        }
    }

    #[test]
    fn healthy_says_nothing_to_change() {
        let mut d = dns_flood();
        d.advice.clear();
        d.status = Status::Healthy;
        d.exit_code = 0;
        let text = render(&d);
        assert!(text.contains("status: healthy (exit 0)"));
        assert!(text.contains("advice: none — nothing to change"));
    }
}
