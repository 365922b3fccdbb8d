//! Errors that end a run, each with its documented exit code.

use crate::{kernel::btf::BtfError, kernel::kallsyms::KallsymsError, kernel::netns::NetnsError};

/// Exit codes (documented in README.md).
pub mod exit {
    pub const OK: i32 = 0;
    /// Anything not covered below (I/O errors, ...).
    pub const FAILURE: i32 = 1;
    /// Bad command line (clap uses 2 as well).
    pub const USAGE: i32 = 2;
    /// Neither root (CAP_SYS_ADMIN) nor CAP_BPF+CAP_PERFMON.
    pub const PRIVILEGES: i32 = 3;
    /// No BTF, or the kernel lacks a type/symbol/hook we need.
    pub const UNSUPPORTED: i32 = 4;
    /// The kernel refused to load or attach a program.
    pub const LOAD: i32 = 5;
    /// `doctor`: a namespace is at risk (fill or forecast past its
    /// threshold, evictions, failed inserts).
    pub const AT_RISK: i32 = 6;
    /// `doctor`: the kernel is dropping packets for conntrack now.
    pub const DROPPING: i32 = 7;
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("insufficient privileges: {0}")]
    Privileges(String),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("unsupported kernel: {0}")]
    Unsupported(String),
    #[error("kernel refused to load program `{prog}`: {msg}")]
    Load { prog: String, msg: String },
    #[error("kernel refused to attach program `{prog}` to {hook}: {msg}")]
    Attach {
        prog: String,
        hook: String,
        msg: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl TraceError {
    pub fn exit_code(&self) -> i32 {
        match self {
            TraceError::Usage(_) | TraceError::Netns(_) => exit::USAGE,
            TraceError::Privileges(_) => exit::PRIVILEGES,
            TraceError::Btf(_) | TraceError::Unsupported(_) => exit::UNSUPPORTED,
            TraceError::Load { .. } | TraceError::Attach { .. } => exit::LOAD,
            TraceError::Io { .. } | TraceError::Other(_) => exit::FAILURE,
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TraceError {
        let context = context.into();
        move |source| TraceError::Io { context, source }
    }
}

impl From<KallsymsError> for TraceError {
    fn from(e: KallsymsError) -> Self {
        TraceError::Unsupported(e.to_string())
    }
}

/// Capabilities bits from include/uapi/linux/capability.h.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks the effective capabilities in /proc/self/status before touching
/// bpf(2), so the user gets advice instead of a bare EPERM. CAP_SYS_ADMIN is
/// not required for anything, `--netns` included: without it the kernel
/// counters of namespaces other than our own are not read (setns), and the
/// summary and a warning say which (kstats, `scope.uncovered`).
pub fn check_privileges(status: &str) -> Result<(), TraceError> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| TraceError::Other("cannot read CapEff from /proc/self/status".into()))?;
    let has = |c: u32| eff & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        // Name what is missing: a container granted one of the two must
        // learn which one to add.
        let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
            .into_iter()
            .filter(|(c, _)| !has(*c))
            .map(|(_, n)| n)
            .collect();
        // Already root (uid 0) and still without them: a container or a
        // bounding set that withholds them, where sudo cannot help.
        let root = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().nth(1))
            == Some("0");
        let advice = if root {
            "running as root without them: grant them to the container (Kubernetes securityContext.capabilities.add, docker --cap-add) or the service's capability bounding set"
        } else {
            "run with sudo"
        };
        Err(TraceError::Privileges(format!(
            "missing {}: tracing needs root, or CAP_BPF and CAP_PERFMON (without CAP_SYS_ADMIN the kernel counters of other namespaces are not covered, and the summary says which); {advice}",
            missing.join(" and ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_check() {
        assert!(check_privileges("Name:\tx\nCapEff:\t000001ffffffffff\n").is_ok());
        // CAP_BPF | CAP_PERFMON only.
        assert!(check_privileges("CapEff:\t000000c000000000\n").is_ok());
        let e = check_privileges("CapEff:\t0000000000000000\n").unwrap_err();
        assert_eq!(e.exit_code(), exit::PRIVILEGES);
        assert!(e.to_string().contains("run with sudo"));
        // `--netns` works without CAP_SYS_ADMIN (it warns instead): the
        // message must not say it needs it.
        assert!(!e.to_string().contains("--netns"), "{e}");
        assert!(e.to_string().contains("CAP_BPF and CAP_PERFMON"), "{e}");
        assert!(check_privileges("nothing here").is_err());
        // Root in a container that was not granted them: sudo is no advice.
        let e = check_privileges("Uid:\t0\t0\t0\t0\nCapEff:\t0000004000000000\n").unwrap_err();
        assert!(e.to_string().contains("missing CAP_BPF"), "{e}");
        assert!(!e.to_string().contains("sudo"), "{e}");
        assert!(e.to_string().contains("grant them to the container"), "{e}");
    }
}
