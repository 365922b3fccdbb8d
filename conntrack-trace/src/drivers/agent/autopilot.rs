//! `agent --autopilot off|dry-run|on`: raises `nf_conntrack_max` (and the
//! hash buckets when `doctor` would) before — or as soon as — a table
//! drops packets because it is full.
//!
//! What to raise it to is `doctor`'s raise-max sizing, the same code:
//! the neediest namespace and its demand ([`advice::neediest`]), the
//! power-of-two table for it ([`memory::propose_within`]), here within
//! `--autopilot-memory` instead of doctor's 5 % of RAM.
//!
//! [`decide`] is the pure part (every guard rail is unit-tested below):
//! it never lowers; never goes beyond the memory budget at a full table
//! priced per entry as doctor prices it ([`Decision::Capped`] says so);
//! makes at most one change per cooldown; and leaves alone a max someone
//! else lowered since our last raise (kube-proxy re-applies its own
//! `--conntrack-max-per-core` on start): fighting it would flap.
//! [`Autopilot`] is the agent's side: it gathers the facts per tick,
//! writes the sysctls (`on`; `dry-run` writes nothing) and reports each
//! decision once.
//!
//! Writing needs the initial network namespace (the sysctls are 0444
//! elsewhere: nf_conntrack_standalone.c), a writable /proc/sys and, for a
//! root in a user namespace, CAP_NET_ADMIN (net_ctl_permissions()).

use std::{
    collections::{HashMap, VecDeque},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    analysis::forecast::{Forecast, Trend},
    drivers::doctor::{
        advice::{self, NsFacts, Place},
        memory::{self, Budget, EntryCost, Sizing},
    },
    model::KindCounts,
};

/// Where the global limit and hash size are (writable in the init
/// namespace only); `--autopilot-sysctl-dir` names another mount of it (a
/// container's /proc/sys is read-only: see
/// deploy/kubernetes/daemonset-autopilot.yaml).
pub const SYSCTL_DIR: &str = "/proc/sys/net/netfilter";
const MAX_FILE: &str = "nf_conntrack_max";
const BUCKETS_FILE: &str = "nf_conntrack_buckets";

/// `--autopilot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Off,
    /// Decide and log, write nothing.
    DryRun,
    On,
}

/// `--autopilot-memory`: a share of RAM or a size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryLimit {
    /// 0 < share ≤ 1.
    Share(f64),
    Bytes(u64),
}

impl MemoryLimit {
    /// The budget a full table must fit in on a machine with `ram` bytes.
    pub fn budget(&self, ram: u64) -> Budget {
        match *self {
            MemoryLimit::Share(s) => Budget {
                bytes: (ram as f64 * s) as u64,
                what: format!(
                    "--autopilot-memory {}% of RAM ({})",
                    s * 100.0,
                    memory::fmt_bytes(ram)
                ),
            },
            MemoryLimit::Bytes(b) => Budget {
                bytes: b,
                what: format!("--autopilot-memory {}", memory::fmt_bytes(b)),
            },
        }
    }
}

/// The autopilot's settings (the CLI builds them).
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: Mode,
    /// A table the forecast says is full within this long is raised now;
    /// a filling table is sized for its growth over this long (doctor's
    /// `--at-risk-within`).
    pub horizon: Duration,
    pub memory: MemoryLimit,
    /// At most one change per this long.
    pub cooldown: Duration,
    /// The directory holding nf_conntrack_max and nf_conntrack_buckets.
    pub sysctl_dir: PathBuf,
}

impl Options {
    pub fn max_path(&self) -> PathBuf {
        self.sysctl_dir.join(MAX_FILE)
    }

    fn buckets_path(&self) -> PathBuf {
        self.sysctl_dir.join(BUCKETS_FILE)
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            mode: Mode::Off,
            horizon: Duration::from_secs(600),
            memory: MemoryLimit::Share(0.02),
            cooldown: Duration::from_secs(60),
            sysctl_dir: PathBuf::from(SYSCTL_DIR),
        }
    }
}

/// What made the autopilot look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The namespace's table dropped packets (table_full) since last tick.
    TableFull,
    /// The forecast says full within the horizon.
    Forecast,
}

