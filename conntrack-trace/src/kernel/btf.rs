//! Kernel struct layouts from BTF, resolved at load time.
//!
//! Rust eBPF has no CO-RE field relocations, so the programs read kernel
//! memory at offsets that user space computes here from the running kernel's
//! BTF (`/sys/kernel/btf/vmlinux`, plus module BTF when conntrack is a
//! module) and writes into the programs' `OFFSETS`/`CONFIG` globals.

use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use conntrack_trace_common::Offsets;

/// Where the kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("kernel BTF not found at {path} (needs CONFIG_DEBUG_INFO_BTF=y, or pass --btf FILE)")]
    Missing { path: PathBuf },
    #[error("cannot parse BTF in {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("kernel BTF has no type `{0}`")]
    NoType(String),
    #[error("kernel BTF: `{ty}` has no member `{member}`")]
    NoMember { ty: String, member: String },
    #[error("kernel BTF: enum `{ty}` has no value `{value}`")]
    NoEnumValue { ty: String, value: String },
    #[error("kernel BTF: tracepoint `{tp}` has no argument `{arg}`")]
    NoTpArg { tp: String, arg: String },
    #[error("kernel BTF has no function `{0}` (inlined, or conntrack not loaded)")]
    NoFunction(String),
    #[error("kernel BTF: {0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, BtfError>;

/// A tracepoint argument, recognised by its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpArg {
    /// `enum NAME`.
    Enum(&'static str),
    /// `struct NAME *`.
    PtrTo(&'static str),
    /// `void *` (the first one).
    VoidPtr,
    /// `char *` (const or not): a string.
    CharPtr,
}

impl std::fmt::Display for TpArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TpArg::Enum(n) => write!(f, "enum {n}"),
            TpArg::PtrTo(n) => write!(f, "struct {n} *"),
            TpArg::VoidPtr => f.write_str("void *"),
            TpArg::CharPtr => f.write_str("char *"),
        }
    }
}

impl TpArg {
    fn matches(&self, btf: &Btf, t: &Type) -> bool {
        match (self, t) {
            (TpArg::Enum(n), Type::Enum(_) | Type::Enum64(_)) => t
                .as_btf_type()
                .and_then(|bt| btf.resolve_name(bt).ok())
                .is_some_and(|x| x == *n),
            (TpArg::PtrTo(n), Type::Ptr(p)) => btf
                .resolve_chained_type(p)
                .ok()
                .and_then(|x| strip(btf, x).ok())
                .is_some_and(|x| {
                    matches!(x, Type::Struct(_))
                        && x.as_btf_type()
                            .and_then(|bt| btf.resolve_name(bt).ok())
                            .is_some_and(|s| s == *n)
                }),
            (TpArg::VoidPtr, Type::Ptr(p)) => {
                matches!(
                    btf.resolve_chained_type(p)
                        .ok()
                        .and_then(|x| strip(btf, x).ok()),
                    Some(Type::Void)
                )
            }
            (TpArg::CharPtr, Type::Ptr(p)) => btf
                .resolve_chained_type(p)
                .ok()
                .and_then(|x| strip(btf, x).ok())
                .is_some_and(|x| matches!(&x, Type::Int(i) if i.is_char() || i.size() == 1)),
            _ => false,
        }
    }
}

/// The kernel's BTF, with module BTF for conntrack when it is a module.
pub struct KernelBtf {
    pub vmlinux: Btf,
    /// BTF of the `nf_conntrack` module (split on top of vmlinux), if any.
    pub conntrack: Option<Btf>,
    pub path: PathBuf,
}

