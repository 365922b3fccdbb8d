//! The tracepoint backend's programs (user side:
//! `conntrack-trace/src/backend/tracepoint.rs`): `tp_btf/kfree_skb` and
//! `tp_btf/kmem_cache_free`, for kernels that refuse fentry/fexit and
//! kprobes.

use aya_ebpf::{
    EbpfContext as _,
    macros::{btf_tracepoint, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::BtfTracePointContext,
};
use conntrack_trace_common::{MAX_STACK_DEPTH, counter, flags, kind};

use crate::common::{
    Direct, IP_CT_UNTRACKED, Mem as _, NFCT_INFOMASK, add, bump, ct_is_confirmed, ct_live, emit,
    fill_from_ct, fill_from_skb, fill_packet, net_inum, read, scratch, skb_net,
};
use aya_log_ebpf::{debug, info, warn};

use crate::first_time;

/// The `struct kmem_cache *` of the nf_conntrack slab, learned on first
/// sight. A global (`.bss`), not an array map: every slab free in the
/// system reads it, and a global is one load where a map is a lookup
/// (issue 15). Written once, with the same value by any CPU.
#[unsafe(no_mangle)]
static mut CT_CACHE: u64 = 0;

/// Caches seen and found not to be nf_conntrack's, direct-mapped by
/// address (a global, like [`CT_CACHE`]; a race between CPUs only costs a
/// name check again). Until the nf_conntrack cache is learned — and in a
/// table-full flood no entry is ever freed, so it never is — every slab
/// free in the system (the dropped packets' own `skbuff_head_cache`
/// among them) used to pay the name check, two probe reads: ~140 ns per
/// run, one run per drop (issue 21). A hit here is one load.
#[unsafe(no_mangle)]
static mut NOT_CT: [u64; NOT_CT_SLOTS] = [0; NOT_CT_SLOTS];
const NOT_CT_SLOTS: usize = 64;

/// A slot to turn a typed pointer into a number: the verifier allows no
/// arithmetic on a trusted BTF pointer (6.18: "math between trusted_ptr_
/// pointer and ... is not allowed"), and a load from map memory is a
/// plain scalar (as in [`this_cpu_offset`]).
#[map]
static SCALAR: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `cache`'s slot in [`NOT_CT`] (Fibonacci hashing of the address).
#[inline(always)]
fn not_ct_slot(cache: u64) -> Option<usize> {
    let p = SCALAR.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used only here.
    let n = unsafe {
        core::ptr::write_volatile(p, cache);
        core::ptr::read_volatile(p)
    };
    Some((n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize & (NOT_CT_SLOTS - 1))
}

/// Scratch space for kernel stacks (too large for the 512-byte BPF stack).
#[map]
static STACK: PerCpuArray<[u64; MAX_STACK_DEPTH]> = PerCpuArray::with_max_entries(1, 0);

/// Per netns inode, per CPU: conntrack's `drop` counter (`net->ct.stat`,
/// this CPU's copy) as of the last netfilter drop seen on this CPU in that
/// netns. User space seeds it for the namespaces that exist at start; a
/// netns made later starts from 0, as its counters do (alloc_percpu()).
#[map]
static CT_DROP_SEEN: PerCpuHashMap<u32, u32> = PerCpuHashMap::with_max_entries(16_384, 0);

/// Slot 0: a slot whose own address tells this CPU's per-CPU offset (see
/// [`this_cpu_offset`]); slot 1: that offset once known (it never changes
/// while the CPU exists), so later drops spend no probe read on it.
#[map]
static PCPU_PROBE: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// This CPU's most recent namespace, in front of [`CT_DROP_SEEN`]: a flood
/// hits one namespace, and an array slot costs no hash lookup, nor the
/// probe read of `net->ct.stat` (issue 21). `inum` 0: empty.
#[repr(C)]
struct DropFront {
    inum: u32,
    /// Its `drop` counter on this CPU when last read.
    drop: u32,
    /// Its `struct net *` (with the inode: a namespace made later may
    /// reuse either, hardly both).
    net: u64,
    /// Where this CPU's `drop` counter of it is (`net->ct.stat` plus this
    /// CPU's per-CPU offset): fixed for the namespace's life.
    addr: u64,
}

#[map]
static DROP_FRONT: PerCpuArray<DropFront> = PerCpuArray::with_max_entries(1, 0);

/// `--bpf-log`: each program's first run logs what it was loaded with
/// (one slot per program; `.bss`, zero until then).
#[unsafe(no_mangle)]
static mut LOGGED_START: [u32; 4] = [0; 4];

/// Logs, once per program (`slot`), the variant it is and the settings
/// and offsets user space wrote: what a user can send us when a kernel
/// classifies oddly. Removed with the rest when `--bpf-log` is off (the
/// gate here, the lines out of line in [`start_lines`]).
#[inline(always)]
fn log_start(slot: usize) {
    if conf!(flags) & flags::BPF_LOG != 0 {
        start_lines(slot);
    }
}

#[inline(never)]
fn start_lines(slot: usize) {
    if slot >= 4 {
        return;
    }
    // SAFETY: `slot` < 4; a global of ours.
    if !first_time(unsafe { (&raw mut LOGGED_START).cast::<u32>().add(slot) }) {
        return;
    }
    match slot {
        0 => info!(&(), "tracepoint: kfree_skb (with drop reasons) attached"),
        1 => info!(
            &(),
            "tracepoint: kfree_skb (no drop reasons: frees from nf_hook_slow()) attached"
        ),
        2 if conf!(flags) & flags::KMEM_FREE_BY_NAME != 0 => info!(
            &(),
            "tracepoint: kmem_cache_free (the cache's name: before 6.2) attached"
        ),
        2 => info!(&(), "tracepoint: kmem_cache_free (the cache) attached"),
        _ => info!(
            &(),
            "tracepoint: kmem_cache_free (call site in nf_conntrack_free(): before 5.12) attached"
        ),
    }
    if slot >= 2 {
        return;
    }
    info!(
        &(),
        "config: flags {:x}, event budget {}/s per CPU, NETFILTER_DROP reason {}, IPS_CONFIRMED_BIT {}",
        conf!(flags),
        conf!(event_budget),
        conf!(netfilter_drop_reason),
        conf!(confirmed_bit)
    );
    info!(
        &(),
        "config: nf_hook_slow() {:x}..{:x}, early_drop() {:x}..{:x}, gc_worker() {:x}..{:x}",
        conf!(nf_hook_slow_start),
        conf!(nf_hook_slow_end),
        conf!(early_drop_start),
        conf!(early_drop_end),
        conf!(gc_worker_start),
        conf!(gc_worker_end)
    );
    info!(
        &(),
        "offsets: sk_buff._nfct {} .dev {} .sk {}, net.ns.inum {} .ct.stat {}, ip_conntrack_stat.drop {}",
        off!(skb_nfct),
        off!(skb_dev),
        off!(skb_sk),
        off!(net_inum),
        off!(net_ct_stat),
        off!(stat_drop)
    );
    info!(
        &(),
        "offsets: nf_conn.status {} .ct_net {} .tuplehash {} .timeout {}, bpf_array.pptrs {}",
        off!(ct_status),
        off!(ct_net),
        off!(ct_tuple),
        off!(ct_timeout),
        off!(array_pptrs)
    );
}

/// `kfree_skb(skb, location, reason[, rx_sk])`, since 5.17: a netfilter
/// drop is `SKB_DROP_REASON_NETFILTER_DROP`.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    // ctx accesses must use constant offsets, so argument positions are
    // fixed here and user space checks them against BTF before loading.
    let reason: u64 = ctx.arg(2);
    if reason as u32 != conf!(netfilter_drop_reason) {
        return 0;
    }
    let from_hook = conf!(nf_hook_slow_start) == 0 || in_nf_hook_slow(location(&ctx));
    log_drop(netfilter_drop(ctx.arg(0), from_hook));
    // After the first netfilter drop, not at the first free: the system's
    // other frees pay nothing for it, not even the gate's load; and after
    // the drop's own work, so the compiler lays that out as without it.
    log_start(0);
    0
}

/// `kfree_skb(skb, location)`, before 5.17 (5.10: Debian 11, Amazon Linux
/// 2): no reason. nf_hook_slow() answers every NF_DROP verdict with
/// kfree_skb() (net/netfilter/core.c), so a free from inside nf_hook_slow()
/// is a netfilter drop; the rest of the system's frees stop at this range
/// test. Loaded instead of [`kfree_skb`] where BTF shows no reason
/// argument (user space requires the range then).
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_no_reason(ctx: BtfTracePointContext) -> i32 {
    if !in_nf_hook_slow(location(&ctx)) {
        return 0;
    }
    log_drop(netfilter_drop(ctx.arg(0), true));
    log_start(1);
    0
}

/// The tracepoint's `location` (argument 1): `void *`, which
/// btf_ctx_access() (kernel/bpf/btf.c) takes as a scalar on every kernel
/// we load on ("a pointer to void is the same as a scalar"), unlike the
/// `const void *` of kmem_cache_free, whose const hides the void before
/// 6.18. A ctx load, not a probe read: ~40 ns less per netfilter drop.
#[inline(always)]
fn location(ctx: &BtfTracePointContext) -> u64 {
    ctx.arg(1)
}

#[inline(always)]
fn in_nf_hook_slow(ip: u64) -> bool {
    ip >= conf!(nf_hook_slow_start) && ip < conf!(nf_hook_slow_end)
}

/// What [`netfilter_drop`] decided, for `--bpf-log` ([`log_decision`]):
/// the kind of the drop, and for a rule drop the check that said so.
/// Returned rather than logged where it is decided: behind the gate at
/// the call site, one test after the work, the drop paths compile as
/// they did before `--bpf-log` (logged in place, the gated calls in the
/// rule-drop branches made LLVM lay out the whole function anew, +220
/// instructions with logging off).
mod decided {
    /// `table_full`, untracked, or nothing worth a line.
    pub const QUIET: u8 = 0;
    /// No entry, and the netns's `drop` counter unreadable: counted as
    /// `table_full` (`unclassified`).
    pub const UNCLASSIFIED: u8 = 1;
    /// No entry, freed by nf_hook_slow(), `drop` did not move.
    pub const RULE_NOT_COUNTED: u8 = 2;
    /// No entry, freed outside nf_hook_slow() (the rule freed it).
    pub const RULE_NOT_FROM_HOOK: u8 = 3;
    /// A confirmed entry: the ruleset's verdict.
    pub const RULE_CONFIRMED: u8 = 4;
    /// An unconfirmed entry: `insert_failed`.
    pub const INSERT_FAILED: u8 = 5;
}

/// The `--bpf-log` line for a netfilter drop's decision (out of line, only
/// called behind the gate).
#[inline(never)]
fn log_decision(d: u8, inum: u32) {
    match d {
        decided::UNCLASSIFIED => warn!(
            &(),
            "unclassified: netns {} drop without entry, conntrack's drop counter unreadable: counted as table_full",
            inum
        ),
        decided::RULE_NOT_COUNTED => debug!(
            &(),
            "rule_drop: netns {} no entry, conntrack's drop counter did not move on this CPU: not table_full",
            inum
        ),
        decided::RULE_NOT_FROM_HOOK => debug!(
            &(),
            "rule_drop: netns {} no entry, freed outside nf_hook_slow() (a rule freed it): not table_full",
            inum
        ),
        decided::RULE_CONFIRMED => debug!(
            &(),
            "rule_drop: netns {} entry confirmed: the ruleset dropped it, not conntrack", inum
        ),
        decided::INSERT_FAILED => info!(
            &(),
            "insert_failed: netns {} dropped with an unconfirmed entry (confirmation failed)", inum
        ),
        _ => {}
    }
}

/// Hands a netfilter drop's decision to [`log_decision`] when `--bpf-log`
/// is on (the gate: removed by the verifier when off).
#[inline(always)]
fn log_drop(r: Result<(u8, u32), i64>) {
    if conf!(flags) & flags::BPF_LOG != 0 {
        if let Ok((d, inum)) = r {
            if d != decided::QUIET {
                log_decision(d, inum);
            }
        }
    }
}

/// A packet netfilter dropped (`from_hook`: freed by nf_hook_slow(), i.e.
/// a verdict returned to it, not freed by the rule itself). `skb` is the
/// tracepoint's own argument, typed by BTF: its fields, and the device,
/// socket and namespace they lead to, are [`Direct`] loads. Returns what
/// it decided ([`decided`]) and the netns, for `--bpf-log`.
#[inline(always)]
fn netfilter_drop(skb: u64, from_hook: bool) -> Result<(u8, u32), i64> {
    let nfct: u64 = Direct::get(skb + off!(skb_nfct))?;
    let ct = nfct & !NFCT_INFOMASK;
    if ct == 0 && nfct & NFCT_INFOMASK == IP_CT_UNTRACKED {
        return Ok((decided::QUIET, 0));
    }
    let net = skb_net::<Direct>(skb);
    // Read once: the drop baseline is kept per namespace and the event
    // names it.
    let inum = net_inum::<Direct>(net);
    // Did conntrack count this drop? Read on every netfilter drop, so that
    // the baseline also absorbs what earlier drops here moved.
    // (An i64 with -1 for "unreadable" rather than an Option: LLVM may
    // read an Option's payload on the None path, which the verifier
    // rejects as an uninitialised register.)
    let moved = ct_drops_since_last(net, inum);
    if ct == 0 {
        // No entry attached: conntrack's own NF_DROP from nf_conntrack_in()
        // (net/netfilter/nf_conntrack_core.c: resolve_normal_ct() < 0 →
        // NF_CT_STAT_INC_ATOMIC(drop) → NF_DROP; the allocation failed, the
        // table is full) — or a rule that dropped a packet conntrack never
        // attached to: a raw-table rule before conntrack, `ct state invalid
        // drop` (an invalid packet leaves nf_conntrack_in() with `_nfct`
        // cleared and only `invalid` counted), `notrack` then drop.
        // nf_hook_slow() frees every NF_DROP verdict on the CPU that ran the
        // hook, right after it returns (net/netfilter/core.c), so
        // conntrack's drop moved this CPU's `drop` counter and a rule's did
        // not. nftables since 6.7 frees what its rules drop itself
        // (nft_do_chain(), NF_DROP_REASON): not from nf_hook_slow(), so
        // not conntrack's.
        let by_conntrack = from_hook
            && if moved < 0 {
                bump(counter::UNCLASSIFIED);
                true
            } else {
                if moved > 1 {
                    add(counter::DROP_UNMATCHED, (moved - 1) as u64);
                }
                moved > 0
            };
        if !by_conntrack {
            if !from_hook && moved > 0 {
                add(counter::DROP_UNMATCHED, moved as u64);
            }
            let why = if from_hook {
                decided::RULE_NOT_COUNTED
            } else {
                decided::RULE_NOT_FROM_HOOK
            };
            if conf!(flags) & flags::EMIT_RULE_DROPS == 0 {
                bump(counter::seen(kind::RULE_DROP));
                return Ok((why, inum));
            }
            let ev = scratch(kind::RULE_DROP)?;
            fill_from_skb::<Direct>(ev, skb);
            ev.netns = inum;
            return emit(ev).map(|()| (why, inum));
        }
        let ev = scratch(kind::TABLE_FULL)?;
        fill_from_skb::<Direct>(ev, skb);
        ev.netns = inum;
        emit(ev)?;
        return Ok((
            if moved < 0 {
                decided::UNCLASSIFIED
            } else {
                decided::QUIET
            },
            inum,
        ));
    }
    if ct_is_confirmed(ct)? {
        // A confirmed entry: the ruleset dropped it, conntrack did not fail.
        if moved > 0 {
            add(counter::DROP_UNMATCHED, moved as u64);
        }
        if conf!(flags) & flags::EMIT_RULE_DROPS == 0 {
            bump(counter::seen(kind::RULE_DROP));
            return Ok((decided::RULE_CONFIRMED, inum));
        }
        let ev = scratch(kind::RULE_DROP)?;
        fill_from_ct(ev, ct)?;
        fill_packet::<Direct>(ev, skb);
        return emit(ev).map(|()| (decided::RULE_CONFIRMED, inum));
    }
    // __nf_conntrack_confirm(): a clash it could not resolve returns NF_DROP
    // while the new, never-inserted (unconfirmed) entry is still attached
    // (`drop` counted once by nf_ct_resolve_clash(), not for chaintoolong).
    if moved > 1 {
        add(counter::DROP_UNMATCHED, (moved - 1) as u64);
    }
    let ev = scratch(kind::INSERT_FAILED)?;
    fill_from_ct(ev, ct)?;
    fill_packet::<Direct>(ev, skb);
    emit(ev).map(|()| (decided::INSERT_FAILED, inum))
}

/// This CPU's per-CPU offset (`__per_cpu_offset[cpu]`, which kallsyms does
/// not show without CONFIG_KALLSYMS_ALL): a per-CPU array lookup returns
/// `this_cpu_ptr(array->pptrs[0])` (kernel/bpf/arraymap.c,
/// percpu_array_map_lookup_elem()), so the slot's address minus the
/// array's own per-CPU pointer is the offset.
#[inline(always)]
fn this_cpu_offset() -> Option<u64> {
    let known = PCPU_PROBE.get_ptr_mut(1)?;
    // SAFETY: this CPU's slot; programs do not nest on a CPU.
    let off = unsafe { *known };
    if off != 0 {
        return Some(off);
    }
    let off = compute_cpu_offset()?;
    // SAFETY: as above. (An offset of 0, a uniprocessor kernel's, is
    // recomputed every time: still right.)
    unsafe { *known = off };
    Some(off)
}

#[inline(always)]
fn compute_cpu_offset() -> Option<u64> {
    let slot = PCPU_PROBE.get_ptr_mut(0)?;
    // The slot's address as a number: stored and loaded back through the
    // slot (the verifier allows a privileged program to keep an address in
    // a map value; a load from map memory is a plain scalar).
    // SAFETY: valid per-CPU map value of this CPU.
    let here = unsafe {
        core::ptr::write_volatile(slot, slot as u64);
        core::ptr::read_volatile(slot)
    };
    // The map's address, as a number through the same slot.
    let map = &raw const PCPU_PROBE;
    // SAFETY: as above.
    let map_addr = unsafe {
        core::ptr::write_volatile(slot, map as u64);
        core::ptr::read_volatile(slot)
    };
    let pptr: u64 = read(map_addr + off!(array_pptrs)).ok()?;
    Some(here.wrapping_sub(pptr))
}

/// How much conntrack's `drop` counter of `net` moved on this CPU since the
/// last call for the same netns on this CPU; -1 when it cannot be read.
#[inline(always)]
fn ct_drops_since_last(net: u64, inum: u32) -> i64 {
    match ct_drop_counter(net, inum) {
        Some(d) => d,
        None => -1,
    }
}

#[inline(always)]
fn ct_drop_counter(net: u64, inum: u32) -> Option<i64> {
    if net == 0 {
        return None;
    }
    let front = DROP_FRONT.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; programs do not nest on a CPU.
    let front = unsafe { &mut *front };
    if front.inum == inum && inum != 0 && front.net == net && front.addr != 0 {
        let drop: u32 = read(front.addr).ok()?;
        let last = front.drop;
        front.drop = drop;
        return Some(drop.wrapping_sub(last) as i64);
    }
    let stat: u64 = read(net + off!(net_ct_stat)).ok()?;
    if stat == 0 {
        return None;
    }
    let addr = stat.wrapping_add(this_cpu_offset()?) + off!(stat_drop);
    let drop: u32 = read(addr).ok()?;
    // Another namespace: the front's baseline goes back to the hash
    // (which user space seeded at start), this one's comes out of it.
    if front.inum != 0 {
        CT_DROP_SEEN.insert(&front.inum, &front.drop, 0).ok()?;
    }
    front.inum = inum;
    front.drop = drop;
    front.net = net;
    front.addr = addr;
    match CT_DROP_SEEN.get_ptr_mut(&inum) {
        Some(p) => {
            // SAFETY: this CPU's value of an existing entry; programs do not
            // nest on a CPU.
            let last = unsafe { *p };
            // SAFETY: as above.
            unsafe { *p = drop };
            Some(drop.wrapping_sub(last) as i64)
        }
        None => {
            CT_DROP_SEEN.insert(&inum, &drop, 0).ok()?;
            Some(drop as i64)
        }
    }
}

#[btf_tracepoint(function = "kmem_cache_free")]
pub fn kmem_cache_free(ctx: BtfTracePointContext) -> i32 {
    let _ = try_kmem_cache_free(&ctx);
    0
}

/// `kmem_cache_free(call_site, ptr)`, before 5.12 (5.10): neither the
/// cache nor its name. The caller that frees a conntrack entry is
/// nf_conntrack_free() (net/netfilter/nf_conntrack_core.c:
/// `kmem_cache_free(nf_conntrack_cachep, ct)`), so a `call_site` inside it
/// (range from kallsyms, module symbols included) is the nf_conntrack
/// slab; the rest of the system's frees stop at the range test.
#[btf_tracepoint(function = "kmem_cache_free")]
pub fn kmem_cache_free_by_site(ctx: BtfTracePointContext) -> i32 {
    let site: u64 = read(ctx.as_ptr() as u64).unwrap_or(0);
    if site < conf!(ct_free_start) || site >= conf!(ct_free_end) {
        return 0;
    }
    log_start(3);
    bump(counter::CT_FREES);
    let _ = conntrack_freed(&ctx);
    0
}

fn try_kmem_cache_free(ctx: &BtfTracePointContext) -> Result<(), i64> {
    // Fires on every slab free in the system: once the nf_conntrack cache is
    // known, everything else costs one load and one comparison.
    // (call_site, ptr, s) since 6.2; checked against BTF by user space.
    // Before 6.2 the third argument was the cache's name (`s->name`, a
    // pointer as stable as the cache itself) instead of the cache: the
    // FREE_BY_NAME variant learns that pointer instead (chosen by user space
    // from the tracepoint's BTF; the verifier prunes the other branch).
    let cache: u64 = ctx.arg(2);
    let learned = &raw mut CT_CACHE;
    // SAFETY: our global; a torn read is impossible for an aligned u64.
    let known = unsafe { core::ptr::read_volatile(learned) };
    if known != cache {
        // Learned and not ours: done, before any name is read. (Testing the
        // name first cost every foreign slab free two probe reads: ~140 ns
        // instead of ~70 ns per run, issue 15.)
        if known != 0 {
            return Ok(());
        }
        let slot = not_ct_slot(cache).unwrap_or(0);
        let not_ct = &raw mut NOT_CT;
        // SAFETY: our global, `slot` < NOT_CT_SLOTS; aligned u64 accesses.
        if unsafe { core::ptr::read_volatile(&raw const (*not_ct)[slot]) } == cache {
            return Ok(());
        }
        let by_name = conf!(flags) & flags::KMEM_FREE_BY_NAME != 0;
        // Here, where a cache is seen the first time: not on the path of
        // the frees already sorted out.
        log_start(2);
        let is_ct = if by_name {
            is_conntrack_name(cache)
        } else {
            is_conntrack_cache(cache)
        };
        if !is_ct {
            // A cache is never freed while its objects are (a slab cache
            // outlives every free into it); a cache destroyed and another
            // made at its address — nf_conntrack loaded after the tracer
            // started, in the very place of a module's cache that was
            // unloaded — would be missed, and the tracer says at start
            // whether nf_conntrack is there.
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(&raw mut (*not_ct)[slot], cache) };
            return Ok(());
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(learned, cache) };
        // (Not its address: the verifier refuses any arithmetic on the
        // trusted pointer, and copying it out byte by byte is some.)
        if by_name {
            blog!(
                info,
                "kmem_cache_free: learned the nf_conntrack slab (by its name)"
            );
        } else {
            blog!(
                info,
                "kmem_cache_free: learned the nf_conntrack slab (by kmem_cache.name)"
            );
        }
    }
    bump(counter::CT_FREES);
    conntrack_freed(ctx)
}

