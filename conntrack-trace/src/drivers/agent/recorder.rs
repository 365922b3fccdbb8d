//! The flight recorder: a rolling capture in `--record-dir`, bounded in
//! size and age, from which incident captures are kept.
//!
//! Layout of the directory:
//!
//! * `rolling/<start>-<pid>.ctt`, `.ctt.1`, `.ctt.2`, ...: one capture per
//!   agent run, written by the capture writer with its own rotation
//!   (`--max-size` of `trace --write`), one file per eighth of
//!   `--record-max-size` (at least 64 KiB). After every rotation and every
//!   tick, the oldest files (of any run, by name: the start time leads)
//!   are deleted while the files together exceed `--record-max-size`, or
//!   when older than `--record-max-age`; the file being written is never
//!   deleted. So the rolling files never exceed the cap by more than the
//!   file being written.
//! * `incident-<time>/`: when drops start (or on SIGUSR1, or a firing
//!   alert from Alertmanager: [`super::alerts`]), hard links to
//!   the current run's files written in the last `--incident-before`, and
//!   to each file the run starts within `--incident-after`. Rolling
//!   deletion unlinks only names under `rolling/`, so an incident's data
//!   stays; at most `--max-incidents` are kept, the oldest removed first.
//!   An incident directory is one capture's consecutive files (and an
//!   alert's `alert*.json`): `report DIR/incident-*/*.ctt*` reads it
//!   (saying which earlier files are missing).
//!
//! What a killed agent loses: the capture writer hands its records to the
//! kernel at least every 100 ms (`capture::writer::HANDOVER`) whatever
//! `--interval` is, so SIGKILL (an OOM kill, a container runtime's kill
//! after its grace period) loses at most the last 100 ms; each tick also
//! fdatasyncs, for a crash of the machine.
//!
//! A restarted agent starts a new run in the same directory: the earlier
//! runs' files are kept and take part in the rolling bound; incidents are
//! never touched except by the incident cap.

use std::{
    fs,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::{
    formats::capture::{
        self, Header, Trailer, WriteOptions, Writer,
        writer::{MIN_MAX_SIZE, rotated_path},
    },
    formats::output::NetnsNames,
    model::event::Event,
};

use super::log::{self, State};

#[derive(Clone, Debug, PartialEq)]
pub struct RecordOptions {
    pub dir: PathBuf,
    pub max_size: u64,
    pub max_age: Option<Duration>,
    pub before: Duration,
    pub after: Duration,
    pub max_incidents: usize,
}

pub const ROLLING: &str = "rolling";
const INCIDENT_PREFIX: &str = "incident-";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("--record-dir {0}: {1}")]
    Dir(String, String),
    #[error(transparent)]
    Write(#[from] capture::WriteError),
}

struct Incident {
    dir: PathBuf,
    until: SystemTime,
    /// This run's files from this one on belong to the incident.
    from_seq: u32,
}

pub struct Recorder {
    opts: RecordOptions,
    rolling: PathBuf,
    base: PathBuf,
    writer: Option<Writer>,
    /// Files of this run handed to the writer so far.
    files: u32,
    incident: Option<Incident>,
    warned: bool,
}

/// Creates `dir` (mode 0700) if missing; refuses a symlink or non-directory.
fn ensure_dir(dir: &Path) -> Result<(), RecordError> {
    let err = |e: String| RecordError::Dir(dir.display().to_string(), e);
    match fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(m) if m.file_type().is_symlink() => {
            Err(err("is a symbolic link; refusing to follow it".into()))
        }
        Ok(_) => Err(err("not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(e.to_string())),
        Err(e) => Err(err(e.to_string())),
    }
}

fn stamp(t: SystemTime) -> String {
    let ns = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    crate::model::clock::utc(ns).replace(':', "")
}

/// Rolling files, oldest first: (path, bytes, mtime).
fn rolling_files(dir: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
    let mut v: Vec<(String, u32, PathBuf, u64, SystemTime)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            if !m.file_type().is_file() {
                return None;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let (run, seq) = match name.split_once(".ctt") {
                Some((run, "")) => (run.to_owned(), 0),
                Some((run, rest)) => (run.to_owned(), rest.strip_prefix('.')?.parse().ok()?),
                None => return None,
            };
            Some((run, seq, e.path(), m.len(), m.modified().ok()?))
        })
        .collect();
    v.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    v.into_iter().map(|(_, _, p, n, t)| (p, n, t)).collect()
}

