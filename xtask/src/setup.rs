//! Installs, idempotently, what building and testing need on a fresh
//! machine of our kind (stable default, nightly present):
//! - `rust-src` for the nightly toolchain (the eBPF crate uses build-std);
//! - `bpf-linker`, built against the nightly's own libLLVM (see
//!   DEVELOPERS.md: LLVM_PREFIX pointing at a directory whose lib/ links
//!   libLLVM.so to the toolchain's versioned libLLVM);
//! - Debian packages the tests use (iproute2, nftables, util-linux, tshark).

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

pub fn run() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    if output("rustup", &["run", "nightly", "rustc", "--version"]).is_none() {
        eprintln!("xtask setup: installing the nightly toolchain");
        crate::cmd(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask setup: adding rust-src to nightly");
        crate::cmd(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    Ok(())
}

/// The nightly's libLLVM file name, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn nightly_llvm() -> Result<(std::path::PathBuf, String, String)> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])
        .context("rustc +nightly --print sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let mut found = None;
    for e in std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") {
            found = Some(name);
        }
    }
    let name = found.with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" -> major "22"
    let major = name
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok((lib, name, major))
}

fn bpf_linker() -> Result<()> {
    let (lib, name, major) = nightly_llvm()?;
    // Keep an installed linker only if it loads exactly this libLLVM (a
    // nightly update changes the name and needs a rebuild).
    if let Some(path) = output("sh", &["-c", "command -v bpf-linker"]) {
        let deps = output("ldd", &[path.trim()]).unwrap_or_default();
        if deps
            .lines()
            .any(|l| l.contains(&name) && !l.contains("not found"))
            && output("bpf-linker", &["--version"]).is_some()
        {
            return Ok(());
        }
    }
    eprintln!("xtask setup: building bpf-linker against {name} (a few minutes, once)");
    let prefix = home().join(".cache/conntrack-trace/llvm");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for link in ["libLLVM.so".to_owned(), name.clone()] {
        let dst = plib.join(&link);
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(lib.join(&name), &dst)
            .with_context(|| format!("linking {}", dst.display()))?;
    }
    let status = Command::new("cargo")
        .args([
            "install",
            "--force",
            "bpf-linker",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status})");
    }
    Ok(())
}

fn home() -> std::path::PathBuf {
    std::env::var_os("HOME")
        .map(Into::into)
        .unwrap_or_else(|| "/root".into())
}

fn debian_packages() -> Result<()> {
    let wanted = [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("setpriv", "util-linux"),
        // The capture tests decode exported pcapng (tshark, capinfos).
        ("tshark", "tshark"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing packages {missing:?} and not root to install them (apt-get install {})",
            missing.join(" ")
        );
    }
    eprintln!("xtask setup: apt-get install {}", missing.join(" "));
    // tshark's package asks a debconf question (setuid dumpcap); take
    // the default instead of waiting on a terminal.
    // SAFETY: xtask is single-threaded here.
    unsafe { std::env::set_var("DEBIAN_FRONTEND", "noninteractive") };
    crate::cmd("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter());
    crate::cmd("apt-get", &args)
}
