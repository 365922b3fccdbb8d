//! The counters backend: when no BPF program can load, poll the kernel's own
//! statistics (/proc/net/stat/nf_conntrack per namespace in scope) and
//! report totals and rates per kind. No per-packet attribution: no events,
//! no sources — the header and the summary say so.

use std::collections::BTreeMap;

use super::{BpfCounters, Evictions, Options};
use crate::{
    kernel::error::TraceError,
    kernel::kstats::{self, CtStats},
    kernel::netns::Held,
    model::KindCounts,
};

pub struct Counters {
    scope: Vec<Held>,
    start: BTreeMap<u32, CtStats>,
    /// Totals frozen at stop().
    end: Option<KindCounts>,
    pub evictions: Evictions,
    /// Always off: the kernel counts no GC eviction.
    pub gc_evict: Evictions,
}

/// Per-kind totals from deltas of the kernel's counters
/// (net/netfilter/nf_conntrack_core.c): `early_drop` and `insert_failed` are
/// their own stats; `drop` counts allocation failures (table full) and
/// unresolvable clashes, which also count `insert_failed` — but a
/// chain-too-long failure counts `insert_failed` and `chaintoolong`, not
/// `drop`. So table_full = drop − (insert_failed − chaintoolong).
pub fn kinds_from_stats(d: &CtStats) -> KindCounts {
    KindCounts {
        table_full: d
            .drop
            .saturating_sub(d.insert_failed.saturating_sub(d.chaintoolong)),
        early_drop: d.early_drop,
        insert_failed: d.insert_failed,
        rule_drop: 0,
        // gc_worker()'s evictions move no stat (the `early_drop` stat is
        // early_drop()'s alone).
        gc_evict: 0,
    }
}

impl Counters {
    /// Checks that conntrack's statistics can be read in the scope.
    pub fn new(scope: &[Held], opts: &Options) -> Result<Counters, TraceError> {
        if kstats::snapshot(scope).stats.is_empty() {
            return Err(TraceError::Unsupported(
                "no /proc/net/stat/nf_conntrack to poll in the traced namespace(s) (is nf_conntrack loaded?)"
                    .into(),
            ));
        }
        Ok(Counters {
            scope: scope.to_vec(),
            start: BTreeMap::new(),
            end: None,
            evictions: if opts.evictions {
                Evictions::On
            } else {
                Evictions::Off("--evictions off".into())
            },
            gc_evict: Evictions::Off("the kernel counts no GC eviction".into()),
        })
    }

    pub fn start(&mut self) -> Result<(), TraceError> {
        self.start = kstats::snapshot(&self.scope).stats;
        self.end = None;
        Ok(())
    }

    pub fn stop(&mut self) {
        if self.end.is_none() {
            self.end = Some(self.totals());
        }
    }

    fn totals(&self) -> KindCounts {
        let now = kstats::snapshot(&self.scope).stats;
        let mut sum = CtStats::default();
        for (ino, s) in &now {
            if let Some(d) = self.start.get(ino).and_then(|start| s.delta(start)) {
                sum.add(&d);
            }
        }
        let mut k = kinds_from_stats(&sum);
        if !self.evictions.is_on() {
            k.early_drop = 0;
        }
        k
    }

    /// Totals since start (frozen once stopped).
    pub fn counters(&self) -> BpfCounters {
        BpfCounters {
            seen: self.end.unwrap_or_else(|| self.totals()),
            lost: KindCounts::default(),
            shed: KindCounts::default(),
            shed_by_bucket: 0,
            ct_frees: 0,
            unclassified: 0,
            drop_unmatched: 0,
        }
    }

    pub fn describe(&self) -> String {
        "counters (/proc/net/stat/nf_conntrack; totals only, no per-packet attribution)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_kernels_accounting() {
        // 10 table-full drops, 3 unresolvable clashes (drop + insert_failed),
        // 2 chain-too-long (insert_failed + chaintoolong), 4 evictions.
        let d = CtStats {
            drop: 13,
            insert_failed: 5,
            chaintoolong: 2,
            early_drop: 4,
            ..Default::default()
        };
        let k = kinds_from_stats(&d);
        assert_eq!(k.table_full, 10);
        assert_eq!(k.insert_failed, 5);
        assert_eq!(k.early_drop, 4);
        assert_eq!(k.rule_drop, 0);
        // Never negative, whatever the counters say.
        let odd = CtStats {
            drop: 1,
            insert_failed: 9,
            ..Default::default()
        };
        assert_eq!(kinds_from_stats(&odd).table_full, 0);
    }
}
