//! The tracepoint backend: `tp_btf/kfree_skb` and `tp_btf/kmem_cache_free`.
//! Works on kernels that refuse fentry/fexit and kprobes, as long as they
//! have BTF and BPF ring buffers (5.8+).

use aya::{
    Btf, Ebpf, Endianness,
    programs::{BtfTracePoint, ProgramError, tp_btf::BtfTracePointLinkId},
};
use conntrack_trace_common::{Config, MAX_STACK_DEPTH, Offsets, flags};

use super::{Evictions, Options};
use crate::{
    btf::{KernelBtf, TpArg},
    error::TraceError,
    kallsyms,
};

pub struct Tracepoints {
    pub(super) ebpf: Ebpf,
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
            nf_hook_slow_start: 0,
            nf_hook_slow_end: 0,
        };
        // Where conntrack's verdicts are freed (see the kfree_skb program).
        // Without it every drop is judged by conntrack's counters alone.
        if let Ok(r) = kallsyms::function_range_from_proc("nf_hook_slow") {
            config.nf_hook_slow_start = r.start;
            config.nf_hook_slow_end = r.end;
        }
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
                kallsyms::function_range_from_proc("early_drop"),
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
                (Err(e), Err(_), _, _) | (_, _, Err(e), _) => {
                    evictions = Evictions::Off(e.to_string())
                }
                _ => evictions = Evictions::Off("unexpected kmem_cache_free arguments".into()),
            }
        }
        let aya_btf = Btf::parse_file(&opts.btf_path, Endianness::default())
            .map_err(|e| TraceError::Unsupported(format!("{}: {e}", opts.btf_path.display())))?;

        let mut ebpf = super::load_object(&aya_btf, &offsets, &config, opts.ring_bytes)?;

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
        self.seed_drop_baselines();
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
        for ns in crate::netns::list().values() {
            let Ok(Ok(per_cpu)) = crate::netns::in_netns(&ns.path, crate::kstats::read_per_cpu_drop)
            else {
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
        let hooks: Vec<String> = self.hooks.iter().map(|n| format!("tp_btf/{n}")).collect();
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
