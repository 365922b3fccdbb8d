//! The fexit backend: fentry/fexit trampolines on conntrack's own functions
//! (programs in conntrack-trace-ebpf/src/fexit.rs). Exact where the
//! tracepoint backend infers from side effects:
//!
//! | kind | hook |
//! |---|---|
//! | `table_full` | fexit `__nf_conntrack_alloc` returning an error pointer (packet path only) |
//! | `early_drop` | fexit `nf_ct_delete` returning true inside fentry/fexit `early_drop` |
//! | `insert_failed` | fexit `__nf_conntrack_confirm` returning `NF_DROP` (fentry remembers whether the entry was already confirmed) |
//! | `gc_evict` | fexit `nf_ct_delete` returning true, of a live entry, in the task of fentry/fexit `gc_worker` |
//!
//! Rule drops are not observed (no `kfree_skb` hook): `rule_drop` stays 0.
//! The functions are found in BTF — vmlinux, or the `nf_conntrack` module's
//! split BTF — and their prototypes checked, because the programs read
//! arguments at fixed positions. Loading goes through [`super::trampoline`]
//! since aya 0.14 cannot attach to module BTF.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd},
};

use aya::{Ebpf, maps::Map};
use conntrack_trace_common::{Config, Offsets};

use super::{
    Evictions, KernelTypes, Options,
    trampoline::{self, Kind},
};
use crate::{
    kernel::btf::{Function, KernelBtf, Param},
    kernel::error::TraceError,
};

/// What a hook is for: which feature is lost when its function is not
/// there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serves {
    /// The three failure kinds: required.
    Kinds,
    /// The bytes of a packet whose allocation fails: optional (without it
    /// table_full events carry no packet).
    PacketBytes,
    /// Evictions (`early_drop`): optional, and off with `--evictions off`.
    Evictions,
    /// The GC's evictions (`gc_evict`): optional, needs `Evictions` too
    /// (their nf_ct_delete() hook).
    GcEvictions,
}

/// One program of conntrack-trace-ebpf/src/fexit.rs and the kernel
/// function it hooks, with the parameters the program reads at fixed
/// positions (checked against BTF: a type name is a pointer to that
/// struct, an empty name an integer of that many bytes).
struct HookSpec {
    prog: &'static str,
    kind: Kind,
    func: &'static str,
    params: &'static [(&'static str, usize)],
    serves: Serves,
}

// Prototypes (net/netfilter/nf_conntrack_core.c, 6.1 and 6.12 alike).
/// `__nf_conntrack_alloc(net, zone, orig, repl, gfp_t gfp, u32 hash)`
const ALLOC: &[(&str, usize)] = &[
    ("net", 0),
    ("nf_conntrack_zone", 0),
    ("nf_conntrack_tuple", 0),
    ("nf_conntrack_tuple", 0),
    ("", 4),
    ("", 4),
];
/// `__nf_conntrack_confirm(skb) -> int`
const CONFIRM: &[(&str, usize)] = &[("sk_buff", 0)];
/// `nf_conntrack_in(skb, state) -> unsigned int` (exported)
const CT_IN: &[(&str, usize)] = &[("sk_buff", 0), ("nf_hook_state", 0)];
/// `early_drop(net, unsigned int hash) -> int` (static noinline)
const EARLY_DROP: &[(&str, usize)] = &[("net", 0), ("", 4)];
/// `nf_ct_delete(ct, u32 portid, int report) -> bool`
const DELETE: &[(&str, usize)] = &[("nf_conn", 0), ("", 4), ("", 4)];
/// `gc_worker(struct work_struct *work)` (static; a work function, so
/// never inlined: 5.10 through 6.18 alike). The program reads no argument;
/// the prototype still pins which `gc_worker` this is.
const GC_WORKER: &[(&str, usize)] = &[("work_struct", 0)];

