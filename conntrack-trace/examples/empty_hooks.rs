//! Attaches empty programs to `kfree_skb` and `kmem_cache_free` (the
//! object's `kfree_skb_empty` and `kmem_free_empty`) and holds them until
//! SIGINT or SIGTERM: with `kernel.bpf_stats_enabled`, their ns per run
//! is what the hooks cost with nothing in them — the floor under the
//! tracer's programs. `cargo xtask bench newflow` runs it beside the
//! tracer.
//!
//! ```text
//! empty_hooks --ready-file PATH
//! ```

use anyhow::{Context as _, Result, bail};

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
    let ebpf = conntrack_trace::kernel::backend::attach_empty_hooks()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("attaching the empty programs")?;
    std::fs::write(&ready, b"").with_context(|| format!("writing {ready}"))?;
    let mut sig = 0;
    // SAFETY: `set` is initialised above.
    unsafe { libc::sigwait(&set, &mut sig) };
    drop(ebpf);
    Ok(())
}
