//! One guest boot under qemu, judged by /init's marker lines
//! (xtask/src/vm/init.sh) with a hard timeout; the serial console goes to a
//! log file.
//!
//! Why these flags: /dev/kvm on this kind of host is backed by PVM and
//! cannot run stock kernels, so software emulation (`tcg,thread=multi`: one
//! host thread per vCPU). qemu 10's `-M pc -cpu max` ran 100 of 100 boots of
//! Debian 6.12 kernels clean where `-M microvm` hung in some. The kernel is
//! the uncompressed vmlinux (PVH entry), `panic=-1` turns a guest panic into
//! a reboot that `-no-reboot` turns into a qemu exit, and `tsc_early_khz`
//! spares the guest a TSC calibration that TCG makes slow and unreliable.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// What /init reported about one test binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    pub name: String,
    pub pass: bool,
    pub secs: u64,
    /// The console lines between its `start` and its verdict.
    pub output: String,
}

/// What one boot produced.
#[derive(Debug)]
pub struct Outcome {
    pub tests: Vec<TestResult>,
    /// `Some(true)` when /init printed `result pass`; `None` when it never
    /// got that far (timeout, panic, crash).
    pub result: Option<bool>,
    /// Until /init's first line (kernel boot), and in all.
    pub boot: Option<Duration>,
    pub elapsed: Duration,
    pub timed_out: bool,
    pub log: PathBuf,
}

pub const MARKER: &str = "ctt-vm: ";

/// Parses the marker lines of a serial log: `test NAME pass|fail Ns ...`
/// and `result pass|fail`. Kernel messages can share a console line with
/// them, so a marker is found anywhere on its line.
pub fn parse_markers(log: &str) -> (Vec<TestResult>, Option<bool>) {
    let mut tests = Vec::new();
    let mut result = None;
    let mut output = String::new();
    for line in log.lines() {
        let Some((_, m)) = line.split_once(MARKER) else {
            output.push_str(line);
            output.push('\n');
            continue;
        };
        let w: Vec<&str> = m.split_whitespace().collect();
        match w.as_slice() {
            ["test", _, "start"] => output.clear(),
            ["test", name, verdict @ ("pass" | "fail"), secs, ..] => tests.push(TestResult {
                name: (*name).to_owned(),
                pass: *verdict == "pass",
                secs: secs.trim_end_matches('s').parse().unwrap_or(0),
                output: std::mem::take(&mut output),
            }),
            ["result", verdict, ..] => result = Some(*verdict == "pass"),
            _ => {}
        }
    }
    (tests, result)
}

/// The host's TSC rate in kHz, from /proc/cpuinfo's `cpu MHz`.
pub fn host_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

pub struct Boot<'a> {
    pub vmlinux: &'a Path,
    pub initrd: &'a Path,
    /// Extra kernel command line (`ctt.backend=...`).
    pub extra_cmdline: &'a str,
    pub timeout: Duration,
    pub log: PathBuf,
    /// Prefix of the progress lines echoed to the terminal.
    pub tag: String,
}

impl Boot<'_> {
    pub fn run(&self) -> Result<Outcome> {
        let khz = host_khz(&fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
            .context("no `cpu MHz` in /proc/cpuinfo (needed for tsc_early_khz)")?;
        let cmdline = format!(
            "console=ttyS0 panic=-1 tsc_early_khz={khz} loglevel=4 {}",
            self.extra_cmdline
        );
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg,thread=multi",
                "-M",
                "pc",
                "-cpu",
                "max",
                "-smp",
                "2",
                "-m",
                "1G",
                "-nographic",
                "-no-reboot",
                "-nic",
                "none",
                "-kernel",
            ])
            .arg(self.vmlinux)
            .arg("-initrd")
            .arg(self.initrd)
            .args(["-append", &cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running qemu-system-x86_64 (cargo xtask setup installs it)")?;
        let start = Instant::now();
        let stdout = child.stdout.take().context("qemu stdout")?;
        let stderr = child.stderr.take().context("qemu stderr")?;
        let mut log = fs::File::create(&self.log)
            .with_context(|| format!("creating {}", self.log.display()))?;
        let tag = self.tag.clone();
        // Copies the console to the log, echoes markers, and notes when
        // /init spoke first (the end of the kernel's boot).
        let reader = std::thread::spawn(move || -> Option<Duration> {
            let mut boot = None;
            let mut r = BufReader::new(stdout);
            let mut line = Vec::new();
            while r.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let _ = log.write_all(&line);
                let text = String::from_utf8_lossy(&line);
                if let Some((_, m)) = text.split_once(MARKER) {
                    boot.get_or_insert_with(|| start.elapsed());
                    eprintln!(
                        "vm-test [{tag} +{:.0}s] {}",
                        start.elapsed().as_secs_f64(),
                        m.trim_end()
                    );
                }
                line.clear();
            }
            boot
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
            s
        });
        let deadline = start + self.timeout;
        let mut timed_out = false;
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let elapsed = start.elapsed();
        let boot = reader.join().ok().flatten();
        let qemu_err = err_reader.join().unwrap_or_default();
        let mut text = fs::read_to_string(&self.log).unwrap_or_default();
        if !qemu_err.trim().is_empty() {
            let mut f = fs::OpenOptions::new().append(true).open(&self.log)?;
            writeln!(f, "\n--- qemu stderr ---\n{qemu_err}")?;
            text.push_str(&qemu_err);
        }
        if timed_out {
            let mut f = fs::OpenOptions::new().append(true).open(&self.log)?;
            writeln!(f, "\n--- killed by vm-test after {:?} ---", self.timeout)?;
        }
        let (tests, result) = parse_markers(&text);
        Ok(Outcome {
            tests,
            result,
            boot,
            elapsed,
            timed_out,
            log: self.log.clone(),
        })
    }
}

/// The last `n` lines of a log.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers() {
        let log = "[    1.0] Run /init as init process\n\
                   ctt-vm: kernel 6.1.0-56-cloud-amd64 backend default cpus 2\n\
                   ctt-vm: test table_full start\n\
                   running 3 tests\n\
                   [   40.1] random: crng init done ctt-vm: test table_full pass 37s\n\
                   ctt-vm: test early_drop start\n\
                   Error: refused\n\
                   ctt-vm: test early_drop fail 12s rc=101\n\
                   ctt-vm: result fail\n";
        let (tests, result) = parse_markers(log);
        assert_eq!(
            tests,
            [
                TestResult {
                    name: "table_full".into(),
                    pass: true,
                    secs: 37,
                    output: "running 3 tests\n".into(),
                },
                TestResult {
                    name: "early_drop".into(),
                    pass: false,
                    secs: 12,
                    output: "Error: refused\n".into(),
                },
            ]
        );
        assert_eq!(result, Some(false));
        assert_eq!(
            parse_markers("Kernel panic - not syncing\n"),
            (vec![], None)
        );
    }

    #[test]
    fn khz_from_cpuinfo() {
        let c = "processor\t: 0\ncpu family\t: 6\ncpu MHz\t\t: 2199.998\ncache size\t: 1 KB\n";
        assert_eq!(host_khz(c), Some(2_199_998));
        assert_eq!(host_khz("processor: 0\n"), None);
    }
}
