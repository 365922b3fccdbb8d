//! Loading and attaching fentry/fexit programs whose target lives in a
//! kernel module's BTF — the smallest workaround for what aya 0.14 lacks.
//!
//! The kernel identifies a trampoline target by (`attach_btf_obj_fd`,
//! `attach_btf_id`): the id is looked up in the BTF object behind the fd, or
//! in vmlinux when the fd is 0 (bpf_prog_load() → bpf_get_btf_vmlinux() in
//! kernel/bpf/syscall.c). On Debian kernels conntrack is the `nf_conntrack`
//! module, whose functions only exist in its split BTF
//! (/sys/kernel/btf/nf_conntrack, ids continuing after vmlinux's).
//!
//! aya 0.14's `FExit::load(fn_name, &Btf)` only sets `attach_btf_id`, its
//! `Btf` cannot parse split BTF, and `ProgramData::attach_btf_obj_fd` is
//! crate-private (only `Extension` fills it). So, instead of patching aya:
//!
//! 1. aya still loads the object: it creates every map (with the globals
//!    user space wrote), and keeps them, so the ring buffer and counters are
//!    read through aya as for the tracepoint backend;
//! 2. here the same ELF is parsed again with aya-obj (aya's own parser) and
//!    relocated against aya's map fds — the instructions aya would have
//!    loaded;
//! 3. BPF_PROG_LOAD with `expected_attach_type` FENTRY/FEXIT, the function's
//!    id from btf-rs (which reads split BTF) and the module's BTF fd (found
//!    by name with BPF_BTF_GET_NEXT_ID / BPF_OBJ_GET_INFO_BY_FD); then
//!    BPF_RAW_TRACEPOINT_OPEN with no name, the trampoline attach used by
//!    libbpf for tracing programs since 5.5.
//!
//! The programs are loaded without their own BTF (no func_info): they are
//! single functions (every helper is `#[inline(always)]`), for which the
//! kernel requires none.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use aya_obj::generated::{
    bpf_attach_type, bpf_attr, bpf_btf_info, bpf_cmd, bpf_insn, bpf_prog_type,
};

/// A relocated program, ready for BPF_PROG_LOAD.
pub struct ProgramImage {
    pub insns: Vec<bpf_insn>,
    pub license: CString,
}

/// Parses `object` and relocates every program against `maps` (name → fd of
/// the map aya created from the same object).
pub fn relocate(
    object: &[u8],
    maps: &HashMap<String, RawFd>,
) -> Result<HashMap<String, ProgramImage>, String> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| format!("parsing object: {e}"))?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    let obj_maps = std::mem::take(&mut obj.maps);
    let mut with_fds = Vec::new();
    for (name, m) in &obj_maps {
        let fd = *maps
            .get(name)
            .ok_or_else(|| format!("map `{name}` was not created"))?;
        with_fds.push((name.as_str(), fd, m));
    }
    obj.relocate_maps(with_fds.into_iter(), &text_sections)
        .map_err(|e| format!("relocating maps: {e}"))?;
    obj.relocate_calls(&text_sections)
        .map_err(|e| format!("relocating calls: {e}"))?;
    let mut out = HashMap::new();
    for (name, prog) in &obj.programs {
        let f = obj
            .functions
            .get(&prog.function_key())
            .ok_or_else(|| format!("program `{name}` has no function"))?;
        out.insert(
            name.clone(),
            ProgramImage {
                insns: f.instructions.clone(),
                license: prog.license.clone(),
            },
        );
    }
    Ok(out)
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr (zeroed, then
    // the command's fields set) that outlives the call; the kernel reads at
    // most size_of::<bpf_attr>() bytes and checks unknown tail bytes are 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a C union of integer structs; all-zero is valid
    // and is what the kernel expects for unused fields.
    unsafe { std::mem::zeroed() }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// The fd of the kernel BTF object named `name` (a module, e.g.
/// `nf_conntrack`), or None if no such module BTF is loaded.
pub fn module_btf_fd(name: &str) -> std::io::Result<Option<OwnedFd>> {
    let mut id = 0u32;
    loop {
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        match sys_bpf(bpf_cmd::BPF_BTF_GET_NEXT_ID, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        // SAFETY: the kernel filled next_id.
        id = unsafe { attr.__bindgen_anon_6.next_id };
        let mut attr = zeroed_attr();
        attr.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
        let fd = match sys_bpf(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut attr) {
            Ok(fd) => owned(fd),
            // Unloaded between the two calls.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let mut buf = [0u8; 64];
        // SAFETY: bpf_btf_info is plain integers.
        let mut info: bpf_btf_info = unsafe { std::mem::zeroed() };
        info.name = buf.as_mut_ptr() as u64;
        info.name_len = buf.len() as u32;
        let mut attr = zeroed_attr();
        attr.info.bpf_fd = fd.as_raw_fd() as u32;
        attr.info.info_len = std::mem::size_of::<bpf_btf_info>() as u32;
        attr.info.info = &mut info as *mut bpf_btf_info as u64;
        sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        if info.kernel_btf != 0 && &buf[..len] == name.as_bytes() {
            return Ok(Some(fd));
        }
    }
}

/// fentry or fexit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    FEntry,
    FExit,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::FEntry => "fentry",
            Kind::FExit => "fexit",
        }
    }
}

