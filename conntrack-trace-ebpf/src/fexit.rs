//! The fexit backend: trampolines on conntrack's own functions
//! (net/netfilter/nf_conntrack_core.c as of 6.1: __nf_conntrack_alloc(),
//! early_drop()/early_drop_list(), __nf_conntrack_confirm(),
//! nf_ct_resolve_clash(); the prototypes are checked against BTF at load
//! time and the scenario tests pass on Debian's 6.1 and 6.12). Exact where
//! the tracepoints infer: the allocation that failed, the entry that was
//! evicted, the confirmation that lost.
//!
//! Argument positions are fixed here (ctx accesses need constant offsets);
//! user space checks every function's prototype in BTF before loading.
//! Return values are read with `bpf_get_func_ret()` (a scalar copy), so no
//! comparison is made on a pointer-typed register.
//!
//! No `blog!` (`--bpf-log`) here: aya-log-ebpf's macro compiles to BPF
//! subprograms (its closures), present in the object whether logging is
//! on or off, and the trampoline loader loads without BTF func_info; that
//! these programs would still load on the VM matrix's kernels is untested
//! (this host refuses fentry/fexit altogether), so they carry no log call
//! and `--bpf-log` needs the tracepoint backend.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fentry, fexit, map},
    maps::{Array, PerCpuArray},
    programs::{FEntryContext, FExitContext},
};
use conntrack_trace_common::{kind, scope};

use crate::common::{
    Probe, ct_is_confirmed, ct_live, emit, fill_from_ct, fill_from_tuple, fill_packet, net_inum,
    read, scratch, skb_ct,
};

/// Per-CPU scope of the hooks that pair an entry with an exit (indexed by
/// `scope::*`). Both functions run to completion on one CPU: early_drop()
/// under rcu_read_lock() without sleeping, __nf_conntrack_confirm() with
/// bottom halves disabled around its work.
#[map]
static FEXIT_SCOPE: PerCpuArray<u64> = PerCpuArray::with_max_entries(scope::LEN, 0);

/// The task running `gc_worker()` (`bpf_get_current_pid_tgid()`), or 0.
/// One slot for the whole system, not per CPU: conntrack has a single GC
/// work item (`conntrack_gc_work`), so at most one gc_worker() runs at a
/// time, and it runs in a kworker that may sleep in cond_resched() and
/// resume on another CPU — a per-CPU scope would lose it.
#[map]
static GC_SCOPE: Array<u64> = Array::with_max_entries(1, 0);

/// `ERR_PTR()` values are the last 4095 addresses (include/linux/err.h).
const MAX_ERRNO: u64 = 4095;
/// `NF_DROP` (include/uapi/linux/netfilter.h).
const NF_DROP: u32 = 0;

#[inline(always)]
fn slot(i: u32) -> Result<*mut u64, i64> {
    FEXIT_SCOPE.get_ptr_mut(i).ok_or(0i64)
}

/// Stores `v` in this CPU's scope slot `i`.
#[inline(always)]
fn set(i: u32, v: u64) {
    if let Ok(p) = slot(i) {
        // SAFETY: per-CPU slot; see FEXIT_SCOPE.
        unsafe { *p = v };
    }
}

#[inline(always)]
fn ret(ctx: &FExitContext) -> Result<u64, i64> {
    ctx.ret::<u64>().map_err(|e| e as i64)
}

// ---- table_full -----------------------------------------------------------

/// `__nf_conntrack_alloc(net, zone, orig, repl, gfp, hash)` returning
/// `ERR_PTR(-ENOMEM)`: the netns count passed nf_conntrack_max and
/// early_drop() found nothing to evict (or the slab allocation failed, which
/// nf_conntrack_in() counts the same way: `drop`).
#[fexit(function = "__nf_conntrack_alloc")]
pub fn ct_alloc_exit(ctx: FExitContext) -> i32 {
    let _ = try_ct_alloc_exit(&ctx);
    0
}

fn try_ct_alloc_exit(ctx: &FExitContext) -> Result<(), i64> {
    let r = ret(ctx)?;
    if r < 0u64.wrapping_sub(MAX_ERRNO) {
        return Ok(());
    }
    // Callers: init_conntrack() (the packet path, whose failure
    // nf_conntrack_in() counts as `drop` and answers with NF_DROP) passes
    // the tuple's hash_conntrack_raw(); nf_conntrack_alloc() (ctnetlink and
    // other control-plane users, never counted as `drop`) passes 0. A real
    // packet hash of 0 (p = 2^-32) would be missed; the counter check shows it.
    let hash: u64 = ctx.arg(5);
    if hash as u32 == 0 {
        return Ok(());
    }
    let net: u64 = ctx.arg(0);
    let orig: u64 = ctx.arg(2);
    let ev = scratch(kind::TABLE_FULL)?;
    fill_from_tuple(ev, orig)?;
    ev.netns = net_inum::<Probe>(net);
    // The packet is two frames up (nf_conntrack_in() → resolve_normal_ct()
    // → init_conntrack()); its entry hook left the skb in the scope.
    let skb = slot(scope::CT_IN_SKB)?;
    // SAFETY: per-CPU slot; see FEXIT_SCOPE.
    let skb = unsafe { *skb };
    if skb != 0 {
        fill_packet::<Probe>(ev, skb);
    }
    emit(ev)
}

