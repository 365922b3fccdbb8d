//! When will the conntrack table be full, or how long until it drains?
//!
//! The model: within a sliding window (default the last 30 s) the entry
//! count of one namespace is a straight line, `entries(t) = a + b·t`, fitted
//! by ordinary least squares to the samples `(t, entries)`. The slope `b`
//! (entries/s) has a standard error `se(b) = sqrt(s² / Σ(t - t̄)²)` with `s²`
//! the residual variance (n - 2 degrees of freedom). Then:
//!
//! * **unknown** with fewer than [`Config::min_samples`] samples or a window
//!   shorter than [`Config::min_span_s`]: never forecast from a handful of
//!   points;
//! * **full** when the latest sample is at the limit (`entries >= max`);
//! * **steady** when `|b|` is within the noise bound: `|b| <= z·se(b)` (not
//!   distinguishable from zero at ~95 % with `z = 2`), or the fitted change
//!   over the whole window is under one entry;
//! * **filling**: time to full `(max - ŷ) / b`, where `ŷ` is the fitted
//!   count at the latest sample (less noisy than the last sample itself);
//! * **draining** (while above [`Config::relief_fill`] of max): time to
//!   relief `(ŷ - relief_fill·max) / -b`.
//!
//! The error: the time is given with the interval obtained from the slope's
//! `b ± z·se(b)` (the count's own error at `ŷ` is smaller and ignored);
//! `eta_high_s` is `None` (unbounded) when `b - z·se(b)` is not positive.
//! A linear model is honest for the ramps a flood or a leak produces; it
//! over-estimates the time to full of an accelerating fill, which the
//! interval cannot show — hence the short window, so that the slope follows
//! the traffic.
//!
//! The optional `inserted` total (the kernel's per-CPU `insert` counter,
//! summed) gives the rate of new entries, and with the slope the rate at
//! which entries expire or are deleted: `expire = insert - b`.
//!
//! Used by `doctor` and the live view; it has no I/O and no clock of its
//! own, so any driver (a Prometheus agent too) feeds it samples.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Settings of the estimator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Samples older than this (seconds before the latest) are dropped.
    pub window_s: f64,
    /// Fewer samples than this: no forecast.
    pub min_samples: usize,
    /// The samples must span at least this long (seconds).
    pub min_span_s: f64,
    /// Width of the noise bound and of the interval, in standard errors.
    pub z: f64,
    /// Draining ends ("relief") below this fraction of max.
    pub relief_fill: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window_s: 30.0,
            min_samples: 5,
            min_span_s: 1.0,
            z: 2.0,
            relief_fill: 0.8,
        }
    }
}

/// One observation of a namespace's table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds on any monotonic clock.
    pub t_s: f64,
    pub entries: u64,
    /// Total of the kernel's `insert` counter, when read.
    pub inserted: Option<u64>,
}

/// Where the table is heading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trend {
    /// Too few samples to say.
    Unknown,
    /// At the limit now: new entries are being refused (or evict others).
    Full,
    Filling,
    Draining,
    Steady,
}

/// The estimate, with its error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    pub trend: Trend,
    /// Filling: seconds until full; draining: seconds until below
    /// `relief_fill` of max. `None` otherwise.
    pub eta_s: Option<f64>,
    /// The interval from `slope ± z·stderr`; `eta_high_s` `None` = unbounded.
    pub eta_low_s: Option<f64>,
    pub eta_high_s: Option<f64>,
    /// Fitted entries/s, and its standard error.
    pub slope_per_s: f64,
    pub slope_stderr: f64,
    /// Fitted count at the latest sample.
    pub entries: f64,
    pub max: u64,
    pub samples: usize,
    /// Time spanned by the samples used (seconds).
    pub span_s: f64,
    /// New entries per second (kernel `insert` counter), when known.
    pub insert_per_s: Option<f64>,
    /// Entries leaving per second (`insert - slope`), when known.
    pub expire_per_s: Option<f64>,
}

impl Forecast {
    fn unknown(samples: usize, span_s: f64, max: u64, entries: f64) -> Forecast {
        Forecast {
            trend: Trend::Unknown,
            eta_s: None,
            eta_low_s: None,
            eta_high_s: None,
            slope_per_s: 0.0,
            slope_stderr: 0.0,
            entries,
            max,
            samples,
            span_s,
            insert_per_s: None,
            expire_per_s: None,
        }
    }

