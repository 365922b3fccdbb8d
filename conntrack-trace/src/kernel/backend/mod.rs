//! Ways of observing conntrack failures, behind one interface ([`Backend`]):
//! every BPF backend yields the same [`crate::model::event::Event`]s and the same
//! exact counters; `counters` yields only totals.
//!
//! * [`fexit`] — trampolines on conntrack's functions (exact, cheapest);
//! * [`tracepoint`] — `tp_btf/kfree_skb` + `tp_btf/kmem_cache_free`, for
//!   kernels that refuse fentry/fexit;
//! * [`counters`] — polls /proc/net/stat/nf_conntrack when no BPF program
//!   can load: totals and rates per kind, no per-packet attribution.
//!
//! `auto` ([`open`]) tries them in that order and keeps, for the header and
//! the summary, why each earlier one was refused. It decides by what the
//! kernel accepts (BTF, functions in BTF, program load and attach), never by
//! kernel version: distributions backport.

mod batch;
pub mod bpflog;
pub mod counters;
pub mod fexit;
pub mod tracepoint;
pub mod trampoline;

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
};
use conntrack_trace_common::{Config, Offsets, counter, kind};

use crate::{
    kernel::btf::BtfError,
    kernel::error::TraceError,
    kernel::netns::Held,
    model::event::{Event, Kind},
    model::{KindCounts, Name, Refusal, Sampling},
};

/// Exact in-kernel counters of a backend since it was loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BpfCounters {
    /// Failures observed per kind (emitted or not).
    pub seen: KindCounts,
    /// Events that could not be reserved in the ring buffer.
    pub lost: KindCounts,
    /// Drops beyond the event budget: counted (here and in the per-source
    /// counts), not emitted. `events + lost + shed == seen` per kind.
    pub shed: KindCounts,
    /// Of `shed`, those the token bucket refused although their flow was
    /// sampled (`counter::SHED_BY_BUCKET`).
    pub shed_by_bucket: u64,
    /// nf_conntrack slab frees inspected by the eviction hook.
    pub ct_frees: u64,
    /// Drops without an entry that could not be classified (counted as
    /// `table_full`); see `counter::UNCLASSIFIED`.
    pub unclassified: u64,
    /// Increments of conntrack's `drop` counter that no drop seen on that
    /// CPU accounted for; see `counter::DROP_UNMATCHED`.
    pub drop_unmatched: u64,
}

impl BpfCounters {
    /// The events are a sample of the drops (the ring lost some, or the
    /// budget shed some): per-source answers must come from the exact
    /// per-source counts, not from the events.
    pub fn sampled(&self) -> bool {
        self.lost.total() + self.shed.total() > 0
    }

    /// The sampling of the interval since `before`: its drops over its
    /// events, while the budget (`budget` events/s per CPU) shed some.
    pub fn sampling_since(&self, before: &BpfCounters, budget: u32) -> Option<Sampling> {
        let seen = self.seen.sub(&before.seen).total();
        let shed = self.shed.sub(&before.shed).total();
        let lost = self.lost.sub(&before.lost).total();
        Sampling::of(seen, seen.saturating_sub(shed + lost), shed, budget)
    }
}

/// Whether evictions (`early_drop`) are being tracked, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Evictions {
    On,
    Off(String),
}

impl Evictions {
    pub fn is_on(&self) -> bool {
        matches!(self, Evictions::On)
    }
    pub fn describe(&self) -> String {
        match self {
            Evictions::On => "on".into(),
            Evictions::Off(why) => format!("off ({why})"),
        }
    }
}

/// See [`Backend::describe_evictions`].
pub fn describe_evictions(early: &Evictions, gc: &Evictions) -> String {
    match (early, gc) {
        (Evictions::On, Evictions::Off(why)) => format!("on; gc_evict off ({why})"),
        (e, _) => e.describe(),
    }
}

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Fexit,
    Tracepoint,
    Counters,
}

/// Settings shared by the backends.
#[derive(Clone, Debug)]
pub struct Options {
    pub btf_path: std::path::PathBuf,
    /// The BTF was named with `--btf`: if it cannot be read, that is the
    /// user's error to fix, not a reason for `auto` to fall back.
    pub btf_explicit: bool,
    /// Track evictions (`early_drop`).
    pub evictions: bool,
    /// Emit rule drops (packets a rule, not conntrack, dropped) as events
    /// (tracepoint only).
    pub rule_drops: bool,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// `--event-budget`: events per second per CPU, 0 for unlimited (see
    /// conntrack-trace-ebpf/src/budget.rs).
    pub event_budget: u32,
    /// `--ring-wakeup`.
    pub ring_wakeup: RingWakeup,
    /// `--bpf-log`: the programs' diagnostic log ([`bpflog`]).
    pub bpf_log: bpflog::BpfLog,
}

