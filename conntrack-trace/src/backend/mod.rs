//! Ways of observing conntrack failures. Every backend yields the same
//! [`crate::event::Event`]s and the same exact counters.

pub mod tracepoint;

use crate::aggregate::KindCounts;

/// Exact in-kernel counters of a backend since it was loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BpfCounters {
    /// Failures observed per kind (emitted or not).
    pub seen: KindCounts,
    /// Events that could not be reserved in the ring buffer.
    pub lost: KindCounts,
    /// nf_conntrack slab frees inspected by the eviction hook.
    pub ct_frees: u64,
}

/// Whether evictions (`early_drop`) are being tracked, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evictions {
    On,
    Off(String),
}

impl Evictions {
    pub fn is_on(&self) -> bool {
        matches!(self, Evictions::On)
    }
    pub fn describe(&self) -> String {
        match self {
            Evictions::On => "on".into(),
            Evictions::Off(why) => format!("off ({why})"),
        }
    }
}
