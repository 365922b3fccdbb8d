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
    analysis::aggregate::{ExactCounts, ExactDeltas, top_sources},
    analysis::amplify::AmpConfig,
    analysis::filter::Filter,
    analysis::forecast::{self, Sample, Watcher},
    analysis::pipeline::Pipeline,
    drivers::live::{self, Consumer, Ring, Tap},
    formats::capture::{self, Writer},
    formats::outfile::ReadyFile,
    formats::output::{
        LiveView, NetnsNames, NsView, Sink,
        pipe::{Out, diag},
    },
    kernel::backend::{self, BpfCounters, Choice},
    kernel::error::TraceError,
    kernel::kstats,
    kernel::netns::{self, NetnsInfo},
    model::clock::Clock,
    model::event::Event,
    model::{Finding, KindCounts, Sampling, Scope, Summary, TopSource},
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

/// What `trace` does with the ring's events beyond the pipeline: every
/// event to the capture (`--write`), the selected ones to the output.
struct TraceTap<'s> {
    out: Out<'s>,
    /// `--write`: every event read from the ring, before filters.
    writer: Option<Writer>,
    /// The writer's I/O error was reported.
    write_warned: bool,
}

impl Tap for TraceTap<'_> {
    fn record(&mut self, ev: &Event) {
        if let Some(w) = &mut self.writer {
            w.event(ev);
        }
    }

    fn selected(&mut self, ev: &Event, names: &NetnsNames) -> Result<(), TraceError> {
        self.out.send(|s| s.event(ev, names))
    }
}

impl TraceTap<'_> {
    /// Hands the capture what it has (and any new names) once per
    /// interval; a failing disk stops the recording, not the trace.
    fn flush_capture(&mut self, names: &NetnsNames) {
        let Some(w) = &mut self.writer else { return };
        w.names(names);
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
}

/// Writes findings that are new or changed since the last report.
fn report_findings(c: &mut Consumer<TraceTap<'_>>, clock: &Clock) -> Result<(), TraceError> {
    let changed: Vec<Finding> = c.pipe.amp.take_changed(clock);
    for f in &changed {
        c.tap.out.send(|s| s.finding(f))?;
    }
    Ok(())
}

/// The header's sparkline spans about this long.
const HISTORY_S: f64 = 60.0;

/// A live trace in three phases: [`Session::start`] (privileges, outputs,
/// scope, backend, start counters, clock, writer), [`Session::run`] (the
/// event loop) and [`Session::finish`] (detach, end counters, summary,
/// trailer).
struct Session<'s> {
    opts: TraceOptions,
    live: live::Started,
    ready: Option<ReadyFile>,
    consumer: Consumer<TraceTap<'s>>,
    started: Instant,
    forecasts: Watcher,
    /// Failures per kind of each of the last intervals (≈ 60 s).
    history: std::collections::VecDeque<KindCounts>,
    /// The pipeline's totals at the last tick.
    last_totals: KindCounts,
    /// The programs' counters at the last tick, and the sampling the
    /// interval since then saw.
    last_counters: BpfCounters,
    sampling: Option<Sampling>,
    /// While the event budget is on: the exact per-source counts already
    /// written (see [`Session::write_counts`]).
    deltas: Option<ExactDeltas>,
}

pub async fn run(opts: TraceOptions, sink: &mut dyn Sink) -> Result<Summary, TraceError> {
    let mut s = Session::start(opts, sink)?;
    s.run().await?;
    s.finish()
}

