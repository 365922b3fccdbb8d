//! The one place where a reader who left is handled (issue 11 item 6).
//!
//! `conntrack-trace ... | head` closes our stdout early; a log collector
//! that dies closes our stderr. Neither is an error of the run: output ends
//! quietly (exit 0, as for any other finished run) and diagnostics that
//! cannot be delivered are dropped. Rust ignores SIGPIPE, so a closed pipe
//! shows up as EPIPE from write(2), handled here and nowhere else;
//! `println!`/`eprintln!` (which panic on it) are not used on runtime paths.

use std::io::{self, Write};

use super::Sink;
use crate::kernel::error::TraceError;

/// The reader of this stream went away.
pub fn is_closed(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

/// Passes `r` on, except that EPIPE sets `closed` and counts as done.
pub fn quiet(r: io::Result<()>, closed: &mut bool) -> io::Result<()> {
    match r {
        Err(e) if is_closed(&e) => {
            *closed = true;
            Ok(())
        }
        r => r,
    }
}

/// A writer whose reader may leave: after EPIPE, [`Pipe::closed`] is true
/// and everything written is discarded (so a long export stops producing
/// errors, and the caller can stop early).
pub struct Pipe<W: Write> {
    inner: W,
    closed: bool,
}

impl<W: Write> Pipe<W> {
    pub fn new(inner: W) -> Self {
        Pipe {
            inner,
            closed: false,
        }
    }

    pub fn closed(&self) -> bool {
        self.closed
    }
}

impl<W: Write> Write for Pipe<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Ok(buf.len());
        }
        match self.inner.write(buf) {
            Err(e) if is_closed(&e) => {
                self.closed = true;
                Ok(buf.len())
            }
            r => r,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Ok(());
        }
        let r = self.inner.flush();
        quiet(r, &mut self.closed)
    }
}

/// Writes one diagnostic line to stderr; a closed (or failing) stderr is
/// ignored — there is nowhere else to say it.
pub fn diag(line: impl std::fmt::Display) {
    let _ = writeln!(io::stderr(), "{line}");
}

/// The sink, minus a reader who left: EPIPE ends output quietly (the one
/// place a live session's output handles it).
pub struct Out<'s> {
    sink: &'s mut dyn Sink,
    pub closed: bool,
}

impl<'s> Out<'s> {
    pub fn new(sink: &'s mut dyn Sink) -> Out<'s> {
        Out {
            sink,
            closed: false,
        }
    }
}

impl Out<'_> {
    /// See [`Sink::shows_top`].
    pub fn shows_top(&self) -> bool {
        self.sink.shows_top()
    }

    pub fn send(
        &mut self,
        w: impl FnOnce(&mut dyn Sink) -> std::io::Result<()>,
    ) -> Result<(), TraceError> {
        if self.closed {
            return Ok(());
        }
        quiet(w(&mut *self.sink), &mut self.closed).map_err(TraceError::io("writing output"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Gone;
    impl Write for Gone {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    struct Full;
    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_pipe_is_quiet_other_errors_are_not() {
        let mut p = Pipe::new(Gone);
        assert!(p.write_all(b"x").is_ok());
        assert!(p.closed());
        assert!(p.write_all(b"more").and_then(|()| p.flush()).is_ok());
        let mut f = Pipe::new(Full);
        assert!(f.write_all(b"x").is_err());
        assert!(!f.closed());
        let mut closed = false;
        assert!(quiet(Err(io::ErrorKind::BrokenPipe.into()), &mut closed).is_ok());
        assert!(closed);
        let mut closed = false;
        assert!(quiet(Err(io::ErrorKind::Other.into()), &mut closed).is_err());
        assert!(!closed);
    }
}
