//! Namespaces named as containers (issue 14), with real runtimes: Docker
//! (Debian's docker.io) and containerd (`ctr`), their daemons started here
//! on private sockets and state directories and stopped at the end.
//!
//! Two containers, each in its own network namespace, flood a server
//! namespace. Each container runs conntrack in its own namespace (an nft
//! `ct state` rule, as a service-mesh sidecar's iptables does in a pod) and
//! its table is full (`nf_conntrack_max`), so the drops happen in the
//! containers' namespaces: every event must carry the right container's
//! name and object, live, in the capture and in `export`.
//!
//! The image is built without a registry: a busybox-static root
//! filesystem, `docker import`ed for Docker and given to `ctr run
//! --rootfs` for containerd.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conntrack_trace_tests::{
    CtStats, Netns, Sysctl, Tracer,
    agent::{Agent, sample},
    binary, in_netns, json, kernel_test, run,
};

/// Why these tests cannot run here, or None. In the VMs (busybox
/// userland) there is no runtime; on a host without one they skip unless
/// CI asks for everything (`cargo xtask setup` installs them).
fn runtime_skip(test: &str, bins: &[&str]) -> Result<bool> {
    if std::env::var_os("CONNTRACK_TRACE_VM").is_some() {
        eprintln!("SKIPPED {test}: no container runtime in the VM image (busybox userland)");
        return Ok(true);
    }
    let missing: Vec<&str> = bins.iter().copied().filter(|b| !have(b)).collect();
    if !missing.is_empty() {
        if std::env::var_os("CONNTRACK_TRACE_REQUIRE_ROOT").is_some() {
            bail!(
                "{test}: {missing:?} not installed (cargo xtask setup installs docker.io, containerd, busybox-static)"
            );
        }
        eprintln!("SKIPPED {test}: {missing:?} not installed (run cargo xtask setup)");
        return Ok(true);
    }
    Ok(false)
}

fn have(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

/// A daemon of ours: SIGTERM (so it stops its containers), then SIGKILL.
struct Daemon {
    child: Child,
    what: &'static str,
    log: PathBuf,
}

impl Daemon {
    fn start(what: &'static str, cmd: &mut Command, log: PathBuf, sock: &Path) -> Result<Daemon> {
        let f = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let mut d = Daemon { child, what, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            if let Some(st) = d.child.try_wait()? {
                bail!("{what} exited ({st}): {}", d.tail());
            }
            ensure!(
                Instant::now() < deadline,
                "{what} not answering after 60 s: {}",
                d.tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    fn tail(&self) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGTERM: killed", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file removed at the end, whatever happens.
struct RmFile(PathBuf);

impl Drop for RmFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Private state of one test's runtimes, removed at the end.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        // Overlay mounts dockerd may have left behind first.
        if let Ok(m) = fs::read_to_string("/proc/self/mounts") {
            let mut ms: Vec<&str> = m
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|p| p.starts_with(self.0.to_str().unwrap_or("-")))
                .collect();
            ms.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in ms {
                let _ = Command::new("umount").arg("-l").arg(p).status();
            }
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// containerd on a private socket and root.
fn containerd(dir: &Path) -> Result<(Daemon, PathBuf)> {
    let sock = dir.join("containerd.sock");
    let cfg = dir.join("containerd.toml");
    fs::write(
        &cfg,
        format!(
            "version = 2\nroot = \"{0}/containerd/root\"\nstate = \"{0}/containerd/state\"\n[grpc]\n  address = \"{1}\"\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_cgroup = false\n",
            dir.display(),
            sock.display()
        ),
    )?;
    let d = Daemon::start(
        "containerd",
        Command::new("containerd").arg("--config").arg(&cfg),
        dir.join("containerd.log"),
        &sock,
    )?;
    Ok((d, sock))
}

/// dockerd on its own containerd, private sockets and state under `dir`,
/// with the busybox image `ctt-busybox:test` imported; both daemons
/// stopped on drop (dockerd first).
struct Docker {
    _dockerd: Daemon,
    _containerd: Daemon,
    sock: PathBuf,
    host: String,
}

impl Docker {
    fn start(dir: &Path) -> Result<Docker> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let (containerd, ctrd_sock) = containerd(dir)?;
        let sock = dir.join("docker.sock");
        let dockerd = Daemon::start(
            "dockerd",
            Command::new("dockerd")
                .arg("--data-root")
                .arg(dir.join("data"))
                .arg("--exec-root")
                .arg(dir.join("exec"))
                .arg("--pidfile")
                .arg(dir.join("dockerd.pid"))
                .arg("-H")
                .arg(format!("unix://{}", sock.display()))
                .arg("--containerd")
                .arg(&ctrd_sock)
                // Leave the host's firewall and bridges alone.
                .args(["--iptables=false", "--ip6tables=false", "--bridge=none"]),
            dir.join("dockerd.log"),
            &sock,
        )?;
        let host = format!("unix://{}", sock.display());
        let root = rootfs(dir)?;
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()?;
        let st = Command::new("docker")
            .args(["-H", &host, "import", "-", "ctt-busybox:test"])
            .stdin(tar.stdout.context("tar stdout")?)
            .stdout(Stdio::null())
            .status()?;
        ensure!(st.success(), "docker import failed");
        Ok(Docker {
            _dockerd: dockerd,
            _containerd: containerd,
            sock,
            host,
        })
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-H", self.host.as_str()];
        a.extend_from_slice(args);
        Ok(run("docker", &a)?.trim().to_owned())
    }
}

/// Docker containers removed on drop.
struct Containers<'a>(&'a Docker, Vec<String>);

impl Drop for Containers<'_> {
    fn drop(&mut self) {
        if self.1.is_empty() {
            return;
        }
        let mut a = vec!["rm", "-f"];
        a.extend(self.1.iter().map(String::as_str));
        let _ = self.0.run(&a);
    }
}

/// A root filesystem of busybox-static.
fn rootfs(dir: &Path) -> Result<PathBuf> {
    let r = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        fs::create_dir_all(r.join(d)).with_context(|| format!("mkdir {d}"))?;
    }
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("no busybox (package busybox-static)")?;
    fs::copy(bb, r.join("bin/busybox")).context("copying busybox")?;
    for l in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(l)).context("symlink")?;
    }
    Ok(r)
}

