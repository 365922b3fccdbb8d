//! The Debian package (`cargo xtask package`, built by `cargo xtask test`
//! before the tests and named by CONNTRACK_TRACE_DEB), checked with the
//! tools its users' systems use: lintian judges it, systemd-analyze
//! verifies its unit, and its contents, extracted with `dpkg -x` into a
//! temporary root, run: the binary prints its version, every man page
//! renders with `man -l` without a warning, the bash completion loads.
//! No root needed.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{Scratch, manifest::DaemonSet, path_str};

/// The .deb, or None (with the reason printed) when it was not built.
fn deb(test: &str) -> Option<PathBuf> {
    let p = std::env::var_os("CONNTRACK_TRACE_DEB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
                "../target/package/conntrack-trace_{}_amd64.deb",
                env!("CARGO_PKG_VERSION")
            ))
        });
    if p.exists() {
        return Some(p);
    }
    // `cargo xtask test` always builds it: there, a missing package fails.
    assert!(
        std::env::var_os("CONNTRACK_TRACE_DEB").is_none(),
        "{test}: CONNTRACK_TRACE_DEB={} does not exist",
        p.display()
    );
    eprintln!(
        "SKIPPED {test}: no package at {} (run `cargo xtask package`)",
        p.display()
    );
    None
}

/// Runs `cmd`; returns (success, stdout, stderr).
fn run(cmd: &mut Command) -> Result<(bool, String, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The package's contents, extracted into a scratch root.
fn extracted(deb: &Path, tag: &str) -> Result<Scratch> {
    let root = Scratch::new("package", tag)?;
    let (ok, _, err) = run(Command::new("dpkg").arg("-x").arg(deb).arg(&root.0))?;
    ensure!(ok, "dpkg -x: {err}");
    Ok(root)
}

const UNIT: &str = "lib/systemd/system/conntrack-trace-agent.service";

#[test]
fn lintian_reports_no_errors() -> Result<()> {
    let Some(deb) = deb("lintian_reports_no_errors") else {
        return Ok(());
    };
    let (ok, out, err) = run(Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(&deb))?;
    eprintln!("lintian:\n{out}{err}");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("E: ")).collect();
    ensure!(
        ok && errors.is_empty(),
        "lintian errors: {errors:#?}\n{err}"
    );
    Ok(())
}

#[test]
fn systemd_analyze_verifies_the_unit() -> Result<()> {
    let Some(deb) = deb("systemd_analyze_verifies_the_unit") else {
        return Ok(());
    };
    let root = extracted(&deb, "unit")?;
    // --root: ExecStart's binary and the EnvironmentFile are the package's;
    // MANPATH: Documentation=man:conntrack-trace-agent(1) is its page. The
    // units it is ordered against (sysinit.target, ...) are the host's,
    // copied in as a system would have them.
    let units = root.path("usr/lib/systemd");
    std::fs::create_dir_all(&units)?;
    let (ok, _, err) = run(Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(&units))?;
    ensure!(ok, "copying the host's units: {err}");
    let (ok, out, err) = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.0.display()))
        .arg(root.path(UNIT))
        .env("MANPATH", root.path("usr/share/man"))
        .env("SYSTEMD_LOG_LEVEL", "warning"))?;
    eprintln!("systemd-analyze verify: ok {ok}\n{out}{err}");
    ensure!(ok, "systemd-analyze verify failed:\n{out}{err}");
    // Unknown or misspelt settings are warnings with a zero exit: none
    // may name the unit.
    let complaints: Vec<&str> = err
        .lines()
        .chain(out.lines())
        .filter(|l| l.contains("conntrack-trace"))
        .collect();
    ensure!(complaints.is_empty(), "{complaints:#?}");
    Ok(())
}

