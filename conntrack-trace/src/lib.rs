//! conntrack-trace: per-packet attribution of netfilter conntrack failures.
//!
//! Layout: [`backend`] observes the kernel and yields [`event::Event`]s plus
//! exact counters; [`filter`] and [`aggregate`] turn them into what the user
//! asked about (sources in a bounded [`sources`] table); [`amplify`] flags
//! clients re-sending dropped requests; [`output`] formats; [`trace`] runs a
//! live session; [`cli`] parses the command line.

pub mod agent;
pub mod aggregate;
pub mod amplify;
pub mod backend;
pub mod btf;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod docgen;
pub mod doctor;
pub mod error;
pub mod event;
pub mod export;
pub mod filter;
pub mod forecast;
pub mod kallsyms;
pub mod kstats;
pub mod live;
pub mod model;
pub mod netns;
pub mod outfile;
pub mod output;
pub mod pipeline;
pub mod report;
pub mod sources;
pub mod trace;
pub mod workload;
