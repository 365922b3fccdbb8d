//! A live `trace` session: load, attach, stream events through the filters
//! into the aggregator and the output, and summarise against the kernel's
//! own counters at the end.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    aggregate::{Aggregator, KindCounts},
    amplify::{AmpConfig, Detector, Finding},
    backend::{self, Choice},
    capture::{self, Writer, format::NsFill},
    clock::Clock,
    error::TraceError,
    event::{Event, Kind},
    filter::Filter,
    kstats::{self, CtStats, Fill},
    netns::{self, NetnsInfo},
    output::{LiveView, NetnsNames, Scope, Sink, Summary, top_sources},
};

pub struct TraceOptions {
    pub duration: Option<Duration>,
    pub interval: Duration,
    pub top: usize,
    /// `--netns` as given (resolved at start).
    pub netns: Option<String>,
    pub filter: Filter,
    pub ready_file: Option<PathBuf>,
    /// `--backend`.
    pub choice: Choice,
    pub backend: backend::Options,
    pub max_sources: usize,
    pub amp: AmpConfig,
    /// `--write FILE`: record every event to a capture file.
    pub write: Option<capture::WriteOptions>,
}

/// Events drained from the ring per wakeup before the loop looks at its
/// timers again (keeps Ctrl-C and the header responsive under a flood).
const DRAIN_BATCH: usize = 65_536;

/// How long the consumer waits after draining the ring before it polls
/// again, for a ring of `ring_bytes`.
///
/// The programs submit with adaptive wakeup (kernel/bpf/ringbuf.c,
/// `bpf_ringbuf_commit()`): a record wakes the reader only when the reader
/// had consumed everything before it. A reader that keeps up and goes
/// straight back to epoll is therefore woken once per record, and each
/// wakeup costs the dropping CPU an irq_work (a self-IPI, which exits to
/// the hypervisor on a VM) — measured 4–5 µs per emitting run in a flood
/// instead of ~1 µs (issue 15). Waiting a little after each drain lets a
/// flood batch up: one wakeup per wait, whatever the rate. The wait is
/// bounded so that the ring cannot fill meanwhile: a quarter of the time
/// the ring takes to fill at 2 M events/s (beyond any rate measured here),
/// at most 5 ms (the latency of a lone event is unchanged: it still wakes
/// the reader at once). Small rings (`--ring-size`) get no wait.
pub fn ring_pause(ring_bytes: u32) -> Duration {
    // A record is the event plus the ring's 8-byte header, rounded to 8.
    const RECORD: u64 = (std::mem::size_of::<conntrack_trace_common::RawEvent>() as u64 + 8 + 7) & !7;
    const FAST_EVENTS_PER_S: u64 = 2_000_000;
    let fill_ns = u64::from(ring_bytes) / RECORD * 1_000_000_000 / FAST_EVENTS_PER_S;
    let pause = Duration::from_nanos(fill_ns / 4).min(Duration::from_millis(5));
    if pause < Duration::from_micros(500) {
        Duration::ZERO
    } else {
        pause
    }
}

struct Consumer<'s> {
    sink: &'s mut dyn Sink,
    filter: Filter,
    agg: Aggregator,
    amp: Detector,
    received: KindCounts,
    decode_errors: u64,
    names: NetnsNames,
    unknown_netns: bool,
    /// stdout went away (EPIPE): stop quietly.
    closed: bool,
    /// `--write`: every event read from the ring, before filters.
    writer: Option<Writer>,
    /// The writer's I/O error was reported.
    write_warned: bool,
}

impl Consumer<'_> {
    /// Reads up to `limit` records; returns how many were read.
    fn drain(&mut self, ring: &mut RingBuf<MapData>, limit: usize) -> Result<usize, TraceError> {
        let mut n = 0;
        while n < limit {
            let Some(item) = ring.next() else { break };
            n += 1;
            let ev = match Event::decode(&item) {
                Ok(ev) => ev,
                Err(_) => {
                    self.decode_errors += 1;
                    continue;
                }
            };
            drop(item);
            self.handle(&ev)?;
        }
        Ok(n)
    }

    fn handle(&mut self, ev: &Event) -> Result<(), TraceError> {
        *self.received.get_mut(ev.kind) += 1;
        if let Some(w) = &mut self.writer {
            w.event(ev);
        }
        if !self.filter.matches(ev) {
            return Ok(());
        }
        self.agg.record(ev);
        self.amp.record(ev);
        if !self.names.contains_key(&ev.netns) {
            self.unknown_netns = true;
        }
        if self.closed {
            return Ok(());
        }
        match self.sink.event(ev, &self.names) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err(TraceError::Io {
                context: "writing output".into(),
                source: e,
            }),
        }
    }
}

