use std::io::{IsTerminal, Write};

use clap::Parser;
use conntrack_trace::{
    aggregate::DEFAULT_MAX_SOURCES,
    backend::{self, DEFAULT_RING_BYTES},
    btf::VMLINUX_BTF,
    cli::{Cli, Command, Format, OnOff, TraceArgs},
    error::{TraceError, exit},
    filter::Filter,
    output::{Sink, human::Human, ndjson::Ndjson},
    trace::{TraceOptions, run},
};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors
            // to stderr (exit 2).
            let _ = e.print();
            std::process::exit(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let code = match cli.command {
        Command::Trace(args) => trace(args),
    };
    std::process::exit(code);
}

fn trace(args: TraceArgs) -> i32 {
    let stdout = std::io::stdout();
    let is_tty = stdout.is_terminal();
    let format = args.format.unwrap_or(if is_tty {
        Format::Human
    } else {
        Format::Ndjson
    });
    let out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut sink: Box<dyn Sink> = match format {
        Format::Human => Box::new(Human::new(out, is_tty)),
        Format::Ndjson => Box::new(Ndjson::new(out)),
    };
    let opts = TraceOptions {
        duration: args.duration,
        interval: args.interval,
        top: args.top,
        netns: args.netns,
        filter: Filter {
            netns: None,
            proto: args.proto,
            port: args.port,
            src: args.src,
        },
        ready_file: args.ready_file,
        choice: args.backend.into(),
        backend: backend::Options {
            btf_explicit: args.btf.is_some(),
            btf_path: args.btf.unwrap_or_else(|| VMLINUX_BTF.into()),
            evictions: args.evictions == OnOff::On,
            rule_drops: args.rule_drops,
            ring_bytes: args.ring_size.unwrap_or(DEFAULT_RING_BYTES),
        },
        max_sources: DEFAULT_MAX_SOURCES,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(&TraceError::Io {
                context: "starting the runtime".into(),
                source: e,
            });
        }
    };
    match rt.block_on(run(opts, sink.as_mut())) {
        Ok(_) => exit::OK,
        Err(e) => fail(&e),
    }
}

fn fail(e: &TraceError) -> i32 {
    let _ = writeln!(std::io::stderr(), "conntrack-trace: error: {e}");
    e.exit_code()
}
