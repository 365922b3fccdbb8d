//! Bench-only programs, in an object of their own (`bench-hooks`, built
//! beside the tracer's by aya-build; never in the tracer's object): empty
//! programs on the tracer's hooks. With `kernel.bpf_stats_enabled` their
//! ns per run is what a hook costs with nothing in it — the floor under
//! the tracer's programs (`cargo xtask bench newflow`, through
//! conntrack-trace/examples/empty_hooks.rs).
#![no_std]
#![no_main]

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

/// The floor under the tracer's `kfree_skb`.
#[btf_tracepoint(function = "kfree_skb")]
pub fn kfree_skb_empty(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// The floor under the tracer's `kmem_cache_free`.
#[btf_tracepoint(function = "kmem_cache_free")]
pub fn kmem_free_empty(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
