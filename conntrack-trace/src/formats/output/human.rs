//! The human view: a header redrawn every interval (fill, totals and rates
//! per kind, lost events, top sources), then a final summary.

use std::{fmt::Write as _, io::Write};

use super::{LiveView, NetnsNames, Sink};
use crate::{
    analysis::aggregate::top_sources,
    formats::{
        summary::{
            NO_ATTRIBUTION, approximate_line, fmt_rate, render_amplification, render_summary,
            render_top,
        },
        text::{self, field},
    },
    model::{
        Finding, Summary,
        event::{Event, Kind},
    },
};
#[cfg(test)]
use crate::{formats::summary::SUMMARY_FINDINGS, model::AmpSummary};

pub struct Human<W: Write> {
    out: W,
    /// Redraw in place (a terminal) instead of appending blocks.
    redraw: bool,
    /// Colour the sparkline (a terminal, and NO_COLOR unset).
    colour: bool,
}

impl<W: Write> Human<W> {
    pub fn new(out: W, redraw: bool) -> Self {
        // https://no-color.org: any non-empty NO_COLOR turns colour off.
        let no_colour = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Human {
            out,
            redraw,
            colour: redraw && !no_colour,
        }
    }
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// `, full in ~42 s (30 s–1m10s) at +12.0/s` after a table line, or
/// nothing while there is no forecast (too few samples, steady).
fn forecast_note(ns: &super::NsView) -> String {
    use crate::analysis::forecast::Trend;
    match &ns.forecast {
        Some(f) if matches!(f.trend, Trend::Filling | Trend::Draining | Trend::Full) => {
            format!(", {}", f.describe())
        }
        Some(f) if f.trend == Trend::Steady => ", steady".into(),
        _ => String::new(),
    }
}

/// Renders the live header and top table.
/// Eight levels of a sparkline, lowest first (readable without colour).
const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// One character per interval, scaled to the busiest interval of the
/// window; a blank where nothing failed.
pub fn sparkline(counts: impl Iterator<Item = u64> + Clone) -> String {
    let max = counts.clone().max().unwrap_or(0);
    counts
        .map(|n| {
            if n == 0 || max == 0 {
                ' '
            } else {
                // 1..=max onto 0..=7, the busiest always full height.
                SPARKS[((n * 8).div_ceil(max) - 1).min(7) as usize]
            }
        })
        .collect()
}

/// Prefix of a sparkline line in the header.
const HISTORY: &str = "  last 60s ";

/// The last ~60 s of failures per kind that had any, one line each.
fn render_history(s: &mut String, history: &[crate::model::KindCounts]) {
    for k in Kind::FAILURES {
        if history.iter().all(|c| c.get(k) == 0) {
            continue;
        }
        let line = sparkline(history.iter().map(|c| c.get(k)));
        let _ = writeln!(s, "{HISTORY}{:<13} |{line}|", k.as_str());
    }
}

/// The sparklines coloured by kind (after the text was made printable, so
/// these are the only escape sequences besides the redraw).
fn colour_history(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        let colour = line.strip_prefix(HISTORY).and_then(|rest| {
            let kind = rest.split_whitespace().next()?;
            Some(match kind {
                "table_full" => "\x1b[31m",
                "early_drop" => "\x1b[33m",
                "gc_evict" => "\x1b[34m",
                _ => "\x1b[35m",
            })
        });
        match (colour, line.find('|'), line.rfind('|')) {
            (Some(c), Some(a), Some(b)) if b > a => {
                out.push_str(&line[..=a]);
                out.push_str(c);
                out.push_str(&line[a + 1..b]);
                out.push_str("\x1b[0m");
                out.push_str(&line[b..]);
            }
            _ => out.push_str(line),
        }
    }
    out
}

