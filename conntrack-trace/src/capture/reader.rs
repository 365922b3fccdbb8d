//! Reads captures: one file record by record ([`FileReader`]), or a rotated
//! set as one stream ([`read_set`]).
//!
//! Damaged input never panics: every length is checked against
//! [`MAX_RECORD`] before use and buffers only grow by bytes actually read.
//! A torn or corrupt record ends the file ("cut short at offset N") and
//! everything before it is kept.

use std::{
    fs::File,
    io::{BufReader, Read},
    path::{Path, PathBuf},
};

use super::format::{self, FRAME_BYTES, Header, MAGIC, MAX_RECORD, Record, Trailer};
use crate::{event::Event, output::NetnsNames};

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
        "{path}: unsupported capture format version {version} (this build reads {})",
        format::FORMAT_VERSION
    )]
    Version { path: String, version: u32 },
    #[error("{a} and {b} belong to different captures")]
    Mixed { a: String, b: String },
    #[error("{a} and {b} are both file {seq} of the capture")]
    Duplicate { a: String, b: String, seq: u32 },
    #[error("no capture files given")]
    NoFiles,
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
pub struct FileReader<R: Read> {
    r: R,
    path: String,
    offset: u64,
    body: Vec<u8>,
    /// Set once the file ended (cleanly or not).
    end: Option<Option<CutShort>>,
}

impl FileReader<BufReader<File>> {
    pub fn open(path: &Path) -> Result<Self, ReadError> {
        let f = File::open(path).map_err(|source| ReadError::Io {
            path: path.display().to_string(),
            source,
        })?;
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

impl<R: Read> FileReader<R> {
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

    fn stop(&mut self, reason: String) -> Result<Option<Record>, ReadError> {
        self.end = Some(Some(CutShort {
            offset: self.offset,
            reason,
        }));
        Ok(None)
    }

    /// The next record; `Ok(None)` at the end (see [`FileReader::end`]).
    /// Only I/O errors are `Err`: damage is an end, not an error.
    pub fn next_record(&mut self) -> Result<Option<Record>, ReadError> {
        if self.end.is_some() {
            return Ok(None);
        }
        let io = |path: &str| {
            let path = path.to_owned();
            move |source| ReadError::Io { path, source }
        };
        let mut frame = [0u8; FRAME_BYTES];
        let n = read_full(&mut self.r, &mut frame).map_err(io(&self.path))?;
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
        self.body.clear();
        // take() bounds the read; the buffer grows only by bytes present.
        let got = (&mut self.r)
            .take(len as u64)
            .read_to_end(&mut self.body)
            .map_err(io(&self.path))?;
        if got < len as usize {
            return self.stop(format!("torn record ({got} of {len} bytes)"));
        }
        if crc32fast::hash(&self.body) != crc {
            return self.stop("corrupt record (checksum mismatch)".into());
        }
        match format::decode_body(&self.body) {
            Ok(rec) => {
                self.offset += (FRAME_BYTES + got) as u64;
                Ok(Some(rec))
            }
            Err(msg) => self.stop(format!("corrupt record ({msg})")),
        }
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

fn open_with_header(path: &Path) -> Result<(FileReader<BufReader<File>>, Header), ReadError> {
    let mut r = FileReader::open(path)?;
    match r.next_record()? {
        Some(Record::Header(h)) => {
            if h.format_version != format::FORMAT_VERSION {
                return Err(ReadError::Version {
                    path: r.path().to_owned(),
                    version: h.format_version,
                });
            }
            Ok((r, *h))
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

/// Reads the files of one capture (any order; sorted by their sequence
/// number) as one stream: `f` gets every event with the namespace names
/// the live output had at that point.
pub fn read_set(
    paths: &[PathBuf],
    mut f: impl FnMut(&Event, &NetnsNames),
) -> Result<CaptureInfo, ReadError> {
    if paths.is_empty() {
        return Err(ReadError::NoFiles);
    }
    // First pass: headers only (one file open at a time, so a set of
    // thousands of rotated files needs neither thousands of descriptors
    // nor thousands of read buffers).
    let mut files = Vec::with_capacity(paths.len());
    for p in paths {
        let (r, h) = open_with_header(p)?;
        files.push((p.as_path(), r.path().to_owned(), h));
    }
    files.sort_by_key(|(_, _, h)| h.seq);
    for w in files.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if a.2.capture_id != b.2.capture_id {
            return Err(ReadError::Mixed {
                a: a.1.clone(),
                b: b.1.clone(),
            });
        }
        if a.2.seq == b.2.seq {
            return Err(ReadError::Duplicate {
                a: a.1.clone(),
                b: b.1.clone(),
                seq: a.2.seq,
            });
        }
    }
    let mut warnings = Vec::new();
    let first_seq = files[0].2.seq;
    if first_seq != 0 {
        warnings.push(format!(
            "files 0..{first_seq} of the capture are missing: events before {} are not included",
            files[0].1
        ));
    }
    let header = files[0].2.clone();
    let mut names = NetnsNames::new();
    let mut trailer = None;
    let mut infos = Vec::with_capacity(files.len());
    let mut total = 0u64;
    let n_files = files.len();
    let mut expect_seq = first_seq;
    for (i, (path, _, h)) in files.into_iter().enumerate() {
        // Second pass: reopen and skip the header read above.
        let (mut r, _) = open_with_header(path)?;
        if h.seq != expect_seq {
            warnings.push(format!(
                "files {expect_seq}..{} of the capture are missing (before {})",
                h.seq,
                r.path()
            ));
        }
        expect_seq = h.seq + 1;
        let mut events = 0u64;
        let mut ended: Option<&'static str> = None;
        let mut cut: Option<CutShort> = None;
        while let Some(rec) = r.next_record()? {
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
                h.seq + 1
            ));
        }
        if let Some(c) = &cut {
            warnings.push(format!("{}: {c}", r.path()));
        }
        total += events;
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
