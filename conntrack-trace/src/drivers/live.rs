//! What the two live drivers share — `trace` ([`crate::drivers::trace`]) and
//! `agent` ([`crate::drivers::agent`]): opening the backend between the kernel's
//! start counters and the first attach, the ring drained into a callback,
//! the session facts and capture header, and the end of a session (detach,
//! last drain, end counters). Each driver keeps only what differs: where
//! results go.

use std::time::{Duration, Instant, SystemTime};

use std::collections::BTreeMap;

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    analysis::filter::Filter,
    analysis::pipeline::Pipeline,
    formats::capture::{self, format::NsFill},
    formats::outfile::{FileId, Input, ReadyFile},
    formats::output::{NsView, pipe::diag},
    kernel::backend::{self, Backend, BpfCounters, Choice, bpflog},
    kernel::error::TraceError,
    kernel::kstats::Uncovered,
    kernel::kstats::{self, CtStats},
    kernel::netns::{self, NetnsInfo},
    kernel::workload::{self, NetnsNames},
    model::clock::Clock,
    model::event::{Event, Kind},
    model::{KindCounts, Refusal, Scope, SessionFacts, Totals},
};

/// Events drained from the ring per wakeup before the loop looks at its
/// timers again (keeps signals and the header responsive under a flood).
pub const DRAIN_BATCH: usize = 65_536;

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
/// the ring takes to fill at `max_events_per_s` — what the event budget
/// lets through from every CPU, else 2 M events/s (beyond any rate
/// measured here) — at most 5 ms (the latency of a lone event is
/// unchanged: it still wakes the reader at once). Small rings
/// (`--ring-size`) get no wait. (Sizing the wait from 2 M/s with the
/// budget's smaller default ring doubled the wakeups, and each costs the
/// dropping CPU an irq_work: 0.81 → 0.68 of the drop rate in the same
/// rounds, issue 21.)
pub fn ring_pause(ring_bytes: u32, max_events_per_s: u64) -> Duration {
    // A record is the event plus the ring's 8-byte header, rounded to 8.
    const RECORD: u64 =
        (std::mem::size_of::<conntrack_trace_common::RawEvent>() as u64 + 8 + 7) & !7;
    const FAST_EVENTS_PER_S: u64 = 2_000_000;
    // 0: no budget, no bound.
    let rate = match max_events_per_s {
        0 => FAST_EVENTS_PER_S,
        r => r.min(FAST_EVENTS_PER_S),
    };
    let fill_ns = u64::from(ring_bytes) / RECORD * 1_000_000_000 / rate;
    let pause = Duration::from_nanos(fill_ns / 4).min(Duration::from_millis(5));
    if pause < Duration::from_micros(500) {
        Duration::ZERO
    } else {
        pause
    }
}

/// The backend's ring, polled by tokio, with what draining it needs.
pub struct Ring {
    fd: AsyncFd<RingBuf<MapData>>,
    pause: Duration,
    /// `--ring-wakeup poll`: drain every this often (the programs wake the
    /// reader only past half a ring).
    poll: Option<Duration>,
    /// The last poll drained a full batch.
    backlog: bool,
}

/// The most events per second the programs can send: the budget from
/// every CPU, or unbounded (0) without one.
fn max_event_rate(opts: &backend::Options) -> u64 {
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u64);
    u64::from(opts.event_budget) * cpus
}

impl Ring {
    /// Takes the backend's ring (none for the counters backend).
    pub fn take(tp: &mut Backend, opts: &backend::Options) -> Result<Option<Ring>, TraceError> {
        let ring_bytes = opts.ring_bytes;
        let Some(r) = tp.take_ring()? else {
            return Ok(None);
        };
        // SAFETY: the AsyncFd owns the ring (and so its fd) until
        // into_inner() in `end`; nothing else closes the fd.
        let fd = unsafe { AsyncFd::register_with_interest(r, Interest::READABLE) }
            .map_err(|e| TraceError::io("polling the ring buffer")(e.into()))?;
        Ok(Some(Ring {
            fd,
            pause: ring_pause(ring_bytes, max_event_rate(opts)),
            // `--ring-wakeup poll`: the same wait, at least 1 ms.
            poll: (opts.ring_wakeup == backend::RingWakeup::Poll).then(|| {
                ring_pause(ring_bytes, max_event_rate(opts)).max(Duration::from_millis(1))
            }),
            backlog: false,
        }))
    }

