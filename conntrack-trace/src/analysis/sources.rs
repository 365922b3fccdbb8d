//! The bounded table of drop sources that the aggregator and the
//! amplification detector both keep (one type, two values per source).
//!
//! A flood can come from millions of distinct (often spoofed) sources, so
//! the table holds at most `capacity` of them, with the **Space-Saving**
//! policy (Metwally, Agrawal, El Abbadi, "Efficient computation of frequent
//! and top-k elements in data streams", ICDT 2005): a source not in a full
//! table takes over the entry with the smallest count `min`, starting at
//! `min + 1` with `error = min`. Hence, with `N` events recorded and
//! capacity `m`:
//! * every entry's true count lies in `[count - error, count]`;
//! * `error ≤ min ≤ N/m`, so any source with more than `N/m` events is in
//!   the table (a heavy hitter is never lost to the churn of one-off
//!   sources, unlike a first-come table);
//! * while no source was ever replaced, every count is exact (`error` 0).
//!
//! The entries hang off a *stream summary*: one bucket per distinct count,
//! in a doubly linked list sorted by count, each holding its entries in a
//! circular list, oldest first. Counting an event moves its entry to the
//! next bucket and a replacement takes the oldest entry of the smallest
//! bucket: both O(1), no scan or sift per event. Links are `u32` indices
//! into vectors, and the key index is a hash table of entry indices: the
//! key is hashed once per event, and the hash kept in the entry serves
//! removal and rehashing. The hash is foldhash with a per-table random
//! seed: the addresses are the sender's to choose, so the seed is not
//! theirs to know, and SipHash (std's) was a fifth of the consumer's time
//! under a flood (issue 15). The hash only places keys in the index:
//! which source a full table replaces does not depend on it.

use std::{hash::BuildHasher, net::IpAddr};

use foldhash::fast::RandomState;
use hashbrown::HashTable;

use crate::model::event::{Event, Proto};

/// "No entry / no bucket".
const NIL: u32 = u32::MAX;

/// One tracked source.
#[derive(Clone, Debug)]
pub struct Entry<V> {
    key: SourceKey,
    /// `key`'s hash in the index.
    hash: u64,
    count: u64,
    error: u64,
    /// The bucket of `count`, and the neighbours in its circular list.
    bucket: u32,
    prev: u32,
    next: u32,
    /// What the owner keeps about the source since it entered the table
    /// (made afresh when it takes over another source's entry).
    pub value: V,
}

impl<V> Entry<V> {
    pub fn key(&self) -> &SourceKey {
        &self.key
    }

    /// Events counted for the source, including `error`: an upper bound of
    /// its true count.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The count this entry inherited from the source it replaced (0 when
    /// it took a free slot): the true count is at least `count - error`.
    pub fn error(&self) -> u64 {
        self.error
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    count: u64,
    /// Oldest entry (its `prev` is the newest).
    head: u32,
    /// Buckets of the next smaller and larger counts.
    prev: u32,
    next: u32,
}

/// At most `capacity` sources, each with a Space-Saving count and a `V`.
#[derive(Debug)]
pub struct SourceTable<V> {
    entries: Vec<Entry<V>>,
    /// Entry indices, by their key's hash.
    index: HashTable<u32>,
    hasher: RandomState,
    buckets: Vec<Bucket>,
    /// Smallest and largest count's buckets, and a list of unused ones
    /// (chained through `next`).
    min: u32,
    max: u32,
    free: u32,
    capacity: usize,
    /// Events recorded (`N`).
    total: u64,
    /// See [`SourceTable::evicted`].
    evicted: u64,
}

impl<V> SourceTable<V> {
    /// A table of at most `capacity` sources (at least 1; indices are u32,
    /// so at most `u32::MAX - 1`).
    pub fn new(capacity: usize) -> Self {
        SourceTable {
            entries: Vec::new(),
            index: HashTable::new(),
            hasher: RandomState::default(),
            buckets: Vec::new(),
            min: NIL,
            max: NIL,
            free: NIL,
            capacity: capacity.clamp(1, NIL as usize - 1),
            total: 0,
            evicted: 0,
        }
    }

