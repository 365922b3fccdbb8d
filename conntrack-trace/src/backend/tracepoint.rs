//! The tracepoint backend: `tp_btf/kfree_skb` and `tp_btf/kmem_cache_free`.
//! Works on kernels that refuse fentry/fexit and kprobes, as long as they
//! have BTF and BPF ring buffers (5.8+).

use aya::{
    Btf, Ebpf, EbpfLoader, Endianness,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, ProgramError, tp_btf::BtfTracePointLinkId},
};
use conntrack_trace_common::{Config, MAX_STACK_DEPTH, Offsets, counter, flags, kind};

use super::{BpfCounters, Evictions};
use crate::{
    btf::{KernelBtf, TpArg},
    error::TraceError,
    event::Kind,
    kallsyms,
};

/// The compiled eBPF object, built by build.rs.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/conntrack-trace"));

#[derive(Clone, Debug)]
pub struct Options {
    pub btf_path: std::path::PathBuf,
    /// Track evictions (the `kmem_cache_free` hook).
    pub evictions: bool,
    /// Emit rule drops of confirmed entries as events.
    pub rule_drops: bool,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
}

pub struct Tracepoints {
    ebpf: Ebpf,
    hooks: Vec<&'static str>,
    links: Vec<(&'static str, BtfTracePointLinkId)>,
    pub evictions: Evictions,
}

const KFREE_SKB: &str = "kfree_skb";
const KMEM_CACHE_FREE: &str = "kmem_cache_free";

fn load_error(prog: &str, e: ProgramError) -> TraceError {
    let msg = match &e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            // The last verifier line is the one that names the rejection.
            let log = verifier_log.to_string();
            if std::env::var_os("CONNTRACK_TRACE_VERIFIER_LOG").is_some() {
                eprintln!("{log}");
            }
            // Skip the trailing statistics ("verification time", "stack
            // depth", "processed N insns").
            let last = log
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| {
                    !l.is_empty()
                        && !l.starts_with("processed ")
                        && !l.starts_with("verification time")
                        && !l.starts_with("stack depth")
                })
                .unwrap_or("")
                .to_owned();
            if last.is_empty() {
                io_error.to_string()
            } else {
                format!("{io_error} (verifier: {last})")
            }
        }
        other => other.to_string(),
    };
    TraceError::Load {
        prog: prog.to_owned(),
        msg,
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut BtfTracePoint, TraceError> {
    ebpf.program_mut(name)
        .ok_or_else(|| TraceError::Load {
            prog: name.into(),
            msg: "missing from the object".into(),
        })?
        .try_into()
        .map_err(|e: ProgramError| TraceError::Load {
            prog: name.into(),
            msg: e.to_string(),
        })
}

impl Tracepoints {
    /// Resolves layouts from BTF and loads the programs (not yet attached).
    pub fn load(opts: &Options) -> Result<Tracepoints, TraceError> {
        let kbtf = KernelBtf::load(&opts.btf_path)?;
        let offsets: Offsets = kbtf.offsets()?;
        let mut config = Config {
            netfilter_drop_reason: kbtf
                .enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")?,
            early_drop_start: 0,
            early_drop_end: 0,
            confirmed_bit: kbtf.enum_value("ip_conntrack_status", "IPS_CONFIRMED_BIT")?,
            stack_depth: MAX_STACK_DEPTH as u32,
            flags: if opts.rule_drops {
                flags::EMIT_RULE_DROPS
            } else {
                0
            },
        };
        // The programs read these arguments at fixed positions.
        if kbtf.tracepoint_arg(KFREE_SKB, TpArg::PtrTo("sk_buff"))? != 0
            || kbtf.tracepoint_arg(KFREE_SKB, TpArg::Enum("skb_drop_reason"))? != 2
        {
            return Err(TraceError::Unsupported(
                "kfree_skb tracepoint is not (skb, location, reason, ...): kernel older than 5.17?"
                    .into(),
            ));
        }
        let mut evictions = if opts.evictions {
            Evictions::On
        } else {
            Evictions::Off("--evictions off".into())
        };
        if evictions.is_on() {
            // Before 6.2 the tracepoint passed the cache name, not the cache
            // (commit "mm, slab: pass kmem_cache to trace_kmem_cache_free").
            match (
                kbtf.tracepoint_arg(KMEM_CACHE_FREE, TpArg::PtrTo("kmem_cache")),
                kbtf.tracepoint_arg(KMEM_CACHE_FREE, TpArg::VoidPtr),
                kallsyms::function_range_from_proc("early_drop"),
            ) {
                (Ok(2), Ok(1), Ok(range)) => {
                    config.early_drop_start = range.start;
                    config.early_drop_end = range.end;
                }
                (Err(e), _, _) | (_, Err(e), _) => evictions = Evictions::Off(e.to_string()),
                (_, _, Err(e)) => evictions = Evictions::Off(e.to_string()),
                _ => evictions = Evictions::Off("unexpected kmem_cache_free arguments".into()),
            }
        }
        let aya_btf = Btf::parse_file(&opts.btf_path, Endianness::default())
            .map_err(|e| TraceError::Unsupported(format!("{}: {e}", opts.btf_path.display())))?;

        raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global("OFFSETS", &offsets, true)
            .override_global("CONFIG", &config, true)
            .map_max_entries("EVENTS", opts.ring_bytes)
            .load(EBPF_OBJECT)
            .map_err(|e| TraceError::Load {
                prog: "conntrack-trace (object)".into(),
                msg: e.to_string(),
            })?;

        let mut hooks = vec![KFREE_SKB];
        if evictions.is_on() {
            hooks.push(KMEM_CACHE_FREE);
        }
        for name in &hooks {
            let prog = program(&mut ebpf, name)?;
            prog.load(name, &aya_btf).map_err(|e| load_error(name, e))?;
        }
        Ok(Tracepoints {
            ebpf,
            hooks,
            links: Vec::new(),
            evictions,
        })
    }

    /// Attaches every loaded program (events start flowing).
    pub fn attach(&mut self) -> Result<(), TraceError> {
        for name in self.hooks.clone() {
            let prog = program(&mut self.ebpf, name)?;
            let id = prog.attach().map_err(|e| TraceError::Attach {
                prog: name.into(),
                hook: format!("tp_btf/{name}"),
                msg: e.to_string(),
            })?;
            self.links.push((name, id));
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let hooks: Vec<String> = self.hooks.iter().map(|n| format!("tp_btf/{n}")).collect();
        format!("tracepoint ({})", hooks.join(", "))
    }

    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, TraceError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| TraceError::Other("EVENTS map missing".into()))?;
        RingBuf::try_from(map).map_err(|e| TraceError::Other(format!("EVENTS: {e}")))
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<BpfCounters, TraceError> {
        let map = self
            .ebpf
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
        }
        c.ct_frees = sum(counter::CT_FREES)?;
        debug_assert_eq!(kind::COUNT as usize, Kind::ALL.len());
        Ok(c)
    }

    /// Detaches every program; events already in the ring stay readable.
    pub fn detach(&mut self) {
        for (name, id) in self.links.drain(..) {
            if let Some(p) = self.ebpf.program_mut(name)
                && let Ok(p) = <&mut BtfTracePoint>::try_from(p)
            {
                let _ = p.detach(id);
            }
        }
    }
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

/// Default ring size: 8 MiB holds ~130k events (64 B with header).
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

/// Checks a `--ring-size` value.
pub fn valid_ring_bytes(n: u64) -> bool {
    // SAFETY: sysconf is always safe to call.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    n.is_power_of_two() && n >= page && n <= (1 << 30)
}
