//! Reads captures: one file record by record ([`FileReader`]), or a rotated
//! set as one stream ([`read_set`]).
//!
//! Damaged input never panics: every length is checked against
//! [`MAX_RECORD`] before use and buffers only grow by bytes actually read.
//! A torn or corrupt record ends the file ("cut short at offset N") and
//! everything before it is kept.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use super::format::{self, FRAME_BYTES, Header, MAGIC, MAX_RECORD, Record, Trailer};
use crate::{
    formats::outfile::{FileId, Input},
    kernel::workload::NetnsNames,
    model::event::Event,
};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a conntrack-trace capture (bad magic at offset 0)")]
    NotCapture { path: String },
    #[error("{path}: offset {offset}: {msg}")]
    Bad {
        path: String,
        offset: u64,
        msg: String,
    },
    #[error(
        "{path}: unsupported capture format version {version} (this build reads {} to {})",
        format::OLDEST_FORMAT_VERSION,
        format::FORMAT_VERSION
    )]
    Version { path: String, version: u32 },
    #[error("{a} and {b} belong to different captures")]
    Mixed { a: String, b: String },
    #[error("{a} and {b} are both file {seq} of the capture")]
    Duplicate { a: String, b: String, seq: u32 },
    #[error("no capture files given")]
    NoFiles,
    #[error("{path}: {what}, not a capture file (give the file itself)")]
    NotRegular { path: String, what: &'static str },
}

/// Where a damaged file stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutShort {
    pub offset: u64,
    pub reason: String,
}

impl std::fmt::Display for CutShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cut short at offset {}: {}", self.offset, self.reason)
    }
}

/// Reads records from one file.
pub struct FileReader<R: BufRead> {
    r: R,
    path: String,
    offset: u64,
    body: Vec<u8>,
    /// Set once the file ended (cleanly or not).
    end: Option<Option<CutShort>>,
}

/// Opens an input for reading: only a regular file (a FIFO would block
/// the reader, or be drained by one pass and empty for the next; a
/// directory or device is no capture). `O_NONBLOCK` keeps the open itself
/// from blocking on a FIFO without a writer; it means nothing for a
/// regular file.
pub fn open_input(path: &Path) -> Result<File, ReadError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let p = || path.display().to_string();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| ReadError::Io { path: p(), source })?;
    let t = f
        .metadata()
        .map_err(|source| ReadError::Io { path: p(), source })?
        .file_type();
    let what = if t.is_file() {
        return Ok(f);
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(ReadError::NotRegular { path: p(), what })
}

