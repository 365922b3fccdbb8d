//! What an entry costs on this kernel, and what a table size would cost.
//!
//! * the entry itself: the object size of the `nf_conntrack` slab
//!   (/proc/slabinfo, which includes the cache's alignment), else BTF
//!   `sizeof(struct nf_conn)` rounded up to a cache line (the cache is
//!   created with SLAB_HWCACHE_ALIGN, nf_conntrack_init_start());
//! * its extension area: `nf_ct_ext_add()` allocates at least
//!   NF_CT_EXT_PREALLOC = 128 bytes (net/netfilter/nf_conntrack_extend.c)
//!   for entries that carry any extension (accounting, timestamps, events,
//!   helpers, NAT, labels) — counted for every entry, an upper bound;
//! * the hash bucket: one `struct hlist_nulls_head` (a pointer) per
//!   bucket, allocated at once for the whole table (nf_ct_alloc_hashtable()).
//!
//! The table's memory at `max` entries and `buckets` buckets is
//! `max × (object + extension) + buckets × bucket`.

use serde::Serialize;

/// Bytes of the extension area counted per entry (NF_CT_EXT_PREALLOC).
pub const EXT_PREALLOC: u64 = 128;

/// Share of the machine's RAM a proposed table may take at most.
pub const RAM_BUDGET: f64 = 0.05;

/// Headroom over the estimated demand when sizing a table.
pub const HEADROOM: f64 = 1.5;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntryCost {
    /// Bytes of one `struct nf_conn` as allocated.
    pub object_bytes: u64,
    /// `/proc/slabinfo (nf_conntrack objsize)`, `BTF sizeof(struct nf_conn)`
    /// or `assumed`.
    pub object_source: String,
    pub extension_bytes: u64,
    pub bucket_bytes: u64,
}

impl EntryCost {
    /// Per entry, with one bucket per entry (the kernel's default ratio).
    pub fn per_entry(&self) -> u64 {
        self.object_bytes + self.extension_bytes + self.bucket_bytes
    }

    /// Memory of a full table of `max` entries over `buckets` buckets.
    pub fn table_bytes(&self, max: u64, buckets: u64) -> u64 {
        max.saturating_mul(self.object_bytes + self.extension_bytes)
            .saturating_add(buckets.saturating_mul(self.bucket_bytes))
    }
}

/// The `objsize` column of the `nf_conntrack` row of /proc/slabinfo
/// (`name active_objs num_objs objsize objperslab pagesperslab : ...`).
pub fn parse_slabinfo(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == "nf_conntrack").then_some(())?;
        f.nth(2)?.parse().ok()
    })
}

/// Measures the entry cost on this machine.
pub fn measure(btf: Option<&crate::kernel::btf::KernelBtf>) -> EntryCost {
    let bucket_bytes = btf
        .and_then(|b| b.size_of("hlist_nulls_head").ok())
        .map_or(8, |s| s as u64);
    let (object_bytes, object_source) = match std::fs::read_to_string("/proc/slabinfo")
        .ok()
        .as_deref()
        .and_then(parse_slabinfo)
    {
        Some(n) => (n, "/proc/slabinfo (nf_conntrack objsize)".to_owned()),
        None => match btf.and_then(|b| b.size_of("nf_conn").ok()) {
            Some(n) => (
                (n as u64).div_ceil(64) * 64,
                "BTF sizeof(struct nf_conn), cache-line aligned".to_owned(),
            ),
            None => (320, "assumed (no /proc/slabinfo, no BTF)".to_owned()),
        },
    };
    EntryCost {
        object_bytes,
        object_source,
        extension_bytes: EXT_PREALLOC,
        bucket_bytes,
    }
}

/// MemTotal of /proc/meminfo, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

pub fn ram_bytes() -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// A proposed table size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sizing {
    pub max: u64,
    pub buckets: u64,
    /// Memory of the full table.
    pub bytes: u64,
    /// Of the machine's RAM.
    pub ram_share: f64,
    /// The demand it was sized for (entries).
    pub demand: u64,
    /// The memory budget forced it below `HEADROOM × demand`.
    pub capped: bool,
}

/// Sizes the table for `demand` entries: the smallest power of two at or
/// above `HEADROOM × demand` and above `current_max`, buckets one per entry
/// (never fewer than now), within [`RAM_BUDGET`] of `ram`. `Err` says why
/// no raise fits.
pub fn propose(
    current_max: u64,
    current_buckets: u64,
    demand: f64,
    cost: &EntryCost,
    ram: u64,
) -> Result<Sizing, String> {
    propose_within(
        current_max,
        current_buckets,
        demand,
        cost,
        ram,
        &Budget::doctor(ram),
    )
}

