use std::io::{IsTerminal, Write};

use clap::Parser;
use conntrack_trace::{
    aggregate::DEFAULT_MAX_SOURCES,
    backend::{self, DEFAULT_RING_BYTES},
    btf::VMLINUX_BTF,
    capture::{self, WriteOptions},
    cli::{
        self, Cli, Command, ExportArgs, ExportFormat, Format, OnOff, ReportArgs, ReportFormat,
        TraceArgs,
    },
    error::{TraceError, exit},
    export,
    filter::Filter,
    outfile,
    output::{
        Sink,
        human::Human,
        ndjson::Ndjson,
        pipe::{Pipe, diag},
    },
    report::{self, ReportError},
    trace::{TraceOptions, run},
};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => std::process::exit(clap_error(&e)),
    };
    let code = match cli.command {
        Command::Trace(args) => trace(args),
        Command::Report(args) => offline(report_cmd(args)),
        Command::Export(args) => offline(export_cmd(args)),
        Command::Doctor(args) => doctor(&args),
        Command::Agent(args) => agent(&args),
        Command::Completions { shell } => conntrack_trace::docgen::completions_cmd(shell),
        Command::Man { dir } => conntrack_trace::docgen::man_cmd(dir.as_deref()),
    };
    std::process::exit(code);
}

/// Help and version go to stdout (exit 0); a usage error is one line on
/// stderr with our prefix (exit 2), like every other error.
fn clap_error(e: &clap::Error) -> i32 {
    if !e.use_stderr() {
        let _ = e.print();
        return exit::OK;
    }
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // `conntrack-trace` alone: the help is the answer.
        diag(format_args!(
            "conntrack-trace: error: a subcommand is required (trace, report, export, doctor or agent; see --help)"
        ));
        return exit::USAGE;
    }
    diag(format_args!(
        "conntrack-trace: error: {}",
        cli::one_line_error(&e.render().to_string())
    ));
    exit::USAGE
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
    let amp = match args.amp.config() {
        Ok(c) => c,
        Err(msg) => {
            diag(format_args!("conntrack-trace: error: {msg}"));
            return exit::USAGE;
        }
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
        amp,
        write: args.write.map(|path| WriteOptions {
            path,
            force: args.force,
            max_size: args.max_size,
        }),
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
    diag(format_args!("conntrack-trace: error: {e}"));
    e.exit_code()
}

/// Exit status of `report`/`export`: a damaged capture is reported (on
/// stderr and in the output), not an error; unreadable input is.
fn offline(r: Result<Vec<String>, ReportError>) -> i32 {
    match r {
        Ok(warnings) => {
            for w in warnings {
                diag(format_args!("conntrack-trace: warning: {w}"));
            }
            exit::OK
        }
        Err(e) => {
            diag(format_args!("conntrack-trace: error: {e}"));
            e.exit_code()
        }
    }
}

fn report_cmd(args: ReportArgs) -> Result<Vec<String>, ReportError> {
    let spec = args.filter.spec().map_err(ReportError::Usage)?;
    // Inputs first: each opened once and checked before any output exists.
    let set = capture::open_set(&args.files)?;
    let inputs = set.inputs();
    if let Some(p) = &args.svg {
        // Refuse a bad --svg (e.g. the arguments swapped: `--svg A.ctt
        // B.ctt`) before reading; it is created once the report is done.
        export::refuse_capture(p)?;
        outfile::check(p, args.force, &inputs)?;
    }
    let r = report::build_set(set, &spec, args.top, |_, _, _| {})?;
    let text = match args.format {
        ReportFormat::Human => report::human::render(&r),
        ReportFormat::Markdown => report::markdown::render(&r),
        ReportFormat::Json => {
            let mut s = serde_json::to_string(&r).map_err(|e| ReportError::Io {
                context: "encoding the report".into(),
                source: e.into(),
            })?;
            s.push('\n');
            s
        }
    };
    if let Some(p) = &args.svg {
        let mut f = outfile::create(p, args.force, &inputs)?;
        f.file()
            .write_all(report::svg::render(&r).as_bytes())
            .map_err(|source| ReportError::Io {
                context: format!("--svg {}", p.display()),
                source,
            })?;
        let _ = f.keep();
    }
    let mut out = Pipe::new(std::io::stdout().lock());
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|source| ReportError::Io {
            context: "writing the report".into(),
            source,
        })?;
    Ok(r.warnings)
}

fn export_cmd(args: ExportArgs) -> Result<Vec<String>, ReportError> {
    let spec = args.filter.spec().map_err(ReportError::Usage)?;
    let to_stdout = args.output.as_deref().is_none_or(|p| p.as_os_str() == "-");
    if args.format == ExportFormat::Pcapng && to_stdout && std::io::stdout().is_terminal() {
        return Err(ReportError::Usage(
            "refusing to write pcapng to a terminal; use -o FILE or a pipe".into(),
        ));
    }
    // Inputs first (opened once, checked), then the output: `export junk
    // -o OUT` leaves no OUT, and OUT is never one of the inputs. A failed
    // export removes the file it created.
    let set = capture::open_set(&args.files)?;
    let mut out = export::open_output(args.output.as_deref(), args.force, &set.inputs())?;
    let warnings = match args.format {
        ExportFormat::Ndjson => {
            export::ndjson::export(set, &spec, args.top, out.writer())?.warnings
        }
        ExportFormat::Pcapng => {
            let (r, stats) = export::pcapng::export(set, &spec, out.writer())?;
            let mut w = r.warnings;
            if stats.without_bytes > 0 {
                w.push(format!(
                    "{} matching events carry no packet bytes (evictions have no packet) and are not in the pcapng; {} packets written",
                    stats.without_bytes, stats.packets
                ));
            }
            w
        }
    };
    out.keep();
    Ok(warnings)
}

/// `agent`: runs until SIGTERM/SIGINT.
fn agent(args: &conntrack_trace::cli::AgentArgs) -> i32 {
    let opts = match args.options() {
        Ok(o) => o,
        Err(msg) => {
            diag(format_args!("conntrack-trace: error: {msg}"));
            return exit::USAGE;
        }
    };
    // Current-thread: capabilities are per thread, and the agent drops
    // them on this one before it starts any other (see agent::caps).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&TraceError::io("starting the runtime")(e)),
    };
    match rt.block_on(conntrack_trace::agent::run(opts)) {
        Ok(()) => exit::OK,
        Err(e) => fail(&e),
    }
}

/// `doctor`: the diagnosis on stdout; its status is the exit code.
fn doctor(args: &conntrack_trace::cli::DoctorArgs) -> i32 {
    use conntrack_trace::{cli::DoctorFormat, doctor};
    let d = match doctor::run(&args.options()) {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    let text = match args.format {
        DoctorFormat::Human => doctor::human::render(&d),
        DoctorFormat::Json => match serde_json::to_string(&d) {
            Ok(s) => s + "\n",
            Err(e) => return fail(&TraceError::Other(format!("encoding the diagnosis: {e}"))),
        },
    };
    for w in &d.warnings {
        let _ = writeln!(std::io::stderr(), "conntrack-trace: warning: {w}");
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            fail(&TraceError::io("writing the diagnosis")(e))
        }
        _ => d.exit_code,
    }
}
