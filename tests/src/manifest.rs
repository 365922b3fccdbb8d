//! What deploy/kubernetes/daemonset.yaml (and daemonset-autopilot.yaml)
//! asks of a node, read from the file itself so the tests that mirror it (the setpriv capability test in
//! deploy.rs, the runc test in oci.rs) follow it when it changes. A reader
//! of the few block and scalar forms the file uses, not a YAML parser: a
//! form it does not know is an error naming the key, never a guess.

use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};

pub const DAEMONSET: &str = "daemonset.yaml";
/// daemonset.yaml plus what `--autopilot=on` needs.
pub const AUTOPILOT: &str = "daemonset-autopilot.yaml";

pub struct DaemonSet {
    text: String,
}

/// One of the agent container's volumeMounts, with its hostPath.
#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub name: String,
    pub container_path: String,
    pub host_path: String,
    pub read_only: bool,
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

impl DaemonSet {
    pub fn load() -> Result<DaemonSet> {
        DaemonSet::load_file(DAEMONSET)
    }

    /// Another manifest of deploy/kubernetes ([`AUTOPILOT`]).
    pub fn load_file(name: &str) -> Result<DaemonSet> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/kubernetes")
            .join(name);
        Ok(DaemonSet {
            text: fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        })
    }

    /// The lines (trimmed, comments left out) nested under the first
    /// `key:` line.
    fn block(&self, key: &str) -> Result<Vec<&str>> {
        let mut lines = self.text.lines();
        let head = lines
            .by_ref()
            .find(|l| l.trim() == format!("{key}:"))
            .with_context(|| format!("daemonset.yaml: no `{key}:` block"))?;
        Ok(lines
            .filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
            // Deeper lines, or list items at the key's own indentation.
            .take_while(|l| {
                indent(l) > indent(head)
                    || (indent(l) == indent(head) && l.trim_start().starts_with("- "))
            })
            .map(str::trim)
            .collect())
    }

    /// A list block's `- item` values.
    fn list(&self, key: &str) -> Result<Vec<String>> {
        Ok(self
            .block(key)?
            .iter()
            .map_while(|l| l.strip_prefix("- "))
            .map(str::to_owned)
            .collect())
    }

    /// The value of the first `key: value` line.
    pub fn scalar(&self, key: &str) -> Result<String> {
        let prefix = format!("{key}: ");
        self.text
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix))
            .map(|v| v.trim().to_owned())
            .with_context(|| format!("daemonset.yaml: no `{key}:`"))
    }

    /// A `key: true|false` scalar.
    pub fn flag(&self, key: &str) -> Result<bool> {
        match self.scalar(key)?.as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            v => bail!("daemonset.yaml: {key}: {v} is not a boolean"),
        }
    }

    /// The capabilities the agent's securityContext adds, in its order.
    pub fn caps(&self) -> Result<Vec<String>> {
        self.list("add")
    }

    /// The agent container's args (what replaces the image's Cmd).
    pub fn args(&self) -> Result<Vec<String>> {
        self.list("args")
    }

    /// The container's memory limit in bytes (`limits: memory: NMi|NGi`).
    pub fn memory_limit(&self) -> Result<u64> {
        let v = self
            .block("limits")?
            .iter()
            .find_map(|l| l.strip_prefix("memory: "))
            .context("daemonset.yaml: no memory limit")?;
        let (n, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
        let mult = match unit {
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            _ => bail!("daemonset.yaml: memory limit {v}: only Mi and Gi are read"),
        };
        Ok(n.parse::<u64>().context("memory limit")? * mult)
    }

    /// The `- name: ...` entries of a block, as (key, value) lists.
    fn entries(&self, key: &str) -> Result<Vec<Vec<(String, String)>>> {
        let mut out: Vec<Vec<(String, String)>> = Vec::new();
        for l in self.block(key)? {
            let (item, l) = match l.strip_prefix("- ") {
                Some(rest) => (true, rest),
                None => (false, l),
            };
            if item {
                out.push(Vec::new());
            }
            let Some((k, v)) = l.split_once(':') else {
                bail!("daemonset.yaml: {key}: unreadable line `{l}`");
            };
            out.last_mut()
                .with_context(|| format!("daemonset.yaml: {key}: `{l}` before the first item"))?
                .push((k.trim().to_owned(), v.trim().to_owned()));
        }
        Ok(out)
    }

    /// The agent's volumeMounts joined with their hostPath volumes.
    pub fn mounts(&self) -> Result<Vec<Mount>> {
        let get = |e: &[(String, String)], k: &str| {
            e.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone())
        };
        let volumes = self.entries("volumes")?;
        self.entries("volumeMounts")?
            .iter()
            .map(|m| {
                let name = get(m, "name").context("volumeMount without a name")?;
                let host_path = volumes
                    .iter()
                    .filter(|v| get(v, "name").as_deref() == Some(&name))
                    .find_map(|v| get(v, "path"))
                    .with_context(|| format!("volume {name}: no hostPath path"))?;
                Ok(Mount {
                    container_path: get(m, "mountPath")
                        .with_context(|| format!("volumeMount {name}: no mountPath"))?,
                    read_only: get(m, "readOnly").as_deref() == Some("true"),
                    host_path,
                    name,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_daemonset() {
        let ds = DaemonSet::load().unwrap();
        assert_eq!(ds.caps().unwrap(), ["BPF", "PERFMON", "SYSLOG"]);
        let args = ds.args().unwrap();
        assert_eq!(args[0], "agent");
        assert!(args.contains(&"--record-dir=/var/lib/conntrack-trace".to_owned()));
        assert_eq!(ds.memory_limit().unwrap(), 256 << 20);
        assert!(ds.flag("hostNetwork").unwrap());
        assert!(!ds.flag("hostPID").unwrap());
        assert_eq!(ds.scalar("runAsUser").unwrap(), "0");
        assert_eq!(
            ds.mounts().unwrap(),
            [
                Mount {
                    name: "btf".into(),
                    container_path: "/sys/kernel/btf".into(),
                    host_path: "/sys/kernel/btf".into(),
                    read_only: true,
                },
                Mount {
                    name: "record".into(),
                    container_path: "/var/lib/conntrack-trace".into(),
                    host_path: "/var/lib/conntrack-trace".into(),
                    read_only: false,
                },
            ]
        );
    }

    /// The autopilot's manifest is the DaemonSet plus exactly its three
    /// additions.
    #[test]
    fn autopilot_is_the_daemonset_plus_three_additions() {
        let (ds, ap) = (
            DaemonSet::load().unwrap(),
            DaemonSet::load_file(AUTOPILOT).unwrap(),
        );
        let mut caps = ds.caps().unwrap();
        caps.push("NET_ADMIN".into());
        assert_eq!(ap.caps().unwrap(), caps);
        let mut args = ds.args().unwrap();
        args.extend([
            "--autopilot=on".into(),
            "--autopilot-sysctl-dir=/host/proc/sys/net/netfilter".into(),
        ]);
        assert_eq!(ap.args().unwrap(), args);
        let mut mounts = ds.mounts().unwrap();
        mounts.push(Mount {
            name: "netfilter-sysctls".into(),
            container_path: "/host/proc/sys/net/netfilter".into(),
            host_path: "/proc/sys/net/netfilter".into(),
            read_only: false,
        });
        assert_eq!(ap.mounts().unwrap(), mounts);
        for k in [
            "hostNetwork",
            "hostPID",
            "readOnlyRootFilesystem",
            "privileged",
        ] {
            assert_eq!(ap.flag(k).unwrap(), ds.flag(k).unwrap(), "{k}");
        }
        assert_eq!(ap.memory_limit().unwrap(), ds.memory_limit().unwrap());
        assert_eq!(ap.scalar("image").unwrap(), ds.scalar("image").unwrap());
    }
}
