//! The drivers of the one pipeline: live sessions (`trace`, `agent`,
//! `doctor`) over [`live`], and captures read back (`report`, `export`,
//! `doctor --file`).

pub mod agent;
pub mod doctor;
pub mod export;
pub mod live;
pub mod offline;
pub mod report;
pub mod trace;