/// A container's namespace given a /run/netns name (so `ip -n` and the
/// traffic helpers reach it), wired to the server by a veth.
struct Client {
    ns: Netns,
    ip: std::net::Ipv4Addr,
    inode: u64,
}

fn wire(server: &Netns, pid: u32, tag: &str, n: u8) -> Result<Client> {
    let name = format!("ctt-wl{tag}{n}");
    // `ip netns attach` names the container's namespace; Netns's drop
    // removes the name only (the container keeps its namespace).
    let _ = Command::new("ip")
        .args(["netns", "del", &name])
        .stderr(Stdio::null())
        .status();
    run("ip", &["netns", "attach", &name, &pid.to_string()])?;
    let ns = Netns { name };
    let (vc, vs) = (format!("ctt-wl{tag}{n}c"), format!("ctt-wl{tag}{n}s"));
    run(
        "ip",
        &[
            "link",
            "add",
            &vc,
            "netns",
            &ns.name,
            "type",
            "veth",
            "peer",
            "name",
            &vs,
            "netns",
            &server.name,
        ],
    )?;
    let ip = std::net::Ipv4Addr::new(10, 78, 40 + n, 2);
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &vc])?;
    ns.ip(&["link", "set", &vc, "up"])?;
    ns.ip(&["link", "set", "lo", "up"])?;
    server.ip(&["addr", "add", &format!("10.78.{}.1/24", 40 + n), "dev", &vs])?;
    server.ip(&["link", "set", &vs, "up"])?;
    // conntrack on in the container's namespace, on the way out.
    ns.nft(
        "table inet ctt {\n chain output {\n  type filter hook output priority 0; policy accept;\n  ct state established,related accept\n }\n}\n",
    )?;
    let inode = ns.inode()?;
    Ok(Client { ns, ip, inode })
}