pub fn render_live(v: &LiveView<'_>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "conntrack-trace {}  backend: {}  evictions: {}  elapsed {:.0}s",
        env!("CARGO_PKG_VERSION"),
        v.backend,
        v.evictions,
        v.elapsed_s
    );
    for r in v.refused {
        let _ = writeln!(s, "  (auto: {r})");
    }
    match v.fills.first() {
        None => {
            let _ = writeln!(s, "conntrack table: (no namespace with conntrack found)");
        }
        Some(ns) => {
            let f = &ns.fill;
            let _ = writeln!(
                s,
                "conntrack table [{}]: {} / {} entries ({:.1}% full), {} buckets{}",
                field(&ns.name),
                f.count,
                f.max,
                f.percent(),
                f.buckets,
                forecast_note(ns)
            );
            for ns in v.fills.iter().skip(1).take(2) {
                let f = &ns.fill;
                let _ = writeln!(
                    s,
                    "              [{}]: {} / {} ({:.1}%){}",
                    field(&ns.name),
                    f.count,
                    f.max,
                    f.percent(),
                    forecast_note(ns)
                );
            }
        }
    }
    render_history(&mut s, v.history);
    let _ = writeln!(
        s,
        "{:<15} {:>12} {:>10} {:>8}",
        "", "total", "rate/s", "lost"
    );
    for k in Kind::FAILURES {
        let _ = writeln!(
            s,
            "{:<15} {:>12} {:>10} {:>8}",
            k.as_str(),
            v.agg.totals.get(k),
            fmt_rate(v.agg.rate(k)),
            v.lost.get(k)
        );
    }
    if v.shed.total() > 0 {
        let shed = Kind::FAILURES
            .iter()
            .filter(|k| v.shed.get(**k) > 0)
            .map(|k| format!("{} {}", k.as_str(), v.shed.get(*k)))
            .collect::<Vec<_>>()
            .join(", ");
        let now = match v.sampling {
            Some(p) => format!("sampling 1/{} (budget {}/s per CPU)", p.denom, p.budget),
            None => "not sampling now".into(),
        };
        let _ = writeln!(s, "{now}; shed so far (counted, not shown): {shed}");
    }
    if let Some(k) = &v.kernel {
        let _ = writeln!(
            s,
            "kernel since start: drop +{}, early_drop +{}, insert_failed +{}, clash_resolve +{}, invalid +{}",
            k.drop, k.early_drop, k.insert_failed, k.clash_resolve, k.invalid
        );
    }
    match v.rule_drops {
        Some(n) => {
            let _ = writeln!(s, "rule drops (not conntrack failures): {n}");
        }
        None => {
            let _ = writeln!(s, "rule drops: not observed by this backend");
        }
    }
    s.push_str(&render_amplification(v.amp, v.findings, 3));
    let _ = writeln!(s);
    if let Some(top) = v.exact_top {
        let _ = writeln!(
            s,
            "(events were lost or shed: counts below are the programs' exact per-source counts)"
        );
        s.push_str(&render_top(top, true));
    } else if v.per_packet {
        if let Some(bound) = v.agg.error_bound() {
            s.push_str(&approximate_line(bound, v.agg.untracked()));
        }
        s.push_str(&render_top(&top_sources(v.agg, v.top_n), true));
    } else {
        s.push_str(NO_ATTRIBUTION);
    }
    s
}

impl<W: Write> Sink for Human<W> {
    fn event(&mut self, _e: &Event, _names: &NetnsNames) -> std::io::Result<()> {
        Ok(())
    }

    fn shows_top(&self) -> bool {
        true
    }

    fn finding(&mut self, _f: &Finding) -> std::io::Result<()> {
        // Shown in the header at each tick and in the summary.
        Ok(())
    }

    fn tick(&mut self, view: &LiveView<'_>) -> std::io::Result<()> {
        let text = render_live(view);
        // Namespace names are any process's `comm`: no control characters
        // reach the terminal but our own redraw.
        let text = text::printable(&text);
        let text = if self.colour {
            colour_history(&text).into()
        } else {
            text
        };
        if self.redraw {
            // Home + clear screen: redraw in place, no terminal mode change
            // to restore on exit.
            write!(self.out, "\x1b[H\x1b[2J{text}")?;
        } else {
            writeln!(self.out, "{text}")?;
        }
        self.out.flush()
    }