impl KernelBtf {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(BtfError::Missing {
                path: path.to_owned(),
            });
        }
        let vmlinux = Btf::from_file(path).map_err(|e| BtfError::Parse {
            path: path.to_owned(),
            msg: e.to_string(),
        })?;
        let module = Path::new("/sys/kernel/btf/nf_conntrack");
        let conntrack = if path == Path::new(VMLINUX_BTF) && module.exists() {
            Some(
                Btf::from_split_file(module, &vmlinux).map_err(|e| BtfError::Parse {
                    path: module.to_owned(),
                    msg: e.to_string(),
                })?,
            )
        } else {
            None
        };
        Ok(KernelBtf {
            vmlinux,
            conntrack,
            path: path.to_owned(),
        })
    }

    fn find(&self, name: &str, want: fn(&Type) -> bool) -> Result<(&Btf, Type)> {
        for btf in [Some(&self.vmlinux), self.conntrack.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Ok(types) = btf.resolve_types_by_name(name)
                && let Some(t) = types.into_iter().find(&want)
            {
                return Ok((btf, t));
            }
        }
        Err(BtfError::NoType(name.to_owned()))
    }

    /// Byte offset of a dotted member path (`"tuplehash.tuple"`) inside
    /// `struct ty`, looking through anonymous structs/unions and typedefs.
    /// An array member may be indexed with `[N]` (`"tuplehash[0].tuple"`).
    pub fn offset_of(&self, ty: &str, path: &str) -> Result<u32> {
        let (btf, mut cur) = self.find(ty, |t| matches!(t, Type::Struct(_) | Type::Union(_)))?;
        let mut bits: u64 = 0;
        let mut cur_name = ty.to_owned();
        for part in path.split('.') {
            let (name, index) = match part.split_once('[') {
                Some((n, rest)) => {
                    let idx: u64 = rest
                        .trim_end_matches(']')
                        .parse()
                        .map_err(|_| BtfError::Other(format!("bad index in `{path}`")))?;
                    (n, Some(idx))
                }
                None => (part, None),
            };
            let (off, member_ty) = member(btf, &cur, name).ok_or_else(|| BtfError::NoMember {
                ty: cur_name.clone(),
                member: name.to_owned(),
            })?;
            bits += off;
            let mut t = strip(btf, member_ty)?;
            if let Some(idx) = index {
                let Type::Array(arr) = &t else {
                    return Err(BtfError::Other(format!(
                        "`{cur_name}.{name}` is not an array"
                    )));
                };
                let elem = strip(btf, btf.resolve_chained_type(arr).map_err(other)?)?;
                bits += idx * 8 * type_size(btf, &elem)? as u64;
                t = elem;
            }
            cur = t;
            cur_name = format!("{cur_name}.{name}");
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Other(format!("`{ty}.{path}` is a bitfield")));
        }
        u32::try_from(bits / 8)
            .map_err(|_| BtfError::Other(format!("`{ty}.{path}` offset too large")))
    }

    /// `sizeof(struct ty)` (doctor's memory figures).
    pub fn size_of(&self, ty: &str) -> Result<usize> {
        let (btf, t) = self.find(ty, |t| matches!(t, Type::Struct(_) | Type::Union(_)))?;
        type_size(btf, &t)
    }

    /// Value of an enumerator, e.g. `SKB_DROP_REASON_NETFILTER_DROP`.
    pub fn enum_value(&self, ty: &str, value: &str) -> Result<u32> {
        let (btf, t) = self.find(ty, |t| matches!(t, Type::Enum(_) | Type::Enum64(_)))?;
        let found = match &t {
            Type::Enum(e) => e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == value))
                .map(|m| m.val()),
            Type::Enum64(e) => e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == value))
                .map(|m| m.val() as u32),
            _ => None,
        };
        found.ok_or_else(|| BtfError::NoEnumValue {
            ty: ty.to_owned(),
            value: value.to_owned(),
        })
    }

    /// Index of the first argument of a BTF-enabled tracepoint whose type
    /// matches `arg`, from its `btf_trace_<tp>` typedef
    /// (`void (*)(void *__data, args...)`; the leading `__data` is not part of
    /// the program's context). BTF keeps no parameter names for these
    /// typedefs, so arguments are recognised by type.
    pub fn tracepoint_arg(&self, tp: &str, arg: TpArg) -> Result<u32> {
        let name = format!("btf_trace_{tp}");
        let (btf, t) = self.find(&name, |t| matches!(t, Type::Typedef(_)))?;
        let Type::Typedef(td) = &t else {
            unreachable!("find() filtered typedefs")
        };
        let mut t = btf.resolve_chained_type(td).map_err(other)?;
        if let Type::Ptr(p) = &t {
            t = btf.resolve_chained_type(p).map_err(other)?;
        }
        let Type::FuncProto(proto) = t else {
            return Err(BtfError::Other(format!("{name} is not a function pointer")));
        };
        for (i, p) in proto.parameters.iter().enumerate().skip(1) {
            let pt = strip(btf, btf.resolve_chained_type(p).map_err(other)?)?;
            if arg.matches(btf, &pt) {
                return Ok((i - 1) as u32);
            }
        }
        Err(BtfError::NoTpArg {
            tp: tp.to_owned(),
            arg: arg.to_string(),
        })
    }

    /// A kernel function as fentry/fexit see it: where its BTF lives (vmlinux
    /// or the nf_conntrack module), its BTF id, and its parameters. Absent
    /// when the compiler inlined it or pahole left it out (e.g. a clone
    /// with a changed signature).
    pub fn function(&self, name: &str) -> Result<Function> {
        for (module, btf) in [
            (None, Some(&self.vmlinux)),
            (Some("nf_conntrack"), self.conntrack.as_ref()),
        ] {
            let Some(btf) = btf else { continue };
            let Ok(ids) = btf.resolve_ids_by_name(name) else {
                continue;
            };
            for id in ids {
                let Ok(Type::Func(func)) = btf.resolve_type_by_id(id) else {
                    continue;
                };
                let Ok(Type::FuncProto(proto)) = btf.resolve_chained_type(&func) else {
                    continue;
                };
                let mut params = Vec::new();
                for p in &proto.parameters {
                    let t = strip(btf, btf.resolve_chained_type(p).map_err(other)?)?;
                    params.push(param_kind(btf, &t));
                }
                let ret = match btf.resolve_type_by_id(proto.return_type_id()) {
                    Ok(t) if proto.return_type_id() != 0 => param_kind(btf, &strip(btf, t)?),
                    _ => Param::Other("void".into()),
                };
                return Ok(Function {
                    name: name.to_owned(),
                    module,
                    btf_id: id,
                    params,
                    ret,
                });
            }
        }
        Err(BtfError::NoFunction(name.to_owned()))
    }

    /// Every offset the programs need, or the first one this kernel lacks.
    pub fn offsets(&self) -> Result<Offsets> {
        let tuple = "nf_conntrack_tuple";
        Ok(Offsets {
            skb_nfct: self.offset_of("sk_buff", "_nfct")?,
            skb_head: self.offset_of("sk_buff", "head")?,
            skb_network_header: self.offset_of("sk_buff", "network_header")?,
            skb_dev: self.offset_of("sk_buff", "dev")?,
            skb_sk: self.offset_of("sk_buff", "sk")?,
            dev_net: self.offset_of("net_device", "nd_net.net")?,
            sk_net: self.offset_of("sock", "__sk_common.skc_net.net")?,
            net_inum: self.offset_of("net", "ns.inum")?,
            ct_status: self.offset_of("nf_conn", "status")?,
            ct_net: self.offset_of("nf_conn", "ct_net.net")?,
            ct_tuple: self.offset_of("nf_conn", "tuplehash[0].tuple")?,
            tuple_src_u3: self.offset_of(tuple, "src.u3")?,
            tuple_src_port: self.offset_of(tuple, "src.u.all")?,
            tuple_l3num: self.offset_of(tuple, "src.l3num")?,
            tuple_dst_u3: self.offset_of(tuple, "dst.u3")?,
            tuple_dst_port: self.offset_of(tuple, "dst.u.all")?,
            tuple_protonum: self.offset_of(tuple, "dst.protonum")?,
            cache_name: self.offset_of("kmem_cache", "name")?,
            ct_timeout: self.offset_of("nf_conn", "timeout")?,
            skb_len: self.offset_of("sk_buff", "len")?,
            skb_data: self.offset_of("sk_buff", "data")?,
            skb_tail: self.offset_of("sk_buff", "tail")?,
            net_ct_stat: self.offset_of("net", "ct.stat")?,
            stat_drop: self.offset_of("ip_conntrack_stat", "drop")?,
            array_pptrs: self.offset_of("bpf_array", "pptrs")?,
            ct_reply_tuple: self.offset_of("nf_conn", "tuplehash[1].tuple")?,
        })
    }
}

