//! Kernel side of conntrack-trace. Two backends share the maps, the event
//! builders and the counters:
//!
//! * BTF tracepoints (this file), for kernels that refuse fentry/fexit:
//! * `kfree_skb` (reason `SKB_DROP_REASON_NETFILTER_DROP`): a packet dropped by
//!   a netfilter verdict. Its conntrack attachment (`skb->_nfct`) says why:
//!   none → `table_full`, unconfirmed → `insert_failed`, confirmed → a rule.
//! * `kmem_cache_free` on the `nf_conntrack` slab whose stack passes through
//!   `early_drop()` → `early_drop` (the evicted entry).
//!
//! * fentry/fexit on conntrack's own functions ([`fexit`]): exact hooks on
//!   the allocation, eviction and confirmation failure points.
//!
//! Kernel struct offsets arrive in `OFFSETS` and settings in `CONFIG`, both
//! written by user space from the running kernel's BTF before load.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::BtfTracePointContext,
};
use conntrack_trace_common::{
    Config, MAX_STACK_DEPTH, Offsets, PKT_BYTES, RawEvent, counter, flags, kind, l3,
};

/// Offsets of kernel struct members (see `Offsets`); zero until user space
/// fills them, in which case the programs are never attached.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets {
    skb_nfct: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_dev: 0,
    skb_sk: 0,
    dev_net: 0,
    sk_net: 0,
    net_inum: 0,
    ct_status: 0,
    ct_net: 0,
    ct_tuple: 0,
    tuple_src_u3: 0,
    tuple_src_port: 0,
    tuple_l3num: 0,
    tuple_dst_u3: 0,
    tuple_dst_port: 0,
    tuple_protonum: 0,
    cache_name: 0,
    ct_timeout: 0,
    skb_len: 0,
    skb_data: 0,
    skb_tail: 0,
    net_ct_stat: 0,
    stat_drop: 0,
    array_pptrs: 0,
    _pad: 0,
};

#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    netfilter_drop_reason: 0,
    early_drop_start: 0,
    early_drop_end: 0,
    confirmed_bit: 0,
    stack_depth: 0,
    flags: 0,
    nf_hook_slow_start: 0,
    nf_hook_slow_end: 0,
};

/// One record per dropped packet / evicted entry. Size is set by user space.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Exact per-CPU counters, indexed by `counter::*`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// The `struct kmem_cache *` of the nf_conntrack slab, learned on first sight.
#[map]
static CT_CACHE: Array<u64> = Array::with_max_entries(1, 0);

/// Scratch space for the event being built (160 bytes: too large to build
/// and copy on the 512-byte BPF stack).
#[map]
static SCRATCH: PerCpuArray<RawEvent> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for kernel stacks (too large for the 512-byte BPF stack).
#[map]
static STACK: PerCpuArray<[u64; MAX_STACK_DEPTH]> = PerCpuArray::with_max_entries(1, 0);

/// Per netns inode, per CPU: conntrack's `drop` counter (`net->ct.stat`,
/// this CPU's copy) as of the last netfilter drop seen on this CPU in that
/// netns. User space seeds it for the namespaces that exist at start; a
/// netns made later starts from 0, as its counters do (alloc_percpu()).
#[map]
static CT_DROP_SEEN: PerCpuHashMap<u32, u32> = PerCpuHashMap::with_max_entries(16_384, 0);

/// One slot whose own address tells this CPU's per-CPU offset (see
/// [`this_cpu_offset`]).
#[map]
static PCPU_PROBE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `IP_CT_UNTRACKED` (include/uapi/linux/netfilter/nf_conntrack_common.h):
/// `_nfct` of a packet exempted from tracking (`notrack`) — not ours.
const IP_CT_UNTRACKED: u64 = 7;
/// `NFCT_INFOMASK` (include/linux/skbuff.h): low bits of `_nfct` hold ctinfo.
const NFCT_INFOMASK: u64 = 7;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

macro_rules! off {
    ($field:ident) => {
        // SAFETY: reading a field of a read-only global; volatile so the
        // compiler does not constant-fold the zero initialiser that user space
        // overwrites at load time.
        unsafe { core::ptr::read_volatile(&raw const crate::OFFSETS.$field) as u64 }
    };
}

