//! Attaches empty programs to `kfree_skb` and `kmem_cache_free`
//! (`kfree_skb_empty` and `kmem_free_empty` of the bench-only object
//! `bench-hooks`, conntrack-trace-ebpf/src/bench_hooks.rs: never in the
//! tracer's object) and holds them until
//! SIGINT or SIGTERM: with `kernel.bpf_stats_enabled`, their ns per run
//! is what the hooks cost with nothing in them — the floor under the
//! tracer's programs. `cargo xtask bench newflow` runs it beside the
//! tracer.
//!
//! ```text
//! empty_hooks --ready-file PATH
//! ```

use anyhow::{Context as _, Result, bail};
use aya::{Btf, Ebpf, programs::BtfTracePoint};

/// The bench-only object, built by conntrack-trace's build script.
static BENCH_HOOKS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-hooks"));

/// Loads and attaches both empty programs; detached when dropped.
fn attach() -> Result<Ebpf> {
    let btf = Btf::from_sys_fs().context("kernel BTF")?;
    let mut ebpf = Ebpf::load(BENCH_HOOKS).context("loading bench-hooks")?;
    for (prog, hook) in [
        ("kfree_skb_empty", "kfree_skb"),
        ("kmem_free_empty", "kmem_cache_free"),
    ] {
        let p: &mut BtfTracePoint = ebpf
            .program_mut(prog)
            .with_context(|| format!("{prog} missing from bench-hooks"))?
            .try_into()
            .with_context(|| format!("{prog} is not a tp_btf program"))?;
        p.load(hook, &btf)
            .with_context(|| format!("loading {prog}"))?;
        p.attach().with_context(|| format!("attaching {prog}"))?;
    }
    Ok(ebpf)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let ready = match (args.next().as_deref(), args.next()) {
        (Some("--ready-file"), Some(p)) => p,
        _ => bail!("usage: empty_hooks --ready-file PATH"),
    };
    // SAFETY: plain sigset calls on a local set; blocking SIGINT and
    // SIGTERM here makes sigwait() below the only way they are taken.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let ebpf = attach().context("attaching the empty programs")?;
    std::fs::write(&ready, b"").with_context(|| format!("writing {ready}"))?;
    let mut sig = 0;
    // SAFETY: `set` is initialised above.
    unsafe { libc::sigwait(&set, &mut sig) };
    drop(ebpf);
    Ok(())
}