/// A kernel function found in BTF (see [`KernelBtf::function`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    /// `None`: vmlinux; `Some(module)`: that module's split BTF.
    pub module: Option<&'static str>,
    /// Id in the kernel's numbering (module ids continue after vmlinux's).
    pub btf_id: u32,
    pub params: Vec<Param>,
    pub ret: Param,
}

impl Function {
    /// Checks that the parameters are exactly `want`, in order: the
    /// programs read them at fixed positions.
    pub fn expect(&self, want: &[Param]) -> Result<()> {
        if self.params != want {
            return Err(BtfError::Other(format!(
                "`{}` is ({}), expected ({})",
                self.name,
                describe_params(&self.params),
                describe_params(want)
            )));
        }
        Ok(())
    }
}

fn describe_params(p: &[Param]) -> String {
    p.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A parameter or return type, as far as the programs care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// `struct NAME *`.
    PtrTo(String),
    /// An integer (or enum/bool) of this many bytes.
    Int(usize),
    Other(String),
}

impl Param {
    pub fn ptr(name: &str) -> Param {
        Param::PtrTo(name.to_owned())
    }
}

impl std::fmt::Display for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Param::PtrTo(n) => write!(f, "struct {n} *"),
            Param::Int(n) => write!(f, "int{}", n * 8),
            Param::Other(n) => f.write_str(n),
        }
    }
}

