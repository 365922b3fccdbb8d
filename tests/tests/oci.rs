//! The agent's container image (`cargo xtask image`, an OCI layout) run by
//! a real OCI runtime, runc, the way deploy/kubernetes/daemonset.yaml runs
//! it: the image's Entrypoint with the DaemonSet's args, root with exactly
//! the manifest's added capabilities, no new privileges, a read-only root
//! filesystem, the node's network and UTS namespaces (hostNetwork), a pid
//! namespace unless hostPID, the manifest's hostPath mounts and its memory
//! limit. It must become ready and serve metrics — and fail naming the
//! capability when one it needs is taken away.
//!
//! daemonset-autopilot.yaml runs the same way: with its CAP_NET_ADMIN and
//! the node's /proc/sys/net/netfilter mounted read-write, the agent arms
//! its autopilot; under daemonset.yaml's read-only /proc/sys,
//! `--autopilot=on` refuses to start, naming the file.
//!
//! Not mirrored: the RuntimeDefault seccomp profile (runc applies none
//! unless given one; the profile is the runtime's, not the manifest's).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conntrack_trace_tests::{
    Scratch, Sysctl, backend_args, http_metrics, kernel_test,
    manifest::{AUTOPILOT, DaemonSet, Mount},
    path_str, run,
};
use serde_json::{Value, json};

/// The layout `cargo xtask test` builds and names in
/// CONNTRACK_TRACE_OCI_LAYOUT (else `cargo xtask image`'s default), or
/// None with the reason printed. In CI (CONNTRACK_TRACE_REQUIRE_ROOT) a
/// missing image or runc is a failure, not a skip.
fn image_or_skip(test: &str) -> Result<Option<PathBuf>> {
    if std::env::var_os("CONNTRACK_TRACE_VM").is_some() {
        eprintln!("SKIPPED {test}: runc and the image are not in the VM image (host test)");
        return Ok(None);
    }
    let layout = std::env::var_os("CONNTRACK_TRACE_OCI_LAYOUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image/oci"));
    let why = if !layout.join("index.json").is_file() {
        format!(
            "no OCI layout at {} (run `cargo xtask image`)",
            layout.display()
        )
    } else if Command::new("runc").arg("--version").output().is_err() {
        "runc is not installed (run `cargo xtask setup`)".to_owned()
    } else {
        return Ok(Some(layout));
    };
    if std::env::var_os("CONNTRACK_TRACE_REQUIRE_ROOT").is_some() {
        bail!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    Ok(None)
}

fn json_file(p: &Path) -> Result<Value> {
    let text = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", p.display()))
}

/// The sha256 of a file (or of `gzip -dc` of it), by coreutils: a check of
/// the layout independent of the builder's own hashing.
fn sha256sum(path: &Path, gunzip: bool) -> Result<String> {
    let p = path_str(path);
    let cmd = if gunzip {
        format!("gzip -dc '{p}' | sha256sum")
    } else {
        format!("sha256sum '{p}'")
    };
    let out = run("bash", &["-c", &format!("set -o pipefail; {cmd}")])?;
    Ok(format!(
        "sha256:{}",
        out.get(..64).context("sha256sum output")?
    ))
}

/// The image unpacked from the layout: index.json → manifest → config and
/// its one layer, each checked against its digest, the layer untarred.
struct Image {
    rootfs: PathBuf,
    entrypoint: Vec<String>,
    /// io.containerd.image.name of the index entry.
    name: String,
}