/// A memory budget for a full table, and how to name it in a refusal.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub bytes: u64,
    /// `5 % of RAM (23.4 GiB)`, `--autopilot-memory 512MiB`.
    pub what: String,
}

impl Budget {
    /// `doctor`'s: [`RAM_BUDGET`] of `ram`.
    pub fn doctor(ram: u64) -> Budget {
        Budget {
            bytes: (ram as f64 * RAM_BUDGET) as u64,
            what: format!("{:.0} % of RAM ({})", RAM_BUDGET * 100.0, fmt_bytes(ram)),
        }
    }
}

/// [`propose`] within an explicit `budget` (`doctor` uses [`RAM_BUDGET`]
/// of `ram`; the agent's autopilot its `--autopilot-memory`): the one
/// sizing rule both share.
pub fn propose_within(
    current_max: u64,
    current_buckets: u64,
    demand: f64,
    cost: &EntryCost,
    ram: u64,
    budget: &Budget,
) -> Result<Sizing, String> {
    let want = (demand.max(0.0) * HEADROOM).ceil() as u64;
    let mut max = want
        .max(current_max.saturating_add(1))
        .max(1)
        .next_power_of_two();
    let budget_what = &budget.what;
    let budget = budget.bytes;
    let mut capped = false;
    let sized = |m: u64| current_buckets.max(m);
    while cost.table_bytes(max, sized(max)) > budget && max > 1 {
        max /= 2;
        capped = true;
    }
    if max <= current_max {
        return Err(format!(
            "no larger table fits in {budget_what}: {} entries already take {}",
            current_max,
            fmt_bytes(cost.table_bytes(current_max, current_buckets))
        ));
    }
    let buckets = sized(max);
    let bytes = cost.table_bytes(max, buckets);
    Ok(Sizing {
        max,
        buckets,
        bytes,
        ram_share: if ram == 0 {
            0.0
        } else {
            bytes as f64 / ram as f64
        },
        demand: demand.max(0.0).ceil() as u64,
        capped,
    })
}

/// `6.2 MiB`.
pub fn fmt_bytes(b: u64) -> String {
    let f = b as f64;
    if b >= 1 << 30 {
        format!("{:.1} GiB", f / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost() -> EntryCost {
        EntryCost {
            object_bytes: 256,
            object_source: "test".into(),
            extension_bytes: 128,
            bucket_bytes: 8,
        }
    }

    #[test]
    fn slabinfo_and_meminfo() {
        let slab = "slabinfo - version: 2.1\n# name <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>\nnf_conntrack_expect      0      0    208   19    1 : tunables    0    0    0 : slabdata      0      0      0\nnf_conntrack         112    112    256   16    1 : tunables    0    0    0 : slabdata      7      7      0\n";
        assert_eq!(parse_slabinfo(slab), Some(256));
        assert_eq!(parse_slabinfo("nothing\n"), None);
        assert_eq!(
            parse_meminfo("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000 * 1024)
        );
    }

    #[test]
    fn table_memory_arithmetic() {
        let c = cost();
        assert_eq!(c.per_entry(), 392);
        // 262144 entries over 262144 buckets: 262144 × 384 + 262144 × 8.
        assert_eq!(c.table_bytes(262_144, 262_144), 102_760_448);
        assert_eq!(fmt_bytes(102_760_448), "98.0 MiB");
        assert_eq!(fmt_bytes(512), "512 B");
    }

    #[test]
    fn proposals_are_powers_of_two_above_demand_and_memory_bound() {
        let c = cost();
        let ram = 24u64 << 30;
        // Demand 5764 (a flood against max 64): 1.5 × → 8646 → 16384;
        // buckets stay at 262144 (never fewer than now).
        let s = propose(64, 262_144, 5764.0, &c, ram).unwrap();
        assert_eq!((s.max, s.buckets, s.capped), (16_384, 262_144, false));
        assert_eq!(s.bytes, 16_384 * 384 + 262_144 * 8);
        // Demand below the current max still raises (to the next power).
        let s = propose(262_144, 262_144, 1000.0, &c, ram).unwrap();
        assert_eq!((s.max, s.buckets), (524_288, 524_288));
        // A demand too big for 5 % of RAM is capped at what fits.
        let s = propose(262_144, 262_144, 50e6, &c, ram).unwrap();
        assert!(s.capped);
        assert!(s.bytes <= (ram as f64 * RAM_BUDGET) as u64);
        assert!(s.max.is_power_of_two() && s.max > 262_144);
        // Nothing larger fits in a tiny machine.
        let e = propose(262_144, 262_144, 1e6, &c, 64 << 20).unwrap_err();
        assert!(e.contains("no larger table fits"), "{e}");
    }
}