/// `nf_conntrack_in(skb, state)`: remembers the packet being tracked on this
/// CPU so that a failed allocation below can keep its bytes. A packet
/// processed in an interrupt nested inside another's nf_conntrack_in()
/// clears the slot on its way out, so the outer one's event then goes
/// without bytes — never with the wrong ones.
#[fentry(function = "nf_conntrack_in")]
pub fn ct_in_enter(ctx: FEntryContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    set(scope::CT_IN_SKB, skb);
    0
}

#[fexit(function = "nf_conntrack_in")]
pub fn ct_in_exit(_ctx: FExitContext) -> i32 {
    set(scope::CT_IN_SKB, 0);
    0
}

// ---- early_drop -----------------------------------------------------------

/// Opens the eviction scope on this CPU. early_drop(net, hash) is `static
/// noinline`: it walks up to NF_CT_EVICTION_RANGE buckets with
/// early_drop_list(), which calls nf_ct_delete() on each unassured victim
/// and adds the number deleted to the `early_drop` stat.
#[fentry(function = "early_drop")]
pub fn early_drop_enter(ctx: FEntryContext) -> i32 {
    let net: u64 = ctx.arg(0);
    set(scope::EARLY_DROP_NET, net);
    0
}

#[fexit(function = "early_drop")]
pub fn early_drop_exit(_ctx: FExitContext) -> i32 {
    set(scope::EARLY_DROP_NET, 0);
    0
}

/// `nf_ct_delete(ct, portid, report)` returning true inside early_drop():
/// one eviction, exactly what early_drop_list() counts (`drops++` only when
/// nf_ct_delete() returns true). Inside gc_worker() instead: a GC eviction
/// ([`try_gc_delete_exit`]).
#[fexit(function = "nf_ct_delete")]
pub fn ct_delete_exit(ctx: FExitContext) -> i32 {
    let _ = try_ct_delete_exit(&ctx);
    0
}

fn try_ct_delete_exit(ctx: &FExitContext) -> Result<(), i64> {
    let p = slot(scope::EARLY_DROP_NET)?;
    // SAFETY: per-CPU slot; see FEXIT_SCOPE.
    let scope_net = unsafe { *p };
    if scope_net == 0 {
        return try_gc_delete_exit(ctx);
    }
    if ret(ctx)? as u8 == 0 {
        return Ok(());
    }
    let ct: u64 = ctx.arg(0);
    // early_drop_list() only evicts entries of the allocating netns; a
    // delete of another netns' entry is an interrupt nested on this CPU.
    let ct_net: u64 = read(ct + off!(ct_net))?;
    if ct_net != scope_net {
        return Ok(());
    }
    // early_drop_list() also hands entries it finds already expired to
    // nf_ct_gc_expired() → nf_ct_kill() → nf_ct_delete(), without counting
    // them. nf_ct_delete() leaves ct->timeout alone, so an entry expired now
    // was expired then. A victim that expired between early_drop_list()'s
    // check and this exit would be missed: a window of a few instructions,
    // visible in the counter check.
    if !ct_live(ct)? {
        return Ok(());
    }
    let ev = scratch(kind::EARLY_DROP)?;
    fill_from_ct(ev, ct)?;
    emit(ev)
}

// ---- gc_evict -------------------------------------------------------------

/// Opens the GC scope. gc_worker() (net/netfilter/nf_conntrack_core.c,
/// `static`, the delayed work of `conntrack_gc_work`) kills, while
/// `gc_work->early_drop` is set, every entry gc_worker_can_early_drop()
/// accepts in a netns at or above 95 % of nf_conntrack_max: `nf_ct_kill()`
/// (inline) → nf_ct_delete(ct, 0, 0), counted nowhere. Its other deletes
/// are of expired entries (nf_ct_gc_expired() → nf_ct_kill()), told apart
/// by the victim's timeout.
///
/// Per kernel (net/netfilter/nf_conntrack_core.c, gc_worker(); the table
/// in docs/kernels.md#gc_evict says more):
/// * 5.10: each run scans 1/128 of the table and clears the flag at its
///   end; the kill path is the same (nf_ct_kill() → nf_ct_delete()).
/// * 6.1, 6.12, 6.18 (5.19's rework): whole-table passes; the flag is
///   cleared at the end of a pass, or after GC_SCAN_EXPIRED_MAX expiries +
///   kills in one run; `gc_worker_can_early_drop()` and `nf_ct_kill()`
///   inline, gc_worker() itself never (a work function) — in BTF with
///   `(struct work_struct *)`.
/// * 7.3: not read; a proposed per-netns nf_conntrack_max changes only
///   how the 95 % is computed, not the kill path.
#[fentry(function = "gc_worker")]
pub fn gc_worker_enter(_ctx: FEntryContext) -> i32 {
    let task = bpf_get_current_pid_tgid();
    if let Some(p) = GC_SCOPE.get_ptr_mut(0) {
        // SAFETY: one u64 of map memory; a single writer (the one GC task).
        unsafe { *p = task };
    }
    0
}

