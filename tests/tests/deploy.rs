//! The deployment files as their users run them: Prometheus's own tool
//! checks and unit-tests the alerting rules, the Kubernetes manifests
//! (daemonset.yaml, daemonset-autopilot.yaml) pass the Kubernetes schemas
//! offline (kubernetes-validate --strict), and the
//! agent runs with exactly the manifest's capabilities — and with one of
//! them less fails naming it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{
    backend_args, binary, http_metrics, json, kernel_test,
    manifest::{self, DaemonSet},
};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// promtool, kubernetes-validate and setpriv's container-like runs are
/// host tools: not in the VM image.
fn host_only(test: &str, tool: &str) -> bool {
    if std::env::var_os("CONNTRACK_TRACE_VM").is_some() {
        eprintln!("SKIPPED {test}: {tool} is not in the VM image (it runs on the host)");
        return false;
    }
    true
}

fn run(cmd: &str, args: &[&str], dir: &Path) -> Result<(bool, String)> {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {cmd} (installed by `cargo xtask setup`)"))?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[test]
fn alerting_rules_check_and_unit_tests() -> Result<()> {
    if !host_only("alerting_rules_check_and_unit_tests", "promtool") {
        return Ok(());
    }
    let dir = deploy().join("prometheus");
    let (ok, out) = run(
        "promtool",
        &["check", "rules", "conntrack-trace.rules.yml"],
        &dir,
    )?;
    ensure!(ok, "promtool check rules: {out}");
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
    let (ok, out) = run(
        "promtool",
        &["test", "rules", "conntrack-trace.test.yml"],
        &dir,
    )?;
    ensure!(ok, "promtool test rules: {out}");
    // Every alert is exercised by the unit tests.
    let rules = fs::read_to_string(dir.join("conntrack-trace.rules.yml"))?;
    let tests = fs::read_to_string(dir.join("conntrack-trace.test.yml"))?;
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} untested"
        );
    }
    Ok(())
}

#[test]
fn daemonset_passes_the_kubernetes_schemas() -> Result<()> {
    if !host_only(
        "daemonset_passes_the_kubernetes_schemas",
        "kubernetes-validate",
    ) {
        return Ok(());
    }
    let dir = deploy().join("kubernetes");
    for file in [manifest::DAEMONSET, manifest::AUTOPILOT] {
        let (ok, out) = run("kubernetes-validate", &["--strict", file], &dir)?;
        ensure!(ok, "kubernetes-validate {file}: {out}");
        assert!(
            out.contains("passed for resource daemonset/conntrack-trace"),
            "{file}: {out}"
        );
        // The check is not vacuous: a misspelt field fails it.
        let text = fs::read_to_string(dir.join(file))?;
        let bad = std::env::temp_dir().join(format!("ctt-bad-ds-{}.yaml", std::process::id()));
        fs::write(
            &bad,
            text.replace("readOnlyRootFilesystem", "readOnlyRootFileSystem"),
        )?;
        let (ok, out) = run(
            "kubernetes-validate",
            &["--strict", &bad.to_string_lossy()],
            &dir,
        )?;
        let _ = fs::remove_file(&bad);
        assert!(!ok, "{file}: a misspelt field must fail: {out}");
        // Least privilege, as the manifest says.
        for must in [
            "drop: [\"ALL\"]",
            "allowPrivilegeEscalation: false",
            "privileged: false",
            "readOnlyRootFilesystem: true",
            "hostPID: false",
            "prometheus.io/scrape: \"true\"",
            "path: /healthz",
            "path: /readyz",
        ] {
            assert!(text.contains(must), "{file} lacks `{must}`");
        }
    }
    Ok(())
}

/// Runs the agent as root with only `caps` in its bounding set (what a
/// container granted them gets), until ready or exit; returns (ready,
/// stderr, metrics).
fn agent_with(caps: &[String]) -> Result<(bool, String, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let ready = std::env::temp_dir().join(format!("ctt-caps-ready-{}-{port}", std::process::id()));
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let err = std::env::temp_dir().join(format!("ctt-caps-err-{}-{port}", std::process::id()));
    let mut child = Command::new("setpriv")
        .arg(format!("--bounding-set={bounding}"))
        .arg("--no-new-privs")
        .arg(binary())
        .args([
            "agent",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--ready-file",
        ])
        .arg(&ready)
        .args(backend_args())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err)?)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut metrics = String::new();
    let ok = loop {
        if ready.exists() {
            metrics = http_metrics(port).unwrap_or_default();
            break true;
        }
        if child.try_wait()?.is_some() {
            break false;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = fs::remove_file(&ready);
    let text = fs::read_to_string(&err).unwrap_or_default();
    let _ = fs::remove_file(&err);
    // Its state lines, through the typed view (the agent exited).
    json::state_lines(&text, true)?;
    Ok((ok, text, metrics))
}

#[test]
fn manifest_capabilities_suffice_and_each_is_needed() -> Result<()> {
    if !host_only(
        "manifest_capabilities_suffice_and_each_is_needed",
        "setpriv",
    ) {
        return Ok(());
    }
    let Some(_lock) = kernel_test("manifest_capabilities_suffice_and_each_is_needed")? else {
        return Ok(());
    };
    let caps = DaemonSet::load()?.caps()?;
    assert_eq!(caps, ["BPF", "PERFMON", "SYSLOG"]);
    let (ok, err, metrics) = agent_with(&caps)?;
    eprintln!(
        "with {caps:?}: ready {ok}; {}",
        err.lines().take(3).collect::<Vec<_>>().join(" | ")
    );
    assert!(ok, "the agent runs with the manifest's capabilities: {err}");
    assert!(metrics.contains("conntrack_trace_info{"), "{metrics}");
    assert!(
        err.contains("\"kept\":[\"CAP_BPF\"]"),
        "drops all but CAP_BPF: {err}"
    );
    let tracepoint = err.contains("backend tracepoint");
    if tracepoint {
        assert!(
            err.contains("tp_btf/kmem_cache_free"),
            "SYSLOG gives the eviction hook: {err}"
        );
    }
    for missing in ["BPF", "PERFMON"] {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let (ok, err, _) = agent_with(&fewer)?;
        eprintln!("without {missing}: {}", err.trim());
        assert!(!ok, "must fail without CAP_{missing}");
        assert!(
            err.contains(&format!("missing CAP_{missing}")),
            "names CAP_{missing}: {err}"
        );
    }
    // Without SYSLOG the tracepoint backend cannot read kallsyms: it runs,
    // and says what it lost (fexit does not need it).
    let fewer: Vec<String> = caps.iter().filter(|c| *c != "SYSLOG").cloned().collect();
    let (ok, err, _) = agent_with(&fewer)?;
    eprintln!(
        "without SYSLOG: ready {ok}; {}",
        err.lines().next().unwrap_or("")
    );
    assert!(ok, "{err}");
    if tracepoint {
        assert!(!err.contains("tp_btf/kmem_cache_free"), "{err}");
    }
    Ok(())
}
