//! The fexit backend: fentry/fexit trampolines on conntrack's own functions
//! (programs in conntrack-trace-ebpf/src/fexit.rs). Exact where the
//! tracepoint backend infers from side effects:
//!
//! | kind | hook |
//! |---|---|
//! | `table_full` | fexit `__nf_conntrack_alloc` returning an error pointer (packet path only) |
//! | `early_drop` | fexit `nf_ct_delete` returning true inside fentry/fexit `early_drop` |
//! | `insert_failed` | fexit `__nf_conntrack_confirm` returning `NF_DROP` (fentry remembers whether the entry was already confirmed) |
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

use aya::{Btf, Ebpf, Endianness, maps::Map};
use conntrack_trace_common::{Config, Offsets};

use super::{
    Evictions, Options,
    trampoline::{self, Kind},
};
use crate::{
    btf::{Function, KernelBtf, Param},
    error::TraceError,
};

/// One program of the object and the kernel function it hooks.
struct Hook {
    prog: &'static str,
    kind: Kind,
    func: Function,
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
    pub fn load(opts: &Options) -> Result<Fexit, TraceError> {
        let kbtf = KernelBtf::load(&opts.btf_path)?;
        let offsets: Offsets = kbtf.offsets()?;
        let config = Config {
            confirmed_bit: kbtf.enum_value("ip_conntrack_status", "IPS_CONFIRMED_BIT")?,
            ..Config::default()
        };
        // Argument positions the programs read (net/netfilter/nf_conntrack_core.c,
        // 6.1 and 6.12 alike):
        //   __nf_conntrack_alloc(net, zone, orig, repl, gfp_t gfp, u32 hash)
        //   __nf_conntrack_confirm(skb) -> int
        //   early_drop(net, unsigned int hash) -> int   (static noinline)
        //   nf_ct_delete(ct, u32 portid, int report) -> bool
        let alloc = function(
            &kbtf,
            "__nf_conntrack_alloc",
            &[
                ("net", 0),
                ("nf_conntrack_zone", 0),
                ("nf_conntrack_tuple", 0),
                ("nf_conntrack_tuple", 0),
                ("", 4),
                ("", 4),
            ],
        )?;
        let confirm = function(&kbtf, "__nf_conntrack_confirm", &[("sk_buff", 0)])?;
        //   nf_conntrack_in(skb, state) -> unsigned int (exported): only for
        //   the bytes of a packet whose allocation fails; without it
        //   table_full events carry no packet.
        let ct_in = function(
            &kbtf,
            "nf_conntrack_in",
            &[("sk_buff", 0), ("nf_hook_state", 0)],
        )
        .ok();
        let mut hooks = vec![
            Hook {
                prog: "ct_confirm_enter",
                kind: Kind::FEntry,
                func: confirm.clone(),
            },
            Hook {
                prog: "ct_confirm_exit",
                kind: Kind::FExit,
                func: confirm,
            },
            Hook {
                prog: "ct_alloc_exit",
                kind: Kind::FExit,
                func: alloc,
            },
        ];
        if let Some(f) = ct_in {
            // Exit before entry, as for early_drop below.
            hooks.extend([
                Hook {
                    prog: "ct_in_exit",
                    kind: Kind::FExit,
                    func: f.clone(),
                },
                Hook {
                    prog: "ct_in_enter",
                    kind: Kind::FEntry,
                    func: f,
                },
            ]);
        }
        let evictions = if !opts.evictions {
            Evictions::Off("--evictions off".into())
        } else {
            match (
                function(&kbtf, "early_drop", &[("net", 0), ("", 4)]),
                function(&kbtf, "nf_ct_delete", &[("nf_conn", 0), ("", 4), ("", 4)]),
            ) {
                (Ok(ed), Ok(del)) => {
                    // Exit hooks before the entry hook: a scope opened
                    // without its closer would attribute unrelated deletes.
                    hooks.splice(
                        0..0,
                        [
                            Hook {
                                prog: "ct_delete_exit",
                                kind: Kind::FExit,
                                func: del,
                            },
                            Hook {
                                prog: "early_drop_exit",
                                kind: Kind::FExit,
                                func: ed.clone(),
                            },
                            Hook {
                                prog: "early_drop_enter",
                                kind: Kind::FEntry,
                                func: ed,
                            },
                        ],
                    );
                    Evictions::On
                }
                (Err(e), _) | (_, Err(e)) => Evictions::Off(e.to_string()),
            }
        };

        let aya_btf = Btf::parse_file(&opts.btf_path, Endianness::default())
            .map_err(|e| TraceError::Unsupported(format!("{}: {e}", opts.btf_path.display())))?;
        let ebpf = super::load_object(&aya_btf, &offsets, &config, opts.ring_bytes)?;
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
