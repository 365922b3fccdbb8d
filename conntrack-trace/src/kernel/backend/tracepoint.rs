//! The tracepoint backend: `tp_btf/kfree_skb` and `tp_btf/kmem_cache_free`.
//! Works on kernels that refuse fentry/fexit and kprobes, as long as they
//! have BTF and BPF ring buffers (5.8+).

use aya::{
    Ebpf,
    programs::{BtfTracePoint, ProgramError, tp_btf::BtfTracePointLinkId},
};
use conntrack_trace_common::{Config, MAX_STACK_DEPTH, Offsets, flags};

use super::{Evictions, KernelTypes, Options};
use crate::{
    kernel::btf::{KernelBtf, TpArg},
    kernel::error::TraceError,
    kernel::kallsyms,
};

pub struct Tracepoints {
    pub(super) ebpf: Ebpf,
    hooks: Vec<Hook>,
    links: Vec<(&'static str, BtfTracePointLinkId)>,
    pub evictions: Evictions,
    /// `gc_evict`: the same slab hook, with gc_worker()'s range.
    pub gc_evict: Evictions,
}

const KFREE_SKB: &str = "kfree_skb";
const KMEM_CACHE_FREE: &str = "kmem_cache_free";

/// One program of `conntrack-trace-ebpf/src/tracepoint.rs` and the
/// tracepoint it attaches to. Each tracepoint has variants for the
/// argument lists kernels have had; BTF picks one (never the version).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hook {
    prog: &'static str,
    tracepoint: &'static str,
    /// What the variant needs, for the message when it is chosen.
    why: &'static str,
}

/// `kfree_skb(skb, location, reason, ...)` (5.17+).
const KFREE_SKB_REASON: Hook = Hook {
    prog: "kfree_skb",
    tracepoint: KFREE_SKB,
    why: "drop reason",
};
/// `kfree_skb(skb, location)` (before 5.17): frees from nf_hook_slow().
const KFREE_SKB_NO_REASON: Hook = Hook {
    prog: "kfree_skb_no_reason",
    tracepoint: KFREE_SKB,
    why: "no drop reason: frees from nf_hook_slow()",
};
/// `kmem_cache_free(call_site, ptr, s)` (6.2+) or `(call_site, ptr, name)`
/// (5.12–6.1, with `flags::KMEM_FREE_BY_NAME`).
const KMEM_BY_CACHE: Hook = Hook {
    prog: "kmem_cache_free",
    tracepoint: KMEM_CACHE_FREE,
    why: "cache",
};
/// `kmem_cache_free(call_site, ptr)` (before 5.12): frees called from
/// nf_conntrack_free().
const KMEM_BY_SITE: Hook = Hook {
    prog: "kmem_cache_free_by_site",
    tracepoint: KMEM_CACHE_FREE,
    why: "no cache: frees called from nf_conntrack_free()",
};

