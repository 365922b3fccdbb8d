//! The event budget (issue 21): count every drop, emit a bounded sample.
//!
//! Per CPU, `Config::event_budget` events per second. Below it every drop
//! is an event, exactly as without a budget. Above it, events are sampled
//! by flow: a drop is kept when the hash of its flow, `h` in `[0, 2^32)`,
//! satisfies `h · denom < 2^32`, so one flow in `denom` is kept and every
//! drop of a kept flow (its retries included) arrives. The rest are shed:
//! counted (`counter::shed`, the per-source counts), never emitted.
//!
//! * `denom` is a power of two and adapts once per [`WINDOW_NS`] to the
//!   rate of the window before: the smallest power of two that brings the
//!   sample's expected rate to at most 80 % of the budget, so that the
//!   bucket below rarely has to cut into a sampled flow (a cut keeps a
//!   flow's first tries and sheds its retries: attempts fall, flows do
//!   not, and the amplification factor reads low — 3.56 for a true 4 in
//!   the bench when the sample aimed at the whole budget). It rises at once
//!   and falls only when a quarter more traffic would still fit the lower
//!   value, so a steady flood keeps one `denom` (and one set of kept
//!   flows) instead of flipping between two. Powers of two because the
//!   denominator is per CPU: CPUs at similar rates then keep the *same*
//!   flows, and where they differ one CPU's kept flows are a subset of the
//!   other's (keeping `h · 2^k < 2^32` is "the top k bits of `h` are 0"),
//!   so a flow whose retries move CPU is kept whole or not at all by the
//!   CPU with the smaller denominator — with any integers, 20 and 21 would
//!   each keep flows the other sheds.
//! * A token bucket (the budget per second, a quarter second deep) caps
//!   what is emitted whatever the hash does: the start of a flood, before
//!   `denom` caught up, and a single flow above the budget on its own.
//!   Those drops are shed too, and also counted in
//!   `counter::SHED_BY_BUCKET`. The bucket running dry is itself news that
//!   the rate is above the budget: `denom` is raised then and there from
//!   the window so far, instead of at the window's end — otherwise the rest
//!   of that window would emit whichever drop finds a refilled token, one
//!   try here and one there, each counted as a flow of one attempt.
//! * Each event carries `sample_denom`: the number of drops it stands for
//!   (1 while every drop is an event), so user space can weigh flows.
//!
//! The flow is the one user space's amplification detector keys on
//! (conntrack-trace/src/amplify.rs, `flow_fingerprint()`), so that a
//! sampled flow's retries are all there for it: for a DNS query (UDP to
//! any port, a standard query with one question in the captured bytes)
//! the client and server addresses, the port and the question name —
//! resolvers (dig, BIND, unbound) retry with a new DNS id and often a new
//! source port, so the 5-tuple would split one query's retries into
//! unrelated flows; otherwise the 5-tuple. The question's type is left
//! out: a coarser key keeps whole flows together just the same.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use conntrack_trace_common::{MAX_EVENT_BUDGET, PKT_BYTES, RawEvent, l3};

/// Length of the window over which the drop rate is measured.
pub(crate) const WINDOW_NS: u64 = 100_000_000;
/// Depth of the token bucket, in ns of budget (a quarter second).
const BUCKET_NS: u64 = 250_000_000;
/// One event's worth of tokens: tokens are kept in event-nanoseconds
/// (events/s × ns), so that refilling needs no division.
const TOKEN: u64 = 1_000_000_000;
/// The largest sampling denominator, a power of two
/// (`RawEvent::sample_denom` is a u16): beyond `budget × 32768` drops/s
/// the bucket sheds the rest.
const MAX_DENOM: u64 = 1 << 15;
/// The share of the budget the flow sample aims at, in fifths (80 %): the
/// rest is headroom for bursts within a window.
const AIM_FIFTHS: u64 = 4;
/// The shortest stretch a rate is measured over when the bucket runs dry
/// early in a window (1 ms): a burst of a few drops is not a rate.
const MIN_RATE_NS: u64 = 1_000_000;

