//! Installs, idempotently, what each task needs on a fresh machine of our
//! kind (stable default, nightly present) — and only that:
//! - [`build`] (`build`, `run`, `image`, `package`, and every task that
//!   builds): `rust-src` for the nightly toolchain (the eBPF crate uses
//!   build-std) and `bpf-linker`, built against the nightly's own libLLVM
//!   (LLVM_PREFIX pointing at a directory whose lib/ links libLLVM.so to
//!   the toolchain's versioned libLLVM). Running the tool needs nothing
//!   else: it talks to the kernel itself (bpf(2), netlink, /proc);
//! - [`demo`]: the incident's parts (iproute2, nftables, dnsmasq-base,
//!   bind9-dnsutils);
//! - [`test`]: Debian packages the tests use (iproute2, nftables,
//!   util-linux, tshark, dnsmasq-base, bind9-dnsutils, iptables,
//!   docker.io, containerd, busybox-static, strace, prometheus,
//!   prometheus-alertmanager,
//!   runc, python3-pip, and for the package checks lintian,
//!   man-db and systemd) and PyPI's kubernetes-validate;
//! - [`bench`]: bpftool, bpftrace, conntrack and the scenario tools;
//! - for `fuzz` only ([`fuzz`]): cargo-fuzz (it runs on the nightly);
//! - for `vm-test` only ([`vm`]): qemu 10 from backports, busybox-static,
//!   the decompressors, and the musl target for static guest binaries;
//! - for `image` and `package` (and `test`, which builds both): the musl
//!   target and musl-tools (musl-gcc, for ring's C) ([`musl_target`]).
//!
//! Everything an installer prints goes to stderr ([`quiet_cmd`]): stdout is
//! the tool's (`cargo xtask run -- trace --format ndjson | jq` works on a
//! first run too).

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

/// [`crate::cmd`] with the child's stdout sent to our stderr.
pub fn quiet_cmd(program: &str, args: &[&str]) -> Result<()> {
    quiet(Command::new(program).args(args))
}

/// Runs `c` in the workspace root with its stdout on our stderr.
pub fn quiet(c: &mut Command) -> Result<()> {
    let line = format!("{c:?}");
    let status = c
        .current_dir(crate::workspace_root())
        .stdout(crate::stderr_as_stdout())
        .status()
        .with_context(|| format!("running {line}"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// What building needs (every task builds).
pub fn build() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()
}

/// What `cargo xtask demo` needs: building, and the incident's parts.
pub fn demo() -> Result<()> {
    build()?;
    debian_packages(DEMO)
}

/// What `cargo xtask test` needs (and `xtask setup` installs).
pub fn test() -> Result<()> {
    build()?;
    debian_packages(TEST)?;
    python_tools()
}

/// What `cargo xtask bench` needs.
pub fn bench() -> Result<()> {
    build()?;
    debian_packages(BENCH)
}

/// (program looked for, Debian package providing it).
type Wanted = [(&'static str, &'static str)];

/// The founding incident: namespaces, a ruleset that turns conntrack on,
/// a real DNS server and a resolver client that retries.
const DEMO: &Wanted = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
];

const TEST: &Wanted = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("setpriv", "util-linux"),
    // Real DNS server and client for the amplification tests.
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    // The capture tests decode exported pcapng (tshark, capinfos).
    ("tshark", "tshark"),
    // Legacy iptables rulesets in the rule-drop scenarios.
    ("iptables-legacy", "iptables"),
    // Real container runtimes for the workload-naming tests (their
    // daemons are started by the tests, on private sockets), and the
    // static busybox their image is made of.
    ("dockerd", "docker.io"),
    ("containerd", "containerd"),
    ("busybox", "busybox-static"),
    // The tracer's own system calls: when the start snapshot is taken.
    ("strace", "strace"),
    // The agent's tests: a real Prometheus scrapes it; promtool checks
    // and unit-tests deploy/prometheus/ (both in Debian's package).
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // tests/tests/alerting.rs: Prometheus sends the shipped rules' alerts
    // to a real Alertmanager, whose webhook is the agent's.
    ("prometheus-alertmanager", "prometheus-alertmanager"),
    // The OCI runtime the container tests run the image under.
    ("runc", "runc"),
    // pip, for kubernetes-validate (below).
    ("pip3", "python3-pip"),
    // The Debian package's checks (tests/tests/package.rs): dpkg-deb
    // builds it, lintian judges it, man renders its pages,
    // systemd-analyze verifies its unit.
    ("dpkg-deb", "dpkg"),
    ("lintian", "lintian"),
    ("man", "man-db"),
    ("systemd-analyze", "systemd"),
];

const BENCH: &Wanted = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    // bench: each program's run_time_ns / run_cnt (bpf_stats).
    ("bpftool", "bpftool"),
    // bench newflow: the bpftrace one-liner the tracer is compared with.
    ("bpftrace", "bpftrace"),
    // bench newflow: empties the server's table between measurements.
    ("conntrack", "conntrack"),
];