/// How the programs wake the ring's reader (`--ring-wakeup`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RingWakeup {
    /// The kernel's adaptive wakeup: a record wakes the reader only when
    /// the reader had consumed everything before it; the reader waits a
    /// little after each drain so that a flood batches up.
    #[default]
    Adaptive,
    /// No wakeups (`BPF_RB_NO_WAKEUP`) until the ring is half full; the
    /// reader polls on a timer instead. The dropping CPU then never sends
    /// the reader an interrupt, and an idle reader wakes on its timer.
    Poll,
}

impl RingWakeup {
    /// The programs' side: [`Config::flags`] and the forced-wakeup
    /// threshold (half the ring).
    pub(crate) fn configure(self, config: &mut Config, ring_bytes: u32) {
        if self == RingWakeup::Poll {
            config.flags |= conntrack_trace_common::flags::RING_POLL;
            config.ring_wake_bytes = u64::from(ring_bytes / 2);
        }
    }
}

/// The running backend.
pub enum Backend {
    Fexit(fexit::Fexit),
    Tracepoint(tracepoint::Tracepoints),
    Counters(counters::Counters),
}

impl Backend {
    pub fn name(&self) -> Name {
        match self {
            Backend::Fexit(_) => Name::Fexit,
            Backend::Tracepoint(_) => Name::Tracepoint,
            Backend::Counters(_) => Name::Counters,
        }
    }

    /// Backend and hooks, for the live header.
    pub fn describe(&self) -> String {
        match self {
            Backend::Fexit(b) => b.describe(),
            Backend::Tracepoint(b) => b.describe(),
            Backend::Counters(b) => b.describe(),
        }
    }

    pub fn evictions(&self) -> &Evictions {
        match self {
            Backend::Fexit(b) => &b.evictions,
            Backend::Tracepoint(b) => &b.evictions,
            Backend::Counters(b) => &b.evictions,
        }
    }

    /// Whether the GC's evictions (`gc_evict`) are being tracked, and if
    /// not, why (gc_worker() not found, `--evictions off`, ...).
    pub fn gc_evict(&self) -> &Evictions {
        match self {
            Backend::Fexit(b) => &b.gc_evict,
            Backend::Tracepoint(b) => &b.gc_evict,
            Backend::Counters(b) => &b.gc_evict,
        }
    }

    /// The evictions for the header and the summary: `on`, `off (why)`,
    /// and when only the GC's are missing, `on; gc_evict off (why)` —
    /// an unavailable kind is said, never a silent 0.
    pub fn describe_evictions(&self) -> String {
        describe_evictions(self.evictions(), self.gc_evict())
    }

    /// Whether events name the packet/entry (false: totals only).
    pub fn per_packet(&self) -> bool {
        !matches!(self, Backend::Counters(_))
    }

    /// The event ring (None for `counters`).
    pub fn take_ring(&mut self) -> Result<Option<RingBuf<MapData>>, TraceError> {
        match self {
            Backend::Fexit(b) => take_ring(&mut b.ebpf).map(Some),
            Backend::Tracepoint(b) => take_ring(&mut b.ebpf).map(Some),
            Backend::Counters(_) => Ok(None),
        }
    }

    /// With `--bpf-log` on, starts reading the programs' log into `sink`
    /// (None when off, and for `counters`, which runs no programs).
    pub fn start_log(
        &mut self,
        level: bpflog::BpfLog,
        sink: bpflog::Sink,
    ) -> Result<Option<bpflog::Reader>, TraceError> {
        let ebpf = match self {
            _ if !level.is_on() => return Ok(None),
            Backend::Fexit(b) => &mut b.ebpf,
            Backend::Tracepoint(b) => &mut b.ebpf,
            Backend::Counters(_) => return Ok(None),
        };
        bpflog::Reader::start(ebpf, sink)
            .map(Some)
            .map_err(TraceError::Other)
    }

