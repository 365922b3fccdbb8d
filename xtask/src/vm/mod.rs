//! `cargo xtask vm-test`: the scenario tests inside VMs running Debian's
//! cloud kernels (kernels this host cannot give us), one boot per kernel and
//! backend.
//!
//! - `kernel.rs` resolves, downloads (private apt config, `apt.rs`) and
//!   unpacks each kernel, and extracts its vmlinux;
//! - `modules.rs` picks the modules the tests need and their dependencies;
//! - `initramfs.rs` builds the guest's root filesystem around `init.sh`;
//! - `qemu.rs` boots it and reads the markers /init prints;
//! - `known.rs` lists the failures that are known, with their reasons.
//!
//! Downloads are cached under ~/.cache/conntrack-trace/vm: a second run
//! touches no network (`--refresh` resolves the suites' current kernels
//! again).

mod apt;
mod initramfs;
mod kernel;
mod known;
mod modules;
mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

pub use apt::{Apt, Mirrors};

use crate::workspace_root;

pub const MUSL: &str = "x86_64-unknown-linux-musl";

/// The kernels run when `--kernel` is not given (and by `cargo xtask
/// test`): Debian 12's kernel, its backports kernel, and Debian's newest
/// cloud kernel (trixie-backports).
const DEFAULT_KERNELS: &str = "6.1,6.12,newest";

/// The backends run on each kernel when `--backend` is not given: both BPF
/// backends (the scenario tests' exact counter checks do not apply to
/// `counters`, which has no events).
const DEFAULT_BACKENDS: &str = "fexit,tracepoint";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Kernels to boot: comma-separated labels (6.1, 6.12, 5.10; `newest`:
    /// the newest cloud kernel of trixie-backports) or `all`.
    #[arg(long, default_value = DEFAULT_KERNELS)]
    pub kernel: String,
    /// Backends to test on each kernel, comma-separated. `tracepoint` with
    /// a binary that has no --backend flag runs its default (tracepoint)
    /// backend.
    #[arg(long, default_value = DEFAULT_BACKENDS)]
    pub backend: String,
    /// Only these scenario test binaries (comma-separated: table_full,
    /// early_drop, insert_failed, amplification, cli_errors, ...); default all.
    #[arg(long)]
    pub tests: Option<String>,
    /// Copy every boot's serial log into DIR (failed boots' logs are always
    /// kept under target/vm/logs).
    #[arg(long, value_name = "DIR")]
    pub keep_logs: Option<PathBuf>,
    /// Hard limit per boot, in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Resolve and download the suites' current kernels even if cached.
    #[arg(long)]
    pub refresh: bool,
    /// Also run, in every cell, the tests the default matrix runs in one
    /// cell only because they wait on the kernel (gc_evict: up to a minute
    /// for the GC's next pass).
    #[arg(long)]
    pub every_cell: bool,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            kernel: DEFAULT_KERNELS.to_owned(),
            backend: DEFAULT_BACKENDS.to_owned(),
            tests: None,
            keep_logs: None,
            timeout: 600,
            refresh: false,
            every_cell: false,
        }
    }
}

pub fn cache_dir() -> PathBuf {
    crate::home().join(".cache/conntrack-trace/vm")
}

fn split(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn kernel_specs(list: &str) -> Result<Vec<&'static kernel::Spec>> {
    if list == "all" {
        return Ok(kernel::SPECS.iter().collect());
    }
    split(list)
        .iter()
        .map(|l| {
            kernel::SPECS
                .iter()
                .find(|s| s.label == l)
                .with_context(|| {
                    format!(
                        "--kernel {l}: unknown (known: {}, all)",
                        kernel::SPECS.map(|s| s.label).join(", ")
                    )
                })
        })
        .collect()
}

/// The static binaries the guest runs.
struct Binaries {
    tracer: PathBuf,
    /// (test target name, executable)
    tests: Vec<(String, PathBuf)>,
    has_backend_flag: bool,
}

