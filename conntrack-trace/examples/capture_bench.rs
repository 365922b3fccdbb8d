//! Capture throughput (`cargo xtask bench capture` runs this in release
//! mode): synthetic events through the real writer, then the real reader.
//!
//! Figures printed: bytes per event, events/s through the live pipeline
//! with and without `--write` (decode, filter, aggregate, ndjson — what
//! the ring consumer does per event), events/s of the writer alone (the
//! consumer's share, and until the I/O thread has synced the file),
//! events/s read by `report` and by `export --format pcapng`, and the size
//! of the capture.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Instant,
};

use conntrack_trace::{
    analysis::aggregate::{Aggregator, DEFAULT_MAX_SOURCES},
    analysis::filter::Filter,
    drivers::export,
    drivers::offline::OfflineSpec,
    drivers::report,
    formats::capture::{self, WriteOptions, Writer, format::RecordedFilter},
    formats::output::{NetnsNames, Sink, ndjson::Ndjson},
    kernel::kstats::CtStats,
    model::Scope,
    model::event::Event,
};
use conntrack_trace_common::{RawEvent, kind, l3};

/// A DNS-flood-like mix: 80 % IPv4 UDP/53 table_full with a 49..76-byte
/// packet, 10 % IPv6, 10 % evictions (no packet).
fn raw(i: u64) -> RawEvent {
    let mut r = RawEvent::zeroed();
    r.ts_ns = 1_000_000_000 + i * 1_000;
    r.netns = 4026532000 + (i % 4) as u32;
    r.cpu = (i % 2) as u32;
    r.l4 = 17;
    r.sport = 1024 + (i % 60_000) as u16;
    r.dport = 53;
    let sel = i % 10;
    r.kind = if sel == 9 {
        kind::EARLY_DROP
    } else {
        kind::TABLE_FULL
    };
    if sel == 8 {
        r.l3 = l3::IPV6;
        r.src = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, (i >> 16) as u16, i as u16).octets();
        r.dst = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1).octets();
    } else {
        r.l3 = l3::IPV4;
        r.src[..4].copy_from_slice(&Ipv4Addr::from(0x0a00_0000 | (i as u32 % 5000)).octets());
        r.dst[..4].copy_from_slice(&[10, 0, 0, 53]);
    }
    if r.kind != kind::EARLY_DROP {
        let n = if r.l3 == l3::IPV6 {
            69 + (i % 27)
        } else {
            49 + (i % 28)
        } as usize;
        for (j, b) in r.pkt[..n].iter_mut().enumerate() {
            *b = (j as u64 ^ i) as u8;
        }
        r.caplen = n as u16;
        r.wire_len = n as u32;
    }
    r
}

fn bytes_of(r: &RawEvent) -> &[u8] {
    // SAFETY: RawEvent is repr(C) plain old data without padding holes
    // (explicit _pad fields); reading its bytes is sound.
    unsafe {
        std::slice::from_raw_parts((r as *const RawEvent).cast::<u8>(), size_of::<RawEvent>())
    }
}

fn header() -> capture::Header {
    capture::Header {
        format_version: capture::format::FORMAT_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        hostname: capture::hostname(),
        kernel_release: capture::kernel_release(),
        hooks: "synthetic".into(),
        evictions: "on".into(),
        start_unix_ns: 1_700_000_000_000_000_000,
        start_mono_ns: 1_000_000_000,
        capture_id: 1,
        seq: 0,
        scope: Scope {
            netns: "all".into(),
            netns_inode: None,
            namespaces: 4,
            uncovered: vec![],
        },
        filter: RecordedFilter::default(),
        conntrack: vec![],
        kernel_start: Default::default(),
        backend_refused: vec![],
        per_packet: true,
        backend_name: None,
    }
}

