//! conntrack-trace: per-packet attribution of netfilter conntrack failures.
//!
//! The folders are the layers, bottom to top; a module imports only from
//! its own folder or the ones listed before it:
//!
//! 1. [`model`] — the values every layer shares: the decoded
//!    [`model::event::Event`], counts per kind, the session's facts, the
//!    summary and its parts, the kernel's conntrack counters, the clock.
//! 2. [`kernel`] — what observes the kernel: the [`kernel::backend`]s that
//!    load and attach the eBPF programs and yield events plus exact
//!    counters, BTF ([`kernel::btf`]), kallsyms, network namespaces
//!    ([`kernel::netns`]), the kernel's own statistics
//!    ([`kernel::kstats`]), the containers and pods behind a namespace
//!    ([`kernel::workload`]) and the errors that end a run
//!    ([`kernel::error`]).
//! 3. [`analysis`] — what events and counts mean: selection
//!    ([`analysis::filter`]), the per-source aggregate over a bounded
//!    [`analysis::sources`] table, retransmission amplification
//!    ([`analysis::amplify`]), the time-to-full [`analysis::forecast`];
//!    [`analysis::pipeline`] runs them per event for every driver.
//! 4. [`formats`] — how results are written and read: the capture file
//!    ([`formats::capture`]), the live outputs behind one `Sink`
//!    ([`formats::output`]: human, ndjson and its wire schema) and safe
//!    output files ([`formats::outfile`]).
//! 5. [`drivers`] — one pipeline, several drivers: the live session core
//!    ([`drivers::live`]) that `trace`, `agent` and `doctor` drive, the
//!    offline path ([`drivers::offline`]) that `report`, `export` and
//!    `doctor --file` read captures through.
//! 6. [`cli`] — the command line; flags stop here and become the drivers'
//!    plain options. [`docgen`] writes its man pages and shell completions.

pub mod analysis;
pub mod cli;
pub mod docgen;
pub mod drivers;
pub mod formats;
pub mod kernel;
pub mod model;