fn load_error(prog: &str, e: ProgramError) -> TraceError {
    let msg = match &e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if std::env::var_os("CONNTRACK_TRACE_VERIFIER_LOG").is_some() {
                eprintln!("{log}");
            }
            let last = super::verifier_verdict(&log);
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

/// The functions the programs recognise by address (their text ranges from
/// /proc/kallsyms, read once).
struct Symbols {
    hook_slow: Result<kallsyms::Range, kallsyms::KallsymsError>,
    early_drop: Result<kallsyms::Range, kallsyms::KallsymsError>,
    ct_free: Result<kallsyms::Range, kallsyms::KallsymsError>,
    gc_worker: Result<kallsyms::Range, kallsyms::KallsymsError>,
}

impl Symbols {
    fn read() -> Symbols {
        let mut r = kallsyms::function_ranges_from_proc(&[
            "nf_hook_slow",
            "early_drop",
            "nf_conntrack_free",
            "gc_worker",
        ])
        .into_iter();
        let mut next = || {
            r.next()
                .unwrap_or(Err(kallsyms::KallsymsError::NotFound("?".into())))
        };
        Symbols {
            hook_slow: next(),
            early_drop: next(),
            ct_free: next(),
            gc_worker: next(),
        }
    }
}

/// The slab hook that sees evictions on this kernel, with the addresses it
/// needs written into `config` — or why evictions are off.
fn eviction_hook(
    kbtf: &KernelBtf,
    on: bool,
    syms: Symbols,
    config: &mut Config,
) -> (Hook, Evictions) {
    let mut kmem = KMEM_BY_CACHE;
    let mut evictions = if on {
        Evictions::On
    } else {
        Evictions::Off("--evictions off".into())
    };
    if evictions.is_on() {
        // Since 6.2 the tracepoint passes the cache (call_site, ptr, s);
        // before, its name (call_site, ptr, name) — commit "mm, slab:
        // pass kmem_cache to trace_kmem_cache_free" (6.2). Both forms
        // work; the name form compares the name string until the
        // pointer to it is learned (FREE_BY_NAME in the program).
        let by_cache = kbtf.tracepoint_arg(KMEM_CACHE_FREE, TpArg::PtrTo("kmem_cache"));
        let by_name = kbtf.tracepoint_arg(KMEM_CACHE_FREE, TpArg::CharPtr);
        match (
            by_cache,
            by_name,
            kbtf.tracepoint_arg(KMEM_CACHE_FREE, TpArg::VoidPtr),
            syms.early_drop,
        ) {
            (_, _, _, Err(e)) => evictions = Evictions::Off(e.to_string()),
            (Ok(2), _, Ok(1), Ok(range)) => {
                config.early_drop_start = range.start;
                config.early_drop_end = range.end;
            }
            (Err(_), Ok(2), Ok(1), Ok(range)) => {
                config.early_drop_start = range.start;
                config.early_drop_end = range.end;
                config.flags |= flags::KMEM_FREE_BY_NAME;
            }
            // Neither cache nor name (before 5.12): the call site.
            (Err(_), Err(_), Ok(1), Ok(range)) => match syms.ct_free {
                Ok(site) => {
                    config.early_drop_start = range.start;
                    config.early_drop_end = range.end;
                    config.ct_free_start = site.start;
                    config.ct_free_end = site.end;
                    kmem = KMEM_BY_SITE;
                }
                Err(e) => evictions = Evictions::Off(e.to_string()),
            },
            (Err(e), Err(_), _, _) | (_, _, Err(e), _) => evictions = Evictions::Off(e.to_string()),
            _ => evictions = Evictions::Off("unexpected kmem_cache_free arguments".into()),
        }
    }
    (kmem, evictions)
}

/// Whether the slab hook also tells the GC's evictions, with gc_worker()'s
/// range written into `config`. gc_worker() (net/netfilter/nf_conntrack_core.c)
/// is `static` and not inlined (it is a work function, called through a
/// pointer): in kallsyms on 5.10, 6.1, 6.12 and 6.18 (and BTF from 5.10).
/// Its nf_ct_kill() → nf_ct_delete() and the nf_ct_put() that frees the
/// entry are inlined into it or called from it, so gc_worker() is on the
/// stack of every free it causes; gc_worker_can_early_drop() is inlined
/// (no symbol) and needs no hook. Which kernels evict from the GC at all,
/// and how: docs/kernels.md.
fn gc_hook(
    evictions: &Evictions,
    gc_worker: Result<kallsyms::Range, kallsyms::KallsymsError>,
    config: &mut Config,
) -> Evictions {
    if let Evictions::Off(why) = evictions {
        return Evictions::Off(why.clone());
    }
    match gc_worker {
        Ok(r) => {
            config.gc_worker_start = r.start;
            config.gc_worker_end = r.end;
            Evictions::On
        }
        Err(e) => Evictions::Off(e.to_string()),
    }
}

impl Tracepoints {
    /// Resolves layouts from BTF and loads the programs (not yet attached).
    pub(crate) fn load(opts: &Options, types: &KernelTypes) -> Result<Tracepoints, TraceError> {
        let kbtf = &types.kbtf;
        let offsets: Offsets = kbtf.offsets()?;
        let mut config = Config {
            // Set below, with the kfree_skb variant that reads it.
            netfilter_drop_reason: 0,
            early_drop_start: 0,
            early_drop_end: 0,
            confirmed_bit: kbtf.enum_value("ip_conntrack_status", "IPS_CONFIRMED_BIT")?,
            stack_depth: MAX_STACK_DEPTH as u32,
            flags: if opts.rule_drops {
                flags::EMIT_RULE_DROPS
            } else {
                0
            },
            nf_hook_slow_start: 0,
            nf_hook_slow_end: 0,
            ct_free_start: 0,
            ct_free_end: 0,
            event_budget: opts.event_budget,
            flow_seed: super::flow_seed(),
            gc_worker_start: 0,
            gc_worker_end: 0,
            ring_wake_bytes: 0,
        };
        opts.ring_wakeup.configure(&mut config, opts.ring_bytes);
        // Where netfilter's verdicts are freed (see the kfree_skb program).
        // With a drop reason it is optional (every drop is then judged by
        // conntrack's counters alone); without one it is the only filter.
        let syms = Symbols::read();
        let hook_slow = syms.hook_slow.clone();
        if let Ok(r) = &hook_slow {
            config.nf_hook_slow_start = r.start;
            config.nf_hook_slow_end = r.end;
        }
        let kfree = kfree_skb_variant(
            kbtf,
            hook_slow.as_ref().map(|_| ()).map_err(|e| e.to_string()),
        )?;
        if kfree == KFREE_SKB_REASON {
            config.netfilter_drop_reason =
                kbtf.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")?;
        }
        let gc_worker = syms.gc_worker.clone();
        let (kmem, evictions) = eviction_hook(kbtf, opts.evictions, syms, &mut config);
        let gc_evict = gc_hook(&evictions, gc_worker, &mut config);
        let aya_btf = &types.aya;
        let mut ebpf = super::load_object(aya_btf, &offsets, &config, opts)?;

        let mut hooks = vec![kfree];
        if evictions.is_on() {
            hooks.push(kmem);
        }
        for h in &hooks {
            let prog = program(&mut ebpf, h.prog)?;
            prog.load(h.tracepoint, aya_btf)
                .map_err(|e| load_error(h.prog, e))?;
        }
        Ok(Tracepoints {
            ebpf,
            hooks,
            links: Vec::new(),
            evictions,
            gc_evict,
        })
    }

    /// Attaches every loaded program (events start flowing).
    /// Readies the programs for [`Tracepoints::attach`]: seeds the drop
    /// baselines, which walks every namespace (a scan of /proc). Separate
    /// from `attach` so that the tracer's start snapshot of the kernel
    /// counters can come after it: the window between that snapshot and
    /// the attach then holds only the attach calls (issue 11 item 9).
    pub fn prepare_attach(&mut self) {
        self.seed_drop_baselines();
    }

    /// Attaches every hook ([`Tracepoints::prepare_attach`] first).
    pub fn attach(&mut self) -> Result<(), TraceError> {
        for h in self.hooks.clone() {
            let prog = program(&mut self.ebpf, h.prog)?;
            let id = prog.attach().map_err(|e| TraceError::Attach {
                prog: h.prog.into(),
                hook: format!("tp_btf/{}", h.tracepoint),
                msg: e.to_string(),
            })?;
            self.links.push((h.prog, id));
        }
        Ok(())
    }

    /// Seeds `CT_DROP_SEEN` with each existing namespace's per-CPU `drop`
    /// counters, so that the first netfilter drop in it is judged against
    /// the right baseline (a namespace created later starts at 0, as its
    /// counters do). A namespace that cannot be read is left out: its first
    /// drop per CPU then sees the whole count move, which the programs
    /// count in `DROP_UNMATCHED`.
    fn seed_drop_baselines(&mut self) {
        let Some(map) = self.ebpf.map_mut("CT_DROP_SEEN") else {
            return;
        };
        let Ok(mut seen) = aya::maps::PerCpuHashMap::<_, u32, u32>::try_from(map) else {
            return;
        };
        let Ok(ncpus) = aya::util::nr_cpus() else {
            return;
        };
        for ns in crate::kernel::netns::list().values() {
            let Ok(Some(per_cpu)) = crate::kernel::netns::in_netns(&ns.path, || {
                crate::kernel::kstats::read_columns().ok()?.per_cpu("drop")
            }) else {
                continue;
            };
            let mut v: Vec<u32> = per_cpu.into_iter().map(|d| d as u32).collect();
            v.resize(ncpus, 0);
            if let Ok(values) = aya::maps::PerCpuValues::try_from(v) {
                let _ = seen.insert(ns.inode, values, 0);
            }
        }
    }

    pub fn describe(&self) -> String {
        let hooks: Vec<String> = self
            .hooks
            .iter()
            .map(|h| {
                if h.prog == h.tracepoint {
                    format!("tp_btf/{}", h.tracepoint)
                } else {
                    format!("tp_btf/{} ({})", h.tracepoint, h.why)
                }
            })
            .collect();
        format!("tracepoint ({})", hooks.join(", "))
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

/// The kfree_skb program this kernel's tracepoint fits: with a drop reason
/// (5.17+), or without one when nf_hook_slow()'s range is known.
fn kfree_skb_variant(kbtf: &KernelBtf, hook_slow: Result<(), String>) -> Result<Hook, TraceError> {
    // The programs read these arguments at fixed positions.
    if kbtf.tracepoint_arg(KFREE_SKB, TpArg::PtrTo("sk_buff"))? != 0 {
        return Err(TraceError::Unsupported(
            "kfree_skb tracepoint does not pass the skb first".into(),
        ));
    }
    match kbtf.tracepoint_arg(KFREE_SKB, TpArg::Enum("skb_drop_reason")) {
        Ok(2) => Ok(KFREE_SKB_REASON),
        Ok(i) => Err(TraceError::Unsupported(format!(
            "kfree_skb tracepoint has its reason at position {i}, not 2"
        ))),
        Err(_) => match (kbtf.tracepoint_arg(KFREE_SKB, TpArg::VoidPtr), hook_slow) {
            (Ok(1), Ok(())) => Ok(KFREE_SKB_NO_REASON),
            (Ok(1), Err(e)) => Err(TraceError::Unsupported(format!(
                "kfree_skb tracepoint has no drop reason and nf_hook_slow() cannot be located: {e}"
            ))),
            _ => Err(TraceError::Unsupported(
                "kfree_skb tracepoint is neither (skb, location, reason, ...) nor (skb, location)"
                    .into(),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::btf::VMLINUX_BTF;

    #[test]
    fn this_kernel_has_the_reason_variant() {
        let p = std::path::Path::new(VMLINUX_BTF);
        if !p.exists() {
            eprintln!("skipping: {VMLINUX_BTF} not present");
            return;
        }
        let k = KernelBtf::load(p).expect("parse vmlinux BTF");
        // 5.17+ (this host, the CI host): the reason decides, with or
        // without nf_hook_slow()'s range.
        assert_eq!(kfree_skb_variant(&k, Ok(())).unwrap(), KFREE_SKB_REASON);
        assert_eq!(
            kfree_skb_variant(&k, Err("hidden".into())).unwrap(),
            KFREE_SKB_REASON
        );
    }

    #[test]
    fn gc_evict_needs_gc_worker_and_evictions() {
        let mut c = Config::default();
        let r = kallsyms::Range {
            start: 0x1000,
            end: 0x1400,
        };
        assert_eq!(gc_hook(&Evictions::On, Ok(r), &mut c), Evictions::On);
        assert_eq!((c.gc_worker_start, c.gc_worker_end), (0x1000, 0x1400));
        let mut c = Config::default();
        let missing = Err(kallsyms::KallsymsError::NotFound("gc_worker".into()));
        assert_eq!(
            gc_hook(&Evictions::On, missing, &mut c),
            Evictions::Off("symbol `gc_worker` not found in /proc/kallsyms".into())
        );
        assert_eq!(c.gc_worker_start, 0, "no range: the programs never match");
        let off = Evictions::Off("--evictions off".into());
        assert_eq!(gc_hook(&off, Ok(r), &mut Config::default()), off);
    }

    #[test]
    fn every_hook_is_a_program_of_the_object() {
        let obj =
            aya_obj::Object::parse(crate::kernel::backend::EBPF_OBJECT).expect("object parses");
        for h in [
            KFREE_SKB_REASON,
            KFREE_SKB_NO_REASON,
            KMEM_BY_CACHE,
            KMEM_BY_SITE,
        ] {
            assert!(obj.programs.contains_key(h.prog), "{} missing", h.prog);
        }
    }
}
