//! The kernel's own conntrack statistics: /proc/net/stat/nf_conntrack (one
//! row per possible CPU, hex, columns named in the header line; see
//! ct_cpu_seq_show() in net/netfilter/nf_conntrack_standalone.c) and the
//! per-netns entry count / global max.

pub use crate::model::ct::{CtStats, Fill, Uncovered};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatsError {
    #[error("{0}: empty file (is conntrack loaded?)")]
    Empty(String),
    #[error("{path}: line {line}: {msg}")]
    Bad {
        path: String,
        line: usize,
        msg: String,
    },
}

/// Parses the text of /proc/net/stat/nf_conntrack. Columns are found by name
/// because their set changed across kernels (e.g. `clashres`,
/// `chaintoolong`); a column this kernel lacks reads as zero.
pub fn parse(path: &str, text: &str) -> Result<CtStats, StatsError> {
    let c = parse_columns(path, text)?;
    if c.per_cpu("drop").is_none() {
        return Err(StatsError::Bad {
            path: path.to_owned(),
            line: 1,
            msg: "no `drop` column".into(),
        });
    }
    let sum = |name: &str| c.sum(name).unwrap_or(0);
    Ok(CtStats {
        drop: sum("drop"),
        early_drop: sum("early_drop"),
        insert_failed: sum("insert_failed"),
        clash_resolve: sum("clashres"),
        // Printed as `chainlength` (st->chaintoolong) since 5.15
        // (ct_cpu_seq_show(), nf_conntrack_standalone.c).
        chaintoolong: c
            .sum("chaintoolong")
            .or_else(|| c.sum("chainlength"))
            .unwrap_or(0),
        invalid: sum("invalid"),
    })
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Reads count/max/buckets of the calling thread's netns (procfs sysctls are
/// resolved against the current thread's namespace).
pub fn read_fill() -> Option<Fill> {
    Some(Fill {
        count: read_u64("/proc/sys/net/netfilter/nf_conntrack_count")?,
        max: read_u64("/proc/sys/net/netfilter/nf_conntrack_max")?,
        buckets: read_u64("/proc/sys/net/netfilter/nf_conntrack_buckets").unwrap_or(0),
    })
}

/// The kernel counters of a scope at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Counters of every namespace that could be read, by inode.
    pub stats: std::collections::BTreeMap<u32, CtStats>,
    /// Namespaces that could not be read, and why.
    pub missing: Vec<Uncovered>,
}

/// Reads the counters of every namespace in `scope`.
pub fn snapshot(scope: &[crate::kernel::netns::Held]) -> Snapshot {
    let mut snap = Snapshot::default();
    for ns in scope {
        let r = ns
            .run(read_stats)
            .and_then(|r| r.map_err(|e| e.to_string()));
        match r {
            Ok(s) => {
                snap.stats.insert(ns.info.inode, s);
            }
            Err(reason) => snap.missing.push(Uncovered {
                netns: ns.info.name.clone(),
                inode: ns.info.inode,
                reason,
            }),
        }
    }
    snap
}

/// The counters of `end` minus `start` over the namespaces read at both
/// ends, and every namespace that is not in that sum with the reason.
pub fn window(
    scope: &[crate::kernel::netns::Held],
    start: &Snapshot,
    end: &Snapshot,
) -> (CtStats, usize, Vec<Uncovered>) {
    let mut sum = CtStats::default();
    let mut covered = 0;
    let mut uncovered = start.missing.clone();
    for (ino, s) in &start.stats {
        let Some(e) = end.stats.get(ino) else {
            uncovered.extend(end.missing.iter().filter(|m| m.inode == *ino).cloned());
            continue;
        };
        match e.delta(s) {
            Some(d) => {
                sum.add(&d);
                covered += 1;
            }
            None => uncovered.push(Uncovered {
                netns: scope
                    .iter()
                    .find(|h| h.info.inode == *ino)
                    .map_or_else(|| ino.to_string(), |h| h.info.name.clone()),
                inode: *ino,
                reason: "its counters went backwards (reset by the kernel?)".into(),
            }),
        }
    }
    (sum, covered, uncovered)
}

/// Reads the stats of the calling thread's netns.
pub fn read_stats() -> Result<CtStats, StatsError> {
    // thread-self: /proc/self/net follows the thread-group leader's netns,
    // but we read from a helper thread that has setns()'d.
    let path = "/proc/thread-self/net/stat/nf_conntrack";
    let text = std::fs::read_to_string(path).map_err(|e| StatsError::Bad {
        path: path.to_owned(),
        line: 0,
        msg: e.to_string(),
    })?;
    parse(path, &text)
}

/// Every column of /proc/net/stat/nf_conntrack, per CPU (for `doctor`,
/// which shows them all with what each means).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Columns {
    /// Column names as the kernel prints them.
    pub names: Vec<String>,
    /// One row per possible CPU, values in `names` order.
    pub rows: Vec<Vec<u64>>,
}

impl Columns {
    /// The values of one column per CPU (None if this kernel lacks it).
    pub fn per_cpu(&self, name: &str) -> Option<Vec<u64>> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(self.rows.iter().map(|r| r[i]).collect())
    }

    /// The column summed over CPUs (None if this kernel lacks it).
    pub fn sum(&self, name: &str) -> Option<u64> {
        self.per_cpu(name)
            .map(|v| v.iter().fold(0u64, |a, b| a.saturating_add(*b)))
    }
}

