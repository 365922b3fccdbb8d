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
    aggregate::KindCounts,
    amplify::{AmpConfig, Finding},
    backend::{self, Choice},
    capture::{self, Writer, format::NsFill},
    clock::Clock,
    error::TraceError,
    event::{Event, Kind},
    filter::Filter,
    forecast::{Estimator, Forecast, Sample, Trend},
    kstats,
    netns::{self, NetnsInfo},
    outfile::{FileId, Input, ReadyFile},
    output::{
        LiveView, NetnsNames, NsView, Scope, SessionFacts, Sink, Summary, Totals,
        pipe::{self, diag},
        top_sources, top_sources_exact,
    },
    pipeline::Pipeline,
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
    const RECORD: u64 =
        (std::mem::size_of::<conntrack_trace_common::RawEvent>() as u64 + 8 + 7) & !7;
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
    /// Count, select, aggregate, detect: what `report` runs on captures.
    pipe: Pipeline<Filter>,
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
        if let Some(w) = &mut self.writer {
            w.event(ev);
        }
        if !self.pipe.feed(ev, &self.names) {
            return Ok(());
        }
        if !self.names.contains_key(&ev.netns) {
            self.unknown_netns = true;
        }
        if self.closed {
            return Ok(());
        }
        let r = self.sink.event(ev, &self.names);
        pipe::quiet(r, &mut self.closed).map_err(TraceError::io("writing output"))
    }
}

impl Consumer<'_> {
    /// Hands the capture what it has (and any new names) once per
    /// interval; a failing disk stops the recording, not the trace.
    fn flush_capture(&mut self) {
        let Some(w) = &mut self.writer else { return };
        w.names(&self.names);
        w.flush();
        if !self.write_warned
            && let Some(e) = w.failed()
        {
            diag(format_args!(
                "conntrack-trace: warning: {e}; recording stopped, live output continues"
            ));
            self.write_warned = true;
        }
    }

    /// Writes findings that are new or changed since the last report.
    fn report_findings(&mut self, clock: &Clock) -> Result<(), TraceError> {
        let changed: Vec<Finding> = self.pipe.amp.take_changed(clock);
        for f in &changed {
            if self.closed {
                break;
            }
            let r = self.sink.finding(f);
            pipe::quiet(r, &mut self.closed).map_err(TraceError::io("writing output"))?;
        }
        Ok(())
    }
}

/// Names (and containers/pods, see [`crate::workload`]) of `list`.
fn names_of(list: &BTreeMap<u32, NetnsInfo>) -> NetnsNames {
    crate::workload::names_of(list)
}

/// Entries / max / buckets of each namespace of the scope, fullest first.
fn fills(scope: &[netns::Held]) -> Vec<NsView> {
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
fn shown(mut v: Vec<NsView>, all: bool) -> Vec<NsView> {
    if all {
        let first = v.first().cloned();
        v.retain(|ns| ns.fill.count > 0);
        if v.is_empty() {
            v.extend(first);
        }
    }
    v
}

/// The header's sparkline spans about this long.
const HISTORY_S: f64 = 60.0;

/// Each namespace's entry count over time, and what was last reported of
/// it: the live forecast ([`crate::forecast`], the estimator `doctor`
/// uses).
#[derive(Default)]
struct Forecasts {
    by_ns: std::collections::HashMap<u32, (Estimator, Option<Forecast>)>,
}

impl Forecasts {
    /// Feeds this tick's counts; returns the namespaces whose forecast
    /// changed materially since last reported (and marks them reported).
    fn update(&mut self, t_s: f64, views: &mut [NsView]) -> Vec<usize> {
        let mut changed = Vec::new();
        for (i, ns) in views.iter_mut().enumerate() {
            let (est, last) = self.by_ns.entry(ns.inode).or_default();
            est.push(
                Sample {
                    t_s,
                    entries: ns.fill.count,
                    inserted: None,
                },
                ns.fill.max,
            );
            let f = est.forecast();
            // Nothing to say until the estimator has enough samples, nor
            // of a table that has been steady since the start.
            let news = match last {
                None => !matches!(f.trend, Trend::Unknown | Trend::Steady),
                Some(l) => f.trend != Trend::Unknown && f.differs_materially(l),
            };
            if news {
                *last = Some(f.clone());
                changed.push(i);
            }
            ns.forecast = Some(f);
        }
        changed
    }
}

/// A live trace in three phases: [`Session::start`] (privileges, outputs,
/// scope, backend, start counters, clock, writer), [`Session::run`] (the
/// event loop) and [`Session::finish`] (detach, end counters, summary,
/// trailer).
struct Session<'s> {
    opts: TraceOptions,
    facts: SessionFacts,
    tp: backend::Backend,
    /// Every namespace of the scope, held open so that both snapshots read
    /// the same ones.
    scope: Vec<netns::Held>,
    start_stats: kstats::Snapshot,
    ready: Option<ReadyFile>,
    consumer: Consumer<'s>,
    ring: Option<AsyncFd<RingBuf<MapData>>>,
    started: Instant,
    last_tick: Instant,
    /// The counters backend's totals at the last tick.
    last_seen: KindCounts,
    forecasts: Forecasts,
    /// Failures per kind of each of the last intervals (≈ 60 s).
    history: std::collections::VecDeque<KindCounts>,
    /// The pipeline's totals at the last tick.
    last_totals: KindCounts,
}