    /// Upper bound of the heap a table of `capacity` sources uses, in bytes:
    /// entries, one bucket per entry (plus one while an entry moves) and the
    /// key index. hashbrown keeps at most 7/8 of its buckets full, bucket
    /// counts being powers of two, with a control byte per bucket and one
    /// group (16) more; replacing sources leaves tombstones, which can make
    /// it double once more before it rehashes in place: at most
    /// 2 × next_power_of_two(⌈8m/7⌉) buckets of a u32 and a control byte.
    pub fn memory_ceiling(capacity: usize) -> usize {
        let m = capacity.clamp(1, NIL as usize - 1);
        let index_buckets = 2 * (m * 8).div_ceil(7).next_power_of_two().max(8);
        m * size_of::<Entry<V>>()
            + (m + 1) * size_of::<Bucket>()
            + index_buckets * (size_of::<u32>() + 1)
            + 16
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Events of sources that were replaced (the sum of their `count -
    /// error`): no entry accounts for them any more except as another's
    /// `error`. 0 while the table never overflowed.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Once a source was replaced: `⌊N/m⌋`, the bound of every entry's
    /// `error` (any source with more events is in the table). None while
    /// every count is exact.
    pub fn error_bound(&self) -> Option<u64> {
        (self.evicted > 0).then(|| self.total / self.capacity as u64)
    }

    pub fn get(&self, key: &SourceKey) -> Option<&Entry<V>> {
        let slot = self.find(self.hasher.hash_one(key), key)?;
        Some(&self.entries[slot as usize])
    }

    pub fn get_mut(&mut self, key: &SourceKey) -> Option<&mut Entry<V>> {
        let slot = self.find(self.hasher.hash_one(key), key)?;
        Some(&mut self.entries[slot as usize])
    }

    fn find(&self, hash: u64, key: &SourceKey) -> Option<u32> {
        let entries = &self.entries;
        let at = |&s: &u32| entries[s as usize].key == *key;
        self.index.find(hash, at).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry<V>> {
        self.entries.iter()
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.iter_mut().map(|e| &mut e.value)
    }

    /// Counts one event of `key`, and returns its entry. A source not in
    /// the table gets `new()`: in a free slot while there is one, else in
    /// the place of the oldest source with the smallest count.
    pub fn record(&mut self, key: SourceKey, new: impl FnOnce() -> V) -> &mut Entry<V> {
        self.total += 1;
        let hash = self.hasher.hash_one(key);
        let slot = match self.find(hash, &key) {
            Some(slot) => {
                self.bump(slot);
                slot
            }
            None if self.entries.len() < self.capacity => self.insert(key, hash, new()),
            None => self.replace(key, hash, new()),
        };
        &mut self.entries[slot as usize]
    }

    /// The `n` entries with the highest counts, highest first; equal counts
    /// by key, so output is stable. Walks the buckets down from the largest
    /// count: O(n) plus the entries of the last bucket it needs.
    pub fn top(&self, n: usize) -> Vec<&Entry<V>> {
        let mut out: Vec<&Entry<V>> = Vec::with_capacity(n.min(self.entries.len()));
        let mut b = self.max;
        while b != NIL && out.len() < n {
            let mut same: Vec<&Entry<V>> = self.members(b).collect();
            let want = n - out.len();
            if want < same.len() {
                same.select_nth_unstable_by_key(want - 1, |e| e.key);
                same.truncate(want);
            }
            same.sort_unstable_by_key(|e| e.key);
            out.extend(same);
            b = self.buckets[b as usize].prev;
        }
        out
    }

    /// Entries of bucket `b`, oldest first.
    fn members(&self, b: u32) -> impl Iterator<Item = &Entry<V>> {
        let head = self.buckets[b as usize].head;
        let mut at = head;
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let e = &self.entries[at as usize];
            at = if e.next == head { NIL } else { e.next };
            Some(e)
        })
    }

    fn insert(&mut self, key: SourceKey, hash: u64, value: V) -> u32 {
        grow(&mut self.entries, self.capacity);
        let slot = self.entries.len() as u32;
        self.entries.push(Entry {
            key,
            hash,
            count: 1,
            error: 0,
            bucket: NIL,
            prev: NIL,
            next: NIL,
            value,
        });
        self.index_insert(hash, slot);
        let b = match self.min {
            m if m != NIL && self.buckets[m as usize].count == 1 => m,
            m => self.new_bucket(1, NIL, m),
        };
        self.push(b, slot);
        slot
    }