/// Why the kernel refused a program: errno and the verifier's last line.
#[derive(Debug)]
pub struct LoadError {
    pub error: std::io::Error,
    pub verifier: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        if !self.verifier.is_empty() {
            write!(f, " (verifier: {})", self.verifier)?;
        }
        Ok(())
    }
}

/// BPF_PROG_LOAD of a tracing program on `btf_id` (in the BTF object
/// `btf_obj`, or vmlinux when None).
pub fn load(
    name: &str,
    image: &ProgramImage,
    kind: Kind,
    btf_id: u32,
    btf_obj: Option<&OwnedFd>,
) -> Result<OwnedFd, LoadError> {
    let try_load = |log: Option<&mut Vec<u8>>| {
        let mut attr = zeroed_attr();
        // SAFETY: writing fields of the BPF_PROG_LOAD member of a zeroed union.
        let p = unsafe { &mut attr.__bindgen_anon_3 };
        p.prog_type = bpf_prog_type::BPF_PROG_TYPE_TRACING as u32;
        p.expected_attach_type = match kind {
            Kind::FEntry => bpf_attach_type::BPF_TRACE_FENTRY,
            Kind::FExit => bpf_attach_type::BPF_TRACE_FEXIT,
        } as u32;
        p.insn_cnt = image.insns.len() as u32;
        p.insns = image.insns.as_ptr() as u64;
        p.license = image.license.as_ptr() as u64;
        p.attach_btf_id = btf_id;
        p.__bindgen_anon_1.attach_btf_obj_fd = btf_obj.map_or(0, |fd| fd.as_raw_fd() as u32);
        // The kernel keeps 15 name bytes; the C names fit.
        for (dst, src) in p.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *dst = src as libc::c_char;
        }
        if let Some(log) = log {
            p.log_level = 1;
            p.log_size = log.len() as u32;
            p.log_buf = log.as_mut_ptr() as u64;
        }
        sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    match try_load(None) {
        Ok(fd) => Ok(owned(fd)),
        Err(error) => {
            // Load again with a log to say why (as aya does).
            let mut log = vec![0u8; 1 << 20];
            let _ = try_load(Some(&mut log));
            let text =
                String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)])
                    .into_owned();
            if std::env::var_os("CONNTRACK_TRACE_VERIFIER_LOG").is_some() {
                eprintln!("{text}");
            }
            Err(LoadError {
                error,
                verifier: super::verifier_verdict(&text),
            })
        }
    }
}

/// Attaches a loaded fentry/fexit program (BPF_RAW_TRACEPOINT_OPEN without a
/// name creates the trampoline link). Closing the returned fd detaches.
pub fn attach(prog: &OwnedFd) -> std::io::Result<OwnedFd> {
    let mut attr = zeroed_attr();
    attr.raw_tracepoint.name = 0;
    attr.raw_tracepoint.prog_fd = prog.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut attr).map(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded object relocates against any set of map fds, and holds
    /// every program the fexit backend loads by name.
    #[test]
    fn relocates_the_fexit_programs() {
        let obj = aya_obj::Object::parse(crate::kernel::backend::EBPF_OBJECT).unwrap();
        let fds: HashMap<String, RawFd> = obj
            .maps
            .keys()
            .enumerate()
            .map(|(i, name)| (name.clone(), 100 + i as RawFd))
            .collect();
        let images = relocate(crate::kernel::backend::EBPF_OBJECT, &fds).unwrap();
        for prog in [
            "ct_alloc_exit",
            "early_drop_enter",
            "early_drop_exit",
            "ct_delete_exit",
            "ct_confirm_enter",
            "ct_confirm_exit",
        ] {
            let image = images.get(prog).unwrap_or_else(|| panic!("{prog} missing"));
            assert!(!image.insns.is_empty(), "{prog}");
            assert_eq!(image.license.to_str().unwrap(), "Dual MIT/GPL");
        }
        let mut partial = fds.clone();
        partial.remove("COUNTERS");
        let err = relocate(crate::kernel::backend::EBPF_OBJECT, &partial)
            .err()
            .unwrap();
        assert_eq!(err, "map `COUNTERS` was not created");
    }
}