/// Builds the static (musl) release binary: what the VM guests run and
/// what the container image ships (`cargo xtask image`); returns its path.
pub fn build_musl_release() -> Result<PathBuf> {
    crate::cmd(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "conntrack-trace",
            "--target",
            MUSL,
        ],
    )?;
    Ok(workspace_root().join(format!("target/{MUSL}/release/conntrack-trace")))
}

fn build_binaries(only: Option<&[String]>) -> Result<Binaries> {
    // Release: under TCG a debug build spends tens of seconds parsing the
    // kernel's BTF before it attaches, against the tests' 60 s ready limit.
    let tracer = build_musl_release()?;
    let out = Command::new("cargo")
        .args([
            "test",
            "--package",
            "conntrack-trace-tests",
            "--no-run",
            "--target",
            MUSL,
            "--message-format=json",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    ensure!(
        out.status.success(),
        "building the scenario tests for {MUSL} failed"
    );
    let mut tests = test_executables(&String::from_utf8_lossy(&out.stdout))?;
    if let Some(only) = only {
        for o in only {
            ensure!(
                tests.iter().any(|(n, _)| n == o),
                "--tests {o}: no such scenario test (have {})",
                tests
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        tests.retain(|(n, _)| only.contains(n));
    }
    // The flag comes with the fexit backend; probe the binary, not a version.
    let help = Command::new(&tracer)
        .args(["trace", "--help"])
        .output()
        .with_context(|| format!("running {} trace --help", tracer.display()))?;
    let has_backend_flag = String::from_utf8_lossy(&help.stdout).contains("--backend");
    Ok(Binaries {
        tracer,
        tests,
        has_backend_flag,
    })
}

/// The integration-test executables in `cargo --message-format=json` output
/// (target kind `test`; the library's own unit tests are not scenarios).
fn test_executables(json: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for line in json.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe), Some(name)) = (
            is_test,
            v["executable"].as_str(),
            v["target"]["name"].as_str(),
        ) {
            out.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    out.sort();
    ensure!(
        !out.is_empty(),
        "cargo reported no scenario test executables"
    );
    Ok(out)
}

/// A copy of a binary without debug info (smaller initramfs, faster boot);
/// the original if `strip` is missing.
fn stripped(path: &Path, dir: &Path) -> Result<Vec<u8>> {
    let dst = dir.join(path.file_name().context("binary name")?);
    let ok = Command::new("strip")
        .args(["--strip-debug", "-o"])
        .arg(&dst)
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    let data = fs::read(if ok { &dst } else { path })?;
    let _ = fs::remove_file(&dst);
    Ok(data)
}

/// Builds the initramfs for one kernel; returns its path.
fn build_initramfs(k: &kernel::Kernel, bins: &Binaries, out_dir: &Path) -> Result<PathBuf> {
    use initramfs::Rootfs;
    let mut root = Rootfs::default();
    for d in ["/dev", "/proc", "/sys", "/run", "/tmp", "/root", "/etc/ctt"] {
        root.dir(d);
    }
    root.char_dev("/dev/console", 5, 1);
    root.char_dev("/dev/null", 1, 3);
    root.file("/init", include_bytes!("init.sh").to_vec(), 0o755);
    root.file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_vec(),
        0o644,
    );
    root.file(
        "/etc/group",
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        0o644,
    );
    for f in ["/etc/protocols", "/etc/services"] {
        if Path::new(f).exists() {
            root.host_file(Path::new(f), f)?;
        }
    }
    // Host tools the tests shell out to, under /usr/sbin (PATH in init.sh
    // puts it before busybox's applets, which include a weaker `ip`).
    // dnsmasq and dig: the real DNS server and client of the amplification
    // tests.
    for tool in ["ip", "nft", "setpriv", "dnsmasq", "dig"] {
        let host = initramfs::which(tool)
            .with_context(|| format!("{tool} not found on the host (cargo xtask setup)"))?;
        root.host_program(&host, &format!("/usr/sbin/{tool}"))?;
    }
    let busybox = initramfs::which("busybox")
        .context("busybox not found (cargo xtask setup installs busybox-static)")?;
    initramfs::add_busybox(&mut root, &busybox)?;

    let tmp = out_dir.join("strip");
    fs::create_dir_all(&tmp)?;
    root.file(
        "/usr/local/bin/conntrack-trace",
        stripped(&bins.tracer, &tmp)?,
        0o755,
    );
    for (name, exe) in &bins.tests {
        root.file(&format!("/tests/{name}"), stripped(exe, &tmp)?, 0o755);
    }

    let mods = modules::resolve(&k.modules_dir(), &modules::WANTED)?;
    let order: Vec<&str> = mods.iter().map(|m| m.name.as_str()).collect();
    eprintln!("vm-test: {}: modules {}", k.label, order.join(" "));
    root.file(
        "/etc/ctt/modules",
        format!("{}\n", order.join("\n")).into_bytes(),
        0o644,
    );
    for m in mods {
        root.file(&format!("/lib/modules/ctt/{}.ko", m.name), m.elf, 0o644);
    }

    let path = out_dir.join(format!("initramfs-{}.cpio", k.label));
    fs::write(&path, root.cpio()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

struct Row {
    kernel: String,
    release: String,
    backend: String,
    outcome: Result<qemu::Outcome>,
    /// The test binaries the guest was given.
    expected: Vec<String>,
}

impl Row {
    fn verdicts(&self) -> Vec<(&qemu::TestResult, known::Verdict)> {
        self.outcome
            .as_ref()
            .map(|o| {
                o.tests
                    .iter()
                    .map(|t| {
                        (
                            t,
                            known::judge(
                                known::KNOWN,
                                &self.kernel,
                                &self.release,
                                &self.backend,
                                t,
                            ),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Why this boot failed, or None when it passed: /init reached its end
    /// marker before the timeout, reported every test binary, and no test
    /// failed except as a known failure.
    fn failure(&self) -> Option<String> {
        let o = match &self.outcome {
            Ok(o) => o,
            Err(e) => return Some(format!("{e:#}")),
        };
        if o.timed_out {
            return Some(format!("timed out after {}s", o.elapsed.as_secs()));
        }
        if o.result.is_none() {
            return Some("/init never printed its result (guest crashed?)".into());
        }
        let reported: Vec<&str> = o.tests.iter().map(|t| t.name.as_str()).collect();
        if reported != self.expected {
            return Some(format!(
                "tests reported {reported:?}, expected {:?}",
                self.expected
            ));
        }
        let bad: Vec<String> = self
            .verdicts()
            .iter()
            .filter(|(_, v)| !v.ok())
            .map(|(t, v)| format!("{} {}", t.name, v.label()))
            .collect();
        (!bad.is_empty()).then(|| bad.join(", "))
    }
}

pub fn run(args: &Args) -> Result<()> {
    let t0 = Instant::now();
    let specs = kernel_specs(&args.kernel)?;
    let backends = split(&args.backend);
    ensure!(!backends.is_empty(), "--backend: no backend named");
    let only = args.tests.as_deref().map(split);
    let bins = build_binaries(only.as_deref())?;
    for b in &backends {
        ensure!(
            bins.has_backend_flag || b == "tracepoint",
            "--backend {b}: this conntrack-trace has no --backend flag (only its default tracepoint backend)"
        );
    }
    let out_dir = workspace_root().join("target/vm");
    let log_dir = out_dir.join("logs");
    fs::create_dir_all(&log_dir)?;
    if let Some(d) = &args.keep_logs {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let cache = cache_dir();
    let mut rows = Vec::new();
    for spec in specs {
        let k = match kernel::fetch(spec, &cache, args.refresh) {
            Ok(k) => k,
            Err(e) => {
                for b in &backends {
                    rows.push(Row {
                        kernel: spec.label.to_owned(),
                        release: "?".into(),
                        backend: b.clone(),
                        outcome: Err(anyhow::anyhow!("{e:#}")),
                        expected: Vec::new(),
                    });
                }
                continue;
            }
        };
        eprintln!(
            "vm-test: {}: {} {} ({})",
            k.label,
            k.package(),
            k.version,
            k.release
        );
        let initrd = build_initramfs(&k, &bins, &out_dir)?;
        for b in &backends {
            // Without the flag, "tracepoint" is the binary's only backend.
            let guest_backend = if bins.has_backend_flag {
                b.as_str()
            } else {
                "default"
            };
            let log = log_dir.join(format!("{}-{b}.log", k.label));
            eprintln!("vm-test: booting {} with backend {b}", k.label);
            let outcome = qemu::Boot {
                vmlinux: &k.vmlinux,
                initrd: &initrd,
                extra_cmdline: &format!(
                    "ctt.backend={guest_backend} ctt.every_cell={}",
                    u8::from(args.every_cell)
                ),
                timeout: Duration::from_secs(args.timeout),
                log: log.clone(),
                tag: format!("{}/{b}", k.label),
            }
            .run();
            if let (Ok(o), Some(d)) = (&outcome, &args.keep_logs) {
                let _ = fs::copy(&o.log, d.join(format!("{}-{b}.log", k.label)));
            }
            let row = Row {
                kernel: k.label.to_owned(),
                release: k.release.clone(),
                backend: b.clone(),
                outcome,
                expected: bins.tests.iter().map(|(n, _)| n.clone()).collect(),
            };
            match (&row.outcome, row.failure()) {
                (Ok(o), None) if args.keep_logs.is_none() => {
                    let _ = fs::remove_file(&o.log);
                }
                (Ok(o), Some(why)) => eprintln!(
                    "vm-test: {} / {b} FAILED ({why}); serial log {} ends:\n{}",
                    k.label,
                    o.log.display(),
                    qemu::tail(&o.log, 60)
                ),
                _ => {}
            }
            rows.push(row);
        }
    }
    print_summary(&rows, t0.elapsed());
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.failure().is_some())
        .map(|r| format!("{}/{}", r.kernel, r.backend))
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on {}", failed.join(", "));
    }
    Ok(())
}

fn print_summary(rows: &[Row], total: Duration) {
    eprintln!("\nvm-test summary (boot: until /init starts; total: the whole boot)");
    eprintln!(
        "{:<6} {:<28} {:<11} {:>6} {:>7}  {:<6} tests",
        "kernel", "release", "backend", "boot", "total", "result"
    );
    let mut reasons = std::collections::BTreeSet::new();
    for r in rows {
        let verdict = match r.failure() {
            None => "pass".to_owned(),
            Some(why) => format!("FAIL ({why})"),
        };
        match &r.outcome {
            Ok(o) => {
                let tests: Vec<String> = r
                    .verdicts()
                    .iter()
                    .map(|(t, v)| {
                        if let known::Verdict::XFail(why) | known::Verdict::XPass(why) = v {
                            reasons.insert(format!("{}/{}: {why}", r.kernel, r.backend));
                        }
                        format!("{} {} {}s", t.name, v.label(), t.secs)
                    })
                    .collect();
                eprintln!(
                    "{:<6} {:<28} {:<11} {:>5}s {:>6}s  {} | {}",
                    r.kernel,
                    r.release,
                    r.backend,
                    o.boot
                        .map_or("?".into(), |b| format!("{:.1}", b.as_secs_f64())),
                    o.elapsed.as_secs(),
                    verdict,
                    tests.join(", ")
                );
            }
            Err(_) => eprintln!(
                "{:<6} {:<28} {:<11} {:>6} {:>7}  {verdict}",
                r.kernel, r.release, r.backend, "-", "-"
            ),
        }
    }
    for why in reasons {
        eprintln!("known failure (xfail/XPASS), {why}");
    }
    eprintln!("vm-test total {:.0}s", total.as_secs_f64());
    let (passed, failed, skipped) = tally(rows);
    // The closing line CI reads: test binaries over all boots; a boot that
    // reported nothing counts as one failure, known failures as skipped.
    eprintln!("vm-test: {passed} passed, {failed} failed, {skipped} skipped");
}

/// (passed, failed, skipped) test binaries over all boots. Binaries a boot
/// never reported (crash, timeout) are failures; a boot that failed for
/// another reason (no kernel, hung after its tests) counts one failure.
fn tally(rows: &[Row]) -> (usize, usize, usize) {
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for r in rows {
        let verdicts = r.verdicts();
        let mut row_failed = r.expected.len().saturating_sub(verdicts.len());
        for (_, v) in &verdicts {
            match v {
                known::Verdict::Pass => passed += 1,
                known::Verdict::XFail(_) => skipped += 1,
                known::Verdict::Fail | known::Verdict::XPass(_) => row_failed += 1,
            }
        }
        if row_failed == 0 && r.failure().is_some() {
            row_failed = 1;
        }
        failed += row_failed;
    }
    (passed, failed, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_selection() {
        let l = |s: &str| {
            kernel_specs(s)
                .map(|v| v.iter().map(|k| k.label).collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        };
        assert_eq!(l("6.1,6.12").unwrap(), ["6.1", "6.12"]);
        assert_eq!(l("all").unwrap(), ["6.1", "6.12", "newest", "5.10"]);
        assert!(l("4.19").unwrap_err().contains("--kernel 4.19: unknown"));
    }

    fn row(expected: &[&str], outcome: Result<qemu::Outcome>) -> Row {
        Row {
            kernel: "6.1".into(),
            release: "r".into(),
            backend: "no-such-backend".into(),
            outcome,
            expected: expected.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn outcome(tests: &[(&str, bool)], result: Option<bool>) -> Result<qemu::Outcome> {
        Ok(qemu::Outcome {
            tests: tests
                .iter()
                .map(|(n, pass)| qemu::TestResult {
                    name: n.to_string(),
                    pass: *pass,
                    secs: 1,
                    output: String::new(),
                })
                .collect(),
            result,
            boot: None,
            elapsed: Duration::from_secs(1),
            timed_out: false,
            log: PathBuf::new(),
        })
    }

    #[test]
    fn judging_boots() {
        let ok = row(
            &["a", "b"],
            outcome(&[("a", true), ("b", true)], Some(true)),
        );
        assert_eq!(ok.failure(), None);
        // /init's own verdict is not trusted alone: a failed test fails.
        let bad = row(
            &["a", "b"],
            outcome(&[("a", true), ("b", false)], Some(true)),
        );
        assert_eq!(bad.failure().as_deref(), Some("b FAIL"));
        // A crash after the first test: b never reported.
        let crash = row(&["a", "b"], outcome(&[("a", true)], None));
        assert!(crash.failure().is_some());
        let missing = row(&["a", "b"], outcome(&[("a", true)], Some(true)));
        assert!(missing.failure().unwrap().contains("expected"));
        let no_kernel = row(&[], Err(anyhow::anyhow!("no kernel")));
        assert_eq!(
            tally(&[ok, bad, crash, missing, no_kernel]),
            (5, 4, 0),
            "a, b | a | a + missing b | a + missing b | one for the boot"
        );
    }

    #[test]
    fn test_executables_from_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"conntrack_trace_tests"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"conntrack_trace_tests"},"executable":"/t/deps/conntrack_trace_tests-1"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"table_full"},"executable":"/t/deps/table_full-2"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executables(json).unwrap(),
            [(
                "table_full".to_owned(),
                PathBuf::from("/t/deps/table_full-2")
            )]
        );
    }
}