/// Incident directories, oldest first.
fn incidents(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with(INCIDENT_PREFIX)
                && e.file_type().is_ok_and(|t| t.is_dir())
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Removes an incident directory we made: its regular files, then itself
/// (anything else inside stays, and so does the directory).
fn remove_incident(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Recorder {
    /// Checks the directory and creates this run's first file (before
    /// anything is loaded: an unusable directory fails the start).
    pub fn prepare(
        opts: RecordOptions,
    ) -> Result<(Recorder, capture::writer::Prepared), RecordError> {
        ensure_dir(&opts.dir)?;
        let rolling = opts.dir.join(ROLLING);
        ensure_dir(&rolling)?;
        let base = rolling.join(format!(
            "{}-{}.ctt",
            stamp(SystemTime::now()),
            std::process::id()
        ));
        let prepared = capture::writer::prepare(
            WriteOptions {
                path: base.clone(),
                force: false,
                max_size: Some(Self::file_size(&opts)),
            },
            &[],
        )?;
        Ok((
            Recorder {
                opts,
                rolling,
                base,
                writer: None,
                files: 0,
                incident: None,
                warned: false,
            },
            prepared,
        ))
    }

    /// Size of one rolling file: an eighth of the bound.
    pub fn file_size(opts: &RecordOptions) -> u64 {
        (opts.max_size / 8).max(MIN_MAX_SIZE)
    }

    /// Writes the header; recording starts.
    pub fn start(
        &mut self,
        prepared: capture::writer::Prepared,
        header: Header,
        names: &NetnsNames,
    ) -> Result<(), RecordError> {
        self.writer = Some(Writer::start(prepared, header, names)?);
        self.files = 1;
        self.enforce();
        Ok(())
    }

    pub fn event(&mut self, e: &Event) {
        if let Some(w) = &mut self.writer {
            w.event(e);
            if w.files() != self.files {
                self.rotated();
            }
        }
    }

    fn rotated(&mut self) {
        let Some(w) = &self.writer else { return };
        self.files = w.files();
        self.link_incident();
        self.enforce();
    }

    /// Links this run's files that belong to the open incident (the
    /// writer's thread creates each file: one not there yet is linked at
    /// the next call; linking twice is a no-op).
    fn link_incident(&self) {
        if let Some(inc) = &self.incident {
            for seq in inc.from_seq..self.files {
                let _ = link_into(&rotated_path(&self.base, seq), &inc.dir);
            }
        }
    }

    /// Per tick: names, durability on disk (fdatasync), bounds, incident
    /// progress.
    pub fn tick(&mut self, names: &NetnsNames) {
        if let Some(w) = &mut self.writer {
            w.names(names);
            w.flush();
            if !self.warned
                && let Some(e) = w.failed()
            {
                log::emit(&State::Warning {
                    message: format!("flight recorder: {e}; recording stopped"),
                });
                self.warned = true;
            }
        }
        self.link_incident();
        if let Some(inc) = &self.incident
            && SystemTime::now() > inc.until
        {
            let files = fs::read_dir(&inc.dir).map(|d| d.count()).unwrap_or(0);
            log::emit(&State::IncidentClosed {
                dir: inc.dir.display().to_string(),
                files,
            });
            self.incident = None;
        }
        self.enforce();
    }

    /// The open incident's directory, if one is open.
    pub fn incident_dir(&self) -> Option<&Path> {
        self.incident.as_ref().map(|i| i.dir.as_path())
    }

    /// Keeps the minutes before and after now as an incident capture.
    /// While one is open, a new trigger extends it. Returns the incident's
    /// directory (`None`: it could not be created, a warning says why).
    pub fn incident(&mut self, reason: &str) -> Option<PathBuf> {
        let now = SystemTime::now();
        if let Some(inc) = &mut self.incident {
            inc.until = now + self.opts.after;
            return Some(inc.dir.clone());
        }
        let mut dir = self
            .opts
            .dir
            .join(format!("{INCIDENT_PREFIX}{}", stamp(now)));
        let mut n = 1;
        while dir.symlink_metadata().is_ok() {
            dir = self
                .opts
                .dir
                .join(format!("{INCIDENT_PREFIX}{}-{n}", stamp(now)));
            n += 1;
        }
        if let Err(e) = fs::DirBuilder::new().mode(0o700).create(&dir) {
            log::emit(&State::Warning {
                message: format!("flight recorder: creating {}: {e}", dir.display()),
            });
            return None;
        }
        // Make what is buffered part of the files being linked.
        if let Some(w) = &mut self.writer {
            w.flush();
        }
        let since = now - self.opts.before;
        // The first file of this run written to within the window before
        // now (the current one at the latest); from it on, all are kept.
        let last = self.files.saturating_sub(1);
        let from_seq = (0..last)
            .find(|seq| {
                fs::symlink_metadata(rotated_path(&self.base, *seq))
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t >= since)
            })
            .unwrap_or(last);
        log::emit(&State::IncidentStarted {
            dir: dir.display().to_string(),
            reason: reason.to_owned(),
        });
        self.incident = Some(Incident {
            dir: dir.clone(),
            until: now + self.opts.after,
            from_seq,
        });
        self.link_incident();
        let all = incidents(&self.opts.dir);
        if all.len() > self.opts.max_incidents {
            for old in &all[..all.len() - self.opts.max_incidents] {
                remove_incident(old);
            }
        }
        Some(dir)
    }

    /// Deletes the oldest rolling files beyond the size and age bounds,
    /// never the one being written.
    fn enforce(&mut self) {
        // An incident's files are linked before any can be deleted.
        self.link_incident();
        let current_seq = self.files.saturating_sub(1);
        let current = rotated_path(&self.base, current_seq);
        let files = rolling_files(&self.rolling);
        let file_size = Self::file_size(&self.opts);
        // The writer's thread may lag behind: this run's earlier files are
        // counted at their final size (at most one file each), and files
        // it has not created yet too, so that once it catches up the
        // directory is still within the bound plus the file being written.
        let ours: Vec<u32> = (0..current_seq)
            .filter(|seq| files.iter().any(|f| f.0 == rotated_path(&self.base, *seq)))
            .collect();
        let newest_on_disk = ours.last().copied();
        let not_yet = match newest_on_disk {
            Some(n) => current_seq.saturating_sub(n + 1),
            None => current_seq.min(self.files),
        };
        let mut total: u64 = files
            .iter()
            .filter(|f| f.0 != current)
            .map(|f| {
                if ours.iter().any(|seq| f.0 == rotated_path(&self.base, *seq)) {
                    file_size.max(f.1)
                } else {
                    f.1
                }
            })
            .sum::<u64>()
            + u64::from(not_yet) * file_size;
        let now = SystemTime::now();
        for (p, n, mtime) in files {
            if p == current {
                continue;
            }
            let too_old = self
                .opts
                .max_age
                .is_some_and(|a| now.duration_since(mtime).is_ok_and(|d| d > a));
            if total <= self.opts.max_size && !too_old {
                // Oldest first: once within the size bound only age
                // matters, and younger files are younger still.
                if self.opts.max_age.is_none() {
                    break;
                }
                continue;
            }
            let counted = if ours.iter().any(|seq| p == rotated_path(&self.base, *seq)) {
                file_size.max(n)
            } else {
                n
            };
            if fs::remove_file(&p).is_ok() {
                total = total.saturating_sub(counted);
            }
        }
    }

    /// Writes the trailer (clean shutdown).
    pub fn finish(&mut self, trailer: Trailer) -> Result<(), RecordError> {
        if let Some(w) = self.writer.take() {
            w.finish(trailer)?;
        }
        Ok(())
    }

    pub fn events_written(&self) -> u64 {
        self.writer.as_ref().map_or(0, Writer::events_written)
    }
}

/// Hard-links `file` into `dir` under its own name. linkat(2) without
/// AT_SYMLINK_FOLLOW never follows a symlink at `file`, and fails if the
/// name exists in `dir` (which we created): nothing is overwritten.
fn link_into(file: &Path, dir: &Path) -> std::io::Result<()> {
    let name = file
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    match fs::hard_link(file, dir.join(name)) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::capture::{
        format::tests::sample_event,
        tests::{TempDir, header},
    };

    fn opts(dir: &Path, max: u64) -> RecordOptions {
        RecordOptions {
            dir: dir.to_owned(),
            max_size: max,
            max_age: None,
            before: Duration::from_secs(60),
            after: Duration::from_secs(60),
            max_incidents: 2,
        }
    }

    fn dir_bytes(dir: &Path) -> u64 {
        rolling_files(dir).iter().map(|f| f.1).sum()
    }

    #[test]
    fn rolling_bound_holds_and_incidents_survive() {
        let t = TempDir::new("recorder");
        let o = opts(&t.0, 1 << 20);
        let (mut r, p) = Recorder::prepare(o.clone()).unwrap();
        r.start(p, header(), &NetnsNames::new()).unwrap();
        let file = Recorder::file_size(&o);
        for i in 0..40_000 {
            r.event(&sample_event(i));
            if i == 1000 {
                r.tick(&NetnsNames::new());
                r.incident("test");
            }
            if i % 500 == 0 {
                r.tick(&NetnsNames::new());
                let b = dir_bytes(&t.0.join(ROLLING));
                assert!(b <= o.max_size + file + (256 << 10), "{b} bytes on disk");
            }
        }
        r.tick(&NetnsNames::new());
        let b = dir_bytes(&t.0.join(ROLLING));
        assert!(b <= o.max_size + file, "{b} bytes after a tick");
        let inc = incidents(&t.0);
        assert_eq!(inc.len(), 1);
        let files: Vec<PathBuf> = fs::read_dir(&inc[0])
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(!files.is_empty());
        // The first rolling file is gone, its incident link is not.
        assert!(!r.base.exists());
        let info = capture::read_set(&files, |_, _| {}).unwrap();
        assert!(info.events > 0);
        // Incident cap.
        r.incident = None;
        r.incident("b");
        r.incident = None;
        r.incident("c");
        assert_eq!(incidents(&t.0).len(), 2);
    }
}
