//! `cargo xtask test`: unit tests, then the root scenario tests one at a
//! time (they share the global nf_conntrack_max). Whatever happens, the
//! sysctls the scenarios lower are restored and leftover test namespaces
//! and runc containers removed afterwards — also when a test process was
//! killed mid-way.

use std::{fs, path::Path, process::Command};

use anyhow::Result;

use crate::{cmd, workspace_root};

const SYSCTLS: [&str; 2] = [
    "/proc/sys/net/netfilter/nf_conntrack_max",
    "/proc/sys/net/netfilter/nf_conntrack_buckets",
];

struct Restore(Vec<(String, String)>);

/// The flock the scenario tests hold while they lower sysctls or own a
/// `ctt-` namespace (tests/src/lib.rs `KernelLock`). Taking it around the
/// snapshot and the cleanup keeps a concurrent `xtask test` (another
/// checkout, another session) from recording a lowered value as "original"
/// or deleting a namespace that is in use.
fn kernel_lock() -> Option<fs::File> {
    use std::os::fd::AsRawFd as _;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/run/conntrack-trace-tests.lock")
        .ok()?;
    // SAFETY: flock on an owned fd.
    (unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0).then_some(f)
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _lock = kernel_lock();
        for (path, value) in &self.0 {
            if fs::read_to_string(path)
                .map(|v| v.trim() != value)
                .unwrap_or(false)
            {
                eprintln!("xtask test: restoring {path} to {value}");
                let _ = fs::write(path, value);
            }
        }
        // Containers of the runc test (tests/tests/oci.rs: "ctt-oci-").
        if let Ok(out) = Command::new("runc").args(["list", "--quiet"]).output() {
            for id in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("ctt-"))
            {
                eprintln!("xtask test: removing leftover container {id}");
                let _ = Command::new("runc")
                    .args(["delete", "--force", id])
                    .status();
            }
        }
        // Namespaces named by tests/src/lib.rs (PREFIX "ctt-").
        if let Ok(rd) = fs::read_dir("/run/netns") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("ctt-") {
                    eprintln!("xtask test: removing leftover netns {name}");
                    let _ = Command::new("ip").args(["netns", "del", &name]).status();
                }
            }
        }
    }
}

pub fn run() -> Result<()> {
    let lock = kernel_lock();
    let _restore = Restore(
        SYSCTLS
            .iter()
            .filter(|p| Path::new(p).exists())
            .filter_map(|p| Some((p.to_string(), fs::read_to_string(p).ok()?.trim().to_owned())))
            .collect(),
    );
    drop(lock);
    // The binary the scenario tests drive.
    cmd("cargo", &["build", "--package", "conntrack-trace"])?;
    let bin = workspace_root().join("target/debug/conntrack-trace");
    // SAFETY: single-threaded at this point; the variable is read by the
    // child cargo processes.
    unsafe { std::env::set_var("CONNTRACK_TRACE_BIN", &bin) };
    // The sustained-rate capture test measures the shipped (release) build.
    let release = crate::build_release()?;
    // SAFETY: as above.
    unsafe { std::env::set_var("CONNTRACK_TRACE_RELEASE_BIN", &release) };
    // The container image the runc test (tests/tests/oci.rs) runs.
    let layout = crate::image::run(&crate::image::Args::default())?;
    // SAFETY: as above.
    unsafe { std::env::set_var("CONNTRACK_TRACE_OCI_LAYOUT", &layout) };
    // The Debian package tests/tests/package.rs checks (the same musl
    // binary as the image: no second build).
    let deb = crate::package::run(&crate::package::Args::default())?;
    // SAFETY: as above.
    unsafe { std::env::set_var("CONNTRACK_TRACE_DEB", &deb) };
    cmd(
        "cargo",
        &[
            "test",
            "--package",
            "conntrack-trace",
            "--package",
            "conntrack-trace-common",
            "--package",
            "xtask",
        ],
    )?;
    cmd(
        "cargo",
        &[
            "test",
            "--package",
            "conntrack-trace-tests",
            "--",
            "--test-threads=1",
        ],
    )?;
    Ok(())
}
