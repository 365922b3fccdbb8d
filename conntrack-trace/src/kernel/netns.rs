//! Network namespaces: finding them, naming them, and reading inside them.

use std::{
    collections::BTreeMap,
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// Where `ip netns add` bind-mounts named namespaces.
pub const RUN_NETNS: &str = "/run/netns";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsInfo {
    pub inode: u32,
    /// `/run/netns` name, `init`, or `pid N (comm)`.
    pub name: String,
    /// A path that can be opened for setns().
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetnsError {
    #[error(
        "--netns {0}: no such namespace (not a name under /run/netns, a path, or a known inode)"
    )]
    NotFound(String),
    #[error("--netns {spec}: {path} is not a network namespace")]
    NotNetns { spec: String, path: String },
}

fn inode_of(path: &Path) -> Option<u32> {
    let ino = fs::metadata(path).ok()?.ino();
    u32::try_from(ino).ok()
}

/// Every network namespace we can find a handle for: named ones, then the
/// init namespace, then those only held by a process. Keyed by inode.
pub fn list() -> BTreeMap<u32, NetnsInfo> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = fs::read_dir(RUN_NETNS) {
        let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            if let (Some(ino), Some(name)) = (inode_of(&p), p.file_name()) {
                out.entry(ino).or_insert(NetnsInfo {
                    inode: ino,
                    name: name.to_string_lossy().into_owned(),
                    path: p.clone(),
                });
            }
        }
    }
    // PID 1's namespace is the init namespace; where PID 1 cannot be read
    // (sandboxes), kthreadd (PID 2) always lives in init_net.
    for init in ["/proc/1/ns/net", "/proc/2/ns/net"].map(Path::new) {
        if let Some(ino) = inode_of(init) {
            out.entry(ino).or_insert(NetnsInfo {
                inode: ino,
                name: "init".into(),
                path: init.to_owned(),
            });
            break;
        }
    }
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let p = e.path().join("ns/net");
            let Some(ino) = inode_of(&p) else { continue };
            if out.contains_key(&ino) {
                continue;
            }
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.insert(
                ino,
                NetnsInfo {
                    inode: ino,
                    name: format!("pid {pid} ({})", comm.trim()),
                    path: p,
                },
            );
        }
    }
    out
}

/// Resolves `--netns NAME|PATH|INODE`.
pub fn resolve(spec: &str) -> Result<NetnsInfo, NetnsError> {
    let not_found = || NetnsError::NotFound(spec.to_owned());
    if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        let ino: u32 = spec.parse().map_err(|_| not_found())?;
        return list().remove(&ino).ok_or_else(not_found);
    }
    let path = if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        Path::new(RUN_NETNS).join(spec)
    };
    let ino = inode_of(&path).ok_or_else(not_found)?;
    // A netns handle is an nsfs inode; make sure it is one before setns().
    let file = fs::File::open(&path).map_err(|_| not_found())?;
    // SAFETY: fstatfs on an owned, open fd into a zeroed struct.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut sfs) };
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    if rc != 0 || sfs.f_type as i64 != NSFS_MAGIC {
        return Err(NetnsError::NotNetns {
            spec: spec.to_owned(),
            path: path.display().to_string(),
        });
    }
    let name = list()
        .remove(&ino)
        .map_or_else(|| spec.to_owned(), |i| i.name);
    Ok(NetnsInfo {
        inode: ino,
        name,
        path,
    })
}

/// Runs `f` on a helper thread that has joined the netns at `path`, so that
/// procfs reads (/proc/thread-self/net, /proc/sys/net) see that namespace
/// while the rest of the process stays where it is.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let file = fs::File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns on an owned fd; affects only this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("netns helper thread panicked"))?
    })
}

/// A namespace of the traced scope, held open for the whole session: the
/// end snapshot reads the very namespace the start snapshot read, even if
/// its PID or `/run/netns` name has been reused meanwhile (issue 11 item
/// 10). Our own namespace is read without entering it, which needs no
/// capability; entering another needs CAP_SYS_ADMIN (setns) and opening
/// another process's handle ptrace access, and when that is missing the
/// reason is kept, so the summary can say which namespaces its kernel
/// counters do not cover (item 8) instead of silently summing none.
#[derive(Clone, Debug)]
pub struct Held {
    pub info: NetnsInfo,
    handle: Handle,
}

#[derive(Clone, Debug)]
enum Handle {
    Own,
    Open(std::sync::Arc<fs::File>),
    Unavailable(String),
}

/// Holds every namespace of `scope` (see [`Held`]).
pub fn hold(scope: &[NetnsInfo]) -> Vec<Held> {
    let own = own_inode();
    scope
        .iter()
        .map(|ns| Held {
            info: ns.clone(),
            handle: if Some(ns.inode) == own {
                Handle::Own
            } else {
                open_handle(ns)
            },
        })
        .collect()
}

fn open_handle(ns: &NetnsInfo) -> Handle {
    let f = match fs::File::open(&ns.path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Handle::Unavailable(format!(
                "cannot open {}: {e} (needs CAP_SYS_PTRACE, or root's full capabilities)",
                ns.path.display()
            ));
        }
        Err(e) => {
            return Handle::Unavailable(format!("cannot open {}: {e}", ns.path.display()));
        }
    };
    // The path may name another namespace by now (a reused PID).
    match f.metadata().map(|m| m.ino()) {
        Ok(ino) if ino == u64::from(ns.inode) => Handle::Open(std::sync::Arc::new(f)),
        Ok(ino) => Handle::Unavailable(format!(
            "{} now names namespace {ino}, not {}",
            ns.path.display(),
            ns.inode
        )),
        Err(e) => Handle::Unavailable(format!("{}: {e}", ns.path.display())),
    }
}

impl Held {
    /// Runs `f` inside the namespace (on a helper thread that setns()'d,
    /// or here for our own); `Err` says why the namespace cannot be read.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        let file = match &self.handle {
            Handle::Own => return Ok(f()),
            Handle::Open(file) => file,
            Handle::Unavailable(why) => return Err(why.clone()),
        };
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns on an open fd we own; affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(if e.raw_os_error() == Some(libc::EPERM) {
                        format!("setns: {e} (entering a namespace needs CAP_SYS_ADMIN)")
                    } else {
                        format!("setns: {e}")
                    });
                }
                Ok(f())
            })
            .join()
            .map_err(|_| "netns helper thread panicked".to_owned())?
        })
    }
}

/// Inode of the calling process's own netns.
pub fn own_inode() -> Option<u32> {
    inode_of(Path::new("/proc/self/ns/net"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_is_listed() {
        let own = own_inode().expect("own netns inode");
        assert!(list().contains_key(&own));
    }

    #[test]
    fn resolve_by_inode_and_path() {
        let own = own_inode().unwrap();
        assert_eq!(resolve(&own.to_string()).unwrap().inode, own);
        assert_eq!(resolve("/proc/self/ns/net").unwrap().inode, own);
    }

    #[test]
    fn resolve_rejects_unknown_and_non_netns() {
        assert_eq!(
            resolve("no-such-ns-xyz"),
            Err(NetnsError::NotFound("no-such-ns-xyz".into()))
        );
        assert!(matches!(
            resolve("/etc/hostname"),
            Err(NetnsError::NotNetns { .. })
        ));
        assert!(resolve("4294967295").is_err());
    }
}
