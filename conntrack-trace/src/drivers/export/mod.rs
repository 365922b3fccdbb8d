//! `export`: a capture as the live ndjson stream, or as pcapng.

pub mod ndjson;
pub mod pcapng;

use std::{io::Write, path::Path};

use crate::{
    drivers::offline::ReportError,
    formats::outfile::{self, Created, Input},
    formats::output::pipe::Pipe,
};

/// Where an export goes: stdout (a reader who leaves ends it quietly), or
/// a file created by [`outfile::create`] and removed again unless the
/// export succeeds ([`Output::keep`]).
pub enum Output {
    Stdout(Pipe<std::io::StdoutLock<'static>>),
    File(Created),
}

impl Output {
    pub fn writer(&mut self) -> &mut dyn Write {
        match self {
            Output::Stdout(p) => p,
            Output::File(c) => c.file(),
        }
    }

    /// The export succeeded: a file stays.
    pub fn keep(self) {
        if let Output::File(c) = self {
            let _ = c.keep();
        }
    }
}

/// An export or SVG never replaces a capture, `--force` or not.
pub fn refuse_capture(p: &Path) -> Result<(), ReportError> {
    if crate::formats::capture::is_capture_file(p) {
        return Err(ReportError::Usage(format!(
            "{}: is a conntrack-trace capture; refusing to replace it (remove it first if that is really meant)",
            p.display()
        )));
    }
    Ok(())
}

/// Opens the export's output: a new file with mode 0600 (it holds
/// addresses; see [`outfile`] for what `force` may replace), never one of
/// `inputs`; or stdout for `-`/none.
pub fn open_output(
    path: Option<&Path>,
    force: bool,
    inputs: &[Input],
) -> Result<Output, ReportError> {
    match path {
        Some(p) if p.as_os_str() != "-" => {
            refuse_capture(p)?;
            Ok(Output::File(outfile::create(p, force, inputs)?))
        }
        _ => Ok(Output::Stdout(Pipe::new(std::io::stdout().lock()))),
    }
}
