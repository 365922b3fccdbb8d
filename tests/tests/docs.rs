//! The documentation kept honest against the code (no root, no kernel):
//! - docs/usage.md has a section per subcommand (`## conntrack-trace SUB`)
//!   naming every flag of that subcommand, from clap's own command tree;
//!   and every `--flag` it mentions exists (in that subcommand, when it
//!   appears in its section);
//! - docs/agent.md names every Prometheus metric the agent serves, and
//!   every metric name it mentions is served. The names come from the
//!   agent's own registry, encoding a snapshot in which every field is set
//!   (built without `..Default::default()`, so a new field breaks this
//!   test until it is set here too).

use std::collections::{BTreeMap, BTreeSet};

use conntrack_trace::{
    docgen,
    drivers::agent::metrics::{self, AmpGauge, Metrics, NsState, Snapshot, WorkloadLabels},
    kernel::kstats::{CtStats, Fill},
    model::KindCounts,
    model::event::Kind,
};

/// A page of docs/, compiled in: the test binary also runs inside the VM
/// matrix, where the source tree is not.
fn doc(name: &str) -> String {
    match name {
        "usage.md" => include_str!("../../docs/usage.md"),
        "agent.md" => include_str!("../../docs/agent.md"),
        other => panic!("docs/{other} is not compiled into this test"),
    }
    .to_owned()
}

/// Long flags (`--x`) of a command, clap's `--help`/`--version` aside.
fn flags(cmd: &clap::Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !matches!(*l, "help" | "version"))
        .map(|l| format!("--{l}"))
        .collect()
}

/// Every `--flag` in `text` (a word starting with two dashes).
fn mentioned(text: &str) -> BTreeSet<String> {
    let mut v = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find("--") {
        let start = i + off;
        let prev_ok = start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'-');
        let mut end = start + 2;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'-')
        {
            end += 1;
        }
        let word = text[start..end].trim_end_matches('-');
        if prev_ok && word.len() > 2 && b[start + 2].is_ascii_lowercase() {
            v.insert(word.to_owned());
        }
        i = end.max(start + 2);
    }
    v
}

/// usage.md's sections: `## conntrack-trace SUB` -> its text.
fn sections(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            cur = h
                .trim()
                .strip_prefix("conntrack-trace ")
                .map(|s| s.trim_matches('`').to_owned());
            continue;
        }
        if let Some(c) = &cur {
            let s: &mut String = m.entry(c.clone()).or_default();
            s.push_str(line);
            s.push('\n');
        }
    }
    m
}

