//! The cache from namespace inode to workload, and the lookup behind it.
//!
//! A refresh costs one pass over `/proc` (a `readlink` of each process's
//! `ns/net`) when some namespace is not cached yet, one cgroup read per
//! new namespace, and at most one Docker listing plus the `ctr` calls for
//! new containerd containers. Cached namespaces cost one `readlink` of
//! their holder (is that PID still in it? inodes are reused).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    Container, Pod, Source, Unreachable, Workload,
    cgroup::{self, Hint, Runtime},
    containerd::{self, Ctr},
    docker, kubelet,
};
use crate::kernel::netns::NetnsInfo;

/// Where the resolver looks.
#[derive(Clone, Debug)]
pub struct Config {
    pub proc: PathBuf,
    pub docker: PathBuf,
    pub containerd: PathBuf,
    pub kubelet: PathBuf,
}

impl Config {
    /// The host's paths (`DOCKER_HOST`, `CONTAINERD_ADDRESS` and
    /// `KUBELET_ROOT_DIR` move them).
    pub fn from_env() -> Config {
        Config {
            proc: PathBuf::from("/proc"),
            docker: docker::socket(),
            containerd: containerd::socket(),
            kubelet: std::env::var_os("KUBELET_ROOT_DIR")
                .map_or_else(|| PathBuf::from("/var/lib/kubelet"), PathBuf::from),
        }
    }
}

/// A namespace looked up lately without a workload is asked about again
/// for this long while a runtime is present (its container may still be
/// starting: runc creates the namespace before the cgroup is joined).
const YOUNG: Duration = Duration::from_secs(3);

struct Entry {
    /// The process the answer came from (0: no process holds it).
    pid: u32,
    workload: Option<Workload>,
    first_seen: Instant,
}

/// Counters for the cost figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub refreshes: u64,
    /// Namespaces looked up (cache misses).
    pub lookups: u64,
    pub proc_scans: u64,
    pub docker_calls: u64,
    pub ctr_calls: u64,
}

pub struct Resolver {
    cfg: Config,
    cache: HashMap<u32, Entry>,
    notes: Vec<String>,
    noted: BTreeSet<String>,
    hints_seen: bool,
    last_refresh: Option<Instant>,
    stats: Stats,
}

struct Found {
    inode: u32,
    pid: u32,
    holders: Vec<u32>,
    hint: Hint,
    workload: Option<Workload>,
}

