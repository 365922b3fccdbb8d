//! `conntrack-trace agent`: the live pipeline, always on, for fleets.
//!
//! The same session as `trace` (load, attach, drain the ring into
//! [`Pipeline::feed`], read the kernel's counters), with different ends:
//! Prometheus metrics on `--metrics-addr` ([`metrics`], [`http`]), state
//! changes as JSON lines on stderr ([`log`]), and a flight recorder
//! ([`recorder`]). After attaching it drops the capabilities it no longer
//! needs ([`caps`]).
//!
//! Glue copied from `trace.rs` (to be unified by the session refactor): the
//! ring drain loop with its pause, the capture header, the counters window
//! at teardown.

pub mod caps;
pub mod http;
pub mod log;
pub mod metrics;
pub mod nsfiles;
pub mod recorder;
pub mod selfstat;

use crate::model::{KindCounts, Scope};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    amplify::AmpConfig,
    backend::{self, Choice},
    capture::{self, format::NsFill},
    clock::Clock,
    error::TraceError,
    event::{Event, Kind},
    filter::Filter,
    forecast::{self, Estimator, Trend},
    kstats,
    live::{ring_pause, selection_line},
    netns::{self, NetnsInfo},
    outfile::ReadyFile,
    output::NetnsNames,
    pipeline::Pipeline,
};

use self::{
    log::State,
    metrics::{AmpGauge, Metrics, NsState, SeriesTable, WorkloadLabels},
    nsfiles::{Rescan, Tables},
    recorder::{RecordOptions, Recorder},
};

pub struct AgentOptions {
    pub choice: Choice,
    pub backend: backend::Options,
    pub metrics_addr: SocketAddr,
    /// Cap on per-source series.
    pub max_series: usize,
    pub amp: AmpConfig,
    /// How often the kernel is read and the metrics refreshed.
    pub interval: Duration,
    pub record: Option<RecordOptions>,
    pub ready_file: Option<PathBuf>,
    /// Drops are "stopped" after this long without one.
    pub quiet: Duration,
    /// `--metrics-label-pod`: per-namespace series carry the workload.
    pub label_pod: bool,
}

/// Fill above which a namespace is reported high, and below which it is
/// normal again (hysteresis, so a table at 90 % does not flap).
const HIGH_FILL: f64 = 90.0;
const NORMAL_FILL: f64 = 85.0;
/// Events drained per wakeup before the loop looks at its timers.
const DRAIN_BATCH: usize = 65_536;

use crate::clock::monotonic_ns;

fn names_of(list: &BTreeMap<u32, NetnsInfo>) -> NetnsNames {
    crate::workload::names_of(list)
}

/// The ring consumer: every event to the recorder, then the pipeline, then
/// the per-source series and per-namespace counts.
struct Consumer {
    pipe: Pipeline<Filter>,
    series: SeriesTable,
    per_netns: BTreeMap<(Kind, u32), u64>,
    decode_errors: u64,
    names: NetnsNames,
    unknown_netns: bool,
    recorder: Option<Recorder>,
}

impl Consumer {
    fn drain(&mut self, ring: &mut RingBuf<MapData>, limit: usize) -> usize {
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
            self.handle(&ev);
        }
        n
    }

    fn handle(&mut self, ev: &Event) {
        if let Some(r) = &mut self.recorder {
            r.event(ev);
        }
        if !self.pipe.feed(ev, &self.names) {
            return;
        }
        self.series.record(ev);
        *self.per_netns.entry((ev.kind, ev.netns)).or_default() += 1;
        if !self.names.contains_key(&ev.netns) {
            self.unknown_netns = true;
        }
    }

    /// Names (and workloads) of the namespaces in `list` from the
    /// resolver's cache. Adds, never drops, a name: a counter's `netns`
    /// label must not change under it, and without CAP_SYS_PTRACE the list
    /// sees fewer processes than at start. A namespace named before its
    /// workload was found (a container's namespace exists a moment before
    /// its process joins the container's cgroup) takes the workload's name.
    fn refresh_names(&mut self, list: &BTreeMap<u32, NetnsInfo>) {
        let now_named = names_of(list);
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

    fn name(&self, ino: u32) -> String {
        self.names
            .get(&ino)
            .cloned()
            .unwrap_or_else(|| ino.to_string())
    }
}

