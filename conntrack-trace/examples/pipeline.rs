//! The user-space half of a live trace on synthetic events, without a
//! kernel: ring records (the programs' `RawEvent` bytes) through the live
//! core's own [`Consumer`] — decode, the capture, [`Pipeline::feed`]
//! (aggregate + amplification), one sink — the code `trace` runs per
//! record. `cargo xtask bench pipeline` runs
//! it once per sink and divides the events by the CPU time it used.
//!
//! ```text
//! pipeline --sink none|human|ndjson|capture [--events N] [--sources K] [--out PATH]
//! ```
//!
//! The events are a DNS-like table-full flood: `--sources` client
//! addresses, each re-sending a query (same source port) a few times
//! before moving on, so the amplification detector sees retries as it
//! would in the incident. `--out` is where ndjson and the capture go
//! (default /dev/null; the capture needs a real path).

use std::{
    io::{BufWriter, Write as _},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace::{
    analysis::aggregate::DEFAULT_MAX_SOURCES,
    analysis::amplify::AmpConfig,
    analysis::filter::Filter,
    analysis::pipeline::Pipeline,
    drivers::live::{Consumer, Tap},
    formats::capture::{Header, Trailer, WriteOptions, Writer, format::FORMAT_VERSION},
    formats::output::{NetnsNames, Sink, human::Human, ndjson::Ndjson},
    kernel::error::TraceError,
    kernel::kstats::CtStats,
    model::event::Event,
    model::{KindCounts, Scope},
};
use conntrack_trace_common::{RawEvent, kind, l3};

struct Args {
    sink: String,
    events: u64,
    sources: u32,
    out: PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        sink: String::new(),
        events: 2_000_000,
        sources: 1_000,
        out: PathBuf::from("/dev/null"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--sink" => a.sink = value()?,
            "--events" => a.events = value()?.parse().context("--events")?,
            "--sources" => a.sources = value()?.parse().context("--sources")?,
            "--out" => a.out = value()?.into(),
            _ => bail!("unknown argument {flag}"),
        }
    }
    if a.sources == 0 {
        bail!("--sources must be at least 1");
    }
    Ok(a)
}

/// Ring records of a table-full flood: client `i % sources` sends query
/// `i / (sources * RETRIES)` from its own source port, each query
/// [`RETRIES`] times, 1 ms apart per client.
fn records(a: &Args) -> Vec<u8> {
    const RETRIES: u64 = 4;
    let size = std::mem::size_of::<RawEvent>();
    let mut out = Vec::with_capacity(a.events as usize * size);
    let sources = u64::from(a.sources);
    for i in 0..a.events {
        let client = (i % sources) as u32;
        let round = i / sources;
        let mut r = RawEvent::zeroed();
        r.ts_ns = 1_000_000_000 + round * 1_000_000;
        r.netns = 4026531840;
        r.cpu = (i & 1) as u32;
        r.kind = kind::TABLE_FULL;
        r.l3 = l3::IPV4;
        r.l4 = 17;
        let src = Ipv4Addr::from(0x0a00_0000 | client).octets();
        r.src[..4].copy_from_slice(&src);
        r.dst[..4].copy_from_slice(&[10, 1, 0, 53]);
        r.sport = 10_000 + ((round / RETRIES) % 50_000) as u16;
        r.dport = 53;
        // An IPv4 + UDP header, as the programs copy it.
        r.pkt[0] = 0x45;
        r.pkt[9] = 17;
        r.pkt[12..16].copy_from_slice(&src);
        r.pkt[16..20].copy_from_slice(&[10, 1, 0, 53]);
        r.pkt[20..22].copy_from_slice(&r.sport.to_be_bytes());
        r.pkt[22..24].copy_from_slice(&53u16.to_be_bytes());
        r.caplen = 60;
        r.wire_len = 60;
        // SAFETY: RawEvent is repr(C) plain-old-data without padding holes
        // (explicit pad fields, zeroed).
        let bytes = unsafe { std::slice::from_raw_parts((&raw const r).cast::<u8>(), size) };
        out.extend_from_slice(bytes);
    }
    out
}

/// Where the selected events go (the capture takes every event, as
/// `--write` does).
enum Out {
    None,
    Sink(Box<dyn Sink>),
    Capture(Box<Writer>),
}

/// The bench's [`Tap`]: the capture sees every event, a sink the selected.
struct BenchTap {
    out: Out,
    selected: u64,
}

impl Tap for BenchTap {
    fn record(&mut self, ev: &Event) {
        if let Out::Capture(w) = &mut self.out {
            w.event(ev);
        }
    }

    fn selected(&mut self, ev: &Event, names: &NetnsNames) -> Result<(), TraceError> {
        self.selected += 1;
        if let Out::Sink(s) = &mut self.out {
            s.event(ev, names)
                .map_err(TraceError::io("writing an event"))?;
        }
        Ok(())
    }
}

