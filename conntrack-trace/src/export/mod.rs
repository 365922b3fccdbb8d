//! `export`: a capture as the live ndjson stream, or as pcapng.

pub mod ndjson;
pub mod pcapng;

use std::{io::Write, path::Path};

use crate::{capture::writer::create_private, report::ReportError};

/// Opens the export's output: a new file with mode 0600 (it holds
/// addresses; never overwritten without --force), or stdout for `-`/none.
pub fn open_output(path: Option<&Path>, force: bool) -> Result<Box<dyn Write>, ReportError> {
    match path {
        None => Ok(Box::new(std::io::stdout().lock())),
        Some(p) if p.as_os_str() == "-" => Ok(Box::new(std::io::stdout().lock())),
        Some(p) => {
            let f = create_private(p, force).map_err(|e| ReportError::Usage(e.to_string()))?;
            Ok(Box::new(f))
        }
    }
}