fn unpack(layout: &Path, into: &Path) -> Result<Image> {
    let blob = |d: &Value| -> Result<PathBuf> {
        let d = d.as_str().context("digest is not a string")?;
        let hex = d.strip_prefix("sha256:").context("not a sha256 digest")?;
        let p = layout.join("blobs/sha256").join(hex);
        ensure!(
            sha256sum(&p, false)? == d,
            "{} does not match its digest",
            p.display()
        );
        Ok(p)
    };
    let index = json_file(&layout.join("index.json"))?;
    let entry = &index["manifests"][0];
    let manifest = json_file(&blob(&entry["digest"])?)?;
    ensure!(
        manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json",
        "manifest mediaType {}",
        manifest["mediaType"]
    );
    let config = json_file(&blob(&manifest["config"]["digest"])?)?;
    let layers = manifest["layers"].as_array().context("no layers")?;
    ensure!(layers.len() == 1, "{} layers, want 1", layers.len());
    let layer = blob(&layers[0]["digest"])?;
    ensure!(
        config["rootfs"]["diff_ids"][0] == sha256sum(&layer, true)?,
        "diff_id is not the uncompressed layer's digest"
    );
    let rootfs = into.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    run("tar", &["-xzf", path_str(&layer), "-C", path_str(&rootfs)])?;
    let entrypoint = serde_json::from_value(config["config"]["Entrypoint"].clone())
        .context("config Entrypoint")?;
    Ok(Image {
        rootfs,
        entrypoint,
        name: entry["annotations"]["io.containerd.image.name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    })
}

fn bind(destination: &str, source: &Path, read_only: bool) -> Value {
    let mut options = vec!["rbind", "nosuid", "nodev"];
    if read_only {
        options.push("ro");
    }
    json!({"destination": destination, "type": "bind", "source": source, "options": options})
}

/// The runc bundle's config.json for the DaemonSet's container with
/// `caps`. `host` maps the manifest's hostPaths that the test replaces
/// (the record dir: a scratch directory instead of the node's).
fn runtime_config(
    image: &Image,
    ds: &DaemonSet,
    caps: &[String],
    args: &[String],
    mounts: &[(Mount, PathBuf)],
    ready_dir: &Path,
) -> Result<Value> {
    let caps: Vec<String> = caps.iter().map(|c| format!("CAP_{c}")).collect();
    // hostNetwork: the node's network namespace, and (as kubelet does for
    // hostNetwork pods) its UTS namespace.
    ensure!(ds.flag("hostNetwork")?, "the DaemonSet is not hostNetwork");
    let mut namespaces = vec![json!({"type": "mount"}), json!({"type": "ipc"})];
    if !ds.flag("hostPID")? {
        namespaces.push(json!({"type": "pid"}));
    }
    // runc's own defaults (`runc spec`), which containerd applies too.
    let mut all_mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    for (m, host) in mounts {
        all_mounts.push(bind(&m.container_path, host, m.read_only));
    }
    all_mounts.push(bind("/run/ctt", ready_dir, false));
    Ok(json!({
        "ociVersion": "1.0.2",
        "root": {"path": image.rootfs, "readonly": ds.flag("readOnlyRootFilesystem")?},
        "process": {
            "terminal": false,
            "user": {"uid": ds.scalar("runAsUser")?.parse::<u32>()?, "gid": 0},
            "args": image.entrypoint.iter().chain(args).collect::<Vec<_>>(),
            "env": [],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
                "inheritable": [], "ambient": [],
            },
            "noNewPrivileges": !ds.flag("allowPrivilegeEscalation")?,
        },
        "mounts": all_mounts,
        "linux": {
            "namespaces": namespaces,
            "resources": {
                "devices": [{"allow": false, "access": "rwm"}],
                "memory": {"limit": ds.memory_limit()?},
            },
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                "/proc/sysrq-trigger"],
        },
    }))
}

/// A `runc run` in the foreground (its exit status is the agent's); the
/// container is deleted on drop, also when the test fails.
struct Container {
    id: String,
    child: Option<Child>,
}

impl Container {
    /// Kills with `signal` and waits (bounded) for the exit status.
    fn stop(&mut self, signal: &str) -> Result<std::process::ExitStatus> {
        let _ = Command::new("runc")
            .args(["kill", &self.id, signal])
            .stderr(Stdio::null())
            .status();
        let mut child = self.child.take().context("already stopped")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("container {} did not exit 20 s after SIG{signal}", self.id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("runc")
                .args(["kill", &self.id, "KILL"])
                .stderr(Stdio::null())
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("runc")
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
    }
}

/// The container's memory cgroup: (limit, peak so far) in bytes, cgroup v1
/// or v2, read from its init process's /proc/PID/cgroup.
fn memory_cgroup(id: &str) -> Result<(u64, u64)> {
    let state: Value = serde_json::from_str(&run("runc", &["state", id])?)?;
    let pid = state["pid"].as_u64().context("runc state: no pid")?;
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let read = |p: String| -> Result<u64> {
        let v = fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
        v.trim().parse().with_context(|| format!("{p}: {v:?}"))
    };
    for l in cgroups.lines() {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next(), f.next(), f.next().unwrap_or_default());
        if controllers.is_some_and(|c| c.split(',').any(|c| c == "memory")) {
            let d = format!("/sys/fs/cgroup/memory{path}");
            return Ok((
                read(format!("{d}/memory.limit_in_bytes"))?,
                read(format!("{d}/memory.max_usage_in_bytes"))?,
            ));
        }
        if controllers == Some("") && Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            let d = format!("/sys/fs/cgroup{path}");
            return Ok((
                read(format!("{d}/memory.max"))?,
                read(format!("{d}/memory.peak"))?,
            ));
        }
    }
    bail!("container {id}: no memory cgroup in /proc/{pid}/cgroup: {cgroups}")
}

