//! The kernel's conntrack figures as values: its statistics summed over
//! CPUs, a table's fill, and a namespace the statistics do not cover.
//! Read by [`crate::kernel::kstats`]; carried by summaries, captures and
//! reports.

use serde::{Deserialize, Serialize};

/// Sums over all CPUs of the counters conntrack-trace reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtStats {
    /// Allocation failures and unresolvable clashes (nf_conntrack_in(),
    /// nf_ct_resolve_clash()).
    pub drop: u64,
    /// Entries evicted by early_drop() (and by the gc worker under pressure).
    pub early_drop: u64,
    /// Confirm-time insertion failures (clash or chain too long).
    pub insert_failed: u64,
    /// Clashes resolved without a drop.
    pub clash_resolve: u64,
    /// Chains over the limit (each also counts as insert_failed).
    pub chaintoolong: u64,
    /// Packets conntrack considered invalid.
    pub invalid: u64,
}

impl CtStats {
    /// `self - earlier`, or `None` when a counter went backwards (never a
    /// negative delta wrapped into a huge one).
    pub fn delta(&self, earlier: &CtStats) -> Option<CtStats> {
        Some(CtStats {
            drop: self.drop.checked_sub(earlier.drop)?,
            early_drop: self.early_drop.checked_sub(earlier.early_drop)?,
            insert_failed: self.insert_failed.checked_sub(earlier.insert_failed)?,
            clash_resolve: self.clash_resolve.checked_sub(earlier.clash_resolve)?,
            chaintoolong: self.chaintoolong.checked_sub(earlier.chaintoolong)?,
            invalid: self.invalid.checked_sub(earlier.invalid)?,
        })
    }

    /// Saturating: counters summed from hostile input never overflow.
    pub fn add(&mut self, o: &CtStats) {
        self.drop = self.drop.saturating_add(o.drop);
        self.early_drop = self.early_drop.saturating_add(o.early_drop);
        self.insert_failed = self.insert_failed.saturating_add(o.insert_failed);
        self.clash_resolve = self.clash_resolve.saturating_add(o.clash_resolve);
        self.chaintoolong = self.chaintoolong.saturating_add(o.chaintoolong);
        self.invalid = self.invalid.saturating_add(o.invalid);
    }
}

/// Entry count and limits as seen from the calling thread's netns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fill {
    pub count: u64,
    pub max: u64,
    pub buckets: u64,
}

impl Fill {
    pub fn percent(&self) -> f64 {
        if self.max == 0 {
            0.0
        } else {
            self.count as f64 * 100.0 / self.max as f64
        }
    }
}

/// A namespace the kernel counters do not cover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uncovered {
    pub netns: String,
    pub inode: u32,
    pub reason: String,
}
