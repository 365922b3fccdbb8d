//! The offline path: a capture set read back through the live pipeline.
//! `report`, `export` and `doctor --file` read captures here, so a
//! capture's summary is the live one by construction. Every event goes
//! through [`Analysis::feed`] — the one place where analyses of the event
//! stream plug in.

use std::{collections::BTreeMap, path::PathBuf};

use crate::{
    analysis::{
        aggregate::{DEFAULT_MAX_SOURCES, ExactCounts, top_sources},
        amplify::AmpConfig,
        filter::{Filter, TimeSpec},
        pipeline::{Pipeline, Select},
    },
    formats::capture::{self, CaptureInfo, Header, OpenSet, ReadError},
    kernel::workload::NetnsNames,
    model::{
        KindCounts, Summary, Totals,
        event::{Event, Kind},
    },
};

/// Most timeline rows (an hour of seconds).
pub const MAX_ROWS: u64 = 3600;

/// What `report`, `export` and `doctor FILE` select from a capture: the
/// live filters, a time window, and the amplification settings — plain
/// values (the command line's flags become these in `cli.rs`).
#[derive(Clone, Debug, Default)]
pub struct OfflineSpec {
    /// A namespace's recorded name, or its inode.
    pub netns: Option<String>,
    /// `--proto`, `--port`, `--src` (its `netns` unused: see above).
    pub select: Filter,
    pub since: Option<TimeSpec>,
    pub until: Option<TimeSpec>,
    pub amp: AmpConfig,
}

/// The filters of `report` and `export`: the filter the capture was
/// recorded with (so `matched` means what it meant live), the command
/// line's, and a time window in CLOCK_MONOTONIC ns.
#[derive(Clone, Debug, Default)]
pub struct OfflineFilter {
    pub recorded: Filter,
    pub cli: Filter,
    /// `--netns`: a recorded name or an inode.
    pub netns: Option<String>,
    pub since_mono: Option<u64>,
    pub until_mono: Option<u64>,
}

pub(crate) fn to_mono(t: TimeSpec, h: &Header) -> u64 {
    match t {
        TimeSpec::Offset(d) => h.start_mono_ns.saturating_add(d.as_nanos() as u64),
        TimeSpec::Unix(ns) => {
            // i128 holds every u64 and the difference of two plausible
            // u128 times; saturate for hostile headers.
            let start = i128::try_from(h.start_unix_ns).unwrap_or(i128::MAX);
            let delta = i128::try_from(ns)
                .unwrap_or(i128::MAX)
                .saturating_sub(start);
            i128::from(h.start_mono_ns)
                .saturating_add(delta)
                .clamp(0, i128::from(u64::MAX)) as u64
        }
    }
}

impl OfflineFilter {
    pub fn new(args: &OfflineSpec, header: &Header) -> Result<OfflineFilter, String> {
        Ok(OfflineFilter {
            recorded: header
                .filter
                .to_filter()
                .map_err(|e| format!("the capture's recorded filter: {e}"))?,
            cli: Filter {
                netns: None,
                ..args.select.clone()
            },
            netns: args.netns.clone(),
            since_mono: args.since.map(|t| to_mono(t, header)),
            until_mono: args.until.map(|t| to_mono(t, header)),
        })
    }

    pub fn matches(&self, e: &Event, names: &NetnsNames) -> bool {
        self.select(e, names)
    }
}

impl Select for OfflineFilter {
    fn select(&self, e: &Event, names: &NetnsNames) -> bool {
        if !self.recorded.matches(e) || !self.cli.matches(e) {
            return false;
        }
        if let Some(spec) = &self.netns
            && e.netns.to_string() != *spec
            && names.get(&e.netns) != Some(spec)
        {
            return false;
        }
        if self.since_mono.is_some_and(|s| e.ts_ns < s) {
            return false;
        }
        if self.until_mono.is_some_and(|u| e.ts_ns >= u) {
            return false;
        }
        true
    }
}

impl OfflineFilter {
    /// Only the recorded (live) filter applies: the report's selection is
    /// the live one.
    pub fn is_unfiltered(&self) -> bool {
        self.cli == Filter::default()
            && self.netns.is_none()
            && self.since_mono.is_none()
            && self.until_mono.is_none()
    }