/// The facts a decision is taken from (no I/O).
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    pub current_max: u64,
    pub current_buckets: u64,
    /// Entries needed (doctor's demand estimate).
    pub demand: f64,
    pub ram: u64,
    pub cost: &'a EntryCost,
    pub budget: &'a Budget,
    pub now: Instant,
    pub cooldown: Duration,
    /// When we last changed (or, in dry-run, would have changed) the max.
    pub last_action: Option<Instant>,
    /// The max we last set (never in dry-run).
    pub last_set: Option<u64>,
}

/// Why nothing is changed.
#[derive(Clone, Debug, PartialEq)]
pub enum Skip {
    /// The max is below what we set: someone else lowered it.
    LoweredBySomeoneElse {
        ours: u64,
        now: u64,
    },
    Cooldown {
        since_s: f64,
        cooldown_s: f64,
    },
    /// No larger table fits the budget.
    NoRoom(String),
    /// Writing the sysctl failed (EPERM, EROFS, ...).
    Write(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::LoweredBySomeoneElse { ours, now } => write!(
                f,
                "lowered by someone else: we set nf_conntrack_max {ours}, it is {now} now; not fighting it"
            ),
            Skip::Cooldown {
                since_s,
                cooldown_s,
            } => write!(
                f,
                "cooldown: last change {since_s:.0} s ago, at most one per {cooldown_s:.0} s"
            ),
            Skip::NoRoom(why) => f.write_str(why),
            Skip::Write(why) => f.write_str(why),
        }
    }
}

/// A decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Raise {
        from: u64,
        sizing: Sizing,
    },
    /// A raise, but only to what the budget allows: short of the demand.
    Capped {
        from: u64,
        sizing: Sizing,
    },
    Skipped(Skip),
}

/// The guard rails, in order: someone else's lower max is left alone, one
/// change per cooldown, then doctor's sizing within the budget (never
/// lower: [`memory::propose_within`] only proposes more than now).
pub fn decide(f: &Facts<'_>) -> Decision {
    if let Some(ours) = f.last_set
        && f.current_max < ours
    {
        return Decision::Skipped(Skip::LoweredBySomeoneElse {
            ours,
            now: f.current_max,
        });
    }
    if let Some(t) = f.last_action {
        let since = f.now.saturating_duration_since(t);
        if since < f.cooldown {
            return Decision::Skipped(Skip::Cooldown {
                since_s: since.as_secs_f64(),
                cooldown_s: f.cooldown.as_secs_f64(),
            });
        }
    }
    match memory::propose_within(
        f.current_max,
        f.current_buckets,
        f.demand,
        f.cost,
        f.ram,
        f.budget,
    ) {
        Err(why) => Decision::Skipped(Skip::NoRoom(why)),
        Ok(sizing) if sizing.max <= f.current_max => Decision::Skipped(Skip::NoRoom(format!(
            "nothing above {} fits in {}",
            f.current_max, f.budget.what
        ))),
        Ok(sizing) if sizing.capped => Decision::Capped {
            from: f.current_max,
            sizing,
        },
        Ok(sizing) => Decision::Raise {
            from: f.current_max,
            sizing,
        },
    }
}

/// A raise (or capped raise) as logged and recorded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Raise {
    pub netns: String,
    pub reason: Reason,
    pub from: u64,
    pub to: u64,
    pub buckets_from: u64,
    pub buckets_to: u64,
    /// Entries needed (doctor's estimate: what [`decide`] sized for) and
    /// how it was estimated.
    pub demand: f64,
    pub demand_why: String,
    /// The forecast's seconds to full when it was filling (0: full).
    pub forecast_eta_s: Option<f64>,
    /// Memory of the new table when full (doctor's pricing).
    pub memory_bytes: u64,
    pub memory: String,
    pub budget_bytes: u64,
    /// `dry-run`: what `on` would have written; nothing was.
    pub dry_run: bool,
}

/// One namespace's recent history (the window doctor's rates are over).
#[derive(Debug, Default)]
struct Seen {
    /// (t, table_full, early_drop, entries), oldest first, over [`WINDOW`].
    samples: VecDeque<(Instant, u64, u64, u64)>,
}

/// The window over which refusal rates and the peak are measured.
const WINDOW: Duration = Duration::from_secs(10);

/// One namespace this tick.
pub struct Look<'a> {
    pub inode: u32,
    pub name: String,
    pub entries: u64,
    pub forecast: &'a Forecast,
    /// The namespace's table_full and early_drop counts so far.
    pub table_full: u64,
    pub early_drop: u64,
}