#[test]
fn usage_documents_every_flag_of_every_subcommand() {
    let cmd = docgen::command();
    let text = doc("usage.md");
    let secs = sections(&text);
    let mut missing = Vec::new();
    for sub in docgen::subcommands(&cmd) {
        let name = sub.get_name();
        let Some(sec) = secs.get(name) else {
            missing.push(format!("no section `## conntrack-trace {name}`"));
            continue;
        };
        let said = mentioned(sec);
        for f in flags(sub) {
            if !said.contains(&f) {
                missing.push(format!("{name} {f}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/usage.md does not document: {missing:#?}"
    );
}

#[test]
fn usage_documents_no_flag_that_does_not_exist() {
    let cmd = docgen::command();
    let text = doc("usage.md");
    let mut all: BTreeSet<String> = ["--help", "--version"].map(str::to_owned).into();
    for sub in docgen::subcommands(&cmd) {
        all.extend(flags(sub));
    }
    let mut wrong = Vec::new();
    for (name, sec) in sections(&text) {
        let Some(sub) = docgen::subcommands(&cmd).find(|s| s.get_name() == name) else {
            wrong.push(format!("section `{name}`: no such subcommand"));
            continue;
        };
        let has = flags(sub);
        for f in mentioned(&sec) {
            if !has.contains(&f) && f != "--help" {
                wrong.push(format!("{name} {f}"));
            }
        }
    }
    for f in mentioned(&text) {
        if !all.contains(&f) {
            wrong.push(f);
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/usage.md names flags that do not exist: {wrong:#?}"
    );
}

/// Every field set, so every family the agent can serve is encoded.
fn full_snapshot(per_packet: bool) -> Snapshot {
    let counts = KindCounts {
        table_full: 1,
        early_drop: 1,
        insert_failed: 1,
        rule_drop: 1,
        gc_evict: 1,
    };
    let stats = CtStats {
        drop: 1,
        early_drop: 1,
        insert_failed: 1,
        clash_resolve: 1,
        chaintoolong: 1,
        invalid: 1,
    };
    Snapshot {
        version: "0".into(),
        backend: "tracepoint".into(),
        kernel: "6".into(),
        per_packet,
        drops: [((Kind::TableFull, "srv".to_owned()), 1)].into(),
        drops_total_only: counts,
        lost: counts,
        shed: counts,
        decode_errors: 1,
        sources: vec![(
            ["table_full", "srv", "10.0.0.1", "udp", "53"].map(str::to_owned),
            1,
        )],
        folded: 1,
        series_cap: 1,
        namespaces: [(
            "srv".to_owned(),
            NsState {
                fill: Fill {
                    count: 1,
                    max: 2,
                    buckets: 4,
                },
                stats: Some(stats),
                eta_s: Some(1.0),
            },
        )]
        .into(),
        label_pod: true,
        workloads: [(
            "srv".to_owned(),
            WorkloadLabels {
                pod_namespace: "ns".into(),
                pod_name: "p".into(),
                container_name: "c".into(),
            },
        )]
        .into(),
        amp: vec![AmpGauge {
            src: "10.0.0.1".into(),
            proto: "udp".into(),
            port: 53,
            factor: 4.0,
            retransmission_share: 0.75,
        }],
        findings_opened: 1,
        autopilot: [("raised", 1), ("capped", 1), ("skipped", 1), ("dry_run", 1)].into(),
        cpu_seconds: 1.0,
        rss_bytes: 1,
        start_unix_s: 1.0,
    }
}

/// The sample names the agent serves.
fn served() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for per_packet in [true, false] {
        let m = Metrics(std::sync::Arc::new(std::sync::Mutex::new(full_snapshot(
            per_packet,
        ))));
        let text = metrics::encode(&metrics::registry(&m)).expect("encodes");
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// `conntrack_trace_...` words in `text`.
fn metric_words(text: &str) -> BTreeSet<String> {
    let mut v = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("conntrack_trace_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let word = tail[..end].trim_end_matches('_');
        if word.len() > "conntrack_trace".len() {
            v.insert(word.to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    v
}

#[test]
fn agent_doc_names_every_metric_served() {
    let served = served();
    assert!(served.len() > 20, "{served:?}");
    let text = doc("agent.md");
    let missing: Vec<&String> = served
        .iter()
        .filter(|n| !text.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/agent.md does not document (as `name`): {missing:#?}"
    );
    let stale: Vec<String> = metric_words(&text)
        .into_iter()
        .filter(|w| !served.contains(w))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/agent.md names metrics the agent does not serve: {stale:#?}"
    );
}

/// The checks themselves: what they must catch.
#[test]
fn the_checks_catch_what_they_should() {
    assert_eq!(
        mentioned("use `--top N`, --amp-window, not -x or a--b; --ready-file=PATH."),
        ["--amp-window", "--ready-file", "--top"]
            .map(str::to_owned)
            .into()
    );
    let s = sections("# usage\n## conntrack-trace trace\n--top\n## Exit codes\n--x\n");
    assert_eq!(s.len(), 1);
    assert_eq!(s["trace"], "--top\n");
    assert_eq!(
        metric_words("rate(conntrack_trace_drops_total[5m]) and `grep ^conntrack_trace_`"),
        ["conntrack_trace_drops_total".to_owned()].into()
    );
}
