//! Known failures of the VM matrix: a scenario test binary that fails on a
//! kernel and backend for a reason recorded here, recognised by a line its
//! output must contain. Such a failure is reported as XFAIL with the reason
//! and does not fail the run; a failure without the signature is a real
//! FAIL, and a known failure that passes is XPASS, which fails the run so
//! this table cannot outlive the bug it records (delete the entry).

use super::qemu::TestResult;

#[derive(Debug)]
pub struct Known {
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
        signature: "kernel BTF has no function `__nf_conntrack_alloc`",
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

pub fn judge(known: &'static [Known], kernel: &str, backend: &str, t: &TestResult) -> Verdict {
    let entry = known.iter().find(|k| {
        k.kernels.contains(&kernel) && k.backend == backend && k.tests.contains(&t.name.as_str())
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
    fn verdicts() {
        let j = |k, b, t: &TestResult| judge(T, k, b, t);
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
            j("6.12", "tracepoint", &r("table_full", false, "refused `x`")),
            Verdict::Fail
        );
        assert_eq!(j("6.1", "fexit", &r("table_full", true, "")), Verdict::Pass);
        assert_eq!(
            j("6.1", "tracepoint", &r("early_drop", true, "")),
            Verdict::Pass
        );
    }
}
