//! What events and counts mean: selection, per-source aggregation over a
//! bounded table, retransmission amplification, the time-to-full forecast,
//! and the pipeline that runs them per event for every driver.

pub mod aggregate;
pub mod amplify;
pub mod filter;
pub mod forecast;
pub mod pipeline;
pub mod sources;