    /// One short phrase: `full in ~42 s (30 s–1m10s)`, `relief in ~12 s`,
    /// `full now`, `steady`, `— (3 of 5 samples)`.
    pub fn describe(&self) -> String {
        let range = |lo: Option<f64>, hi: Option<f64>| match (lo, hi) {
            (Some(l), Some(h)) => format!(" ({}–{})", fmt_secs(l), fmt_secs(h)),
            (Some(l), None) => format!(" (≥ {})", fmt_secs(l)),
            _ => String::new(),
        };
        match (self.trend, self.eta_s) {
            (Trend::Unknown, _) => format!("— (too few samples: {})", self.samples),
            (Trend::Full, _) => "full now".into(),
            (Trend::Steady, _) => format!("— steady ({:+.1}/s)", self.slope_per_s),
            (Trend::Filling, Some(e)) => format!(
                "full in ~{}{} at {:+.1}/s",
                fmt_secs(e),
                range(self.eta_low_s, self.eta_high_s),
                self.slope_per_s
            ),
            (Trend::Draining, Some(e)) => format!(
                "relief in ~{}{} at {:+.1}/s",
                fmt_secs(e),
                range(self.eta_low_s, self.eta_high_s),
                self.slope_per_s
            ),
            (Trend::Draining, None) => format!("draining ({:+.1}/s)", self.slope_per_s),
            (Trend::Filling, None) => format!("filling ({:+.1}/s)", self.slope_per_s),
        }
    }

    /// Whether `self` says something different enough from `before` to be
    /// reported again (the live ndjson `forecast` line): another trend, or a
    /// time that moved by more than 25 % and more than 2 s.
    pub fn differs_materially(&self, before: &Forecast) -> bool {
        if self.trend != before.trend {
            return true;
        }
        match (self.eta_s, before.eta_s) {
            (Some(a), Some(b)) => (a - b).abs() > 2.0 && (a - b).abs() > 0.25 * b.abs(),
            (None, None) => false,
            _ => true,
        }
    }
}

/// `42 s`, `3m05s`, `2h10m`.
pub fn fmt_secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "?".into();
    }
    let r = s.round() as u64;
    if s < 10.0 {
        format!("{s:.1} s")
    } else if r < 60 {
        format!("{r} s")
    } else if r < 3600 {
        format!("{}m{:02}s", r / 60, r % 60)
    } else {
        format!("{}h{:02}m", r / 3600, (r % 3600) / 60)
    }
}

/// Hard bound on samples held, whatever the window and rate.
const MAX_SAMPLES: usize = 4096;

/// The per-namespace estimator: push samples, ask for the forecast.
#[derive(Clone, Debug)]
pub struct Estimator {
    cfg: Config,
    samples: VecDeque<Sample>,
    max: u64,
}