fn sink(a: &Args) -> Result<Out> {
    let file = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&a.out)
            .with_context(|| format!("opening {}", a.out.display()))
    };
    Ok(match a.sink.as_str() {
        "none" => Out::None,
        "human" => Out::Sink(Box::new(Human::new(std::io::sink(), false))),
        "ndjson" => Out::Sink(Box::new(Ndjson::new(BufWriter::with_capacity(
            1 << 16,
            file()?,
        )))),
        "capture" => {
            let opts = WriteOptions {
                path: a.out.clone(),
                force: true,
                max_size: None,
            };
            let w = Writer::create(opts, header()).map_err(|e| anyhow::anyhow!("{e}"))?;
            Out::Capture(Box::new(w))
        }
        other => bail!("--sink must be none, human, ndjson or capture, not {other:?}"),
    })
}

/// User + system CPU seconds of the whole process (the capture's I/O
/// thread included).
fn cpu_seconds() -> f64 {
    // SAFETY: all-zero is a valid rusage; getrusage fills it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(u.ru_utime) + s(u.ru_stime)
}

/// A `/proc/self/status` figure in KiB (0 if unreadable).
fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn header() -> Header {
    Header {
        format_version: FORMAT_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        hostname: "synthetic".into(),
        kernel_release: "none".into(),
        hooks: "synthetic".into(),
        evictions: "off".into(),
        start_unix_ns: 1_700_000_000_000_000_000,
        start_mono_ns: 1_000_000_000,
        capture_id: 1,
        seq: 0,
        scope: Scope {
            netns: "all".into(),
            netns_inode: None,
            namespaces: 1,
            uncovered: vec![],
        },
        filter: Default::default(),
        conntrack: vec![],
        kernel_start: [(4026531840, CtStats::default())].into(),
        backend_refused: vec![],
        per_packet: true,
        backend_name: Some("synthetic".into()),
    }
}

/// A trailer whose kernel counters agree with the events (every event a
/// table-full drop the kernel counted).
fn trailer(k: KindCounts) -> Trailer {
    Trailer {
        backend: "synthetic".into(),
        duration_s: 1.0,
        end_mono_ns: 2_000_000_000,
        events: k,
        matched: k,
        lost: KindCounts::default(),
        shed: KindCounts::default(),
        observed: k,
        complete: true,
        decode_errors: 0,
        kernel_end: [(
            4026531840,
            CtStats {
                drop: k.table_full,
                ..Default::default()
            },
        )]
        .into(),
        kernel: CtStats {
            drop: k.table_full,
            ..Default::default()
        },
        namespaces: 1,
        uncovered: vec![],
        events_written: k.table_full,
        unclassified_drops: 0,
        unmatched_drop_counts: 0,
        exact_top: None,
        exact_sources: 0,
    }
}

fn main() -> Result<()> {
    let a = args()?;
    let ring = records(&a);
    let tap = BenchTap {
        out: sink(&a)?,
        selected: 0,
    };
    let pipe = Pipeline::new(Filter::default(), DEFAULT_MAX_SOURCES, AmpConfig::default());
    let mut names = NetnsNames::new();
    names.insert(4026531840, "host".into());
    let mut c = Consumer::new(pipe, names, tap);
    let size = std::mem::size_of::<RawEvent>();
    let rss_start = rss_kib("VmRSS");
    let started = Instant::now();
    let cpu_start = cpu_seconds();
    for rec in ring.chunks_exact(size) {
        let e = c.decode(rec).context("decoding a synthetic record")?;
        c.handle(&e)?;
    }
    let selected = c.tap.selected;
    match std::mem::replace(&mut c.tap.out, Out::None) {
        Out::Capture(w) => {
            let k = KindCounts {
                table_full: a.events,
                ..Default::default()
            };
            w.finish(trailer(k)).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        // Flushed and closed inside the timed part, as at the end of a trace.
        out => drop(out),
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_start;
    // What the pipeline's tables took: the records were all in memory
    // before the loop began.
    let grown_kib = rss_kib("VmHWM").saturating_sub(rss_start);
    // What the consumer found, so that a broken pipeline cannot look fast.
    let amp = c.pipe.amp.summary();
    let top = c.pipe.agg.top(1);
    let top_src = top.first().and_then(|t| t.key().src);
    println!(
        "{{\"events\":{},\"selected\":{selected},\"seconds\":{elapsed:.6},\"cpu_seconds\":{cpu:.6},\"grown_kib\":{grown_kib},\"retransmissions\":{},\"top_src\":\"{}\"}}",
        a.events,
        amp.retransmissions,
        top_src.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    );
    std::io::stdout().flush()?;
    Ok(())
}