/// The ring consumer's per-event work (trace.rs `Consumer::handle`),
/// optionally writing the capture. Returns seconds.
fn pipeline(raws: &[Vec<u8>], writer: Option<&mut Writer>) -> f64 {
    let filter = Filter::default();
    let mut agg = Aggregator::new(DEFAULT_MAX_SOURCES);
    let names = NetnsNames::new();
    let mut sink = Ndjson::new(std::io::BufWriter::with_capacity(1 << 16, std::io::sink()));
    let t = Instant::now();
    let mut w = writer;
    for b in raws {
        let Ok(e) = Event::decode(b) else { continue };
        if let Some(w) = w.as_deref_mut() {
            w.event(&e);
        }
        if filter.matches(&e) {
            agg.record(&e);
            let _ = sink.event(&e, &names);
        }
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("ctt-capture-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("bench.ctt");
    let raws: Vec<Vec<u8>> = (0..n).map(|i| bytes_of(&raw(i)).to_vec()).collect();
    let events: Vec<Event> = raws.iter().filter_map(|b| Event::decode(b).ok()).collect();
    let mut counts = conntrack_trace::model::KindCounts::default();
    for e in &events {
        *counts.get_mut(e.kind) += 1;
    }
    let opts = |p: PathBuf| WriteOptions {
        path: p,
        force: true,
        max_size: None,
    };
    let trailer = |written| capture::Trailer {
        backend: "synthetic".into(),
        duration_s: n as f64 / 1e6,
        end_mono_ns: 0,
        events: counts,
        matched: counts,
        lost: Default::default(),
        shed: Default::default(),
        observed: counts,
        complete: true,
        decode_errors: 0,
        kernel_end: Default::default(),
        kernel: CtStats::default(),
        namespaces: 4,
        uncovered: vec![],
        events_written: written,
        unclassified_drops: 0,
        unmatched_drop_counts: 0,
        exact_top: None,
        exact_sources: 0,
    };

    // 1. Live pipeline without and with the writer.
    let base = pipeline(&raws, None);
    let mut w = Writer::create(opts(dir.join("pipe.ctt")), header()).expect("writer");
    let with = pipeline(&raws, Some(&mut w));
    w.finish(trailer(n)).expect("finish");

    // 2. The writer alone: encode time, and until the file is synced.
    let t = Instant::now();
    let mut w = Writer::create(opts(path.clone()), header()).expect("writer");
    for e in &events {
        w.event(e);
    }
    let encode_s = t.elapsed().as_secs_f64();
    w.finish(trailer(events.len() as u64)).expect("finish");
    let write_s = t.elapsed().as_secs_f64();
    let size = std::fs::metadata(&path).expect("capture").len();

    // 3. Reading: report and pcapng export.
    let paths = vec![path.clone()];
    let t = Instant::now();
    let r = report::build(&paths, &OfflineSpec::default(), 10, |_, _, _| {}).expect("report");
    let report_s = t.elapsed().as_secs_f64();
    assert_eq!(r.summary.events.total(), n, "report read every event");
    let t = Instant::now();
    let sink = std::io::BufWriter::new(std::io::sink());
    let (_, stats) = export::pcapng::export(
        conntrack_trace::formats::capture::open_set(&paths).expect("open"),
        &OfflineSpec::default(),
        sink,
    )
    .expect("pcapng");
    let pcap_s = t.elapsed().as_secs_f64();

    let per_s = |secs: f64| n as f64 / secs;
    println!(
        "capture benchmark, {n} synthetic events (80% IPv4 UDP 49-76 B packets, 10% IPv6, 10% evictions):"
    );
    println!(
        "  capture size               {size} bytes ({:.1} MiB), {:.1} bytes/event",
        size as f64 / (1 << 20) as f64,
        size as f64 / n as f64
    );
    println!(
        "  live pipeline, no --write  {:>12.0} events/s",
        per_s(base)
    );
    println!(
        "  live pipeline, --write     {:>12.0} events/s ({:+.0} ns/event)",
        per_s(with),
        (with - base) / n as f64 * 1e9
    );
    println!(
        "  writer (consumer side)     {:>12.0} events/s",
        per_s(encode_s)
    );
    println!(
        "  writer (to synced file)    {:>12.0} events/s",
        per_s(write_s)
    );
    println!(
        "  report reads               {:>12.0} events/s ({:.2} s)",
        per_s(report_s),
        report_s
    );
    println!(
        "  export pcapng              {:>12.0} events/s ({} packets)",
        per_s(pcap_s),
        stats.packets
    );
    let _ = std::fs::remove_dir_all(&dir);
}
