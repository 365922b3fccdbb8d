//! Writes a capture while tracing.
//!
//! The ring consumer only encodes records into an in-memory chunk (a few
//! hundred nanoseconds per event); full chunks go to an I/O thread over a
//! bounded channel, so disk latency (and fdatasync) never stalls the ring
//! drain. Only a disk slower than the event rate for longer than the queue
//! (64 MiB) can push back, and then the kernel counts what the ring lost.
//!
//! Durability: chunks are handed over when full, and at least every
//! [`HANDOVER`] (100 ms) by a small thread of the writer's own, whatever the
//! live interval: the I/O thread write(2)s them at once, and the page cache
//! keeps what was written when the process is killed, so SIGKILL loses at
//! most the last 100 ms (plus what the ring had not yet delivered). Every
//! live interval (`flush`) also fdatasyncs, for a crash of the machine.
//! Whatever reached the file reads back up to its last whole record.
//!
//! Cost: at most 10 extra write(2) a second while events arrive (none when
//! idle: an empty chunk is not handed over), beside one per full 256 KiB
//! chunk; the thread wakes 10 times a second. The consumer takes an
//! uncontended lock per event (the thread takes it only to swap the chunk).

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::format::{self, Header, MAGIC, Next, Trailer, rtype};
use crate::{
    formats::outfile::{self, Created, Input, OutError},
    kernel::workload::NetnsNames,
    model::event::Event,
};

/// Smallest accepted `--max-size`: a header, names and some events.
pub const MIN_MAX_SIZE: u64 = 64 << 10;
/// Room kept free in each file for the NEXT or TRAILER record.
const RESERVE: u64 = 16 << 10;
/// Chunk handed to the I/O thread.
const CHUNK: usize = 256 << 10;
/// Chunks in flight before the consumer waits (64 MiB).
const QUEUE: usize = 256;
/// Longest a record waits in the consumer's chunk before it is handed to
/// the I/O thread (and so to the kernel): what SIGKILL can lose.
pub const HANDOVER: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    pub path: PathBuf,
    /// Overwrite existing files.
    pub force: bool,
    /// Rotate to `PATH.1`, `PATH.2`, ... when a file would exceed this.
    pub max_size: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}: file exists (use --force to overwrite)")]
    Exists(String),
    #[error("--max-size {0} is below the minimum of {MIN_MAX_SIZE} bytes")]
    MaxSize(u64),
    #[error("--max-size {max} is too small for this capture's header ({header} bytes with {namespaces} namespaces): use at least {}", header * 4)]
    HeaderTooLarge {
        max: u64,
        header: u64,
        namespaces: usize,
    },
    #[error("writing capture {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("writing capture: {0}")]
    Thread(String),
    #[error("the capture header would be {0} bytes, more than a reader accepts ({max} bytes)", max = format::MAX_RECORD)]
    HeaderRecord(u64),
    #[error(transparent)]
    Out(OutError),
}

impl From<OutError> for WriteError {
    fn from(e: OutError) -> Self {
        match e {
            OutError::Exists(p) => WriteError::Exists(p),
            e => WriteError::Out(e),
        }
    }
}

impl WriteError {
    /// Refused because of the command line (exit 2), not failed (exit 1).
    pub fn is_refusal(&self) -> bool {
        match self {
            WriteError::Exists(_)
            | WriteError::MaxSize(_)
            | WriteError::HeaderTooLarge { .. }
            | WriteError::HeaderRecord(_) => true,
            WriteError::Out(e) => e.is_refusal(),
            WriteError::Io { .. } | WriteError::Thread(_) => false,
        }
    }
}

/// The file of index `seq` in a rotated set.
pub fn rotated_path(base: &Path, seq: u32) -> PathBuf {
    if seq == 0 {
        base.to_owned()
    } else {
        let mut s = base.as_os_str().to_owned();
        s.push(format!(".{seq}"));
        PathBuf::from(s)
    }
}