    /// Hands up to `limit` records to `c`; returns how many were read.
    pub fn drain<T: Tap>(
        &mut self,
        limit: usize,
        c: &mut Consumer<T>,
    ) -> Result<usize, TraceError> {
        drain(self.fd.get_mut(), limit, c)
    }

    /// Waits until the ring has records, drains a batch into `c`, and —
    /// when the ring ran dry — pauses (see [`ring_pause`]) before the
    /// next wait. Never returns for no ring (the counters backend).
    pub async fn next_batch<T: Tap>(
        ring: &mut Option<Ring>,
        c: &mut Consumer<T>,
    ) -> Result<(), TraceError> {
        let Some(ring) = ring.as_mut() else {
            return std::future::pending().await;
        };
        if let Some(period) = ring.poll {
            // A full batch last time: more is waiting, take it now.
            if ring.backlog {
                ring.backlog = drain(ring.fd.get_mut(), DRAIN_BATCH, c)? == DRAIN_BATCH;
                return Ok(());
            }
            // A forced wakeup (the ring past half full) or the period.
            match tokio::time::timeout(period, ring.fd.readable_mut()).await {
                Ok(guard) => {
                    let mut guard = guard.map_err(TraceError::io("polling the ring buffer"))?;
                    if drain(guard.get_inner_mut(), DRAIN_BATCH, c)? < DRAIN_BATCH {
                        guard.clear_ready();
                    }
                }
                Err(_) => {
                    ring.backlog = drain(ring.fd.get_mut(), DRAIN_BATCH, c)? == DRAIN_BATCH;
                }
            }
            return Ok(());
        }
        let mut guard = ring
            .fd
            .readable_mut()
            .await
            .map_err(TraceError::io("polling the ring buffer"))?;
        let n = drain(guard.get_inner_mut(), DRAIN_BATCH, c)?;
        if n < DRAIN_BATCH {
            guard.clear_ready();
            if !ring.pause.is_zero() {
                tokio::time::sleep(ring.pause).await;
            }
        }
        Ok(())
    }
}

fn drain<T: Tap>(
    ring: &mut RingBuf<MapData>,
    limit: usize,
    c: &mut Consumer<T>,
) -> Result<usize, TraceError> {
    let mut n = 0;
    while n < limit {
        let Some(item) = ring.next() else { break };
        n += 1;
        let ev = c.decode(&item);
        // The record goes back to the ring before the event is handled.
        drop(item);
        if let Some(ev) = ev {
            c.handle(&ev)?;
        }
    }
    Ok(n)
}

/// What a driver does with the ring's events beyond the shared pipeline.
pub trait Tap {
    /// Every event the ring hands over, before selection: the capture of
    /// `trace --write`, the agent's flight recorder.
    fn record(&mut self, _ev: &Event) {}
    /// An event the pipeline selected, with the names known now.
    fn selected(&mut self, ev: &Event, names: &NetnsNames) -> Result<(), TraceError>;
}

/// The one consumer of a live session's events, whatever the driver:
/// decode, the driver's recording, the pipeline (count, select,
/// aggregate, detect — what `report` runs on captures), the driver's
/// [`Tap`]; the namespaces' names; the rates' intervals.
pub struct Consumer<T> {
    pub pipe: Pipeline<Filter>,
    pub names: NetnsNames,
    /// An event came from a namespace without a name yet.
    unknown_netns: bool,
    pub tap: T,
    /// Records that did not decode (counted, skipped).
    pub decode_errors: u64,
    last_tick: Instant,
    /// The counters backend's totals at the last interval.
    last_seen: KindCounts,
}

impl<T: Tap> Consumer<T> {
    pub fn new(pipe: Pipeline<Filter>, names: NetnsNames, tap: T) -> Consumer<T> {
        Consumer {
            pipe,
            names,
            unknown_netns: false,
            tap,
            decode_errors: 0,
            last_tick: Instant::now(),
            last_seen: KindCounts::default(),
        }
    }

