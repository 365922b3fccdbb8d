//! How results are written and read: the capture file, the live outputs
//! (human and ndjson behind one `Sink`), and output files created safely.

pub mod capture;
pub mod outfile;
pub mod output;
pub mod summary;
pub mod text;