impl Resolver {
    pub fn new(cfg: Config) -> Resolver {
        Resolver {
            cfg,
            cache: HashMap::new(),
            notes: Vec::new(),
            noted: BTreeSet::new(),
            hints_seen: false,
            last_refresh: None,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Cached namespaces.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Notes for stderr since the last call (each said once per session).
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    fn note(&mut self, key: &str, text: String) {
        if self.noted.insert(key.to_owned()) {
            self.notes.push(text);
        }
    }

    fn runtime_present(&self) -> bool {
        self.hints_seen || self.cfg.docker.exists() || self.cfg.containerd.exists()
    }

    pub fn wants_refresh(&self) -> bool {
        self.runtime_present()
            && self
                .last_refresh
                .is_some_and(|t| t.elapsed() >= Duration::from_secs(1))
            && self
                .cache
                .values()
                .any(|e| e.workload.is_none() && e.first_seen.elapsed() < YOUNG)
    }

    /// The workloads of `inodes` found so far.
    pub fn workloads(&self, inodes: impl IntoIterator<Item = u32>) -> Vec<(u32, &Workload)> {
        inodes
            .into_iter()
            .filter_map(|i| Some((i, self.cache.get(&i)?.workload.as_ref()?)))
            .collect()
    }

    fn holds(&self, pid: u32, inode: u32) -> bool {
        netns_of(&self.cfg.proc.join(pid.to_string())) == Some(inode)
    }

    /// Brings the cache in line with `list` (the init namespace is never a
    /// workload's): drops namespaces that are gone, looks up new ones.
    pub fn refresh(&mut self, list: &BTreeMap<u32, NetnsInfo>) {
        self.stats.refreshes += 1;
        self.last_refresh = Some(Instant::now());
        let wanted: BTreeSet<u32> = list
            .values()
            .filter(|ns| ns.name != "init")
            .map(|ns| ns.inode)
            .collect();
        self.cache.retain(|i, _| wanted.contains(i));
        let present = self.runtime_present();
        let mut first_seen = HashMap::new();
        let stale: Vec<u32> = self
            .cache
            .iter()
            .filter(|(i, e)| {
                (e.pid != 0 && !self.holds(e.pid, **i))
                    || (present && e.workload.is_none() && e.first_seen.elapsed() < YOUNG)
            })
            .map(|(i, _)| *i)
            .collect();
        for i in stale {
            if let Some(e) = self.cache.remove(&i)
                && e.workload.is_none()
            {
                first_seen.insert(i, e.first_seen);
            }
        }
        let missing: BTreeSet<u32> = wanted
            .iter()
            .copied()
            .filter(|i| !self.cache.contains_key(i))
            .collect();
        if missing.is_empty() {
            return;
        }
        self.stats.lookups += missing.len() as u64;
        let mut found = self.scan(&missing);
        self.enrich(&mut found);
        let now = Instant::now();
        for f in found {
            self.cache.insert(
                f.inode,
                Entry {
                    pid: f.pid,
                    workload: f.workload,
                    first_seen: first_seen.get(&f.inode).copied().unwrap_or(now),
                },
            );
        }
    }

    /// One pass over /proc: the holders of each missing namespace, and the
    /// cgroup hint of the first holder that has one.
    fn scan(&mut self, missing: &BTreeSet<u32>) -> Vec<Found> {
        self.stats.proc_scans += 1;
        let mut holders: BTreeMap<u32, Vec<u32>> =
            missing.iter().map(|i| (*i, Vec::new())).collect();
        if let Ok(rd) = fs::read_dir(&self.cfg.proc) {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(ino) = netns_of(&e.path())
                    && let Some(v) = holders.get_mut(&ino)
                {
                    v.push(pid);
                }
            }
        }
        holders
            .into_iter()
            .map(|(inode, mut pids)| {
                pids.sort_unstable();
                let mut chosen = (pids.first().copied().unwrap_or(0), Hint::default());
                // A pod's or container's processes share its cgroup; a host
                // process that entered the namespace (nsenter, ip netns
                // exec) does not: the first holder with a container wins.
                for &pid in pids.iter().take(64) {
                    let path = self.cfg.proc.join(pid.to_string()).join("cgroup");
                    let Ok(text) = fs::read_to_string(path) else {
                        continue;
                    };
                    let h = cgroup::parse_proc_cgroup(&text);
                    if h.container.is_some() || h.pod_uid.is_some() {
                        chosen = (pid, h);
                        break;
                    }
                    if chosen.1.is_empty() && !h.is_empty() {
                        chosen = (pid, h);
                    }
                }
                if chosen.1.container.is_some() || chosen.1.pod_uid.is_some() {
                    self.hints_seen = true;
                }
                Found {
                    inode,
                    pid: chosen.0,
                    holders: pids,
                    hint: chosen.1,
                    workload: None,
                }
            })
            .collect()
    }

    fn enrich(&mut self, found: &mut [Found]) {
        self.ask_docker(found);
        self.ask_containerd(found);
        for f in found.iter_mut() {
            if f.workload.is_some() {
                continue;
            }
            let pod = f
                .hint
                .pod_uid
                .as_ref()
                .map(|uid| self.pod_from_kubelet(uid));
            let container = f.hint.container.as_ref().map(|(rt, id)| Container {
                runtime: *rt,
                id: id.clone(),
                name: None,
                image: None,
                namespace: None,
                source: Source::Cgroup,
            });
            if pod.is_some() || container.is_some() {
                // A pod's namespace is the pod's: its containers share it.
                let container = if pod.is_some() { None } else { container };
                f.workload = Some(Workload { container, pod });
            }
        }
    }

    fn pod_from_kubelet(&self, uid: &str) -> Pod {
        match kubelet::read(&self.cfg.kubelet, uid) {
            Some(d) => Pod {
                namespace: d.namespace,
                name: d.name,
                uid: uid.to_owned(),
                containers: d.containers,
                source: Source::Kubelet,
            },
            None => Pod {
                namespace: None,
                name: None,
                uid: uid.to_owned(),
                containers: Vec::new(),
                source: Source::Cgroup,
            },
        }
    }

    fn unreachable(&mut self, u: &Unreachable, what: &str) {
        let key = u.path.display().to_string();
        self.note(&key, format!("{u}: {what}"));
    }

    fn ask_docker(&mut self, found: &mut [Found]) {
        let wants = found
            .iter()
            .any(|f| matches!(f.hint.container, Some((Runtime::Docker, _))));
        if !wants {
            return;
        }
        let sock = self.cfg.docker.clone();
        if !sock.exists() {
            self.note(
                "docker-missing",
                format!(
                    "Docker containers found (by cgroup) but no Docker socket at {} (set DOCKER_HOST=unix://PATH): they are named by id",
                    sock.display()
                ),
            );
            return;
        }
        self.stats.docker_calls += 1;
        let listed = match docker::list(&sock) {
            Ok(l) => l,
            Err(u) => {
                self.unreachable(&u, "Docker containers are named by id (from their cgroup)");
                return;
            }
        };
        for f in found.iter_mut() {
            let Some((Runtime::Docker, id)) = &f.hint.container else {
                continue;
            };
            let Some(c) = listed.get(id) else { continue };
            f.workload = Some(docker_workload(c, &listed));
        }
    }

    fn ask_containerd(&mut self, found: &mut [Found]) {
        let wants = found.iter().any(|f| {
            f.workload.is_none()
                && (matches!(f.hint.container, Some((Runtime::Containerd, _)))
                    || f.hint.ctr_candidate.is_some()
                    || f.hint.pod_uid.is_some())
        });
        let sock = self.cfg.containerd.clone();
        if !wants || !sock.exists() {
            return;
        }
        let ctr = match Ctr::connect(&sock) {
            Ok(c) => c,
            Err(u) => {
                self.unreachable(
                    &u,
                    "containerd containers are named by id (from their cgroup)",
                );
                return;
            }
        };
        let mut calls = 0u64;
        let result = (|| -> Result<(), Unreachable> {
            calls += 1;
            let namespaces = ctr.namespaces()?;
            // pid -> (namespace, container id)
            let mut tasks: HashMap<u32, (String, String)> = HashMap::new();
            for ns in &namespaces {
                // Docker's own containers: Docker names them (above).
                if ns == "moby" {
                    continue;
                }
                calls += 1;
                for (pid, id) in ctr.tasks(ns)? {
                    tasks.insert(pid, (ns.clone(), id));
                }
            }
            for f in found.iter_mut().filter(|f| f.workload.is_none()) {
                let mut infos = Vec::new();
                for pid in &f.holders {
                    if let Some((ns, id)) = tasks.get(pid) {
                        calls += 1;
                        infos.push((ns.clone(), ctr.info(ns, id)?));
                        if infos.len() >= 8 {
                            break;
                        }
                    }
                }
                // A pod's sandbox (pause) holds the namespace for the pod.
                let best = infos
                    .iter()
                    .position(|(_, i)| i.label("io.cri-containerd.kind") == Some("sandbox"))
                    .unwrap_or(0);
                let Some((ns, info)) = infos.get(best) else {
                    continue;
                };
                let pod = match pod_from_labels(info.labels.as_ref(), Source::Api) {
                    Some(mut p) => {
                        calls += 1;
                        for id in ctr.with_label(ns, "io.kubernetes.pod.uid", &p.uid)? {
                            calls += 1;
                            let i = ctr.info(ns, &id)?;
                            if i.label("io.cri-containerd.kind") == Some("container")
                                && let Some(n) = i.label("io.kubernetes.container.name")
                            {
                                p.containers.push(n.to_owned());
                            }
                        }
                        p.containers.sort();
                        p.containers.dedup();
                        Some(p)
                    }
                    None => None,
                };
                let container = pod.is_none().then(|| Container {
                    runtime: Runtime::Containerd,
                    id: info.id.clone(),
                    name: info
                        .label("io.kubernetes.container.name")
                        .map(str::to_owned),
                    image: (!info.image.is_empty()).then(|| info.image.clone()),
                    namespace: Some(ns.clone()),
                    source: Source::Api,
                });
                f.workload = Some(Workload { container, pod });
                self.hints_seen = true;
            }
            Ok(())
        })();
        self.stats.ctr_calls += calls;
        if let Err(u) = result {
            self.unreachable(
                &u,
                "containerd containers are named by id (from their cgroup)",
            );
        }
    }
}

/// A pod from the CRI labels (`io.kubernetes.pod.*`) that containerd's CRI
/// plugin and cri-dockerd put on a pod's containers.
fn pod_from_labels(labels: Option<&BTreeMap<String, String>>, source: Source) -> Option<Pod> {
    let l = labels?;
    let uid = l.get("io.kubernetes.pod.uid")?;
    Some(Pod {
        namespace: l.get("io.kubernetes.pod.namespace").cloned(),
        name: l.get("io.kubernetes.pod.name").cloned(),
        uid: uid.clone(),
        containers: Vec::new(),
        source,
    })
}

fn docker_workload(c: &docker::Listed, all: &BTreeMap<String, docker::Listed>) -> Workload {
    let container = Container {
        runtime: Runtime::Docker,
        id: c.id.clone(),
        name: c.name().map(str::to_owned),
        image: (!c.image.is_empty()).then(|| c.image.clone()),
        namespace: None,
        source: Source::Api,
    };
    let pod = pod_from_labels(c.labels.as_ref(), Source::Api).map(|mut p| {
        // cri-dockerd: the pod's other containers carry the same uid.
        p.containers = all
            .values()
            .filter_map(|o| {
                let l = o.labels.as_ref()?;
                (l.get("io.kubernetes.pod.uid") == Some(&p.uid)
                    && l.get("io.kubernetes.docker.type").map(String::as_str) != Some("podsandbox"))
                .then(|| l.get("io.kubernetes.container.name").cloned())
                .flatten()
            })
            .collect();
        p.containers.sort();
        p.containers.dedup();
        p
    });
    let is_sandbox = c
        .labels
        .as_ref()
        .and_then(|l| l.get("io.kubernetes.docker.type"))
        .is_some_and(|t| t == "podsandbox");
    Workload {
        container: (pod.is_none() || !is_sandbox).then_some(container),
        pod,
    }
}

/// The netns inode of a `/proc/PID` directory (`readlink ns/net` is
/// `net:[INODE]`; cheaper than a stat).
fn netns_of(pid_dir: &Path) -> Option<u32> {
    let l = fs::read_link(pid_dir.join("ns/net")).ok()?;
    let s = l.to_str()?;
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc: pid -> (netns inode, cgroup file).
    fn fake_proc(tag: &str, procs: &[(u32, u32, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("ctt-proc-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (pid, ino, cg) in procs {
            let d = root.join(pid.to_string());
            fs::create_dir_all(d.join("ns")).unwrap();
            std::os::unix::fs::symlink(format!("net:[{ino}]"), d.join("ns/net")).unwrap();
            fs::write(d.join("cgroup"), cg).unwrap();
        }
        root
    }

    fn cfg(proc: PathBuf) -> Config {
        Config {
            proc,
            docker: PathBuf::from("/nonexistent/docker.sock"),
            containerd: PathBuf::from("/nonexistent/containerd.sock"),
            kubelet: PathBuf::from("/nonexistent/kubelet"),
        }
    }

    fn list(entries: &[(u32, &str)]) -> BTreeMap<u32, NetnsInfo> {
        entries
            .iter()
            .map(|(i, n)| {
                (
                    *i,
                    NetnsInfo {
                        inode: *i,
                        name: (*n).to_owned(),
                        path: PathBuf::from("/dev/null"),
                    },
                )
            })
            .collect()
    }

    const ID: &str = "bc476804eb2af2157d625626809925a1bfa429e356d96195f836ba4a4dc30f0d";

    #[test]
    fn cgroup_only_names_and_cache() {
        let uid = "7a4d6d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f";
        let proc = fake_proc(
            "a",
            &[
                (1, 100, "0::/init.scope\n"),
                (50, 200, "0::/user.slice/session-1.scope\n"),
                // A host process that entered the container's namespace
                // has the lower pid; the container's own process wins.
                (60, 300, "0::/user.slice/session-1.scope\n"),
                (70, 300, &format!("0::/system.slice/docker-{ID}.scope\n")),
                (80, 400, &format!("0::/kubepods/besteffort/pod{uid}/{ID}\n")),
            ],
        );
        let mut r = Resolver::new(cfg(proc.clone()));
        let l = list(&[
            (100, "init"),
            (200, "pid 50 (sh)"),
            (300, "pid 60 (bash)"),
            (400, "x"),
            (500, "gone"),
        ]);
        r.refresh(&l);
        r.take_notes();
        let w: BTreeMap<u32, String> = r
            .workloads(l.keys().copied())
            .into_iter()
            .map(|(i, w)| (i, w.display()))
            .collect();
        assert_eq!(
            w,
            BTreeMap::from([
                (300, "docker:bc476804eb2a".to_owned()),
                (400, format!("pod:{uid}"))
            ])
        );
        let w300 = &r.workloads([300])[0].1;
        assert_eq!(w300.container.as_ref().unwrap().source, Source::Cgroup);
        assert_eq!(r.stats().proc_scans, 1);
        // Cached: a second refresh scans nothing, unless the runtime is
        // "present" and young negatives are retried; here hints were seen,
        // so the negatives (200, 500) are asked about again.
        r.refresh(&l);
        assert_eq!(r.stats().lookups, 4 + 2);
        // A namespace whose holder left is looked up again.
        fs::remove_dir_all(proc.join("70")).unwrap();
        r.refresh(&l);
        assert!(r.workloads([300]).is_empty());
        let _ = fs::remove_dir_all(&proc);
    }

    #[test]
    fn hosts_without_runtimes_are_looked_up_once() {
        let proc = fake_proc("b", &[(1, 100, "0::/\n"), (9, 200, "0::/user.slice\n")]);
        let mut r = Resolver::new(cfg(proc.clone()));
        let l = list(&[(100, "init"), (200, "pid 9 (sh)")]);
        r.refresh(&l);
        r.refresh(&l);
        assert!(r.workloads([100, 200]).is_empty());
        assert_eq!(r.stats().proc_scans, 1);
        assert!(!r.wants_refresh());
        assert!(r.take_notes().is_empty());
        let _ = fs::remove_dir_all(&proc);
    }

    #[test]
    fn an_unreadable_docker_socket_is_noted_once() {
        let proc = fake_proc("c", &[(70, 300, &format!("0::/docker/{ID}\n"))]);
        let dir = std::env::temp_dir().join(format!("ctt-sock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("docker.sock");
        let _ = fs::remove_file(&sock);
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let mut c = cfg(proc.clone());
        c.docker = sock.clone();
        let mut r = Resolver::new(c);
        r.refresh(&list(&[(300, "pid 70 (sleep)")]));
        let notes = r.take_notes();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains(&format!("{} exists but cannot be read", sock.display())),
            "{}",
            notes[0]
        );
        assert!(notes[0].contains("named by id"), "{}", notes[0]);
        // Never an empty name: the cgroup's id.
        assert_eq!(r.workloads([300])[0].1.display(), "docker:bc476804eb2a");
        r.refresh(&list(&[(300, "x"), (301, "y")]));
        assert!(r.take_notes().is_empty(), "said once");
        let _ = fs::remove_dir_all(&proc);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn docker_labels_make_a_pod() {
        let mk = |id: &str, name: &str, ty: &str, cname: &str| docker::Listed {
            id: id.into(),
            names: vec![format!("/{name}")],
            image: "img".into(),
            labels: Some(BTreeMap::from([
                ("io.kubernetes.pod.uid".into(), "u1".into()),
                ("io.kubernetes.pod.name".into(), "web-0".into()),
                ("io.kubernetes.pod.namespace".into(), "prod".into()),
                ("io.kubernetes.docker.type".into(), ty.into()),
                ("io.kubernetes.container.name".into(), cname.into()),
            ])),
        };
        let sb = mk("s", "k8s_POD_web-0", "podsandbox", "POD");
        let app = mk("a", "k8s_app_web-0", "container", "app");
        let all = BTreeMap::from([("s".into(), sb.clone()), ("a".into(), app)]);
        let w = docker_workload(&sb, &all);
        assert_eq!(w.display(), "pod:prod/web-0");
        assert_eq!(w.pod.as_ref().unwrap().containers, ["app"]);
        assert!(w.container.is_none(), "the sandbox is the pod");
        let plain = docker::Listed {
            id: "p".into(),
            names: vec!["/web".into()],
            image: "".into(),
            labels: None,
        };
        assert_eq!(docker_workload(&plain, &all).display(), "docker:web");
    }

    #[test]
    fn display_names() {
        let c = |name: Option<&str>, ns: Option<&str>| Workload {
            container: Some(Container {
                runtime: Runtime::Containerd,
                id: "ctt1".into(),
                name: name.map(Into::into),
                image: None,
                namespace: ns.map(Into::into),
                source: Source::Api,
            }),
            pod: None,
        };
        assert_eq!(c(None, Some("default")).display(), "containerd:ctt1");
        assert_eq!(c(None, Some("ci")).display(), "containerd:ci/ctt1");
        assert_eq!(c(Some("app"), Some("k8s.io")).display(), "containerd:app");
        assert_eq!(c(None, None).display(), "containerd:ctt1");
    }
}
