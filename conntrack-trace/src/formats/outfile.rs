//! Every file the tool creates is created here (issue 11).
//!
//! conntrack-trace runs as root, often with its outputs in world-writable
//! directories, so a path given for an output is never followed and never
//! truncated in place:
//!
//! - files are created with `O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC`, mode
//!   0600 (they hold addresses), so a planted symlink (dangling or not)
//!   makes the open fail instead of redirecting it;
//! - `--force` replaces only a *regular* file: it is unlinked and the new
//!   file created exclusively in its place. Symlinks, directories, devices,
//!   FIFOs and sockets are refused with a line naming the path, force or not;
//! - an output that is the same file (device + inode) as an input is refused;
//! - a file this run created is removed again if the run fails before the
//!   file holds a result ([`Created`]), so a failure leaves nothing that
//!   blocks the retry;
//! - the ready file is written under a temporary name in its directory and
//!   renamed into place, so it appears whole, and removed at exit
//!   ([`ReadyFile`]).

use std::{
    fs::{File, Metadata, OpenOptions},
    io::Write,
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// Device and inode: what makes two paths the same file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(m: &Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// An input, as far as outputs are concerned: its path (for the message)
/// and identity.
#[derive(Clone, Debug)]
pub struct Input {
    pub path: String,
    pub id: FileId,
}

#[derive(Debug, thiserror::Error)]
pub enum OutError {
    #[error("{0}: file exists (use --force to overwrite)")]
    Exists(String),
    #[error("{path}: {what}; refusing to write there (only a regular file is replaced)")]
    NotRegular { path: String, what: &'static str },
    #[error("{path} is the same file as {other}; refusing to overwrite it")]
    Same { path: String, other: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl OutError {
    /// Refused because of what the command line named (exit 2), as opposed
    /// to the system failing to create it (exit 1).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, OutError::Io { .. })
    }
}

/// What a non-regular file is, for the refusal.
fn kind_of(m: &Metadata) -> Option<&'static str> {
    let t = m.file_type();
    if t.is_file() {
        None
    } else if t.is_symlink() {
        Some("is a symbolic link")
    } else if t.is_dir() {
        Some("is a directory")
    } else if t.is_char_device() || t.is_block_device() {
        Some("is a device")
    } else if t.is_fifo() {
        Some("is a FIFO")
    } else if t.is_socket() {
        Some("is a socket")
    } else {
        Some("is not a regular file")
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutError + '_ {
    move |source| OutError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// `lstat(path)`: `None` when nothing is there.
fn lstat(path: &Path) -> Result<Option<Metadata>, OutError> {
    match path.symlink_metadata() {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// What is at `path` may be replaced by a new output: nothing, or (with
/// `force`) a regular file that is none of `inputs`.
fn replaceable(path: &Path, m: &Metadata, force: bool, inputs: &[Input]) -> Result<(), OutError> {
    let p = || path.display().to_string();
    if let Some(what) = kind_of(m) {
        return Err(OutError::NotRegular { path: p(), what });
    }
    if let Some(i) = inputs.iter().find(|i| i.id == FileId::of(m)) {
        return Err(OutError::Same {
            path: p(),
            other: i.path.clone(),
        });
    }
    if !force {
        return Err(OutError::Exists(p()));
    }
    Ok(())
}

/// Checks, without creating anything, that [`create`] would be allowed to
/// create `path` (used where the output is created later).
pub fn check(path: &Path, force: bool, inputs: &[Input]) -> Result<(), OutError> {
    match lstat(path)? {
        None => Ok(()),
        Some(m) => replaceable(path, &m, force, inputs),
    }
}

fn open_exclusive(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true) // O_CREAT | O_EXCL: never follows a symlink
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// A file this run created. Dropped without [`Created::keep`], it is
/// removed again (if the path still names it), so a run that fails leaves
/// no empty or half-written output behind.
#[derive(Debug)]
pub struct Created {
    file: Option<File>,
    path: PathBuf,
    id: FileId,
}

impl Created {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> FileId {
        self.id
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("present until kept")
    }

    /// The file is a result now: it stays, whatever happens next.
    pub fn keep(mut self) -> File {
        self.file.take().expect("present until kept")
    }
}

impl Drop for Created {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            remove_if_ours(&self.path, self.id);
        }
    }
}

/// Removes `path` if it still is the file `id` (not whatever someone put
/// there since).
fn remove_if_ours(path: &Path, id: FileId) {
    if let Ok(Some(m)) = lstat(path)
        && FileId::of(&m) == id
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Creates the output `path` exclusively, mode 0600. With `force`, a
/// regular file already there is unlinked first; anything else there
/// (symlink, device, FIFO, directory, socket) or one of `inputs` is refused.
pub fn create(path: &Path, force: bool, inputs: &[Input]) -> Result<Created, OutError> {
    // Twice at most: once more after unlinking what --force replaces. If
    // something reappears in between, that is a race we do not win by
    // looping; it is reported.
    for attempt in 0..2 {
        match open_exclusive(path) {
            Ok(file) => {
                let id = FileId::of(&file.metadata().map_err(io(path))?);
                return Ok(Created {
                    file: Some(file),
                    path: path.to_owned(),
                    id,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let Some(m) = lstat(path)? else { continue };
                replaceable(path, &m, force, inputs)?;
                if attempt > 0 {
                    return Err(io(path)(e));
                }
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(path)(e)),
                }
            }
            Err(e) => return Err(io(path)(e)),
        }
    }
    Err(io(path)(std::io::ErrorKind::AlreadyExists.into()))
}

/// Removes a stale regular file at `path` (an earlier capture's rotated
/// `FILE.N`, a stale ready file); returns whether one was there. Anything
/// but a regular file is refused, and left alone.
pub fn remove_stale(path: &Path, protect: &[Input]) -> Result<bool, OutError> {
    let Some(m) = lstat(path)? else {
        return Ok(false);
    };
    replaceable(path, &m, true, protect)?;
    std::fs::remove_file(path).map_err(io(path))?;
    Ok(true)
}

/// `--ready-file`: written to a temporary name in the same directory when
/// the run starts (so a path we cannot write fails before anything is
/// loaded), renamed into place by [`ReadyFile::publish`] once everything is
/// attached — rename(2) replaces the name atomically and never follows a
/// symlink — and removed when dropped, so a ready file never outlives the
/// state it announces. (After SIGKILL it stays: nothing runs then.)
pub struct ReadyFile {
    path: PathBuf,
    tmp: Option<Created>,
    published: Option<FileId>,
}

impl ReadyFile {
    /// Prepares `path`: a stale regular file there is removed now (it would
    /// tell a script "ready" before anything is attached); anything else
    /// there, or a file in `protect` (the capture), is refused.
    pub fn prepare(path: &Path, protect: &[Input]) -> Result<ReadyFile, OutError> {
        remove_stale(path, protect)?;
        let name = path.file_name().ok_or_else(|| OutError::NotRegular {
            path: path.display().to_string(),
            what: "has no file name",
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp_path = path.with_file_name(tmp_name);
        // Our own name (pid included): a leftover of a killed run with the
        // same pid may be replaced.
        let mut tmp = create(&tmp_path, true, protect)?;
        tmp.file().write_all(b"ready\n").map_err(io(&tmp_path))?;
        Ok(ReadyFile {
            path: path.to_owned(),
            tmp: Some(tmp),
            published: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the prepared file into place.
    pub fn publish(&mut self) -> Result<(), OutError> {
        let Some(tmp) = self.tmp.take() else {
            return Ok(());
        };
        std::fs::rename(tmp.path(), &self.path).map_err(io(&self.path))?;
        self.published = Some(tmp.id());
        // The name moved: nothing left to remove under the temporary one.
        let _ = tmp.keep();
        Ok(())
    }

    /// Removes the ready file (the state it announced is over).
    pub fn withdraw(&mut self) {
        self.tmp = None;
        if let Some(id) = self.published.take() {
            remove_if_ours(&self.path, id);
        }
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        self.withdraw();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;
    use crate::formats::capture::tests::TempDir;

    fn input(p: &Path) -> Input {
        Input {
            path: p.display().to_string(),
            id: FileId::of(&std::fs::metadata(p).unwrap()),
        }
    }

    #[test]
    fn creates_private_and_exclusive() {
        let d = TempDir::new("out-new");
        let p = d.0.join("o");
        let c = create(&p, false, &[]).unwrap();
        let _ = c.keep();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let e = create(&p, false, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: file exists (use --force to overwrite)", p.display())
        );
        assert!(e.is_refusal());
    }

    #[test]
    fn force_replaces_only_a_regular_file() {
        let d = TempDir::new("out-force");
        let p = d.0.join("o");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut c = create(&p, true, &[]).unwrap();
        c.file().write_all(b"new").unwrap();
        let _ = c.keep();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a new file, not the old one's mode");
    }

    /// Issue 11 item 1: `--force` through a planted symlink truncated and
    /// chmod-ed its target (/dev/null for the whole machine).
    #[test]
    fn symlinks_are_never_followed() {
        let d = TempDir::new("out-link");
        let target = d.0.join("victim");
        std::fs::write(&target, "precious").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = d.0.join("link");
        symlink(&target, &link).unwrap();
        let dangling = d.0.join("dangling");
        symlink(d.0.join("nothing-here"), &dangling).unwrap();
        for force in [false, true] {
            for l in [&link, &dangling] {
                let e = create(l, force, &[]).unwrap_err();
                assert_eq!(
                    e.to_string(),
                    format!(
                        "{}: is a symbolic link; refusing to write there (only a regular file is replaced)",
                        l.display()
                    )
                );
                assert!(e.is_refusal());
            }
        }
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        assert_eq!(std::fs::read_link(&link).unwrap(), target);
        assert!(
            !d.0.join("nothing-here").exists(),
            "dangling target not created"
        );
    }

    #[test]
    fn fifos_and_directories_are_refused() {
        let d = TempDir::new("out-fifo");
        let fifo = d.0.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = create(&fifo, true, &[]).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        assert!(
            std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo()
        );
        let e = create(&d.0, true, &[]).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        // A character device: only looked at, never opened for writing.
        let e = check(Path::new("/dev/null"), true, &[]).unwrap_err();
        assert!(e.to_string().contains("/dev/null: is a device"), "{e}");
    }

    #[test]
    fn an_input_is_never_an_output() {
        let d = TempDir::new("out-same");
        let a = d.0.join("a.ctt");
        std::fs::write(&a, "capture").unwrap();
        let hard = d.0.join("hard");
        std::fs::hard_link(&a, &hard).unwrap();
        for p in [&a, &hard] {
            let e = create(p, true, &[input(&a)]).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "{} is the same file as {}; refusing to overwrite it",
                    p.display(),
                    a.display()
                )
            );
        }
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "capture");
    }

    #[test]
    fn a_failed_run_removes_what_it_created() {
        let d = TempDir::new("out-drop");
        let p = d.0.join("o");
        drop(create(&p, false, &[]).unwrap());
        assert!(!p.exists());
        // Someone else's file at the path by then is left alone.
        let c = create(&p, false, &[]).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, "theirs").unwrap();
        drop(c);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "theirs");
    }

    #[test]
    fn missing_directory_is_an_io_error() {
        let e = create(Path::new("/nonexistent-ctt-dir/o"), false, &[]).unwrap_err();
        assert!(!e.is_refusal());
        assert!(e.to_string().starts_with("/nonexistent-ctt-dir/o: "), "{e}");
    }

    /// Issue 11 item 2: the ready file truncated a symlink's target and
    /// outlived the run.
    #[test]
    fn ready_file_is_atomic_and_removed() {
        let d = TempDir::new("ready");
        let p = d.0.join("ready");
        std::fs::write(&p, "stale").unwrap();
        let mut r = ReadyFile::prepare(&p, &[]).unwrap();
        assert!(!p.exists(), "a stale ready file is removed at start");
        let names = || -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&d.0)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names().len(), 1, "only the temporary file: {:?}", names());
        r.publish().unwrap();
        assert_eq!(names(), vec!["ready".to_owned()]);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "ready\n");
        drop(r);
        assert!(names().is_empty(), "{:?}", names());

        // A symlink at the path is refused and its target untouched.
        let target = d.0.join("victim");
        std::fs::write(&target, "precious").unwrap();
        symlink(&target, &p).unwrap();
        let e = ReadyFile::prepare(&p, &[]).err().unwrap();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(std::fs::read_link(&p).unwrap(), target);
        // The capture file is not a stale ready file.
        let e = ReadyFile::prepare(&target, &[input(&target)])
            .err()
            .unwrap();
        assert!(e.to_string().contains("same file"), "{e}");
        assert!(target.exists());
    }
}
