//! Bad input ends with one clear line on stderr and the documented exit
//! code (README "Exit codes"), never a panic.

use std::process::Command;

use conntrack_trace_tests::{binary, root_or_skip};

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run conntrack-trace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line(stderr: &str) {
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one line expected: {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_flags_exit_2() {
    for args in [
        &["trace", "--proto", "bogus"][..],
        &["trace", "--duration", "soon"],
        &["trace", "--src", "10.0.0.0/99"],
        &["trace", "--ring-size", "12345"],
        &["frobnicate"],
    ] {
        let (code, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn missing_btf_exit_4() {
    if !root_or_skip("missing_btf_exit_4") {
        return;
    }
    let (code, err) = run(&["trace", "--duration", "1", "--btf", "/nonexistent/vmlinux"]);
    assert_eq!(code, 4, "{err}");
    assert_one_line(&err);
    assert!(
        err.contains("kernel BTF not found at /nonexistent/vmlinux"),
        "{err}"
    );
}

#[test]
fn garbage_btf_exit_4() {
    if !root_or_skip("garbage_btf_exit_4") {
        return;
    }
    let path = std::env::temp_dir().join(format!("ctt-garbage-btf-{}", std::process::id()));
    std::fs::write(&path, b"not BTF at all").unwrap();
    let (code, err) = run(&["trace", "--duration", "1", "--btf", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 4, "{err}");
    assert_one_line(&err);
    assert!(err.contains("cannot parse BTF"), "{err}");
}

#[test]
fn unknown_netns_exit_2() {
    if !root_or_skip("unknown_netns_exit_2") {
        return;
    }
    let (code, err) = run(&["trace", "--duration", "1", "--netns", "ctt-does-not-exist"]);
    assert_eq!(code, 2, "{err}");
    assert_one_line(&err);
    assert!(
        err.contains("--netns ctt-does-not-exist: no such namespace"),
        "{err}"
    );
}

#[test]
fn unprivileged_exit_3() {
    // Needs root to drop to an unprivileged user with setpriv.
    if !root_or_skip("unprivileged_exit_3") {
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(binary())
        .args(["trace", "--duration", "1"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_one_line(&err);
    assert!(
        err.contains("insufficient privileges") && err.contains("sudo"),
        "{err}"
    );
}
