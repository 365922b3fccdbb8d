//! Known failures of the VM matrix: a scenario test binary that fails on a
//! kernel and backend for a reason recorded here, recognised by a line its
//! output must contain. Such a failure is reported as XFAIL with the reason
//! and does not fail the run; a failure without the signature is a real
//! FAIL, and a known failure that passes is XPASS, which fails the run so
//! this table cannot outlive the bug it records (delete the entry).

use super::qemu::TestResult;

#[derive(Debug)]
pub struct Known {
    /// Kernel labels (`5.10`) or versions (`7.3`, the major.minor of the
    /// booted release): an entry for the kernel `newest` resolved to names
    /// its version, so that the next kernel is judged afresh.
    pub kernels: &'static [&'static str],
    pub backend: &'static str,
    pub tests: &'static [&'static str],
    /// Text the failing test's output contains.
    pub signature: &'static str,
    pub why: &'static str,
}

/// Tests that need a per-packet backend (every event-based test).
const SCENARIOS: &[&str] = &[
    "amplification",
    "capture",
    "crash",
    "doctor",
    "early_drop",
    "insert_failed",
    "rule_drops",
    "table_full",
];

pub const KNOWN: &[Known] = &[
    // Measured with branch fexit merged (its --backend flag): Debian's 5.10
    // cloud kernel is built without CONFIG_DEBUG_INFO_BTF_MODULES.
    Known {
        kernels: &["5.10"],
        backend: "fexit",
        tests: SCENARIOS,
        // `__nf_conntrack_alloc` or `__nf_conntrack_confirm`, whichever
        // the backend looks up first for the options a test passes.
        signature: "kernel BTF has no function `__nf_conntrack_",
        why: "no module BTF on 5.10 (CONFIG_DEBUG_INFO_BTF_MODULES unset): fexit cannot \
              attach to nf_conntrack's functions and says so (exit 4)",
    },
];

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    XFail(&'static str),
    XPass(&'static str),
}

impl Verdict {
    pub fn ok(&self) -> bool {
        matches!(self, Verdict::Pass | Verdict::XFail(_))
    }

    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::XFail(_) => "xfail",
            Verdict::XPass(_) => "XPASS",
        }
    }
}

/// The major.minor of a kernel release (`7.3.4+deb13-cloud-amd64` -> `7.3`).
pub fn version_of(release: &str) -> &str {
    let end = release
        .char_indices()
        .filter(|(_, c)| !c.is_ascii_digit())
        .filter(|(_, c)| *c != '.')
        .map(|(i, _)| i)
        .next()
        .unwrap_or(release.len());
    let digits = &release[..end];
    match digits.match_indices('.').nth(1) {
        Some((i, _)) => &digits[..i],
        None => digits,
    }
}

/// The verdict on one test binary of the boot of kernel `label` (release
/// `release`) with `backend`.
pub fn judge(
    known: &'static [Known],
    label: &str,
    release: &str,
    backend: &str,
    t: &TestResult,
) -> Verdict {
    let version = version_of(release);
    let entry = known.iter().find(|k| {
        k.kernels.iter().any(|n| *n == label || *n == version)
            && k.backend == backend
            && k.tests.contains(&t.name.as_str())
    });
    match (t.pass, entry) {
        (true, None) => Verdict::Pass,
        (true, Some(k)) => Verdict::XPass(k.why),
        (false, Some(k)) if t.output.contains(k.signature) => Verdict::XFail(k.why),
        (false, _) => Verdict::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &[Known] = &[Known {
        kernels: &["6.1"],
        backend: "tracepoint",
        tests: &["table_full"],
        signature: "refused `x`",
        why: "because",
    }];

    fn r(name: &str, pass: bool, output: &str) -> TestResult {
        TestResult {
            name: name.into(),
            pass,
            secs: 1,
            output: output.into(),
        }
    }

    #[test]
    fn versions_of_releases() {
        assert_eq!(version_of("7.3.4+deb13-cloud-amd64"), "7.3");
        assert_eq!(version_of("6.1.0-56-cloud-amd64"), "6.1");
        assert_eq!(version_of("5.10.0-35-cloud-amd64"), "5.10");
        assert_eq!(version_of("7.3"), "7.3");
        assert_eq!(version_of("?"), "");
    }

    #[test]
    fn verdicts() {
        let j = |k, b, t: &TestResult| judge(T, k, "6.1.0-56-cloud-amd64", b, t);
        assert_eq!(
            j("6.1", "tracepoint", &r("table_full", true, "")),
            Verdict::XPass("because")
        );
        assert_eq!(
            j(
                "6.1",
                "tracepoint",
                &r("table_full", false, "Error: refused `x` now")
            ),
            Verdict::XFail("because")
        );
        // Failing for another reason is a real failure.
        assert_eq!(
            j(
                "6.1",
                "tracepoint",
                &r("table_full", false, "assertion failed")
            ),
            Verdict::Fail
        );
        assert_eq!(
            judge(
                T,
                "6.12",
                "6.12.57+deb12-cloud-amd64",
                "tracepoint",
                &r("table_full", false, "refused `x`")
            ),
            Verdict::Fail
        );
        // An entry naming a version matches the label that resolved to it.
        assert_eq!(
            judge(
                T,
                "newest",
                "6.1.0-56-cloud-amd64",
                "tracepoint",
                &r("table_full", false, "refused `x`")
            ),
            Verdict::XFail("because")
        );
        assert_eq!(j("6.1", "fexit", &r("table_full", true, "")), Verdict::Pass);
        assert_eq!(
            j("6.1", "tracepoint", &r("early_drop", true, "")),
            Verdict::Pass
        );
    }
}