/// An nf_conntrack entry is being freed: an eviction when early_drop() or
/// gc_worker() is on the stack and the entry was still live.
#[inline(always)]
fn conntrack_freed(ctx: &BtfTracePointContext) -> Result<(), i64> {
    // `ptr` is `const void *`: before 6.18 btf_ctx_access() does not look
    // through the const to the void and refuses the ctx load ("invalid
    // bpf_context access off=8", seen on 6.1 and 6.12), so the argument is
    // copied out of the context instead.
    let obj: u64 = read(ctx.as_ptr() as u64 + 8)?;
    let k = freed_by(ctx);
    if k == NOT_EVICTED {
        return Ok(());
    }
    // gc_worker() also frees the entries it finds expired
    // (nf_ct_gc_expired()): ordinary expiry, not an eviction. Only a victim
    // still live was killed (nf_ct_kill() leaves ct->timeout alone).
    if !ct_live(obj)? {
        return Ok(());
    }
    // The entry is being freed but its memory still holds the tuple: the
    // slab is SLAB_TYPESAFE_BY_RCU and nf_conntrack_free() does not clear it.
    let ev = scratch(k)?;
    fill_from_ct(ev, obj)?;
    if k == kind::EARLY_DROP {
        blog!(
            debug,
            "early_drop: netns {} live entry freed with early_drop() on the kernel stack",
            ev.netns
        );
    } else {
        blog!(
            debug,
            "gc_evict: netns {} live entry freed with gc_worker() on the kernel stack",
            ev.netns
        );
    }
    emit(ev)
}