impl Consumer<'_> {
    /// Writes findings that are new or changed since the last report.
    fn report_findings(&mut self, clock: &Clock) -> Result<(), TraceError> {
        let changed: Vec<Finding> = self.amp.take_changed(clock);
        for f in &changed {
            if self.closed {
                break;
            }
            match self.sink.finding(f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => self.closed = true,
                Err(e) => {
                    return Err(TraceError::Io {
                        context: "writing output".into(),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Names (and containers/pods, see [`crate::workload`]) of `list`.
fn names_of(list: &BTreeMap<u32, NetnsInfo>) -> NetnsNames {
    crate::workload::names_of(list)
}

fn fills(scope: &[NetnsInfo]) -> Vec<(String, Fill)> {
    let mut v: Vec<(String, Fill)> = scope
        .iter()
        .filter_map(|ns| match netns::in_netns(&ns.path, kstats::read_fill) {
            Ok(Some(f)) => Some((ns.name.clone(), f)),
            _ => None,
        })
        .collect();
    v.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
    if scope.len() > 1 {
        // Show only namespaces that use conntrack (plus the fullest one).
        let first = v.first().cloned();
        v.retain(|(_, f)| f.count > 0);
        if v.is_empty() {
            v.extend(first);
        }
    }
    v
}

pub async fn run(mut opts: TraceOptions, sink: &mut dyn Sink) -> Result<Summary, TraceError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(TraceError::io("reading /proc/self/status"))?;
    crate::error::check_privileges(&status)?;
    if let Some(w) = &opts.write {
        // Fail on an existing file before loading anything.
        capture::writer::precheck(w).map_err(|e| TraceError::Usage(e.to_string()))?;
    }

    let all = crate::workload::named(netns::list());
    let (scope, scope_desc) = match &opts.netns {
        Some(spec) => {
            let ns = crate::workload::named_one(netns::resolve(spec)?);
            opts.filter.netns = Some(ns.inode);
            let d = Scope {
                netns: ns.name.clone(),
                netns_inode: Some(ns.inode),
                namespaces: 1,
            };
            (vec![ns], d)
        }
        None => {
            let v: Vec<NetnsInfo> = all.values().cloned().collect();
            let n = v.len();
            (
                v,
                Scope {
                    netns: "all".into(),
                    netns_inode: None,
                    namespaces: n,
                },
            )
        }
    };

    // The kernel's counters bracket the attach period: read before attach
    // and after detach, so their delta and our counters cover one window.
    let start_stats = kstats::snapshot(&scope);
    let (mut tp, refused) = backend::open(opts.choice, &opts.backend, &scope)?;
    let backend_desc = tp.describe();
    let evictions_desc = tp.evictions().describe();
    let per_packet = tp.per_packet();
    eprintln!("{}", selection_line(&backend_desc, &refused));
    if !per_packet
        && (opts.filter.proto.is_some() || opts.filter.port.is_some() || opts.filter.src.is_some())
    {
        eprintln!(
            "conntrack-trace: note: --proto/--port/--src do not apply to the counters backend (no per-packet attribution)"
        );
    }
    let ring = tp.take_ring()?;
    let start_unix_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let start_mono_ns = monotonic_ns();
    let clock = Clock {
        start_unix_ns,
        start_mono_ns,
    };
    let started = Instant::now();

    let writer = match opts.write.take() {
        None => None,
        Some(w) => {
            let header = capture::Header {
                format_version: capture::format::FORMAT_VERSION,
                tool_version: env!("CARGO_PKG_VERSION").into(),
                hostname: capture::hostname(),
                kernel_release: capture::kernel_release(),
                backend: backend_desc.clone(),
                evictions: evictions_desc.clone(),
                start_unix_ns,
                start_mono_ns,
                capture_id: start_unix_ns as u64 ^ (u64::from(std::process::id()) << 40),
                seq: 0,
                scope: scope_desc.clone(),
                filter: capture::format::RecordedFilter::of(&opts.filter),
                conntrack: scope
                    .iter()
                    .filter_map(|ns| match netns::in_netns(&ns.path, kstats::read_fill) {
                        Ok(Some(fill)) => Some(NsFill {
                            netns: ns.name.clone(),
                            inode: ns.inode,
                            fill,
                        }),
                        _ => None,
                    })
                    .collect(),
                kernel_start: start_stats.clone(),
                backend_refused: refused.clone(),
                per_packet,
            };
            Some(Writer::create(w, header).map_err(|e| TraceError::Usage(e.to_string()))?)
        }
    };

    let mut consumer = Consumer {
        sink,
        filter: opts.filter.clone(),
        agg: Aggregator::new(opts.max_sources),
        amp: Detector::new(opts.amp.clone()),
        received: KindCounts::default(),
        decode_errors: 0,
        names: names_of(&all),
        unknown_netns: false,
        closed: false,
        writer,
        write_warned: false,
    };
    if let Some(w) = &mut consumer.writer {
        w.names(&consumer.names);
    }

    let mut sigint =
        signal(SignalKind::interrupt()).map_err(TraceError::io("installing SIGINT handler"))?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(TraceError::io("installing SIGTERM handler"))?;
    // Ready only once SIGINT/SIGTERM are handled and the capture file is
    // open: a script that signals right after the file appears must get a
    // summary (and a finished capture), not a dead process.
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, b"ready\n")
            .map_err(TraceError::io(format!("--ready-file {}", path.display())))?;
    }
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + opts.interval, opts.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = Instant::now();

    let mut last_seen = KindCounts::default();
    let pause = ring_pause(opts.backend.ring_bytes);
    let mut afd = match ring {
        Some(ring) => Some(
            // SAFETY: the AsyncFd owns the ring (and so its fd) until
            // into_inner() below; nothing else closes the fd meanwhile.
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                TraceError::Io {
                    context: "polling the ring buffer".into(),
                    source: e.into(),
                }
            })?,
        ),
        None => None,
    };
    loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
            _ = ticker.tick() => {
                if let Some(afd) = afd.as_mut() {
                    consumer.drain(afd.get_mut(), usize::MAX)?;
                }
                let counters = tp.counters()?;
                if !per_packet {
                    // Totals only: the kernel's counters feed the totals
                    // and rates, no sources.
                    consumer.agg.record_totals(&counters.seen.sub(&last_seen));
                    last_seen = counters.seen;
                }
                let now = Instant::now();
                consumer.agg.tick(now - last_tick);
                last_tick = now;
                if consumer.unknown_netns || crate::workload::wants_refresh() {
                    consumer.names = names_of(&netns::list());
                    consumer.unknown_netns = false;
                }
                if let Some(w) = &mut consumer.writer {
                    w.names(&consumer.names);
                    w.flush();
                    if !consumer.write_warned && let Some(e) = w.failed() {
                        // Keep tracing live; the file keeps what it has.
                        eprintln!("conntrack-trace: warning: {e}; recording stopped, live output continues");
                        consumer.write_warned = true;
                    }
                }
                let f = fills(&scope);
                consumer.report_findings(&clock)?;
                let findings = consumer.amp.findings(&clock);
                let amp = consumer.amp.summary();
                let view = LiveView {
                    backend: &backend_desc,
                    refused: &refused,
                    per_packet,
                    evictions: &evictions_desc,
                    elapsed_s: started.elapsed().as_secs_f64(),
                    fills: &f,
                    agg: &consumer.agg,
                    lost: counters.lost,
                    rule_drops: (tp.name() == backend::Name::Tracepoint)
                        .then_some(counters.seen.rule_drop),
                    top_n: opts.top,
                    findings: &findings,
                    amp: &amp,
                };
                if !consumer.closed
                    && let Err(e) = consumer.sink.tick(&view) {
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            consumer.closed = true;
                        } else {
                            return Err(TraceError::Io { context: "writing output".into(), source: e });
                        }
                    }
                if consumer.closed { break; }
            }
            guard = async { afd.as_mut().expect("guarded by the precondition").readable_mut().await }, if afd.is_some() => {
                let mut guard = guard.map_err(TraceError::io("polling the ring buffer"))?;
                let n = consumer.drain(guard.get_inner_mut(), DRAIN_BATCH)?;
                if n < DRAIN_BATCH {
                    guard.clear_ready();
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                if consumer.closed { break; }
            }
        }
    }
    let mut ring = afd.map(AsyncFd::into_inner);

    // Stop the producers first, then take everything they left behind, so
    // that events + lost == observed holds exactly.
    tp.detach();
    let duration_s = started.elapsed().as_secs_f64();
    if let Some(ring) = ring.as_mut() {
        consumer.drain(ring, usize::MAX)?;
    }
    let counters = tp.counters()?;
    let end_stats = kstats::snapshot(&scope);
    let mut kernel = CtStats::default();
    let mut covered = 0;
    for (ino, end) in &end_stats {
        if let Some(start) = start_stats.get(ino) {
            kernel.add(&end.delta(start));
            covered += 1;
        }
    }
    consumer.report_findings(&clock)?;
    // Without events (counters backend) nothing is complete.
    let complete = per_packet
        && Kind::ALL
            .iter()
            .all(|k| consumer.received.get(*k) + counters.lost.get(*k) == counters.seen.get(*k));
    let summary = Summary {
        kind: "summary",
        version: env!("CARGO_PKG_VERSION").into(),
        backend: tp.name().as_str().into(),
        hooks: backend_desc,
        backend_refused: refused,
        per_packet,
        evictions: evictions_desc,
        duration_s,
        start_unix_ns,
        start_mono_ns,
        events: consumer.received,
        matched: if per_packet {
            consumer.agg.totals
        } else {
            KindCounts::default()
        },
        lost: counters.lost,
        observed: counters.seen,
        complete,
        kernel,
        unclassified_drops: counters.unclassified,
        unmatched_drop_counts: counters.drop_unmatched,
        scope: Scope {
            namespaces: covered,
            ..scope_desc
        },
        decode_errors: consumer.decode_errors,
        top: top_sources(&consumer.agg, opts.top),
        untracked_sources: consumer.agg.untracked,
        amplification: consumer.amp.summary(),
        findings: consumer.amp.findings(&clock),
    };
    let capture_result = consumer.writer.take().map(|w| {
        let files = w.files();
        let written = w.events_written();
        let trailer = capture::Trailer {
            backend: summary.backend.clone(),
            duration_s,
            end_mono_ns: monotonic_ns(),
            events: summary.events,
            matched: summary.matched,
            lost: summary.lost,
            observed: summary.observed,
            complete: summary.complete,
            decode_errors: summary.decode_errors,
            kernel_end: end_stats.clone(),
            kernel: summary.kernel,
            namespaces: summary.scope.namespaces,
            events_written: written,
            unclassified_drops: summary.unclassified_drops,
            unmatched_drop_counts: summary.unmatched_drop_counts,
        };
        w.finish(trailer).map(|()| (files, written))
    });
    if !consumer.closed {
        match consumer.sink.finish(&summary) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                return Err(TraceError::Io {
                    context: "writing output".into(),
                    source: e,
                });
            }
        }
    }
    match capture_result {
        None => {}
        Some(Ok((files, written))) => {
            eprintln!("conntrack-trace: recorded {written} events in {files} file(s)")
        }
        Some(Err(e)) => return Err(TraceError::Other(e.to_string())),
    }
    Ok(summary)
}

