//! Project tasks: `cargo xtask <setup|build|run|demo|image|package|test|vm-test|bench|fuzz>`.

mod bench;
mod demo;
mod fuzz;
mod image;
mod package;
mod setup;
mod test;
mod vm;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent, quick when done).
    Setup,
    /// Set up, then build the release binary.
    Build,
    /// Set up what building needs (nothing else), build, and run
    /// conntrack-trace with the given arguments (e.g. `cargo xtask run --
    /// trace`). Setup and build print on stderr only: stdout is the tool's.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then show the founding incident in throwaway network
    /// namespaces (dnsmasq, retrying dig clients, a small table) under the
    /// live view for about 30 s, and `doctor` on it; applies nothing and
    /// restores every sysctl on every exit path (as root).
    Demo(demo::Args),
    /// Build the agent's container image (deploy/Containerfile) as an OCI
    /// image layout, without a daemon or a registry: the static musl
    /// binary in one layer; the same digests on every run.
    Image(image::Args),
    /// Build the Debian package (target/package/conntrack-trace_VERSION_amd64.deb):
    /// the static binary, man pages, completions, the agent's systemd unit
    /// and its defaults file.
    Package(package::Args),
    /// Set up, build, and run every test: unit tests, the root netns
    /// scenarios on this kernel, then the same scenarios in VMs (vm-test's
    /// default matrix: 6.1, 6.12 and the newest Debian kernel with both
    /// backends; and 5.10 with the tracepoint backend).
    Test {
        /// Skip the VM matrix (quick local runs).
        #[arg(long)]
        no_vm: bool,
    },
    /// Run the scenario tests inside VMs on Debian kernels (6.1, 6.12,
    /// newest, 5.10).
    VmTest(vm::Args),
    /// Measure the tracer: every figure but the soak, written to
    /// BENCHMARKS.md; or one figure (`bench flood|evictions|newflow|
    /// userspace|memory|soak`; `bench capture`, `bench amplify`: the
    /// capture format and the amplification detector alone).
    Bench(bench::Args),
    /// Run each cargo-fuzz target in fuzz/ for a bounded time (installs
    /// cargo-fuzz if missing); inputs that break a target are kept in
    /// fuzz/regressions/ and fail the run. Not part of `test` (slow).
    Fuzz(fuzz::Args),
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The user's home directory (caches live under it).
pub fn home() -> std::path::PathBuf {
    std::env::var_os("HOME")
        .map(Into::into)
        .unwrap_or_else(|| "/root".into())
}

/// Our stderr, as a child's stdout.
pub fn stderr_as_stdout() -> std::process::Stdio {
    use std::os::fd::AsFd as _;
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::process::Stdio::from)
        .unwrap_or_else(|_| std::process::Stdio::null())
}

/// Runs a command in the workspace root, failing on a non-zero exit.
pub fn cmd(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// The release build; cargo's output on stderr (stdout stays the tool's).
pub fn build_release() -> Result<PathBuf> {
    setup::quiet_cmd(
        "cargo",
        &["build", "--release", "--package", "conntrack-trace"],
    )?;
    Ok(workspace_root().join("target/release/conntrack-trace"))
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup::test(),
        Cmd::Build => setup::build().and_then(|_| build_release().map(|_| ())),
        Cmd::Run { args } => setup::build().and_then(|_| {
            let bin = build_release()?;
            let status = Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }),
        Cmd::Demo(a) => setup::demo().and_then(|_| demo::run(&a)),
        Cmd::Image(a) => setup::build().and_then(|_| image::run(&a).map(|_| ())),
        Cmd::Package(a) => setup::build().and_then(|_| package::run(&a).map(|_| ())),
        Cmd::Test { no_vm } => setup::test().and_then(|_| {
            test::run()?;
            if no_vm {
                eprintln!("xtask test: VM matrix skipped (--no-vm)");
                return Ok(());
            }
            setup::vm()?;
            // 6.1, 6.12 and Debian's newest kernel (trixie-backports,
            // 7.3.4 in December 2026), both backends.
            let matrix = vm::run(&vm::Args::default());
            // Debian 11's 5.10 for the tracepoint backend's older-kernel
            // variants (its fexit cell would only repeat known failures:
            // no module BTF there).
            let old = vm::run(&vm::Args {
                kernel: "5.10".into(),
                backend: "tracepoint".into(),
                ..vm::Args::default()
            });
            matrix.and(old)
        }),
        // The guests run the scenario tests with the host's tools.
        Cmd::VmTest(a) => setup::test()
            .and_then(|_| setup::vm())
            .and_then(|_| vm::run(&a)),
        Cmd::Bench(a) => setup::bench().and_then(|_| bench::run(a)),
        Cmd::Fuzz(a) => setup::build()
            .and_then(|_| setup::fuzz())
            .and_then(|_| fuzz::run(&a)),
    };
    if let Err(e) = r {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}