impl Estimator {
    pub fn new(cfg: Config) -> Estimator {
        Estimator {
            cfg,
            samples: VecDeque::new(),
            max: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Adds a sample (times must not go backwards; one that does is
    /// ignored) and the current limit.
    pub fn push(&mut self, s: Sample, max: u64) {
        if self.samples.back().is_some_and(|b| s.t_s < b.t_s) {
            return;
        }
        self.max = max;
        self.samples.push_back(s);
        while self
            .samples
            .front()
            .is_some_and(|f| s.t_s - f.t_s > self.cfg.window_s)
            || self.samples.len() > MAX_SAMPLES
        {
            self.samples.pop_front();
        }
    }

    /// Highest count in the window.
    pub fn peak(&self) -> u64 {
        self.samples.iter().map(|s| s.entries).max().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn forecast(&self) -> Forecast {
        let n = self.samples.len();
        let (Some(first), Some(last)) = (self.samples.front(), self.samples.back()) else {
            return Forecast::unknown(0, 0.0, self.max, 0.0);
        };
        let span = last.t_s - first.t_s;
        if n < self.cfg.min_samples.max(3) || span < self.cfg.min_span_s {
            return Forecast::unknown(n, span, self.max, last.entries as f64);
        }
        // Least squares on t relative to the mean (numerically stable).
        let nf = n as f64;
        let tm = self.samples.iter().map(|s| s.t_s).sum::<f64>() / nf;
        let ym = self.samples.iter().map(|s| s.entries as f64).sum::<f64>() / nf;
        let (mut sxx, mut sxy) = (0.0, 0.0);
        for s in &self.samples {
            let dt = s.t_s - tm;
            sxx += dt * dt;
            sxy += dt * (s.entries as f64 - ym);
        }
        let b = sxy / sxx;
        let a = ym - b * tm;
        let rss: f64 = self
            .samples
            .iter()
            .map(|s| {
                let r = s.entries as f64 - (a + b * s.t_s);
                r * r
            })
            .sum();
        let se = (rss / (nf - 2.0) / sxx).sqrt();
        let y_now = (a + b * last.t_s).max(0.0);
        let insert_per_s = match (first.inserted, last.inserted) {
            (Some(i0), Some(i1)) if span > 0.0 => Some(i1.saturating_sub(i0) as f64 / span),
            _ => None,
        };
        let mut f = Forecast {
            trend: Trend::Steady,
            eta_s: None,
            eta_low_s: None,
            eta_high_s: None,
            slope_per_s: b,
            slope_stderr: se,
            entries: y_now,
            max: self.max,
            samples: n,
            span_s: span,
            insert_per_s,
            expire_per_s: insert_per_s.map(|i| (i - b).max(0.0)),
        };
        let max = self.max as f64;
        // Noise bound: z standard errors, or under one entry over the span.
        let bound = (self.cfg.z * se).max(1.0 / span);
        if self.max > 0 && last.entries >= self.max {
            f.trend = Trend::Full;
        } else if b.abs() <= bound || self.max == 0 {
            f.trend = Trend::Steady;
        } else if b > 0.0 {
            f.trend = Trend::Filling;
            let room = (max - y_now).max(0.0);
            f.eta_s = Some(room / b);
            f.eta_low_s = Some(room / (b + self.cfg.z * se));
            let slow = b - self.cfg.z * se;
            f.eta_high_s = (slow > 0.0).then(|| room / slow);
        } else {
            f.trend = Trend::Draining;
            let target = self.cfg.relief_fill * max;
            if y_now > target {
                let excess = y_now - target;
                let v = -b;
                f.eta_s = Some(excess / v);
                f.eta_low_s = Some(excess / (v + self.cfg.z * se));
                let slow = v - self.cfg.z * se;
                f.eta_high_s = (slow > 0.0).then(|| excess / slow);
            }
        }
        f
    }
}

impl Default for Estimator {
    fn default() -> Self {
        Estimator::new(Config::default())
    }
}

/// Every namespace's estimator and the forecast last reported of it: the
/// one forecast watcher of `trace` (its header and ndjson `forecast`
/// lines), `agent` (its gauges) and `doctor` (its status and advice).
#[derive(Debug, Default)]
pub struct Watcher {
    cfg: Config,
    by_ns: std::collections::HashMap<u32, Watched>,
}

#[derive(Debug)]
struct Watched {
    est: Estimator,
    reported: Option<Forecast>,
}

/// One namespace's sample, as [`Watcher::push`] saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Watch {
    pub forecast: Forecast,
    /// Changed materially since it was last reported (now marked
    /// reported): nothing until the estimator has enough samples, nor of a
    /// table steady since the start.
    pub news: bool,
}

impl Watcher {
    pub fn new(cfg: Config) -> Watcher {
        Watcher {
            cfg,
            by_ns: Default::default(),
        }
    }

    /// Feeds namespace `inode`'s sample and its limit.
    pub fn push(&mut self, inode: u32, s: Sample, max: u64) -> Watch {
        let cfg = self.cfg;
        let w = self.by_ns.entry(inode).or_insert_with(|| Watched {
            est: Estimator::new(cfg),
            reported: None,
        });
        w.est.push(s, max);
        let f = w.est.forecast();
        let news = match &w.reported {
            None => !matches!(f.trend, Trend::Unknown | Trend::Steady),
            Some(l) => f.trend != Trend::Unknown && f.differs_materially(l),
        };
        if news {
            w.reported = Some(f.clone());
        }
        Watch { forecast: f, news }
    }

    /// The forecast of `inode` now (Unknown before any sample).
    pub fn forecast(&self, inode: u32) -> Forecast {
        match self.by_ns.get(&inode) {
            Some(w) => w.est.forecast(),
            None => Estimator::new(self.cfg).forecast(),
        }
    }

    /// Highest count sampled of `inode` in the window.
    pub fn peak(&self, inode: u32) -> u64 {
        self.by_ns.get(&inode).map_or(0, |w| w.est.peak())
    }

    /// A namespace that is gone.
    pub fn forget(&mut self, inode: u32) {
        self.by_ns.remove(&inode);
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise in [-1, 1] (xorshift), so tests never flake.
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % 20_001) as f64 / 10_000.0 - 1.0
        }
    }

    fn feed(e: &mut Estimator, max: u64, pts: impl IntoIterator<Item = (f64, f64)>) {
        for (t, y) in pts {
            e.push(
                Sample {
                    t_s: t,
                    entries: y.round().max(0.0) as u64,
                    inserted: None,
                },
                max,
            );
        }
    }

    #[test]
    fn filling_at_a_steady_rate_gives_the_time_to_full() {
        // 100 entries/s from 1000, max 10000: full at t = 90 s. Samples
        // every 250 ms for 5 s.
        let mut e = Estimator::default();
        feed(
            &mut e,
            10_000,
            (0..=20).map(|i| {
                let t = i as f64 * 0.25;
                (t, 1000.0 + 100.0 * t)
            }),
        );
        let f = e.forecast();
        assert_eq!(f.trend, Trend::Filling);
        let eta = f.eta_s.unwrap();
        assert!((eta - 85.0).abs() < 0.01, "{f:?}");
        assert!((f.slope_per_s - 100.0).abs() < 1e-6);
        assert!(f.eta_low_s.unwrap() <= eta && eta <= f.eta_high_s.unwrap());
        assert!(
            f.describe().starts_with("full in ~1m25s"),
            "{}",
            f.describe()
        );
    }

    #[test]
    fn draining_gives_the_time_to_relief() {
        // From full (1000) down 20/s: below 80 % (800) after 10 s of
        // draining; the fit at the last sample (t = 4) says 920 → 6 s.
        let mut e = Estimator::default();
        feed(
            &mut e,
            1000,
            (0..=16).map(|i| {
                let t = i as f64 * 0.25;
                (t, 999.0 - 20.0 * t)
            }),
        );
        let f = e.forecast();
        assert_eq!(f.trend, Trend::Draining, "{f:?}");
        assert!((f.eta_s.unwrap() - 5.95).abs() < 0.05, "{f:?}");
        assert!(f.describe().starts_with("relief in ~"), "{}", f.describe());
        // Already below the relief level: draining, no time.
        let mut e = Estimator::default();
        feed(
            &mut e,
            1000,
            (0..=16).map(|i| (i as f64, 500.0 - 10.0 * i as f64)),
        );
        let f = e.forecast();
        assert_eq!((f.trend, f.eta_s), (Trend::Draining, None));
    }

    #[test]
    fn steady_and_noisy_steady_are_steady() {
        let mut e = Estimator::default();
        feed(&mut e, 1000, (0..20).map(|i| (i as f64 * 0.25, 400.0)));
        assert_eq!(e.forecast().trend, Trend::Steady);
        assert_eq!(e.forecast().eta_s, None);
        // ±20 entries of noise around a flat 400: still steady.
        let mut n = Noise(0x9e37_79b9_7f4a_7c15);
        let mut e = Estimator::default();
        feed(
            &mut e,
            1000,
            (0..40).map(|i| (i as f64 * 0.25, 400.0 + 20.0 * n.next())),
        );
        let f = e.forecast();
        assert_eq!(f.trend, Trend::Steady, "{f:?}");
        assert!(f.describe().starts_with("— steady"));
    }

    #[test]
    fn noisy_fill_is_within_its_interval() {
        // 50/s ± 30 entries of noise, from 0 to max 2000: true time to full
        // from t = 10 is 30 s.
        let mut n = Noise(12345);
        let mut e = Estimator::default();
        feed(
            &mut e,
            2000,
            (0..=40).map(|i| {
                let t = i as f64 * 0.25;
                (t, 50.0 * t + 30.0 * n.next())
            }),
        );
        let f = e.forecast();
        assert_eq!(f.trend, Trend::Filling, "{f:?}");
        let (lo, eta, hi) = (
            f.eta_low_s.unwrap(),
            f.eta_s.unwrap(),
            f.eta_high_s.unwrap(),
        );
        assert!(lo <= 30.0 && 30.0 <= hi, "{f:?}");
        assert!((eta - 30.0).abs() / 30.0 < 0.15, "within 15 %: {f:?}");
    }

    #[test]
    fn never_from_too_few_samples() {
        let mut e = Estimator::default();
        feed(&mut e, 100, (0..4).map(|i| (i as f64, 10.0 * i as f64)));
        let f = e.forecast();
        assert_eq!(f.trend, Trend::Unknown);
        assert!(f.describe().contains("too few samples: 4"));
        assert_eq!(Estimator::default().forecast().trend, Trend::Unknown);
        // Five samples within a few ms do not span enough time either.
        let mut e = Estimator::default();
        feed(&mut e, 100, (0..5).map(|i| (i as f64 * 0.001, i as f64)));
        assert_eq!(e.forecast().trend, Trend::Unknown);
    }

    #[test]
    fn full_now_and_window() {
        let mut e = Estimator::default();
        feed(&mut e, 64, (0..10).map(|i| (i as f64 * 0.25, 64.0)));
        assert_eq!(e.forecast().trend, Trend::Full);
        assert_eq!(e.forecast().describe(), "full now");
        // Old samples leave the window: a fill that stopped 40 s ago is
        // steady now.
        let mut e = Estimator::default();
        feed(&mut e, 1000, (0..10).map(|i| (i as f64, 50.0 * i as f64)));
        feed(&mut e, 1000, (50..80).map(|i| (i as f64, 450.0)));
        assert_eq!(e.forecast().trend, Trend::Steady);
        assert!(e.forecast().span_s <= 30.0);
        assert_eq!(e.peak(), 450);
        // Time going backwards is ignored.
        let n = e.len();
        feed(&mut e, 1000, [(1.0, 0.0)]);
        assert_eq!(e.len(), n);
    }

    #[test]
    fn insert_counter_gives_new_and_expiry_rates() {
        let mut e = Estimator::default();
        for i in 0..=10 {
            let t = i as f64;
            e.push(
                Sample {
                    t_s: t,
                    entries: (100.0 + 10.0 * t) as u64,
                    inserted: Some((1000.0 + 30.0 * t) as u64),
                },
                10_000,
            );
        }
        let f = e.forecast();
        assert!((f.insert_per_s.unwrap() - 30.0).abs() < 1e-9);
        assert!((f.expire_per_s.unwrap() - 20.0).abs() < 1e-6, "{f:?}");
    }

    #[test]
    fn material_changes() {
        let mut a = Forecast::unknown(5, 2.0, 100, 50.0);
        a.trend = Trend::Filling;
        a.eta_s = Some(100.0);
        let mut b = a.clone();
        b.eta_s = Some(110.0);
        assert!(!b.differs_materially(&a), "10 % is not material");
        b.eta_s = Some(130.0);
        assert!(b.differs_materially(&a));
        let mut c = a.clone();
        c.eta_s = Some(2.0);
        let mut d = c.clone();
        d.eta_s = Some(3.5);
        assert!(!d.differs_materially(&c), "under 2 s is not material");
        d.trend = Trend::Full;
        assert!(d.differs_materially(&c));
    }

    #[test]
    fn seconds_read_well() {
        assert_eq!(fmt_secs(4.25), "4.2 s");
        assert_eq!(fmt_secs(42.4), "42 s");
        assert_eq!(fmt_secs(185.0), "3m05s");
        assert_eq!(fmt_secs(7800.0), "2h10m");
        assert_eq!(fmt_secs(f64::INFINITY), "?");
    }
}