    /// One ring record as an event; one that does not decode is counted.
    pub fn decode(&mut self, record: &[u8]) -> Option<Event> {
        let ev = Event::decode(record).ok();
        self.decode_errors += u64::from(ev.is_none());
        ev
    }

    pub fn handle(&mut self, ev: &Event) -> Result<(), TraceError> {
        self.tap.record(ev);
        if !self.pipe.feed(ev, &self.names) {
            return Ok(());
        }
        if !self.names.contains_key(&ev.netns) {
            self.unknown_netns = true;
        }
        self.tap.selected(ev, &self.names)
    }

    /// Whether the names should be read again: an event came from an
    /// unnamed namespace, or containers came or went.
    pub fn wants_names(&self) -> bool {
        self.unknown_netns || workload::wants_refresh()
    }

    /// Names (and workloads) of the namespaces in `list` from the
    /// resolver's cache. Adds, never drops, a name: a name already shown
    /// or a counter's `netns` label must not change under it, and without
    /// CAP_SYS_PTRACE the list sees fewer processes than at start. A
    /// namespace named before its workload was found (a container's
    /// namespace exists a moment before its process joins the container's
    /// cgroup) takes the workload's name.
    pub fn refresh_names(&mut self, list: &BTreeMap<u32, NetnsInfo>) {
        let now_named = workload::names_of(list);
        for (k, v) in now_named.iter() {
            if !self.names.contains_key(k) {
                self.names.insert(*k, v.clone());
            }
        }
        for (k, w) in now_named.workloads() {
            if self.names.workload(*k).is_none() {
                self.names.set_workload(*k, w.clone());
                self.names.insert(*k, w.display());
            }
        }
        self.unknown_netns = false;
    }

    /// The name of namespace `ino`, or its inode.
    pub fn name(&self, ino: u32) -> String {
        self.names
            .get(&ino)
            .cloned()
            .unwrap_or_else(|| ino.to_string())
    }

    /// Every interval: what the ring holds now, the programs' counters,
    /// and the rates' interval closed — the counters backend (totals only,
    /// no events) feeds the totals from the programs' counters.
    pub fn interval(
        &mut self,
        ring: &mut Option<Ring>,
        tp: &Backend,
    ) -> Result<BpfCounters, TraceError> {
        if let Some(ring) = ring.as_mut() {
            ring.drain(usize::MAX, self)?;
        }
        let counters = tp.counters()?;
        let agg = &mut self.pipe.agg;
        if !tp.per_packet() {
            agg.record_totals(&counters.seen.sub(&self.last_seen));
            self.last_seen = counters.seen;
        }
        let now = Instant::now();
        agg.tick(now - self.last_tick);
        self.last_tick = now;
        Ok(counters)
    }
}

/// The first phase of every live session: may this process load and
/// attach the programs, and which namespaces are there.
pub fn host() -> Result<BTreeMap<u32, NetnsInfo>, TraceError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(TraceError::io("reading /proc/self/status"))?;
    crate::kernel::error::check_privileges(&status)?;
    Ok(netns::list())
}

/// A live session, started: the scope held open (both snapshots read the
/// same namespaces), the backend attached, its facts, the kernel's
/// counters at start and the ring.
pub struct Started {
    pub facts: SessionFacts,
    pub tp: Backend,
    pub scope: Vec<netns::Held>,
    pub start: kstats::Snapshot,
    pub ring: Option<Ring>,
    /// `--bpf-log`'s reader (None when off); dropped last, after a final
    /// drain.
    pub bpf_log: Option<bpflog::Reader>,
}

/// Holds `list`, opens the backend (see [`open`]), takes its ring and,
/// with `--bpf-log`, starts reading the programs' log into `log_sink`.
pub fn start(
    choice: Choice,
    opts: &backend::Options,
    list: &[NetnsInfo],
    scope: Scope,
    log_sink: bpflog::Sink,
) -> Result<Started, TraceError> {
    let held = netns::hold(list);
    let opened = open(choice, opts, &held)?;
    let facts = opened.facts(scope);
    let Opened { mut tp, start, .. } = opened;
    let ring = Ring::take(&mut tp, opts)?;
    let bpf_log = tp.start_log(opts.bpf_log, log_sink)?;
    if opts.bpf_log.is_on() && bpf_log.is_none() {
        log_sink(
            log::Level::Warn,
            "--bpf-log: the counters backend runs no programs: nothing to log",
        );
    }
    Ok(Started {
        facts,
        tp,
        scope: held,
        start,
        ring,
        bpf_log,
    })
}