/// One UDP/53 datagram from each port. The container's own table drops
/// them on the way *out*, which send() reports as EPERM (NF_DROP at
/// LOCAL_OUT): expected here, so not an error.
fn udp_out(
    ns: &Netns,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    sports: std::ops::Range<u16>,
) -> Result<(u64, u64)> {
    in_netns(&ns.path(), || -> Result<(u64, u64)> {
        let (mut sent, mut refused) = (0, 0);
        for sport in sports {
            let s = std::net::UdpSocket::bind((src, sport))
                .with_context(|| format!("bind {src}:{sport}"))?;
            match s.send_to(b"conntrack-trace test\0", (dst, 53)) {
                Ok(_) => sent += 1,
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => refused += 1,
                Err(e) => return Err(e).context("send_to"),
            }
        }
        Ok((sent, refused))
    })?
}

fn ct_stats(ns: &Netns) -> Result<CtStats> {
    in_netns(&ns.path(), || -> Result<CtStats> {
        CtStats::parse(&fs::read_to_string(
            "/proc/thread-self/net/stat/nf_conntrack",
        )?)
    })?
}

/// What one container must be called.
struct Want {
    inode: u64,
    ip: String,
    netns_name: String,
    container: json::Container,
}

/// Floods from each client, traced (recording too), and checks that every
/// event names its container, live and in the capture's export.
fn flood_and_check(
    test: &str,
    clients: &[Client],
    wants: &[Want],
    env: &[(&str, &Path)],
) -> Result<()> {
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let cap = std::env::temp_dir().join(format!("ctt-{test}-{}.ctt", std::process::id()));
    let _ = fs::remove_file(&cap);
    let _cap_guard = RmFile(cap.clone());
    for (k, v) in env {
        // SAFETY: tests run with --test-threads=1 and no thread of ours
        // reads the environment meanwhile; the tracer inherits it.
        unsafe {
            std::env::set_var(
                k,
                format!(
                    "{}{}",
                    if *k == "DOCKER_HOST" { "unix://" } else { "" },
                    v.display()
                ),
            )
        };
    }
    let tracer = Tracer::start(&["--write", cap.to_str().unwrap_or_default()])?;
    let before: Vec<CtStats> = clients
        .iter()
        .map(|c| ct_stats(&c.ns))
        .collect::<Result<_>>()?;
    for (i, c) in clients.iter().enumerate() {
        let base = 30_000 + 1000 * i as u16;
        let dst = std::net::Ipv4Addr::new(10, 78, 40 + i as u8, 1);
        let (sent, refused) = udp_out(&c.ns, c.ip, dst, base..base + 300)?;
        eprintln!(
            "{test}: {}: {sent} sent, {refused} refused (dropped on the way out)",
            c.ns.name
        );
    }
    let drops: Vec<u64> = clients
        .iter()
        .zip(&before)
        .map(|(c, b)| Ok(ct_stats(&c.ns)?.since(b)?.drop))
        .collect::<Result<_>>()?;
    let out = tracer.stop()?;
    for (k, _) in env {
        // SAFETY: as above.
        unsafe { std::env::remove_var(k) };
    }
    let by_inode: BTreeMap<u64, &Want> = wants.iter().map(|w| (w.inode, w)).collect();
    let mut per: BTreeMap<u64, u64> = BTreeMap::new();
    for e in &out.events {
        let Some(w) = by_inode.get(&e.netns) else {
            // Other namespaces of this busy host are not ours to judge;
            // ours must each be named right.
            continue;
        };
        ensure!(
            e.netns_name.as_deref() == Some(w.netns_name.as_str()),
            "netns_name: {e:?}"
        );
        ensure!(
            e.container.as_ref() == Some(&w.container),
            "container: {e:?}"
        );
        ensure!(e.pod.is_none(), "no pod: {e:?}");
        ensure!(e.src.as_deref() == Some(w.ip.as_str()), "src: {e:?}");
        if e.kind == "table_full" {
            *per.entry(e.netns).or_default() += 1;
        }
    }
    eprintln!("{test}: table_full per container namespace {per:?}, kernel drop deltas {drops:?}");
    for (c, d) in clients.iter().zip(&drops) {
        ensure!(
            *d > 0,
            "{}: the container's table must have overflowed",
            c.ns.name
        );
        ensure!(
            per.get(&c.inode) == Some(d),
            "{}: events {:?} != kernel drop +{d}",
            c.ns.name,
            per.get(&c.inode)
        );
    }
    // The capture names them too (a report on another machine).
    let exported = run(
        binary().to_str().unwrap_or_default(),
        &[
            "export",
            cap.to_str().unwrap_or_default(),
            "--format",
            "ndjson",
        ],
    )?;
    let ex = json::Output::parse(&exported)?;
    let live: Vec<_> = out
        .events
        .iter()
        .filter(|e| by_inode.contains_key(&e.netns))
        .collect();
    let off: Vec<_> = ex
        .events
        .iter()
        .filter(|e| by_inode.contains_key(&e.netns))
        .collect();
    ensure!(live == off, "export names events as the live output did");
    for w in wants {
        let r = run(
            binary().to_str().unwrap_or_default(),
            &[
                "report",
                cap.to_str().unwrap_or_default(),
                "--format",
                "json",
                "--netns",
                &w.netns_name,
            ],
        )?;
        let v: serde_json::Value = json::report_value(&r)?;
        let n = v["summary"]["matched"]["table_full"]
            .as_u64()
            .context("report summary")?;
        ensure!(
            n == per[&w.inode],
            "report --netns {}: {n} table_full, live {}",
            w.netns_name,
            per[&w.inode]
        );
    }
    Ok(())
}