macro_rules! conf {
    ($field:ident) => {
        // SAFETY: see `off!`.
        unsafe { core::ptr::read_volatile(&raw const crate::CONFIG.$field) }
    };
}

#[inline(always)]
fn read<T>(addr: u64) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel tolerates any address and reports faults.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|e| e as i64)
}

#[inline(always)]
fn add(index: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: see `bump`.
        unsafe { *p += n };
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; tracing programs run with migration disabled
        // and the kernel refuses to nest the same program on one CPU.
        unsafe { *p += 1 };
    }
}

/// This CPU's scratch event, zeroed. Tracing programs do not nest on a CPU
/// (the kernel skips a recursive run), so the slot is ours until emitted.
#[inline(always)]
fn scratch(k: u8) -> Result<&'static mut RawEvent, i64> {
    let p = SCRATCH.get_ptr_mut(0).ok_or(0i64)?;
    // SAFETY: valid per-CPU map value, exclusively ours (see above).
    let ev = unsafe { &mut *p };
    // SAFETY: RawEvent is plain integers; all-zero is a valid value. A
    // write_bytes is a memset, not a 160-byte temporary on the BPF stack.
    unsafe { core::ptr::write_bytes(p, 0, 1) };
    ev.kind = k;
    Ok(ev)
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let _ = try_kfree_skb(&ctx);
    0
}

fn try_kfree_skb(ctx: &BtfTracePointContext) -> Result<(), i64> {
    // ctx accesses must use constant offsets, so argument positions are
    // fixed here and user space checks them against BTF before loading:
    // (skb, location, reason[, rx_sk]) since the reason was added in 5.17.
    let reason: u64 = ctx.arg(2);
    if reason as u32 != conf!(netfilter_drop_reason) {
        return Ok(());
    }
    let skb: u64 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let nfct: u64 = read(skb + off!(skb_nfct))?;
    let ct = nfct & !NFCT_INFOMASK;
    if ct == 0 && nfct & NFCT_INFOMASK == IP_CT_UNTRACKED {
        return Ok(());
    }
    let net = skb_net(skb);
    // Did conntrack count this drop? Read on every netfilter drop, so that
    // the baseline also absorbs what earlier drops here moved.
    // (An i64 with -1 for "unreadable" rather than an Option: LLVM may
    // read an Option's payload on the None path, which the verifier
    // rejects as an uninitialised register.)
    let moved = ct_drops_since_last(net);
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
        let from_hook = conf!(nf_hook_slow_start) == 0
            || (location >= conf!(nf_hook_slow_start) && location < conf!(nf_hook_slow_end));
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
            if conf!(flags) & flags::EMIT_RULE_DROPS == 0 {
                bump(counter::seen(kind::RULE_DROP));
                return Ok(());
            }
            let ev = scratch(kind::RULE_DROP)?;
            fill_from_skb(ev, skb);
            fill_packet(ev, skb);
            ev.netns = net_inum(net);
            return emit(ev);
        }
        let ev = scratch(kind::TABLE_FULL)?;
        fill_from_skb(ev, skb);
        fill_packet(ev, skb);
        ev.netns = net_inum(net);
        return emit(ev);
    }
    if ct_is_confirmed(ct)? {
        // A confirmed entry: the ruleset dropped it, conntrack did not fail.
        if moved > 0 {
            add(counter::DROP_UNMATCHED, moved as u64);
        }
        if conf!(flags) & flags::EMIT_RULE_DROPS == 0 {
            bump(counter::seen(kind::RULE_DROP));
            return Ok(());
        }
        let ev = scratch(kind::RULE_DROP)?;
        fill_from_ct(ev, ct)?;
        fill_packet(ev, skb);
        return emit(ev);
    }
    // __nf_conntrack_confirm(): a clash it could not resolve returns NF_DROP
    // while the new, never-inserted (unconfirmed) entry is still attached
    // (`drop` counted once by nf_ct_resolve_clash(), not for chaintoolong).
    if moved > 1 {
        add(counter::DROP_UNMATCHED, (moved - 1) as u64);
    }
    let ev = scratch(kind::INSERT_FAILED)?;
    fill_from_ct(ev, ct)?;
    fill_packet(ev, skb);
    emit(ev)
}