/// `--bpf-log`'s sink for `trace` and `doctor`: one `bpf: LEVEL message`
/// line on stderr per record.
pub fn bpf_log_line(level: log::Level, message: &str) {
    diag(format_args!(
        "bpf: {} {}",
        level.as_str().to_ascii_lowercase(),
        crate::formats::text::field(message)
    ));
}

/// A backend, opened with the kernel's counters read right before its
/// first attach (after the load, which can take seconds): their delta to
/// the end snapshot and our counters cover one window.
pub struct Opened {
    pub tp: Backend,
    pub refused: Vec<Refusal>,
    pub start: kstats::Snapshot,
}

pub fn open(
    choice: Choice,
    opts: &backend::Options,
    scope: &[netns::Held],
) -> Result<Opened, TraceError> {
    let start_cell = std::cell::RefCell::new(kstats::Snapshot::default());
    let (tp, refused) = backend::open(choice, opts, scope, &|| {
        *start_cell.borrow_mut() = kstats::snapshot(scope);
    })?;
    Ok(Opened {
        tp,
        refused,
        start: start_cell.into_inner(),
    })
}

impl Opened {
    /// What the session established, once (see [`SessionFacts`]).
    pub fn facts(&self, scope: Scope) -> SessionFacts {
        SessionFacts {
            version: env!("CARGO_PKG_VERSION").into(),
            backend: self.tp.name(),
            hooks: self.tp.describe(),
            refused: self.refused.clone(),
            per_packet: self.tp.per_packet(),
            evictions: self.tp.describe_evictions(),
            clock: wall_clock_now(),
            scope: Scope {
                uncovered: self.start.missing.clone(),
                ..scope
            },
        }
    }
}

pub fn wall_clock_now() -> Clock {
    Clock {
        start_unix_ns: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        start_mono_ns: crate::model::clock::monotonic_ns(),
    }
}

/// The capture's first record: the session's facts and the kernel's state
/// at start (`fills`: each namespace's table).
pub fn capture_header(
    facts: &SessionFacts,
    filter: &Filter,
    fills: Vec<NsFill>,
    start: &kstats::Snapshot,
) -> capture::Header {
    capture::Header {
        format_version: capture::format::FORMAT_VERSION,
        tool_version: facts.version.clone(),
        hostname: capture::hostname(),
        kernel_release: capture::kernel_release(),
        hooks: facts.hooks.clone(),
        evictions: facts.evictions.clone(),
        start_unix_ns: facts.clock.start_unix_ns,
        start_mono_ns: facts.clock.start_mono_ns,
        capture_id: facts.clock.start_unix_ns as u64 ^ (u64::from(std::process::id()) << 40),
        seq: 0,
        scope: facts.scope.clone(),
        filter: capture::format::RecordedFilter::of(filter),
        conntrack: fills,
        kernel_start: start.stats.clone(),
        backend_refused: facts.refused.clone(),
        per_packet: facts.per_packet,
        backend_name: Some(facts.backend),
    }
}

/// What the end of a live session read: the programs' counters after the
/// last drain and the kernel's counters over the attach window.
pub struct Ending {
    pub counters: BpfCounters,
    pub end: kstats::Snapshot,
    pub kernel: CtStats,
    pub covered: usize,
    pub uncovered: Vec<Uncovered>,
    /// From `started` to the detach.
    pub duration_s: f64,
    /// Ring records that did not decode, over the whole session.
    pub decode_errors: u64,
}

