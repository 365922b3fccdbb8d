//! `report --svg OUT`: drops per second by kind — the picture that goes in
//! the postmortem. Plain SVG 1.1, no scripts, no external resources.

use std::fmt::Write as _;

use super::{Report, utc};
use crate::model::event::Kind;

const W: f64 = 960.0;
const H: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

fn color(k: Kind) -> &'static str {
    match k {
        Kind::TableFull => "#d62728",
        Kind::EarlyDrop => "#ff7f0e",
        Kind::InsertFailed => "#1f77b4",
        Kind::RuleDrop => "#7f7f7f",
        Kind::GcEvict => "#9467bd",
    }
}

/// 1, 2, 5 × 10^n at or above `v`.
fn nice_ceil(v: f64) -> f64 {
    if v <= 1.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

/// Text from the capture, as valid XML (see [`crate::formats::text::xml`]).
fn esc(s: &str) -> String {
    crate::formats::text::xml(s)
}

pub fn render(r: &Report) -> String {
    let t = &r.timeline;
    let bucket = t.bucket_s.max(1) as f64;
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| *k != Kind::RuleDrop || r.summary.matched.rule_drop > 0)
        .collect();
    let peak = t
        .rows
        .iter()
        .flat_map(|row| {
            kinds
                .iter()
                .map(move |k| row.counts.get(*k) as f64 / bucket)
        })
        .fold(0.0, f64::max);
    let ymax = nice_ceil(peak);
    let n = t.rows.len().max(1) as f64;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |i: f64| LEFT + pw * i / n;
    let y = |v: f64| TOP + ph * (1.0 - v / ymax);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">conntrack drops per second on {} (from {})</text>"#,
        esc(&r.capture.hostname),
        esc(&r.capture.start_utc)
    );
    // Grid and y labels.
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        );
    }
    // X labels: five UTC times.
    for i in 0..=4 {
        let frac = f64::from(i) / 4.0;
        let sec = (n * bucket * frac) as u128;
        let wall = r
            .summary
            .start_unix_ns
            .saturating_add(sec.saturating_mul(1_000_000_000));
        let label = utc(wall);
        // Outer labels inside the picture, not clipped at its edges.
        let anchor = match i {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="{anchor}">{}</text>"#,
            x(n * frac),
            H - BOTTOM + 18.0,
            &label[11..19]
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time (UTC){}</text>"#,
        LEFT + pw / 2.0,
        H - BOTTOM + 36.0,
        if t.bucket_s > 1 {
            format!(", {}-second buckets", t.bucket_s)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">drops/s</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    // One step line per kind.
    for k in &kinds {
        let mut pts = String::new();
        for (i, row) in t.rows.iter().enumerate() {
            let v = row.counts.get(*k) as f64 / bucket;
            let _ = write!(
                pts,
                "{:.1},{:.1} {:.1},{:.1} ",
                x(i as f64),
                y(v),
                x(i as f64 + 1.0),
                y(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<polyline class="{}" fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            k.as_str(),
            color(*k),
            pts.trim_end()
        );
    }
    // Legend with totals.
    for (i, k) in kinds.iter().enumerate() {
        let lx = LEFT + 10.0 + i as f64 * 200.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{} ({})</text>"#,
            H - 18.0,
            color(*k),
            lx + 16.0,
            H - 8.0,
            k.as_str(),
            r.summary.matched.get(*k)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axis_maxima() {
        assert_eq!(nice_ceil(0.0), 1.0);
        assert_eq!(nice_ceil(3.0), 5.0);
        assert_eq!(nice_ceil(10.0), 10.0);
        assert_eq!(nice_ceil(11.0), 20.0);
        assert_eq!(nice_ceil(4100.0), 5000.0);
        assert_eq!(esc("a<b&"), "a&lt;b&amp;");
    }
}
