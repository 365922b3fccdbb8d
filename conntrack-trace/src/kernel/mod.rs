//! The kernel side: backends that load and attach the eBPF programs, and
//! what they read of the running kernel (BTF, kallsyms, namespaces, the
//! kernel's conntrack statistics, the workloads behind a namespace).

pub mod backend;
pub mod btf;
pub mod error;
pub mod kallsyms;
pub mod kstats;
pub mod netns;
pub mod workload;