/// Every `PATH.N` in `PATH`'s directory that a rotation of this capture
/// could write (`N` as [`rotated_path`] spells it: 1 to `u32::MAX`, no
/// leading zero), in order. The directory is listed rather than probing
/// `PATH.1`, `PATH.2`, ... so that a gap (only `PATH.7` there) is found too.
pub fn rotation_targets(base: &Path) -> Result<Vec<(u32, PathBuf)>, WriteError> {
    let Some(name) = base.file_name() else {
        return Ok(Vec::new());
    };
    let dir = match base.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let io = |source| WriteError::Io {
        path: dir.display().to_string(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        // Creating the file itself will say what is wrong with the path.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut prefix = name.as_encoded_bytes().to_vec();
    prefix.push(b'.');
    let mut found = Vec::new();
    for e in entries {
        let e = e.map_err(io)?;
        let n = e.file_name();
        let Some(digits) = n.as_encoded_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let Some(seq) = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse::<u32>().ok())
            .filter(|&seq| seq > 0 && seq.to_string().as_bytes() == digits)
        else {
            continue;
        };
        found.push((seq, rotated_path(base, seq)));
    }
    found.sort();
    Ok(found)
}

/// Checks the options and that nothing would be overwritten without
/// `force`: the file, and every `PATH.N` a rotation could write (an
/// earlier capture's, or one planted to make the rotation fail), so that
/// such a file is refused at start rather than stopping the recording at
/// the rotation that meets it; and that nothing but regular files would be
/// replaced with `force`.
pub fn precheck(opts: &WriteOptions) -> Result<(), WriteError> {
    if let Some(m) = opts.max_size
        && m < MIN_MAX_SIZE
    {
        return Err(WriteError::MaxSize(m));
    }
    outfile::check(&opts.path, opts.force, &[])?;
    for (_, p) in rotation_targets(&opts.path)? {
        outfile::check(&p, opts.force, &[])?;
    }
    Ok(())
}

/// The first file of a capture, created (empty, exclusively) before the
/// tracer loads anything: a path that cannot be written fails the run
/// before any BPF is loaded, and the file is removed again if the run
/// fails before [`Writer::start`] wrote the header.
pub struct Prepared {
    opts: WriteOptions,
    file: Created,
}

impl Prepared {
    /// The capture file, for outputs that must not overwrite it.
    pub fn as_input(&self) -> Input {
        Input {
            path: self.opts.path.display().to_string(),
            id: self.file.id(),
        }
    }
}

/// Creates the capture's first file; with `force`, first removes the
/// rotated files (regular ones only) of an earlier capture at that path.
pub fn prepare(opts: WriteOptions, inputs: &[Input]) -> Result<Prepared, WriteError> {
    precheck(&opts)?;
    if opts.force {
        // A stale PATH.N from an earlier capture would be read as part of
        // this one. Listed, not probed with exists(): a dangling symlink is
        // there too, and is refused rather than written through at
        // rotation. All are checked before any is removed.
        let stale = rotation_targets(&opts.path)?;
        for (_, p) in &stale {
            outfile::check(p, true, inputs)?;
        }
        for (_, p) in &stale {
            outfile::remove_stale(p, inputs)?;
        }
    }
    let file = outfile::create(&opts.path, opts.force, inputs)?;
    Ok(Prepared { opts, file })
}

enum Msg {
    Data(Vec<u8>),
    /// fdatasync the current file.
    Sync,
    /// Finish the current file and continue in this one.
    Rotate(PathBuf),
}

type Failure = Arc<Mutex<Option<WriteError>>>;

fn io_thread(
    mut file: File,
    mut path: PathBuf,
    force: bool,
    rx: Receiver<Msg>,
    free: SyncSender<Vec<u8>>,
    failed: Failure,
) {
    let fail = |e: WriteError| {
        if let Ok(mut f) = failed.lock()
            && f.is_none()
        {
            *f = Some(e);
        }
    };
    let mut broken = false;
    for msg in rx {
        if broken {
            // Keep draining so the consumer never blocks on a dead disk.
            if let Msg::Data(mut b) = msg {
                b.clear();
                let _ = free.try_send(b);
            }
            continue;
        }
        let r = match msg {
            Msg::Data(mut b) => {
                let r = file.write_all(&b);
                b.clear();
                let _ = free.try_send(b);
                r.map_err(|source| WriteError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
            Msg::Sync => file.sync_data().map_err(|source| WriteError::Io {
                path: path.display().to_string(),
                source,
            }),
            Msg::Rotate(next) => file
                .sync_all()
                .map_err(|source| WriteError::Io {
                    path: path.display().to_string(),
                    source,
                })
                .and_then(|_| outfile::create(&next, force, &[]).map_err(WriteError::from))
                .map(|f| {
                    file = f.keep();
                    path = next;
                }),
        };
        if let Err(e) = r {
            fail(e);
            broken = true;
        }
    }
    if !broken && let Err(source) = file.sync_all() {
        fail(WriteError::Io {
            path: path.display().to_string(),
            source,
        });
    }
}

/// A capture being written: the consumer's side ([`Inner`], shared with the
/// handover thread) and the thread that hands its chunk over every
/// [`HANDOVER`].
pub struct Writer {
    inner: Arc<Mutex<Inner>>,
    /// Sending (or dropping) it stops the handover thread.
    stop: Option<SyncSender<()>>,
    handover: Option<JoinHandle<()>>,
}

/// Hands the writer's chunk to the I/O thread every [`HANDOVER`] until
/// told to stop; an empty chunk costs nothing.
fn handover_thread(inner: Arc<Mutex<Inner>>, stop: Receiver<()>) {
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(HANDOVER) {
        let mut w = lock(&inner);
        if w.tx.is_none() {
            return;
        }
        w.send_chunk();
    }
}

/// The consumer's state; a panic elsewhere never poisons the capture.
fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Inner {
    opts: WriteOptions,
    header: Header,
    names: NetnsNames,
    buf: Vec<u8>,
    /// Bytes of the current file, buffered ones included.
    file_bytes: u64,
    events_in_file: u64,
    events_written: u64,
    tx: Option<SyncSender<Msg>>,
    free: Receiver<Vec<u8>>,
    io: Option<JoinHandle<()>>,
    failed: Failure,
}

impl Writer {
    /// Creates `opts.path` (and checks no rotated file of an older capture
    /// is in the way) and writes the header: [`prepare`] and
    /// [`Writer::start`] in one.
    pub fn create(opts: WriteOptions, header: Header) -> Result<Writer, WriteError> {
        Writer::start(prepare(opts, &[])?, header, &NetnsNames::new())
    }

    /// Writes the header (and `names`) to the prepared file at once, so
    /// that a tracer killed before its first interval still leaves a
    /// readable capture, then hands the file to the I/O thread.
    pub fn start(
        prepared: Prepared,
        mut header: Header,
        names: &NetnsNames,
    ) -> Result<Writer, WriteError> {
        let Prepared { opts, mut file } = prepared;
        header.seq = 0;
        let (tx, rx) = sync_channel(QUEUE);
        let (free_tx, free) = sync_channel(4);
        let mut w = Inner {
            opts,
            header,
            names: names.clone(),
            buf: Vec::with_capacity(CHUNK + 4096),
            file_bytes: 0,
            events_in_file: 0,
            events_written: 0,
            tx: None,
            free,
            io: None,
            failed: Arc::default(),
        };
        let header_bytes = w.start_file()?;
        // Every rotated file repeats the header: it must leave room for
        // events, or rotation would make a file per event.
        if let Some(max) = w.opts.max_size
            && header_bytes * 4 > max
        {
            // Dropping `file` removes it: nothing was recorded, and a
            // file left behind would block the retry.
            return Err(WriteError::HeaderTooLarge {
                max,
                header: header_bytes,
                namespaces: w.header.conntrack.len().max(w.header.kernel_start.len()),
            });
        }
        let io_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| WriteError::Io { path, source }
        };
        file.file()
            .write_all(&w.buf)
            .and_then(|()| file.file().sync_data())
            .map_err(io_err(&w.opts.path))?;
        w.buf.clear();
        let file = file.keep();
        let io = {
            let (path, force, failed) = (w.opts.path.clone(), w.opts.force, w.failed.clone());
            std::thread::Builder::new()
                .name("capture-io".into())
                .spawn(move || io_thread(file, path, force, rx, free_tx, failed))
                .map_err(io_err(&w.opts.path))?
        };
        w.tx = Some(tx);
        w.io = Some(io);
        let inner = Arc::new(Mutex::new(w));
        let (stop, stopped) = sync_channel(1);
        let handover = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("capture-handover".into())
                .spawn(move || handover_thread(inner, stopped))
        };
        let mut w = Writer {
            inner,
            stop: Some(stop),
            handover: None,
        };
        match handover {
            Ok(h) => w.handover = Some(h),
            Err(source) => {
                return Err(WriteError::Io {
                    path: lock(&w.inner).opts.path.display().to_string(),
                    source,
                });
            }
        }
        Ok(w)
    }

    /// Records the namespace names the live output uses from now on.
    pub fn names(&mut self, names: &NetnsNames) {
        lock(&self.inner).names(names);
    }

    pub fn event(&mut self, e: &Event) {
        lock(&self.inner).event(e);
    }

    /// Records an interval's exact per-source counts (COUNTS records of at
    /// most [`format::COUNTS_PER_RECORD`] entries; nothing when empty).
    pub fn counts(&mut self, c: &crate::model::IntervalCounts) {
        let mut w = lock(&self.inner);
        for chunk in c.sources.chunks(format::COUNTS_PER_RECORD) {
            w.push(|b| {
                format::frame(b, rtype::COUNTS, |o| {
                    format::encode_counts(o, chunk, c.ts_ns)
                })
            });
        }
        if w.buf.len() >= CHUNK {
            w.send_chunk();
        }
    }

    /// Makes everything so far durable (called once per live interval).
    pub fn flush(&mut self) {
        lock(&self.inner).flush();
    }

    pub fn events_written(&self) -> u64 {
        lock(&self.inner).events_written
    }

    /// Files written so far (the rotated set).
    pub fn files(&self) -> u32 {
        lock(&self.inner).header.seq + 1
    }

    /// The first I/O error, if the disk has failed us.
    pub fn failed(&self) -> Option<String> {
        lock(&self.inner).failed()
    }

    /// Writes the trailer, syncs and closes.
    pub fn finish(mut self, mut trailer: Trailer) -> Result<(), WriteError> {
        self.stop_handover();
        let mut w = lock(&self.inner);
        trailer.events_written = w.events_written;
        w.push(|b| format::frame_json(b, rtype::TRAILER, &trailer));
        w.close()
    }

    /// Stops the handover thread (the caller then owns the chunk alone).
    fn stop_handover(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.try_send(());
        }
        if let Some(h) = self.handover.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Writer {
    /// An error path that never reached `finish`: keep what was recorded
    /// (readers will say it was cut short, which is true).
    fn drop(&mut self) {
        self.stop_handover();
        let mut w = lock(&self.inner);
        if w.io.is_some() {
            let _ = w.close();
        }
    }
}

impl Inner {
    fn push(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let before = self.buf.len();
        f(&mut self.buf);
        self.file_bytes += (self.buf.len() - before) as u64;
    }

    /// Starts a file with the magic, the header and the current names;
    /// returns the bytes that takes. A header longer than a reader accepts
    /// ([`format::MAX_RECORD`]) is refused here, at write time.
    fn start_file(&mut self) -> Result<u64, WriteError> {
        let before = self.file_bytes;
        let header = self.header.clone();
        let mut rec = Vec::new();
        format::frame_json(&mut rec, rtype::HEADER, &header);
        let len = (rec.len() - format::FRAME_BYTES) as u64;
        if len > u64::from(format::MAX_RECORD) {
            return Err(WriteError::HeaderRecord(len));
        }
        self.push(|b| {
            b.extend_from_slice(&MAGIC);
            b.extend_from_slice(&rec);
        });
        if !self.names.is_empty() {
            let names = self.names.clone();
            self.push_names(&names);
        }
        Ok(self.file_bytes - before)
    }

    /// A NAMES record, of as many names as fit one record (a reader
    /// refuses longer ones; beyond ~100 000 namespaces the rest go
    /// unnamed rather than making the file unreadable).
    fn push_names(&mut self, names: &NetnsNames) {
        let mut keep = names.len();
        loop {
            let mut rec = Vec::new();
            if keep == names.len() {
                format::frame_json(&mut rec, rtype::NAMES, names);
            } else {
                let part: NetnsNames = names
                    .iter()
                    .take(keep)
                    .map(|(k, v)| (*k, v.clone()))
                    .collect();
                format::frame_json(&mut rec, rtype::NAMES, &part);
            }
            if rec.len() - format::FRAME_BYTES <= format::MAX_RECORD as usize || keep == 0 {
                self.push(|b| b.extend_from_slice(&rec));
                self.push(|b| format::frame_workloads(b, names));
                return;
            }
            keep /= 2;
        }
    }

    /// Hands the current chunk to the I/O thread.
    fn send_chunk(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let fresh = match self.free.try_recv() {
            Ok(b) => b,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                Vec::with_capacity(CHUNK + 4096)
            }
        };
        let full = std::mem::replace(&mut self.buf, fresh);
        self.send(Msg::Data(full));
    }

    fn send(&mut self, m: Msg) {
        if let Some(tx) = &self.tx
            && tx.send(m).is_err()
        {
            // The thread is gone; `finish` reports why.
            self.tx = None;
        }
    }

    fn names(&mut self, names: &NetnsNames) {
        if *names == self.names {
            return;
        }
        self.names = names.clone();
        self.push_names(names);
    }

    fn event(&mut self, e: &Event) {
        if let Some(max) = self.opts.max_size
            && self.events_in_file > 0
            && self.file_bytes + format::event_record_len(e) as u64 + RESERVE > max
        {
            self.rotate();
        }
        self.push(|b| format::frame(b, rtype::EVENT, |o| format::encode_event(o, e)));
        self.events_in_file += 1;
        self.events_written += 1;
        if self.buf.len() >= CHUNK {
            self.send_chunk();
        }
    }

    fn rotate(&mut self) {
        let next = Next {
            next_seq: self.header.seq + 1,
            events_written: self.events_written,
        };
        self.push(|b| format::frame_json(b, rtype::NEXT, &next));
        self.send_chunk();
        self.header.seq += 1;
        self.send(Msg::Rotate(rotated_path(&self.opts.path, self.header.seq)));
        self.file_bytes = 0;
        self.events_in_file = 0;
        // The header was accepted for the first file and only `seq` grew.
        let _ = self.start_file();
    }

    fn flush(&mut self) {
        self.send_chunk();
        self.send(Msg::Sync);
    }

    fn failed(&self) -> Option<String> {
        self.failed
            .lock()
            .ok()
            .and_then(|f| f.as_ref().map(|e| e.to_string()))
    }

    fn close(&mut self) -> Result<(), WriteError> {
        self.send_chunk();
        self.tx = None;
        if let Some(h) = self.io.take()
            && h.join().is_err()
        {
            return Err(WriteError::Thread("I/O thread panicked".into()));
        }
        match self.failed.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Inner {
    /// Dropped without a `close` (the handover thread's last reference on
    /// an error path): keep what was recorded.
    fn drop(&mut self) {
        if self.io.is_some() {
            let _ = self.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::capture::{
        format::tests::sample_event,
        read_set,
        tests::{TempDir, create},
    };

    /// Issue 24: events reach the file within [`HANDOVER`] with no `flush`
    /// (a live interval of 10 s, say) and no `finish` (SIGKILL): read back
    /// while the writer is still open, as a reader after a kill would.
    #[test]
    fn events_reach_the_file_without_a_flush() {
        let d = TempDir::new("handover");
        let p = d.0.join("c.ctt");
        let mut w = create(&p);
        let evs: Vec<Event> = (0..10).map(sample_event).collect();
        for e in &evs {
            w.event(e);
        }
        // Bounded wait for a fact, not a sleep: 100 times HANDOVER.
        let deadline = std::time::Instant::now() + HANDOVER * 100;
        let got = loop {
            let mut got = Vec::new();
            let info = read_set(std::slice::from_ref(&p), |e, _| got.push(e.clone())).unwrap();
            if got.len() == evs.len() || std::time::Instant::now() > deadline {
                assert!(info.trailer.is_none());
                break got;
            }
            std::thread::sleep(HANDOVER / 10);
        };
        assert_eq!(got, evs);
        drop(w);
    }
}
