//! What a process's cgroup path says about the workload it belongs to.
//!
//! Every container runtime puts a container's processes in a cgroup whose
//! path carries the container id, and the kubelet puts a pod's containers
//! under a cgroup that carries the pod UID. The shapes, by runtime and
//! cgroup driver (`systemd` or `cgroupfs`):
//!
//! | runtime | systemd driver | cgroupfs driver |
//! |---|---|---|
//! | Docker / Moby | `/system.slice/docker-<id>.scope` | `/docker/<id>` |
//! | containerd (CRI) | `…/kubepods-<qos>-pod<uid>.slice/cri-containerd-<id>.scope` | `/kubepods/<qos>/pod<uid>/<id>` |
//! | containerd (`ctr run`) | — | `/<namespace>/<id>` |
//! | CRI-O | `…/crio-<id>.scope` | `/kubepods/…/pod<uid>/crio-<id>` |
//! | podman | `/machine.slice/libpod-<id>.scope` (rootless: under `user@UID.service`) | `/libpod_parent/libpod-<id>` |
//!
//! Kubernetes pods with the systemd driver write the UID with `_` for `-`
//! (systemd unit names cannot hold `-` inside a slice component).

/// Which runtime a container belongs to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Docker,
    Containerd,
    Crio,
    Podman,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::Crio => "crio",
            Runtime::Podman => "podman",
        }
    }
}

/// What one cgroup path tells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hint {
    /// A container id (64 hex digits) and its runtime.
    pub container: Option<(Runtime, String)>,
    /// A Kubernetes pod UID (with dashes, as the API shows it).
    pub pod_uid: Option<String>,
    /// `/<a>/<b>` with no other shape: what `ctr run` makes (containerd
    /// namespace, container id) — only a candidate until containerd says so.
    pub ctr_candidate: Option<(String, String)>,
}