/// A socket that exists but cannot be read (here: mode 000, and the
/// tracer without CAP_DAC_OVERRIDE) is said in one note, and the container
/// is still named, by its id from the cgroup — never an empty name.
fn unreadable_socket_is_said(sock: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(sock)?.permissions().mode();
    fs::set_permissions(sock, fs::Permissions::from_mode(0o000))?;
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-dac_override,-dac_read_search"])
        .args(["--inh-caps", "-dac_override,-dac_read_search"])
        .arg(binary())
        .args(["trace", "--duration", "1s", "--format", "ndjson"])
        .env("DOCKER_HOST", format!("unix://{}", sock.display()))
        .output();
    fs::set_permissions(sock, fs::Permissions::from_mode(mode))?;
    let out = out.context("running the tracer under setpriv")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "tracer failed: {err}");
    let notes: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("exists but cannot be read"))
        .collect();
    ensure!(notes.len() == 1, "one note about the socket: {err}");
    ensure!(
        notes[0].contains("Permission denied") && notes[0].contains("named by id"),
        "{}",
        notes[0]
    );
    eprintln!("{}", notes[0]);
    Ok(())
}

#[test]
fn docker_containers_are_named() -> Result<()> {
    let test = "docker_containers_are_named";
    if runtime_skip(test, &["dockerd", "docker", "containerd"])? {
        return Ok(());
    }
    let Some(_lock) = kernel_test(test)? else {
        return Ok(());
    };
    let dir = Dir(PathBuf::from(format!(
        "/tmp/ctt-docker-{}",
        std::process::id()
    )));
    let d = Docker::start(&dir.0)?;
    let docker = |args: &[&str]| d.run(args);
    let sock = d.sock.clone();
    let mut rm = Containers(&d, Vec::new());
    let server = Netns::new("ctt-wld-srv")?;
    let mut clients = Vec::new();
    let mut wants = Vec::new();
    for (n, name) in ["ctt-wl-alpha", "ctt-wl-beta"].iter().enumerate() {
        let id = docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "ctt-busybox:test",
            "/bin/sleep",
            "600",
        ])?;
        rm.1.push(id.clone());
        let pid: u32 = docker(&["inspect", "-f", "{{.State.Pid}}", &id])?.parse()?;
        let c = wire(&server, pid, "d", n as u8)?;
        wants.push(Want {
            inode: c.inode,
            ip: c.ip.to_string(),
            netns_name: format!("docker:{name}"),
            container: json::Container {
                runtime: "docker".into(),
                id,
                name: Some((*name).into()),
                image: Some("ctt-busybox:test".into()),
                namespace: None,
                source: "api".into(),
            },
        });
        clients.push(c);
    }
    flood_and_check(test, &clients, &wants, &[("DOCKER_HOST", &sock)])?;
    unreadable_socket_is_said(&sock)?;
    drop(clients);
    drop(rm);
    Ok(())
}

