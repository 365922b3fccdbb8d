//! What both backends' programs share: kernel reads, the per-CPU counters,
//! the scratch event and its emission, and the event builders that read a
//! packet's headers or a conntrack entry's tuple.

use aya_ebpf::helpers::{
    bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
};
use conntrack_trace_common::{PKT_BYTES, RawEvent, SourceKey, counter, flags, l3};

/// include/uapi/linux/bpf.h: `bpf_ringbuf_query()`'s BPF_RB_AVAIL_DATA,
/// `bpf_ringbuf_output()`'s BPF_RB_NO_WAKEUP and BPF_RB_FORCE_WAKEUP.
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

use crate::{
    COUNTERS, EVENTS, SCRATCH, SOURCE_COUNTS,
    budget::{Admit, admit},
};

/// `IP_CT_UNTRACKED` (include/uapi/linux/netfilter/nf_conntrack_common.h):
/// `_nfct` of a packet exempted from tracking (`notrack`) — not ours.
pub(crate) const IP_CT_UNTRACKED: u64 = 7;
/// `NFCT_INFOMASK` (include/linux/skbuff.h): low bits of `_nfct` hold ctinfo.
pub(crate) const NFCT_INFOMASK: u64 = 7;
pub(crate) const AF_INET: u16 = 2;
pub(crate) const AF_INET6: u16 = 10;

#[inline(always)]
pub(crate) fn read<T>(addr: u64) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel tolerates any address and reports faults.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.map_err(|e| e as i64)
}

/// How a builder reads the kernel memory a pointer leads to. The same
/// builders serve pointers the verifier knows the type of and plain
/// numbers, and each caller says which it holds.
pub(crate) trait Mem {
    fn get<T>(addr: u64) -> Result<T, i64>;
}

/// `bpf_probe_read_kernel()`: any address — a pointer kept in a map
/// between two programs (fexit's scopes), an entry derived from `_nfct`'s
/// bits. A helper call each: ~40 ns on the flood's drop path (issue 21).
pub(crate) struct Probe;

impl Mem for Probe {
    #[inline(always)]
    fn get<T>(addr: u64) -> Result<T, i64> {
        read(addr)
    }
}

/// A plain load through a pointer the verifier typed from BTF: a
/// `tp_btf` argument (`struct sk_buff *skb` of `kfree_skb`) or a pointer
/// member read through one (`skb->dev`, `dev->nd_net.net`, `skb->sk`).
/// kernel/bpf/verifier.c, check_ptr_to_btf_access(): the offset (a frozen
/// `.rodata` value, so a constant to the verifier) is checked against the
/// struct's BTF, and the load is JITed as BPF_PROBE_MEM — an ordinary
/// load whose fault yields 0 — instead of a helper call. Only for such
/// pointers: on a number the verifier refuses the program at load.
pub(crate) struct Direct;

impl Mem for Direct {
    #[inline(always)]
    fn get<T>(addr: u64) -> Result<T, i64> {
        // SAFETY: see above; a faulting address reads as 0, never traps.
        Ok(unsafe { core::ptr::read_volatile(addr as *const T) })
    }
}

#[inline(always)]
pub(crate) fn add(index: u32, n: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: see `bump`.
        unsafe { *p += n };
    }
}

#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; tracing programs run with migration disabled
        // and the kernel refuses to nest the same program on one CPU.
        unsafe { *p += 1 };
    }
}

/// This CPU's scratch event, zeroed. Tracing programs do not nest on a CPU
/// (the kernel skips a recursive run), so the slot is ours until emitted.
#[inline(always)]
pub(crate) fn scratch(k: u8) -> Result<&'static mut RawEvent, i64> {
    let p = SCRATCH.get_ptr_mut(0).ok_or(0i64)?;
    // SAFETY: valid per-CPU map value, exclusively ours (see above).
    let ev = unsafe { &mut *p };
    // SAFETY: RawEvent is plain integers, 8-byte aligned, a multiple of 8
    // long; all-zero is a valid value. Word stores, not write_bytes: BPF
    // has no memset, so LLVM calls compiler-builtins' byte loop — 200
    // iterations, ~175 ns of every emitting run (issue 15). Volatile, so
    // that LLVM does not fold them back into that call.
    unsafe {
        let words = p.cast::<u64>();
        let mut i = 0;
        while i < core::mem::size_of::<RawEvent>() / 8 {
            words.add(i).write_volatile(0);
            i += 1;
        }
    }
    ev.kind = k;
    Ok(ev)
}

