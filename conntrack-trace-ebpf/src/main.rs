//! Kernel side of conntrack-trace. Two backends, mirroring
//! `conntrack-trace/src/backend/`, share the maps, the event builders and
//! the counters ([`common`]):
//!
//! * [`tracepoint`]: BTF tracepoints, for kernels that refuse fentry/fexit:
//!   `kfree_skb` (a netfilter drop; its conntrack attachment and
//!   conntrack's own counters say why) and `kmem_cache_free` on the
//!   `nf_conntrack` slab under `early_drop()` or `gc_worker()` (the
//!   evicted entry).
//! * [`fexit`]: fentry/fexit on conntrack's own functions: exact hooks on
//!   the allocation, eviction and confirmation failure points.
//!
//! Kernel struct offsets arrive in `OFFSETS` and settings in `CONFIG`, both
//! written by user space from the running kernel's BTF before load.
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::map,
    maps::{LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use conntrack_trace_common::{Config, Offsets, RawEvent, SOURCE_COUNTS_MAX, SourceKey, counter};

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
    ct_reply_tuple: 0,
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
    ct_free_start: 0,
    ct_free_end: 0,
    event_budget: 0,
    flow_seed: 0,
    gc_worker_start: 0,
    gc_worker_end: 0,
    ring_wake_bytes: 0,
};

/// One record per dropped packet / evicted entry. Size is set by user space.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Exact per-source counts, per CPU, of every drop of an emitted kind
/// (emitted, lost or shed): what the top sources come from once the
/// events are a sample.
#[map]
static SOURCE_COUNTS: LruPerCpuHashMap<SourceKey, u64> =
    LruPerCpuHashMap::with_max_entries(SOURCE_COUNTS_MAX, 0);

/// Exact per-CPU counters, indexed by `counter::*`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Scratch space for the event being built (200 bytes: too large to build
/// and copy on the 512-byte BPF stack).
#[map]
static SCRATCH: PerCpuArray<RawEvent> = PerCpuArray::with_max_entries(1, 0);

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

/// A diagnostic line for `--bpf-log` (aya-log's `error!` .. `debug!`),
/// only on the rare paths: never on a table-full flood's per-drop path.
/// Behind [`flags::BPF_LOG`](conntrack_trace_common::flags::BPF_LOG) in
/// the read-only `CONFIG`: the verifier reads the frozen value, finds the
/// branch dead when logging is off and removes it (with the ring reserve
/// and the copies), so the programs cost what they cost without logging.
/// (aya-log also tests its own `AYA_LOG_LEVEL`, set from `--bpf-log` by
/// user space: levels below it are removed the same way.) aya-log-ebpf
/// 0.2 takes a context but does not use it: `&()`.
///
/// The line is written by a function of its own (`#[inline(never)]`, a
/// BPF subprogram; its arguments as `i64`), so the call site holds only
/// the gate and one call. Even so, gated calls inside a hot function's
/// branches make LLVM lay it out anew: `kfree_skb`'s netfilter drop
/// returns its decision and logs it after the work instead
/// (`log_drop` in tracepoint.rs).
macro_rules! blog {
    ($level:ident, $fmt:literal) => {
        if conf!(flags) & conntrack_trace_common::flags::BPF_LOG != 0 {
            #[inline(never)]
            fn line() {
                aya_log_ebpf::$level!(&(), $fmt);
            }
            line();
        }
    };
    ($level:ident, $fmt:literal, $a:expr) => {
        if conf!(flags) & conntrack_trace_common::flags::BPF_LOG != 0 {
            #[inline(never)]
            fn line(a: i64) {
                aya_log_ebpf::$level!(&(), $fmt, a);
            }
            line($a as i64);
        }
    };
    ($level:ident, $fmt:literal, $a:expr, $b:expr) => {
        if conf!(flags) & conntrack_trace_common::flags::BPF_LOG != 0 {
            #[inline(never)]
            fn line(a: i64, b: i64) {
                aya_log_ebpf::$level!(&(), $fmt, a, b);
            }
            line($a as i64, $b as i64);
        }
    };
}

/// Whether the `once` slot's line is still to be logged; marks it done.
/// (Two CPUs racing may both log it: a duplicate line, never a lost one.)
#[inline(always)]
fn first_time(once: *mut u32) -> bool {
    // SAFETY: a global of ours; aligned u32 accesses.
    unsafe {
        if core::ptr::read_volatile(once) != 0 {
            return false;
        }
        core::ptr::write_volatile(once, 1);
    }
    true
}

// After the macros above: `macro_rules!` are visible to modules declared
// later in the file.
mod budget;
mod common;
mod fexit;
mod tracepoint;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