#[test]
fn containerd_containers_are_named() -> Result<()> {
    let test = "containerd_containers_are_named";
    if runtime_skip(test, &["containerd", "ctr"])? {
        return Ok(());
    }
    let Some(_lock) = kernel_test(test)? else {
        return Ok(());
    };
    let dir = Dir(PathBuf::from(format!(
        "/tmp/ctt-containerd-{}",
        std::process::id()
    )));
    let _ = fs::remove_dir_all(&dir.0);
    fs::create_dir_all(&dir.0).with_context(|| format!("mkdir {}", dir.0.display()))?;
    let (_ctrd, sock) = containerd(&dir.0)?;
    let ctr = |args: &[&str]| -> Result<String> {
        let s = sock.display().to_string();
        let mut a = vec!["--address", s.as_str()];
        a.extend_from_slice(args);
        Ok(run("ctr", &a)?.trim().to_owned())
    };
    let root = rootfs(&dir.0)?;
    struct Rm<'a>(&'a dyn Fn(&[&str]) -> Result<String>, Vec<String>);
    impl Drop for Rm<'_> {
        fn drop(&mut self) {
            for id in &self.1 {
                let _ = (self.0)(&["tasks", "kill", "-s", "SIGKILL", id]);
                let deadline = Instant::now() + Duration::from_secs(10);
                while (self.0)(&["tasks", "delete", id]).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = (self.0)(&["containers", "delete", id]);
            }
        }
    }
    let mut rm = Rm(&ctr, Vec::new());
    let server = Netns::new("ctt-wlc-srv")?;
    let mut clients = Vec::new();
    let mut wants = Vec::new();
    for (n, id) in ["ctt-wl-gamma", "ctt-wl-delta"].iter().enumerate() {
        ctr(&[
            "run",
            "-d",
            "--rootfs",
            root.to_str().unwrap_or_default(),
            id,
            "/bin/sleep",
            "600",
        ])?;
        rm.1.push((*id).into());
        let tasks = ctr(&["tasks", "ls"])?;
        let pid: u32 = tasks
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next()? == *id).then(|| it.next()?.parse().ok())?
            })
            .with_context(|| format!("no task {id} in {tasks}"))?;
        let c = wire(&server, pid, "c", n as u8)?;
        wants.push(Want {
            inode: c.inode,
            ip: c.ip.to_string(),
            netns_name: format!("containerd:{id}"),
            container: json::Container {
                runtime: "containerd".into(),
                id: (*id).into(),
                name: None,
                image: None,
                namespace: Some("default".into()),
                source: "api".into(),
            },
        });
        clients.push(c);
    }
    flood_and_check(test, &clients, &wants, &[("CONTAINERD_ADDRESS", &sock)])?;
    drop(clients);
    drop(rm);
    Ok(())
}

/// The kernel's entry count in the namespace at `path`.
fn ct_count_at(path: &Path) -> Result<u64> {
    in_netns(path, || -> Result<u64> {
        Ok(
            fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")?
                .trim()
                .parse()?,
        )
    })?
}

