//! The binary contract between the kernel programs and user space.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that the byte
//! layout is identical on both sides; `const` assertions pin every size so a
//! field added on one side cannot silently shift the other.
#![no_std]

/// What conntrack did to a packet. Values are the `kind` byte of [`RawEvent`]
/// and the index into the per-kind counters (see [`counter`]).
pub mod kind {
    /// `__nf_conntrack_alloc()` refused a new entry because the netns count
    /// reached `nf_conntrack_max` and `early_drop()` found nothing to evict;
    /// `nf_conntrack_in()` bumped the `drop` stat and returned `NF_DROP`.
    pub const TABLE_FULL: u8 = 0;
    /// `early_drop()` evicted an unassured entry to make room for a new one.
    /// The event describes the *evicted* entry (original direction).
    pub const EARLY_DROP: u8 = 1;
    /// `__nf_conntrack_confirm()` found the tuple already in the table (a
    /// clash between CPUs) and could not resolve it: `insert_failed` stat, the
    /// still-unconfirmed entry stays attached to the dropped skb.
    pub const INSERT_FAILED: u8 = 2;
    /// A packet dropped by a ruleset verdict, not by conntrack: its entry
    /// is confirmed, or it has none and conntrack's `drop` counter did not
    /// move for it (a raw-table rule, `ct state invalid drop`, ...). Not a
    /// conntrack failure: counted, emitted only with `--rule-drops`.
    pub const RULE_DROP: u8 = 3;
    /// conntrack's garbage collector (`gc_worker()`) killed a live entry
    /// it may drop early (unassured, or an L4 tracker's `can_early_drop`)
    /// while the entry's netns held at least 95 % of `nf_conntrack_max`
    /// and an allocation had failed since its last pass
    /// (`conntrack_gc_work.early_drop`). The kernel counts these nowhere.
    /// The event describes the evicted entry (original direction).
    pub const GC_EVICT: u8 = 4;
    /// Number of kinds (size of the per-kind counter groups).
    pub const COUNT: u32 = 5;
}

/// Indices into the `COUNTERS` per-CPU array.
pub mod counter {
    use super::kind;

    /// Packets (or evictions) of `kind` seen by the programs.
    pub const fn seen(kind: u8) -> u32 {
        kind as u32
    }
    /// Events of `kind` that could not be reserved in the ring buffer.
    pub const fn lost(kind: u8) -> u32 {
        kind::COUNT + kind as u32
    }
    /// Drops of `kind` beyond the event budget (`Config::event_budget`):
    /// counted here and in the per-source counts, never emitted. For every
    /// kind, `seen == emitted + lost + shed`.
    pub const fn shed(kind: u8) -> u32 {
        2 * kind::COUNT + kind as u32
    }
    /// nf_conntrack slab frees inspected after the cache pointer was learned
    /// (how hot the eviction hook is).
    pub const CT_FREES: u32 = 3 * kind::COUNT;
    /// Netfilter drops without an entry whose cause the programs could not
    /// establish (the netns's conntrack counters were unreadable, or the
    /// baseline table was full): counted as `table_full`, as before this
    /// classification existed.
    pub const UNCLASSIFIED: u32 = CT_FREES + 1;
    /// Increments of conntrack's per-CPU `drop` counter that no netfilter
    /// drop seen on that CPU accounted for (conntrack run outside
    /// nf_hook_slow(), e.g. by OVS or tc `ct`, or a task migrated between
    /// the increment and the free). Each one could have made a later rule
    /// drop on that CPU look like `table_full`.
    pub const DROP_UNMATCHED: u32 = CT_FREES + 2;
    /// Of the `shed` drops, those whose flow the sampling had selected but
    /// the token bucket refused (a burst beyond the budget before the
    /// sampling rate caught up, or one flow above the budget on its own):
    /// the only shed drops whose flow's other events may have arrived.
    pub const SHED_BY_BUCKET: u32 = CT_FREES + 3;
    /// Number of entries in the `COUNTERS` map.
    pub const LEN: u32 = CT_FREES + 4;
}