impl FileReader<BufReader<File>> {
    pub fn open(path: &Path) -> Result<Self, ReadError> {
        let f = open_input(path)?;
        FileReader::new(
            BufReader::with_capacity(1 << 20, f),
            path.display().to_string(),
        )
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: BufRead> FileReader<R> {
    /// Checks the magic.
    pub fn new(mut r: R, path: String) -> Result<Self, ReadError> {
        let mut m = [0; 8];
        let n = read_full(&mut r, &mut m).map_err(|source| ReadError::Io {
            path: path.clone(),
            source,
        })?;
        if n < m.len() || m != MAGIC {
            return Err(ReadError::NotCapture { path });
        }
        Ok(FileReader {
            r,
            path,
            offset: MAGIC.len() as u64,
            body: Vec::new(),
            end: None,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// How the file ended: `None` while records remain, `Some(None)` at a
    /// clean end of file, `Some(Some(cut))` where damage stopped reading.
    pub fn end(&self) -> Option<&Option<CutShort>> {
        self.end.as_ref()
    }

    fn stop<T>(&mut self, reason: String) -> Result<Option<T>, ReadError> {
        self.end = Some(Some(CutShort {
            offset: self.offset,
            reason,
        }));
        Ok(None)
    }

    /// The next record; `Ok(None)` at the end (see [`FileReader::end`]).
    /// Only I/O errors are `Err`: damage is an end, not an error.
    pub fn next_record(&mut self) -> Result<Option<Record>, ReadError> {
        self.next_body(format::decode_body)
    }

    /// Hands `on_event` every EVENT record up to the next other record,
    /// which it returns (`Ok(None)` at the end, as [`FileReader::next_record`]).
    /// The same records as `next_record`, without moving each event
    /// through `Record` and its `Option`/`Result` layers: in `report`
    /// those copies of a 180-byte event were a third of the time (issue 15).
    pub fn next_non_event(
        &mut self,
        mut on_event: impl FnMut(&Event),
    ) -> Result<Option<Record>, ReadError> {
        loop {
            let decoded = self.next_body(|body| match body.split_first() {
                Some((&format::rtype::EVENT, payload)) => {
                    let e = format::decode_event(payload).map_err(|e| e.to_string())?;
                    on_event(&e);
                    Ok(None)
                }
                _ => format::decode_body(body).map(Some),
            })?;
            match decoded {
                None => return Ok(None),
                Some(None) => {}
                Some(Some(rec)) => return Ok(Some(rec)),
            }
        }
    }

    /// Reads the next record's frame and body and decodes the body with
    /// `decode`; damage (a torn frame, a bad length or checksum, a body
    /// `decode` refuses) ends the file.
    fn next_body<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<Option<T>, ReadError> {
        if self.end.is_some() {
            return Ok(None);
        }
        let mut frame = [0u8; FRAME_BYTES];
        let n = read_full(&mut self.r, &mut frame).map_err(|e| io_error(&self.path, e))?;
        if n == 0 {
            self.end = Some(None);
            return Ok(None);
        }
        if n < FRAME_BYTES {
            return self.stop(format!("torn record frame ({n} of {FRAME_BYTES} bytes)"));
        }
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if len == 0 || len > MAX_RECORD {
            return self.stop(format!("corrupt record length {len}"));
        }
        let len = len as usize;
        // Most records lie whole in the reader's buffer: checked and
        // decoded in place, without a copy (issue 15: `report` spent a
        // fifth of its time copying records out).
        let buffered = self.r.fill_buf().map_err(|e| io_error(&self.path, e))?;
        let decoded = if buffered.len() >= len {
            let body = &buffered[..len];
            let r = (crc32fast::hash(body) == crc).then(|| decode(body));
            self.r.consume(len);
            r
        } else {
            self.body.clear();
            // take() bounds the read; the buffer grows only by bytes present.
            let got = (&mut self.r)
                .take(len as u64)
                .read_to_end(&mut self.body)
                .map_err(|e| io_error(&self.path, e))?;
            if got < len {
                return self.stop(format!("torn record ({got} of {len} bytes)"));
            }
            (crc32fast::hash(&self.body) == crc).then(|| decode(&self.body))
        };
        match decoded {
            None => self.stop("corrupt record (checksum mismatch)".into()),
            Some(Ok(rec)) => {
                self.offset += (FRAME_BYTES + len) as u64;
                Ok(Some(rec))
            }
            Some(Err(msg)) => self.stop(format!("corrupt record ({msg})")),
        }
    }
}

fn io_error(path: &str, source: std::io::Error) -> ReadError {
    ReadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One file of a set, as read.
#[derive(Clone, Debug, PartialEq)]
pub struct FileInfo {
    pub path: String,
    pub seq: u32,
    pub bytes: u64,
    pub events: u64,
    /// `trailer`, `rotated`, or `cut short at offset N: ...`.
    pub ended: String,
    pub cut_short: Option<CutShort>,
}

/// What reading a capture (set) found besides the events.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureInfo {
    /// Header of the first file of the set.
    pub header: Header,
    pub trailer: Option<Trailer>,
    pub files: Vec<FileInfo>,
    /// Event records read.
    pub events: u64,
    /// Problems that did not stop reading (missing files, damage).
    pub warnings: Vec<String>,
}

impl CaptureInfo {
    /// The capture ended cleanly with a trailer and nothing is missing.
    pub fn intact(&self) -> bool {
        self.trailer
            .as_ref()
            .is_some_and(|t| t.events_written == self.events)
            && self.warnings.is_empty()
    }
}

/// Reads the first record of `r`, which must be a header of our version.
fn read_header<R: BufRead>(r: &mut FileReader<R>) -> Result<Header, ReadError> {
    match r.next_record()? {
        Some(Record::Header(h)) => {
            if !(format::OLDEST_FORMAT_VERSION..=format::FORMAT_VERSION).contains(&h.format_version)
            {
                return Err(ReadError::Version {
                    path: r.path().to_owned(),
                    version: h.format_version,
                });
            }
            Ok(*h)
        }
        _ => Err(ReadError::Bad {
            path: r.path().to_owned(),
            offset: r.offset(),
            msg: match r.end() {
                Some(Some(cut)) => format!("no readable header ({})", cut.reason),
                _ => "the first record is not a header".into(),
            },
        }),
    }
}

/// One input of a set, open.
struct OpenFile {
    path: String,
    file: File,
    id: FileId,
    header: Header,
}

/// The files of one capture, each opened once and checked (regular file,
/// a header of this format, one recording, no file twice) before anything
/// is read or written: [`OpenSet::read`] then streams their events.
pub struct OpenSet {
    /// Sorted by sequence number.
    files: Vec<OpenFile>,
}

/// Lets a set of many rotated files be open at once (each input is opened
/// once and held): raises the soft descriptor limit to the hard one when
/// `n` files would not fit the soft one.
fn allow_open_files(n: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer; setrlimit with values read from the kernel.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0
            && (lim.rlim_cur as u128) < n as u128 + 64
            && lim.rlim_cur < lim.rlim_max
        {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Opens and checks the files of one capture (any order).
pub fn open_set(paths: &[PathBuf]) -> Result<OpenSet, ReadError> {
    if paths.is_empty() {
        return Err(ReadError::NoFiles);
    }
    allow_open_files(paths.len());
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        let path = p.display().to_string();
        let file = open_input(p)?;
        let id = FileId::of(&file.metadata().map_err(|source| ReadError::Io {
            path: path.clone(),
            source,
        })?);
        // A small buffer: only the header is read now (thousands of
        // rotated files need no thousands of megabyte buffers).
        let mut r = FileReader::new(BufReader::with_capacity(64 << 10, &file), path.clone())?;
        let header = read_header(&mut r)?;
        files.push(OpenFile {
            path,
            file,
            id,
            header,
        });
    }
    files.sort_by_key(|f| f.header.seq);
    for w in files.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.header.capture_id != b.header.capture_id {
            return Err(ReadError::Mixed {
                a: a.path.clone(),
                b: b.path.clone(),
            });
        }
        if a.header.seq == b.header.seq {
            return Err(ReadError::Duplicate {
                a: a.path.clone(),
                b: b.path.clone(),
                seq: a.header.seq,
            });
        }
    }
    Ok(OpenSet { files })
}

impl OpenSet {
    /// Header of the set's first file.
    pub fn header(&self) -> &Header {
        &self.files[0].header
    }

    /// The inputs, for outputs that must not overwrite one of them.
    pub fn inputs(&self) -> Vec<Input> {
        self.files
            .iter()
            .map(|f| Input {
                path: f.path.clone(),
                id: f.id,
            })
            .collect()
    }

    /// Reads the set as one stream: `f` gets every event with the
    /// namespace names the live output had at that point.
    pub fn read(self, f: impl FnMut(&Event, &NetnsNames)) -> Result<CaptureInfo, ReadError> {
        self.read_with_counts(f, |_, _| {})
    }

    /// [`OpenSet::read`], and `counts` gets every COUNTS record (format 4:
    /// the exact per-source counts of an interval under the event budget).
    pub fn read_with_counts(
        self,
        mut f: impl FnMut(&Event, &NetnsNames),
        mut counts: impl FnMut(&crate::model::IntervalCounts, &NetnsNames),
    ) -> Result<CaptureInfo, ReadError> {
        let files = self.files;
        let mut warnings = Vec::new();
        let first_seq = files[0].header.seq;
        if first_seq != 0 {
            warnings.push(format!(
                "files 0..{first_seq} of the capture are missing: events before {} are not included",
                files[0].path
            ));
        }
        let header = files[0].header.clone();
        let mut names = NetnsNames::new();
        let mut trailer = None;
        let mut infos = Vec::with_capacity(files.len());
        let mut total = 0u64;
        let n_files = files.len();
        let mut expect_seq = first_seq;
        for (i, of) in files.into_iter().enumerate() {
            let h = of.header;
            // The same open file, from its start (it is regular: seekable).
            let mut file = of.file;
            file.seek(SeekFrom::Start(0))
                .map_err(|source| ReadError::Io {
                    path: of.path.clone(),
                    source,
                })?;
            let mut r = FileReader::new(BufReader::with_capacity(1 << 20, file), of.path)?;
            read_header(&mut r)?;
            if h.seq != expect_seq {
                warnings.push(format!(
                    "files {expect_seq}..{} of the capture are missing (before {})",
                    h.seq,
                    r.path()
                ));
            }
            expect_seq = h.seq.saturating_add(1);
            let mut events = 0u64;
            let mut ended: Option<&'static str> = None;
            let mut cut: Option<CutShort> = None;
            loop {
                // Events stream through `f` until the file's end record;
                // after it, any record at all is damage.
                let next = if ended.is_none() {
                    r.next_non_event(|e| {
                        events += 1;
                        f(e, &names);
                    })?
                } else {
                    r.next_record()?
                };
                let Some(rec) = next else { break };
                if ended.is_some() {
                    cut = Some(CutShort {
                        offset: r.offset(),
                        reason: "records after the end of the file's capture".into(),
                    });
                    break;
                }
                match rec {
                    Record::Event(e) => {
                        events += 1;
                        f(&e, &names);
                    }
                    Record::Names(n) => names = n,
                    Record::Workloads(w) => names.set_workloads(w),
                    Record::Counts(c) => counts(&c, &names),
                    Record::Trailer(t) => {
                        trailer = Some(*t);
                        ended = Some("trailer");
                    }
                    Record::Next(_) => ended = Some("rotated"),
                    Record::Header(_) => {
                        cut = Some(CutShort {
                            offset: r.offset(),
                            reason: "a second header".into(),
                        });
                        break;
                    }
                }
            }
            if cut.is_none() {
                cut = r.end().cloned().flatten();
            }
            if cut.is_none() && ended.is_none() {
                cut = Some(CutShort {
                    offset: r.offset(),
                    reason: "no trailer (the tracer was killed or the disk filled)".into(),
                });
            }
            if ended == Some("rotated") && i + 1 == n_files {
                warnings.push(format!(
                    "{} was rotated: file {} of the capture is missing",
                    r.path(),
                    u64::from(h.seq) + 1
                ));
            }
            if let Some(c) = &cut {
                warnings.push(format!("{}: {c}", r.path()));
            }
            total = total.saturating_add(events);
            infos.push(FileInfo {
                path: r.path().to_owned(),
                seq: h.seq,
                bytes: r.offset(),
                events,
                ended: match (&cut, ended) {
                    (Some(c), _) => c.to_string(),
                    (None, Some(e)) => e.to_owned(),
                    (None, None) => "end of file".to_owned(),
                },
                cut_short: cut,
            });
        }
        if let Some(t) = &trailer
            && t.events_written != total
            && first_seq == 0
        {
            warnings.push(format!(
                "the trailer counts {} events written, the files hold {total}",
                t.events_written
            ));
        }
        Ok(CaptureInfo {
            header,
            trailer,
            files: infos,
            events: total,
            warnings,
        })
    }
}

/// Reads the files of one capture (any order; sorted by their sequence
/// number) as one stream: [`open_set`] then [`OpenSet::read`].
pub fn read_set(
    paths: &[PathBuf],
    f: impl FnMut(&Event, &NetnsNames),
) -> Result<CaptureInfo, ReadError> {
    open_set(paths)?.read(f)
}

/// Reads a whole file from memory, record by record (the fuzz target).
/// Returns the number of records and how the file ended.
pub fn read_bytes(data: &[u8]) -> Result<(usize, Option<CutShort>), ReadError> {
    let mut r = FileReader::new(data, "<memory>".into())?;
    let mut n = 0;
    while r.next_record()?.is_some() {
        n += 1;
    }
    Ok((n, r.end().cloned().flatten()))
}

/// The `read_capture` fuzz target's entry, here so that regression tests
/// replay an input exactly as the fuzzer ran it. The first byte selects a
/// mode: odd means "rewrite every walkable record's CRC first", so that
/// mutations also reach the decoders and the record sequencing behind the
/// checksum (a real CRC stops nearly all of them).
pub fn read_fuzz_input(data: &[u8]) -> Option<Result<(usize, Option<CutShort>), ReadError>> {
    Some(read_bytes(&fuzz_file(data)?))
}

/// The capture file a fuzz input stands for (see [`read_fuzz_input`]).
pub fn fuzz_file(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    let mut v = rest.to_vec();
    if mode & 1 == 0 {
        return Some(v);
    }
    let mut off = MAGIC.len();
    while off + FRAME_BYTES <= v.len() {
        let len = u32::from_le_bytes([v[off], v[off + 1], v[off + 2], v[off + 3]]) as usize;
        let Some(end) = (off + FRAME_BYTES)
            .checked_add(len)
            .filter(|e| *e <= v.len())
        else {
            break;
        };
        let crc = crc32fast::hash(&v[off + FRAME_BYTES..end]);
        v[off + 4..off + 8].copy_from_slice(&crc.to_le_bytes());
        off = end;
    }
    Some(v)
}