    /// Totals since attach: the programs' per-CPU counters, or for
    /// `counters` the kernel's own, per kind.
    pub fn counters(&self) -> Result<BpfCounters, TraceError> {
        match self {
            Backend::Fexit(b) => read_counters(&b.ebpf),
            Backend::Tracepoint(b) => read_counters(&b.ebpf),
            Backend::Counters(b) => Ok(b.counters()),
        }
    }

    /// Hands `f` the programs' exact per-source counts (`SOURCE_COUNTS`,
    /// summed over CPUs), one entry at a time, as events: one per (netns,
    /// kind, source, protocol, port) with its count. None for the counters
    /// backend.
    pub fn for_each_source_count(&self, mut f: impl FnMut(&Event, u64)) -> Result<(), TraceError> {
        let ebpf = match self {
            Backend::Fexit(b) => &b.ebpf,
            Backend::Tracepoint(b) => &b.ebpf,
            Backend::Counters(_) => return Ok(()),
        };
        let map = ebpf
            .map("SOURCE_COUNTS")
            .ok_or_else(|| TraceError::Other("SOURCE_COUNTS map missing".into()))?;
        let mut hand = |k: &conntrack_trace_common::SourceKey, count: u64| {
            let mut raw = conntrack_trace_common::RawEvent::zeroed();
            raw.netns = k.netns;
            raw.kind = k.kind;
            raw.l3 = k.l3;
            raw.l4 = k.l4;
            raw.dport = k.dport;
            raw.src = k.src;
            if let Ok(e) = Event::from_raw(&raw) {
                f(&e, count);
            }
        };
        let ncpus =
            aya::util::nr_cpus().map_err(|(what, e)| TraceError::Other(format!("{what}: {e}")))?;
        if let aya::maps::Map::PerCpuLruHashMap(data) = map {
            use std::os::fd::AsFd as _;
            match batch::sum_per_cpu(data.fd().as_fd(), ncpus, &mut hand) {
                Ok(()) => return Ok(()),
                Err(batch::Stopped::Failed(e)) => {
                    return Err(TraceError::Other(format!("reading SOURCE_COUNTS: {e}")));
                }
                // Key by key below.
                Err(batch::Stopped::Unsupported) => {}
            }
        }
        let counts: aya::maps::PerCpuHashMap<&MapData, conntrack_trace_common::SourceKey, u64> =
            aya::maps::PerCpuHashMap::try_from(map)
                .map_err(|e| TraceError::Other(format!("SOURCE_COUNTS: {e}")))?;
        for item in counts.iter() {
            // An entry evicted (LRU) while iterating ends that key; the
            // rest are still read.
            let Ok((k, per_cpu)) = item else { continue };
            hand(&k, per_cpu.iter().sum());
        }
        Ok(())
    }

    /// Stops observing; events already in the ring stay readable.
    pub fn detach(&mut self) {
        match self {
            Backend::Fexit(b) => b.detach(),
            Backend::Tracepoint(b) => b.detach(),
            Backend::Counters(b) => b.stop(),
        }
    }
}

/// Opens the backend `choice` asks for: one backend, or for `auto` the
/// first that loads and attaches, with the reasons the earlier ones were
/// refused. Attaching is part of the probe (fentry/fexit are often refused
/// only at attach), so the returned backend is already attached.
///
/// `before_attach` runs after a backend loaded and readied its attach
/// (the tracepoint backend's drop baselines), right before its first
/// attach call (again for the next backend if that one is refused): the
/// tracer takes its start snapshot of the kernel counters there, so that
/// the window they cover includes neither the load nor the preparation
/// (issue 11 item 9; pinned by `start_snapshot_is_taken_between_load_and_attach`
/// in tests/tests/backend.rs).
pub fn open(
    choice: Choice,
    opts: &Options,
    scope: &[Held],
    before_attach: &dyn Fn(),
) -> Result<(Backend, Vec<Refusal>), TraceError> {
    let opened = open_one(choice, opts, scope, before_attach);
    // Loading parsed the kernel's BTF (tens of MiB of heap, freed by
    // now): give it back to the system instead of keeping it resident for
    // the session (glibc keeps freed memory otherwise).
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
    opened
}