/// Follows the namespaces (once per tick, with the capabilities to enter
/// them): `tables` opens the new ones and closes the gone ones, the names
/// are refreshed when the set changed, and the per-namespace state of the
/// gone is forgotten.
fn follow_namespaces(
    tables: &mut Tables,
    consumer: &mut Consumer,
    estimators: &mut HashMap<u32, Estimator>,
    watch: &mut Watch,
) {
    let list = netns::list();
    let Rescan {
        added,
        removed,
        refused,
    } = tables.rescan(&list);
    if !added.is_empty() || consumer.unknown_netns || crate::workload::wants_refresh() {
        consumer.refresh_names(&list);
    }
    for (inode, _) in added {
        log::emit(&State::NetnsAdded {
            netns: consumer.name(inode),
            inode,
        });
    }
    for (inode, _) in removed {
        estimators.remove(&inode);
        watch.high.remove(&inode);
        log::emit(&State::NetnsRemoved {
            netns: consumer.name(inode),
            inode,
        });
    }
    for why in refused {
        log::emit(&State::Warning {
            message: format!("no table metrics for a new namespace: {why}"),
        });
    }
}

/// What the loop remembers between ticks to report changes.
#[derive(Default)]
struct Watch {
    high: BTreeSet<u32>,
    dropping: bool,
    last_drops: u64,
    last_drop_at: Option<Instant>,
    open_amp: BTreeSet<(String, String)>,
    findings_opened: u64,
}