    fn finish(&mut self, summary: &Summary) -> std::io::Result<()> {
        if self.redraw {
            write!(self.out, "\x1b[H\x1b[2J")?;
        }
        write!(self.out, "{}", text::printable(&render_summary(summary)))?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{KindCounts, Scope};
    use crate::{
        analysis::aggregate::Aggregator,
        kernel::kstats::{CtStats, Fill},
        model::event::{Event, Proto},
    };

    fn agg() -> Aggregator {
        let mut a = Aggregator::new(100);
        for i in 0..4 {
            a.record(&Event {
                kind: Kind::TableFull,
                ts_ns: i,
                cpu: 0,
                netns: 1,
                proto: Proto::UDP,
                src: Some("10.0.0.7".parse().unwrap()),
                dst: Some("10.0.0.53".parse().unwrap()),
                sport: 40000 + i as u16,
                dport: 53,
                reply: None,
                packet: Default::default(),
                sample: 1,
            });
        }
        a.tick(std::time::Duration::from_secs(2));
        a
    }

    #[test]
    fn live_header_snapshot() {
        let a = agg();
        let fills = vec![crate::formats::output::NsView {
            inode: 1,
            name: "srv".to_owned(),
            fill: Fill {
                count: 512,
                max: 1024,
                buckets: 64,
            },
            forecast: None,
            stats: None,
        }];
        let v = LiveView {
            backend: "tracepoint",
            refused: &[],
            per_packet: true,
            evictions: "on",
            elapsed_s: 2.0,
            fills: &fills,
            history: &[],
            agg: &a,
            lost: KindCounts::default(),
            shed: KindCounts::default(),
            sampling: None,
            rule_drops: Some(0),
            kernel: None,
            top_n: 5,
            exact_top: None,
            findings: &[],
            amp: &AmpSummary {
                drops: 4,
                retransmissions: 1,
                retransmission_share: 0.25,
                window_s: 10.0,
                ..Default::default()
            },
        };
        let text = render_live(&v);
        let expected = [
            format!(
                "conntrack-trace {}  backend: tracepoint  evictions: on  elapsed 2s",
                env!("CARGO_PKG_VERSION")
            ),
            "conntrack table [srv]: 512 / 1024 entries (50.0% full), 64 buckets".into(),
            "                       total     rate/s     lost".into(),
            "table_full                 4        2.0        0".into(),
            "early_drop                 0        0.0        0".into(),
            "insert_failed              0        0.0        0".into(),
            "gc_evict                   0        0.0        0".into(),
            "rule drops (not conntrack failures): 0".into(),
            "retransmissions: 1 of 4 drops (25%) within 10s".into(),
            "".into(),
            "SOURCE                                   PROTO/PORT   DROPS".into(),
            "10.0.0.7                                 udp/53       table_full 4  2.0/s".into(),
            "".into(),
        ]
        .join("\n");
        assert_eq!(text, expected);
    }

    /// Review of issue 11: a namespace name is any process's `comm` or a
    /// `/run/netns` file name, and may hold a newline; it must not add a
    /// line to the header (output/text.rs `field`).
    #[test]
    fn a_newline_in_a_namespace_name_stays_on_its_line() {
        let a = agg();
        let fill = Fill {
            count: 1,
            max: 2,
            buckets: 4,
        };
        let ns = |inode, name: &str| crate::formats::output::NsView {
            inode,
            name: name.to_owned(),
            fill,
            forecast: None,
            stats: None,
        };
        let fills = vec![ns(1, "srv\nWARNING: forged"), ns(2, "b\n")];
        let v = LiveView {
            backend: "tracepoint",
            refused: &[],
            per_packet: true,
            evictions: "on",
            elapsed_s: 2.0,
            fills: &fills,
            history: &[],
            agg: &a,
            lost: KindCounts::default(),
            shed: KindCounts::default(),
            sampling: None,
            rule_drops: Some(0),
            kernel: None,
            top_n: 5,
            exact_top: None,
            findings: &[],
            amp: &AmpSummary::default(),
        };
        let text = render_live(&v);
        assert!(
            text.lines().any(|l| l
                == "conntrack table [srv\\x0aWARNING: forged]: 1 / 2 entries (50.0% full), 4 buckets"),
            "{text}"
        );
        assert!(
            text.contains("              [b\\x0a]: 1 / 2 (50.0%)\n"),
            "{text}"
        );
        assert!(!text.lines().any(|l| l.starts_with("WARNING")), "{text}");
    }

    #[test]
    fn the_summary_lists_the_busiest_findings_and_counts_the_rest() {
        let findings: Vec<Finding> = (0..SUMMARY_FINDINGS as u16 + 5)
            .map(|i| Finding {
                finding: "amplification",
                status: crate::model::FindingStatus::Final,
                src: Some("10.0.0.7".into()),
                proto: "udp".into(),
                port: 1000 + i,
                service: format!("udp/{}", 1000 + i),
                attempts: 10,
                flows: 1,
                retransmissions: 9,
                factor: 10.0,
                median_interval_s: None,
                first_retry_s: None,
                backoff: crate::model::Backoff::Unknown,
                first_ts_ns: 0,
                last_ts_ns: 0,
                since: String::new(),
                message: format!("AMPLIFICATION 10.0.0.7 -> udp/{}", 1000 + i),
            })
            .collect();
        let text = render_amplification(&AmpSummary::default(), &findings, SUMMARY_FINDINGS);
        let shown = text
            .lines()
            .filter(|l| l.starts_with("AMPLIFICATION"))
            .count();
        assert_eq!(shown, SUMMARY_FINDINGS, "{text}");
        assert!(
            text.contains("AMPLIFICATION 10.0.0.7 -> udp/1000\n"),
            "{text}"
        );
        assert!(
            text.contains("... and 5 more flagged sources (every one: --format ndjson"),
            "{text}"
        );
    }

    #[test]
    fn summary_warns_when_incomplete() {
        let a = agg();
        let sum = Summary {
            version: "x".into(),
            backend: "tracepoint".into(),
            hooks: "tracepoint (tp_btf/kfree_skb)".into(),
            backend_refused: vec![crate::model::Refusal {
                backend: crate::model::Name::Fexit,
                reason: "attach refused".into(),
            }],
            per_packet: true,
            evictions: "on".into(),
            duration_s: 3.0,
            start_unix_ns: 0,
            start_mono_ns: 0,
            events: a.totals,
            matched: a.totals,
            lost: KindCounts {
                table_full: 2,
                ..Default::default()
            },
            shed: KindCounts::default(),
            observed: KindCounts {
                table_full: 7,
                ..Default::default()
            },
            complete: false,
            kernel: CtStats {
                drop: 6,
                ..Default::default()
            },
            unclassified_drops: 0,
            unmatched_drop_counts: 0,
            scope: Scope {
                netns: "srv".into(),
                netns_inode: Some(1),
                namespaces: 1,
                uncovered: vec![],
            },
            decode_errors: 0,
            top: top_sources(&a, 3),
            top_error_bound: None,
            untracked_sources: 0,
            sampled: false,
            exact_sources: 0,
            amplification: AmpSummary::default(),
            findings: vec![],
        };
        let text = render_summary(&sum);
        assert!(
            text.contains("table_full                 4          2          7"),
            "{text}"
        );
        assert!(
            text.contains("WARNING: events + lost + shed != observed"),
            "{text}"
        );
        assert!(text.contains("WARNING: 2 events lost"), "{text}");
        assert!(
            text.contains("kernel counters (1 namespace(s)): drop 6"),
            "{text}"
        );
        assert!(text.contains("10.0.0.7"), "{text}");
        assert!(
            text.contains("backend tracepoint (tp_btf/kfree_skb)"),
            "{text}"
        );
        assert!(text.contains("(auto: fexit: attach refused)"), "{text}");
    }

    #[test]
    fn counters_backend_says_it_has_no_sources() {
        let mut a = Aggregator::new(10);
        a.record_totals(&KindCounts {
            table_full: 30,
            ..Default::default()
        });
        a.tick(std::time::Duration::from_secs(3));
        let v = LiveView {
            backend: "counters (totals only)",
            refused: &[],
            per_packet: false,
            evictions: "on",
            elapsed_s: 3.0,
            fills: &[],
            history: &[],
            agg: &a,
            lost: KindCounts::default(),
            shed: KindCounts::default(),
            sampling: None,
            rule_drops: None,
            kernel: None,
            top_n: 5,
            exact_top: None,
            findings: &[],
            amp: &AmpSummary::default(),
        };
        let text = render_live(&v);
        assert!(
            text.contains("table_full                30       10.0        0"),
            "{text}"
        );
        assert!(text.contains("no per-packet attribution"), "{text}");
        assert!(!text.contains("SOURCE"), "{text}");
        assert!(text.contains("rule drops: not observed"), "{text}");
    }

    #[test]
    fn an_overflowed_top_says_it_is_an_estimate() {
        let mut a = Aggregator::new(2);
        for (i, src) in ["10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .enumerate()
        {
            a.record(&Event {
                ts_ns: i as u64,
                src: Some(src.parse().unwrap()),
                ..crate::formats::capture::format::tests::sample_event(0)
            });
        }
        let exact = serde_json::to_value(top_sources(&agg(), 1)).unwrap();
        assert!(exact[0].get("error").is_none(), "{exact}");
        let top = top_sources(&a, 5);
        let json = serde_json::to_value(&top).unwrap();
        assert_eq!(
            (&json[0]["error"], &json[1]["error"]),
            (&0.into(), &1.into())
        );
        // 10.0.0.3 took 10.0.0.2's entry: 1 event of its own, 2 at most.
        let text = render_top(&top, false);
        assert!(text.contains("10.0.0.1"), "{text}");
        assert!(text.contains("table_full 1  (total 1..2)"), "{text}");
        assert_eq!(a.error_bound(), Some(2));
        assert_eq!(
            approximate_line(2, a.untracked()),
            "top sources approximate (Space-Saving, error ≤ N/m = 2): more sources than the table holds, 1 events of replaced ones; a source with more than 2 events is always kept\n"
        );
    }

    #[test]
    fn empty_top_says_so() {
        assert_eq!(render_top(&[], true), "no drops from any source yet\n");
    }

    #[test]
    fn sparkline_scales_to_the_busiest_interval() {
        assert_eq!(sparkline([0u64, 1, 4, 8, 0].into_iter()), " ▁▄█ ");
        assert_eq!(sparkline([0u64, 0].into_iter()), "  ");
        assert_eq!(sparkline([5u64].into_iter()), "█");
    }

    #[test]
    fn history_lines_only_for_kinds_that_failed_and_colour_only_inside_bars() {
        let mut h = vec![KindCounts::default(); 3];
        h[1].table_full = 10;
        h[2].table_full = 5;
        let mut s = String::new();
        render_history(&mut s, &h);
        assert_eq!(s, "  last 60s table_full    | █▄|\n");
        assert_eq!(
            colour_history(&format!("conntrack table [x]\n{s}")),
            "conntrack table [x]\n  last 60s table_full    |\x1b[31m █▄\x1b[0m|\n"
        );
    }

    #[test]
    fn table_line_carries_the_forecast() {
        use crate::analysis::forecast::{Estimator, Sample};
        let mut e = Estimator::default();
        for t in 0..10 {
            e.push(
                Sample {
                    t_s: t as f64,
                    entries: 100 + 10 * t,
                    inserted: None,
                },
                1000,
            );
        }
        let ns = crate::formats::output::NsView {
            inode: 1,
            name: "srv".into(),
            fill: Fill {
                count: 190,
                max: 1000,
                buckets: 64,
            },
            forecast: Some(e.forecast()),
            stats: None,
        };
        let note = forecast_note(&ns);
        assert!(note.starts_with(", full in ~1m21s"), "{note}");
    }

    #[test]
    fn live_header_shows_the_kernel_counters_since_start() {
        let a = agg();
        let k = CtStats {
            drop: 7,
            clash_resolve: 3,
            ..Default::default()
        };
        let v = LiveView {
            backend: "tracepoint",
            refused: &[],
            per_packet: true,
            evictions: "on",
            elapsed_s: 2.0,
            fills: &[],
            history: &[],
            agg: &a,
            lost: KindCounts::default(),
            shed: KindCounts::default(),
            sampling: None,
            rule_drops: Some(0),
            kernel: Some(k),
            top_n: 5,
            exact_top: None,
            findings: &[],
            amp: &AmpSummary::default(),
        };
        let text = render_live(&v);
        assert!(
            text.contains(
                "kernel since start: drop +7, early_drop +0, insert_failed +0, clash_resolve +3, invalid +0"
            ),
            "{text}"
        );
    }

    /// Issue 21: while the budget sheds, the header says so and how much.
    #[test]
    fn live_header_says_when_it_samples() {
        let a = agg();
        let shed = KindCounts {
            table_full: 900,
            ..Default::default()
        };
        let mut v = LiveView {
            backend: "tracepoint",
            refused: &[],
            per_packet: true,
            evictions: "on",
            elapsed_s: 2.0,
            fills: &[],
            history: &[],
            agg: &a,
            lost: KindCounts::default(),
            shed,
            sampling: crate::model::Sampling::of(1000, 100, 900, 50),
            rule_drops: Some(0),
            kernel: None,
            top_n: 5,
            exact_top: None,
            findings: &[],
            amp: &AmpSummary::default(),
        };
        let text = render_live(&v);
        assert!(
            text.contains(
                "sampling 1/10 (budget 50/s per CPU); shed so far (counted, not shown): table_full 900"
            ),
            "{text}"
        );
        v.sampling = None;
        assert!(render_live(&v).contains("not sampling now; shed so far"));
        v.shed = KindCounts::default();
        assert!(
            !render_live(&v).contains("shed so far"),
            "nothing shed, nothing said"
        );
    }
}