/// kubernetes-validate (PyPI; its Kubernetes schemas ship inside it, so
/// the manifest check needs no network): deploy/kubernetes/ is validated
/// by tests/tests/deploy.rs.
fn python_tools() -> Result<()> {
    if have("kubernetes-validate") {
        return Ok(());
    }
    eprintln!("xtask setup: pip3 install kubernetes-validate");
    let base = ["install", "--quiet", "kubernetes-validate"];
    if quiet_cmd("pip3", &base).is_ok() {
        return Ok(());
    }
    // Debian's own python refuses pip outside a venv (PEP 668).
    quiet_cmd(
        "pip3",
        &[
            "install",
            "--quiet",
            "--break-system-packages",
            "kubernetes-validate",
        ],
    )
}

fn nightly_rust_src() -> Result<()> {
    if output("rustup", &["run", "nightly", "rustc", "--version"]).is_none() {
        eprintln!("xtask setup: installing the nightly toolchain");
        quiet_cmd(
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
        quiet_cmd(
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
    let prefix = crate::home().join(".cache/conntrack-trace/llvm");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for link in ["libLLVM.so".to_owned(), name.clone()] {
        let dst = plib.join(&link);
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(lib.join(&name), &dst)
            .with_context(|| format!("linking {}", dst.display()))?;
    }
    quiet(
        Command::new("cargo")
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

fn debian_packages(wanted: &Wanted) -> Result<()> {
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
    quiet_cmd("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing.iter());
    quiet_cmd("apt-get", &args)
}

/// What `cargo xtask fuzz` needs: cargo-fuzz (run as `cargo +nightly fuzz`;
/// the nightly itself comes from [`run`]).
pub fn fuzz() -> Result<()> {
    if output("cargo", &["+nightly", "fuzz", "--version"]).is_some() {
        return Ok(());
    }
    eprintln!("xtask setup: installing cargo-fuzz (a few minutes, once)");
    quiet_cmd("cargo", &["install", "--locked", "cargo-fuzz"])
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The host's Debian codename (VERSION_CODENAME in /etc/os-release).
fn codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .context("no VERSION_CODENAME in /etc/os-release")
}

/// qemu-system-x86_64's major version, if installed.
fn qemu_major() -> Option<u32> {
    // "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2...)"
    output("qemu-system-x86_64", &["--version"])?
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The musl target: the VM guests' and the container image's static binary.
pub fn musl_target() -> Result<()> {
    let installed = output("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == crate::vm::MUSL) {
        eprintln!("xtask setup: adding the {} target", crate::vm::MUSL);
        quiet_cmd("rustup", &["target", "add", crate::vm::MUSL])?;
    }
    // ring (the agent's TLS, rustls's crypto provider) compiles C and
    // assembly: for the musl target cc-rs needs musl-gcc.
    debian_packages(MUSL_C)
}

const MUSL_C: &Wanted = &[("musl-gcc", "musl-tools")];

/// qemu 7.2 (bookworm) crashed 6.12 guests in a spike; qemu 10 ran 100 of
/// 100 boots clean.
const QEMU_MIN: u32 = 10;

/// What `cargo xtask vm-test` needs on the host, installed if missing.
/// Debian packages come through a private apt configuration that adds
/// `<codename>-backports` (for qemu) without touching /etc/apt.
pub fn vm() -> Result<()> {
    musl_target()?;
    let mut missing = Vec::new();
    if qemu_major().is_none_or(|v| v < QEMU_MIN) {
        missing.push("qemu-system-x86");
    }
    let static_busybox = std::path::Path::new("/bin/busybox").exists()
        && !Command::new("ldd")
            .arg("/bin/busybox")
            .output()
            .is_ok_and(|o| o.status.success());
    if !static_busybox {
        missing.push("busybox-static");
    }
    for (bin, pkg) in [("xz", "xz-utils"), ("zstd", "zstd"), ("strip", "binutils")] {
        if !have(bin) {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("vm-test needs {missing:?} and this is not root to install them");
    }
    let code = codename()?;
    let backports = format!("{code}-backports");
    let m = crate::vm::Mirrors::from_host()?;
    let apt = crate::vm::Apt::new(
        &crate::vm::cache_dir().join("apt/host"),
        &[
            (m.archive.as_str(), code.as_str()),
            (m.archive.as_str(), &format!("{code}-updates")),
            (m.security.as_str(), &format!("{code}-security")),
            (m.archive.as_str(), backports.as_str()),
        ],
    )?;
    eprintln!(
        "xtask setup: apt-get install {} (qemu from {backports})",
        missing.join(" ")
    );
    apt.update()?;
    apt.install_host(&backports, &missing)?;
    if qemu_major().is_none_or(|v| v < QEMU_MIN) {
        bail!("qemu-system-x86_64 {QEMU_MIN} or newer still missing after the install");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    /// Issue 22: apt's output went to stdout on a first run, into the
    /// trace's ndjson. An installer's stdout is our stderr: the same open
    /// file, by device and inode.
    #[test]
    fn installers_write_to_our_stderr() {
        let out = std::env::temp_dir().join(format!("xtask-setup-fd1-{}", std::process::id()));
        let status = super::Command::new("sh")
            .args([
                "-c",
                "x=$(stat -L -c %d:%i /proc/$$/fd/1); echo \"$x\" > \"$0\"",
            ])
            .arg(&out)
            .stdout(crate::stderr_as_stdout())
            .status()
            .unwrap();
        assert!(status.success());
        let child = std::fs::read_to_string(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        let ours = std::fs::metadata("/proc/self/fd/2").unwrap();
        assert_eq!(child.trim(), format!("{}:{}", ours.dev(), ours.ino()));
    }
}