/// The unit grants exactly the DaemonSet's capabilities (the set
/// tests/tests/oci.rs shows sufficient and minimal for the agent), and
/// runs the agent with the defaults file's flags.
#[test]
fn unit_grants_the_daemonsets_capabilities() -> Result<()> {
    let Some(deb) = deb("unit_grants_the_daemonsets_capabilities") else {
        return Ok(());
    };
    let root = extracted(&deb, "caps")?;
    let unit = std::fs::read_to_string(root.path(UNIT))?;
    let setting = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .flat_map(|v| v.split_whitespace().map(str::to_owned))
            .collect()
    };
    let mut want: Vec<String> = DaemonSet::load()?
        .caps()?
        .into_iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    want.sort();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let mut got = setting(key);
        got.sort();
        ensure!(got == want, "{key}: {got:?}, the DaemonSet adds {want:?}");
    }
    ensure!(setting("ProtectSystem") == ["strict"]);
    ensure!(setting("StateDirectory") == ["conntrack-trace"]);
    ensure!(setting("EnvironmentFile") == ["-/etc/default/conntrack-trace-agent"]);
    let defaults = std::fs::read_to_string(root.path("etc/default/conntrack-trace-agent"))?;
    ensure!(
        defaults.contains("--record-dir=/var/lib/conntrack-trace"),
        "the flight recorder writes the state directory: {defaults}"
    );
    // An edited defaults file survives upgrades.
    let control = root.path("DEBIAN");
    let (ok, _, err) = run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control))?;
    ensure!(ok, "dpkg-deb -e: {err}");
    let conffiles = std::fs::read_to_string(control.join("conffiles"))?;
    ensure!(
        conffiles == "/etc/default/conntrack-trace-agent\n",
        "{conffiles:?}"
    );
    Ok(())
}

#[test]
fn extracted_binary_runs() -> Result<()> {
    let Some(deb) = deb("extracted_binary_runs") else {
        return Ok(());
    };
    let root = extracted(&deb, "bin")?;
    let (ok, out, err) = run(Command::new(root.path("usr/bin/conntrack-trace")).arg("--version"))?;
    ensure!(ok, "--version: {err}");
    ensure!(
        out.trim() == format!("conntrack-trace {}", env!("CARGO_PKG_VERSION")),
        "{out:?}"
    );
    Ok(())
}

/// One page for the tool and one per subcommand (from clap's tree), each
/// rendered by man-db with groff's warnings on: non-empty, no warning.
#[test]
fn every_man_page_renders() -> Result<()> {
    let Some(deb) = deb("every_man_page_renders") else {
        return Ok(());
    };
    let root = extracted(&deb, "man")?;
    let cmd = conntrack_trace::docgen::command();
    let mut names = vec!["conntrack-trace".to_owned()];
    names.extend(
        conntrack_trace::docgen::subcommands(&cmd)
            .map(|s| format!("conntrack-trace-{}", s.get_name())),
    );
    let dir = root.path("usr/share/man/man1");
    let mut shipped: Vec<String> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    shipped.sort();
    let mut want: Vec<String> = names.iter().map(|n| format!("{n}.1.gz")).collect();
    want.sort();
    ensure!(shipped == want, "pages {shipped:?}, want {want:?}");
    for name in &names {
        let page = dir.join(format!("{name}.1.gz"));
        let rendered = root.path(&format!("{name}.txt"));
        let (ok, out, err) = run(Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .env("LC_ALL", "C.UTF-8"))?;
        std::fs::write(&rendered, &out)?;
        ensure!(ok, "man -l {}: {err}", page.display());
        ensure!(
            err.trim().is_empty(),
            "man -l {}: warnings:\n{err}",
            page.display()
        );
        ensure!(
            out.contains("NAME") && out.contains(name.as_str()),
            "{} rendered without its NAME section ({} bytes in {})",
            page.display(),
            out.len(),
            path_str(&rendered)
        );
    }
    Ok(())
}

/// bash loads its completion and registers it for the command; zsh's and
/// fish's scripts are checked by their shells where installed.
#[test]
fn completions_load() -> Result<()> {
    let Some(deb) = deb("completions_load") else {
        return Ok(());
    };
    let root = extracted(&deb, "compl")?;
    let bash = root.path("usr/share/bash-completion/completions/conntrack-trace");
    let (ok, out, err) = run(Command::new("bash").args([
        "--norc",
        "-c",
        &format!("source {} && complete -p conntrack-trace", path_str(&bash)),
    ]))?;
    ensure!(ok && err.is_empty(), "bash: {err}");
    ensure!(
        out.trim().ends_with(" conntrack-trace") && out.starts_with("complete "),
        "{out:?}"
    );
    let zsh = root.path("usr/share/zsh/vendor-completions/_conntrack-trace");
    let fish = root.path("usr/share/fish/vendor_completions.d/conntrack-trace.fish");
    ensure!(std::fs::read_to_string(&zsh)?.starts_with("#compdef conntrack-trace"));
    ensure!(std::fs::read_to_string(&fish)?.contains("complete -c conntrack-trace"));
    for (shell, file) in [("zsh", &zsh), ("fish", &fish)] {
        match run(Command::new(shell).arg("-n").arg(file)) {
            Ok((ok, _, err)) => ensure!(ok, "{shell} -n: {err}"),
            Err(_) => eprintln!("{shell} not installed: its completion's syntax is not checked"),
        }
    }
    Ok(())
}