impl Hint {
    pub fn is_empty(&self) -> bool {
        self.container.is_none() && self.pod_uid.is_none() && self.ctr_candidate.is_none()
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod UID as the kubelet writes it into a cgroup name: 32 hex digits
/// with `-` (cgroupfs) or `_` (systemd) between the UUID's groups.
fn pod_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-");
    let groups: Vec<&str> = uid.split('-').collect();
    let ok = groups.len() == 5
        && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then_some(uid)
}

/// Container id in one path component: `<prefix>-<id>.scope` (systemd),
/// `<prefix>-<id>` or a bare id (cgroupfs).
fn container_in(comp: &str) -> Option<(Runtime, String)> {
    let comp = comp.strip_suffix(".scope").unwrap_or(comp);
    for (prefix, rt) in [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
        ("libpod-", Runtime::Podman),
    ] {
        if let Some(id) = comp.strip_prefix(prefix)
            && is_container_id(id)
        {
            return Some((rt, id.to_owned()));
        }
    }
    None
}

/// Reads one cgroup path (the part after `hierarchy-id:controllers:`).
pub fn parse_path(path: &str) -> Hint {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut h = Hint::default();
    let mut in_kubepods = false;
    for (i, c) in comps.iter().enumerate() {
        if let Some(found) = container_in(c) {
            // The innermost container wins (nested runtimes).
            h.container = Some(found);
            continue;
        }
        if c.starts_with("kubepods") {
            in_kubepods = true;
        }
        // systemd: kubepods-besteffort-pod<uid>.slice, kubepods-pod<uid>.slice
        if let Some(rest) = c.strip_suffix(".slice")
            && let Some(pos) = rest.rfind("-pod")
            && rest.starts_with("kubepods")
            && let Some(uid) = pod_uid(&rest[pos + 4..])
        {
            h.pod_uid = Some(uid);
            continue;
        }
        // cgroupfs: /kubepods/<qos>/pod<uid>/<id>
        if in_kubepods && let Some(uid) = c.strip_prefix("pod").and_then(pod_uid) {
            h.pod_uid = Some(uid);
            continue;
        }
        // cgroupfs Docker: /docker/<id>; kubelet cgroupfs: a bare id under
        // the pod. Which runtime a bare id under a pod belongs to is not in
        // the path; the caller asks the runtimes.
        if is_container_id(c) {
            let parent = i.checked_sub(1).map(|p| comps[p]);
            if parent == Some("docker") {
                h.container = Some((Runtime::Docker, (*c).to_owned()));
            } else if h.pod_uid.is_some() && h.container.is_none() {
                h.container = Some((Runtime::Containerd, (*c).to_owned()));
            }
        }
    }
    if h.container.is_none() && h.pod_uid.is_none() && comps.len() == 2 {
        let (ns, id) = (comps[0], comps[1]);
        let plausible = |s: &str| {
            !s.is_empty()
                && !s.ends_with(".slice")
                && !s.ends_with(".scope")
                && !s.ends_with(".service")
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if plausible(ns) && plausible(id) {
            h.ctr_candidate = Some((ns.to_owned(), id.to_owned()));
        }
    }
    h
}

/// Reads `/proc/PID/cgroup` content: the unified (`0::`) line first, then
/// the v1 `name=systemd` and other hierarchies, and keeps the first path
/// that says something.
pub fn parse_proc_cgroup(text: &str) -> Hint {
    let mut paths: Vec<(u8, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let (id, ctrl, path) = (it.next()?, it.next()?, it.next()?);
            let rank = match (id, ctrl) {
                ("0", "") => 0,
                (_, "name=systemd") => 1,
                _ => 2,
            };
            Some((rank, path))
        })
        .collect();
    paths.sort_by_key(|p| p.0);
    let mut best = Hint::default();
    for (_, p) in paths {
        let h = parse_path(p);
        if h.container.is_some() || h.pod_uid.is_some() {
            return h;
        }
        if best.is_empty() {
            best = h;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "bc476804eb2af2157d625626809925a1bfa429e356d96195f836ba4a4dc30f0d";
    const UID: &str = "7a4d6d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f";

    fn c(rt: Runtime) -> Option<(Runtime, String)> {
        Some((rt, ID.into()))
    }

    #[test]
    fn docker_systemd_driver() {
        let h = parse_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(h.container, c(Runtime::Docker));
        assert_eq!(h.pod_uid, None);
    }

    #[test]
    fn docker_cgroupfs_driver() {
        // This machine's dockerd 20.10 on cgroup v1, `docker run`.
        let text = format!(
            "9:name=systemd:/docker/{ID}\n8:pids:/docker/{ID}\n4:memory:/docker/{ID}\n0::/docker/{ID}\n"
        );
        assert_eq!(parse_proc_cgroup(&text).container, c(Runtime::Docker));
    }

    #[test]
    fn cri_containerd_systemd_driver() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let h = parse_path(&p);
        assert_eq!(h.container, c(Runtime::Containerd));
        assert_eq!(h.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn guaranteed_pod_systemd_driver() {
        // Guaranteed QoS pods sit directly under kubepods.slice.
        let p = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(parse_path(&p).pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn kubepods_cgroupfs_driver() {
        let h = parse_path(&format!("/kubepods/burstable/pod{UID}/{ID}"));
        assert_eq!(h.pod_uid.as_deref(), Some(UID));
        // Runtime unknown from the path; containerd is asked first.
        assert_eq!(h.container, c(Runtime::Containerd));
        let h = parse_path(&format!("/kubepods/pod{UID}/{ID}"));
        assert_eq!(h.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn kubepods_dockershim_systemd() {
        // cri-dockerd with the systemd driver: docker-<id>.scope under the pod.
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/docker-{ID}.scope",
            UID.replace('-', "_")
        );
        let h = parse_path(&p);
        assert_eq!(h.container, c(Runtime::Docker));
        assert_eq!(h.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn crio() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{ID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(parse_path(&p).container, c(Runtime::Crio));
        // The conmon of a CRI-O container is not the container.
        let p = format!("/system.slice/crio-conmon-{ID}.scope");
        assert_eq!(parse_path(&p).container, None);
    }

    #[test]
    fn podman_rootful_and_rootless() {
        let h = parse_path(&format!("/machine.slice/libpod-{ID}.scope"));
        assert_eq!(h.container, c(Runtime::Podman));
        let h = parse_path(&format!(
            "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
        ));
        assert_eq!(h.container, c(Runtime::Podman));
        let h = parse_path(&format!("/libpod_parent/libpod-{ID}"));
        assert_eq!(h.container, c(Runtime::Podman));
    }

    #[test]
    fn ctr_run_cgroupfs() {
        // This machine's containerd 1.6, `ctr run --rootfs ... ctt1`.
        let text = "9:name=systemd:/default/ctt1\n4:memory:/default/ctt1\n0::/default/ctt1\n";
        let h = parse_proc_cgroup(text);
        assert_eq!(h.container, None);
        assert_eq!(h.ctr_candidate, Some(("default".into(), "ctt1".into())));
    }

    #[test]
    fn nested_docker_in_docker_innermost_wins() {
        let inner = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let h = parse_path(&format!("/docker/{ID}/docker/{inner}"));
        assert_eq!(h.container, Some((Runtime::Docker, inner.into())));
    }

    #[test]
    fn host_paths_say_nothing() {
        for p in [
            "/",
            "/init.scope",
            "/system.slice/sshd.service",
            "/user.slice/user-0.slice/session-3.scope",
            "/system.slice/docker.service",
            "/system.slice/containerd.service",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-besteffort.slice",
        ] {
            let h = parse_path(p);
            assert_eq!(h.container, None, "{p}");
            assert_eq!(h.pod_uid, None, "{p}");
        }
        // This sandbox's own cgroup (v1 memory controller only).
        let text = "4:memory:/process_api/94e177da77c9f6c9fa6ee114aac91073\n1:cpu:/\n0::/\n";
        let h = parse_proc_cgroup(text);
        assert_eq!(h.container, None);
        assert_eq!(h.pod_uid, None);
        // Only a two-component path looks like `ctr run`; the caller
        // checks it against containerd before believing it.
        assert!(h.ctr_candidate.is_some());
    }

    #[test]
    fn unified_line_wins_over_v1() {
        let text = format!("4:memory:/somewhere/else\n0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(parse_proc_cgroup(&text).container, c(Runtime::Docker));
    }

    #[test]
    fn bad_ids_are_not_containers() {
        assert_eq!(parse_path("/system.slice/docker-abc.scope").container, None);
        assert_eq!(
            parse_path("/kubepods.slice/kubepods-podnot_a_uid.slice").pod_uid,
            None
        );
    }
}
