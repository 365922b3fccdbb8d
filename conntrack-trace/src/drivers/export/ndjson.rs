//! Export as the live `--format ndjson` stream: the same event lines (same
//! code, [`crate::formats::output::ndjson::Ndjson`]) and the recomputed summary last.

use std::io::Write;

use crate::{
    drivers::offline::OfflineSpec,
    drivers::offline::ReportError,
    drivers::report::{self, Report},
    formats::capture::OpenSet,
    formats::output::{Sink, ndjson::Ndjson},
};

pub fn export(
    set: OpenSet,
    filter: &OfflineSpec,
    top: usize,
    out: impl Write,
) -> Result<Report, ReportError> {
    let mut sink = Ndjson::new(std::io::BufWriter::with_capacity(1 << 16, out));
    let mut err: Option<std::io::Error> = None;
    let r = report::build_set(set, filter, top, |e, names, matched| {
        if matched
            && err.is_none()
            && let Err(e) = sink.event(e, names)
        {
            err = Some(e);
        }
    })?;
    let io = |source| ReportError::Io {
        context: "writing ndjson".into(),
        source,
    };
    if let Some(e) = err {
        return Err(io(e));
    }
    sink.finish(&r.summary).map_err(io)?;
    Ok(r)
}
