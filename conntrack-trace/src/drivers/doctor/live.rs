//! `doctor` on the live host, in three phases over the live core
//! ([`crate::drivers::live`]): [`Live::start`] (the scope, each
//! namespace's first sample, the backend attached, the window's start
//! counters), [`Live::sample`] (every `--interval` until `--duration`:
//! each namespace's count, limits and per-CPU counters, the ring drained
//! between samples) and [`Live::finish`] (detach, last drain, end counters,
//! the table's holders, the diagnosis).

use std::{collections::HashMap, time::Instant};

use super::{
    BackendReport, Diagnosis, NsAcc, NsInfoLite, NsReport, Options, Status, Timeouts, finish,
    memory_report, not_tried, place_of, settings, table,
};
use crate::{
    analysis::{
        aggregate::{Aggregator, DEFAULT_MAX_SOURCES},
        amplify::AmpConfig,
        filter::Filter,
        forecast::{self, Sample, Watcher},
        pipeline::Pipeline,
    },
    drivers::{
        doctor::advice::Place,
        live::{self, Consumer, Ring, Tap},
    },
    kernel::{
        error::TraceError,
        kstats::{self, Columns, CtStats, Fill},
        netns::{self, NetnsInfo},
        workload::{self, NetnsNames},
    },
    model::{Scope, event::Event},
};

/// Doctor's tap: each namespace's sources, for its victims.
#[derive(Default)]
struct ByNetns(HashMap<u32, Aggregator>);

impl Tap for ByNetns {
    fn selected(&mut self, ev: &Event, _names: &NetnsNames) -> Result<(), TraceError> {
        self.0
            .entry(ev.netns)
            .or_insert_with(|| Aggregator::new(DEFAULT_MAX_SOURCES))
            .record(ev);
        Ok(())
    }
}

/// A namespace's table now: its fill and per-CPU counters.
fn sample(path: &std::path::Path) -> Option<(Fill, Option<Columns>)> {
    netns::in_netns(path, || (kstats::read_fill(), kstats::read_columns().ok()))
        .ok()
        .and_then(|(f, c)| Some((f?, c)))
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_timeouts() -> Timeouts {
    let p = "/proc/sys/net/netfilter/";
    Timeouts {
        udp: read_u64(&format!("{p}nf_conntrack_udp_timeout")),
        udp_stream: read_u64(&format!("{p}nf_conntrack_udp_timeout_stream")),
        tcp_syn_sent: read_u64(&format!("{p}nf_conntrack_tcp_timeout_syn_sent")),
    }
}

fn unix_now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Each namespace of `list` that has a conntrack table, with its first
/// sample (those without one are left out).
fn first_samples(list: &[NetnsInfo], init_inode: Option<u32>) -> Vec<NsAcc> {
    list.iter()
        .filter_map(|ns| {
            let (fill, cols) = sample(&ns.path)?;
            Some(NsAcc {
                info: NsInfoLite {
                    inode: ns.inode,
                    name: ns.name.clone(),
                    place: place_of(ns, init_inode),
                    path: ns.path.clone(),
                },
                last_fill: fill,
                start_cols: cols,
                end_cols: None,
            })
        })
        .collect()
}

pub(super) struct Live<'o> {
    opts: &'o Options,
    session: live::Started,
    consumer: Consumer<ByNetns>,
    accs: Vec<NsAcc>,
    forecasts: Watcher,
    started: Instant,
    /// Wall clock (Unix ns) of the last sample: forecasts count from here.
    sampled_unix_ns: u128,
}

