//! Capture files: `trace --write FILE` records every event losslessly;
//! `report` and `export` read them back (see [`format`] for the layout).

pub mod format;
pub mod reader;
pub mod writer;

pub use format::{Header, Trailer};
pub use reader::{CaptureInfo, CutShort, OpenSet, ReadError, open_set, read_set};
pub use writer::{WriteError, WriteOptions, Writer};

/// Whether `path` is a regular file that starts like a capture (outputs
/// of `report`/`export` never replace one, even with `--force`: swapped
/// arguments must not destroy the evidence).
pub fn is_capture_file(path: &std::path::Path) -> bool {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    if !path.symlink_metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    let mut magic = [0u8; 8];
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == format::MAGIC)
}

/// This machine's host name (for the header).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The running kernel's release (for the header).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        collections::BTreeMap,
        path::{Path, PathBuf},
    };

    use super::{
        format::{self, RecordedFilter, tests::sample_event},
        reader::{self, FileReader},
        *,
    };
    use crate::{
        kernel::kstats::CtStats,
        kernel::workload::NetnsNames,
        model::event::Event,
        model::{KindCounts, Scope},
    };

    /// A scratch directory removed on drop.
    pub struct TempDir(pub PathBuf);
    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "ctt-unit-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub fn header() -> Header {
        Header {
            format_version: format::FORMAT_VERSION,
            tool_version: "0.1.0".into(),
            hostname: "host".into(),
            kernel_release: "6.18.0".into(),
            hooks: "tracepoint".into(),
            evictions: "on".into(),
            start_unix_ns: 1_700_000_000_000_000_000,
            start_mono_ns: 1_000_000_000,
            capture_id: 42,
            seq: 0,
            scope: Scope {
                netns: "all".into(),
                netns_inode: None,
                namespaces: 3,
                uncovered: vec![],
            },
            filter: RecordedFilter::default(),
            conntrack: vec![],
            kernel_start: BTreeMap::from([(1, CtStats::default())]),
            backend_refused: vec![],
            per_packet: true,
            backend_name: None,
        }
    }

    pub fn trailer(events: &[Event]) -> Trailer {
        let mut k = KindCounts::default();
        for e in events {
            *k.get_mut(e.kind) += 1;
        }
        Trailer {
            backend: "tracepoint".into(),
            duration_s: 2.5,
            end_mono_ns: 3_500_000_000,
            events: k,
            matched: k,
            lost: KindCounts::default(),
            shed: KindCounts::default(),
            observed: k,
            complete: true,
            decode_errors: 0,
            kernel_end: BTreeMap::new(),
            kernel: CtStats {
                drop: k.table_full + k.insert_failed,
                early_drop: k.early_drop,
                insert_failed: k.insert_failed,
                ..Default::default()
            },
            namespaces: 1,
            uncovered: vec![],
            events_written: 0,
            unclassified_drops: 0,
            unmatched_drop_counts: 0,
            exact_top: None,
            exact_sources: 0,
        }
    }

    /// Writes `n` synthetic events; returns them.
    /// A new capture at `path` with [`header`], not rotated.
    pub fn create(path: &Path) -> Writer {
        Writer::create(
            WriteOptions {
                path: path.to_owned(),
                force: false,
                max_size: None,
            },
            header(),
        )
        .unwrap()
    }

    pub fn write_capture(path: &Path, n: u64, max_size: Option<u64>) -> Vec<Event> {
        let mut w = Writer::create(
            WriteOptions {
                path: path.to_owned(),
                force: false,
                max_size,
            },
            header(),
        )
        .unwrap();
        let mut names = NetnsNames::new();
        names.insert(4026532000, "srv".into());
        w.names(&names);
        let evs: Vec<Event> = (0..n).map(sample_event).collect();
        for (i, e) in evs.iter().enumerate() {
            if i == n as usize / 2 {
                names.insert(4026532001, "cli".into());
                w.names(&names);
                w.flush();
            }
            w.event(e);
        }
        w.finish(trailer(&evs)).unwrap();
        evs
    }

    fn read_all(paths: &[PathBuf]) -> (Vec<(Event, NetnsNames)>, CaptureInfo) {
        let mut got = Vec::new();
        let info = read_set(paths, |e, n| got.push((e.clone(), n.clone()))).unwrap();
        (got, info)
    }

    /// COUNTS records go through the writer's buffer in order with the
    /// events, and come back to `read_with_counts` (and not to `read`).
    #[test]
    fn counts_records_are_read_back() {
        let d = TempDir::new("counts");
        let p = d.0.join("c.ctt");
        let mut w = create(&p);
        let evs: Vec<Event> = (0..10).map(sample_event).collect();
        let counts = crate::model::IntervalCounts {
            ts_ns: 77,
            sources: vec![crate::model::SourceCount {
                netns: 4026532000,
                kind: crate::model::event::Kind::TableFull,
                src: Some("10.0.0.7".parse().unwrap()),
                proto: crate::model::event::Proto(17),
                port: 53,
                count: 12345,
            }],
        };
        for e in &evs[..5] {
            w.event(e);
        }
        w.counts(&counts);
        w.counts(&crate::model::IntervalCounts::default());
        for e in &evs[5..] {
            w.event(e);
        }
        w.finish(trailer(&evs)).unwrap();
        let (mut seen, mut got) = (0, Vec::new());
        let info = open_set(std::slice::from_ref(&p))
            .unwrap()
            .read_with_counts(|_, _| seen += 1, |c, _| got.push(c.clone()))
            .unwrap();
        assert!(info.intact());
        assert_eq!(seen, 10);
        assert_eq!(got, [counts]);
    }

    #[test]
    fn write_then_read_round_trips() {
        let d = TempDir::new("rt");
        let p = d.0.join("c.ctt");
        let evs = write_capture(&p, 1000, None);
        let (got, info) = read_all(std::slice::from_ref(&p));
        assert_eq!(
            got.iter().map(|g| &g.0).collect::<Vec<_>>(),
            evs.iter().collect::<Vec<_>>()
        );
        assert_eq!(got[0].1.len(), 1, "names as they were at the first event");
        assert_eq!(got[999].1.len(), 2, "names learned later apply later");
        assert_eq!(info.header, header());
        let t = info.trailer.as_ref().unwrap();
        assert_eq!(t.events_written, 1000);
        assert!(info.intact(), "{:?}", info.warnings);
        assert_eq!(info.files[0].ended, "trailer");
    }

    #[test]
    fn file_is_private_and_not_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let d = TempDir::new("mode");
        let p = d.0.join("c.ctt");
        write_capture(&p, 3, None);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = Writer::create(
            WriteOptions {
                path: p.clone(),
                force: false,
                max_size: None,
            },
            header(),
        );
        assert!(matches!(again, Err(WriteError::Exists(_))));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = Writer::create(
            WriteOptions {
                path: p.clone(),
                force: true,
                max_size: None,
            },
            header(),
        )
        .unwrap();
        w.finish(trailer(&[])).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "--force tightens an overwritten file");
    }

    #[test]
    fn every_truncation_reads_back_to_the_last_whole_record() {
        let d = TempDir::new("trunc");
        let p = d.0.join("c.ctt");
        write_capture(&p, 40, None);
        let full = std::fs::read(&p).unwrap();
        // Record boundaries of the intact file.
        let mut bounds = vec![];
        let mut r = FileReader::new(&full[..], "x".into()).unwrap();
        bounds.push(r.offset());
        while r.next_record().unwrap().is_some() {
            bounds.push(r.offset());
        }
        for cut in 0..full.len() {
            match reader::read_bytes(&full[..cut]) {
                Err(ReadError::NotCapture { .. }) => assert!(cut < 8),
                Err(e) => panic!("cut {cut}: {e}"),
                Ok((n, end)) => {
                    let whole = bounds.iter().filter(|b| **b <= cut as u64).count() - 1;
                    assert_eq!(n, whole, "cut {cut}");
                    let at_boundary = bounds.contains(&(cut as u64));
                    match end {
                        None => assert!(at_boundary, "cut {cut} must be flagged"),
                        Some(c) => {
                            assert!(!at_boundary);
                            assert_eq!(c.offset, bounds[whole], "cut {cut}");
                        }
                    }
                }
            }
        }
        // At a boundary without a trailer, read_set says so.
        let p2 = d.0.join("cut.ctt");
        std::fs::write(&p2, &full[..bounds[20] as usize]).unwrap();
        let (_, info) = read_all(&[p2]);
        assert!(!info.intact());
        assert!(info.trailer.is_none());
        let c = info.files[0].cut_short.as_ref().unwrap();
        assert_eq!(c.offset, bounds[20]);
        assert!(info.warnings[0].contains(&format!("cut short at offset {}", bounds[20])));
    }

    #[test]
    fn flipped_bytes_stop_reading_at_that_record() {
        let d = TempDir::new("flip");
        let p = d.0.join("c.ctt");
        write_capture(&p, 20, None);
        let full = std::fs::read(&p).unwrap();
        for i in (8..full.len()).step_by(7) {
            let mut bad = full.clone();
            bad[i] ^= 0x5a;
            // Never panics; either stops early or (length byte made the
            // record longer than the file) reports a torn record.
            let (n, end) = reader::read_bytes(&bad).unwrap();
            assert!(end.is_some(), "flip at {i} went unnoticed ({n} records)");
        }
    }

    #[test]
    fn huge_length_is_refused_without_allocating() {
        let mut f = format::MAGIC.to_vec();
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        let (n, end) = reader::read_bytes(&f).unwrap();
        assert_eq!(n, 0);
        assert_eq!(
            end.unwrap().reason,
            format!("corrupt record length {}", u32::MAX)
        );
        // Within the limit but longer than the file: torn, and only the
        // bytes present were buffered.
        let mut f = format::MAGIC.to_vec();
        f.extend_from_slice(&format::MAX_RECORD.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&[1, 2, 3]);
        let (_, end) = reader::read_bytes(&f).unwrap();
        let end = end.unwrap();
        assert_eq!(end.offset, 8);
        assert!(end.reason.contains("3 of"), "{}", end.reason);
    }

    #[test]
    fn not_a_capture_names_the_file() {
        let d = TempDir::new("magic");
        let p = d.0.join("x.txt");
        std::fs::write(&p, "hello world, not a capture").unwrap();
        let e = read_set(std::slice::from_ref(&p), |_, _| {}).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: not a conntrack-trace capture (bad magic at offset 0)",
                p.display()
            )
        );
        let e = read_set(&[d.0.join("missing")], |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn rotated_set_reads_as_one_in_any_order() {
        let d = TempDir::new("rot");
        let one = d.0.join("one.ctt");
        let rot = d.0.join("rot.ctt");
        let evs = write_capture(&one, 5000, None);
        write_capture(&rot, 5000, Some(writer::MIN_MAX_SIZE));
        let mut paths: Vec<PathBuf> = (0..)
            .map(|s| writer::rotated_path(&rot, s))
            .take_while(|p| p.exists())
            .collect();
        assert!(paths.len() >= 4, "{} files", paths.len());
        for p in &paths {
            let len = std::fs::metadata(p).unwrap().len();
            assert!(
                len <= writer::MIN_MAX_SIZE,
                "{} is {len} bytes",
                p.display()
            );
        }
        paths.reverse();
        let (a, ia) = read_all(&[one]);
        let (b, ib) = read_all(&paths);
        assert_eq!(a.len(), evs.len());
        assert_eq!(a, b, "same events with the same names");
        assert_eq!(ia.trailer, ib.trailer);
        assert!(ib.intact(), "{:?}", ib.warnings);
        assert_eq!(
            ib.files.iter().map(|f| f.seq).collect::<Vec<_>>(),
            (0..paths.len() as u32).collect::<Vec<_>>()
        );

        // A missing middle file is named, the rest still reads.
        let mut gap = paths.clone();
        gap.retain(|p| !p.to_string_lossy().ends_with(".1"));
        let (c, ic) = read_all(&gap);
        assert!(c.len() < a.len());
        assert!(!ic.intact());
        assert!(
            ic.warnings.iter().any(|w| w.contains("files 1..2")),
            "{:?}",
            ic.warnings
        );
    }

    /// Review of issue 11: only `FILE.1` was checked at start, so without
    /// `--force` a `FILE.2` (or any later one) already there stopped the
    /// recording at the rotation that met it, with a warning. Every
    /// `FILE.N` a rotation could write is checked at start now, gaps too.
    #[test]
    fn every_rotation_target_is_checked_at_start() {
        let d = TempDir::new("targets");
        let p = d.0.join("c.ctt");
        let opts = |force| WriteOptions {
            path: p.clone(),
            force,
            max_size: Some(writer::MIN_MAX_SIZE),
        };
        // Not rotation targets: left alone, never refused.
        const OTHERS: [&str; 6] = [
            "c.ctt.01",
            "c.ctt.0",
            "c.ctt.x",
            "c.ctt.4294967296",
            "c.ctt.1.tmp",
            "d.ctt.2",
        ];
        for other in OTHERS {
            std::fs::write(d.0.join(other), b"other").unwrap();
        }
        assert_eq!(writer::rotation_targets(&p).unwrap(), vec![]);
        std::fs::write(writer::rotated_path(&p, 7), b"old").unwrap();
        std::fs::write(writer::rotated_path(&p, u32::MAX), b"old").unwrap();
        assert_eq!(
            writer::rotation_targets(&p).unwrap(),
            vec![
                (7, writer::rotated_path(&p, 7)),
                (u32::MAX, writer::rotated_path(&p, u32::MAX))
            ]
        );
        match Writer::create(opts(false), header()) {
            Err(WriteError::Exists(s)) => assert!(s.ends_with("c.ctt.7"), "{s}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(!p.exists(), "refused before anything is created");
        // A planted symlink behind a gap is refused even with --force, and
        // nothing is removed first.
        let link = writer::rotated_path(&p, 9);
        std::os::unix::fs::symlink(d.0.join("victim"), &link).unwrap();
        let e = Writer::create(opts(true), header()).err().unwrap();
        assert!(e.to_string().contains("c.ctt.9: is a symbolic link"), "{e}");
        assert!(writer::rotated_path(&p, 7).exists());
        std::fs::remove_file(&link).unwrap();
        // --force removes every stale one, and only those.
        Writer::create(opts(true), header())
            .unwrap()
            .finish(trailer(&[]))
            .unwrap();
        assert_eq!(writer::rotation_targets(&p).unwrap(), vec![]);
        for other in OTHERS {
            assert!(d.0.join(other).exists(), "{other} left alone");
        }
        // A relative path lists the current directory (and finds nothing
        // for a name that is not there).
        assert_eq!(
            writer::rotation_targets(Path::new("no-such-capture-ctt")).unwrap(),
            vec![]
        );
    }

    #[test]
    fn stale_rotated_files_are_refused_or_removed() {
        let d = TempDir::new("stale");
        let p = d.0.join("c.ctt");
        std::fs::write(writer::rotated_path(&p, 1), b"old").unwrap();
        let opts = |force| WriteOptions {
            path: p.clone(),
            force,
            max_size: None,
        };
        assert!(
            matches!(Writer::create(opts(false), header()), Err(WriteError::Exists(s)) if s.ends_with(".1"))
        );
        Writer::create(opts(true), header())
            .unwrap()
            .finish(trailer(&[]))
            .unwrap();
        assert!(!writer::rotated_path(&p, 1).exists());
        assert!(matches!(
            Writer::create(
                WriteOptions {
                    max_size: Some(1000),
                    ..opts(true)
                },
                header()
            ),
            Err(WriteError::MaxSize(1000))
        ));
        // A header of thousands of namespaces does not fit 64 KiB files.
        std::fs::remove_file(&p).unwrap();
        let mut big = header();
        for i in 0..2000 {
            big.kernel_start.insert(i, Default::default());
        }
        let e = Writer::create(
            WriteOptions {
                max_size: Some(writer::MIN_MAX_SIZE),
                ..opts(true)
            },
            big,
        );
        assert!(
            matches!(e, Err(WriteError::HeaderTooLarge { .. })),
            "{:?}",
            e.err()
        );
        assert!(!p.exists(), "no file left behind");
    }

    #[test]
    fn files_of_different_captures_are_not_mixed() {
        let d = TempDir::new("mixed");
        let a = d.0.join("a.ctt");
        let b = d.0.join("b.ctt");
        write_capture(&a, 3, None);
        let mut h = header();
        h.capture_id = 7;
        h.seq = 0;
        let w = Writer::create(
            WriteOptions {
                path: b.clone(),
                force: false,
                max_size: None,
            },
            h,
        )
        .unwrap();
        w.finish(trailer(&[])).unwrap();
        let e = read_set(&[a.clone(), b], |_, _| {}).unwrap_err();
        assert!(matches!(e, ReadError::Mixed { .. }), "{e}");
        let e = read_set(&[a.clone(), a], |_, _| {}).unwrap_err();
        assert!(matches!(e, ReadError::Duplicate { .. }), "{e}");
    }
}

/// The fuzz crate's seeds must decode; its regressions (inputs that once
/// crashed or hung a fuzz target) must not panic. Runs in `cargo xtask test`.
#[cfg(test)]
mod fuzz_regressions {
    use std::path::{Path, PathBuf};

    use super::{format, reader};

    fn files(dir: &str) -> Vec<PathBuf> {
        let d = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz")
            .join(dir);
        let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.file_name().is_some_and(|n| n != ".gitkeep"));
        v.sort();
        v
    }

    #[test]
    fn seeds_decode() {
        let whole = files("seeds/read_capture");
        assert!(!whole.is_empty(), "fuzz/seeds/read_capture is empty");
        for p in whole {
            let data = std::fs::read(&p).unwrap();
            let (n, end) = reader::read_fuzz_input(&data).unwrap().unwrap();
            assert!(
                n >= 3 && end.is_none(),
                "{}: {n} records, {end:?}",
                p.display()
            );
        }
        let scratch = super::tests::TempDir::new("fuzz-seeds");
        for p in files("seeds/report_file") {
            let f = scratch.0.join("f.ctt");
            crate::drivers::report::fuzz_report(&std::fs::read(&p).unwrap(), &f);
            let r =
                crate::drivers::report::build(&[f], &Default::default(), 10, |_, _, _| {}).unwrap();
            assert!(r.summary.events.total() >= 3, "{}", p.display());
        }
        let bodies = files("seeds/decode_record");
        assert!(bodies.len() >= 5, "a seed per record type");
        for p in bodies {
            let data = std::fs::read(&p).unwrap();
            assert!(format::decode_body(&data).is_ok(), "{}", p.display());
        }
    }

    #[test]
    fn regressions_do_not_panic() {
        for p in files("regressions/read_capture") {
            let _ = reader::read_fuzz_input(&std::fs::read(&p).unwrap());
        }
        for p in files("regressions/decode_record") {
            let _ = format::decode_body(&std::fs::read(&p).unwrap());
        }
        let scratch = super::tests::TempDir::new("fuzz-report");
        for p in files("regressions/report_file") {
            crate::drivers::report::fuzz_report(
                &std::fs::read(&p).unwrap(),
                &scratch.0.join("f.ctt"),
            );
        }
    }
}
