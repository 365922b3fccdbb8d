//! Dropping the capabilities the agent no longer needs once attached.
//!
//! Loading and attaching needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN),
//! and entering other namespaces to open their conntrack files CAP_SYS_ADMIN
//! (+ CAP_SYS_PTRACE for other users' handles). Afterwards the agent only
//! reads: the ring buffer (mmap'd), the files opened per namespace (see
//! `nsfiles`), its record directory, and the COUNTERS map through bpf(2).
//! That last one is why CAP_BPF stays: kernels before 6.5 refuse every
//! bpf(2) command without CAP_BPF when unprivileged BPF is disabled
//! (Debian's default `kernel.unprivileged_bpf_disabled=2`; the check moved
//! into map/program creation with commit c8644cd0efe7 in 6.5).
//! CAP_SYS_ADMIN and CAP_SYS_PTRACE stay where the agent has them: it
//! follows namespaces that appear later (entering them needs the first,
//! seeing every process's namespace the second; see `nsfiles::Tables`),
//! and the counters backend re-enters namespaces on every tick. Where they
//! were not granted (the DaemonSet) CAP_BPF is all that stays.
//!
//! Everything else goes from the effective, permitted, inheritable,
//! ambient and bounding sets, and no_new_privs is set, so neither the agent
//! nor anything it could be made to exec can get capabilities back.

pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;
const CAP_SETPCAP: u32 = 8;
const CAP_LAST: u32 = 40;

/// Capability names, for the log line and errors.
pub fn name(cap: u32) -> String {
    match cap {
        CAP_SYS_PTRACE => "CAP_SYS_PTRACE".into(),
        CAP_SYS_ADMIN => "CAP_SYS_ADMIN".into(),
        CAP_BPF => "CAP_BPF".into(),
        38 => "CAP_PERFMON".into(),
        CAP_NET_ADMIN => "CAP_NET_ADMIN".into(),
        24 => "CAP_SYS_RESOURCE".into(),
        c => format!("cap {c}"),
    }
}

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const VERSION_3: u32 = 0x2008_0522;

fn get() -> std::io::Result<u64> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget with a valid header and two data structs (v3 ABI).
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from(d[0].effective) | (u64::from(d[1].effective) << 32))
}

/// Keeps only `keep` (those of them the process has); returns the kept set.
pub fn drop_all_but(keep: &[u32]) -> std::io::Result<Vec<u32>> {
    let eff = get()?;
    let keep_mask: u64 = keep.iter().fold(0, |m, c| m | (1u64 << c)) & eff;
    // Bounding set first: dropping from it needs CAP_SETPCAP, which goes
    // with the capset below.
    if eff & (1 << CAP_SETPCAP) != 0 {
        for c in 0..=CAP_LAST {
            if keep_mask & (1 << c) == 0 {
                // SAFETY: prctl with integer arguments; EINVAL for a cap
                // this kernel does not know is fine.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) };
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0);
    }
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let d = [
        Data {
            effective: keep_mask as u32,
            permitted: keep_mask as u32,
            inheritable: 0,
        },
        Data {
            effective: (keep_mask >> 32) as u32,
            permitted: (keep_mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset of the calling thread with a valid header and data.
    // Capabilities are per thread: this runs before the agent starts any
    // thread of its own that outlives it (the runtime is current-thread;
    // helper threads of netns reads are scoped and joined).
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let now = get()?;
    Ok((0..=CAP_LAST).filter(|c| now & (1 << c) != 0).collect())
}