impl<'o> Live<'o> {
    pub(super) fn start(opts: &'o Options) -> Result<Live<'o>, TraceError> {
        let all = live::host()?;
        let init_inode = all.values().find(|i| i.name == "init").map(|i| i.inode);
        let list: Vec<NetnsInfo> = match &opts.netns {
            Some(spec) => vec![netns::resolve(spec)?],
            None => all.values().cloned().collect(),
        };
        let accs = first_samples(&list, init_inode);
        if accs.is_empty() {
            return Err(TraceError::Unsupported(
                "no namespace with conntrack to diagnose (is nf_conntrack loaded?)".into(),
            ));
        }
        let scope = Scope {
            netns: opts.netns.clone().unwrap_or_else(|| "all".into()),
            netns_inode: opts.netns.as_ref().map(|_| list[0].inode),
            namespaces: list.len(),
            uncovered: Vec::new(),
        };
        let session = live::start(opts.choice, &opts.backend, &list, scope, live::bpf_log_line)?;
        let filter = Filter {
            netns: session.facts.scope.netns_inode,
            ..Filter::default()
        };
        let pipe = Pipeline::new(filter, DEFAULT_MAX_SOURCES, AmpConfig::default());
        let names = workload::names_of(&all);
        let mut live = Live {
            opts,
            session,
            consumer: Consumer::new(pipe, names, ByNetns::default()),
            accs,
            forecasts: Watcher::new(forecast::Config::default()),
            started: Instant::now(),
            sampled_unix_ns: 0,
        };
        // The window starts now that the programs are attached: the
        // kernel's counters, the events and the samples then cover the
        // same time.
        for a in live.accs.iter_mut() {
            if let Some((_, cols)) = sample(&a.info.path) {
                a.start_cols = cols;
            }
        }
        live.started = Instant::now();
        Ok(live)
    }

    /// Samples every `--interval` (and once at `--duration`, the last),
    /// draining the ring as it fills.
    pub(super) async fn sample(&mut self) -> Result<(), TraceError> {
        let deadline = tokio::time::sleep(self.opts.duration);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(self.opts.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let c = &mut self.consumer;
            tokio::select! {
                biased;
                _ = &mut deadline => break,
                _ = ticker.tick() => self.sample_all(),
                r = Ring::next_batch(&mut self.session.ring, c) => r?,
            }
        }
        self.sample_all();
        Ok(())
    }

    /// Each namespace's count (into its forecast), limits and counters.
    fn sample_all(&mut self) {
        self.sampled_unix_ns = unix_now_ns();
        let t_s = self.started.elapsed().as_secs_f64();
        for a in self.accs.iter_mut() {
            if let Some((fill, cols)) = sample(&a.info.path) {
                let s = Sample {
                    t_s,
                    entries: fill.count,
                    inserted: cols.as_ref().and_then(|c| c.sum("insert")),
                };
                self.forecasts.push(a.info.inode, s, fill.max);
                a.last_fill = fill;
                a.end_cols = cols;
            }
        }
    }

    /// Detaches, takes what the ring holds, reads the window's end and
    /// which entries hold each table, and diagnoses.
    pub(super) fn finish(mut self) -> Result<Diagnosis, TraceError> {
        let s = &mut self.session;
        let scope = &s.scope;
        let end = live::end(
            &mut s.tp,
            s.ring.take(),
            scope,
            &s.start,
            || kstats::snapshot(scope),
            None,
            self.started,
            &mut self.consumer,
        )?;
        // The counters' window ends after the last event could happen.
        for a in self.accs.iter_mut() {
            if let Some((_, Some(cols))) = sample(&a.info.path) {
                a.end_cols = Some(cols);
            }
        }
        let warnings = warnings(&end);
        let kernels = self.reports();
        let (accs, kernels) = shown(self.accs, kernels, self.opts.netns.is_none());
        let global = accs
            .iter()
            .find(|a| a.info.place == Place::Init)
            .or(accs.first())
            .map(|a| a.last_fill)
            .unwrap_or_default();
        let (facts, tp, opts) = (&self.session.facts, &self.session.tp, self.opts);
        let d = Diagnosis {
            version: facts.version.clone(),
            source: "live".into(),
            files: Vec::new(),
            hostname: crate::formats::capture::hostname(),
            kernel_release: crate::formats::capture::kernel_release(),
            backend: BackendReport {
                chosen: facts.backend,
                hooks: facts.hooks.clone(),
                refused: facts.refused.clone(),
                not_tried: not_tried(opts.choice, facts.backend),
                per_packet: tp.per_packet(),
            },
            duration_s: end.duration_s,
            sampled_unix_ns: self.sampled_unix_ns,
            settings: settings(opts, self.forecasts.config()),
            status: Status::Healthy,
            exit_code: 0,
            namespaces: Vec::new(),
            memory: memory_report(&opts.backend.btf_path, global.max, global.buckets),
            advice: Vec::new(),
            warnings,
        };
        Ok(finish(d, &accs, kernels, opts))
    }

    /// Each namespace's report, with what holds its table and its
    /// timeouts (read inside it).
    fn reports(&self) -> Vec<(NsReport, CtStats)> {
        let by = &self.consumer.tap.0;
        self.accs
            .iter()
            .map(|a| {
                let agg = by.get(&a.info.inode);
                let (mut r, k) = a.report(self.opts, &self.forecasts, agg);
                match netns::in_netns(&a.info.path, || (table::read(), read_timeouts())) {
                    Ok((holders, timeouts)) => {
                        match holders {
                            Ok(h) => r.holders = Some(h),
                            Err(why) => r.holders_unavailable = Some(why),
                        }
                        r.timeouts = timeouts;
                    }
                    Err(e) => r.holders_unavailable = Some(format!("entering the namespace: {e}")),
                }
                (r, k)
            })
            .collect()
    }
}

/// What the session could not see: events lost or undecodable.
fn warnings(end: &live::Ending) -> Vec<String> {
    let mut w = Vec::new();
    if end.counters.lost.total() > 0 {
        w.push(format!(
            "{} events lost in the ring buffer: victims are undercounted",
            end.counters.lost.total()
        ));
    }
    if end.decode_errors > 0 {
        let n = end.decode_errors;
        w.push(format!("{n} ring records could not be decoded"));
    }
    w
}

/// Without --netns, the namespaces that use conntrack (or else the
/// first).
fn shown(
    accs: Vec<NsAcc>,
    kernels: Vec<(NsReport, CtStats)>,
    all: bool,
) -> (Vec<NsAcc>, Vec<(NsReport, CtStats)>) {
    if !all {
        return (accs, kernels);
    }
    let used = |(r, k): &(NsReport, CtStats)| {
        r.peak > 0 || k.drop > 0 || k.early_drop > 0 || k.insert_failed > 0
    };
    if !kernels.iter().any(used) {
        return (
            accs.into_iter().take(1).collect(),
            kernels.into_iter().take(1).collect(),
        );
    }
    accs.into_iter()
        .zip(kernels)
        .filter(|(_, r)| used(r))
        .unzip()
}