/// Layer-3 protocol numbers used in [`RawEvent::l3`] (the IP version).
pub mod l3 {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// One dropped packet or evicted entry, as written into the ring buffer.
///
/// Ports are in host byte order. For ICMP/ICMPv6 `sport` carries the echo id
/// and `dport` carries `type << 8 | code`. IPv4 addresses use the first four
/// bytes of `src`/`dst`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// Inode number of the network namespace (as in `/proc/PID/ns/net`).
    pub netns: u32,
    /// CPU that ran the program.
    pub cpu: u32,
    /// One of [`kind`].
    pub kind: u8,
    /// One of [`l3`], or 0 when the packet had no parsable IP header.
    pub l3: u8,
    /// IANA protocol number (6 tcp, 17 udp, 1 icmp, 58 icmpv6, ...).
    pub l4: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
    pub sport: u16,
    pub dport: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The entry's reply-direction tuple (`has_reply` = 1), for events that
    /// have an entry: behind NAT it names the translated side (a DNAT's
    /// real server in `reply_src`, an SNAT's public address in
    /// `reply_dst`). Same family and port conventions as the original.
    pub reply_src: [u8; 16],
    pub reply_dst: [u8; 16],
    pub reply_sport: u16,
    pub reply_dport: u16,
    pub has_reply: u8,
    /// Explicit padding; always zero.
    pub _pad3: [u8; 3],
    /// Bytes of `pkt` that hold the dropped packet, from its network header
    /// on; 0 when the hook had no packet (evictions) or could not read it.
    pub caplen: u16,
    /// Sampling weight: this event stands for `sample_denom` drops of its
    /// kind (the programs were keeping one flow in `sample_denom`, see
    /// `Config::event_budget`); 1 while every drop is an event. 0 in records
    /// written before the field existed (the bytes were padding): read it
    /// as 1 ([`RawEvent::weight`]).
    pub sample_denom: u16,
    /// Length of the whole packet from its network header on (what a
    /// capture file calls the original length).
    pub wire_len: u32,
    /// The first [`PKT_BYTES`] bytes of the packet (only `caplen` are valid).
    pub pkt: [u8; PKT_BYTES],
}

/// Packet bytes kept per event: an IPv6 header (40) plus a TCP header with
/// options (up to 60) would need 100; 96 keeps the record a multiple of 8
/// and covers every IPv4 header with TCP options and IPv6 + UDP/ICMPv6 + 48.
pub const PKT_BYTES: usize = 96;

const _: () = assert!(core::mem::size_of::<RawEvent>() == 104 + PKT_BYTES);

impl RawEvent {
    /// How many drops of its kind this event stands for (see
    /// [`RawEvent::sample_denom`]).
    pub const fn weight(&self) -> u16 {
        if self.sample_denom == 0 {
            1
        } else {
            self.sample_denom
        }
    }

    pub const fn zeroed() -> Self {
        RawEvent {
            ts_ns: 0,
            netns: 0,
            cpu: 0,
            kind: 0,
            l3: 0,
            l4: 0,
            _pad: 0,
            sport: 0,
            dport: 0,
            src: [0; 16],
            dst: [0; 16],
            reply_src: [0; 16],
            reply_dst: [0; 16],
            reply_sport: 0,
            reply_dport: 0,
            has_reply: 0,
            _pad3: [0; 3],
            caplen: 0,
            sample_denom: 0,
            wire_len: 0,
            pkt: [0; PKT_BYTES],
        }
    }
}

/// Key of the kernel's exact per-source counts (`SOURCE_COUNTS`): every
/// emitted event is counted under it before the ring is tried, so the
/// counts stay exact when the ring overflows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub netns: u32,
    /// One of [`kind`].
    pub kind: u8,
    /// One of [`l3`], or 0.
    pub l3: u8,
    pub l4: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
    /// The event's `dport` (ICMP: `type << 8 | code`).
    pub dport: u16,
    /// Explicit padding; always zero.
    pub _pad2: u16,
    pub src: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<SourceKey>() == 28);