/// Parses every column (hex) of /proc/net/stat/nf_conntrack.
pub fn parse_columns(path: &str, text: &str) -> Result<Columns, StatsError> {
    let mut lines = text.lines();
    let names: Vec<String> = lines
        .next()
        .ok_or_else(|| StatsError::Empty(path.to_owned()))?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != names.len() {
            return Err(StatsError::Bad {
                path: path.to_owned(),
                line: i + 2,
                msg: format!("{} fields, header has {}", fields.len(), names.len()),
            });
        }
        let row = fields
            .iter()
            .map(|f| {
                u64::from_str_radix(f, 16).map_err(|e| StatsError::Bad {
                    path: path.to_owned(),
                    line: i + 2,
                    msg: format!("`{f}`: {e}"),
                })
            })
            .collect::<Result<Vec<u64>, _>>()?;
        rows.push(row);
    }
    Ok(Columns { names, rows })
}

/// Reads every column of the calling thread's netns.
pub fn read_columns() -> Result<Columns, StatsError> {
    let path = "/proc/thread-self/net/stat/nf_conntrack";
    let text = std::fs::read_to_string(path).map_err(|e| StatsError::Bad {
        path: path.to_owned(),
        line: 0,
        msg: e.to_string(),
    })?;
    parse_columns(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Header and rows as printed by 6.18 (two CPUs).
    const SAMPLE: &str = "\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000400  00000001 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000003 0000000a 00000010 00000000  00000000 00000000 00000000 00000000
00000400  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 000000f0 00000001 00000000  00000000 00000000 00000000 00000000
";

    #[test]
    fn sums_hex_columns_over_cpus() {
        let s = parse("x", SAMPLE).unwrap();
        assert_eq!(s.drop, 0x0a + 0xf0);
        assert_eq!(s.early_drop, 0x11);
        assert_eq!(s.insert_failed, 4);
        assert_eq!(s.clash_resolve, 1);
        assert_eq!(s.invalid, 2);
        assert_eq!(s.chaintoolong, 0, "chainlength column is zero");
        // 6.18's name for it.
        let six = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop\n\
                   00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000007 00000000 00000000 00000000\n";
        assert_eq!(
            parse("x", six).unwrap().chaintoolong,
            7,
            "chainlength is chaintoolong"
        );
    }

    #[test]
    fn drop_per_cpu_in_row_order() {
        let c = parse_columns("x", SAMPLE).unwrap();
        assert_eq!(c.per_cpu("drop"), Some(vec![0x0a, 0xf0]));
        assert_eq!(c.per_cpu("nope"), None);
    }

    #[test]
    fn older_header_without_clashres() {
        let t = "entries searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error expect_new expect_create expect_delete search_restart\n\
                 00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000005 00000000 00000000 00000000 00000000 00000000 00000000\n";
        assert_eq!(parse("x", t).unwrap().drop, 5);
    }

    #[test]
    fn malformed_rows_name_file_and_line() {
        let t = "entries drop\n00000001 zz\n";
        let e = parse("/proc/x", t).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/proc/x: line 2: `zz`: invalid digit found in string"
        );
        let e = parse("/proc/x", "entries drop\n1 2 3\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(matches!(parse("p", ""), Err(StatsError::Empty(_))));
        assert!(parse("p", "entries foo\n").is_err());
    }

    /// Issue 11 items 8 and 10: what the sum leaves out is named, and a
    /// counter that went backwards is no huge delta.
    #[test]
    fn window_names_what_it_does_not_cover() {
        use Uncovered;
        let own_ino = crate::kernel::netns::own_inode().unwrap();
        let own = crate::kernel::netns::list().remove(&own_ino).unwrap();
        let held = crate::kernel::netns::hold(std::slice::from_ref(&own));
        let read = snapshot(&held);
        assert!(read.missing.iter().all(|m| m.inode != own_ino) || read.stats.is_empty());
        let at = |drop| CtStats {
            drop,
            ..Default::default()
        };
        let skipped = Uncovered {
            netns: "other".into(),
            inode: 7,
            reason: "setns: Operation not permitted (os error 1) (entering a namespace needs CAP_SYS_ADMIN)".into(),
        };
        let start = Snapshot {
            stats: [(own_ino, at(10))].into(),
            missing: vec![skipped.clone()],
        };
        let later = Snapshot {
            stats: [(own_ino, at(25))].into(),
            missing: vec![],
        };
        let (sum, covered, unc) = window(&held, &start, &later);
        assert_eq!((sum.drop, covered), (15, 1));
        assert_eq!(unc, vec![skipped.clone()]);
        let (sum, covered, unc) = window(&held, &later, &start);
        assert_eq!((sum.drop, covered), (0, 0));
        assert_eq!(unc.len(), 1);
        assert_eq!(unc[0].netns, own.name);
        assert!(unc[0].reason.contains("went backwards"), "{unc:?}");
    }

    #[test]
    fn delta_and_fill() {
        let a = CtStats {
            drop: 10,
            early_drop: 1,
            ..Default::default()
        };
        let b = CtStats {
            drop: 25,
            early_drop: 1,
            ..Default::default()
        };
        assert_eq!(b.delta(&a).unwrap().drop, 15);
        assert_eq!(b.delta(&a).unwrap().early_drop, 0);
        // Issue 11 item 10: backwards is no delta, not 2^64 - 15.
        assert_eq!(a.delta(&b), None);
        assert_eq!(
            Fill {
                count: 512,
                max: 1024,
                buckets: 0
            }
            .percent(),
            50.0
        );
        assert_eq!(Fill::default().percent(), 0.0);
    }

    #[test]
    fn every_column_per_cpu() {
        let c = parse_columns("x", SAMPLE).unwrap();
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.per_cpu("drop"), Some(vec![0x0a, 0xf0]));
        assert_eq!(c.sum("early_drop"), Some(0x11));
        assert_eq!(c.sum("search_restart"), Some(0));
        assert_eq!(c.sum("chaintoolong"), None, "absent column");
        assert!(parse_columns("x", "entries drop\n1 zz\n").is_err());
    }
}