    /// Space-Saving: `key` takes over the oldest entry of the smallest
    /// count, inheriting that count as its error.
    fn replace(&mut self, key: SourceKey, hash: u64, value: V) -> u32 {
        let slot = self.buckets[self.min as usize].head;
        let e = &mut self.entries[slot as usize];
        self.evicted += e.count - e.error;
        if let Ok(old) = self.index.find_entry(e.hash, |&s| s == slot) {
            old.remove();
        }
        (e.key, e.hash, e.error, e.value) = (key, hash, e.count, value);
        self.index_insert(hash, slot);
        self.bump(slot);
        slot
    }

    fn index_insert(&mut self, hash: u64, slot: u32) {
        let entries = &self.entries;
        self.index
            .insert_unique(hash, slot, |&s| entries[s as usize].hash);
    }

    /// Moves `slot` from its count's bucket to the next count's.
    fn bump(&mut self, slot: u32) {
        let b = self.entries[slot as usize].bucket;
        let Bucket { count, next, .. } = self.buckets[b as usize];
        let to = if next != NIL && self.buckets[next as usize].count == count + 1 {
            next
        } else {
            self.new_bucket(count + 1, b, next)
        };
        if self.unlink(slot) {
            self.drop_bucket(b);
        }
        self.push(to, slot);
        self.entries[slot as usize].count = count + 1;
    }

    /// Appends `slot` to bucket `b` (as its newest entry).
    fn push(&mut self, b: u32, slot: u32) {
        let head = self.buckets[b as usize].head;
        let (prev, next) = if head == NIL {
            self.buckets[b as usize].head = slot;
            (slot, slot)
        } else {
            let tail = self.entries[head as usize].prev;
            self.entries[tail as usize].next = slot;
            self.entries[head as usize].prev = slot;
            (tail, head)
        };
        let e = &mut self.entries[slot as usize];
        (e.bucket, e.prev, e.next) = (b, prev, next);
    }

    /// Takes `slot` out of its bucket's list; true if that left it empty.
    fn unlink(&mut self, slot: u32) -> bool {
        let Entry {
            bucket, prev, next, ..
        } = self.entries[slot as usize];
        if next == slot {
            self.buckets[bucket as usize].head = NIL;
            return true;
        }
        self.entries[prev as usize].next = next;
        self.entries[next as usize].prev = prev;
        let bk = &mut self.buckets[bucket as usize];
        if bk.head == slot {
            bk.head = next;
        }
        false
    }

    /// A bucket for `count`, linked between `prev` and `next`.
    fn new_bucket(&mut self, count: u64, prev: u32, next: u32) -> u32 {
        let bk = Bucket {
            count,
            head: NIL,
            prev,
            next,
        };
        let id = if self.free == NIL {
            grow(&mut self.buckets, self.capacity + 1);
            self.buckets.push(bk);
            (self.buckets.len() - 1) as u32
        } else {
            let id = self.free;
            self.free = self.buckets[id as usize].next;
            self.buckets[id as usize] = bk;
            id
        };
        match prev {
            NIL => self.min = id,
            p => self.buckets[p as usize].next = id,
        }
        match next {
            NIL => self.max = id,
            n => self.buckets[n as usize].prev = id,
        }
        id
    }

    fn drop_bucket(&mut self, b: u32) {
        let Bucket { prev, next, .. } = self.buckets[b as usize];
        match prev {
            NIL => self.min = next,
            p => self.buckets[p as usize].next = next,
        }
        match next {
            NIL => self.max = prev,
            n => self.buckets[n as usize].prev = prev,
        }
        self.buckets[b as usize].next = self.free;
        self.free = b;
    }
}

/// Makes room for one more element, doubling but never past `max`: the
/// memory ceiling counts `max` elements, not the power of two above it.
fn grow<T>(v: &mut Vec<T>, max: usize) {
    let len = v.len();
    if len == v.capacity() {
        v.reserve_exact((len * 2).max(16).min(max).max(len + 1) - len);
    }
}

/// What the source table counts by: a sender, a protocol and a
/// destination port (the service).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub src: Option<IpAddr>,
    pub proto: Proto,
    /// Destination port, ICMP type, or 0.
    pub port: u16,
}