/// Stops the producers, reads the kernel's end counters (`end_snapshot`,
/// right after the detach), withdraws the ready file (nothing is attached
/// any more: a script must not read "ready"), then takes everything the
/// programs left in the ring — so that events + lost == observed holds
/// exactly.
#[allow(
    clippy::too_many_arguments,
    reason = "one call per driver, each argument named there"
)]
pub fn end<T: Tap>(
    tp: &mut Backend,
    ring: Option<Ring>,
    scope: &[netns::Held],
    start: &kstats::Snapshot,
    end_snapshot: impl FnOnce() -> kstats::Snapshot,
    ready: Option<&mut ReadyFile>,
    started: Instant,
    c: &mut Consumer<T>,
) -> Result<Ending, TraceError> {
    let mut ring = ring.map(|r| r.fd.into_inner());
    tp.detach();
    let end = end_snapshot();
    if let Some(r) = ready {
        r.withdraw();
    }
    let duration_s = started.elapsed().as_secs_f64();
    if let Some(ring) = ring.as_mut() {
        drain(ring, usize::MAX, c)?;
    }
    let decode_errors = c.decode_errors;
    let counters = tp.counters()?;
    let (kernel, covered, uncovered) = kstats::window(scope, start, &end);
    Ok(Ending {
        counters,
        end,
        kernel,
        covered,
        uncovered,
        duration_s,
        decode_errors,
    })
}

/// The programs' exact per-source counts added since the last call (the
/// first call: since the start), read from `SOURCE_COUNTS`. Written while
/// the event budget is on, so that readers of the sampled stream (a
/// capture, ndjson) get the top sources the live run got.
pub fn interval_counts(
    tp: &Backend,
    deltas: &mut crate::analysis::aggregate::ExactDeltas,
) -> Result<crate::model::IntervalCounts, TraceError> {
    let mut sources = Vec::new();
    tp.for_each_source_count(|e, n| deltas.see(e, n, &mut sources))?;
    deltas.finish();
    Ok(crate::model::IntervalCounts {
        ts_ns: crate::model::clock::monotonic_ns(),
        sources,
    })
}

/// A live summary's counts: the pipeline's, the programs' and the
/// kernel's over the attach window (`sampled`, `exact`: see
/// [`Totals::sampled`]).
pub fn totals<S>(
    facts: &SessionFacts,
    p: &Pipeline<S>,
    end: &Ending,
    sampled: bool,
    exact: u64,
) -> Totals {
    let c = &end.counters;
    Totals {
        events: p.received,
        matched: match facts.per_packet {
            true => p.agg.totals,
            false => KindCounts::default(),
        },
        lost: c.lost,
        shed: c.shed,
        observed: c.seen,
        kernel: end.kernel,
        unclassified_drops: c.unclassified,
        unmatched_drop_counts: c.drop_unmatched,
        decode_errors: end.decode_errors,
        namespaces: end.covered,
        uncovered: end.uncovered.clone(),
        complete: complete(facts.per_packet, &p.received, c),
        sampled,
        exact_sources: exact,
    }
}

/// Whether every drop the programs saw either arrived as an event or was
/// counted as lost or shed. Without events (counters backend) nothing is
/// complete.
pub fn complete(per_packet: bool, received: &KindCounts, c: &BpfCounters) -> bool {
    per_packet
        && Kind::ALL
            .iter()
            .all(|k| received.get(*k) + c.lost.get(*k) + c.shed.get(*k) == c.seen.get(*k))
}

/// The stderr line that says which backend runs and why `auto` passed over
/// the ones before it.
pub fn selection_line(desc: &str, refused: &[Refusal]) -> String {
    let mut s = format!("conntrack-trace: backend {desc}");
    for r in refused {
        s.push_str(&format!("; {} refused: {}", r.backend.as_str(), r.reason));
    }
    s
}

/// Entries / max / buckets of each namespace of the scope, fullest first.
pub fn fills(scope: &[netns::Held]) -> Vec<NsView> {
    let mut v: Vec<NsView> = scope
        .iter()
        .filter_map(
            |ns| match ns.run(|| (kstats::read_fill(), kstats::read_stats().ok())) {
                Ok((Some(fill), stats)) => Some(NsView {
                    inode: ns.info.inode,
                    name: ns.info.name.clone(),
                    fill,
                    forecast: None,
                    stats,
                }),
                _ => None,
            },
        )
        .collect();
    v.sort_by(|a, b| b.fill.count.cmp(&a.fill.count).then(a.name.cmp(&b.name)));
    v
}