pub async fn run(opts: TraceOptions, sink: &mut dyn Sink) -> Result<Summary, TraceError> {
    let mut s = Session::start(opts, sink)?;
    s.run().await?;
    s.finish()
}

/// The outputs of a session, created before anything is loaded (a path we
/// may not or cannot write fails the run first) and removed again if the
/// run fails before it holds a result.
fn prepare_outputs(
    opts: &mut TraceOptions,
) -> Result<(Option<capture::writer::Prepared>, Option<ReadyFile>), TraceError> {
    let inputs: Vec<Input> = opts
        .backend
        .btf_path
        .metadata()
        .ok()
        .filter(|_| opts.backend.btf_explicit)
        .map(|m| Input {
            path: opts.backend.btf_path.display().to_string(),
            id: FileId::of(&m),
        })
        .into_iter()
        .collect();
    let prepared = match opts.write.take() {
        Some(w) => Some(capture::writer::prepare(w, &inputs).map_err(write_error)?),
        None => None,
    };
    let ready = match &opts.ready_file {
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

/// The namespaces to trace (`--netns` or all) and how the summary names
/// them; `--netns` also becomes the live filter.
fn resolve_scope(
    opts: &mut TraceOptions,
    all: &BTreeMap<u32, NetnsInfo>,
) -> Result<(Vec<NetnsInfo>, Scope), TraceError> {
    let (list, netns, inode) = match &opts.netns {
        Some(spec) => {
            let ns = crate::workload::named_one(netns::resolve(spec)?);
            opts.filter.netns = Some(ns.inode);
            let (name, inode) = (ns.name.clone(), Some(ns.inode));
            (vec![ns], name, inode)
        }
        None => (all.values().cloned().collect(), "all".to_owned(), None),
    };
    let namespaces = list.len();
    Ok((
        list,
        Scope {
            netns,
            netns_inode: inode,
            namespaces,
            uncovered: Vec::new(),
        },
    ))
}

fn wall_clock_now() -> Clock {
    Clock {
        start_unix_ns: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        start_mono_ns: crate::clock::monotonic_ns(),
    }
}

impl<'s> Session<'s> {
    fn start(mut opts: TraceOptions, sink: &'s mut dyn Sink) -> Result<Session<'s>, TraceError> {
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(TraceError::io("reading /proc/self/status"))?;
        crate::error::check_privileges(&status)?;
        let (prepared, ready) = prepare_outputs(&mut opts)?;
        let all = crate::workload::named(netns::list());
        let (list, scope_desc) = resolve_scope(&mut opts, &all)?;
        let scope = netns::hold(&list);
        // The kernel's counters bracket the attach period: read right
        // before the first attach (after the load, which can take seconds)
        // and right after the detach, so their delta and our counters
        // cover one window.
        let start_cell = std::cell::RefCell::new(kstats::Snapshot::default());
        let (mut tp, refused) = backend::open(opts.choice, &opts.backend, &scope, &|| {
            *start_cell.borrow_mut() = kstats::snapshot(&scope);
        })?;
        let start_stats = start_cell.into_inner();
        let facts = SessionFacts {
            version: env!("CARGO_PKG_VERSION").into(),
            backend: tp.name().as_str().into(),
            hooks: tp.describe(),
            refused,
            per_packet: tp.per_packet(),
            evictions: tp.evictions().describe(),
            clock: wall_clock_now(),
            scope: Scope {
                uncovered: start_stats.missing.clone(),
                ..scope_desc
            },
        };
        announce(&facts, &opts.filter);
        let ring = match tp.take_ring()? {
            // SAFETY: the AsyncFd owns the ring (and so its fd) until
            // into_inner() in finish(); nothing else closes the fd.
            Some(r) => Some(
                unsafe { AsyncFd::register_with_interest(r, Interest::READABLE) }
                    .map_err(|e| TraceError::io("polling the ring buffer")(e.into()))?,
            ),
            None => None,
        };
        let names = names_of(&all);
        let writer = match prepared {
            None => None,
            Some(w) => {
                let header = capture_header(&facts, &opts.filter, &scope, &start_stats);
                Some(Writer::start(w, header, &names).map_err(write_error)?)
            }
        };
        let consumer = Consumer {
            sink,
            pipe: Pipeline::new(opts.filter.clone(), opts.max_sources, opts.amp.clone()),
            decode_errors: 0,
            names,
            unknown_netns: false,
            closed: false,
            writer,
            write_warned: false,
        };
        let now = Instant::now();
        Ok(Session {
            opts,
            facts,
            tp,
            scope,
            start_stats,
            ready,
            consumer,
            ring,
            started: now,
            last_tick: now,
            last_seen: KindCounts::default(),
            forecasts: Forecasts::default(),
            history: std::collections::VecDeque::new(),
            last_totals: KindCounts::default(),
        })
    }

    /// Until Ctrl-C, SIGTERM, `--duration` or a reader who left: drains
    /// the ring as it fills and redraws at every `--interval`.
    async fn run(&mut self) -> Result<(), TraceError> {
        let mut sigint =
            signal(SignalKind::interrupt()).map_err(TraceError::io("installing SIGINT handler"))?;
        let mut sigterm = signal(SignalKind::terminate())
            .map_err(TraceError::io("installing SIGTERM handler"))?;
        // Ready only once SIGINT/SIGTERM are handled and the capture file
        // is open: a script that signals right after the file appears must
        // get a summary (and a finished capture), not a dead process.
        if let Some(r) = &mut self.ready {
            r.publish()
                .map_err(|e| TraceError::Other(format!("--ready-file: {e}")))?;
        }
        let duration = self.opts.duration;
        let deadline = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let interval = self.opts.interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pause = ring_pause(self.opts.backend.ring_bytes);
        while !self.consumer.closed {
            tokio::select! {
                biased;
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = &mut deadline => break,
                _ = ticker.tick() => self.tick()?,
                guard = async { self.ring.as_mut().expect("guarded by the precondition").readable_mut().await }, if self.ring.is_some() => {
                    let mut guard = guard.map_err(TraceError::io("polling the ring buffer"))?;
                    let n = self.consumer.drain(guard.get_inner_mut(), DRAIN_BATCH)?;
                    if n < DRAIN_BATCH {
                        guard.clear_ready();
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Every `--interval`: drain, close the rates' interval, refresh names,
    /// flush the capture, report findings, redraw.
    fn tick(&mut self) -> Result<(), TraceError> {
        if let Some(afd) = self.ring.as_mut() {
            self.consumer.drain(afd.get_mut(), usize::MAX)?;
        }
        let counters = self.tp.counters()?;
        let c = &mut self.consumer;
        if !self.facts.per_packet {
            // Totals only: the kernel's counters feed the totals and
            // rates, no sources.
            c.pipe
                .agg
                .record_totals(&counters.seen.sub(&self.last_seen));
            self.last_seen = counters.seen;
        }
        let now = Instant::now();
        c.pipe.agg.tick(now - self.last_tick);
        self.last_tick = now;
        if c.unknown_netns || crate::workload::wants_refresh() {
            c.names = names_of(&netns::list());
            c.unknown_netns = false;
        }
        c.flush_capture();
        c.report_findings(&self.facts.clock)?;
        let totals = c.pipe.agg.totals;
        self.history.push_back(totals.sub(&self.last_totals));
        self.last_totals = totals;
        let keep = (HISTORY_S / self.opts.interval.as_secs_f64())
            .ceil()
            .clamp(1.0, 60.0) as usize;
        while self.history.len() > keep {
            self.history.pop_front();
        }
        let mut views = fills(&self.scope);
        let t_s = self.started.elapsed().as_secs_f64();
        for i in self.forecasts.update(t_s, &mut views) {
            if !c.closed {
                let r = c.sink.forecast(&views[i]);
                pipe::quiet(r, &mut c.closed).map_err(TraceError::io("writing output"))?;
            }
        }
        // The kernel's counters since the start, live: a rising
        // clash_resolve is the warning sign of the DNS-over-NAT race
        // (kubernetes/kubernetes#56903), resolved, not yet dropped.
        let mut kernel = kstats::CtStats::default();
        for ns in &views {
            if let (Some(now), Some(start)) = (&ns.stats, self.start_stats.stats.get(&ns.inode))
                && let Some(d) = now.delta(start)
            {
                kernel.add(&d);
            }
        }
        let f = shown(views, self.opts.netns.is_none());
        let exact_top = if counters.lost.total() > 0 {
            let exact = self.tp.source_counts()?;
            let sel = &c.pipe.select;
            Some(top_sources_exact(&c.pipe.agg, &exact, |e| sel.matches(e), self.opts.top).0)
        } else {
            None
        };
        let history: Vec<KindCounts> = self.history.iter().copied().collect();
        let findings = c.pipe.amp.findings(&self.facts.clock);
        let amp = c.pipe.amp.summary();
        let view = LiveView {
            backend: &self.facts.hooks,
            refused: &self.facts.refused,
            per_packet: self.facts.per_packet,
            evictions: &self.facts.evictions,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            fills: &f,
            history: &history,
            agg: &c.pipe.agg,
            lost: counters.lost,
            rule_drops: (self.tp.name() == backend::Name::Tracepoint)
                .then_some(counters.seen.rule_drop),
            kernel: Some(kernel),
            top_n: self.opts.top,
            exact_top: exact_top.as_deref(),
            findings: &findings,
            amp: &amp,
        };
        if !c.closed {
            let r = c.sink.tick(&view);
            pipe::quiet(r, &mut c.closed).map_err(TraceError::io("writing output"))?;
        }
        Ok(())
    }

    /// Stops the producers, then takes everything they left behind (so
    /// that events + lost == observed holds exactly), reads the kernel's
    /// counters again, and writes the summary and the capture's trailer.
    fn finish(mut self) -> Result<Summary, TraceError> {
        let mut ring = self.ring.take().map(AsyncFd::into_inner);
        self.tp.detach();
        let end_stats = kstats::snapshot(&self.scope);
        // Nothing is attached any more: a script must not read "ready".
        if let Some(r) = &mut self.ready {
            r.withdraw();
        }
        let duration_s = self.started.elapsed().as_secs_f64();
        if let Some(ring) = ring.as_mut() {
            self.consumer.drain(ring, usize::MAX)?;
        }
        let counters = self.tp.counters()?;
        let (kernel, covered, uncovered) =
            kstats::window(&self.scope, &self.start_stats, &end_stats);
        self.consumer.report_findings(&self.facts.clock)?;
        let c = &mut self.consumer;
        // The ring overflowed: the counts of the top sources come from the
        // programs' exact per-source counts, not from the events.
        let sampled = counters.lost.total() > 0;
        let (top, exact_sources) = if sampled {
            let exact = self.tp.source_counts()?;
            let f = &c.pipe.select;
            top_sources_exact(&c.pipe.agg, &exact, |e| f.matches(e), self.opts.top)
        } else {
            (top_sources(&c.pipe.agg, self.opts.top), 0)
        };
        let totals = Totals {
            events: c.pipe.received,
            matched: if self.facts.per_packet {
                c.pipe.agg.totals
            } else {
                KindCounts::default()
            },
            lost: counters.lost,
            observed: counters.seen,
            kernel,
            unclassified_drops: counters.unclassified,
            unmatched_drop_counts: counters.drop_unmatched,
            decode_errors: c.decode_errors,
            namespaces: covered,
            uncovered,
            // Without events (counters backend) nothing is complete.
            complete: self.facts.per_packet
                && Kind::ALL.iter().all(|k| {
                    c.pipe.received.get(*k) + counters.lost.get(*k) == counters.seen.get(*k)
                }),
            sampled,
            exact_sources,
        };
        let summary = Summary::assemble(&self.facts, duration_s, totals, top, &c.pipe);
        let capture_result = c.writer.take().map(|w| {
            let files = w.files();
            let written = w.events_written();
            let trailer = capture::Trailer::of(
                &summary,
                crate::clock::monotonic_ns(),
                end_stats.stats.clone(),
                written,
            );
            w.finish(trailer).map(|()| (files, written))
        });
        if !c.closed {
            let r = c.sink.finish(&summary);
            pipe::quiet(r, &mut c.closed).map_err(TraceError::io("writing output"))?;
        }
        match capture_result {
            None => {}
            Some(Ok((files, written))) => diag(format_args!(
                "conntrack-trace: recorded {written} events in {files} file(s)"
            )),
            Some(Err(e)) => return Err(TraceError::Other(e.to_string())),
        }
        Ok(summary)
    }
}

/// The stderr lines at start: the backend and why `auto` passed over
/// others, namespaces whose counters cannot be read, filters that do not
/// apply.
fn announce(facts: &SessionFacts, filter: &Filter) {
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

/// The capture's first record: the session's facts and the kernel's state
/// at start.
fn capture_header(
    facts: &SessionFacts,
    filter: &Filter,
    scope: &[netns::Held],
    start: &kstats::Snapshot,
) -> capture::Header {
    capture::Header {
        format_version: capture::format::FORMAT_VERSION,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        hostname: capture::hostname(),
        kernel_release: capture::kernel_release(),
        backend: facts.hooks.clone(),
        evictions: facts.evictions.clone(),
        start_unix_ns: facts.clock.start_unix_ns,
        start_mono_ns: facts.clock.start_mono_ns,
        capture_id: facts.clock.start_unix_ns as u64 ^ (u64::from(std::process::id()) << 40),
        seq: 0,
        scope: facts.scope.clone(),
        filter: capture::format::RecordedFilter::of(filter),
        conntrack: scope
            .iter()
            .filter_map(|ns| match ns.run(kstats::read_fill) {
                Ok(Some(fill)) => Some(NsFill {
                    netns: ns.info.name.clone(),
                    inode: ns.info.inode,
                    fill,
                }),
                _ => None,
            })
            .collect(),
        kernel_start: start.stats.clone(),
        backend_refused: facts.refused.clone(),
        per_packet: facts.per_packet,
        backend_name: Some(facts.backend.clone()),
    }
}

/// A capture file that may not be written is a usage error (exit 2); one
/// the system fails to write, an I/O error (exit 1).
fn write_error(e: capture::WriteError) -> TraceError {
    if e.is_refusal() {
        TraceError::Usage(e.to_string())
    } else {
        TraceError::Other(e.to_string())
    }
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
        // The default 8 MiB ring holds ~40 000 records (208 bytes each):
        // 20 ms at 2 M/s.
        assert_eq!(ring_pause(8 << 20), Duration::from_millis(5));
        // 1 MiB: 5041 records, 2.5 ms to fill at 2 M/s, a quarter of it.
        assert_eq!(ring_pause(1 << 20), Duration::from_nanos(630_125));
        // A page (the tiny-ring test): 19 records, no wait at all.
        assert_eq!(ring_pause(4096), Duration::ZERO);
        assert_eq!(ring_pause(64 << 10), Duration::ZERO);
    }
}
