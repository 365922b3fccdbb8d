//! `report --format human`: capture metadata, the live summary (same
//! renderer as `trace`), the counter check and the busiest seconds.

use std::fmt::Write as _;

use super::{Report, utc};
use crate::{
    formats::{summary::render_summary, text::field},
    model::event::Kind,
};

/// Seconds listed in the timeline excerpt (the busiest ones, in order).
const BUSIEST: usize = 10;

pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.capture;
    let _ = writeln!(
        s,
        "capture of {} (kernel {}), conntrack-trace {}, started {}",
        field(&c.hostname),
        field(&c.kernel_release),
        field(&c.tool_version),
        c.start_utc
    );
    for f in &r.files {
        let _ = writeln!(
            s,
            "  file {} #{}: {} bytes, {} events, {}",
            field(&f.path),
            f.seq,
            f.bytes,
            f.events,
            field(&f.ended)
        );
    }
    for n in &c.conntrack {
        let _ = writeln!(
            s,
            "  conntrack [{}] at start: {} / {} entries ({:.1}% full), {} buckets",
            field(&n.netns),
            n.fill.count,
            n.fill.max,
            n.fill.percent(),
            n.fill.buckets
        );
    }
    if !r.filters.is_empty() {
        let _ = writeln!(s, "  report filters: {}", field(&r.filters.join(", ")));
    }
    for w in &r.warnings {
        let _ = writeln!(s, "WARNING: {}", field(w));
    }
    let _ = writeln!(s);
    s.push_str(&render_summary(&r.summary));
    let _ = writeln!(s);
    let _ = writeln!(s, "check: {}", r.check.verdict);
    let _ = writeln!(s);
    let t = &r.timeline;
    let mut busy: Vec<_> = t.rows.iter().filter(|r| r.counts.total() > 0).collect();
    busy.sort_by(|a, b| {
        b.counts
            .total()
            .cmp(&a.counts.total())
            .then(a.t_s.cmp(&b.t_s))
    });
    busy.truncate(BUSIEST);
    busy.sort_by_key(|r| r.t_s);
    if busy.is_empty() {
        let _ = writeln!(s, "timeline: no drops");
        return s;
    }
    let _ = writeln!(
        s,
        "busiest {} (drops/s; full timeline: --format json or --svg)",
        if t.bucket_s == 1 {
            "seconds".to_owned()
        } else {
            format!("{}-second buckets", t.bucket_s)
        }
    );
    let _ = write!(s, "{:<26}", "TIME (UTC)");
    for k in Kind::FAILURES {
        let _ = write!(s, " {:>13}", k.as_str());
    }
    s.push('\n');
    for row in busy {
        // Saturating: the start time comes from a file and may be hostile.
        let wall = r
            .summary
            .start_unix_ns
            .saturating_add(u128::from(row.t_s) * 1_000_000_000);
        let _ = write!(s, "{:<26}", utc(wall));
        for k in Kind::FAILURES {
            let _ = write!(s, " {:>13.1}", row.counts.get(k) as f64 / t.bucket_s as f64);
        }
        s.push('\n');
    }
    // Names and the host name come from the capture: no control
    // characters reach the reader's terminal.
    crate::formats::text::printable(&s).into_owned()
}