/// What the agent logs, counts and records for a decision.
pub enum Outcome {
    Raised(Raise),
    Capped(Raise),
    Skipped { netns: String, why: String },
}

/// The agent's side: facts over time, writes, one report per decision.
pub struct Autopilot {
    pub opts: Options,
    cost: EntryCost,
    ram: u64,
    budget: Budget,
    seen: HashMap<u32, Seen>,
    last_action: Option<Instant>,
    last_set: Option<u64>,
    /// The last skip reported (a skip is reported once until it changes).
    last_skip: Option<std::mem::Discriminant<Skip>>,
}

/// Opens the max for writing (and writes nothing): can `on` work here?
pub fn check_writable(opts: &Options) -> Result<(), String> {
    let p = opts.max_path();
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .map(drop)
        .map_err(|e| {
            format!(
                "--autopilot on: {} is not writable ({e}): it needs the initial network namespace, CAP_NET_ADMIN there and /proc/sys mounted read-write (or --autopilot-sysctl-dir naming a writable mount of it; or --autopilot dry-run)",
                p.display()
            )
        })
}

pub fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn write_u64(p: &Path, v: u64) -> Result<(), String> {
    fs::OpenOptions::new()
        .write(true)
        .open(p)
        .and_then(|mut f| f.write_all(v.to_string().as_bytes()))
        .map_err(|e| format!("writing {v} to {}: {e}", p.display()))
}

