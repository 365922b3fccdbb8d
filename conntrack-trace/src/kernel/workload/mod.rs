//! Who is it: network namespaces named as the containers and pods that own
//! them.
//!
//! A namespace is traced by inode; a process holding it (`/proc/PID/ns/net`)
//! says, through its cgroup path, which container and pod it belongs to
//! ([`cgroup`]). The runtime's API then gives the names people know: Docker
//! over its socket ([`docker`]), containerd through `ctr` ([`containerd`],
//! including the CRI plugin's pod labels), and the kubelet's pod directory
//! where no API answers ([`kubelet`]). Results are cached by inode and only
//! looked up again when namespaces come and go, never per event.
//!
//! A runtime socket that exists but cannot be read is said once on stderr;
//! the container is then named from its cgroup (`docker:0123456789ab`).
//! Namespaces without a workload keep the names [`crate::kernel::netns`] gives.

pub mod cgroup;
pub mod containerd;
pub mod docker;
pub mod kubelet;
mod names;
mod resolver;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};

pub use cgroup::Runtime;
pub use names::NetnsNames;
pub use resolver::{Config, Resolver};

use crate::kernel::netns::NetnsInfo;

/// Where a name came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The runtime's API (Docker's socket, containerd through `ctr`).
    Api,
    /// The kubelet's pod directory.
    Kubelet,
    /// The cgroup path alone: ids, no names.
    Cgroup,
}

/// The container whose process holds the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub runtime: Runtime,
    /// Full id (64 hex digits for Docker, CRI and podman; `ctr run`'s id).
    pub id: String,
    /// Docker's name (without the `/`); containerd has none beyond the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// containerd namespace (`default`, `k8s.io`, `moby`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub source: Source,
}

/// The Kubernetes pod whose sandbox holds the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub uid: String,
    /// Names of the pod's containers (not the sandbox), sorted.
    #[serde(default)]
    pub containers: Vec<String>,
    pub source: Source,
}

/// What owns one network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<Pod>,
}

impl Workload {
    /// The namespace's name: `pod:NAMESPACE/NAME` (or `pod:UID`),
    /// `docker:NAME`, `containerd:ID` (`containerd:NS/ID` outside the
    /// `default` namespace), `RUNTIME:ID12` when only the cgroup spoke.
    pub fn display(&self) -> String {
        if let Some(p) = &self.pod {
            return match (&p.namespace, &p.name) {
                (Some(ns), Some(n)) => format!("pod:{ns}/{n}"),
                (None, Some(n)) => format!("pod:{n}"),
                _ => format!("pod:{}", p.uid),
            };
        }
        let Some(c) = &self.container else {
            return String::new();
        };
        let rt = c.runtime.as_str();
        match (&c.name, &c.namespace) {
            (Some(n), _) => format!("{rt}:{n}"),
            (None, Some(ns)) if ns != "default" => format!("{rt}:{ns}/{}", c.id),
            (None, Some(_)) => format!("{rt}:{}", c.id),
            (None, None) => format!("{rt}:{}", &c.id[..c.id.len().min(12)]),
        }
    }
}

/// A runtime socket that exists but did not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreachable {
    pub path: PathBuf,
    pub why: String,
    /// EACCES: the caller lacks the rights (group `docker`, or root).
    pub permission: bool,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exists but cannot be read ({})",
            self.path.display(),
            self.why
        )?;
        if self.permission {
            write!(f, "; run as root or a member of the socket's group")?;
        }
        Ok(())
    }
}

/// The session's resolver: one per process, so the hooks where names are
/// computed (the live session's start and its refreshes) share one cache.
static RESOLVER: Mutex<Option<Resolver>> = Mutex::new(None);

fn with_resolver<T>(f: impl FnOnce(&mut Resolver) -> T) -> T {
    let mut g = RESOLVER.lock().unwrap_or_else(PoisonError::into_inner);
    let r = g.get_or_insert_with(|| Resolver::new(Config::from_env()));
    let out = f(r);
    for note in r.take_notes() {
        eprintln!("conntrack-trace: note: {note}");
    }
    out
}

/// The namespaces of `list`, whose workloads are resolved (cached), as
/// the live output names them: the workload's name where there is one,
/// else the name [`crate::kernel::netns`] gave.
pub fn names_of(list: &BTreeMap<u32, NetnsInfo>) -> NetnsNames {
    with_resolver(|r| {
        r.refresh(list);
        let mut names: NetnsNames = list.iter().map(|(k, v)| (*k, v.name.clone())).collect();
        for (ino, w) in r.workloads(list.keys().copied()) {
            names.insert(ino, w.display());
            names.set_workload(ino, w.clone());
        }
        names
    })
}

/// `list` with each workload's namespace renamed after it (for the views
/// that name namespaces through [`NetnsInfo`]: fills, scope, header).
pub fn named(mut list: BTreeMap<u32, NetnsInfo>) -> BTreeMap<u32, NetnsInfo> {
    with_resolver(|r| {
        r.refresh(&list);
        for (ino, w) in r.workloads(list.keys().copied().collect::<Vec<_>>()) {
            if let Some(ns) = list.get_mut(&ino) {
                ns.name = w.display();
            }
        }
        list
    })
}

/// One namespace (`--netns`), renamed after its workload if it has one.
pub fn named_one(ns: NetnsInfo) -> NetnsInfo {
    let ino = ns.inode;
    named(BTreeMap::from([(ino, ns)]))
        .remove(&ino)
        .expect("the entry put in")
}

/// True when a namespace looked up lately found no workload while a
/// runtime is present (a container's namespace can exist a moment before
/// its process joins the container's cgroup): ask again at the next tick.
pub fn wants_refresh() -> bool {
    with_resolver(|r| r.wants_refresh())
}