/// Entries of `SOURCE_COUNTS` (least recently dropped first out).
pub const SOURCE_COUNTS_MAX: u32 = 65_536;

/// Byte offsets of kernel struct members, resolved from the running kernel's
/// BTF by user space and written into the programs' read-only globals (Rust
/// has no CO-RE relocations). Every field is a plain offset from the start of
/// the named struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `sk_buff._nfct` (ct pointer | ctinfo).
    pub skb_nfct: u32,
    /// `sk_buff.head`.
    pub skb_head: u32,
    /// `sk_buff.network_header` (u16 offset from head).
    pub skb_network_header: u32,
    /// `sk_buff.dev`.
    pub skb_dev: u32,
    /// `sk_buff.sk`.
    pub skb_sk: u32,
    /// `net_device.nd_net.net`.
    pub dev_net: u32,
    /// `sock.__sk_common.skc_net.net`.
    pub sk_net: u32,
    /// `net.ns.inum`.
    pub net_inum: u32,
    /// `nf_conn.status`.
    pub ct_status: u32,
    /// `nf_conn.ct_net.net`.
    pub ct_net: u32,
    /// `nf_conn.tuplehash[IP_CT_DIR_ORIGINAL].tuple`.
    pub ct_tuple: u32,
    /// `nf_conntrack_tuple.src.u3`.
    pub tuple_src_u3: u32,
    /// `nf_conntrack_tuple.src.u.all`.
    pub tuple_src_port: u32,
    /// `nf_conntrack_tuple.src.l3num`.
    pub tuple_l3num: u32,
    /// `nf_conntrack_tuple.dst.u3`.
    pub tuple_dst_u3: u32,
    /// `nf_conntrack_tuple.dst.u.all`.
    pub tuple_dst_port: u32,
    /// `nf_conntrack_tuple.dst.protonum`.
    pub tuple_protonum: u32,
    /// `kmem_cache.name`.
    pub cache_name: u32,
    /// `nf_conn.timeout` (u32 jiffies at which the entry expires).
    pub ct_timeout: u32,
    /// `sk_buff.len` (bytes from `skb->data` on, linear and paged).
    pub skb_len: u32,
    /// `sk_buff.data` (pointer).
    pub skb_data: u32,
    /// `sk_buff.tail` (offset from head on 64-bit: end of the linear data).
    pub skb_tail: u32,
    /// `net.ct.stat` (`struct ip_conntrack_stat __percpu *`).
    pub net_ct_stat: u32,
    /// `nf_conn.tuplehash[IP_CT_DIR_REPLY].tuple`.
    pub ct_reply_tuple: u32,
    /// `ip_conntrack_stat.drop` (u32).
    pub stat_drop: u32,
    /// `bpf_array.pptrs` (the per-CPU pointers of a per-CPU array map).
    pub array_pptrs: u32,
}

const _: () = assert!(core::mem::size_of::<Offsets>() == 26 * 4);