impl Autopilot {
    pub fn new(opts: Options, cost: EntryCost, ram: u64) -> Autopilot {
        let budget = opts.memory.budget(ram);
        Autopilot {
            opts,
            cost,
            ram,
            budget,
            seen: HashMap::new(),
            last_action: None,
            last_set: None,
            last_skip: None,
        }
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    pub fn forget(&mut self, inode: u32) {
        self.seen.remove(&inode);
    }

    /// Looks at this tick's namespaces; at most one outcome to report.
    pub fn tick(&mut self, now: Instant, looks: &[Look<'_>]) -> Option<Outcome> {
        let horizon_s = self.opts.horizon.as_secs_f64();
        let current_max = read_u64(&self.opts.max_path())?;
        let current_buckets = read_u64(&self.opts.buckets_path()).unwrap_or(0);
        let mut facts: Vec<(NsFacts<'_>, Reason)> = Vec::new();
        for l in looks {
            let s = self.seen.entry(l.inode).or_default();
            let dropped = s.samples.back().is_some_and(|b| l.table_full > b.1);
            s.samples
                .push_back((now, l.table_full, l.early_drop, l.entries));
            while s
                .samples
                .front()
                .is_some_and(|f| now.saturating_duration_since(f.0) > WINDOW)
            {
                s.samples.pop_front();
            }
            let soon = match l.forecast.trend {
                Trend::Full => true,
                Trend::Filling => l.forecast.eta_s.is_some_and(|e| e <= horizon_s),
                _ => false,
            };
            if !dropped && !soon {
                continue;
            }
            let first = s.samples.front().copied().unwrap_or((now, 0, 0, 0));
            let peak = s.samples.iter().map(|x| x.3).max().unwrap_or(l.entries);
            facts.push((
                NsFacts {
                    name: &l.name,
                    place: Place::Init,
                    entries: l.entries,
                    max: current_max,
                    buckets: current_buckets,
                    peak,
                    duration_s: now.saturating_duration_since(first.0).as_secs_f64(),
                    drops: KindCounts {
                        table_full: l.table_full.saturating_sub(first.1),
                        early_drop: l.early_drop.saturating_sub(first.2),
                        ..KindCounts::default()
                    },
                    victims: &[],
                    holders: None,
                    forecast: Some(l.forecast),
                    udp_timeout: None,
                    tcp_syn_sent_timeout: None,
                    troubled: true,
                },
                if dropped {
                    Reason::TableFull
                } else {
                    Reason::Forecast
                },
            ));
        }
        let ns: Vec<NsFacts<'_>> = facts.iter().map(|(f, _)| f.clone()).collect();
        let (worst, (demand, demand_why)) = advice::neediest(&ns, horizon_s)?;
        let reason = facts
            .iter()
            .find(|(f, _)| f.name == worst.name)
            .map_or(Reason::Forecast, |(_, r)| *r);
        let forecast_eta_s = worst.forecast.and_then(|fc| match fc.trend {
            Trend::Full => Some(0.0),
            Trend::Filling => fc.eta_s,
            _ => None,
        });
        let netns = worst.name.to_owned();
        let decision = decide(&Facts {
            current_max,
            current_buckets,
            demand,
            ram: self.ram,
            cost: &self.cost,
            budget: &self.budget,
            now,
            cooldown: self.opts.cooldown,
            last_action: self.last_action,
            last_set: self.last_set,
        });
        let (from, sizing, capped) = match decision {
            Decision::Skipped(skip) => return self.skipped(netns, skip),
            Decision::Raise { from, sizing } => (from, sizing, false),
            Decision::Capped { from, sizing } => (from, sizing, true),
        };
        let dry_run = self.opts.mode != Mode::On;
        self.last_action = Some(now);
        if !dry_run {
            // Buckets first, so the larger table never runs on longer
            // chains (doctor's order).
            let written = if sizing.buckets > current_buckets {
                write_u64(&self.opts.buckets_path(), sizing.buckets)
            } else {
                Ok(())
            }
            .and_then(|()| write_u64(&self.opts.max_path(), sizing.max));
            if let Err(why) = written {
                return self.skipped(netns, Skip::Write(why));
            }
            self.last_set = Some(sizing.max);
        }
        self.last_skip = None;
        let r = Raise {
            netns,
            reason,
            from,
            to: sizing.max,
            buckets_from: current_buckets,
            buckets_to: sizing.buckets.max(current_buckets),
            demand,
            demand_why,
            forecast_eta_s,
            memory_bytes: sizing.bytes,
            memory: memory::fmt_bytes(sizing.bytes),
            budget_bytes: self.budget.bytes,
            dry_run,
        };
        Some(if capped {
            Outcome::Capped(r)
        } else {
            Outcome::Raised(r)
        })
    }

    /// A skip, reported once until the reason changes.
    fn skipped(&mut self, netns: String, skip: Skip) -> Option<Outcome> {
        let d = std::mem::discriminant(&skip);
        if self.last_skip == Some(d) {
            return None;
        }
        self.last_skip = Some(d);
        Some(Outcome::Skipped {
            netns,
            why: skip.to_string(),
        })
    }
}

/// Writes `value` as `autopilot-N.json` into an incident directory.
pub fn record(dir: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let mut n = 1;
    let mut p = dir.join("autopilot-1.json");
    while p.symlink_metadata().is_ok() {
        n += 1;
        p = dir.join(format!("autopilot-{n}.json"));
    }
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .and_then(|mut f| f.write_all(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost() -> EntryCost {
        EntryCost {
            object_bytes: 256,
            object_source: "test".into(),
            extension_bytes: 128,
            bucket_bytes: 8,
        }
    }

    const GIB: u64 = 1 << 30;

    fn facts<'a>(c: &'a EntryCost, b: &'a Budget, now: Instant) -> Facts<'a> {
        Facts {
            current_max: 128,
            current_buckets: 262_144,
            demand: 700.0,
            ram: 8 * GIB,
            cost: c,
            budget: b,
            now,
            cooldown: Duration::from_secs(60),
            last_action: None,
            last_set: None,
        }
    }

    #[test]
    fn raises_to_doctors_sizing() {
        let (c, now) = (cost(), Instant::now());
        let b = MemoryLimit::Share(0.02).budget(8 * GIB);
        let f = facts(&c, &b, now);
        let d = decide(&f);
        // doctor's rule: the power of two ≥ 1.5 × 700 = 1050 → 2048.
        let want = memory::propose(128, 262_144, 700.0, &c, 8 * GIB).unwrap();
        assert_eq!(want.max, 2048);
        assert_eq!(
            d,
            Decision::Raise {
                from: 128,
                sizing: want
            }
        );
    }

    #[test]
    fn never_lowers() {
        let (c, now) = (cost(), Instant::now());
        let b = MemoryLimit::Share(0.02).budget(8 * GIB);
        // A demand far below the current max still only raises.
        let f = Facts {
            current_max: 65_536,
            demand: 10.0,
            ..facts(&c, &b, now)
        };
        match decide(&f) {
            Decision::Raise { from, sizing } => assert!(sizing.max > from),
            d => panic!("{d:?}"),
        }
        // Nothing larger fits: skipped, not lowered.
        let tiny = MemoryLimit::Bytes(1 << 20).budget(8 * GIB);
        let f = Facts {
            current_max: 65_536,
            budget: &tiny,
            ..facts(&c, &b, now)
        };
        match decide(&f) {
            Decision::Skipped(Skip::NoRoom(why)) => {
                assert!(why.contains("--autopilot-memory 1.0 MiB"), "{why}")
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn caps_at_the_memory_budget_and_says_so() {
        let (c, now) = (cost(), Instant::now());
        // 1 MiB, buckets already 262144 × 8 B = 2 MiB: take buckets 0.
        let b = MemoryLimit::Bytes(1 << 20).budget(8 * GIB);
        let f = Facts {
            current_buckets: 0,
            demand: 100_000.0,
            ..facts(&c, &b, now)
        };
        match decide(&f) {
            Decision::Capped { from, sizing } => {
                assert_eq!(from, 128);
                assert!(sizing.capped && sizing.bytes <= 1 << 20, "{sizing:?}");
                // 2048 × (384 + 8) = 802816 fits; 4096 would not.
                assert_eq!(sizing.max, 2048);
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn one_change_per_cooldown() {
        let (c, now) = (cost(), Instant::now());
        let b = MemoryLimit::Share(0.02).budget(8 * GIB);
        let f = Facts {
            last_action: Some(now),
            now: now + Duration::from_secs(59),
            current_max: 2048,
            last_set: Some(2048),
            ..facts(&c, &b, now)
        };
        assert!(matches!(
            decide(&f),
            Decision::Skipped(Skip::Cooldown { .. })
        ));
        let f = Facts {
            now: now + Duration::from_secs(60),
            ..f
        };
        assert!(matches!(decide(&f), Decision::Raise { from: 2048, .. }));
    }

    #[test]
    fn a_max_lowered_by_someone_else_is_left_alone() {
        let (c, now) = (cost(), Instant::now());
        let b = MemoryLimit::Share(0.02).budget(8 * GIB);
        // We set 2048 long ago; kube-proxy put 128 back.
        let f = Facts {
            last_action: Some(now),
            last_set: Some(2048),
            now: now + Duration::from_secs(3600),
            ..facts(&c, &b, now)
        };
        let d = decide(&f);
        assert_eq!(
            d,
            Decision::Skipped(Skip::LoweredBySomeoneElse {
                ours: 2048,
                now: 128
            })
        );
        let Decision::Skipped(s) = d else {
            unreachable!()
        };
        assert!(s.to_string().starts_with("lowered by someone else"));
        // Raised further by someone else: fine, ours is not fought either.
        let f = Facts {
            current_max: 4096,
            ..f
        };
        assert!(matches!(decide(&f), Decision::Raise { from: 4096, .. }));
    }

    /// The driver over a stand-in sysctl directory: dry-run decides what
    /// `on` decides and writes nothing; `on` writes it, then leaves a
    /// lowered max alone and says so once.
    #[test]
    fn dry_run_logs_what_on_writes() {
        let dir = std::env::temp_dir().join(format!("ctt-autopilot-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let max = dir.join(MAX_FILE);
        let fc = crate::analysis::forecast::Estimator::default().forecast();
        let t0 = Instant::now();
        let look = |table_full| Look {
            inode: 7,
            name: "srv".into(),
            entries: 128,
            forecast: &fc,
            table_full,
            early_drop: 0,
        };
        let run = |mode| {
            fs::write(&max, "128").unwrap();
            fs::write(dir.join(BUCKETS_FILE), "262144").unwrap();
            let opts = Options {
                mode,
                sysctl_dir: dir.clone(),
                ..Options::default()
            };
            let mut p = Autopilot::new(opts, cost(), 8 * GIB);
            assert!(p.tick(t0, &[look(0)]).is_none(), "no drop yet");
            let Some(Outcome::Raised(r)) = p.tick(t0 + Duration::from_secs(1), &[look(40)]) else {
                panic!("no raise")
            };
            (p, r)
        };
        let (_, dry) = run(Mode::DryRun);
        assert_eq!(fs::read_to_string(&max).unwrap(), "128", "dry-run wrote");
        let (mut p, on) = run(Mode::On);
        assert_eq!(fs::read_to_string(&max).unwrap(), on.to.to_string());
        assert!(dry.dry_run && !on.dry_run);
        assert_eq!(
            Raise {
                dry_run: false,
                ..dry
            },
            on
        );
        assert_eq!((on.from, on.reason), (128, Reason::TableFull));
        // kube-proxy puts 128 back: skipped once, not fought.
        fs::write(&max, "128").unwrap();
        let later = t0 + Duration::from_secs(3600);
        match p.tick(later, &[look(80)]) {
            Some(Outcome::Skipped { why, .. }) => {
                assert!(why.starts_with("lowered by someone else"), "{why}")
            }
            _ => panic!("not skipped"),
        }
        assert!(
            p.tick(later + Duration::from_secs(1), &[look(90)])
                .is_none()
        );
        assert_eq!(fs::read_to_string(&max).unwrap(), "128");
        let _ = fs::remove_dir_all(&dir);
    }

    fn sysctl_dir(tag: &str, max: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ctt-autopilot-{tag}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(MAX_FILE), max).unwrap();
        dir
    }

    /// A filling table the forecast says is full within the horizon is
    /// raised before it drops, sized for its growth over the horizon.
    #[test]
    fn a_forecast_within_the_horizon_raises_before_any_drop() {
        let dir = sysctl_dir("fc", "128");
        fs::write(dir.join(BUCKETS_FILE), "262144").unwrap();
        let mut fc = crate::analysis::forecast::Estimator::default().forecast();
        (fc.trend, fc.eta_s, fc.slope_per_s) = (Trend::Filling, Some(14.0), 2.0);
        let opts = Options {
            mode: Mode::On,
            sysctl_dir: dir.clone(),
            ..Options::default()
        };
        let mut p = Autopilot::new(opts, cost(), 8 * GIB);
        let look = Look {
            inode: 7,
            name: "srv".into(),
            entries: 100,
            forecast: &fc,
            table_full: 0,
            early_drop: 0,
        };
        let Some(Outcome::Raised(r)) = p.tick(Instant::now(), &[look]) else {
            panic!("no raise")
        };
        // 100 entries + 2/s × 600 s = 1300; × 1.5 → 2048.
        assert_eq!((r.reason, r.from, r.to), (Reason::Forecast, 128, 2048));
        assert_eq!(r.forecast_eta_s, Some(14.0));
        assert!(
            r.demand_why.contains("growth over 600 s"),
            "{}",
            r.demand_why
        );
        assert_eq!(fs::read_to_string(dir.join(MAX_FILE)).unwrap(), "2048");
        let _ = fs::remove_dir_all(&dir);
    }

    /// A write the kernel refuses is one skipped line with its error; the
    /// agent goes on.
    #[test]
    fn a_failed_write_is_skipped_with_the_error() {
        let dir = sysctl_dir("ro", "128");
        // Buckets unreadable and unwritable (a directory): the sizing
        // wants more buckets and its write fails (EISDIR here; EPERM or
        // EROFS on a real /proc/sys).
        fs::create_dir_all(dir.join(BUCKETS_FILE)).unwrap();
        let opts = Options {
            mode: Mode::On,
            sysctl_dir: dir.clone(),
            ..Options::default()
        };
        let mut p = Autopilot::new(opts, cost(), 8 * GIB);
        let fc = crate::analysis::forecast::Estimator::default().forecast();
        let look = |table_full| Look {
            inode: 7,
            name: "srv".into(),
            entries: 128,
            forecast: &fc,
            table_full,
            early_drop: 0,
        };
        let t0 = Instant::now();
        assert!(p.tick(t0, &[look(0)]).is_none());
        match p.tick(t0 + Duration::from_secs(1), &[look(10)]) {
            Some(Outcome::Skipped { why, .. }) => {
                assert!(
                    why.starts_with("writing ") && why.contains(BUCKETS_FILE),
                    "{why}"
                )
            }
            _ => panic!("not skipped"),
        }
        assert_eq!(fs::read_to_string(dir.join(MAX_FILE)).unwrap(), "128");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn memory_limits() {
        let b = MemoryLimit::Share(0.02).budget(1000 << 20);
        assert_eq!(b.bytes, 20 << 20);
        assert_eq!(b.what, "--autopilot-memory 2% of RAM (1000.0 MiB)");
        assert_eq!(MemoryLimit::Bytes(512 << 20).budget(0).bytes, 512 << 20);
    }
}
