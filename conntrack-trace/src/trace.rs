//! A live `trace` session: load, attach, stream events through the filters
//! into the aggregator and the output, and summarise against the kernel's
//! own counters at the end.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    amplify::AmpConfig,
    backend::{self, BpfCounters, Choice},
    capture::{self, Writer, format::NsFill},
    clock::Clock,
    error::TraceError,
    event::Event,
    filter::Filter,
    forecast::{Estimator, Forecast, Sample, Trend},
    kstats,
    live::{self, Ring, selection_line},
    model::{Finding, KindCounts, Scope, SessionFacts, Summary, TopSource},
    netns::{self, NetnsInfo},
    outfile::{FileId, Input, ReadyFile},
    output::{
        ExactCounts, LiveView, NetnsNames, NsView, Sink,
        pipe::{self, diag},
        top_sources,
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

/// The sink, minus a reader who left: EPIPE ends output quietly (the one
/// place the live trace handles it; see [`pipe`]).
struct Out<'s> {
    sink: &'s mut dyn Sink,
    closed: bool,
}

impl Out<'_> {
    fn send(
        &mut self,
        w: impl FnOnce(&mut dyn Sink) -> std::io::Result<()>,
    ) -> Result<(), TraceError> {
        if self.closed {
            return Ok(());
        }
        pipe::quiet(w(&mut *self.sink), &mut self.closed).map_err(TraceError::io("writing output"))
    }
}

/// Where the ring's events go: the capture (every event), the pipeline,
/// and the output (selected events).
struct Consumer<'s> {
    out: Out<'s>,
    /// Count, select, aggregate, detect: what `report` runs on captures.
    pipe: Pipeline<Filter>,
    names: NetnsNames,
    unknown_netns: bool,
    /// `--write`: every event read from the ring, before filters.
    writer: Option<Writer>,
    /// The writer's I/O error was reported.
    write_warned: bool,
}

impl Consumer<'_> {
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
        let names = &self.names;
        self.out.send(|s| s.event(ev, names))
    }

    /// New namespaces (or containers) since the names were last read.
    fn refresh_names(&mut self) {
        if self.unknown_netns || crate::workload::wants_refresh() {
            self.names = names_of(&netns::list());
            self.unknown_netns = false;
        }
    }

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
            self.out.send(|s| s.finding(f))?;
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
    ring: Option<Ring>,
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

