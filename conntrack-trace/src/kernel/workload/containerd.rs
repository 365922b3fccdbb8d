//! containerd: its API through `ctr` (containerd's own client, shipped with
//! it), bounded in time. containerd speaks gRPC only; `ctr` saves us an
//! HTTP/2 + protobuf stack for a lookup that happens once per new
//! namespace, never per event.
//!
//! Tasks map init PIDs to (namespace, container id); a container's labels
//! carry the CRI plugin's pod metadata (`io.kubernetes.pod.*`,
//! `io.cri-containerd.kind` = `sandbox` for a pod's sandbox).

use std::{
    collections::BTreeMap,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::Unreachable;

/// `CONTAINERD_ADDRESS` (as `ctr` reads it), else the default socket.
pub fn socket() -> PathBuf {
    std::env::var_os("CONTAINERD_ADDRESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock"))
}

/// A container's record (`ctr containers info`), the parts we use.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Info {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "Image", default)]
    pub image: String,
}

impl Info {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.as_ref()?.get(k).map(String::as_str)
    }
}

pub struct Ctr {
    sock: PathBuf,
}

const TIMEOUT: Duration = Duration::from_secs(3);

impl Ctr {
    /// A client if the socket answers; why not otherwise.
    pub fn connect(sock: &Path) -> Result<Ctr, Unreachable> {
        // ctr would say the same in a long gRPC error; the socket tells
        // directly (and a permission problem is named as one).
        std::os::unix::net::UnixStream::connect(sock).map_err(|e| Unreachable {
            path: sock.to_owned(),
            why: e.to_string(),
            permission: e.kind() == std::io::ErrorKind::PermissionDenied,
        })?;
        Ok(Ctr {
            sock: sock.to_owned(),
        })
    }

    fn run(&self, args: &[&str]) -> Result<String, Unreachable> {
        let fail = |why: String| Unreachable {
            path: self.sock.clone(),
            why,
            permission: false,
        };
        let mut child = Command::new("ctr")
            .arg("--address")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                fail(if e.kind() == std::io::ErrorKind::NotFound {
                    "ctr (containerd's client) is not installed".into()
                } else {
                    format!("running ctr: {e}")
                })
            })?;
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(fail(format!(
                        "ctr {} took more than {TIMEOUT:?}",
                        args.join(" ")
                    )));
                }
                Err(e) => return Err(fail(format!("waiting for ctr: {e}"))),
            }
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        if !status.success() {
            let line = err.lines().last().unwrap_or("").trim().to_owned();
            return Err(fail(format!("ctr {}: {line}", args.join(" "))));
        }
        Ok(out)
    }

    pub fn namespaces(&self) -> Result<Vec<String>, Unreachable> {
        Ok(self
            .run(&["namespaces", "ls", "-q"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Init PID -> container id of the running tasks in `ns`.
    pub fn tasks(&self, ns: &str) -> Result<BTreeMap<u32, String>, Unreachable> {
        Ok(parse_tasks(&self.run(&["-n", ns, "tasks", "ls"])?))
    }

    pub fn info(&self, ns: &str, id: &str) -> Result<Info, Unreachable> {
        let out = self.run(&["-n", ns, "containers", "info", id])?;
        serde_json::from_str(&out).map_err(|e| Unreachable {
            path: self.sock.clone(),
            why: format!("bad answer to ctr containers info: {e}"),
            permission: false,
        })
    }

    /// Ids of the containers in `ns` whose label `k` is `v`.
    pub fn with_label(&self, ns: &str, k: &str, v: &str) -> Result<Vec<String>, Unreachable> {
        let filter = format!("labels.\"{k}\"=={v}");
        Ok(self
            .run(&["-n", ns, "containers", "ls", "-q", &filter])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

/// `ctr tasks ls`: a `TASK PID STATUS` header, then one task a line.
fn parse_tasks(text: &str) -> BTreeMap<u32, String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let id = it.next()?;
            let pid: u32 = it.next()?.parse().ok()?;
            (pid != 0).then(|| (pid, id.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_as_ctr_1_6_prints_them() {
        let text =
            "TASK    PID      STATUS    \nctt1    18581    RUNNING\nctt2    0        CREATED\n";
        let t = parse_tasks(text);
        assert_eq!(t.len(), 1);
        assert_eq!(t[&18581], "ctt1");
        assert!(parse_tasks("TASK PID STATUS\n").is_empty());
    }

    #[test]
    fn info_of_a_cri_sandbox() {
        // Labels as the CRI plugin (containerd 1.6) sets them on a sandbox.
        let text = r#"{"ID":"5e0f","Labels":{"io.cri-containerd.kind":"sandbox","io.kubernetes.pod.name":"coredns-5d78c9869d-abcde","io.kubernetes.pod.namespace":"kube-system","io.kubernetes.pod.uid":"7a4d6d2e-3a4b-4c5d-8e9f-0a1b2c3d4e5f"},"Image":"registry.k8s.io/pause:3.6","Runtime":{"Name":"io.containerd.runc.v2"},"Spec":{}}"#;
        let i: Info = serde_json::from_str(text).unwrap();
        assert_eq!(i.label("io.cri-containerd.kind"), Some("sandbox"));
        assert_eq!(i.label("io.kubernetes.pod.namespace"), Some("kube-system"));
        let i: Info = serde_json::from_str(r#"{"ID":"ctt1","Labels":null,"Image":""}"#).unwrap();
        assert_eq!(i.label("x"), None);
    }
}
