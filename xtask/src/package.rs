//! `cargo xtask package`: a Debian package, built with `dpkg-deb` from a
//! staged tree (no cargo subcommand to install):
//! - `/usr/bin/conntrack-trace`: the static musl release binary (the one
//!   `cargo xtask image` ships);
//! - man pages, one per subcommand, and bash/zsh/fish completions, made by
//!   that binary itself (`conntrack-trace man DIR`, `completions SHELL`:
//!   `docgen.rs`, from clap's command tree);
//! - `conntrack-trace-agent.service` and its defaults file
//!   `/etc/default/conntrack-trace-agent` (a conffile), from
//!   `deploy/systemd/`;
//! - the copyright file, a changelog and the lintian override of
//!   `deploy/debian/`.
//!
//! Checked by tests/tests/package.rs (lintian, systemd-analyze, man, bash),
//! which `cargo xtask test` runs on the package it builds first.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use crate::workspace_root;

pub const NAME: &str = "conntrack-trace";
const MAINTAINER: &str = "conntrack-trace developers <conntrack-trace@example.invalid>";

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Where to write the .deb. Default: target/package/.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Builds the musl binary and the package; returns the .deb's path.
pub fn run(a: &Args) -> Result<PathBuf> {
    crate::setup::musl_target()?;
    let bin = crate::vm::build_musl_release()?;
    let version = env!("CARGO_PKG_VERSION");
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/package"));
    let root = workspace_root().join("target/package/root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    stage(&root, &bin, version)?;
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let deb = out.join(format!("{NAME}_{version}_amd64.deb"));
    crate::setup::quiet(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&root)
            .arg(&deb)
            .env("SOURCE_DATE_EPOCH", source_date_epoch().to_string()),
    )?;
    eprintln!(
        "xtask package: {} ({} bytes)",
        deb.display(),
        fs::metadata(&deb)?.len()
    );
    Ok(deb)
}

/// SOURCE_DATE_EPOCH, else the last commit's time, else 0: the changelog's
/// date and every file's mtime.
fn source_date_epoch() -> u64 {
    if let Some(v) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return v;
    }
    Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// gzip -9n: maximum compression, no name, no time (Debian policy 12.3).
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    gz.write_all(data).context("gzip")?;
    gz.finish().context("gzip")
}

/// Runs the packaged binary (its stdout captured).
fn run_bin(bin: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} {}: {}",
        bin.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

fn stage(root: &Path, bin: &Path, version: &str) -> Result<()> {
    let deploy = workspace_root().join("deploy");
    let read = |p: PathBuf| fs::read(&p).with_context(|| format!("reading {}", p.display()));
    let binary = read(bin.to_owned())?;
    let target = root.join("usr/bin/conntrack-trace");
    write(&target, &binary, 0o755)?;
    // Symbols stripped (Debian policy 10.1); the image keeps its own copy.
    crate::setup::quiet(
        Command::new("strip")
            .args(["--strip-unneeded", "--remove-section=.comment"])
            .arg(&target),
    )?;
    // Man pages: generated into a scratch directory, shipped compressed.
    let scratch = root.with_file_name("man");
    let _ = fs::remove_dir_all(&scratch);
    run_bin(bin, &["man", &scratch.to_string_lossy()])?;
    let mut pages = 0;
    for e in fs::read_dir(&scratch)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let data = gzip(&fs::read(e.path())?)?;
        write(
            &root.join(format!("usr/share/man/man1/{name}.gz")),
            &data,
            0o644,
        )?;
        pages += 1;
    }
    let _ = fs::remove_dir_all(&scratch);
    ensure!(pages > 1, "`conntrack-trace man` wrote {pages} pages");
    for (shell, path) in [
        (
            "bash",
            "usr/share/bash-completion/completions/conntrack-trace",
        ),
        ("zsh", "usr/share/zsh/vendor-completions/_conntrack-trace"),
        (
            "fish",
            "usr/share/fish/vendor_completions.d/conntrack-trace.fish",
        ),
    ] {
        write(
            &root.join(path),
            &run_bin(bin, &["completions", shell])?,
            0o644,
        )?;
    }
    write(
        &root.join("lib/systemd/system/conntrack-trace-agent.service"),
        &read(deploy.join("systemd/conntrack-trace-agent.service"))?,
        0o644,
    )?;
    write(
        &root.join("etc/default/conntrack-trace-agent"),
        &read(deploy.join("systemd/conntrack-trace-agent.default"))?,
        0o644,
    )?;
    let doc = root.join("usr/share/doc/conntrack-trace");
    write(
        &doc.join("copyright"),
        &read(deploy.join("debian/copyright"))?,
        0o644,
    )?;
    write(
        &doc.join("changelog.gz"),
        &gzip(changelog(version)?.as_bytes())?,
        0o644,
    )?;
    write(
        &root.join("usr/share/lintian/overrides/conntrack-trace"),
        &read(deploy.join("debian/lintian-overrides"))?,
        0o644,
    )?;
    let control = root.join("DEBIAN");
    write(
        &control.join("conffiles"),
        b"/etc/default/conntrack-trace-agent\n",
        0o644,
    )?;
    write(
        &control.join("control"),
        control_file(version, installed_size_kib(root)?).as_bytes(),
        0o644,
    )?;
    write(&control.join("md5sums"), md5sums(root)?.as_bytes(), 0o644)?;
    set_dir_modes(root)
}

fn control_file(version: &str, size_kib: u64) -> String {
    format!(
        "Package: {NAME}
Version: {version}
Architecture: amd64
Maintainer: {MAINTAINER}
Installed-Size: {size_kib}
Section: net
Priority: optional
Description: who netfilter conntrack drops, and why
 conntrack-trace attaches eBPF programs to conntrack's failure points and
 names the source of every dropped packet (table full, early drop, insert
 failed), with exact in-kernel counters checked against the kernel's own
 statistics. It flags clients whose retries keep the table full
 (retransmission amplification), forecasts when the table fills, records
 captures for postmortems, diagnoses the table with ranked advice
 (doctor), and runs as a Prometheus agent (conntrack-trace-agent.service).
"
    )
}

fn changelog(version: &str) -> Result<String> {
    let epoch = source_date_epoch();
    let out = Command::new("date")
        .args(["-u", "-R", "-d", &format!("@{epoch}")])
        .output()
        .context("running date")?;
    let date = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(format!(
        "{NAME} ({version}) unstable; urgency=medium\n\n  * Built by `cargo xtask package`.\n\n -- {MAINTAINER}  {date}\n"
    ))
}

/// Every regular file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                v.push(rel.to_owned());
            }
        }
    }
    v.sort();
    Ok(v)
}

fn installed_size_kib(root: &Path) -> Result<u64> {
    let mut bytes = 0;
    for f in files(root)? {
        if !f.starts_with("DEBIAN") {
            bytes += fs::metadata(root.join(&f))?.len().div_ceil(1024) * 1024;
        }
    }
    Ok(bytes / 1024)
}

/// DEBIAN/md5sums, by md5sum itself (coreutils).
fn md5sums(root: &Path) -> Result<String> {
    let list: Vec<PathBuf> = files(root)?
        .into_iter()
        .filter(|f| !f.starts_with("DEBIAN"))
        .collect();
    let out = Command::new("md5sum")
        .args(&list)
        .current_dir(root)
        .output()
        .context("running md5sum")?;
    ensure!(out.status.success(), "md5sum failed");
    Ok(String::from_utf8(out.stdout)?)
}

/// Directories 0755 whatever the umask.
fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            set_dir_modes(&p)?;
        }
    }
    Ok(())
}