/// The stderr line that says which backend runs and why `auto` passed over
/// the ones before it.
pub fn selection_line(desc: &str, refused: &[backend::Refusal]) -> String {
    let mut s = format!("conntrack-trace: backend {desc}");
    for r in refused {
        s.push_str(&format!("; {} refused: {}", r.backend.as_str(), r.reason));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Name, Refusal};

    #[test]
    fn selection_line_names_every_refusal() {
        let refused = [Refusal {
            backend: Name::Fexit,
            reason: "kernel refused to attach program `ct_confirm_enter` to fentry/__nf_conntrack_confirm: Operation not permitted (os error 1)".into(),
        }];
        assert_eq!(
            selection_line("tracepoint (tp_btf/kfree_skb)", &refused),
            "conntrack-trace: backend tracepoint (tp_btf/kfree_skb); fexit refused: kernel refused to attach program `ct_confirm_enter` to fentry/__nf_conntrack_confirm: Operation not permitted (os error 1)"
        );
        assert_eq!(
            selection_line("fexit (fexit/nf_ct_delete)", &[]),
            "conntrack-trace: backend fexit (fexit/nf_ct_delete)"
        );
    }

    #[test]
    fn ring_pause_never_lets_the_ring_fill() {
        // The default 8 MiB ring holds ~50 000 records: 25 ms at 2 M/s.
        assert_eq!(ring_pause(8 << 20), Duration::from_millis(5));
        // 1 MiB: 6241 records, 3.1 ms to fill at 2 M/s, a quarter of it.
        assert_eq!(ring_pause(1 << 20), Duration::from_nanos(780_125));
        // A page (the tiny-ring test): 24 records, no wait at all.
        assert_eq!(ring_pause(4096), Duration::ZERO);
        assert_eq!(ring_pause(64 << 10), Duration::ZERO);
    }
}
