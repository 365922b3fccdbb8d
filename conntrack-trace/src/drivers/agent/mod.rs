//! `conntrack-trace agent`: the live pipeline, always on, for fleets.
//!
//! The same session as `trace` (load, attach, drain the ring into
//! [`Pipeline::feed`], read the kernel's counters), with different ends:
//! Prometheus metrics on `--metrics-addr` ([`metrics`], [`http`]), state
//! changes as JSON lines on stderr ([`log`]), and a flight recorder
//! ([`recorder`]). After attaching it drops the capabilities it no longer
//! needs ([`caps`]). With `--autopilot dry-run|on` it raises
//! `nf_conntrack_max` as `doctor` would advise ([`autopilot`]).
//!
//! What it shares with `trace` — the backend opened between the start
//! counters and the attach, the ring drain, the capture header, the end of
//! a session and its totals — is in [`crate::drivers::live`].

pub mod alerts;
pub mod autopilot;
pub mod caps;
pub mod http;
pub mod log;
pub mod metrics;
pub mod nsfiles;
pub mod recorder;
pub mod selfstat;
pub mod webconfig;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};

use crate::{
    analysis::aggregate::DEFAULT_MAX_SOURCES,
    analysis::amplify::AmpConfig,
    analysis::filter::Filter,
    analysis::forecast::{self, Forecast, Trend, Watcher},
    analysis::pipeline::Pipeline,
    analysis::sources::SourceKey,
    drivers::live::{self, Ring, Tap, selection_line},
    formats::capture::{self, format::NsFill},
    formats::outfile::ReadyFile,
    formats::output::{NetnsNames, pipe::diag},
    kernel::backend::{self, Backend, BpfCounters, Choice},
    kernel::error::TraceError,
    kernel::kstats,
    kernel::netns::{self, NetnsInfo},
    model::clock::monotonic_ns,
    model::event::{Event, Kind},
    model::{Scope, SessionFacts, Summary},
};

use self::{
    autopilot::{Autopilot, Look, Outcome},
    log::State,
    metrics::{AmpGauge, Metrics, NsState, SeriesKey, SeriesTable, WorkloadLabels},
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
    pub autopilot: autopilot::Options,
    /// `--web-config-file`: TLS and basic auth for the HTTP server.
    pub web_config: Option<PathBuf>,
}

/// Fill above which a namespace is reported high, and below which it is
/// normal again (hysteresis, so a table at 90 % does not flap).
const HIGH_FILL: f64 = 90.0;
const NORMAL_FILL: f64 = 85.0;

/// What the agent does with the ring's events beyond the pipeline: every
/// event to the flight recorder, the selected ones to the per-source
/// series and per-namespace counts.
struct AgentTap {
    series: SeriesTable,
    per_netns: BTreeMap<(Kind, u32), u64>,
    recorder: Option<Recorder>,
}

impl Tap for AgentTap {
    fn record(&mut self, ev: &Event) {
        if let Some(r) = &mut self.recorder {
            r.event(ev);
        }
    }

    fn selected(&mut self, ev: &Event, _names: &NetnsNames) -> Result<(), TraceError> {
        self.series.record(ev);
        *self.per_netns.entry((ev.kind, ev.netns)).or_default() += 1;
        Ok(())
    }
}

impl AgentTap {
    /// Once the events are a sample (the ring lost some, or the event
    /// budget shed some), the per-namespace and per-source counts come
    /// from the programs' exact per-source counts: what Prometheus sums
    /// stays the kernel's count (never less than what the events said).
    fn take_exact(&mut self, tp: &Backend) -> Result<(), TraceError> {
        let mut exact: HashMap<SeriesKey, u64> = HashMap::new();
        tp.for_each_source_count(|e, n| {
            let key = SeriesKey {
                kind: e.kind,
                netns: e.netns,
                source: SourceKey::of(e),
            };
            *exact.entry(key).or_default() += n;
        })?;
        let mut per_netns: BTreeMap<(Kind, u32), u64> = BTreeMap::new();
        for (k, n) in &exact {
            *per_netns.entry((k.kind, k.netns)).or_default() += n;
        }
        for (k, n) in per_netns {
            let v = self.per_netns.entry(k).or_default();
            *v = (*v).max(n);
        }
        self.series.set_exact(&exact);
        Ok(())
    }