#[fexit(function = "gc_worker")]
pub fn gc_worker_exit(_ctx: FExitContext) -> i32 {
    if let Some(p) = GC_SCOPE.get_ptr_mut(0) {
        // SAFETY: as above.
        unsafe { *p = 0 };
    }
    0
}

/// `nf_ct_delete()` returning true in the GC's task, outside the packet
/// path, of an entry whose timeout had not run out: one GC eviction.
#[inline(always)]
fn try_gc_delete_exit(ctx: &FExitContext) -> Result<(), i64> {
    let p = GC_SCOPE.get_ptr_mut(0).ok_or(0i64)?;
    // SAFETY: one u64 of map memory.
    let gc_task = unsafe { *p };
    if gc_task == 0 || bpf_get_current_pid_tgid() != gc_task {
        return Ok(());
    }
    // A softirq that interrupts the kworker runs as the same task: a
    // delete from the packet path (nf_conntrack_in() open on this CPU,
    // e.g. the TCP tracker killing an entry on RST) is not the GC's.
    let ct_in = slot(scope::CT_IN_SKB)?;
    // SAFETY: per-CPU slot; see FEXIT_SCOPE.
    if unsafe { *ct_in } != 0 {
        return Ok(());
    }
    if ret(ctx)? as u8 == 0 {
        return Ok(());
    }
    let ct: u64 = ctx.arg(0);
    // nf_ct_gc_expired(): expiry, not eviction (see try_ct_delete_exit).
    if !ct_live(ct)? {
        return Ok(());
    }
    let ev = scratch(kind::GC_EVICT)?;
    fill_from_ct(ev, ct)?;
    emit(ev)
}

// ---- insert_failed --------------------------------------------------------

/// Remembers whether the skb's entry was confirmed on entry:
/// __nf_conntrack_confirm() returns NF_DROP without counting anything when
/// another skb sharing the unconfirmed entry won the race (the
/// `WARN_ON_ONCE(nf_ct_is_confirmed(ct))` branch), and it sets
/// IPS_CONFIRMED before the clash checks, so the exit cannot tell.
#[fentry(function = "__nf_conntrack_confirm")]
pub fn ct_confirm_enter(ctx: FEntryContext) -> i32 {
    let _ = try_ct_confirm_enter(&ctx);
    0
}

fn try_ct_confirm_enter(ctx: &FEntryContext) -> Result<(), i64> {
    let skb: u64 = ctx.arg(0);
    let confirmed = match skb_ct::<Probe>(skb) {
        Some(ct) => ct_is_confirmed(ct)?,
        None => false,
    };
    let s = slot(scope::CONFIRM_SKB)?;
    let c = slot(scope::CONFIRM_WAS_CONFIRMED)?;
    // SAFETY: per-CPU slots; see FEXIT_SCOPE.
    unsafe {
        *s = skb;
        *c = confirmed as u64;
    }
    Ok(())
}

/// `__nf_conntrack_confirm(skb)` returning NF_DROP for an entry that was
/// unconfirmed on entry: every such return counts `insert_failed`
/// (nf_ct_ext_valid_pre() failure, dying entry, chain too long, or a clash
/// nf_ct_resolve_clash() could not resolve).
#[fexit(function = "__nf_conntrack_confirm")]
pub fn ct_confirm_exit(ctx: FExitContext) -> i32 {
    let _ = try_ct_confirm_exit(&ctx);
    0
}

fn try_ct_confirm_exit(ctx: &FExitContext) -> Result<(), i64> {
    if ret(ctx)? as u32 != NF_DROP {
        return Ok(());
    }
    let skb: u64 = ctx.arg(0);
    let s = slot(scope::CONFIRM_SKB)?;
    let c = slot(scope::CONFIRM_WAS_CONFIRMED)?;
    // SAFETY: per-CPU slots; see FEXIT_SCOPE.
    let (entry_skb, was_confirmed) = unsafe { (*s, *c) };
    if entry_skb == skb && was_confirmed != 0 {
        return Ok(());
    }
    // nf_conntrack_confirm() only calls in with an entry attached; after a
    // lost clash it is still the loser (nf_ct_set() only runs on NF_ACCEPT).
    let Some(ct) = skb_ct::<Probe>(skb) else {
        return Ok(());
    };
    let ev = scratch(kind::INSERT_FAILED)?;
    fill_from_ct(ev, ct)?;
    fill_packet::<Probe>(ev, skb);
    emit(ev)
}