/// Every hook, in attach order: within a scope (`early_drop`,
/// `nf_conntrack_in`) the exit hook comes before the entry hook — a scope
/// opened without its closer would attribute unrelated events.
#[rustfmt::skip]
const HOOKS: &[HookSpec] = &[
    HookSpec { prog: "ct_delete_exit", kind: Kind::FExit, func: "nf_ct_delete", params: DELETE, serves: Serves::Evictions },
    HookSpec { prog: "early_drop_exit", kind: Kind::FExit, func: "early_drop", params: EARLY_DROP, serves: Serves::Evictions },
    HookSpec { prog: "early_drop_enter", kind: Kind::FEntry, func: "early_drop", params: EARLY_DROP, serves: Serves::Evictions },
    HookSpec { prog: "gc_worker_exit", kind: Kind::FExit, func: "gc_worker", params: GC_WORKER, serves: Serves::GcEvictions },
    HookSpec { prog: "gc_worker_enter", kind: Kind::FEntry, func: "gc_worker", params: GC_WORKER, serves: Serves::GcEvictions },
    HookSpec { prog: "ct_confirm_enter", kind: Kind::FEntry, func: "__nf_conntrack_confirm", params: CONFIRM, serves: Serves::Kinds },
    HookSpec { prog: "ct_confirm_exit", kind: Kind::FExit, func: "__nf_conntrack_confirm", params: CONFIRM, serves: Serves::Kinds },
    HookSpec { prog: "ct_alloc_exit", kind: Kind::FExit, func: "__nf_conntrack_alloc", params: ALLOC, serves: Serves::Kinds },
    HookSpec { prog: "ct_in_exit", kind: Kind::FExit, func: "nf_conntrack_in", params: CT_IN, serves: Serves::PacketBytes },
    HookSpec { prog: "ct_in_enter", kind: Kind::FEntry, func: "nf_conntrack_in", params: CT_IN, serves: Serves::PacketBytes },
];

/// A hook whose function was found with the expected prototype.
struct Hook {
    prog: &'static str,
    kind: Kind,
    func: Function,
}

/// The hooks this kernel has: every required one (or the first error),
/// each optional feature whole or not at all; and whether evictions are
/// on (or why not).
fn resolve(
    kbtf: &KernelBtf,
    evictions: bool,
) -> Result<(Vec<Hook>, Evictions, Evictions), TraceError> {
    let mut lost: Vec<(Serves, String)> = Vec::new();
    if !evictions {
        lost.push((Serves::Evictions, "--evictions off".into()));
    }
    let mut found = Vec::new();
    for h in HOOKS {
        // The GC's evictions are seen through the nf_ct_delete() hook.
        if h.serves == Serves::GcEvictions
            && let Some((_, why)) = lost.iter().find(|(s, _)| *s == Serves::Evictions)
        {
            let why = why.clone();
            lost.push((Serves::GcEvictions, why));
        }
        if lost.iter().any(|(s, _)| *s == h.serves) {
            continue;
        }
        match function(kbtf, h.func, h.params) {
            Ok(func) => found.push((
                h.serves,
                Hook {
                    prog: h.prog,
                    kind: h.kind,
                    func,
                },
            )),
            Err(e) if h.serves == Serves::Kinds => return Err(e),
            Err(e) => lost.push((h.serves, e.to_string())),
        }
    }
    let hooks = found
        .into_iter()
        .filter(|(s, _)| !lost.iter().any(|(l, _)| l == s))
        .map(|(_, h)| h)
        .collect();
    let served = |serves: Serves| match lost.iter().find(|(s, _)| *s == serves) {
        Some((_, why)) => Evictions::Off(why.clone()),
        None => Evictions::On,
    };
    Ok((
        hooks,
        served(Serves::Evictions),
        served(Serves::GcEvictions),
    ))
}