/// Run-time settings of the programs, resolved by user space at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Value of `SKB_DROP_REASON_NETFILTER_DROP` in this kernel's enum.
    pub netfilter_drop_reason: u32,
    /// `IPS_CONFIRMED_BIT` from the kernel's `ip_conntrack_status` enum.
    pub confirmed_bit: u32,
    /// Text range of `early_drop()` from /proc/kallsyms: a slab free whose
    /// kernel stack has a return address in `[start, end)` is an eviction.
    pub early_drop_start: u64,
    pub early_drop_end: u64,
    /// Number of stack frames inspected for `early_drop()`.
    pub stack_depth: u32,
    /// Bit set of [`flags`].
    pub flags: u32,
    /// Text range of `nf_hook_slow()` from /proc/kallsyms (0, 0 when not
    /// found): a netfilter drop freed from elsewhere was freed by the rule
    /// that dropped it (nftables since 6.7), not by conntrack's verdict.
    pub nf_hook_slow_start: u64,
    pub nf_hook_slow_end: u64,
    /// Text range of `nf_conntrack_free()` (kernels whose kmem_cache_free
    /// tracepoint passes neither the cache nor its name: the call site
    /// tells the nf_conntrack slab).
    pub ct_free_start: u64,
    pub ct_free_end: u64,
    /// Events per second per CPU (0: unlimited, every drop an event). Above
    /// it, events are sampled by flow and the rest shed (counted only):
    /// see conntrack-trace-ebpf/src/budget.rs. At most [`MAX_EVENT_BUDGET`].
    pub event_budget: u32,
    /// Seed of the flow hash that selects the sampled flows (random per
    /// load, so that no one can pick flows that are never sampled).
    pub flow_seed: u32,
    /// Text range of `gc_worker()` from /proc/kallsyms (0, 0 when not
    /// found: no `gc_evict`): a slab free of a still-live entry with a
    /// return address in `[start, end)` is a GC eviction.
    pub gc_worker_start: u64,
    pub gc_worker_end: u64,
    /// With [`flags::RING_POLL`]: a record submitted while the ring holds
    /// more than this many bytes wakes the reader (`BPF_RB_FORCE_WAKEUP`);
    /// below it none does (`BPF_RB_NO_WAKEUP`) and the reader polls.
    pub ring_wake_bytes: u64,
}

// Tracepoint argument positions are not here: ctx accesses need constant
// offsets, so the programs hard-code them and user space checks them
// against BTF before loading.
const _: () = assert!(core::mem::size_of::<Config>() == 96);

/// The largest `--event-budget` (events/s per CPU): keeps the programs'
/// rate arithmetic (budget × window in ns) far from overflow.
pub const MAX_EVENT_BUDGET: u32 = 1 << 24;

/// Bits of [`Config::flags`].
pub mod flags {
    /// Also emit [`super::kind::RULE_DROP`] events (normally only counted).
    pub const EMIT_RULE_DROPS: u32 = 1;
    /// The `kmem_cache_free` tracepoint passes the cache's name, not the
    /// cache (kernels before 6.2).
    pub const KMEM_FREE_BY_NAME: u32 = 2;
    /// Submit events without waking the reader, which polls on a timer
    /// (`--ring-wakeup poll`; see [`super::Config::ring_wake_bytes`]).
    pub const RING_POLL: u32 = 4;
    /// `--bpf-log` is on: the programs log their decisions on the rare
    /// paths through aya-log (conntrack-trace-ebpf's `blog!`). Off, every
    /// log call sits behind a test of this read-only bit that the verifier
    /// resolves at load and removes with the call.
    pub const BPF_LOG: u32 = 8;
}

/// Per-CPU state of the fexit backend's scoped hooks (`FEXIT_SCOPE` map).
pub mod scope {
    /// `struct net *` of the `early_drop()` running on this CPU, or 0.
    pub const EARLY_DROP_NET: u32 = 0;
    /// `struct sk_buff *` passed to the `__nf_conntrack_confirm()` running
    /// on this CPU.
    pub const CONFIRM_SKB: u32 = 1;
    /// 1 when that skb's entry was already confirmed on entry.
    pub const CONFIRM_WAS_CONFIRMED: u32 = 2;
    /// `struct sk_buff *` of the `nf_conntrack_in()` running on this CPU, or
    /// 0: the packet whose allocation may fail (for its bytes).
    pub const CT_IN_SKB: u32 = 3;
    /// Number of slots. (The GC's scope is not per CPU: see `GC_SCOPE` in
    /// conntrack-trace-ebpf/src/fexit.rs.)
    pub const LEN: u32 = 4;
}

/// Maximum kernel stack frames the eviction hook inspects.
pub const MAX_STACK_DEPTH: usize = 24;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), contain only integers and byte arrays,
    // and have no implicit padding (sizes are asserted above).
    unsafe impl aya::Pod for super::RawEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Offsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceKey {}
}