impl SourceKey {
    pub fn of(e: &Event) -> SourceKey {
        let port = if e.proto.has_ports() {
            e.dport
        } else if e.proto.is_icmp() {
            e.icmp_type() as u16
        } else {
            0
        };
        SourceKey {
            src: e.src,
            proto: e.proto,
            port,
        }
    }

    /// `udp/53`, `icmp/8`, `gre`.
    pub fn service(&self) -> String {
        if self.proto.has_ports() || self.proto.is_icmp() {
            format!("{}/{}", self.proto, self.port)
        } else {
            self.proto.to_string()
        }
    }

    pub fn src_string(&self) -> String {
        self.src.map_or_else(|| "?".to_owned(), |a| a.to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        collections::HashMap,
        net::{IpAddr, Ipv4Addr},
    };

    use super::*;
    use crate::model::event::Proto;

    /// A fixed-seed generator (xorshift64*), so every run sees one stream.
    pub struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    pub fn key(i: u32) -> SourceKey {
        SourceKey {
            src: Some(IpAddr::V4(Ipv4Addr::from(i))),
            proto: Proto::UDP,
            port: 53,
        }
    }

    impl<V> SourceTable<V> {
        /// Checks every link and count; panics on the first broken one.
        fn check(&self) {
            let (mut b, mut prev, mut last) = (self.min, NIL, 0);
            let (mut seen, mut sum) = (0, 0);
            while b != NIL {
                let bk = self.buckets[b as usize];
                assert_eq!(bk.prev, prev);
                assert!(bk.count > last, "buckets ascend");
                assert_ne!(bk.head, NIL, "no empty bucket in the list");
                for e in self.members(b) {
                    assert_eq!(e.hash, self.hasher.hash_one(e.key));
                    let slot = self.find(e.hash, &e.key).expect("indexed");
                    assert_eq!(e.bucket, b);
                    assert_eq!(e.count, bk.count);
                    assert_eq!(self.entries[e.next as usize].prev, slot);
                    seen += 1;
                    sum += e.count;
                }
                (prev, last, b) = (b, bk.count, bk.next);
            }
            assert_eq!(self.max, prev);
            assert_eq!(seen, self.entries.len());
            assert_eq!(self.index.len(), self.entries.len());
            // Every event is in some count: its own or a replacement's error.
            assert_eq!(sum, self.total);
        }
    }

    #[test]
    fn exact_while_distinct_fit() {
        let mut t = SourceTable::<()>::new(100);
        let mut want = HashMap::new();
        let mut rng = Rng(7);
        for _ in 0..10_000 {
            let k = key((rng.next() % 100) as u32);
            t.record(k, || ());
            *want.entry(k).or_insert(0u64) += 1;
        }
        t.check();
        assert_eq!(t.len(), 100);
        assert_eq!(t.error_bound(), None);
        assert_eq!(t.evicted(), 0);
        for e in t.iter() {
            assert_eq!((e.count(), e.error()), (want[e.key()], 0));
        }
        let top = t.top(5);
        let mut best: Vec<_> = want.iter().map(|(k, c)| (*c, *k)).collect();
        best.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let got: Vec<_> = top.iter().map(|e| (e.count(), *e.key())).collect();
        assert_eq!(got, best[..5]);
    }

    #[test]
    fn replacement_takes_the_oldest_smallest_count() {
        let mut t = SourceTable::<u32>::new(3);
        for (k, n) in [(1, 3), (2, 1), (3, 1)] {
            for _ in 0..n {
                t.record(key(k), || k);
            }
        }
        // 2 and 3 share the smallest count; 2 has held it longer.
        let e = t.record(key(4), || 4);
        assert_eq!((e.count(), e.error(), e.value), (2, 1, 4));
        assert!(t.get(&key(2)).is_none());
        assert_eq!(t.evicted(), 1);
        // Now 3 (count 1) is the smallest.
        t.record(key(5), || 5);
        assert!(t.get(&key(3)).is_none());
        assert_eq!(t.get(&key(1)).map(|e| e.count()), Some(3));
        t.check();
        // 4 and 5 both count 2 with error 1: ties listed by key.
        let top: Vec<_> = t.top(3).iter().map(|e| (e.value, e.count())).collect();
        assert_eq!(top, [(1, 3), (4, 2), (5, 2)]);
        // N = 7 events, m = 3 entries.
        assert_eq!(t.error_bound(), Some(2));
    }

    #[test]
    fn heavy_hitters_survive_a_million_singletons() {
        const M: usize = 1000;
        let mut t = SourceTable::<()>::new(M);
        let mut rng = Rng(0x5eed);
        let mut heavy = [0u64; 4];
        let mut n = 0u64;
        // 1 M one-off sources (random, distinct from the heavy ones), and
        // every 50th event from one of four heavy sources: each ends with
        // ~5000 events, well above N/m ≈ 1020.
        for i in 0..1_020_000u64 {
            n += 1;
            if i % 50 == 49 {
                let h = (rng.next() % 4) as usize;
                heavy[h] += 1;
                t.record(key(h as u32), || ());
            } else {
                t.record(
                    key(16 + (rng.next() % (u32::MAX as u64 - 16)) as u32),
                    || (),
                );
            }
        }
        t.check();
        assert_eq!(t.total, n);
        let bound = t.error_bound().expect("the table overflowed");
        assert_eq!(bound, n / M as u64);
        for (h, &true_count) in heavy.iter().enumerate() {
            assert!(true_count > bound, "heavy source {h}: {true_count}");
            let e = t.get(&key(h as u32)).expect("a heavy hitter is kept");
            assert!(e.count() - e.error() <= true_count && true_count <= e.count());
            assert!(e.error() <= bound);
        }
        let mut top: Vec<_> = t.top(4).iter().map(|e| *e.key()).collect();
        top.sort();
        assert_eq!(top, (0..4).map(key).collect::<Vec<_>>());
        for e in t.iter() {
            assert!(e.error() <= bound);
        }
    }

    #[test]
    fn count_bounds_hold_for_every_entry() {
        // A skewed stream over 5000 keys into 200 entries: every entry's
        // true count lies in [count - error, count].
        let mut t = SourceTable::<()>::new(200);
        let mut truth: HashMap<SourceKey, u64> = HashMap::new();
        let mut rng = Rng(99);
        for _ in 0..200_000 {
            let r = rng.next() % 5000;
            let k = key((r * r / 5000) as u32);
            *truth.entry(k).or_default() += 1;
            t.record(k, || ());
        }
        t.check();
        let bound = t.error_bound().expect("overflowed");
        for e in t.iter() {
            let c = truth[e.key()];
            assert!(
                e.count() - e.error() <= c && c <= e.count(),
                "{e:?} true {c}"
            );
        }
        for (k, c) in &truth {
            if *c > bound {
                assert!(t.get(k).is_some(), "{k:?} with {c} > {bound}");
            }
        }
        // What left the table is what the entries no longer hold exactly.
        let held: u64 = t.iter().map(|e| e.count() - e.error()).sum();
        assert_eq!(t.evicted() + held, t.total);
    }

    #[test]
    fn memory_ceiling_holds_under_churn() {
        for m in [1, 7, 1000, 4096] {
            let mut t = SourceTable::<[u64; 4]>::new(m);
            let mut rng = Rng(m as u64);
            for _ in 0..300_000 {
                t.record(key(rng.next() as u32), || [0; 4]);
            }
            t.check();
            assert_eq!(t.len(), m);
            assert!(t.entries.capacity() <= m);
            assert!(t.buckets.capacity() <= m + 1);
            // HashTable::capacity is 7/8 of the buckets (all of them below 8).
            let index_buckets = (t.index.capacity() * 8).div_ceil(7).next_power_of_two();
            let used = t.entries.capacity() * size_of::<Entry<[u64; 4]>>()
                + t.buckets.capacity() * size_of::<Bucket>()
                + index_buckets * (size_of::<u32>() + 1);
            let ceiling = SourceTable::<[u64; 4]>::memory_ceiling(m);
            assert!(used <= ceiling, "m {m}: {used} > {ceiling}");
        }
    }

    #[test]
    fn source_key_is_compact() {
        // Address (17 bytes with its tag), protocol and port: no String.
        assert_eq!(size_of::<SourceKey>(), 20);
    }
}