/// One CPU's budget state (a per-CPU array slot: no atomics, programs do
/// not nest on a CPU).
#[repr(C)]
pub struct State {
    /// Start of the current window (`bpf_ktime_get_ns()`).
    win_start: u64,
    /// Drops seen in the current window.
    win_seen: u64,
    /// Sampling denominator in force (0 before the first window: 1).
    denom: u64,
    /// Tokens, in event-nanoseconds.
    tokens: u64,
    /// When the tokens were last refilled.
    refilled: u64,
}

#[map]
static BUDGET: PerCpuArray<State> = PerCpuArray::with_max_entries(1, 0);

/// What the budget lets through.
pub(crate) enum Admit {
    /// Emit, standing for this many drops.
    Emit(u16),
    /// Shed: the flow is not sampled.
    Shed,
    /// Shed by the token bucket.
    ShedByBucket,
}

/// Decides whether `ev` (its flow fields filled) is emitted at `now`.
#[inline(always)]
pub(crate) fn admit(ev: &RawEvent, now: u64) -> Admit {
    let budget = conf!(event_budget) as u64;
    // A frozen .rodata value: with `--event-budget 0` the verifier prunes
    // everything below, and the run is what it was without a budget.
    if budget == 0 {
        return Admit::Emit(1);
    }
    let budget = if budget > MAX_EVENT_BUDGET as u64 {
        MAX_EVENT_BUDGET as u64
    } else {
        budget
    };
    let Some(s) = BUDGET.get_ptr_mut(0) else {
        return Admit::Emit(1);
    };
    // SAFETY: this CPU's slot; programs do not nest on a CPU.
    let s = unsafe { &mut *s };
    let elapsed = now.wrapping_sub(s.win_start);
    if elapsed >= WINDOW_NS {
        s.denom = next_denom(s.denom, s.win_seen, elapsed, budget);
        s.win_start = now;
        s.win_seen = 0;
    }
    s.win_seen += 1;
    let denom = if s.denom == 0 { 1 } else { s.denom };
    if denom > 1 && (flow_hash(ev) as u64) * denom >= 1 << 32 {
        return Admit::Shed;
    }
    // Refill: at most a bucket's worth, so no product overflows. The
    // first drop finds the bucket full (at least one event, whatever the
    // budget).
    let mut dt = now.wrapping_sub(s.refilled);
    if dt > BUCKET_NS {
        dt = BUCKET_NS;
    }
    let cap = budget * BUCKET_NS;
    let cap = if cap < TOKEN { TOKEN } else { cap };
    let mut tokens = if s.refilled == 0 {
        cap
    } else {
        s.tokens + dt * budget
    };
    s.refilled = now;
    if tokens > cap {
        tokens = cap;
    }
    if tokens < TOKEN {
        s.tokens = tokens;
        // Above the budget now: sample by flow from here on (see the
        // module comment). Only ever raised here; the window's end may
        // lower it again.
        let so_far = now.wrapping_sub(s.win_start);
        let so_far = if so_far < MIN_RATE_NS {
            MIN_RATE_NS
        } else {
            so_far
        };
        let raised = next_denom(denom, s.win_seen, so_far, budget);
        if raised > denom {
            s.denom = raised;
        }
        return Admit::ShedByBucket;
    }
    s.tokens = tokens - TOKEN;
    Admit::Emit(denom as u16)
}