/// [`freed_by`]: neither early_drop() nor gc_worker() is on the stack.
const NOT_EVICTED: u8 = u8::MAX;

/// Compares `kmem_cache.name` with "nf_conntrack" (the slab created in
/// nf_conntrack_init_start(); SLAB_TYPESAFE_BY_RCU keeps it unmerged).
#[inline(always)]
fn is_conntrack_cache(cache: u64) -> bool {
    let Ok(name_ptr) = read::<u64>(cache + off!(cache_name)) else {
        return false;
    };
    is_conntrack_name(name_ptr)
}

/// True when the NUL-terminated string at `name_ptr` is "nf_conntrack".
#[inline(always)]
fn is_conntrack_name(name_ptr: u64) -> bool {
    const NAME: &[u8; 13] = b"nf_conntrack\0";
    match read::<[u8; 13]>(name_ptr) {
        Ok(name) => name == *NAME,
        Err(_) => false,
    }
}

/// Which eviction frees the entry: [`kind::EARLY_DROP`] when a return
/// address on the kernel stack lies inside `early_drop()`
/// (net/netfilter/nf_conntrack_core.c: early_drop() → early_drop_list() →
/// nf_ct_put() → nf_ct_destroy() → nf_conntrack_free() →
/// kmem_cache_free()), [`kind::GC_EVICT`] when one lies inside
/// `gc_worker()` (gc_worker() → nf_ct_put() after its nf_ct_kill(), both
/// inlined on 5.10 through 6.18: see `gc_worker_enter` in fexit.rs for
/// the kernels), else [`NOT_EVICTED`]. The innermost match wins: early_drop()
/// never runs under gc_worker() (it is the allocation path's).
#[inline(always)]
fn freed_by(ctx: &BtfTracePointContext) -> u8 {
    let Some(buf) = STACK.get_ptr_mut(0) else {
        return NOT_EVICTED;
    };
    let size = (MAX_STACK_DEPTH * 8) as u32;
    // SAFETY: buf points at MAX_STACK_DEPTH u64s of per-CPU map memory.
    let n =
        unsafe { aya_ebpf::helpers::generated::bpf_get_stack(ctx.as_ptr(), buf.cast(), size, 0) };
    if n <= 0 {
        return NOT_EVICTED;
    }
    let frames = (n as usize) / 8;
    let start = conf!(early_drop_start);
    let end = conf!(early_drop_end);
    // 0, 0 when gc_worker() was not found: the range test never matches.
    let gc_start = conf!(gc_worker_start);
    let gc_end = conf!(gc_worker_end);
    let depth = conf!(stack_depth) as usize;
    let mut i = 0;
    while i < MAX_STACK_DEPTH {
        if i >= frames || i >= depth {
            break;
        }
        // SAFETY: i < MAX_STACK_DEPTH.
        let ip = unsafe { (*buf)[i] };
        if ip >= start && ip < end {
            return kind::EARLY_DROP;
        }
        if ip >= gc_start && ip < gc_end {
            return kind::GC_EVICT;
        }
        i += 1;
    }
    NOT_EVICTED
}