fn param_kind(btf: &Btf, t: &Type) -> Param {
    match t {
        Type::Ptr(p) => match btf
            .resolve_chained_type(p)
            .ok()
            .and_then(|x| strip(btf, x).ok())
        {
            Some(x @ (Type::Struct(_) | Type::Union(_))) => Param::PtrTo(
                x.as_btf_type()
                    .and_then(|bt| btf.resolve_name(bt).ok())
                    .unwrap_or_default(),
            ),
            _ => Param::Other("pointer".into()),
        },
        Type::Int(i) => Param::Int(i.size()),
        Type::Enum(e) => Param::Int(e.size()),
        Type::Enum64(e) => Param::Int(e.size()),
        other => Param::Other(other.name().to_owned()),
    }
}

fn other(e: impl std::fmt::Display) -> BtfError {
    BtfError::Other(e.to_string())
}

/// Follows typedefs and qualifiers down to the underlying type.
fn strip(btf: &Btf, mut t: Type) -> Result<Type> {
    for _ in 0..32 {
        match &t {
            Type::Typedef(x) => t = btf.resolve_chained_type(x).map_err(other)?,
            Type::Volatile(x) | Type::Const(x) | Type::Restrict(x) => {
                t = btf.resolve_chained_type(x).map_err(other)?
            }
            Type::TypeTag(x) => t = btf.resolve_chained_type(x).map_err(other)?,
            _ => return Ok(t),
        }
    }
    Err(BtfError::Other("typedef chain too long".into()))
}

fn type_size(btf: &Btf, t: &Type) -> Result<usize> {
    Ok(match t {
        Type::Struct(s) | Type::Union(s) => s.size(),
        Type::Int(i) => i.size(),
        Type::Enum(e) => e.size(),
        Type::Enum64(e) => e.size(),
        Type::Ptr(_) => 8,
        Type::Array(a) => {
            a.len()
                * type_size(
                    btf,
                    &strip(btf, btf.resolve_chained_type(a).map_err(other)?)?,
                )?
        }
        other_ty => {
            return Err(BtfError::Other(format!(
                "no size for BTF {}",
                other_ty.name()
            )));
        }
    })
}

