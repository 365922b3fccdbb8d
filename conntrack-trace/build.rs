//! Builds the eBPF object (conntrack-trace-ebpf) with the nightly toolchain
//! and bpf-linker, into OUT_DIR, where src/backend/tracepoint.rs embeds it.
use std::path::PathBuf;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .context("workspace root")?
        .join("conntrack-trace-ebpf");
    let root = root
        .to_str()
        .context("non-UTF-8 path to conntrack-trace-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "conntrack-trace-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (run `cargo xtask setup` if nightly rust-src or bpf-linker is missing)")
}
