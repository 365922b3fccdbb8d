//! The kubelet's pod directory (`/var/lib/kubelet/pods/<uid>/`): what a
//! node says about a pod when no runtime API answers.
//!
//! - `containers/<name>/`: one directory per container of the pod;
//! - `volumes/kubernetes.io~projected/kube-api-access-*/namespace`: the
//!   pod's namespace (the service-account volume every pod gets unless
//!   `automountServiceAccountToken: false`);
//! - `etc-hosts`: its last line maps the pod IP to the pod's hostname,
//!   which is the pod's name unless the spec sets `hostname`.

use std::{fs, path::Path};

/// What the pod directory gave.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodDir {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub containers: Vec<String>,
}

/// Reads `<kubelet_dir>/pods/<uid>`; None when there is no such directory.
pub fn read(kubelet_dir: &Path, uid: &str) -> Option<PodDir> {
    let dir = kubelet_dir.join("pods").join(uid);
    if !dir.is_dir() {
        return None;
    }
    let mut p = PodDir::default();
    if let Ok(rd) = fs::read_dir(dir.join("containers")) {
        p.containers = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        p.containers.sort();
    }
    if let Ok(rd) = fs::read_dir(dir.join("volumes/kubernetes.io~projected")) {
        p.namespace = rd.flatten().find_map(|e| {
            let ns = fs::read_to_string(e.path().join("namespace")).ok()?;
            let ns = ns.trim();
            (!ns.is_empty()).then(|| ns.to_owned())
        });
    }
    if let Ok(hosts) = fs::read_to_string(dir.join("etc-hosts")) {
        p.name = hosts
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().nth(1))
            .filter(|h| !matches!(*h, "localhost" | "ip6-localhost" | "ip6-loopback"))
            .map(|h| h.split('.').next().unwrap_or(h).to_owned());
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dir_as_the_kubelet_writes_it() {
        let root = std::env::temp_dir().join(format!("ctt-kubelet-{}", std::process::id()));
        let uid = "7a4d6d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f";
        let pod = root.join("pods").join(uid);
        for c in ["coredns", "sidecar"] {
            fs::create_dir_all(pod.join("containers").join(c)).unwrap();
        }
        let vol = pod.join("volumes/kubernetes.io~projected/kube-api-access-x2k9p");
        fs::create_dir_all(&vol).unwrap();
        fs::write(vol.join("namespace"), "kube-system").unwrap();
        fs::write(
            pod.join("etc-hosts"),
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n10.244.0.3\tcoredns-5d78c9869d-abcde\n",
        )
        .unwrap();
        let p = read(&root, uid).unwrap();
        assert_eq!(p.namespace.as_deref(), Some("kube-system"));
        assert_eq!(p.name.as_deref(), Some("coredns-5d78c9869d-abcde"));
        assert_eq!(p.containers, ["coredns", "sidecar"]);
        assert_eq!(read(&root, "00000000-0000-0000-0000-000000000000"), None);
        let _ = fs::remove_dir_all(&root);
    }
}