/// The namespaces to trace (`--netns` or all) and how the summary names
/// them; `--netns` also becomes the live filter.
fn resolve_scope(
    opts: &mut TraceOptions,
    all: &BTreeMap<u32, NetnsInfo>,
) -> Result<(Vec<NetnsInfo>, Scope), TraceError> {
    let (list, netns, inode) = match &opts.netns {
        Some(spec) => {
            let ns = crate::kernel::workload::named_one(netns::resolve(spec)?);
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
        let all = crate::kernel::workload::named(live::host()?);
        let (prepared, ready) =
            live::prepare_outputs(&opts.backend, opts.write.take(), opts.ready_file.as_deref())?;
        let (list, scope_desc) = resolve_scope(&mut opts, &all)?;
        let started = live::start(
            opts.choice,
            &opts.backend,
            &list,
            scope_desc,
            live::bpf_log_line,
        )?;
        let (facts, scope) = (&started.facts, &started.scope);
        live::announce(facts, &opts.filter);
        let names = crate::kernel::workload::names_of(&all);
        let writer = match prepared {
            None => None,
            Some(w) => {
                let fills = live::ns_fills(scope);
                let header = live::capture_header(facts, &opts.filter, fills, &started.start);
                Some(Writer::start(w, header, &names).map_err(live::write_error)?)
            }
        };
        let tap = TraceTap {
            out: Out::new(sink),
            writer,
            write_warned: false,
        };
        let pipe = Pipeline::new(opts.filter.clone(), opts.max_sources, opts.amp.clone());
        // Counts per interval only where events can be a sample: a budget
        // and programs that keep per-source counts.
        let deltas = (opts.backend.event_budget > 0
            && started.tp.name() != crate::model::Name::Counters)
            .then(ExactDeltas::default);
        let now = Instant::now();
        Ok(Session {
            opts,
            live: started,
            ready,
            consumer: Consumer::new(pipe, names, tap),
            started: now,
            forecasts: Watcher::new(forecast::Config::default()),
            history: std::collections::VecDeque::new(),
            last_totals: KindCounts::default(),
            last_counters: BpfCounters::default(),
            sampling: None,
            deltas,
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
        while !self.consumer.tap.out.closed {
            let c = &mut self.consumer;
            tokio::select! {
                biased;
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = &mut deadline => break,
                _ = ticker.tick() => self.tick()?,
                r = Ring::next_batch(&mut self.live.ring, c) => r?,
            }
        }
        Ok(())
    }

    /// Every `--interval`: drain, close the rates' interval, refresh names,
    /// flush the capture, report findings and forecasts, redraw.
    fn tick(&mut self) -> Result<(), TraceError> {
        let c = &mut self.consumer;
        let counters = c.interval(&mut self.live.ring, &self.live.tp)?;
        self.write_counts()?;
        let budget = self.opts.backend.event_budget;
        self.sampling = counters.sampling_since(&self.last_counters, budget);
        self.last_counters = counters;
        self.close_history();
        let c = &mut self.consumer;
        if c.wants_names() {
            c.refresh_names(&netns::list());
        }
        c.tap.flush_capture(&c.names);
        report_findings(c, &self.live.facts.clock)?;
        let mut views = live::fills(&self.live.scope);
        let t_s = self.started.elapsed().as_secs_f64();
        for ns in views.iter_mut() {
            let sample = Sample {
                t_s,
                entries: ns.fill.count,
                inserted: None,
            };
            let w = self.forecasts.push(ns.inode, sample, ns.fill.max);
            ns.forecast = Some(w.forecast);
            if w.news {
                self.consumer.tap.out.send(|s| s.forecast(ns))?;
            }
        }
        let kernel = self.kernel_since_start(&views);
        self.draw(&counters, views, kernel)
    }

    /// Ends the sparkline's interval.
    fn close_history(&mut self) {
        let totals = self.consumer.pipe.agg.totals;
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
            if let (Some(now), Some(start)) = (&ns.stats, self.live.start.stats.get(&ns.inode))
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
        self.live.tp.for_each_source_count(|e, n| {
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
        let f = live::shown(views, self.opts.netns.is_none());
        let exact_top = match counters.sampled() && self.consumer.tap.out.shows_top() {
            false => None,
            true => Some(self.exact_top()?.0),
        };
        let history: Vec<KindCounts> = self.history.iter().copied().collect();
        let c = &mut self.consumer;
        let findings = c.pipe.amp.findings(&self.live.facts.clock);
        let amp = c.pipe.amp.summary();
        let view = LiveView {
            backend: &self.live.facts.hooks,
            refused: &self.live.facts.refused,
            per_packet: self.live.facts.per_packet,
            evictions: &self.live.facts.evictions,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            fills: &f,
            history: &history,
            agg: &c.pipe.agg,
            lost: counters.lost,
            shed: counters.shed,
            sampling: self.sampling,
            rule_drops: (self.live.tp.name() == crate::model::Name::Tracepoint)
                .then_some(counters.seen.rule_drop),
            kernel: Some(kernel),
            top_n: self.opts.top,
            exact_top: exact_top.as_deref(),
            findings: &findings,
            amp: &amp,
        };
        c.tap.out.send(|s| s.tick(&view))
    }

    /// The interval's exact per-source counts, while the event budget is
    /// on: all of them to the capture (which records before filters), the
    /// selected ones to the output.
    fn write_counts(&mut self) -> Result<(), TraceError> {
        let Some(d) = &mut self.deltas else {
            return Ok(());
        };
        let mut counts = live::interval_counts(&self.live.tp, d)?;
        if counts.sources.is_empty() {
            return Ok(());
        }
        let c = &mut self.consumer;
        if let Some(w) = &mut c.tap.writer {
            w.counts(&counts);
        }
        let ts = counts.ts_ns;
        counts
            .sources
            .retain(|s| c.pipe.select.matches(&s.as_event(ts)));
        c.tap.out.send(|s| s.counts(&counts))
    }

    /// Stops the producers and takes everything they left behind (see
    /// [`live::end`]), then writes the summary and the capture's trailer.
    fn finish(mut self) -> Result<Summary, TraceError> {
        let scope = &self.live.scope;
        let c = &mut self.consumer;
        let end = live::end(
            &mut self.live.tp,
            self.live.ring.take(),
            scope,
            &self.live.start,
            || kstats::snapshot(scope),
            self.ready.as_mut(),
            self.started,
            c,
        )?;
        report_findings(&mut self.consumer, &self.live.facts.clock)?;
        self.write_counts()?;
        // The ring overflowed or the budget shed drops: the counts of the
        // top sources come from the programs' exact per-source counts, not
        // from the events.
        let sampled = end.counters.sampled();
        let (top, exact_sources) = match sampled {
            true => self.exact_top()?,
            false => (top_sources(&self.consumer.pipe.agg, self.opts.top), 0),
        };
        let c = &mut self.consumer;
        let totals = live::totals(&self.live.facts, &c.pipe, &end, sampled, exact_sources);
        let summary = Summary::assemble(
            &self.live.facts,
            end.duration_s,
            totals,
            top,
            c.pipe.analyses(&self.live.facts.clock),
        );
        let recorded = c.tap.writer.take().map(|w| {
            let (files, written) = (w.files(), w.events_written());
            let now = crate::model::clock::monotonic_ns();
            let trailer = capture::Trailer::of(&summary, now, end.end.stats.clone(), written);
            w.finish(trailer).map(|()| (files, written))
        });
        c.tap.out.send(|s| s.finish(&summary))?;
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
