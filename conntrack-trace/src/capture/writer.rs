//! Writes a capture while tracing.
//!
//! The ring consumer only encodes records into an in-memory chunk (a few
//! hundred nanoseconds per event); full chunks go to an I/O thread over a
//! bounded channel, so disk latency (and fdatasync) never stalls the ring
//! drain. Only a disk slower than the event rate for longer than the queue
//! (64 MiB) can push back, and then the kernel counts what the ring lost.
//!
//! Durability: chunks are handed over when full and at every live interval
//! (`flush`), which also fdatasyncs; SIGKILL loses at most the last interval,
//! and whatever reached the file reads back up to its last whole record.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, SyncSender, TryRecvError, sync_channel},
    },
    thread::JoinHandle,
};

use super::format::{self, Header, MAGIC, Next, Trailer, rtype};
use crate::{event::Event, output::NetnsNames};

/// Smallest accepted `--max-size`: a header, names and some events.
pub const MIN_MAX_SIZE: u64 = 64 << 10;
/// Room kept free in each file for the NEXT or TRAILER record.
const RESERVE: u64 = 16 << 10;
/// Chunk handed to the I/O thread.
const CHUNK: usize = 256 << 10;
/// Chunks in flight before the consumer waits (64 MiB).
const QUEUE: usize = 256;

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

/// Creates a capture file: mode 0600 (it holds addresses), refusing to
/// overwrite unless `force`.
pub fn create_private(path: &Path, force: bool) -> Result<File, WriteError> {
    let io = |source| WriteError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut o = OpenOptions::new();
    o.write(true).mode(0o600);
    if force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let f = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            WriteError::Exists(path.display().to_string())
        } else {
            io(e)
        }
    })?;
    // An overwritten file keeps its old mode: tighten it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    Ok(f)
}

/// Checks the options and that nothing would be overwritten without
/// `force` (the file, or a rotated `PATH.N` of an earlier capture).
pub fn precheck(opts: &WriteOptions) -> Result<(), WriteError> {
    if let Some(m) = opts.max_size
        && m < MIN_MAX_SIZE
    {
        return Err(WriteError::MaxSize(m));
    }
    if !opts.force {
        for p in [opts.path.clone(), rotated_path(&opts.path, 1)] {
            if p.symlink_metadata().is_ok() {
                return Err(WriteError::Exists(p.display().to_string()));
            }
        }
    }
    Ok(())
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
                .and_then(|_| create_private(&next, force))
                .map(|f| {
                    file = f;
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

pub struct Writer {
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
    /// is in the way) and writes the header.
    pub fn create(opts: WriteOptions, mut header: Header) -> Result<Writer, WriteError> {
        precheck(&opts)?;
        if opts.force {
            // A stale PATH.N from an earlier capture would be read as part
            // of this one.
            for seq in 1.. {
                let p = rotated_path(&opts.path, seq);
                if !p.exists() {
                    break;
                }
                std::fs::remove_file(&p).map_err(|source| WriteError::Io {
                    path: p.display().to_string(),
                    source,
                })?;
            }
        }
        let file = create_private(&opts.path, opts.force)?;
        header.seq = 0;
        let (tx, rx) = sync_channel(QUEUE);
        let (free_tx, free) = sync_channel(4);
        let failed: Failure = Arc::default();
        let io = {
            let (path, force, failed) = (opts.path.clone(), opts.force, failed.clone());
            std::thread::Builder::new()
                .name("capture-io".into())
                .spawn(move || io_thread(file, path, force, rx, free_tx, failed))
                .map_err(|source| WriteError::Io {
                    path: opts.path.display().to_string(),
                    source,
                })?
        };
        let mut w = Writer {
            opts,
            header,
            names: NetnsNames::new(),
            buf: Vec::with_capacity(CHUNK + 4096),
            file_bytes: 0,
            events_in_file: 0,
            events_written: 0,
            tx: Some(tx),
            free,
            io: Some(io),
            failed,
        };
        w.start_file();
        // Every rotated file repeats the header: it must leave room for
        // events, or rotation would make a file per event.
        if let Some(max) = w.opts.max_size
            && w.file_bytes * 4 > max
        {
            let e = WriteError::HeaderTooLarge {
                max,
                header: w.file_bytes,
                namespaces: w.header.conntrack.len().max(w.header.kernel_start.len()),
            };
            let path = w.opts.path.clone();
            drop(w);
            // Nothing was recorded: do not leave a file that blocks the retry.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(w)
    }

    fn push(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let before = self.buf.len();
        f(&mut self.buf);
        self.file_bytes += (self.buf.len() - before) as u64;
    }

    fn start_file(&mut self) {
        let header = self.header.clone();
        self.push(|b| {
            b.extend_from_slice(&MAGIC);
            format::frame_json(b, rtype::HEADER, &header);
        });
        if !self.names.is_empty() {
            let names = self.names.clone();
            self.push(|b| format::frame_json(b, rtype::NAMES, &names));
            self.push(|b| format::frame_workloads(b, &names));
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

    /// Records the namespace names the live output uses from now on.
    pub fn names(&mut self, names: &NetnsNames) {
        if *names == self.names {
            return;
        }
        self.names = names.clone();
        self.push(|b| format::frame_json(b, rtype::NAMES, names));
        self.push(|b| format::frame_workloads(b, names));
    }

    pub fn event(&mut self, e: &Event) {
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
        self.start_file();
    }

    /// Makes everything so far durable (called once per live interval).
    pub fn flush(&mut self) {
        self.send_chunk();
        self.send(Msg::Sync);
    }

    pub fn events_written(&self) -> u64 {
        self.events_written
    }

    /// Files written so far (the rotated set).
    pub fn files(&self) -> u32 {
        self.header.seq + 1
    }

    /// The first I/O error, if the disk has failed us.
    pub fn failed(&self) -> Option<String> {
        self.failed
            .lock()
            .ok()
            .and_then(|f| f.as_ref().map(|e| e.to_string()))
    }

    /// Writes the trailer, syncs and closes.
    pub fn finish(mut self, mut trailer: Trailer) -> Result<(), WriteError> {
        trailer.events_written = self.events_written;
        self.push(|b| format::frame_json(b, rtype::TRAILER, &trailer));
        self.close()
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

impl Drop for Writer {
    /// An error path that never reached `finish`: keep what was recorded
    /// (readers will say it was cut short, which is true).
    fn drop(&mut self) {
        if self.io.is_some() {
            let _ = self.close();
        }
    }
}
