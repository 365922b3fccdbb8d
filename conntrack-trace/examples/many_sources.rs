//! Writes a synthetic capture with many distinct sources through the real
//! capture writer, to measure what `report` holds in memory when there are
//! more sources than its source tables keep (issue 15: at most 64 MiB RSS
//! at 1 M distinct sources):
//!
//! ```text
//! cargo build --release -p conntrack-trace --bin conntrack-trace --example many_sources
//! target/release/examples/many_sources /tmp/many.ctt 1000000
//! /usr/bin/time -v target/release/conntrack-trace report /tmp/many.ctt >/dev/null
//! ```
//!
//! Every one of DISTINCT sources (default 1 000 000; IPv4 10.0.0.0/8, every
//! fourth one IPv6 fd00::/64) is dropped once (`table_full`, udp/53). Once
//! half of them were seen, every 32nd event comes from one of four heavy
//! sources (10.255.0.1-4) instead, whose TCP SYNs to port 80 are each
//! dropped four times: they are the top sources and should be flagged for
//! amplification, whatever the churn of one-off sources around them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::ExitCode,
};

use conntrack_trace::{
    formats::capture::{self, WriteOptions, Writer, format::RecordedFilter},
    kernel::kstats::CtStats,
    model::event::{Event, Kind, Packet, Proto},
    model::{KindCounts, Scope},
};

/// Heavy sources; once half the one-off sources were seen, every
/// `HEAVY_EVERY`-th event is theirs (so a table that keeps whoever came
/// first is already full of one-off sources when they arrive).
const HEAVY: u64 = 4;
const HEAVY_EVERY: u64 = 32;
/// Drops of each heavy flow (the first plus three retransmissions).
const ATTEMPTS: u64 = 4;

/// The capture's events, in order: `distinct` one-off sources and the
/// heavy ones among the second half of them.
fn events(distinct: u64) -> impl Iterator<Item = Event> {
    let heavy_from = distinct / 2;
    let (mut one_off, mut heavy) = (0u64, 0u64);
    (0u64..).map_while(move |i| {
        let ts_ns = 1_000_000_000 + i * 1_000;
        let (src, sport, dport, proto) = if one_off >= heavy_from && i % HEAVY_EVERY == 0 {
            let flow = (heavy / HEAVY) / ATTEMPTS;
            let src = IpAddr::V4(Ipv4Addr::new(10, 255, 0, 1 + (heavy % HEAVY) as u8));
            heavy += 1;
            (src, 1024 + (flow % 60_000) as u16, 80, Proto::TCP)
        } else if one_off < distinct {
            let n = one_off;
            one_off += 1;
            let src = if n % 4 == 3 {
                IpAddr::V6(Ipv6Addr::new(
                    0xfd00,
                    0,
                    0,
                    0,
                    0,
                    0,
                    (n >> 16) as u16,
                    n as u16,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (n as u32 & 0x00ff_ffff)))
            };
            (src, 1024 + (n % 60_000) as u16, 53, Proto::UDP)
        } else {
            return None;
        };
        let dst = match src {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 53)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 53)),
        };
        Some(Event {
            kind: Kind::TableFull,
            ts_ns,
            cpu: (i % 2) as u32,
            netns: 4026531840,
            proto,
            src: Some(src),
            dst: Some(dst),
            sport,
            dport,
            reply: None,
            packet: Packet::EMPTY,
            sample: 1,
        })
    })
}

fn header() -> capture::Header {
    capture::Header {
        format_version: capture::format::FORMAT_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        hostname: "many-sources".into(),
        kernel_release: capture::kernel_release(),
        hooks: "synthetic".into(),
        evictions: "on".into(),
        start_unix_ns: 1_700_000_000_000_000_000,
        start_mono_ns: 1_000_000_000,
        capture_id: 15,
        seq: 0,
        scope: Scope {
            netns: "all".into(),
            netns_inode: None,
            namespaces: 1,
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

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(path), distinct) = (args.next(), args.next()) else {
        eprintln!("usage: many_sources PATH [DISTINCT]");
        return ExitCode::from(2);
    };
    let distinct: u64 = match distinct.map(|d| d.parse()) {
        None => 1_000_000,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            eprintln!("many_sources: DISTINCT: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = WriteOptions {
        path: PathBuf::from(&path),
        force: true,
        max_size: None,
    };
    let mut w = match Writer::create(opts, header()) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("many_sources: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut counts = KindCounts::default();
    let mut n = 0u64;
    for e in events(distinct) {
        *counts.get_mut(e.kind) += 1;
        w.event(&e);
        n += 1;
    }
    let trailer = capture::Trailer {
        backend: "synthetic".into(),
        duration_s: n as f64 / 1e6,
        end_mono_ns: 1_000_000_000 + n * 1_000,
        events: counts,
        matched: counts,
        lost: Default::default(),
        shed: Default::default(),
        observed: counts,
        complete: true,
        decode_errors: 0,
        kernel_end: Default::default(),
        kernel: CtStats::default(),
        namespaces: 1,
        uncovered: vec![],
        events_written: n,
        unclassified_drops: 0,
        unmatched_drop_counts: 0,
        exact_top: None,
        exact_sources: 0,
    };
    if let Err(e) = w.finish(trailer) {
        eprintln!("many_sources: {e}");
        return ExitCode::FAILURE;
    }
    println!("{path}: {n} events, {distinct} one-off sources and {HEAVY} heavy ones");
    ExitCode::SUCCESS
}