    /// SIGUSR1: keep the minutes around now as an incident capture.
    fn incident(&mut self, why: &str) {
        match &mut self.recorder {
            Some(r) => {
                r.incident(why);
            }
            None => log::emit(&State::Warning {
                message: format!("{why}: no --record-dir, nothing to keep"),
            }),
        }
    }

    /// Alertmanager's webhook: keep an incident (as SIGUSR1 does) and
    /// write the firing alerts into it.
    fn alert(&mut self, firing: &alerts::Firing) -> Result<PathBuf, String> {
        let r = self
            .recorder
            .as_mut()
            .ok_or("no flight recorder (--record-dir)")?;
        let dir = r
            .incident(&firing.reason())
            .ok_or("the incident directory could not be created")?;
        alerts::write_note(&dir, firing)
            .map_err(|e| format!("writing the alert into {}: {e}", dir.display()))?;
        Ok(dir)
    }
}

type Consumer = live::Consumer<AgentTap>;

/// Follows the namespaces (once per tick, with the capabilities to enter
/// them): `tables` opens the new ones and closes the gone ones, the names
/// are refreshed when the set changed, and the per-namespace state of the
/// gone is forgotten.
fn follow_namespaces(
    tables: &mut Tables,
    consumer: &mut Consumer,
    forecasts: &mut Watcher,
    watch: &mut Watch,
    pilot: Option<&mut Autopilot>,
) {
    let list = netns::list();
    let Rescan {
        added,
        removed,
        refused,
    } = tables.rescan(&list);
    if !added.is_empty() || consumer.wants_names() {
        consumer.refresh_names(&list);
    }
    for (inode, _) in added {
        log::emit(&State::NetnsAdded {
            netns: consumer.name(inode),
            inode,
        });
    }
    let mut pilot = pilot;
    for (inode, _) in removed {
        forecasts.forget(inode);
        if let Some(p) = pilot.as_deref_mut() {
            p.forget(inode);
        }
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

/// A table's (inode, entries, forecast) this tick, for the autopilot.
type TableForecast = (u32, u64, Forecast);

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

/// The agent in three phases, as `trace` ([`crate::drivers::trace`]):
/// [`Agent::start`] (command-line checks, backend, namespaces'
/// files, capabilities, recorder, metrics server), [`Agent::run`] (the
/// event loop; [`Agent::tick`] each interval) and [`Agent::finish`]
/// (detach, end counters, the recorder's trailer).
struct Agent {
    opts: AgentOptions,
    facts: SessionFacts,
    tp: Backend,
    /// `--bpf-log`'s reader (None when off): stops with the agent.
    _bpf_log: Option<crate::kernel::backend::bpflog::Reader>,
    /// Every namespace at start, held open so that both snapshots read the
    /// same ones.
    held: Vec<netns::Held>,
    start_stats: kstats::Snapshot,
    /// Each namespace's table and counters files (see [`nsfiles`]).
    tables: Tables,
    /// Namespaces at start whose files could not be opened, and why.
    uncovered: Vec<String>,
    /// The capabilities to follow namespaces that come and go were kept.
    follow: bool,
    ring: Option<Ring>,
    consumer: Consumer,
    metrics: Metrics,
    shared: http::Shared,
    server: tokio::task::JoinHandle<()>,
    /// `POST /alertmanager` notifications (with a recorder).
    alerts: Option<tokio::sync::mpsc::Receiver<alerts::Request>>,
    ready_file: Option<ReadyFile>,
    started: Instant,
    forecasts: Watcher,
    watch: Watch,
    /// `--autopilot dry-run|on`.
    pilot: Option<Autopilot>,
}

pub async fn run(opts: AgentOptions) -> Result<(), TraceError> {
    let mut agent = Agent::start(opts).await?;
    let signal = agent.run().await?;
    agent.finish(signal)
}

/// Everything that can fail because of the command line, before anything
/// is loaded: the port, the record directory, the ready file.
struct Prepared {
    listener: tokio::net::TcpListener,
    web: Option<webconfig::WebConfig>,
    recorder: Option<(Recorder, capture::writer::Prepared)>,
    ready_file: Option<ReadyFile>,
}

async fn prepare(opts: &AgentOptions) -> Result<Prepared, TraceError> {
    if opts.autopilot.mode == autopilot::Mode::On {
        autopilot::check_writable(&opts.autopilot).map_err(TraceError::Privileges)?;
    }
    let listener = http::bind(opts.metrics_addr)
        .await
        .map_err(|e| TraceError::Usage(format!("--metrics-addr {}: {e}", opts.metrics_addr)))?;
    let web = match &opts.web_config {
        Some(p) => {
            Some(webconfig::WebConfig::load(p).map_err(|e| TraceError::Usage(e.to_string()))?)
        }
        None => None,
    };
    let recorder = match &opts.record {
        Some(r) => Some(Recorder::prepare(r.clone()).map_err(|e| match e {
            recorder::RecordError::Write(w) if !w.is_refusal() => TraceError::Other(w.to_string()),
            e => TraceError::Usage(e.to_string()),
        })?),
        None => None,
    };
    let ready_file = match &opts.ready_file {
        Some(p) => Some(
            ReadyFile::prepare(p, &[])
                .map_err(|e| TraceError::Usage(format!("--ready-file: {e}")))?,
        ),
        None => None,
    };
    Ok(Prepared {
        listener,
        web,
        recorder,
        ready_file,
    })
}

/// Drops every capability but CAP_BPF — and CAP_SYS_ADMIN and
/// CAP_SYS_PTRACE where the agent has them: entering a namespace that
/// appears later needs the first (setns), seeing every process's namespace
/// (so that a namespace missing from the list is gone, not hidden) the
/// second; the counters backend also re-enters every namespace each tick.
/// What remains is all any later thread (the capture writer's, HTTP
/// connections) can have. Returns whether namespaces can be followed.
fn drop_capabilities(autopilot: autopilot::Mode) -> bool {
    let mut keep = vec![caps::CAP_BPF, caps::CAP_SYS_ADMIN, caps::CAP_SYS_PTRACE];
    // `--autopilot on` writes nf_conntrack_max: a root in a user namespace
    // needs CAP_NET_ADMIN for that (net_ctl_permissions()).
    if autopilot == autopilot::Mode::On {
        keep.push(caps::CAP_NET_ADMIN);
    }
    match caps::drop_all_but(&keep) {
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
    }
}

/// `--autopilot dry-run|on`: the entry cost (as `doctor` measures it), the
/// RAM, the budget; one `autopilot_armed` line. `None` when off.
fn arm_autopilot(opts: &AgentOptions) -> Option<Autopilot> {
    let o = &opts.autopilot;
    if o.mode == autopilot::Mode::Off {
        return None;
    }
    let mut cost = crate::drivers::doctor::memory::measure(None);
    if cost.object_source.starts_with("assumed") {
        // No /proc/slabinfo row: BTF's sizeof(struct nf_conn), as doctor.
        let btf = crate::kernel::btf::KernelBtf::load(&opts.backend.btf_path).ok();
        cost = crate::drivers::doctor::memory::measure(btf.as_ref());
    }
    let ram = crate::drivers::doctor::memory::ram_bytes().unwrap_or(0);
    let pilot = Autopilot::new(o.clone(), cost, ram);
    let b = pilot.budget();
    log::emit(&State::AutopilotArmed {
        mode: o.mode,
        horizon_s: o.horizon.as_secs_f64(),
        cooldown_s: o.cooldown.as_secs_f64(),
        memory_budget_bytes: b.bytes,
        memory_budget: b.what.clone(),
        max: autopilot::read_u64(&o.max_path()).unwrap_or(0),
    });
    Some(pilot)
}

/// The recorder's first file, headed like a `trace --write` capture.
fn start_recorder(
    prepared: Option<(Recorder, capture::writer::Prepared)>,
    facts: &SessionFacts,
    tables: &Tables,
    start: &kstats::Snapshot,
    names: &NetnsNames,
) -> Result<Option<Recorder>, TraceError> {
    let Some((mut rec, prepared)) = prepared else {
        return Ok(None);
    };
    let fills = tables
        .iter()
        .filter_map(|f| {
            Some(NsFill {
                netns: f.name.clone(),
                inode: f.inode,
                fill: f.fill()?,
            })
        })
        .collect();
    let header = live::capture_header(facts, &Filter::default(), fills, start);
    rec.start(prepared, header, names)
        .map_err(|e| TraceError::Other(e.to_string()))?;
    Ok(Some(rec))
}

/// The metrics' fixed part, and the server that exposes them (with the
/// webhook's channel when there is a recorder to pin incidents in).
fn serve(
    listener: tokio::net::TcpListener,
    web: Option<webconfig::WebConfig>,
    recording: bool,
    opts: &AgentOptions,
    facts: &SessionFacts,
) -> Served {
    let m = Metrics::default();
    {
        let mut s = m.0.lock().unwrap_or_else(|p| p.into_inner());
        s.version = facts.version.clone();
        s.backend = facts.backend;
        s.kernel = capture::kernel_release();
        s.per_packet = facts.per_packet;
        s.series_cap = opts.max_series;
        s.start_unix_s = facts.clock.start_unix_ns as f64 / 1e9;
        s.label_pod = opts.label_pod;
    }
    let mut shared = http::Shared::new(metrics::registry(&m));
    let (tls, auth) = web.map_or((None, None), |w| (w.tls, w.auth));
    shared.auth = auth;
    let alerts = recording.then(|| {
        let (tx, rx) = tokio::sync::mpsc::channel(ALERT_QUEUE);
        shared.alerts = Some(tx);
        rx
    });
    let server = tokio::spawn(http::serve(listener, shared.clone(), tls));
    Served {
        metrics: m,
        shared,
        server,
        alerts,
    }
}

/// Webhook notifications waiting for the loop (more: 503, Alertmanager
/// retries).
const ALERT_QUEUE: usize = 16;

struct Served {
    metrics: Metrics,
    shared: http::Shared,
    server: tokio::task::JoinHandle<()>,
    alerts: Option<tokio::sync::mpsc::Receiver<alerts::Request>>,
}

/// The next webhook notification; never, without a recorder.
async fn next_alert(
    rx: &mut Option<tokio::sync::mpsc::Receiver<alerts::Request>>,
) -> alerts::Request {
    match rx {
        Some(rx) => match rx.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl Agent {
    async fn start(opts: AgentOptions) -> Result<Agent, TraceError> {
        let all = live::host()?;
        let p = prepare(&opts).await?;
        let list: Vec<NetnsInfo> = all.values().cloned().collect();
        let scope = Scope {
            netns: "all".into(),
            netns_inode: None,
            namespaces: list.len(),
            uncovered: Vec::new(),
        };
        let live::Started {
            facts,
            tp,
            scope: held,
            start: start_stats,
            ring,
            bpf_log,
        } = live::start(opts.choice, &opts.backend, &list, scope, log::emit_bpf)?;
        diag(selection_line(&facts.hooks, &facts.refused));
        if !facts.refused.is_empty() {
            log::emit(&State::BackendFellBack {
                backend: facts.backend,
                refused: facts.refused.iter().map(|r| r.to_string()).collect(),
            });
        }
        // Every namespace's files, opened while we may still enter them.
        let (tables, uncovered) = Tables::open(&held);
        // The entry cost is read while /proc/slabinfo is still ours to read.
        let pilot = arm_autopilot(&opts);
        let follow = drop_capabilities(opts.autopilot.mode);
        let names = crate::kernel::workload::names_of(&all);
        let recorder = start_recorder(p.recorder, &facts, &tables, &start_stats, &names)?;
        let recording = recorder.is_some();
        let Served {
            metrics,
            shared,
            server,
            alerts,
        } = serve(p.listener, p.web, recording, &opts, &facts);
        let tap = AgentTap {
            series: SeriesTable::new(opts.max_series),
            per_netns: BTreeMap::new(),
            recorder,
        };
        let pipe = Pipeline::new(Filter::default(), DEFAULT_MAX_SOURCES, opts.amp.clone());
        Ok(Agent {
            opts,
            facts,
            tp,
            _bpf_log: bpf_log,
            held,
            start_stats,
            tables,
            uncovered,
            follow,
            ring,
            consumer: Consumer::new(pipe, names, tap),
            metrics,
            shared,
            server,
            alerts,
            ready_file: p.ready_file,
            started: Instant::now(),
            forecasts: Watcher::new(forecast::Config::default()),
            watch: Watch::default(),
            pilot,
        })
    }

    /// Until SIGINT or SIGTERM (returns its name); SIGUSR1 and a firing
    /// alert from Alertmanager keep an incident capture.
    async fn run(&mut self) -> Result<&'static str, TraceError> {
        let mut sigint =
            signal(SignalKind::interrupt()).map_err(TraceError::io("installing SIGINT handler"))?;
        let mut sigterm = signal(SignalKind::terminate())
            .map_err(TraceError::io("installing SIGTERM handler"))?;
        let mut sigusr1 = signal(SignalKind::user_defined1())
            .map_err(TraceError::io("installing SIGUSR1 handler"))?;
        let mut ticker = tokio::time::interval(self.opts.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let c = &mut self.consumer;
            tokio::select! {
                biased;
                _ = sigint.recv() => return Ok("SIGINT"),
                _ = sigterm.recv() => return Ok("SIGTERM"),
                _ = sigusr1.recv() => self.consumer.tap.incident("SIGUSR1"),
                req = next_alert(&mut self.alerts) => {
                    let r = self.consumer.tap.alert(&req.firing);
                    let _ = req.reply.send(r);
                }
                _ = ticker.tick() => self.tick()?,
                r = Ring::next_batch(&mut self.ring, c) => r?,
            }
        }
    }

    /// Every `--interval`: drain, close the rates' interval, follow the
    /// namespaces, report state changes, refresh the metrics.
    fn tick(&mut self) -> Result<(), TraceError> {
        let c = &mut self.consumer;
        let counters = c.interval(&mut self.ring, &self.tp)?;
        if counters.sampled() {
            c.tap.take_exact(&self.tp)?;
        }
        if self.follow {
            follow_namespaces(
                &mut self.tables,
                c,
                &mut self.forecasts,
                &mut self.watch,
                self.pilot.as_mut(),
            );
        } else if c.wants_names() {
            c.refresh_names(&netns::list());
        }
        let now = Instant::now();
        let (tables, forecasts) = self.table_states();
        self.drop_state(now);
        self.autopilot(now, &forecasts);
        let amp = self.amplification();
        let c = &mut self.consumer;
        if let Some(r) = &mut c.tap.recorder {
            r.tick(&c.names);
        }
        self.publish(&counters, tables, amp);
        self.mark_ready()
    }

    /// Each table's fill and forecast; a table crossing 90 % (or back
    /// under 85 %) is logged.
    fn table_states(&mut self) -> (BTreeMap<String, NsState>, Vec<TableForecast>) {
        let t_s = self.started.elapsed().as_secs_f64();
        let mut nss = BTreeMap::new();
        let mut forecasts = Vec::new();
        for f in self.tables.iter() {
            let Some(fill) = f.fill() else { continue };
            let name = self.consumer.name(f.inode);
            let sample = forecast::Sample {
                t_s,
                entries: fill.count,
                inserted: None,
            };
            let fc = self.forecasts.push(f.inode, sample, fill.max).forecast;
            let eta_s = match fc.trend {
                Trend::Full => Some(0.0),
                Trend::Filling => fc.eta_s,
                _ => None,
            };
            let (entries, max, fill_percent) = (fill.count, fill.max, fill.percent());
            if fill_percent >= HIGH_FILL && self.watch.high.insert(f.inode) {
                let netns = name.clone();
                log::emit(&State::TableHigh {
                    netns,
                    entries,
                    max,
                    fill_percent,
                });
            } else if fill_percent < NORMAL_FILL && self.watch.high.remove(&f.inode) {
                let netns = name.clone();
                log::emit(&State::TableNormal {
                    netns,
                    entries,
                    max,
                    fill_percent,
                });
            }
            let stats = f.stats();
            nss.insert(name, NsState { fill, stats, eta_s });
            if self.pilot.is_some() {
                forecasts.push((f.inode, entries, fc));
            }
        }
        (nss, forecasts)
    }

    /// `--autopilot`: looks at every table, reports a decision (state
    /// line, counter, and a file in the open incident if any).
    fn autopilot(&mut self, now: Instant, forecasts: &[TableForecast]) {
        let Some(pilot) = &mut self.pilot else {
            return;
        };
        let c = &mut self.consumer;
        let count = |k: Kind, inode: u32| c.tap.per_netns.get(&(k, inode)).copied().unwrap_or(0);
        let looks: Vec<Look<'_>> = forecasts
            .iter()
            .map(|(inode, entries, fc)| Look {
                inode: *inode,
                name: c.name(*inode),
                entries: *entries,
                forecast: fc,
                table_full: count(Kind::TableFull, *inode),
                early_drop: count(Kind::EarlyDrop, *inode),
            })
            .collect();
        let Some(outcome) = pilot.tick(now, &looks) else {
            return;
        };
        let (action, state) = match outcome {
            Outcome::Raised(r) => (
                if r.dry_run { "dry_run" } else { "raised" },
                State::AutopilotRaised(r),
            ),
            Outcome::Capped(r) => (
                if r.dry_run { "dry_run" } else { "capped" },
                State::AutopilotCapped(r),
            ),
            Outcome::Skipped { netns, why } => (
                "skipped",
                State::AutopilotSkipped {
                    netns,
                    why,
                    dry_run: pilot.opts.mode != autopilot::Mode::On,
                },
            ),
        };
        log::emit(&state);
        if let Some(dir) = c.tap.recorder.as_ref().and_then(|r| r.incident_dir())
            && let Err(e) = autopilot::record(dir, &state)
        {
            log::emit(&State::Warning {
                message: format!(
                    "flight recorder: autopilot record in {}: {e}",
                    dir.display()
                ),
            });
        }
        let mut s = self.metrics.0.lock().unwrap_or_else(|p| p.into_inner());
        *s.autopilot.entry(action).or_default() += 1;
    }

    /// Drops started / stopped (packet drops: table_full and
    /// insert_failed; evictions are not drops of a packet). Drops starting
    /// keep an incident capture.
    fn drop_state(&mut self, now: Instant) {
        let totals = self.consumer.pipe.agg.totals;
        let drops = totals.table_full + totals.insert_failed;
        let w = &mut self.watch;
        if drops > w.last_drops {
            w.last_drop_at = Some(now);
            if !w.dropping {
                w.dropping = true;
                log::emit(&State::DropsStarted {
                    drops: drops - w.last_drops,
                });
                if let Some(r) = &mut self.consumer.tap.recorder {
                    r.incident("drops started");
                }
            }
        } else if w.dropping && w.last_drop_at.is_some_and(|t| now - t >= self.opts.quiet) {
            w.dropping = false;
            let quiet_s = self.opts.quiet.as_secs_f64();
            log::emit(&State::DropsStopped { drops, quiet_s });
        }
        w.last_drops = drops;
    }

    /// Amplification findings: open while a flagged source dropped within
    /// the window (logged as they open and close); the gauges of the open.
    fn amplification(&mut self) -> Vec<AmpGauge> {
        let (amp, w, clock) = (
            &mut self.consumer.pipe.amp,
            &mut self.watch,
            &self.facts.clock,
        );
        for f in amp.take_changed(clock) {
            let key = (f.src.clone().unwrap_or_default(), f.service.clone());
            if w.open_amp.insert(key.clone()) {
                w.findings_opened += 1;
                let (src, service, factor, message) = (key.0, key.1, f.factor, f.message);
                log::emit(&State::AmplificationOpened {
                    src,
                    service,
                    factor,
                    message,
                });
            }
        }
        let window_ns = amp.config().window.as_nanos() as u64;
        let mono = monotonic_ns();
        let mut gauges = Vec::new();
        let mut still_open = BTreeSet::new();
        for f in amp.findings(clock) {
            let key = (f.src.clone().unwrap_or_default(), f.service.clone());
            if !w.open_amp.contains(&key) {
                continue;
            }
            if mono.saturating_sub(f.last_ts_ns) > window_ns {
                let (src, service, attempts) = (key.0, key.1, f.attempts);
                log::emit(&State::AmplificationClosed {
                    src,
                    service,
                    attempts,
                });
                continue;
            }
            still_open.insert(key.clone());
            gauges.push(AmpGauge {
                src: key.0,
                proto: f.proto.clone(),
                port: f.port,
                factor: f.factor,
                retransmission_share: match f.attempts {
                    0 => 0.0,
                    n => f.retransmissions as f64 / n as f64,
                },
            });
        }
        w.open_amp = still_open;
        gauges
    }

    /// Hands this tick's figures to the metrics (one lock, no I/O under
    /// it).
    fn publish(
        &self,
        counters: &BpfCounters,
        tables: BTreeMap<String, NsState>,
        amp: Vec<AmpGauge>,
    ) {
        let own = selfstat::read();
        let c = &self.consumer;
        let decode_errors = c.decode_errors;
        let mut s = self.metrics.0.lock().unwrap_or_else(|p| p.into_inner());
        s.drops = c
            .tap
            .per_netns
            .iter()
            .map(|((k, ns), n)| ((*k, c.name(*ns)), *n))
            .collect();
        s.drops_total_only = c.pipe.agg.totals;
        s.lost = counters.lost;
        s.shed = counters.shed;
        s.decode_errors = decode_errors;
        s.set_sources(&c.tap.series, |i| c.name(i));
        s.namespaces = tables;
        if self.opts.label_pod {
            s.workloads = c
                .names
                .workloads()
                .iter()
                .map(|(i, w)| (c.name(*i), WorkloadLabels::of(w)))
                .collect();
        }
        s.amp = amp;
        s.findings_opened = self.watch.findings_opened;
        if let Some((cpu, rss)) = own {
            s.cpu_seconds = cpu;
            s.rss_bytes = rss;
        }
    }

    /// Ready once attached and the first metrics are in.
    fn mark_ready(&mut self) -> Result<(), TraceError> {
        if self.shared.ready.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        if let Some(r) = &mut self.ready_file {
            r.publish()
                .map_err(|e| TraceError::Other(format!("--ready-file: {e}")))?;
        }
        log::emit(&State::Started {
            version: self.facts.version.clone(),
            hooks: self.facts.hooks.clone(),
            refused: self.facts.refused.iter().map(|r| r.to_string()).collect(),
            metrics_addr: self.opts.metrics_addr.to_string(),
            namespaces: self.tables.len(),
            uncovered: self.uncovered.clone(),
        });
        Ok(())
    }

    /// Not ready any more, the programs detached and the ring emptied (see
    /// [`live::end`]); the recorder's trailer holds the same totals a
    /// `trace` summary would.
    fn finish(mut self, signal: &'static str) -> Result<(), TraceError> {
        log::emit(&State::Stopping {
            signal: signal.into(),
        });
        self.shared.ready.store(false, Ordering::Relaxed);
        self.server.abort();
        let tables = &self.tables;
        let c = &mut self.consumer;
        let end = live::end(
            &mut self.tp,
            self.ring.take(),
            &self.held,
            &self.start_stats,
            // Through the files already open (setns may no longer be
            // allowed).
            || tables.end_snapshot(),
            self.ready_file.as_mut(),
            self.started,
            c,
        )?;
        // The agent's rolling files hold what arrived; its metrics come
        // from the events (the exact per-source counts are a `trace`
        // summary's): never `sampled`.
        let totals = live::totals(&self.facts, &c.pipe, &end, false, 0);
        let duration_s = end.duration_s;
        let summary = Summary::assemble(
            &self.facts,
            duration_s,
            totals,
            Vec::new(),
            c.pipe.analyses(&self.facts.clock),
        );
        if let Some(mut rec) = c.tap.recorder.take() {
            let written = rec.events_written();
            let end_stats = end.end.stats.clone();
            let trailer = capture::Trailer::of(&summary, monotonic_ns(), end_stats, written);
            rec.finish(trailer)
                .map_err(|e| TraceError::Other(e.to_string()))?;
        }
        diag(format_args!(
            "conntrack-trace: agent stopped ({signal}) after {duration_s:.1} s: {} events, kernel drop +{}, lost {}",
            summary.events.total(),
            summary.kernel.drop,
            summary.lost.total()
        ));
        Ok(())
    }
}