struct Outcome {
    ready: bool,
    /// (limit, peak) of its memory cgroup once ready.
    memory: Option<(u64, u64)>,
    /// The agent's exit code (after SIGTERM when it became ready).
    exit: Option<i32>,
    stderr: String,
    metrics: String,
    /// Names the agent left in the record dir.
    recorded: Vec<String>,
}

static RUNS: AtomicU32 = AtomicU32::new(0);

/// Runs the image under runc with `caps` (and `extra` args after the
/// manifest's) until ready (then SIGTERM) or its exit, within 60 s.
fn run_with(layout: &Path, ds: &DaemonSet, caps: &[String], extra: &[&str]) -> Result<Outcome> {
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let id = format!("ctt-oci-{}-{n}", std::process::id());
    let dir = Scratch::new("oci", &n.to_string())?;
    let image = unpack(layout, &dir.0)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    // The DaemonSet's args, listening on a free loopback port instead of
    // the node's 9637 on every address.
    let mut args: Vec<String> = ds
        .args()?
        .into_iter()
        .map(|a| match a.starts_with("--metrics-addr") {
            true => format!("--metrics-addr=127.0.0.1:{port}"),
            false => a,
        })
        .collect();
    args.extend(["--ready-file=/run/ctt/ready".to_owned()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(backend_args());
    // The record dir is the test's; the other hostPaths (BTF, the
    // autopilot's sysctls) the node's.
    let mut mounts = Vec::new();
    for m in ds.mounts()? {
        let host = if m.name != "record" {
            PathBuf::from(&m.host_path)
        } else {
            let d = dir.path(&m.name);
            fs::create_dir_all(&d)?;
            d
        };
        mounts.push((m, host));
    }
    let record = mounts
        .iter()
        .find(|(m, _)| m.name == "record")
        .map(|(_, h)| h.clone())
        .context("no record volume")?;
    let ready_dir = dir.path("run");
    fs::create_dir_all(&ready_dir)?;
    let config = runtime_config(&image, ds, caps, &args, &mounts, &ready_dir)?;
    fs::write(dir.path("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let err = dir.path("stderr");
    let child = Command::new("runc")
        .args(["run", "--bundle", path_str(&dir.0), &id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err)?)
        .spawn()
        .context("running runc")?;
    let mut c = Container {
        id,
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut exit, mut metrics) = (None, String::new());
    let ready = loop {
        if ready_dir.join("ready").exists() {
            metrics = http_metrics(port)?;
            break true;
        }
        if let Some(s) = c.child.as_mut().context("no child")?.try_wait()? {
            exit = s.code();
            c.child = None;
            break false;
        }
        if Instant::now() > deadline {
            bail!(
                "{}: neither ready nor exited within 60 s: {}",
                c.id,
                fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let memory = if ready {
        let m = memory_cgroup(&c.id)?;
        exit = c.stop("TERM")?.code();
        Some(m)
    } else {
        None
    };
    let mut recorded: Vec<String> = fs::read_dir(&record)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    recorded.sort();
    Ok(Outcome {
        ready,
        memory,
        exit,
        stderr: fs::read_to_string(&err)?,
        metrics,
        recorded,
    })
}

fn first_lines(s: &str) -> String {
    s.lines().take(3).collect::<Vec<_>>().join(" | ")
}

#[test]
fn image_runs_under_runc_as_the_daemonset_runs_it() -> Result<()> {
    const TEST: &str = "image_runs_under_runc_as_the_daemonset_runs_it";
    let Some(layout) = image_or_skip(TEST)? else {
        return Ok(());
    };
    let Some(_lock) = kernel_test(TEST)? else {
        return Ok(());
    };
    let ds = DaemonSet::load()?;
    let caps = ds.caps()?;
    let o = run_with(&layout, &ds, &caps, &[])?;
    eprintln!(
        "with {caps:?}: ready {}, exit {:?}, recorded {:?}; {}",
        o.ready,
        o.exit,
        o.recorded,
        first_lines(&o.stderr)
    );
    assert!(
        o.ready,
        "ready with the manifest's capabilities: {}",
        o.stderr
    );
    assert!(o.metrics.contains("conntrack_trace_info{"), "{}", o.metrics);
    assert!(
        o.stderr.contains("\"kept\":[\"CAP_BPF\"]"),
        "drops all but CAP_BPF: {}",
        o.stderr
    );
    assert_eq!(o.exit, Some(0), "SIGTERM stops it cleanly: {}", o.stderr);
    // It loaded and attached under the manifest's memory limit, enforced.
    let (limit, peak) = o.memory.context("no memory reading")?;
    eprintln!("memory cgroup: limit {limit} bytes, peak {peak} bytes");
    assert_eq!(limit, ds.memory_limit()?);
    assert!(peak > 0 && peak <= limit, "peak {peak}");
    let tracepoint = o.stderr.contains("backend tracepoint");
    if tracepoint {
        assert!(
            o.stderr.contains("tp_btf/kmem_cache_free"),
            "SYSLOG gives the eviction hook: {}",
            o.stderr
        );
    }
    // The image the DaemonSet names.
    let image = unpack(&layout, &Scratch::new("oci", "name")?.0)?;
    let want = ds.scalar("image")?;
    assert!(
        image.name.ends_with(&format!("/{want}")),
        "layout names {}, the DaemonSet {want}",
        image.name
    );
    for missing in ["BPF", "PERFMON"] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let o = run_with(&layout, &ds, &fewer, &[])?;
        eprintln!("without {missing}: exit {:?}; {}", o.exit, o.stderr.trim());
        assert!(!o.ready, "must fail without CAP_{missing}");
        assert!(matches!(o.exit, Some(c) if c != 0), "exit {:?}", o.exit);
        assert!(
            o.stderr.contains(&format!("missing CAP_{missing}")),
            "names CAP_{missing}: {}",
            o.stderr
        );
        // Root in a container: the advice is to grant it, not sudo.
        assert!(
            o.stderr.contains("grant them to the container") && !o.stderr.contains("sudo"),
            "{}",
            o.stderr
        );
    }
    // Without SYSLOG it still runs (the tracepoint backend loses its
    // kallsyms-located hooks and says so: see deploy.rs).
    let fewer: Vec<String> = caps.iter().filter(|c| *c != "SYSLOG").cloned().collect();
    let o = run_with(&layout, &ds, &fewer, &[])?;
    eprintln!(
        "without SYSLOG: ready {}, exit {:?}; {}",
        o.ready,
        o.exit,
        first_lines(&o.stderr)
    );
    assert!(o.ready, "{}", o.stderr);
    if tracepoint {
        assert!(!o.stderr.contains("tp_btf/kmem_cache_free"), "{}", o.stderr);
    }
    autopilot_manifest(&layout, &ds)
}

/// daemonset-autopilot.yaml under runc: armed (and keeping CAP_NET_ADMIN);
/// `--autopilot=on` under daemonset.yaml's read-only /proc/sys: refused at
/// start, exit 3, naming the file. Nothing is written: the host's table is
/// far from full (the sysctls are guarded all the same).
fn autopilot_manifest(layout: &Path, ds: &DaemonSet) -> Result<()> {
    let _max = Sysctl::keep("net.netfilter.nf_conntrack_max")?;
    let _buckets = Sysctl::keep("net.netfilter.nf_conntrack_buckets")?;
    let ap = DaemonSet::load_file(AUTOPILOT)?;
    let o = run_with(layout, &ap, &ap.caps()?, &[])?;
    eprintln!(
        "{AUTOPILOT}: ready {}, exit {:?}; {}",
        o.ready,
        o.exit,
        o.stderr
            .lines()
            .filter(|l| l.contains("autopilot_armed") || l.contains("capabilities_dropped"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert!(o.ready, "{AUTOPILOT}: {}", o.stderr);
    assert!(
        o.stderr
            .contains("\"event\":\"autopilot_armed\",\"mode\":\"on\""),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr
            .lines()
            .any(|l| l.contains("capabilities_dropped") && l.contains("CAP_NET_ADMIN")),
        "keeps CAP_NET_ADMIN: {}",
        o.stderr
    );
    assert_eq!(o.exit, Some(0), "{}", o.stderr);
    let o = run_with(layout, ds, &ds.caps()?, &["--autopilot=on"])?;
    eprintln!(
        "--autopilot=on under daemonset.yaml: exit {:?}; {}",
        o.exit,
        o.stderr.trim()
    );
    assert!(!o.ready && o.exit == Some(3), "{}", o.stderr);
    assert!(
        o.stderr.contains("nf_conntrack_max is not writable"),
        "{}",
        o.stderr
    );
    Ok(())
}