/// This CPU's per-CPU offset (`__per_cpu_offset[cpu]`, which kallsyms does
/// not show without CONFIG_KALLSYMS_ALL): a per-CPU array lookup returns
/// `this_cpu_ptr(array->pptrs[0])` (kernel/bpf/arraymap.c,
/// percpu_array_map_lookup_elem()), so the slot's address minus the
/// array's own per-CPU pointer is the offset.
#[inline(always)]
fn this_cpu_offset() -> Option<u64> {
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
fn ct_drops_since_last(net: u64) -> i64 {
    match ct_drop_counter(net) {
        Some(d) => d,
        None => -1,
    }
}

#[inline(always)]
fn ct_drop_counter(net: u64) -> Option<i64> {
    if net == 0 {
        return None;
    }
    let inum = net_inum(net);
    let stat: u64 = read(net + off!(net_ct_stat)).ok()?;
    if stat == 0 {
        return None;
    }
    let drop: u32 = read(stat.wrapping_add(this_cpu_offset()?) + off!(stat_drop)).ok()?;
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

fn try_kmem_cache_free(ctx: &BtfTracePointContext) -> Result<(), i64> {
    // Fires on every slab free in the system: once the nf_conntrack cache is
    // known, everything else costs one load and one comparison.
    // (call_site, ptr, s) since 6.2; checked against BTF by user space.
    // Before 6.2 the third argument was the cache's name (`s->name`, a
    // pointer as stable as the cache itself) instead of the cache: the
    // FREE_BY_NAME variant learns that pointer instead (chosen by user space
    // from the tracepoint's BTF; the verifier prunes the other branch).
    let cache: u64 = ctx.arg(2);
    let by_name = conf!(flags) & flags::KMEM_FREE_BY_NAME != 0;
    let learned = CT_CACHE.get_ptr_mut(0).ok_or(0i64)?;
    // SAFETY: valid pointer into a one-element array map.
    let known = unsafe { *learned };
    if known != cache {
        // Learned and not ours: done, before any name is read. (Testing the
        // name first cost every foreign slab free two probe reads: ~140 ns
        // instead of ~70 ns per run, issue 15.)
        if known != 0 {
            return Ok(());
        }
        let is_ct = if by_name {
            is_conntrack_name(cache)
        } else {
            is_conntrack_cache(cache)
        };
        if !is_ct {
            return Ok(());
        }
        // SAFETY: as above.
        unsafe { *learned = cache };
    }
    bump(counter::CT_FREES);
    // `ptr` is `const void *`: before 6.18 btf_ctx_access() does not look
    // through the const to the void and refuses the ctx load ("invalid
    // bpf_context access off=8", seen on 6.1 and 6.12), so the argument is
    // copied out of the context instead.
    let obj: u64 = read(ctx.as_ptr() as u64 + 8)?;
    if !freed_by_early_drop(ctx) {
        return Ok(());
    }
    // early_drop_list() also frees entries it finds already expired
    // (nf_ct_gc_expired()) without counting them as early drops; only a
    // victim that was still live was evicted. nfct_time_stamp is the low 32
    // bits of jiffies (include/net/netfilter/nf_conntrack.h).
    let timeout: u32 = read(obj + off!(ct_timeout))?;
    // SAFETY: plain helper call.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_jiffies64() } as u32;
    if (timeout.wrapping_sub(now) as i32) <= 0 {
        return Ok(());
    }
    // The entry is being freed but its memory still holds the tuple: the
    // slab is SLAB_TYPESAFE_BY_RCU and nf_conntrack_free() does not clear it.
    let ev = scratch(kind::EARLY_DROP)?;
    fill_from_ct(ev, obj)?;
    emit(ev)
}

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

/// True when a return address on the kernel stack lies inside `early_drop()`
/// (net/netfilter/nf_conntrack_core.c: early_drop() → early_drop_list() →
/// nf_ct_put() → nf_ct_destroy() → nf_conntrack_free() → kmem_cache_free()).
#[inline(always)]
fn freed_by_early_drop(ctx: &BtfTracePointContext) -> bool {
    let Some(buf) = STACK.get_ptr_mut(0) else {
        return false;
    };
    let size = (MAX_STACK_DEPTH * 8) as u32;
    // SAFETY: buf points at MAX_STACK_DEPTH u64s of per-CPU map memory.
    let n =
        unsafe { aya_ebpf::helpers::generated::bpf_get_stack(ctx.as_ptr(), buf.cast(), size, 0) };
    if n <= 0 {
        return false;
    }
    let frames = (n as usize) / 8;
    let start = conf!(early_drop_start);
    let end = conf!(early_drop_end);
    let depth = conf!(stack_depth) as usize;
    let mut i = 0;
    while i < MAX_STACK_DEPTH {
        if i >= frames || i >= depth {
            break;
        }
        // SAFETY: i < MAX_STACK_DEPTH.
        let ip = unsafe { (*buf)[i] };
        if ip >= start && ip < end {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn emit(ev: &mut RawEvent) -> Result<(), i64> {
    // SAFETY: plain helper calls.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    ev.cpu = unsafe { bpf_get_smp_processor_id() };
    let k = ev.kind;
    bump(counter::seen(k));
    // bpf_ringbuf_output copies from the scratch slot. Flags 0 = adaptive
    // wakeup (kernel/bpf/ringbuf.c): user space is woken only when it had
    // consumed everything before this record, so a flood costs no wakeup per
    // event while it keeps up.
    if EVENTS.output::<RawEvent>(&*ev, 0).is_err() {
        bump(counter::lost(k));
    }
    Ok(())
}

/// Netns (`struct net *`, 0 when unknown) of a dropped packet: the device
/// it arrived on, else (locally generated, before ip_output() sets
/// skb->dev) its socket.
#[inline(always)]
fn skb_net(skb: u64) -> u64 {
    let Ok(dev) = read::<u64>(skb + off!(skb_dev)) else {
        return 0;
    };
    if dev != 0 {
        return read(dev + off!(dev_net)).unwrap_or(0);
    }
    match read::<u64>(skb + off!(skb_sk)) {
        Ok(sk) if sk != 0 => read(sk + off!(sk_net)).unwrap_or(0),
        _ => 0,
    }
}

/// Addresses and ports from the packet's own headers (a table-full packet has
/// no conntrack entry to read them from).
#[inline(always)]
fn fill_from_skb(ev: &mut RawEvent, skb: u64) {
    let Ok(head) = read::<u64>(skb + off!(skb_head)) else {
        return;
    };
    let Ok(nh) = read::<u16>(skb + off!(skb_network_header)) else {
        return;
    };
    let ip = head + nh as u64;
    let Ok(b0) = read::<u8>(ip) else { return };
    let (l4, l4proto) = match b0 >> 4 {
        4 => {
            ev.l3 = l3::IPV4;
            let Ok(proto) = read::<u8>(ip + 9) else {
                return;
            };
            ev.l4 = proto;
            if let Ok(a) = read::<[u8; 4]>(ip + 12) {
                ev.src[..4].copy_from_slice(&a);
            }
            if let Ok(a) = read::<[u8; 4]>(ip + 16) {
                ev.dst[..4].copy_from_slice(&a);
            }
            // Only the first fragment carries the L4 header.
            let frag = read::<[u8; 2]>(ip + 6).map(u16::from_be_bytes).unwrap_or(0);
            if frag & 0x1fff != 0 {
                return;
            }
            (ip + ((b0 & 0x0f) as u64) * 4, proto)
        }
        6 => {
            ev.l3 = l3::IPV6;
            let Ok(next) = read::<u8>(ip + 6) else { return };
            ev.l4 = next;
            if let Ok(a) = read::<[u8; 16]>(ip + 8) {
                ev.src = a;
            }
            if let Ok(a) = read::<[u8; 16]>(ip + 24) {
                ev.dst = a;
            }
            (ip + 40, next)
        }
        _ => return,
    };
    match l4proto {
        // tcp, udp, dccp, sctp, udplite: ports are the first two u16s.
        6 | 17 | 33 | 132 | 136 => {
            if let Ok(p) = read::<[u8; 4]>(l4) {
                ev.sport = u16::from_be_bytes([p[0], p[1]]);
                ev.dport = u16::from_be_bytes([p[2], p[3]]);
            }
        }
        // icmp, icmpv6: type/code and the echo identifier.
        1 | 58 => {
            if let Ok(p) = read::<[u8; 6]>(l4) {
                ev.dport = u16::from_be_bytes([p[0], p[1]]);
                ev.sport = u16::from_be_bytes([p[4], p[5]]);
            }
        }
        _ => {}
    }
}

/// The first bytes of the packet from its network header on, for capture
/// files. Only the linear part is read (`head + network_header` up to
/// `head + tail`); a header split into page fragments is cut short there.
#[inline(always)]
fn fill_packet(ev: &mut RawEvent, skb: u64) {
    let (Ok(head), Ok(nh), Ok(tail), Ok(len), Ok(data)) = (
        read::<u64>(skb + off!(skb_head)),
        read::<u16>(skb + off!(skb_network_header)),
        read::<u32>(skb + off!(skb_tail)),
        read::<u32>(skb + off!(skb_len)),
        read::<u64>(skb + off!(skb_data)),
    ) else {
        return;
    };
    // skb->len counts from skb->data; netfilter hooks run with data at the
    // network header, but account for any difference.
    let data_off = data.wrapping_sub(head) as u32;
    let wire = (len + data_off).saturating_sub(nh as u32);
    let linear = tail.saturating_sub(nh as u32);
    let mut cap = if linear < wire { linear } else { wire };
    if cap > PKT_BYTES as u32 {
        cap = PKT_BYTES as u32;
    }
    ev.wire_len = wire;
    // A fixed-size read: it stays inside the skb's head buffer (which ends
    // in skb_shared_info), and only `caplen` bytes are used.
    // SAFETY: bpf_probe_read_kernel tolerates any source address.
    if unsafe { bpf_probe_read_kernel_buf((head + nh as u64) as *const u8, &mut ev.pkt) }.is_ok() {
        ev.caplen = cap as u16;
    }
}

/// The conntrack entry attached to a packet (`skb->_nfct` without the
/// ctinfo bits), if any.
#[inline(always)]
fn skb_ct(skb: u64) -> Option<u64> {
    let nfct: u64 = read(skb + off!(skb_nfct)).ok()?;
    let ct = nfct & !NFCT_INFOMASK;
    if ct == 0 { None } else { Some(ct) }
}

/// `IPS_CONFIRMED` set: the entry is (or was being) inserted in the table.
#[inline(always)]
fn ct_is_confirmed(ct: u64) -> Result<bool, i64> {
    let status: u64 = read(ct + off!(ct_status))?;
    Ok(status & (1u64 << (conf!(confirmed_bit) & 63)) != 0)
}

/// Original-direction tuple and netns of a conntrack entry.
#[inline(always)]
fn fill_from_ct(ev: &mut RawEvent, ct: u64) -> Result<(), i64> {
    fill_from_tuple(ev, ct + off!(ct_tuple))?;
    let net: u64 = read(ct + off!(ct_net))?;
    ev.netns = net_inum(net);
    Ok(())
}

/// Inode of a `struct net *`, 0 when unreadable.
#[inline(always)]
fn net_inum(net: u64) -> u32 {
    if net == 0 {
        return 0;
    }
    read(net + off!(net_inum)).unwrap_or(0)
}

/// Addresses, protocol and ports of a `struct nf_conntrack_tuple`.
#[inline(always)]
fn fill_from_tuple(ev: &mut RawEvent, t: u64) -> Result<(), i64> {
    let family: u16 = read(t + off!(tuple_l3num))?;
    ev.l3 = match family {
        AF_INET => l3::IPV4,
        AF_INET6 => l3::IPV6,
        _ => 0,
    };
    ev.l4 = read(t + off!(tuple_protonum))?;
    ev.src = read(t + off!(tuple_src_u3))?;
    ev.dst = read(t + off!(tuple_dst_u3))?;
    // Both unions hold network-order ports, or the ICMP id (src) and
    // type/code bytes (dst): a big-endian read gives id and type<<8|code.
    ev.sport = u16::from_be_bytes(read(t + off!(tuple_src_port))?);
    ev.dport = u16::from_be_bytes(read(t + off!(tuple_dst_port))?);
    Ok(())
}

// After the macros above: `macro_rules!` are visible to modules declared
// later in the file.
mod fexit;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
