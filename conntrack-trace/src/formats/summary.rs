//! The human text of a summary: what `trace` prints at its end and
//! `report` prints of a capture — the same text by construction.

use std::fmt::Write as _;

use crate::{
    formats::text::field,
    model::{AmpSummary, Finding, Name, Summary, TopSource, event::Kind},
};

pub(crate) fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// Findings the human summary lists, most drops first: a flood from
/// many ports can flag thousands of sources, and a summary that scrolls
/// its totals off the screen helps nobody. ndjson and `report --format
/// json` carry every one.
pub const SUMMARY_FINDINGS: usize = 20;

/// The retransmission line and up to `max` findings.
pub fn render_amplification(amp: &AmpSummary, findings: &[Finding], max: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "retransmissions: {} of {} drops ({:.0}%) within {}s",
        amp.retransmissions,
        amp.drops,
        amp.retransmission_share * 100.0,
        amp.window_s
    );
    for f in findings.iter().take(max) {
        let _ = writeln!(s, "{}", f.message);
    }
    if findings.len() > max {
        let _ = writeln!(
            s,
            "... and {} more flagged sources (every one: --format ndjson, report --format json)",
            findings.len() - max
        );
    }
    s
}
/// Says the top sources are a Space-Saving estimate, and how good.
pub(crate) fn approximate_line(bound: u64, untracked: u64) -> String {
    format!(
        "top sources approximate (Space-Saving, error ≤ N/m = {bound}): more sources than the table holds, {untracked} events of replaced ones; a source with more than {bound} events is always kept\n"
    )
}

/// What the counters backend cannot say.
pub(crate) const NO_ATTRIBUTION: &str = "no per-packet attribution with the counters backend (totals from /proc/net/stat/nf_conntrack)\n";

/// Renders the top-sources table; `rates` adds the last interval's rate.
pub fn render_top(top: &[TopSource], rates: bool) -> String {
    let mut s = String::new();
    if top.is_empty() {
        s.push_str("no drops from any source yet\n");
        return s;
    }
    let _ = writeln!(s, "{:<40} {:<12} DROPS", "SOURCE", "PROTO/PORT");
    for t in top {
        let mut kinds = String::new();
        for k in Kind::ALL {
            let n = t.counts.get(k);
            if n > 0 {
                let _ = write!(kinds, "{} {}  ", k.as_str(), n);
            }
        }
        let _ = write!(
            s,
            "{:<40} {:<12} {}",
            t.src.as_deref().unwrap_or("?"),
            t.service,
            kinds.trim_end()
        );
        if let Some(e) = t.error.filter(|e| *e > 0) {
            // The kinds are the events since the source entered the table.
            let _ = write!(s, "  (total {}..{})", t.total.saturating_sub(e), t.total);
        }
        if rates {
            let _ = write!(s, "  {}/s", fmt_rate(t.rate_per_s));
        }
        if let Some(d) = &t.dnat {
            let _ = write!(s, "  (DNAT {d})");
        }
        s.push('\n');
    }
    s
}

/// Renders the final summary.
pub fn render_summary(sum: &Summary) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "== conntrack-trace summary: {:.1}s, backend {}, evictions {}, namespace {} ==",
        sum.duration_s,
        // From the capture's header, for `report`.
        field(&sum.hooks),
        field(&sum.evictions),
        field(&sum.scope.netns)
    );
    for r in &sum.backend_refused {
        let _ = writeln!(s, "  (auto: {})", field(&r.to_string()));
    }
    let _ = writeln!(
        s,
        "{:<15} {:>12} {:>10} {:>10}",
        "", "events", "lost", "observed"
    );
    for k in Kind::FAILURES {
        let _ = writeln!(
            s,
            "{:<15} {:>12} {:>10} {:>10}",
            k.as_str(),
            sum.events.get(k),
            sum.lost.get(k),
            sum.observed.get(k)
        );
    }
    if sum.matched != sum.events {
        let _ = writeln!(
            s,
            "matching filters: table_full {}, early_drop {}, insert_failed {}, gc_evict {}",
            sum.matched.table_full,
            sum.matched.early_drop,
            sum.matched.insert_failed,
            sum.matched.gc_evict
        );
    }
    if sum.backend == Name::Tracepoint {
        let _ = writeln!(
            s,
            "rule drops (not conntrack's): {}",
            sum.observed.rule_drop
        );
    }
    if sum.unclassified_drops > 0 || sum.unmatched_drop_counts > 0 {
        let _ = writeln!(
            s,
            "WARNING: {} drops could not be classified (counted as table_full), {} increments of conntrack's drop counter matched no drop seen (each may have made a rule drop look like table_full)",
            sum.unclassified_drops, sum.unmatched_drop_counts
        );
    }
    let _ = writeln!(
        s,
        "kernel counters ({} namespace(s)): drop {}, early_drop {}, insert_failed {}, clash_resolve {}, chaintoolong {}, invalid {}",
        sum.scope.namespaces,
        sum.kernel.drop,
        sum.kernel.early_drop,
        sum.kernel.insert_failed,
        sum.kernel.clash_resolve,
        sum.kernel.chaintoolong,
        sum.kernel.invalid
    );
    if let Some(line) = sum.scope.uncovered_line() {
        let _ = writeln!(s, "WARNING: {line}");
    }
    if !sum.per_packet {
        let _ = writeln!(
            s,
            "observed = the kernel's counters per kind; no events, no sources"
        );
    } else if !sum.complete {
        let _ = writeln!(
            s,
            "WARNING: events + lost + shed != observed: the event stream is incomplete"
        );
    }
    if sum.shed.total() > 0 {
        let _ = writeln!(
            s,
            "{} drops shed by the event budget (--event-budget: events sampled by flow, the rest counted only)",
            sum.shed.total()
        );
    }
    if sum.lost.total() > 0 {
        let _ = writeln!(
            s,
            "WARNING: {} events lost (ring buffer full; try --ring-size)",
            sum.lost.total()
        );
    }
    if sum.sampled {
        let _ = writeln!(
            s,
            "SAMPLED: top sources are the programs' exact per-source counts ({} sources); amplification and times saw the events that arrived",
            sum.exact_sources
        );
    }
    s.push_str(&render_amplification(
        &sum.amplification,
        &sum.findings,
        SUMMARY_FINDINGS,
    ));
    let _ = writeln!(s);
    if sum.per_packet {
        if let Some(bound) = sum.top_error_bound {
            s.push_str(&approximate_line(bound, sum.untracked_sources));
        }
        s.push_str(&render_top(&sum.top, false));
    } else {
        s.push_str(NO_ATTRIBUTION);
    }
    s
}