fn open_one(
    choice: Choice,
    opts: &Options,
    scope: &[Held],
    before_attach: &dyn Fn(),
) -> Result<(Backend, Vec<Refusal>), TraceError> {
    // Parsed at most once, whichever backends are tried.
    let parsed = std::cell::OnceCell::new();
    let types = || -> Result<&KernelTypes, TraceError> {
        if let Some(t) = parsed.get() {
            return Ok(t);
        }
        let t = KernelTypes::load(&opts.btf_path)?;
        Ok(parsed.get_or_init(|| t))
    };
    let fexit = || -> Result<Backend, TraceError> {
        if opts.bpf_log.is_on() {
            return Err(TraceError::Unsupported(bpflog::FEXIT_DOES_NOT_LOG.into()));
        }
        let mut b = fexit::Fexit::load(opts, types()?)?;
        before_attach();
        b.attach()?;
        Ok(Backend::Fexit(b))
    };
    let tracepoint = || -> Result<Backend, TraceError> {
        let mut b = tracepoint::Tracepoints::load(opts, types()?)?;
        b.prepare_attach();
        before_attach();
        b.attach()?;
        Ok(Backend::Tracepoint(b))
    };
    let counters = || -> Result<Backend, TraceError> {
        let mut b = counters::Counters::new(scope, opts)?;
        before_attach();
        b.start()?;
        Ok(Backend::Counters(b))
    };
    match choice {
        Choice::Fexit if opts.bpf_log.is_on() => {
            Err(TraceError::Usage(bpflog::FEXIT_DOES_NOT_LOG.into()))
        }
        Choice::Fexit => Ok((fexit()?, Vec::new())),
        Choice::Tracepoint => Ok((tracepoint()?, Vec::new())),
        Choice::Counters => Ok((counters()?, Vec::new())),
        Choice::Auto => {
            let mut refused = Vec::new();
            for (name, try_open) in [
                (
                    Name::Fexit,
                    &fexit as &dyn Fn() -> Result<Backend, TraceError>,
                ),
                (Name::Tracepoint, &tracepoint),
            ] {
                match try_open() {
                    Ok(b) => return Ok((b, refused)),
                    // Not being allowed to trace at all, or a `--btf` file
                    // that is not BTF, is not a reason to fall back: the
                    // user must fix it.
                    Err(e @ TraceError::Privileges(_)) => return Err(e),
                    Err(e @ TraceError::Btf(BtfError::Missing { .. } | BtfError::Parse { .. }))
                        if opts.btf_explicit =>
                    {
                        return Err(e);
                    }
                    Err(e) => refused.push(Refusal {
                        backend: name,
                        reason: e.to_string(),
                    }),
                }
            }
            match counters() {
                Ok(b) => Ok((b, refused)),
                // Nothing works here: say why for every backend, not only
                // the last one tried.
                Err(TraceError::Unsupported(last)) => {
                    let mut msg = format!("no backend works here: counters: {last}");
                    for r in &refused {
                        msg.push_str(&format!("; {} refused: {}", r.backend.as_str(), r.reason));
                    }
                    Err(TraceError::Unsupported(msg))
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// The kernel's BTF, parsed once per [`open`] and shared by the backends it
/// tries: btf-rs reads layouts, prototypes and the `nf_conntrack` module's
/// split BTF; aya's own parser is what aya needs to load tracing programs.
/// Dropped once a backend is loaded (the programs keep nothing of it).
pub(crate) struct KernelTypes {
    pub kbtf: crate::kernel::btf::KernelBtf,
    pub aya: aya::Btf,
}

impl KernelTypes {
    fn load(path: &std::path::Path) -> Result<KernelTypes, TraceError> {
        let kbtf = crate::kernel::btf::KernelBtf::load(path)?;
        let aya = aya::Btf::parse_file(path, aya::Endianness::default())
            .map_err(|e| TraceError::Unsupported(format!("{}: {e}", path.display())))?;
        Ok(KernelTypes { kbtf, aya })
    }
}

/// The compiled eBPF object (both BPF backends), built by build.rs.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/conntrack-trace"));

/// Loads the object: creates the maps with the offsets and settings written
/// into the programs' read-only globals. Programs are loaded by the backend.
pub(crate) fn load_object(
    btf: &aya::Btf,
    offsets: &Offsets,
    config: &Config,
    opts: &Options,
) -> Result<Ebpf, TraceError> {
    raise_memlock();
    let mut config = *config;
    opts.bpf_log.configure(&mut config);
    EbpfLoader::new()
        .btf(Some(btf))
        .override_global("OFFSETS", offsets, true)
        .override_global("CONFIG", &config, true)
        // aya-log-ebpf's level (`--bpf-log`; 0 when off): with CONFIG's
        // gate, what the verifier prunes.
        .override_global(aya_log::LEVEL, &opts.bpf_log.aya_level(), true)
        .map_max_entries("AYA_LOGS", opts.bpf_log.ring_bytes())
        .map_max_entries("EVENTS", opts.ring_bytes)
        .load(EBPF_OBJECT)
        .map_err(|e| TraceError::Load {
            prog: "conntrack-trace (object)".into(),
            msg: e.to_string(),
        })
}

/// The line of a verifier log that names the rejection: the last one that
/// is not a statistics line ("processed N insns", ...).
pub(crate) fn verifier_verdict(log: &str) -> String {
    log.lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            !l.is_empty()
                && !l.starts_with("processed ")
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
        })
        .unwrap_or("")
        .to_owned()
}

fn take_ring(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>, TraceError> {
    let map = ebpf
        .take_map("EVENTS")
        .ok_or_else(|| TraceError::Other("EVENTS map missing".into()))?;
    RingBuf::try_from(map).map_err(|e| TraceError::Other(format!("EVENTS: {e}")))
}

/// Sums the per-CPU counters.
fn read_counters(ebpf: &Ebpf) -> Result<BpfCounters, TraceError> {
    let map = ebpf
        .map("COUNTERS")
        .ok_or_else(|| TraceError::Other("COUNTERS map missing".into()))?;
    let arr: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map).map_err(|e| TraceError::Other(format!("COUNTERS: {e}")))?;
    let sum = |i: u32| -> Result<u64, TraceError> {
        let v = arr
            .get(&i, 0)
            .map_err(|e| TraceError::Other(format!("COUNTERS[{i}]: {e}")))?;
        Ok(v.iter().sum())
    };
    let mut c = BpfCounters::default();
    for k in Kind::ALL {
        *c.seen.get_mut(k) = sum(counter::seen(k.raw()))?;
        *c.lost.get_mut(k) = sum(counter::lost(k.raw()))?;
        *c.shed.get_mut(k) = sum(counter::shed(k.raw()))?;
    }
    c.shed_by_bucket = sum(counter::SHED_BY_BUCKET)?;
    c.ct_frees = sum(counter::CT_FREES)?;
    c.unclassified = sum(counter::UNCLASSIFIED)?;
    c.drop_unmatched = sum(counter::DROP_UNMATCHED)?;
    debug_assert_eq!(kind::COUNT as usize, Kind::ALL.len());
    Ok(c)
}

/// A fresh seed for the programs' flow hash (`Config::flow_seed`): std's
/// per-process random keys, so the sampled flows differ from run to run.
pub(crate) fn flow_seed() -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// Ring size without an event budget: 8 MiB holds ~40k events (200 B +
/// 8 B record header), what a flood needs while every drop is an event.
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;
/// The smallest default ring.
const MIN_DEFAULT_RING_BYTES: u32 = 1 << 20;

/// The default `--ring-size` for `event_budget` on `cpus` CPUs. With a
/// budget the programs emit at most `event_budget` events/s per CPU beyond
/// a quarter second's burst (the token bucket, conntrack-trace-ebpf
/// budget.rs), which a reader that drains every few ms takes as it comes:
/// a ring that holds that burst from every CPU at once is enough. Rounded
/// up to a power of two, between 1 MiB and [`DEFAULT_RING_BYTES`]; the
/// ring's pages are mapped twice and count in the tracer's RSS, so on a
/// small node this is most of its memory (issue 21: 16 of the 93 MiB
/// peak at a million sources with the 8 MiB ring).
pub fn default_ring_bytes(event_budget: u32, cpus: u32) -> u32 {
    if event_budget == 0 {
        return DEFAULT_RING_BYTES;
    }
    let record = (std::mem::size_of::<conntrack_trace_common::RawEvent>() as u64 + 8 + 7) & !7;
    let burst =
        (u64::from(cpus.max(1)).saturating_mul(u64::from(event_budget)) / 4).saturating_mul(record);
    let bytes = burst
        .clamp(
            u64::from(MIN_DEFAULT_RING_BYTES),
            u64::from(DEFAULT_RING_BYTES),
        )
        .next_power_of_two();
    bytes as u32
}

/// Default `--event-budget` of `trace` (events/s per CPU): 20× the
/// founding incident's whole rate (the tests' DNS scenario, ~1 000
/// drops/s), so it is never sampled; see docs/performance.md for the
/// flood figures behind it.
pub const DEFAULT_TRACE_EVENT_BUDGET: u32 = 20_000;
/// Default `--event-budget` of `agent`: an always-on agent spends a
/// quarter of what an interactive trace may, still 5× the founding
/// incident. Its drop counts stay exact under it: once the events are a
/// sample, `drops_total` and the per-source series come from the
/// programs' exact counts (drivers/agent/mod.rs, `AgentTap::take_exact`).
pub const DEFAULT_AGENT_EVENT_BUDGET: u32 = 5_000;

/// Checks an `--event-budget` value.
pub fn valid_event_budget(n: u64) -> bool {
    n <= u64::from(conntrack_trace_common::MAX_EVENT_BUDGET)
}

/// Checks a `--ring-size` value.
pub fn valid_ring_bytes(n: u64) -> bool {
    n.is_power_of_two() && n >= u64::from(page_bytes()) && n <= (1 << 30)
}

/// The page size (at least 4 KiB): the smallest ring buffer map.
pub(crate) fn page_bytes() -> u32 {
    // SAFETY: sysconf is always safe to call.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ring_holds_a_quarter_second_of_budget() {
        // No budget: the flood ring.
        assert_eq!(default_ring_bytes(0, 2), DEFAULT_RING_BYTES);
        // trace's 20 000/s on 2 CPUs: 2 x 5 000 x 208 B = 2 080 000 B ->
        // 2 MiB; on 4 CPUs 4 MiB.
        assert_eq!(default_ring_bytes(20_000, 2), 2 << 20);
        assert_eq!(default_ring_bytes(20_000, 4), 4 << 20);
        // the agent's 5 000/s on 2 CPUs: 0.5 MB -> the 1 MiB floor.
        assert_eq!(default_ring_bytes(5_000, 2), 1 << 20);
        // Big nodes: never more than without a budget.
        assert_eq!(default_ring_bytes(20_000, 256), DEFAULT_RING_BYTES);
        assert_eq!(default_ring_bytes(u32::MAX, u32::MAX), DEFAULT_RING_BYTES);
        for cpus in [1, 3, 64, 128] {
            let b = default_ring_bytes(5_000, cpus);
            assert!(valid_ring_bytes(u64::from(b)), "{cpus}: {b}");
        }
    }

    #[test]
    fn sampling_since_is_the_intervals_drops_over_its_events() {
        let kc = |n| KindCounts {
            table_full: n,
            ..Default::default()
        };
        let before = BpfCounters {
            seen: kc(100),
            ..Default::default()
        };
        let now = BpfCounters {
            seen: kc(1_100),
            shed: kc(750),
            ..Default::default()
        };
        let p = now.sampling_since(&before, 50).expect("shed: sampling");
        assert_eq!((p.denom, p.budget), (4, 50));
        assert_eq!(before.sampling_since(&before, 50), None);
    }

    #[test]
    fn a_missing_gc_hook_is_said() {
        let off = |w: &str| Evictions::Off(w.into());
        assert_eq!(describe_evictions(&Evictions::On, &Evictions::On), "on");
        assert_eq!(
            describe_evictions(&Evictions::On, &off("symbol `gc_worker` not found")),
            "on; gc_evict off (symbol `gc_worker` not found)"
        );
        assert_eq!(
            describe_evictions(&off("--evictions off"), &off("--evictions off")),
            "off (--evictions off)"
        );
    }

    #[test]
    fn verdict_skips_statistics() {
        let log = "0: (79) r1 = *(u64 *)(r1 +0)\ninvalid bpf_context access off=56 size=8\nprocessed 3 insns (limit 1000000)\nverification time 12 usec\nstack depth 0\n";
        assert_eq!(
            verifier_verdict(log),
            "invalid bpf_context access off=56 size=8"
        );
        assert_eq!(verifier_verdict(""), "");
    }

    #[test]
    fn refusal_reads_as_one_line() {
        let r = Refusal {
            backend: Name::Fexit,
            reason: "kernel refused to attach program `ct_alloc_exit`: Operation not permitted (os error 1)".into(),
        };
        assert_eq!(
            r.to_string(),
            "fexit: kernel refused to attach program `ct_alloc_exit`: Operation not permitted (os error 1)"
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"backend":"fexit","reason":"kernel refused to attach program `ct_alloc_exit`: Operation not permitted (os error 1)"}"#
        );
    }
}