/// The denominator for the next window, from `seen` drops over `elapsed`
/// ns: at least the power of two that brings the rate to 80 % ([`AIM_FIFTHS`]) of the
/// budget; kept while `1.25 · rate` still fits it (hysteresis, see the
/// module comment).
#[inline(always)]
fn next_denom(old: u64, seen: u64, elapsed: u64, budget: u64) -> u64 {
    // A long quiet spell is a low rate; clamping keeps the products below
    // 2^64 (2^34 ns × 2^24 /s; 2^32 drops × 1.25e9).
    let elapsed = if elapsed > 1 << 34 { 1 << 34 } else { elapsed };
    let seen = if seen > 1 << 32 { 1 << 32 } else { seen };
    // Events the sample may take over `elapsed`, in event-nanoseconds.
    let aim = budget * elapsed / 5 * AIM_FIFTHS;
    if aim == 0 {
        return 1;
    }
    let need = pow2_at_least((seen * TOKEN).div_ceil(aim));
    let lower = pow2_at_least((seen * (TOKEN + TOKEN / 4)).div_ceil(aim));
    old.min(lower).max(need).clamp(1, MAX_DENOM)
}

/// The smallest power of two ≥ `v` (1 for 0), for `v` ≤ 2^62; bits
/// smeared right rather than a leading-zero count, which BPF has no
/// instruction for.
#[inline(always)]
fn pow2_at_least(v: u64) -> u64 {
    if v <= 1 {
        return 1;
    }
    let mut x = v - 1;
    x |= x >> 1;
    x |= x >> 2;
    x |= x >> 4;
    x |= x >> 8;
    x |= x >> 16;
    x |= x >> 32;
    x + 1
}

const K: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
fn mix(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(K)
}

/// Two halves of a 16-byte address (offsets 24 and 40 of the 8-aligned
/// event: one load each).
#[inline(always)]
fn halves(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

/// The flow's hash, in `[0, 2^32)` (see the module comment for the key).
#[inline(always)]
fn flow_hash(ev: &RawEvent) -> u32 {
    let mut h = conf!(flow_seed) as u64 ^ K;
    let (s0, s1) = halves(&ev.src);
    let (d0, d1) = halves(&ev.dst);
    h = mix(h, s0);
    h = mix(h, s1);
    h = mix(h, d0);
    h = mix(h, d1);
    let question = if ev.l4 == 17 { dns_question(ev) } else { 0 };
    let ports = if question != 0 {
        ev.dport as u64
    } else {
        (ev.sport as u64) << 16 | ev.dport as u64
    };
    h = mix(h, (ev.l4 as u64) << 32 | ports);
    if question != 0 {
        h = question_hash(ev, question, h);
    }
    // murmur3's finaliser: every input bit reaches the high half.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 32) as u32
}

/// Where the question of a DNS query starts in `ev.pkt`, or 0 when the
/// datagram is not one: amplify.rs's `dns_question()` test (QR 0, opcode
/// 0, one question; IPv6 only with UDP right after the fixed header).
#[inline(always)]
fn dns_question(ev: &RawEvent) -> usize {
    let l4 = match ev.l3 {
        l3::IPV4 => ((ev.pkt[0] & 0x0f) as usize) * 4,
        l3::IPV6 if ev.pkt[6] == 17 => 40,
        _ => return 0,
    };
    let dns = l4 + 8;
    // The header and at least one byte of the name.
    if dns + 13 > ev.caplen as usize {
        return 0;
    }
    let (Some(&f), Some(&q0), Some(&q1)) = (
        ev.pkt.get(dns + 2),
        ev.pkt.get(dns + 4),
        ev.pkt.get(dns + 5),
    ) else {
        return 0;
    };
    // QR (0x80) and opcode (0x78) of the flags' first byte.
    if f & 0xf8 != 0 || q0 != 0 || q1 != 1 {
        return 0;
    }
    dns + 12
}

/// Folds the DNS question name (from `start` in `ev.pkt`) into `h`, up to
/// its terminating root label or the end of the captured bytes, FNV-1a
/// style. Only while sampling: a name costs a few instructions a byte.
#[inline(always)]
fn question_hash(ev: &RawEvent, start: usize, mut h: u64) -> u64 {
    let end = ev.caplen as usize;
    let mut i = start;
    while i < PKT_BYTES {
        if i >= end {
            break;
        }
        let Some(&b) = ev.pkt.get(i) else { break };
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        if b == 0 {
            break;
        }
        i += 1;
    }
    h
}
