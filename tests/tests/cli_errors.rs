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
        &["agent", "--autopilot", "maybe"],
        &["agent", "--autopilot-memory", "0%"],
        &["agent", "--autopilot-memory", "12 parsecs"],
        &["agent", "--autopilot-cooldown", "soon"],
    ] {
        let (code, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `--autopilot on` where nf_conntrack_max cannot be written: refused
/// before anything is loaded, one line, exit 3.
#[test]
fn autopilot_on_without_a_writable_max_exits_3() {
    if !root_or_skip("autopilot_on_without_a_writable_max_exits_3") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ctt-ap-ro-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    // A directory without nf_conntrack_max: the open fails (ENOENT), as it
    // fails with EROFS or EACCES where /proc/sys is read-only.
    let (code, err) = run(&[
        "agent",
        "--autopilot",
        "on",
        "--autopilot-sysctl-dir",
        dir.to_str().unwrap_or_default(),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, 3, "{err}");
    assert_one_line(&err);
    assert!(err.contains("nf_conntrack_max is not writable"), "{err}");
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
    // What is needed: CAP_BPF + CAP_PERFMON; `--netns` works without
    // CAP_SYS_ADMIN (it warns), so the line must not say otherwise.
    assert!(
        err.contains("CAP_BPF and CAP_PERFMON") && !err.contains("--netns"),
        "{err}"
    );
}

/// Issue 11 item 5: durations out of range (`--interval 1e-12` panicked
/// after attach, `1e19` and anything >= 1e20 s on the first tick) are a
/// usage error before anything is loaded: exit 2, one line. No root needed.
#[test]
fn bad_durations_exit_2_with_one_line() {
    for args in [
        &["trace", "--interval", "1e-12"][..],
        &["trace", "--interval", "1e19"],
        &["trace", "--interval", "1e20s"],
        &["trace", "--interval", "9ms"],
        &["trace", "--duration", "1e20s"],
        &["trace", "--duration", "1e20"],
        &["trace", "--duration", "100000000000000000000s"],
        &[
            "trace",
            "--duration",
            "18446744073709551615s18446744073709551615s",
        ],
        &["trace", "--duration", "0.0000001"],
        &["trace", "--amp-window", "1e20"],
        &["report", "x.ctt", "--since", "1e20"],
        &["report", "x.ctt", "--until", "99999999999999999999s"],
        &[
            "export",
            "x.ctt",
            "--format",
            "ndjson",
            "--amp-window",
            "1e19",
        ],
    ] {
        let (code, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_one_line(&err);
        assert!(
            err.starts_with("conntrack-trace: error: invalid value"),
            "{args:?}: {err}"
        );
    }
}

/// A capture (the fuzz seed without its mode byte), compiled in.
const CAPTURE: &[u8] = include_bytes!("../../fuzz/seeds/report_file/small-raw.ctt");

/// Issue 11 item 7: README's exit-code table, row by row (3, 4 and 5 need
/// root and a kernel: `unprivileged_exit_3`, `missing_btf_exit_4` above
/// and backend.rs's fexit refusal). Every error is one line that starts
/// with `conntrack-trace: error: `.
#[test]
fn exit_code_table() {
    let dir = std::env::temp_dir().join(format!("ctt-exit-codes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cap = dir.join("c.ctt");
    std::fs::write(&cap, &CAPTURE[1..]).unwrap();
    let exists = dir.join("exists.ndjson");
    std::fs::write(&exists, "").unwrap();
    let c = cap.to_str().unwrap();
    let ex = exists.to_str().unwrap();
    let rows: &[(&[&str], i32, &str)] = &[
        // 0: a run that did what was asked (also help and version).
        (&["report", c], 0, ""),
        (&["--version"], 0, ""),
        // 1: the system failed us: no such input, an output that cannot
        // be created (ENOENT here; EACCES and EROFS alike).
        (
            &["report", "/nonexistent/c.ctt"],
            1,
            "/nonexistent/c.ctt: No such file",
        ),
        (
            &["export", c, "--format", "ndjson", "-o", "/nonexistent/o"],
            1,
            "/nonexistent/o: No such file",
        ),
        (&["report", "/"], 1, "/: a directory, not a capture file"),
        // 2: the command line is at fault: a bad flag or value, an output
        // that may not be replaced.
        (&["trace", "--frob"], 2, "unexpected argument '--frob'"),
        (
            &["export", c],
            2,
            "required arguments were not provided: --format",
        ),
        (
            &["export", c, "--format", "ndjson", "-o", ex],
            2,
            "file exists (use --force",
        ),
        (
            &["report", c, "--svg", c],
            2,
            "is a conntrack-trace capture",
        ),
    ];
    for (args, code, want) in rows {
        let out = Command::new(binary()).args(*args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        if *code == 0 {
            assert!(!err.contains("error"), "{args:?}: {err}");
            continue;
        }
        assert_one_line(&err);
        assert!(
            err.starts_with("conntrack-trace: error: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
    assert_eq!(std::fs::read(&cap).unwrap(), &CAPTURE[1..]);
    let _ = std::fs::remove_dir_all(&dir);
}