pub struct Fexit {
    pub(super) ebpf: Ebpf,
    /// Loaded programs (name, hook), in attach order.
    progs: Vec<(&'static str, String, OwnedFd)>,
    /// Trampoline links; closing one detaches its program.
    links: Vec<OwnedFd>,
    /// Module BTF the programs were verified against (kept open while they
    /// are loaded, as libbpf does).
    _module_btf: Option<OwnedFd>,
    pub evictions: Evictions,
    pub gc_evict: Evictions,
}

fn sig(p: &[(&str, usize)]) -> Vec<Param> {
    p.iter()
        .map(|(s, n)| {
            if s.is_empty() {
                Param::Int(*n)
            } else {
                Param::ptr(s)
            }
        })
        .collect()
}

/// `name` from BTF with exactly `params` (see [`Function::expect`]).
fn function(
    kbtf: &KernelBtf,
    name: &str,
    params: &[(&str, usize)],
) -> Result<Function, TraceError> {
    let f = kbtf.function(name)?;
    f.expect(&sig(params))?;
    Ok(f)
}

fn map_fd(name: &str, map: &Map) -> Result<RawFd, TraceError> {
    let data = match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::RingBuf(d)
        | Map::HashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d) => d,
        _ => {
            return Err(TraceError::Other(format!(
                "map `{name}`: unexpected type for the fexit loader"
            )));
        }
    };
    Ok(data.fd().as_fd().as_raw_fd())
}

impl Fexit {
    /// Finds the functions in BTF and loads the programs (not attached).
    pub(crate) fn load(opts: &Options, types: &KernelTypes) -> Result<Fexit, TraceError> {
        let kbtf = &types.kbtf;
        let offsets: Offsets = kbtf.offsets()?;
        let mut config = Config {
            confirmed_bit: kbtf.enum_value("ip_conntrack_status", "IPS_CONFIRMED_BIT")?,
            event_budget: opts.event_budget,
            flow_seed: super::flow_seed(),
            ..Config::default()
        };
        opts.ring_wakeup.configure(&mut config, opts.ring_bytes);
        let (hooks, evictions, gc_evict) = resolve(kbtf, opts.evictions)?;
        let ebpf = super::load_object(&types.aya, &offsets, &config, opts)?;
        let mut fds = HashMap::new();
        for (name, map) in ebpf.maps() {
            fds.insert(name.to_owned(), map_fd(name, map)?);
        }
        let images =
            trampoline::relocate(super::EBPF_OBJECT, &fds).map_err(|msg| TraceError::Load {
                prog: "conntrack-trace (object)".into(),
                msg,
            })?;

        let module_btf = match hooks.iter().find_map(|h| h.func.module) {
            None => None,
            Some(module) => Some(
                trampoline::module_btf_fd(module)
                    .map_err(|e| TraceError::Other(format!("finding {module}'s BTF object: {e}")))?
                    .ok_or_else(|| {
                        TraceError::Unsupported(format!(
                            "the kernel lists no BTF object for module {module}"
                        ))
                    })?,
            ),
        };
        let mut progs = Vec::new();
        for h in &hooks {
            let image = images.get(h.prog).ok_or_else(|| TraceError::Load {
                prog: h.prog.into(),
                msg: "missing from the object".into(),
            })?;
            let btf_obj = h.func.module.and(module_btf.as_ref());
            let fd =
                trampoline::load(h.prog, image, h.kind, h.func.btf_id, btf_obj).map_err(|e| {
                    TraceError::Load {
                        prog: h.prog.into(),
                        msg: format!("{} {}: {e}", h.kind.as_str(), h.func.name),
                    }
                })?;
            progs.push((h.prog, format!("{}/{}", h.kind.as_str(), h.func.name), fd));
        }
        Ok(Fexit {
            ebpf,
            progs,
            links: Vec::new(),
            _module_btf: module_btf,
            evictions,
            gc_evict,
        })
    }

    /// Attaches every program, exit hooks of a scope before its entry hook.
    pub fn attach(&mut self) -> Result<(), TraceError> {
        for (prog, hook, fd) in &self.progs {
            let link = trampoline::attach(fd).map_err(|e| TraceError::Attach {
                prog: (*prog).into(),
                hook: hook.clone(),
                msg: e.to_string(),
            })?;
            self.links.push(link);
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut hooks: Vec<&str> = self.progs.iter().map(|(_, h, _)| h.as_str()).collect();
        hooks.sort_unstable();
        hooks.dedup();
        format!("fexit ({})", hooks.join(", "))
    }

    /// Detaches in reverse attach order (entry hooks before exit hooks).
    pub fn detach(&mut self) {
        while let Some(link) = self.links.pop() {
            drop(link);
        }
    }
}