/// Counts the drop `ev` describes (its kind, its source) and, within the
/// event budget ([`crate::budget`]), sends it to user space; beyond it the
/// drop is shed (counted only).
#[inline(always)]
pub(crate) fn emit(ev: &mut RawEvent) -> Result<(), i64> {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let k = ev.kind;
    bump(counter::seen(k));
    count_source(ev);
    match admit(ev, now) {
        Admit::Emit(denom) => ev.sample_denom = denom,
        Admit::Shed => {
            bump(counter::shed(k));
            return Ok(());
        }
        Admit::ShedByBucket => {
            bump(counter::shed(k));
            bump(counter::SHED_BY_BUCKET);
            return Ok(());
        }
    }
    ev.ts_ns = now;
    // SAFETY: plain helper call.
    ev.cpu = unsafe { bpf_get_smp_processor_id() };
    // bpf_ringbuf_output copies from the scratch slot. Flags 0 = adaptive
    // wakeup (kernel/bpf/ringbuf.c, bpf_ringbuf_commit()): user space is
    // woken only when it had consumed everything before this record, so a
    // flood costs no wakeup per event while it keeps up. `--ring-wakeup
    // poll`: no wakeup at all (the reader polls on a timer) unless the ring
    // is past its threshold (one bpf_ringbuf_query() more per event).
    let wake = if conf!(flags) & flags::RING_POLL == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA) > conf!(ring_wake_bytes) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<RawEvent>(&*ev, wake).is_err() {
        bump(counter::lost(k));
    }
    Ok(())
}

/// Counts the event under its source in `SOURCE_COUNTS` (this CPU's value:
/// no atomics; user space sums the CPUs).
#[inline(always)]
fn count_source(ev: &RawEvent) {
    let key = SourceKey {
        netns: ev.netns,
        kind: ev.kind,
        l3: ev.l3,
        l4: ev.l4,
        _pad: 0,
        dport: ev.dport,
        _pad2: 0,
        src: ev.src,
    };
    match SOURCE_COUNTS.get_ptr_mut(&key) {
        // SAFETY: this CPU's value of an existing entry; programs do not
        // nest on a CPU.
        Some(p) => unsafe { *p += 1 },
        None => {
            let _ = SOURCE_COUNTS.insert(&key, &1, 0);
        }
    }
}

/// Netns (`struct net *`, 0 when unknown) of a dropped packet: the device
/// it arrived on, else (locally generated, before ip_output() sets
/// skb->dev) its socket.
#[inline(always)]
pub(crate) fn skb_net<M: Mem>(skb: u64) -> u64 {
    let Ok(dev) = M::get::<u64>(skb + off!(skb_dev)) else {
        return 0;
    };
    if dev != 0 {
        return M::get(dev + off!(dev_net)).unwrap_or(0);
    }
    match M::get::<u64>(skb + off!(skb_sk)) {
        Ok(sk) if sk != 0 => M::get(sk + off!(sk_net)).unwrap_or(0),
        _ => 0,
    }
}

/// The packet's bytes, and its addresses and ports parsed from those bytes
/// (a table-full packet has no conntrack entry to read them from). One
/// copy of the first [`PKT_BYTES`] instead of a probe read per field: the
/// drop path pays for every helper call (issue 15). A transport header
/// past the linear part (rare: netfilter runs after ip_rcv() pulled the IP
/// header) is read from memory instead.
#[inline(always)]
pub(crate) fn fill_from_skb<M: Mem>(ev: &mut RawEvent, skb: u64) {
    fill_packet::<M>(ev, skb);
    let n = ev.caplen as usize;
    let Some(&b0) = ev.pkt.first().filter(|_| n >= 1) else {
        return;
    };
    let (l4, l4proto) = match b0 >> 4 {
        4 if n >= 20 => {
            ev.l3 = l3::IPV4;
            let proto = ev.pkt[9];
            ev.l4 = proto;
            // Field to field (both aligned in RawEvent): word copies, not
            // a byte loop through a temporary.
            ev.src[..4].copy_from_slice(&ev.pkt[12..16]);
            ev.dst[..4].copy_from_slice(&ev.pkt[16..20]);
            // Only the first fragment carries the L4 header.
            if u16::from_be_bytes([ev.pkt[6], ev.pkt[7]]) & 0x1fff != 0 {
                return;
            }
            (((b0 & 0x0f) as usize) * 4, proto)
        }
        6 if n >= 40 => {
            ev.l3 = l3::IPV6;
            let next = ev.pkt[6];
            ev.l4 = next;
            ev.src.copy_from_slice(&ev.pkt[8..24]);
            ev.dst.copy_from_slice(&ev.pkt[24..40]);
            (40, next)
        }
        _ => return,
    };
    // tcp, udp, dccp, sctp, udplite: ports are the first two u16s; icmp,
    // icmpv6: type/code, then the echo identifier at 4.
    let want = match l4proto {
        6 | 17 | 33 | 132 | 136 => 4,
        1 | 58 => 6,
        _ => return,
    };
    // The first three big-endian u16s of the transport header. Indexed in
    // place (a [u8; 6] temporary cost a memset and a memcpy call, both
    // byte loops in BPF).
    let h: [u16; 3] = match ev.pkt.get(l4..l4 + 6).filter(|_| l4 + want <= n) {
        Some(b) => [
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
            u16::from_be_bytes([b[4], b[5]]),
        ],
        None => {
            let (Ok(head), Ok(nh)) = (
                M::get::<u64>(skb + off!(skb_head)),
                M::get::<u16>(skb + off!(skb_network_header)),
            ) else {
                return;
            };
            match read::<[u16; 3]>(head + nh as u64 + l4 as u64) {
                Ok(b) => b.map(u16::from_be),
                Err(_) => return,
            }
        }
    };
    if want == 4 {
        ev.sport = h[0];
        ev.dport = h[1];
    } else {
        ev.dport = h[0];
        ev.sport = h[2];
    }
}