/// Finds member `name` in struct/union `t`, descending into anonymous
/// members. Returns (bit offset, member type).
fn member(btf: &Btf, t: &Type, name: &str) -> Option<(u64, Type)> {
    let (Type::Struct(s) | Type::Union(s)) = t else {
        return None;
    };
    for m in &s.members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        if mname == name {
            return Some((m.bit_offset() as u64, btf.resolve_chained_type(m).ok()?));
        }
        if mname.is_empty() {
            let inner = strip(btf, btf.resolve_chained_type(m).ok()?).ok()?;
            if let Some((off, ty)) = member(btf, &inner, name) {
                return Some((m.bit_offset() as u64 + off, ty));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> Option<KernelBtf> {
        let p = Path::new(VMLINUX_BTF);
        if !p.exists() {
            eprintln!("skipping: {VMLINUX_BTF} not present");
            return None;
        }
        Some(KernelBtf::load(p).expect("parse vmlinux BTF"))
    }

    #[test]
    fn missing_btf_names_the_path() {
        let err = KernelBtf::load(Path::new("/nonexistent/btf"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/btf"), "{err}");
    }

    #[test]
    fn garbage_btf_is_a_parse_error() {
        let dir = std::env::temp_dir().join(format!("ct-btf-{}", std::process::id()));
        std::fs::write(&dir, b"definitely not BTF").unwrap();
        let err = KernelBtf::load(&dir).err().unwrap();
        std::fs::remove_file(&dir).ok();
        assert!(matches!(err, BtfError::Parse { .. }), "{err}");
    }

    #[test]
    fn resolves_offsets_on_this_kernel() {
        let Some(k) = kernel() else { return };
        let o = k.offsets().expect("offsets");
        // Layout facts that hold on every kernel since 4.x: the tuple's
        // source address is its first member and its dst follows src
        // (include/net/netfilter/nf_conntrack_tuple.h).
        assert_eq!(o.tuple_src_u3, 0);
        assert_eq!(o.tuple_src_port, 16);
        assert_eq!(o.tuple_l3num, 18);
        assert_eq!(o.tuple_dst_u3, 20);
        assert_eq!(o.tuple_dst_port, 36);
        assert_eq!(o.tuple_protonum, 38);
        assert!(o.skb_nfct > 0 && o.ct_tuple > 0 && o.net_inum > 0);
    }

    #[test]
    fn unknown_member_is_named() {
        let Some(k) = kernel() else { return };
        let err = k.offset_of("nf_conn", "no_such_field").err().unwrap();
        assert_eq!(
            err.to_string(),
            "kernel BTF: `nf_conn` has no member `no_such_field`"
        );
        let err = k.offset_of("no_such_struct_xyz", "a").err().unwrap();
        assert_eq!(
            err.to_string(),
            "kernel BTF has no type `no_such_struct_xyz`"
        );
    }

    #[test]
    fn conntrack_functions_from_btf() {
        let Some(k) = kernel() else { return };
        let Ok(f) = k.function("__nf_conntrack_confirm") else {
            eprintln!("skipping: conntrack not in BTF");
            return;
        };
        f.expect(&[Param::ptr("sk_buff")]).unwrap();
        assert_eq!(f.ret, Param::Int(4));
        let f = k.function("nf_ct_delete").unwrap();
        assert_eq!(f.params[0], Param::ptr("nf_conn"));
        assert_eq!(f.ret, Param::Int(1), "bool");
        let err = f.expect(&[Param::ptr("sk_buff")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("`nf_ct_delete` is (struct nf_conn *"),
            "{err}"
        );
        let err = k.function("no_such_function_xyz").unwrap_err();
        assert!(matches!(err, BtfError::NoFunction(_)), "{err}");
    }

    #[test]
    fn tracepoint_args_from_btf() {
        let Some(k) = kernel() else { return };
        assert_eq!(
            k.tracepoint_arg("kfree_skb", TpArg::PtrTo("sk_buff"))
                .unwrap(),
            0
        );
        assert_eq!(
            k.tracepoint_arg("kfree_skb", TpArg::Enum("skb_drop_reason"))
                .unwrap(),
            2
        );
        assert_eq!(
            k.tracepoint_arg("kmem_cache_free", TpArg::VoidPtr).unwrap(),
            1
        );
        assert_eq!(
            k.tracepoint_arg("kmem_cache_free", TpArg::PtrTo("kmem_cache"))
                .unwrap(),
            2
        );
        let err = k
            .tracepoint_arg("kfree_skb", TpArg::PtrTo("kmem_cache"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel BTF: tracepoint `kfree_skb` has no argument `struct kmem_cache *`"
        );
        assert!(
            k.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")
                .unwrap()
                > 0
        );
    }
}