pub async fn run(opts: AgentOptions) -> Result<(), TraceError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(TraceError::io("reading /proc/self/status"))?;
    crate::error::check_privileges(&status)?;
    // Everything that can fail because of the command line fails before
    // anything is loaded: the port, the record directory, the ready file.
    let listener = http::bind(opts.metrics_addr)
        .await
        .map_err(|e| TraceError::Usage(format!("--metrics-addr {}: {e}", opts.metrics_addr)))?;
    let mut recorder = match &opts.record {
        Some(r) => Some(Recorder::prepare(r.clone()).map_err(|e| match e {
            recorder::RecordError::Write(w) if !w.is_refusal() => TraceError::Other(w.to_string()),
            e => TraceError::Usage(e.to_string()),
        })?),
        None => None,
    };
    let mut ready_file = match &opts.ready_file {
        Some(p) => Some(
            ReadyFile::prepare(p, &[])
                .map_err(|e| TraceError::Usage(format!("--ready-file: {e}")))?,
        ),
        None => None,
    };

    let all = netns::list();
    let scope_list: Vec<NetnsInfo> = all.values().cloned().collect();
    let held = netns::hold(&scope_list);
    let start_cell = std::cell::RefCell::new(kstats::Snapshot::default());
    let (mut tp, refused) = backend::open(opts.choice, &opts.backend, &held, &|| {
        *start_cell.borrow_mut() = kstats::snapshot(&held);
    })?;
    let start_stats = start_cell.into_inner();
    let backend_desc = tp.describe();
    let per_packet = tp.per_packet();
    crate::output::pipe::diag(selection_line(&backend_desc, &refused));
    if !refused.is_empty() {
        log::emit(&State::BackendFellBack {
            backend: tp.name().as_str().into(),
            refused: refused
                .iter()
                .map(|r| format!("{}: {}", r.backend.as_str(), r.reason))
                .collect(),
        });
    }

    // Every namespace's files, opened while we may still enter them.
    let (mut tables, uncovered) = Tables::open(&held);

    // Capabilities: what remains after this is all any later thread
    // (the capture writer's, HTTP connections) can have. CAP_SYS_ADMIN and
    // CAP_SYS_PTRACE stay where the agent has them: entering a namespace
    // that appears later needs the first (setns), seeing every process's
    // namespace (so that a namespace missing from the list is gone, not
    // hidden) the second; the counters backend also re-enters every
    // namespace each tick.
    let keep = [caps::CAP_BPF, caps::CAP_SYS_ADMIN, caps::CAP_SYS_PTRACE];
    let follow = match caps::drop_all_but(&keep) {
        Ok(kept) => {
            let follow =
                kept.contains(&caps::CAP_SYS_ADMIN) && kept.contains(&caps::CAP_SYS_PTRACE);
            log::emit(&State::CapabilitiesDropped {
                kept: kept.into_iter().map(caps::name).collect(),
            });
            follow
        }
        Err(e) => {
            log::emit(&State::Warning {
                message: format!(
                    "could not drop capabilities: {e}; namespaces that appear later get no table metrics"
                ),
            });
            false
        }
    };

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
    let names = names_of(&all);
    let scope_desc = Scope {
        netns: "all".into(),
        netns_inode: None,
        namespaces: held.len(),
        uncovered: start_stats.missing.clone(),
    };
    let recorder = match recorder.take() {
        Some((mut rec, prepared)) => {
            let header = capture::Header {
                format_version: capture::format::FORMAT_VERSION,
                tool_version: env!("CARGO_PKG_VERSION").into(),
                hostname: capture::hostname(),
                kernel_release: capture::kernel_release(),
                backend: backend_desc.clone(),
                evictions: tp.evictions().describe(),
                start_unix_ns,
                start_mono_ns,
                capture_id: start_unix_ns as u64 ^ (u64::from(std::process::id()) << 40),
                seq: 0,
                scope: scope_desc.clone(),
                filter: capture::format::RecordedFilter::of(&Filter::default()),
                conntrack: tables
                    .iter()
                    .filter_map(|f| {
                        Some(NsFill {
                            netns: f.name.clone(),
                            inode: f.inode,
                            fill: f.fill()?,
                        })
                    })
                    .collect(),
                kernel_start: start_stats.stats.clone(),
                backend_refused: refused.clone(),
                per_packet,
                backend_name: Some(tp.name().as_str().into()),
            };
            rec.start(prepared, header, &names)
                .map_err(|e| TraceError::Other(e.to_string()))?;
            Some(rec)
        }
        None => None,
    };

    let m = Metrics::default();
    {
        let mut s = m.0.lock().unwrap_or_else(|p| p.into_inner());
        s.version = env!("CARGO_PKG_VERSION").into();
        s.backend = tp.name().as_str().into();
        s.kernel = capture::kernel_release();
        s.per_packet = per_packet;
        s.series_cap = opts.max_series;
        s.start_unix_s = start_unix_ns as f64 / 1e9;
        s.label_pod = opts.label_pod;
    }
    let shared = http::Shared {
        registry: Arc::new(metrics::registry(&m)),
        ready: Arc::default(),
    };
    let server = tokio::spawn(http::serve(listener, shared.clone()));

    let mut consumer = Consumer {
        pipe: Pipeline::new(
            Filter::default(),
            crate::aggregate::DEFAULT_MAX_SOURCES,
            opts.amp.clone(),
        ),
        series: SeriesTable::new(opts.max_series),
        per_netns: BTreeMap::new(),
        decode_errors: 0,
        names,
        unknown_netns: false,
        recorder,
    };
    let mut estimators: HashMap<u32, Estimator> = HashMap::new();
    let mut watch = Watch::default();

    let mut sigint =
        signal(SignalKind::interrupt()).map_err(TraceError::io("installing SIGINT handler"))?;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(TraceError::io("installing SIGTERM handler"))?;
    let mut sigusr1 = signal(SignalKind::user_defined1())
        .map_err(TraceError::io("installing SIGUSR1 handler"))?;

    let mut afd = match ring {
        // SAFETY: the AsyncFd owns the ring (and its fd) until into_inner()
        // below; nothing else closes the fd meanwhile.
        Some(ring) => Some(
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                TraceError::Io {
                    context: "polling the ring buffer".into(),
                    source: e.into(),
                }
            })?,
        ),
        None => None,
    };
    let pause = ring_pause(opts.backend.ring_bytes);
    let mut ticker = tokio::time::interval(opts.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = KindCounts::default();
    let mut last_tick = Instant::now();

    let signal_name = loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigusr1.recv() => {
                if let Some(r) = &mut consumer.recorder {
                    r.incident("SIGUSR1");
                } else {
                    log::emit(&State::Warning { message: "SIGUSR1: no --record-dir, nothing to keep".into() });
                }
            }
            _ = ticker.tick() => {
                if let Some(afd) = afd.as_mut() {
                    consumer.drain(afd.get_mut(), usize::MAX);
                }
                let counters = tp.counters()?;
                if !per_packet {
                    consumer.pipe.agg.record_totals(&counters.seen.sub(&last_seen));
                    last_seen = counters.seen;
                }
                let now = Instant::now();
                consumer.pipe.agg.tick(now - last_tick);
                last_tick = now;
                if follow {
                    follow_namespaces(&mut tables, &mut consumer, &mut estimators, &mut watch);
                } else if consumer.unknown_netns || crate::workload::wants_refresh() {
                    consumer.refresh_names(&netns::list());
                }
                let t_s = started.elapsed().as_secs_f64();
                let mut nss = BTreeMap::new();
                for f in tables.iter() {
                    let Some(fill) = f.fill() else { continue };
                    let name = consumer.name(f.inode);
                    let est = estimators.entry(f.inode).or_insert_with(|| Estimator::new(forecast::Config::default()));
                    est.push(forecast::Sample { t_s, entries: fill.count, inserted: None }, fill.max);
                    let fc = est.forecast();
                    let eta_s = match fc.trend {
                        Trend::Full => Some(0.0),
                        Trend::Filling => fc.eta_s,
                        _ => None,
                    };
                    let pct = fill.percent();
                    if pct >= HIGH_FILL && watch.high.insert(f.inode) {
                        log::emit(&State::TableHigh { netns: name.clone(), entries: fill.count, max: fill.max, fill_percent: pct });
                    } else if pct < NORMAL_FILL && watch.high.remove(&f.inode) {
                        log::emit(&State::TableNormal { netns: name.clone(), entries: fill.count, max: fill.max, fill_percent: pct });
                    }
                    nss.insert(name, NsState { fill, stats: f.stats(), eta_s });
                }
                // Drops started / stopped (packet drops: table_full and
                // insert_failed; evictions are not drops of a packet).
                let totals = consumer.pipe.agg.totals;
                let drops = totals.table_full + totals.insert_failed;
                if drops > watch.last_drops {
                    watch.last_drop_at = Some(now);
                    if !watch.dropping {
                        watch.dropping = true;
                        log::emit(&State::DropsStarted { drops: drops - watch.last_drops });
                        if let Some(r) = &mut consumer.recorder {
                            r.incident("drops started");
                        }
                    }
                } else if watch.dropping
                    && watch.last_drop_at.is_some_and(|t| now - t >= opts.quiet)
                {
                    watch.dropping = false;
                    log::emit(&State::DropsStopped { drops, quiet_s: opts.quiet.as_secs_f64() });
                }
                watch.last_drops = drops;
                // Amplification: open while a flagged source dropped within
                // the window.
                for f in consumer.pipe.amp.take_changed(&clock) {
                    let key = (f.src.clone().unwrap_or_default(), f.service.clone());
                    if watch.open_amp.insert(key.clone()) {
                        watch.findings_opened += 1;
                        log::emit(&State::AmplificationOpened { src: key.0, service: key.1, factor: f.factor, message: f.message.clone() });
                    }
                }
                let window_ns = consumer.pipe.amp.config().window.as_nanos() as u64;
                let mono = monotonic_ns();
                let mut gauges = Vec::new();
                let mut still_open = BTreeSet::new();
                for f in consumer.pipe.amp.findings(&clock) {
                    let key = (f.src.clone().unwrap_or_default(), f.service.clone());
                    if !watch.open_amp.contains(&key) {
                        continue;
                    }
                    if mono.saturating_sub(f.last_ts_ns) > window_ns {
                        log::emit(&State::AmplificationClosed { src: key.0.clone(), service: key.1.clone(), attempts: f.attempts });
                        continue;
                    }
                    still_open.insert(key.clone());
                    gauges.push(AmpGauge {
                        src: key.0,
                        proto: f.proto.clone(),
                        port: f.port,
                        factor: f.factor,
                        retransmission_share: if f.attempts == 0 { 0.0 } else { f.retransmissions as f64 / f.attempts as f64 },
                    });
                }
                watch.open_amp = still_open;
                if let Some(r) = &mut consumer.recorder {
                    r.tick(&consumer.names);
                }
                let own = selfstat::read();
                let mut s = m.0.lock().unwrap_or_else(|p| p.into_inner());
                s.drops = consumer.per_netns.iter().map(|((k, ns), n)| ((*k, consumer.name(*ns)), *n)).collect();
                s.drops_total_only = consumer.pipe.agg.totals;
                s.lost = counters.lost;
                s.decode_errors = consumer.decode_errors;
                s.set_sources(&consumer.series, |i| consumer.name(i));
                s.namespaces = nss;
                if opts.label_pod {
                    s.workloads = consumer.names.workloads().iter().map(|(i, w)| (consumer.name(*i), WorkloadLabels::of(w))).collect();
                }
                s.amp = gauges;
                s.findings_opened = watch.findings_opened;
                if let Some((cpu, rss)) = own {
                    s.cpu_seconds = cpu;
                    s.rss_bytes = rss;
                }
                drop(s);
                if !shared.ready.swap(true, Ordering::Relaxed) {
                    // Ready once attached and the first metrics are in.
                    if let Some(r) = &mut ready_file {
                        r.publish().map_err(|e| TraceError::Other(format!("--ready-file: {e}")))?;
                    }
                    log::emit(&State::Started {
                        version: env!("CARGO_PKG_VERSION").into(),
                        backend: backend_desc.clone(),
                        refused: refused.iter().map(|r| format!("{}: {}", r.backend.as_str(), r.reason)).collect(),
                        metrics_addr: opts.metrics_addr.to_string(),
                        namespaces: tables.len(),
                        uncovered: uncovered.clone(),
                    });
                }
            }
            guard = async { afd.as_mut().expect("guarded by the precondition").readable_mut().await }, if afd.is_some() => {
                let mut guard = guard.map_err(TraceError::io("polling the ring buffer"))?;
                let n = consumer.drain(guard.get_inner_mut(), DRAIN_BATCH);
                if n < DRAIN_BATCH {
                    guard.clear_ready();
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
    };
    log::emit(&State::Stopping {
        signal: signal_name.into(),
    });
    shared.ready.store(false, Ordering::Relaxed);
    server.abort();
    let mut ring = afd.map(AsyncFd::into_inner);
    tp.detach();
    // The namespaces' counters through the files already open (setns may
    // no longer be allowed).
    let end_stats = tables.end_snapshot();
    if let Some(r) = &mut ready_file {
        r.withdraw();
    }
    if let Some(ring) = ring.as_mut() {
        consumer.drain(ring, usize::MAX);
    }
    let counters = tp.counters()?;
    let (kernel, covered, uncovered_end) = kstats::window(&held, &start_stats, &end_stats);
    let duration_s = started.elapsed().as_secs_f64();
    let complete = per_packet
        && Kind::ALL.iter().all(|k| {
            consumer.pipe.received.get(*k) + counters.lost.get(*k) == counters.seen.get(*k)
        });
    if let Some(mut rec) = consumer.recorder.take() {
        let written = rec.events_written();
        let trailer = capture::Trailer {
            backend: tp.name().as_str().into(),
            duration_s,
            end_mono_ns: monotonic_ns(),
            events: consumer.pipe.received,
            matched: consumer.pipe.agg.totals,
            lost: counters.lost,
            observed: counters.seen,
            complete,
            decode_errors: consumer.decode_errors,
            kernel_end: end_stats.stats.clone(),
            kernel,
            namespaces: covered,
            uncovered: uncovered_end,
            events_written: written,
            unclassified_drops: counters.unclassified,
            unmatched_drop_counts: counters.drop_unmatched,
            // The agent's rolling files hold what arrived; its metrics
            // come from the events (the exact per-source counts are a
            // `trace` summary's).
            exact_top: None,
            exact_sources: 0,
        };
        rec.finish(trailer)
            .map_err(|e| TraceError::Other(e.to_string()))?;
    }
    crate::output::pipe::diag(format_args!(
        "conntrack-trace: agent stopped ({signal_name}) after {duration_s:.1} s: {} events, kernel drop +{}, lost {}",
        consumer.pipe.received.total(),
        kernel.drop,
        counters.lost.total()
    ));
    Ok(())
}