/// The first bytes of the packet from its network header on, for capture
/// files. Only the linear part is read (`head + network_header` up to
/// `head + tail`); a header split into page fragments is cut short there.
#[inline(always)]
pub(crate) fn fill_packet<M: Mem>(ev: &mut RawEvent, skb: u64) {
    let (Ok(head), Ok(nh), Ok(tail), Ok(len), Ok(data)) = (
        M::get::<u64>(skb + off!(skb_head)),
        M::get::<u16>(skb + off!(skb_network_header)),
        M::get::<u32>(skb + off!(skb_tail)),
        M::get::<u32>(skb + off!(skb_len)),
        M::get::<u64>(skb + off!(skb_data)),
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
pub(crate) fn skb_ct<M: Mem>(skb: u64) -> Option<u64> {
    let nfct: u64 = M::get(skb + off!(skb_nfct)).ok()?;
    let ct = nfct & !NFCT_INFOMASK;
    if ct == 0 { None } else { Some(ct) }
}

/// `IPS_CONFIRMED` set: the entry is (or was being) inserted in the table.
#[inline(always)]
pub(crate) fn ct_is_confirmed(ct: u64) -> Result<bool, i64> {
    let status: u64 = read(ct + off!(ct_status))?;
    Ok(status & (1u64 << (conf!(confirmed_bit) & 63)) != 0)
}

/// Original-direction tuple and netns of a conntrack entry.
#[inline(always)]
pub(crate) fn fill_from_ct(ev: &mut RawEvent, ct: u64) -> Result<(), i64> {
    fill_from_tuple(ev, ct + off!(ct_tuple))?;
    // The reply direction: behind NAT the only place the translated
    // addresses are (nf_nat_setup_info() rewrites it before confirm).
    let r = ct + off!(ct_reply_tuple);
    if let (Ok(src), Ok(dst), Ok(sport), Ok(dport)) = (
        read::<[u8; 16]>(r + off!(tuple_src_u3)),
        read::<[u8; 16]>(r + off!(tuple_dst_u3)),
        read::<[u8; 2]>(r + off!(tuple_src_port)),
        read::<[u8; 2]>(r + off!(tuple_dst_port)),
    ) {
        ev.reply_src = src;
        ev.reply_dst = dst;
        ev.reply_sport = u16::from_be_bytes(sport);
        ev.reply_dport = u16::from_be_bytes(dport);
        ev.has_reply = 1;
    }
    let net: u64 = read(ct + off!(ct_net))?;
    ev.netns = net_inum::<Probe>(net);
    Ok(())
}

/// Inode of a `struct net *`, 0 when unreadable.
#[inline(always)]
pub(crate) fn net_inum<M: Mem>(net: u64) -> u32 {
    if net == 0 {
        return 0;
    }
    M::get(net + off!(net_inum)).unwrap_or(0)
}

/// Addresses, protocol and ports of a `struct nf_conntrack_tuple`.
#[inline(always)]
pub(crate) fn fill_from_tuple(ev: &mut RawEvent, t: u64) -> Result<(), i64> {
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

/// True while the entry has not expired: early_drop_list() also frees (or
/// hands to nf_ct_gc_expired()) entries it finds already expired, without
/// counting them as early drops, so only a victim still live was evicted.
/// nfct_time_stamp is the low 32 bits of jiffies and `timeout` the u32
/// jiffy at which the entry expires (include/net/netfilter/nf_conntrack.h,
/// nf_ct_is_expired()).
#[inline(always)]
pub(crate) fn ct_live(ct: u64) -> Result<bool, i64> {
    let timeout: u32 = read(ct + off!(ct_timeout))?;
    // SAFETY: plain helper call.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_jiffies64() } as u32;
    Ok((timeout.wrapping_sub(now) as i32) > 0)
}