/// Polls the agent (bounded) until `done` accepts its exposition.
fn wait_metrics(agent: &Agent, what: &str, done: impl Fn(&str) -> Result<bool>) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = agent.metrics()?;
        if done(&text)? {
            return Ok(text);
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not after 30 s; /metrics:\n{}",
            text.lines()
                .filter(|l| l.contains("pod_name"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `agent --metrics-label-pod` with real Docker. Containers started after
/// the agent get their namespaces' series labelled from the resolver: a
/// plain container by `container_name`; a pod by `pod_namespace` and
/// `pod_name` — the pod being a sandbox container with the labels
/// cri-dockerd gives a pod's sandbox (there is no kubelet here), named
/// through Docker's API as a cri-dockerd node's pods are. The pod's own
/// table overflows: its drops, per namespace and per source, carry the
/// pod's labels and equal the kernel's drop delta; its entries gauge
/// equals the kernel's count. A removed container's series go.
#[test]
fn agent_labels_series_with_pods_and_containers() -> Result<()> {
    let test = "agent_labels_series_with_pods_and_containers";
    if runtime_skip(test, &["dockerd", "docker", "containerd"])? {
        return Ok(());
    }
    let Some(_lock) = kernel_test(test)? else {
        return Ok(());
    };
    let dir = Dir(PathBuf::from(format!(
        "/tmp/ctt-docker-labels-{}",
        std::process::id()
    )));
    let d = Docker::start(&dir.0)?;
    let agent = Agent::start_with(
        &binary(),
        &["--metrics-label-pod", "--interval", "200ms"],
        &[("DOCKER_HOST", format!("unix://{}", d.sock.display()))],
    )?;
    let mut rm = Containers(&d, Vec::new());
    let uid = "5c0f5b8e-1c2d-4e3f-9a8b-7c6d5e4f3a2b";
    let sandbox = format!("k8s_POD_web-0_ctt-prod_{uid}_0");
    let uid_label = format!("io.kubernetes.pod.uid={uid}");
    let pod_id = d.run(&[
        "run",
        "-d",
        "--name",
        &sandbox,
        "--network",
        "none",
        "--label",
        &uid_label,
        "--label",
        "io.kubernetes.pod.name=web-0",
        "--label",
        "io.kubernetes.pod.namespace=ctt-prod",
        "--label",
        "io.kubernetes.docker.type=podsandbox",
        "--label",
        "io.kubernetes.container.name=POD",
        "ctt-busybox:test",
        "/bin/sleep",
        "600",
    ])?;
    rm.1.push(pod_id.clone());
    let web_id = d.run(&[
        "run",
        "-d",
        "--name",
        "ctt-wl-web",
        "--network",
        "none",
        "ctt-busybox:test",
        "/bin/sleep",
        "600",
    ])?;
    rm.1.push(web_id.clone());
    let pid_of =
        |id: &str| -> Result<u32> { Ok(d.run(&["inspect", "-f", "{{.State.Pid}}", id])?.parse()?) };
    let web_ns = PathBuf::from(format!("/proc/{}/ns/net", pid_of(&web_id)?));
    let server = Netns::new("ctt-wlp-srv")?;
    let pod = wire(&server, pid_of(&pod_id)?, "p", 0)?;

    const POD: &str =
        r#"netns="pod:ctt-prod/web-0",pod_namespace="ctt-prod",pod_name="web-0",container_name="""#;
    const WEB: &str =
        r#"netns="docker:ctt-wl-web",pod_namespace="",pod_name="",container_name="ctt-wl-web""#;
    let web_entries = format!("conntrack_trace_entries{{{WEB}}}");
    wait_metrics(&agent, "the container's labelled gauge", |t| {
        Ok(sample(t, &web_entries) == Some(ct_count_at(&web_ns)? as f64))
    })?;

    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", 64)?;
    let before = ct_stats(&pod.ns)?;
    let dst = std::net::Ipv4Addr::new(10, 78, 40, 1);
    let (sent, refused) = udp_out(&pod.ns, pod.ip, dst, 30_000..30_300)?;
    let dropped = ct_stats(&pod.ns)?.since(&before)?.drop;
    ensure!(
        dropped > 0,
        "the pod's table overflowed: {sent} sent, {refused} refused"
    );
    let drops = format!("conntrack_trace_drops_total{{kind=\"table_full\",{POD}}}");
    let source = format!(
        "conntrack_trace_source_drops_total{{kind=\"table_full\",{POD},src=\"{}\",proto=\"udp\",port=\"53\"}}",
        pod.ip
    );
    let entries = format!("conntrack_trace_entries{{{POD}}}");
    let text = wait_metrics(&agent, "the pod's labelled drops", |t| {
        Ok(sample(t, &drops) == Some(dropped as f64)
            && sample(t, &source) == Some(dropped as f64)
            && sample(t, &entries) == Some(pod.ns.ct_count()? as f64))
    })?;
    eprintln!(
        "{test}: kernel drop +{dropped} in the pod's namespace ({sent} sent, {refused} refused); {drops} {:?}; {source} {:?}; {entries} {:?}; {web_entries} {:?}",
        sample(&text, &drops),
        sample(&text, &source),
        sample(&text, &entries),
        sample(&text, &web_entries)
    );
    ensure!(
        text.lines().any(|l| l.starts_with(
            r#"conntrack_trace_entries{netns="init",pod_namespace="",pod_name="",container_name=""}"#
        )),
        "a namespace without a workload has empty labels"
    );
    // The plain container goes: its namespace's series go with it.
    d.run(&["rm", "-f", &web_id])?;
    rm.1.retain(|i| *i != web_id);
    wait_metrics(&agent, "the removed container's series gone", |t| {
        Ok(!t.contains(WEB))
    })?;
    json::state_lines(&agent.stop()?, true)?;
    drop(pod);
    drop(rm);
    Ok(())
}