impl<'s> Session<'s> {
    fn start(mut opts: TraceOptions, sink: &'s mut dyn Sink) -> Result<Session<'s>, TraceError> {
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(TraceError::io("reading /proc/self/status"))?;
        crate::error::check_privileges(&status)?;
        let (prepared, ready) = prepare_outputs(&mut opts)?;
        let all = crate::workload::named(netns::list());
        let (list, scope_desc) = resolve_scope(&mut opts, &all)?;
        let scope = netns::hold(&list);
        let opened = live::open(opts.choice, &opts.backend, &scope)?;
        let facts = opened.facts(scope_desc);
        announce(&facts, &opts.filter);
        let live::Opened {
            mut tp,
            start: start_stats,
            ..
        } = opened;
        let ring = Ring::take(&mut tp, opts.backend.ring_bytes)?;
        let names = names_of(&all);
        let writer = match prepared {
            None => None,
            Some(w) => {
                let header =
                    live::capture_header(&facts, &opts.filter, ns_fills(&scope), &start_stats);
                Some(Writer::start(w, header, &names).map_err(write_error)?)
            }
        };
        let consumer = Consumer {
            out: Out {
                sink,
                closed: false,
            },
            pipe: Pipeline::new(opts.filter.clone(), opts.max_sources, opts.amp.clone()),
            names,
            unknown_netns: false,
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
        while !self.consumer.out.closed {
            let c = &mut self.consumer;
            tokio::select! {
                biased;
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = &mut deadline => break,
                _ = ticker.tick() => self.tick()?,
                r = Ring::next_batch(&mut self.ring, |ev| c.handle(ev)) => r?,
            }
        }
        Ok(())
    }

    /// Every `--interval`: drain, close the rates' interval, refresh names,
    /// flush the capture, report findings and forecasts, redraw.
    fn tick(&mut self) -> Result<(), TraceError> {
        if let Some(ring) = self.ring.as_mut() {
            let c = &mut self.consumer;
            ring.drain(usize::MAX, |ev| c.handle(ev))?;
        }
        let counters = self.tp.counters()?;
        self.close_interval(&counters);
        self.consumer.refresh_names();
        self.consumer.flush_capture();
        self.consumer.report_findings(&self.facts.clock)?;
        let mut views = fills(&self.scope);
        let t_s = self.started.elapsed().as_secs_f64();
        for i in self.forecasts.update(t_s, &mut views) {
            self.consumer.out.send(|s| s.forecast(&views[i]))?;
        }
        let kernel = self.kernel_since_start(&views);
        self.draw(&counters, views, kernel)
    }

    /// Ends the rates' interval and the sparkline's; the counters backend
    /// (totals only, no events) feeds the totals from the programs'
    /// counters.
    fn close_interval(&mut self, counters: &BpfCounters) {
        let agg = &mut self.consumer.pipe.agg;
        if !self.facts.per_packet {
            agg.record_totals(&counters.seen.sub(&self.last_seen));
            self.last_seen = counters.seen;
        }
        let now = Instant::now();
        agg.tick(now - self.last_tick);
        self.last_tick = now;
        let totals = agg.totals;
        self.history.push_back(totals.sub(&self.last_totals));
        self.last_totals = totals;
        let keep = (HISTORY_S / self.opts.interval.as_secs_f64())
            .ceil()
            .clamp(1.0, 60.0) as usize;
        while self.history.len() > keep {
            self.history.pop_front();
        }
    }

    /// The kernel's counters since the start, live: a rising
    /// clash_resolve is the warning sign of the DNS-over-NAT race
    /// (kubernetes/kubernetes#56903), resolved, not yet dropped.
    fn kernel_since_start(&self, views: &[NsView]) -> kstats::CtStats {
        let mut kernel = kstats::CtStats::default();
        for ns in views {
            if let (Some(now), Some(start)) = (&ns.stats, self.start_stats.stats.get(&ns.inode))
                && let Some(d) = now.delta(start)
            {
                kernel.add(&d);
            }
        }
        kernel
    }

    /// The top sources from the programs' exact per-source counts (used
    /// once the ring lost events), and how many sources those hold.
    fn exact_top(&self) -> Result<(Vec<TopSource>, u64), TraceError> {
        let p = &self.consumer.pipe;
        let mut exact = ExactCounts::default();
        self.tp.for_each_source_count(|e, n| {
            if p.select.matches(e) {
                exact.add(e, n);
            }
        })?;
        Ok(exact.top(&p.agg, self.opts.top))
    }

    /// Redraws the live view.
    fn draw(
        &mut self,
        counters: &BpfCounters,
        views: Vec<NsView>,
        kernel: kstats::CtStats,
    ) -> Result<(), TraceError> {
        let f = shown(views, self.opts.netns.is_none());
        let exact_top = match counters.sampled() {
            false => None,
            true => Some(self.exact_top()?.0),
        };
        let history: Vec<KindCounts> = self.history.iter().copied().collect();
        let c = &mut self.consumer;
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
            rule_drops: (self.tp.name() == crate::model::Name::Tracepoint)
                .then_some(counters.seen.rule_drop),
            kernel: Some(kernel),
            top_n: self.opts.top,
            exact_top: exact_top.as_deref(),
            findings: &findings,
            amp: &amp,
        };
        c.out.send(|s| s.tick(&view))
    }

    /// Stops the producers and takes everything they left behind (see
    /// [`live::end`]), then writes the summary and the capture's trailer.
    fn finish(mut self) -> Result<Summary, TraceError> {
        let scope = &self.scope;
        let c = &mut self.consumer;
        let end = live::end(
            &mut self.tp,
            self.ring.take(),
            scope,
            &self.start_stats,
            || kstats::snapshot(scope),
            self.ready.as_mut(),
            self.started,
            |ev| c.handle(ev),
        )?;
        self.consumer.report_findings(&self.facts.clock)?;
        // The ring overflowed or the budget shed drops: the counts of the
        // top sources come from the programs' exact per-source counts, not
        // from the events.
        let sampled = end.counters.sampled();
        let (top, exact_sources) = match sampled {
            true => self.exact_top()?,
            false => (top_sources(&self.consumer.pipe.agg, self.opts.top), 0),
        };
        let c = &mut self.consumer;
        let totals = live::totals(&self.facts, &c.pipe, &end, sampled, exact_sources);
        let summary = Summary::assemble(&self.facts, end.duration_s, totals, top, &c.pipe);
        let recorded = c.writer.take().map(|w| {
            let (files, written) = (w.files(), w.events_written());
            let now = crate::clock::monotonic_ns();
            let trailer = capture::Trailer::of(&summary, now, end.end.stats.clone(), written);
            w.finish(trailer).map(|()| (files, written))
        });
        c.out.send(|s| s.finish(&summary))?;
        match recorded {
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

/// Each namespace's table at start, for the capture header.
fn ns_fills(scope: &[netns::Held]) -> Vec<NsFill> {
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

/// A capture file that may not be written is a usage error (exit 2); one
/// the system fails to write, an I/O error (exit 1).
fn write_error(e: capture::WriteError) -> TraceError {
    if e.is_refusal() {
        TraceError::Usage(e.to_string())
    } else {
        TraceError::Other(e.to_string())
    }
}