/// Only the namespaces that use conntrack (or else the fullest one), for
/// the header of a trace of every namespace.
pub fn shown(mut v: Vec<NsView>, all: bool) -> Vec<NsView> {
    if all {
        let first = v.first().cloned();
        v.retain(|ns| ns.fill.count > 0);
        if v.is_empty() {
            v.extend(first);
        }
    }
    v
}

/// Each namespace's table at start, for the capture header.
pub fn ns_fills(scope: &[netns::Held]) -> Vec<NsFill> {
    scope
        .iter()
        .filter_map(|ns| match ns.run(kstats::read_fill) {
            Ok(Some(fill)) => Some(NsFill {
                netns: ns.info.name.clone(),
                inode: ns.info.inode,
                fill,
            }),
            _ => None,
        })
        .collect()
}

/// The outputs of a session, created before anything is loaded (a path we
/// may not or cannot write fails the run first) and removed again if the
/// run fails before it holds a result.
pub fn prepare_outputs(
    backend: &backend::Options,
    write: Option<capture::WriteOptions>,
    ready_file: Option<&std::path::Path>,
) -> Result<(Option<capture::writer::Prepared>, Option<ReadyFile>), TraceError> {
    let inputs: Vec<Input> = backend
        .btf_path
        .metadata()
        .ok()
        .filter(|_| backend.btf_explicit)
        .map(|m| Input {
            path: backend.btf_path.display().to_string(),
            id: FileId::of(&m),
        })
        .into_iter()
        .collect();
    let prepared = match write {
        Some(w) => Some(capture::writer::prepare(w, &inputs).map_err(write_error)?),
        None => None,
    };
    let ready = match ready_file {
        Some(path) => {
            let mut protect = inputs.clone();
            protect.extend(prepared.as_ref().map(|p| p.as_input()));
            Some(ReadyFile::prepare(path, &protect).map_err(|e| {
                let msg = format!("--ready-file: {e}");
                if e.is_refusal() {
                    TraceError::Usage(msg)
                } else {
                    TraceError::Other(msg)
                }
            })?)
        }
        None => None,
    };
    Ok((prepared, ready))
}

/// A capture file that may not be written is a usage error (exit 2); one
/// the system fails to write, an I/O error (exit 1).
pub fn write_error(e: capture::WriteError) -> TraceError {
    if e.is_refusal() {
        TraceError::Usage(e.to_string())
    } else {
        TraceError::Other(e.to_string())
    }
}

/// The stderr lines at start: the backend and why `auto` passed over
/// others, namespaces whose counters cannot be read, filters that do not
/// apply.
pub fn announce(facts: &SessionFacts, filter: &Filter) {
    diag(selection_line(&facts.hooks, &facts.refused));
    if let Some(line) = facts.scope.uncovered_line() {
        diag(format_args!(
            "conntrack-trace: warning: {line}; the summary lists them"
        ));
    }
    if !facts.per_packet
        && (filter.proto.is_some() || filter.port.is_some() || filter.src.is_some())
    {
        diag(
            "conntrack-trace: note: --proto/--port/--src do not apply to the counters backend (no per-packet attribution)",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Name;

    #[test]
    fn ring_pause_never_lets_the_ring_fill() {
        // The default 8 MiB ring holds ~40 000 records (208 bytes each):
        // 20 ms at 2 M/s.
        assert_eq!(ring_pause(8 << 20, 0), Duration::from_millis(5));
        // 1 MiB: 5041 records, 2.5 ms to fill at 2 M/s, a quarter of it.
        assert_eq!(ring_pause(1 << 20, 0), Duration::from_nanos(630_125));
        // A page (the tiny-ring test): 19 records, no wait at all.
        assert_eq!(ring_pause(4096, 0), Duration::ZERO);
        assert_eq!(ring_pause(64 << 10, 0), Duration::ZERO);
        // Under trace's budget on 2 CPUs (40 000 events/s at most), the
        // 2 MiB ring takes 250 ms to fill: the longest wait.
        assert_eq!(ring_pause(2 << 20, 40_000), Duration::from_millis(5));
        // A budget beyond 2 M/s is sized as 2 M/s.
        assert_eq!(ring_pause(1 << 20, 1 << 40), ring_pause(1 << 20, 0));
    }

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
}
