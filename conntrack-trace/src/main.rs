use std::io::{IsTerminal, Write};

use clap::Parser;
use conntrack_trace::{
    cli::{
        self, Cli, Command, ExportArgs, ExportFormat, Format, ReportArgs, ReportFormat, TraceArgs,
    },
    drivers::{export, offline::ReportError, report, trace::run},
    formats::{
        capture, outfile,
        output::{
            Sink,
            human::Human,
            ndjson::Ndjson,
            pipe::{Pipe, diag},
        },
    },
    kernel::error::{TraceError, exit},
};

/// glibc's malloc raises its mmap threshold to the size of each large
/// block freed, after which blocks that size come from the heap and stay
/// resident once freed. A tracer under a flood of distinct sources makes
/// such blocks every interval (a read of the programs' per-source map, the
/// counts it hands on): 87 MiB peak RSS at a million sources against 70
/// MiB with the threshold fixed at its default (issue 21, `cargo xtask
/// bench memory`). Fixed, blocks of 128 KiB and more are mapped and given
/// back when freed. (musl's allocator, of the static build, unmaps freed
/// large blocks by itself.)
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() {
    tune_allocator();
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
            "conntrack-trace: error: a subcommand is required (trace, report, export, doctor, agent, completions or man; see --help)"
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
    let opts = match args.options() {
        Ok(o) => o,
        Err(msg) => return usage(&msg),
    };
    let stdout = std::io::stdout();
    let is_tty = stdout.is_terminal();
    let out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let format = args.format.unwrap_or(if is_tty {
        Format::Human
    } else {
        Format::Ndjson
    });
    let mut sink: Box<dyn Sink> = match format {
        Format::Human => Box::new(Human::new(out, is_tty)),
        Format::Ndjson => Box::new(Ndjson::new(out)),
    };
    let run = runtime().and_then(|rt| rt.block_on(run(opts, sink.as_mut())));
    match run {
        Ok(_) => exit::OK,
        Err(e) => fail(&e),
    }
}

/// The single-threaded runtime of the live commands: capabilities are per
/// thread, and the agent drops them on this one before it starts any
/// other (see agent::caps).
fn runtime() -> Result<tokio::runtime::Runtime, TraceError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TraceError::io("starting the runtime"))
}

/// A usage error: one line, exit 2.
fn usage(msg: &str) -> i32 {
    diag(format_args!("conntrack-trace: error: {msg}"));
    exit::USAGE
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
    let text = render_report(&r, args.format)?;
    if let Some(p) = &args.svg {
        write_svg(p, args.force, &inputs, &r)?;
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

/// `report --svg`: the timeline, in a file created with mode 0600.
fn write_svg(
    p: &std::path::Path,
    force: bool,
    inputs: &[outfile::Input],
    r: &report::Report,
) -> Result<(), ReportError> {
    let mut f = outfile::create(p, force, inputs)?;
    f.file()
        .write_all(report::svg::render(r).as_bytes())
        .map_err(|source| ReportError::Io {
            context: format!("--svg {}", p.display()),
            source,
        })?;
    let _ = f.keep();
    Ok(())
}

fn render_report(r: &report::Report, format: ReportFormat) -> Result<String, ReportError> {
    Ok(match format {
        ReportFormat::Human => report::human::render(r),
        ReportFormat::Markdown => report::markdown::render(r),
        ReportFormat::Json => {
            let mut s = serde_json::to_string(&report::Document::Report(r)).map_err(|e| {
                ReportError::Io {
                    context: "encoding the report".into(),
                    source: e.into(),
                }
            })?;
            s.push('\n');
            s
        }
    })
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
            w.extend(stats.warning());
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
        Err(msg) => return usage(&msg),
    };
    let run = runtime().and_then(|rt| rt.block_on(conntrack_trace::drivers::agent::run(opts)));
    match run {
        Ok(()) => exit::OK,
        Err(e) => fail(&e),
    }
}

/// `doctor`: the diagnosis on stdout; its status is the exit code.
fn doctor(args: &conntrack_trace::cli::DoctorArgs) -> i32 {
    use conntrack_trace::{cli::DoctorFormat, drivers::doctor};
    let d = match doctor::run(&args.options()) {
        Ok(d) => d,
        Err(e) => return fail(&e),
    };
    let text = match args.format {
        DoctorFormat::Human => doctor::human::render(&d),
        DoctorFormat::Json => match serde_json::to_string(&doctor::Document::Doctor(&d)) {
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