    /// What the command line added, for the report's metadata.
    pub(crate) fn describe(&self, args: &OfflineSpec) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(n) = &self.netns {
            v.push(format!("netns {n}"));
        }
        if let Some(p) = self.cli.proto {
            v.push(format!("proto {p}"));
        }
        if let Some(p) = self.cli.port {
            v.push(format!("port {p}"));
        }
        if let Some(c) = self.cli.src {
            v.push(format!("src {c}"));
        }
        if let Some(s) = args.since {
            v.push(format!("since {s:?}"));
        }
        if let Some(u) = args.until {
            v.push(format!("until {u:?}"));
        }
        v
    }
}

/// Everything learned from the event stream.
pub struct Analysis {
    /// The live pipeline (count, select, aggregate, amplification), fed
    /// the capture's events.
    pub pipe: Pipeline<OfflineFilter>,
    start_mono_ns: u64,
    /// Events of the traced scope (what the kernel counters cover).
    pub in_scope: KindCounts,
    scope_inode: Option<u32>,
    /// Matching events per `granularity_s` seconds since the capture
    /// started (keys: bucket start). Bounded while reading: past
    /// 2 × [`MAX_ROWS`] keys the buckets double (a capture of 3 M distinct
    /// seconds used to hold 3 M entries).
    pub per_second: BTreeMap<u64, KindCounts>,
    pub granularity_s: u64,
    pub last_ts_ns: u64,
}

impl Analysis {
    pub fn new(filter: OfflineFilter, header: &Header, amp: AmpConfig) -> Analysis {
        Analysis {
            pipe: Pipeline::new(filter, DEFAULT_MAX_SOURCES, amp),
            start_mono_ns: header.start_mono_ns,
            in_scope: KindCounts::default(),
            scope_inode: header.scope.netns_inode,
            per_second: BTreeMap::new(),
            granularity_s: 1,
            last_ts_ns: 0,
        }
    }

    /// Feeds one event of the capture, in order; returns whether it passed
    /// the filters. Every offline analysis hooks in here.
    pub fn feed(&mut self, e: &Event, names: &NetnsNames) -> bool {
        if self.scope_inode.is_none_or(|i| i == e.netns) {
            *self.in_scope.get_mut(e.kind) += 1;
        }
        if !self.pipe.feed(e, names) {
            return false;
        }
        let sec = e.ts_ns.saturating_sub(self.start_mono_ns) / 1_000_000_000;
        let key = sec - sec % self.granularity_s;
        *self.per_second.entry(key).or_default().get_mut(e.kind) += 1;
        if self.per_second.len() as u64 > 2 * MAX_ROWS {
            self.coarsen();
        }
        self.last_ts_ns = self.last_ts_ns.max(e.ts_ns);
        true
    }
}

impl Analysis {
    /// Doubles the timeline's bucket width, merging buckets.
    fn coarsen(&mut self) {
        self.granularity_s = self.granularity_s.saturating_mul(2);
        let g = self.granularity_s;
        let old = std::mem::take(&mut self.per_second);
        for (sec, c) in old {
            let e = self.per_second.entry(sec - sec % g).or_default();
            for k in Kind::ALL {
                *e.get_mut(k) = e.get(k).saturating_add(c.get(k));
            }
        }
    }
}

/// Errors of `report` / `export`.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// An output that may not or could not be created.
    #[error(transparent)]
    Out(#[from] crate::formats::outfile::OutError),
}

impl ReportError {
    /// The documented exit code (README "Exit codes").
    pub fn exit_code(&self) -> i32 {
        use crate::kernel::error::exit;
        match self {
            ReportError::Usage(_) => exit::USAGE,
            ReportError::Out(e) if e.is_refusal() => exit::USAGE,
            _ => exit::FAILURE,
        }
    }
}

/// The header of the set's first file (for filters that need the start
/// time, and for exports that write metadata before the events).
pub fn first_header(paths: &[PathBuf]) -> Result<Header, ReadError> {
    Ok(capture::open_set(paths)?.header().clone())
}

/// A capture set, read.
pub struct Read {
    pub analysis: Analysis,
    pub info: CaptureInfo,
    /// What the command line's filters added, described.
    pub filters: Vec<String>,
    /// The COUNTS records' exact per-source counts that pass the filters
    /// (format 4, written while the event budget was on); None without
    /// such records.
    pub exact: Option<ExactCounts>,
}

