//! `--bpf-log`: the programs' own diagnostic log (aya-log), read into the
//! tool's log.
//!
//! The programs (conntrack-trace-ebpf, `blog!`) log their decisions on the
//! rare paths — why a netfilter drop was not conntrack's, which step named
//! a rare kind, what they were loaded with — into aya-log's `AYA_LOGS`
//! ring. Every call sits behind [`flags::BPF_LOG`] in the read-only
//! `CONFIG`, and aya-log's own `AYA_LOG_LEVEL` global holds the level: off,
//! the verifier removes the calls, the ring is created at one page (it is
//! in the object either way) and nothing reads it.
//!
//! Only the tracepoint backend's programs log ([`FEXIT_DOES_NOT_LOG`]);
//! the counters backend runs none (a warning says so, nothing else).
//!
//! On, a thread of its own waits on the ring (poll(2), so an idle log costs
//! no wakeup beyond its stop check) and hands each record, formatted by
//! aya-log, to the driver's [`Sink`]: a `bpf: LEVEL ...` line on stderr
//! for `trace` and `doctor`, a `bpf_log` JSON line for the agent.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use aya::Ebpf;
use aya_log::EbpfLogger;
use conntrack_trace_common::{Config, flags};

/// `--bpf-log`: the most detailed level the programs log at, or off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum BpfLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

/// Why `--bpf-log` refuses the fexit backend (`auto` then takes the
/// tracepoints): aya-log-ebpf's macro compiles to BPF subprograms, and
/// the trampoline loader (conntrack-trace/src/kernel/backend/trampoline.rs)
/// gives the kernel no BTF func_info; untested there, so the fexit
/// programs carry no log calls (see conntrack-trace-ebpf/src/fexit.rs).
pub const FEXIT_DOES_NOT_LOG: &str = "--bpf-log needs the tracepoint backend: the fexit programs do not log (use --backend tracepoint or auto)";

/// aya-log's ring (`AYA_LOGS`) when logging: aya-log-ebpf's own size. A
/// record is at most a few hundred bytes; a burst that fills it loses
/// lines (the reservation fails in the program), never events.
pub const RING_BYTES_ON: u32 = 128 << 10;

impl BpfLog {
    pub fn is_on(self) -> bool {
        self != BpfLog::Off
    }

    /// The value of aya-log-ebpf's `AYA_LOG_LEVEL` (aya-log-common's
    /// `Level`: error 1 .. debug 4; 0 logs nothing).
    pub fn aya_level(self) -> u8 {
        match self {
            BpfLog::Off => 0,
            BpfLog::Error => 1,
            BpfLog::Warn => 2,
            BpfLog::Info => 3,
            BpfLog::Debug => 4,
        }
    }

    /// The programs' side: the gate bit in [`Config::flags`].
    pub(crate) fn configure(self, config: &mut Config) {
        if self.is_on() {
            config.flags |= flags::BPF_LOG;
        }
    }

    /// Bytes of the `AYA_LOGS` ring: [`RING_BYTES_ON`], or off one page
    /// (the least a ring buffer map may have; nothing writes to it).
    pub fn ring_bytes(self) -> u32 {
        if self.is_on() {
            RING_BYTES_ON
        } else {
            super::page_bytes()
        }
    }
}

/// Where a log line goes: level and message (without the `bpf:` prefix,
/// which the sink adds in its own format).
pub type Sink = fn(log::Level, &str);

/// Hands aya-log's records to a [`Sink`].
struct Lines(Sink);

impl log::Log for Lines {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        (self.0)(record.level(), &record.args().to_string());
    }

    fn flush(&self) {}
}

/// The running reader; dropping it stops the thread after a last drain.
pub struct Reader {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the reader looks at its stop flag while the log is idle.
const STOP_CHECK_MS: i32 = 100;

impl Reader {
    /// Takes the `AYA_LOGS` ring from `ebpf` and starts reading it into
    /// `sink`.
    pub(crate) fn start(ebpf: &mut Ebpf, sink: Sink) -> Result<Reader, String> {
        let mut logger = EbpfLogger::init_with_logger(ebpf, Lines(sink))
            .map_err(|e| format!("AYA_LOGS: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        quiet_reader_panics();
        let thread = std::thread::Builder::new()
            .name(THREAD.into())
            .spawn(move || {
                let fd = logger.as_fd().as_raw_fd();
                while !stopping.load(Ordering::Relaxed) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd; the ring (and its fd) lives
                    // as long as `logger`, owned by this thread.
                    let n = unsafe { libc::poll(&mut pfd, 1, STOP_CHECK_MS) };
                    if n > 0 && !drain(&mut logger, sink) {
                        return;
                    }
                }
                drain(&mut logger, sink);
            })
            .map_err(|e| format!("starting the bpf-log thread: {e}"))?;
        Ok(Reader {
            stop,
            thread: Some(thread),
        })
    }
}

/// Everything in the ring, through the sink; false once a record could
/// not be decoded. aya-log's `flush()` unwraps its decoder (aya-log 0.3,
/// `EbpfLogger::flush`), so a record it cannot decode — none our programs
/// write — panics: caught here, said in one line, and the log stops there
/// (the trace goes on).
fn drain(logger: &mut EbpfLogger<Lines>, sink: Sink) -> bool {
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_ok();
    if !ok {
        sink(
            log::Level::Error,
            "a record of the programs' log could not be decoded; --bpf-log stops here (the trace goes on)",
        );
    }
    ok
}

/// Keeps the default panic message (a backtrace hint on stderr) out of a
/// caught decoder panic in the reader's thread ([`drain`]); every other
/// thread's panics are reported as before.
fn quiet_reader_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(THREAD) {
                previous(info);
            }
        }));
    });
}

/// The reader thread's name (the panic hook tells it by this).
const THREAD: &str = "bpf-log";

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_aya_logs() {
        // aya-log-common's Level: Error = 1, Warn, Info, Debug, Trace.
        assert_eq!(BpfLog::Off.aya_level(), 0);
        assert_eq!(BpfLog::Error.aya_level(), 1);
        assert_eq!(BpfLog::Debug.aya_level(), 4);
        assert!(BpfLog::Off < BpfLog::Error && BpfLog::Info < BpfLog::Debug);
    }

    #[test]
    fn off_sets_no_flag_and_a_page_ring() {
        let mut c = Config::default();
        BpfLog::Off.configure(&mut c);
        assert_eq!(c.flags & flags::BPF_LOG, 0);
        assert_eq!(BpfLog::Off.ring_bytes(), super::super::page_bytes());
        BpfLog::Warn.configure(&mut c);
        assert_ne!(c.flags & flags::BPF_LOG, 0);
        assert_eq!(BpfLog::Warn.ring_bytes(), RING_BYTES_ON);
    }
}
