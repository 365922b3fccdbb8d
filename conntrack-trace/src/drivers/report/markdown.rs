//! `report --format markdown`: for pasting into a postmortem.

use std::fmt::Write as _;

use super::Report;
use crate::{formats::text::field, model::event::Kind};

pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.capture;
    let sum = &r.summary;
    let _ = writeln!(s, "## conntrack drops on {}\n", field(&c.hostname));
    let _ = writeln!(
        s,
        "Recorded by conntrack-trace {} (backend {}, evictions {}) on kernel {}, from {} for {:.1} s, namespace scope `{}`.\n",
        field(&c.tool_version),
        field(&c.backend),
        field(&c.evictions),
        field(&c.kernel_release),
        c.start_utc,
        sum.duration_s,
        field(&sum.scope.netns)
    );
    if !r.filters.is_empty() {
        let _ = writeln!(s, "Report filters: {}.\n", field(&r.filters.join(", ")));
    }
    for w in &r.warnings {
        let _ = writeln!(s, "> **Warning:** {}\n", field(w));
    }
    let _ = writeln!(s, "| kind | events | matching | lost | observed |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for k in Kind::FAILURES {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            k.as_str(),
            sum.events.get(k),
            sum.matched.get(k),
            sum.lost.get(k),
            sum.observed.get(k)
        );
    }
    let kr = &sum.kernel;
    let _ = writeln!(
        s,
        "\nKernel counters over the capture ({} namespace(s)): drop {}, early_drop {}, insert_failed {}, clash_resolve {}, chaintoolong {}, invalid {}.\n",
        sum.scope.namespaces,
        kr.drop,
        kr.early_drop,
        kr.insert_failed,
        kr.clash_resolve,
        kr.chaintoolong,
        kr.invalid
    );
    if let Some(line) = sum.scope.uncovered_line() {
        let _ = writeln!(s, "**Warning:** {line}\n");
    }
    let _ = writeln!(s, "**Check:** {}\n", r.check.verdict);
    let amp = &sum.amplification;
    let _ = writeln!(s, "### Retransmission amplification\n");
    let _ = writeln!(
        s,
        "{} of {} drops ({:.0}%) were retransmissions of a flow dropped within {} s.\n",
        amp.retransmissions,
        amp.drops,
        amp.retransmission_share * 100.0,
        amp.window_s
    );
    if !sum.findings.is_empty() {
        let _ = writeln!(
            s,
            "| source | service | drops | flows | factor | retry interval (median) | first retry | backoff | since (UTC) |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|---|");
        let secs = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |x| format!("{x:.2} s"));
        for f in &sum.findings {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1}x | {} | {} | {} | {} |",
                f.src.as_deref().unwrap_or("?"),
                f.service,
                f.attempts,
                f.flows,
                f.factor,
                secs(f.median_interval_s),
                secs(f.first_retry_s),
                format!("{:?}", f.backoff).to_lowercase(),
                f.since
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "### Top sources\n");
    if sum.top.is_empty() {
        let _ = writeln!(s, "No drops.\n");
    } else {
        if let Some(bound) = sum.top_error_bound {
            let _ = writeln!(
                s,
                "Approximate (Space-Saving, error ≤ N/m = {bound}): more sources than the table holds. A total `a–b` means at least `a` (the kind columns, since the source was tracked), at most `b`.\n"
            );
        }
        let _ = writeln!(
            s,
            "| source | service | table_full | early_drop | insert_failed | gc_evict | total | first (UTC) | last (UTC) |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|---|");
        let clock = crate::model::clock::Clock {
            start_unix_ns: sum.start_unix_ns,
            start_mono_ns: sum.start_mono_ns,
        };
        let wall = |ts: u64| clock.rfc3339(ts);
        for t in &sum.top {
            let total = match t.error.filter(|e| *e > 0) {
                Some(e) => format!("{}–{}", t.total.saturating_sub(e), t.total),
                None => t.total.to_string(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                t.src.as_deref().unwrap_or("?"),
                t.service,
                t.counts.table_full,
                t.counts.early_drop,
                t.counts.insert_failed,
                t.counts.gc_evict,
                total,
                wall(t.first_ts_ns),
                wall(t.last_ts_ns)
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "### Files\n");
    let _ = writeln!(s, "| file | # | bytes | events | ended |");
    let _ = writeln!(s, "|---|---:|---:|---:|---|");
    for f in &r.files {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} |",
            field(&f.path),
            f.seq,
            f.bytes,
            f.events,
            field(&f.ended)
        );
    }
    // Names and the host name come from the capture.
    crate::formats::text::printable(&s).into_owned()
}