/// Reads a set opened (and so checked) with [`capture::open_set`] through
/// [`Analysis::feed`]; `each` sees every event, whether it matched the
/// filters, and the names in effect.
pub fn read(
    set: OpenSet,
    args: &OfflineSpec,
    mut each: impl FnMut(&Event, &NetnsNames, bool),
) -> Result<Read, ReportError> {
    let header = set.header().clone();
    let filter = OfflineFilter::new(args, &header).map_err(ReportError::Usage)?;
    let filters = filter.describe(args);
    let mut a = Analysis::new(filter, &header, args.amp.clone());
    // The same selection for the counts (the pipeline owns the first).
    let select = OfflineFilter::new(args, &header).map_err(ReportError::Usage)?;
    let mut exact: Option<ExactCounts> = None;
    let info = set.read_with_counts(
        |e, names| {
            let m = a.feed(e, names);
            each(e, names, m);
        },
        |c, names| {
            let exact = exact.get_or_insert_default();
            for s in &c.sources {
                if select.matches(&s.as_event(c.ts_ns), names) {
                    exact.add_count(s);
                }
            }
        },
    )?;
    Ok(Read {
        analysis: a,
        info,
        filters,
        exact,
    })
}

impl Read {
    /// The summary the live session printed (or would have): totals from
    /// the events and the trailer, the top `top` sources.
    pub fn summary(&self, top_n: usize) -> Summary {
        let (a, info) = (&self.analysis, &self.info);
        let h = &info.header;
        let t = info.trailer.as_ref();
        let duration_s = t.map_or_else(
            || a.last_ts_ns.saturating_sub(h.start_mono_ns) as f64 / 1e9,
            |t| t.duration_s,
        );
        let mut top = top_sources(&a.pipe.agg, top_n);
        for s in &mut top {
            let span = (s.last_ts_ns.saturating_sub(s.first_ts_ns) as f64 / 1e9).max(1.0);
            // Over the events since the source was tracked (its `counts`; the
            // same as `total` unless the source table overflowed).
            s.rate_per_s = s.counts.total() as f64 / span;
        }
        let totals = Totals {
            events: a.pipe.received,
            matched: a.pipe.agg.totals,
            lost: t.map(|t| t.lost).unwrap_or_default(),
            shed: t.map(|t| t.shed).unwrap_or_default(),
            observed: t.map(|t| t.observed).unwrap_or_default(),
            kernel: t.map(|t| t.kernel).unwrap_or_default(),
            unclassified_drops: t.map_or(0, |t| t.unclassified_drops),
            unmatched_drop_counts: t.map_or(0, |t| t.unmatched_drop_counts),
            decode_errors: t.map_or(0, |t| t.decode_errors),
            namespaces: t.map_or(h.scope.namespaces, |t| t.namespaces),
            uncovered: t.map_or_else(|| h.scope.uncovered.clone(), |t| t.uncovered.clone()),
            complete: t.is_some_and(|t| t.complete) && info.intact(),
            sampled: t.is_some_and(|t| t.exact_top.is_some()),
            exact_sources: t.map_or(0, |t| t.exact_sources),
        };
        // Under the event budget the live top came from the programs'
        // exact counts: the COUNTS records hold them interval by interval
        // (so filters and time windows apply, and a capture cut short has
        // them up to its last interval). Before format 4, a trace that lost
        // events left only its final exact top, in the trailer.
        // Whether the live run's events were a sample: its trailer says;
        // a capture cut short that has counts is taken as one.
        let sampled = t.map_or(self.exact.is_some(), |t| t.exact_top.is_some());
        let (top, totals) = match (&self.exact, t.and_then(|t| t.exact_top.clone())) {
            (Some(exact), _) if sampled => {
                let (top, sources) = exact.top(&a.pipe.agg, top_n);
                let totals = Totals {
                    sampled,
                    exact_sources: sources,
                    ..totals
                };
                (top, totals)
            }
            (None, Some(exact)) if a.pipe.select.is_unfiltered() => (exact, totals),
            _ => (top, totals),
        };
        let facts = h.facts(t);
        let analyses = a.pipe.analyses(&facts.clock);
        Summary::assemble(&facts, duration_s, totals, top, analyses)
    }
}
