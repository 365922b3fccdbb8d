//! What the two live drivers share — `trace` ([`crate::trace`]) and
//! `agent` ([`crate::agent`]): opening the backend between the kernel's
//! start counters and the first attach, the ring drained into a callback,
//! the session facts and capture header, and the end of a session (detach,
//! last drain, end counters). Each driver keeps only what differs: where
//! results go.

use std::time::{Duration, Instant, SystemTime};

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    backend::{self, Backend, BpfCounters, Choice},
    capture::{self, format::NsFill},
    clock::Clock,
    error::TraceError,
    event::{Event, Kind},
    filter::Filter,
    kstats::Uncovered,
    kstats::{self, CtStats},
    model::{KindCounts, Refusal, Scope, SessionFacts, Totals},
    netns,
    outfile::ReadyFile,
    pipeline::Pipeline,
};

/// Events drained from the ring per wakeup before the loop looks at its
/// timers again (keeps signals and the header responsive under a flood).
pub const DRAIN_BATCH: usize = 65_536;

/// How long the consumer waits after draining the ring before it polls
/// again, for a ring of `ring_bytes`.
///
/// The programs submit with adaptive wakeup (kernel/bpf/ringbuf.c,
/// `bpf_ringbuf_commit()`): a record wakes the reader only when the reader
/// had consumed everything before it. A reader that keeps up and goes
/// straight back to epoll is therefore woken once per record, and each
/// wakeup costs the dropping CPU an irq_work (a self-IPI, which exits to
/// the hypervisor on a VM) — measured 4–5 µs per emitting run in a flood
/// instead of ~1 µs (issue 15). Waiting a little after each drain lets a
/// flood batch up: one wakeup per wait, whatever the rate. The wait is
/// bounded so that the ring cannot fill meanwhile: a quarter of the time
/// the ring takes to fill at 2 M events/s (beyond any rate measured here),
/// at most 5 ms (the latency of a lone event is unchanged: it still wakes
/// the reader at once). Small rings (`--ring-size`) get no wait.
pub fn ring_pause(ring_bytes: u32) -> Duration {
    // A record is the event plus the ring's 8-byte header, rounded to 8.
    const RECORD: u64 =
        (std::mem::size_of::<conntrack_trace_common::RawEvent>() as u64 + 8 + 7) & !7;
    const FAST_EVENTS_PER_S: u64 = 2_000_000;
    let fill_ns = u64::from(ring_bytes) / RECORD * 1_000_000_000 / FAST_EVENTS_PER_S;
    let pause = Duration::from_nanos(fill_ns / 4).min(Duration::from_millis(5));
    if pause < Duration::from_micros(500) {
        Duration::ZERO
    } else {
        pause
    }
}

/// The backend's ring, polled by tokio, with what draining it needs.
pub struct Ring {
    fd: AsyncFd<RingBuf<MapData>>,
    pause: Duration,
    /// Records that did not decode (counted, skipped).
    pub decode_errors: u64,
}

impl Ring {
    /// Takes the backend's ring (none for the counters backend).
    pub fn take(tp: &mut Backend, ring_bytes: u32) -> Result<Option<Ring>, TraceError> {
        let Some(r) = tp.take_ring()? else {
            return Ok(None);
        };
        // SAFETY: the AsyncFd owns the ring (and so its fd) until
        // into_inner() in `end`; nothing else closes the fd.
        let fd = unsafe { AsyncFd::register_with_interest(r, Interest::READABLE) }
            .map_err(|e| TraceError::io("polling the ring buffer")(e.into()))?;
        Ok(Some(Ring {
            fd,
            pause: ring_pause(ring_bytes),
            decode_errors: 0,
        }))
    }

    /// Hands up to `limit` records to `f`; returns how many were read.
    pub fn drain(
        &mut self,
        limit: usize,
        f: impl FnMut(&Event) -> Result<(), TraceError>,
    ) -> Result<usize, TraceError> {
        drain(self.fd.get_mut(), limit, &mut self.decode_errors, f)
    }

    /// Waits until the ring has records, drains a batch into `f`, and —
    /// when the ring ran dry — pauses (see [`ring_pause`]) before the
    /// next wait. Never returns for no ring (the counters backend).
    pub async fn next_batch(
        ring: &mut Option<Ring>,
        f: impl FnMut(&Event) -> Result<(), TraceError>,
    ) -> Result<(), TraceError> {
        let Some(ring) = ring.as_mut() else {
            return std::future::pending().await;
        };
        let mut guard = ring
            .fd
            .readable_mut()
            .await
            .map_err(TraceError::io("polling the ring buffer"))?;
        let n = drain(
            guard.get_inner_mut(),
            DRAIN_BATCH,
            &mut ring.decode_errors,
            f,
        )?;
        if n < DRAIN_BATCH {
            guard.clear_ready();
            if !ring.pause.is_zero() {
                tokio::time::sleep(ring.pause).await;
            }
        }
        Ok(())
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    limit: usize,
    decode_errors: &mut u64,
    mut f: impl FnMut(&Event) -> Result<(), TraceError>,
) -> Result<usize, TraceError> {
    let mut n = 0;
    while n < limit {
        let Some(item) = ring.next() else { break };
        n += 1;
        let ev = Event::decode(&item);
        // The record goes back to the ring before the event is handled.
        drop(item);
        match ev {
            Ok(ev) => f(&ev)?,
            Err(_) => *decode_errors += 1,
        }
    }
    Ok(n)
}

/// A backend, opened with the kernel's counters read right before its
/// first attach (after the load, which can take seconds): their delta to
/// the end snapshot and our counters cover one window.
pub struct Opened {
    pub tp: Backend,
    pub refused: Vec<Refusal>,
    pub start: kstats::Snapshot,
}

pub fn open(
    choice: Choice,
    opts: &backend::Options,
    scope: &[netns::Held],
) -> Result<Opened, TraceError> {
    let start_cell = std::cell::RefCell::new(kstats::Snapshot::default());
    let (tp, refused) = backend::open(choice, opts, scope, &|| {
        *start_cell.borrow_mut() = kstats::snapshot(scope);
    })?;
    Ok(Opened {
        tp,
        refused,
        start: start_cell.into_inner(),
    })
}

impl Opened {
    /// What the session established, once (see [`SessionFacts`]).
    pub fn facts(&self, scope: Scope) -> SessionFacts {
        SessionFacts {
            version: env!("CARGO_PKG_VERSION").into(),
            backend: self.tp.name().as_str().into(),
            hooks: self.tp.describe(),
            refused: self.refused.clone(),
            per_packet: self.tp.per_packet(),
            evictions: self.tp.evictions().describe(),
            clock: wall_clock_now(),
            scope: Scope {
                uncovered: self.start.missing.clone(),
                ..scope
            },
        }
    }
}

pub fn wall_clock_now() -> Clock {
    Clock {
        start_unix_ns: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        start_mono_ns: crate::clock::monotonic_ns(),
    }
}

/// The capture's first record: the session's facts and the kernel's state
/// at start (`fills`: each namespace's table).
pub fn capture_header(
    facts: &SessionFacts,
    filter: &Filter,
    fills: Vec<NsFill>,
    start: &kstats::Snapshot,
) -> capture::Header {
    capture::Header {
        format_version: capture::format::FORMAT_VERSION,
        tool_version: facts.version.clone(),
        hostname: capture::hostname(),
        kernel_release: capture::kernel_release(),
        backend: facts.hooks.clone(),
        evictions: facts.evictions.clone(),
        start_unix_ns: facts.clock.start_unix_ns,
        start_mono_ns: facts.clock.start_mono_ns,
        capture_id: facts.clock.start_unix_ns as u64 ^ (u64::from(std::process::id()) << 40),
        seq: 0,
        scope: facts.scope.clone(),
        filter: capture::format::RecordedFilter::of(filter),
        conntrack: fills,
        kernel_start: start.stats.clone(),
        backend_refused: facts.refused.clone(),
        per_packet: facts.per_packet,
        backend_name: Some(facts.backend.clone()),
    }
}

/// What the end of a live session read: the programs' counters after the
/// last drain and the kernel's counters over the attach window.
pub struct Ending {
    pub counters: BpfCounters,
    pub end: kstats::Snapshot,
    pub kernel: CtStats,
    pub covered: usize,
    pub uncovered: Vec<Uncovered>,
    /// From `started` to the detach.
    pub duration_s: f64,
    /// Ring records that did not decode, over the whole session.
    pub decode_errors: u64,
}

/// Stops the producers, reads the kernel's end counters (`end_snapshot`,
/// right after the detach), withdraws the ready file (nothing is attached
/// any more: a script must not read "ready"), then takes everything the
/// programs left in the ring — so that events + lost == observed holds
/// exactly.
#[allow(
    clippy::too_many_arguments,
    reason = "one call per driver, each argument named there"
)]
pub fn end(
    tp: &mut Backend,
    ring: Option<Ring>,
    scope: &[netns::Held],
    start: &kstats::Snapshot,
    end_snapshot: impl FnOnce() -> kstats::Snapshot,
    ready: Option<&mut ReadyFile>,
    started: Instant,
    f: impl FnMut(&Event) -> Result<(), TraceError>,
) -> Result<Ending, TraceError> {
    let mut ring = ring.map(|r| (r.fd.into_inner(), r.decode_errors));
    tp.detach();
    let end = end_snapshot();
    if let Some(r) = ready {
        r.withdraw();
    }
    let duration_s = started.elapsed().as_secs_f64();
    let mut decode_errors = 0;
    if let Some((ring, errors)) = ring.as_mut() {
        drain(ring, usize::MAX, errors, f)?;
        decode_errors = *errors;
    }
    let counters = tp.counters()?;
    let (kernel, covered, uncovered) = kstats::window(scope, start, &end);
    Ok(Ending {
        counters,
        end,
        kernel,
        covered,
        uncovered,
        duration_s,
        decode_errors,
    })
}

/// A live summary's counts: the pipeline's, the programs' and the
/// kernel's over the attach window (`sampled`, `exact`: see
/// [`Totals::sampled`]).
pub fn totals<S>(
    facts: &SessionFacts,
    p: &Pipeline<S>,
    end: &Ending,
    sampled: bool,
    exact: u64,
) -> Totals {
    let c = &end.counters;
    Totals {
        events: p.received,
        matched: match facts.per_packet {
            true => p.agg.totals,
            false => KindCounts::default(),
        },
        lost: c.lost,
        shed: c.shed,
        observed: c.seen,
        kernel: end.kernel,
        unclassified_drops: c.unclassified,
        unmatched_drop_counts: c.drop_unmatched,
        decode_errors: end.decode_errors,
        namespaces: end.covered,
        uncovered: end.uncovered.clone(),
        complete: complete(facts.per_packet, &p.received, c),
        sampled,
        exact_sources: exact,
    }
}

/// Whether every drop the programs saw either arrived as an event or was
/// counted as lost or shed. Without events (counters backend) nothing is
/// complete.
pub fn complete(per_packet: bool, received: &KindCounts, c: &BpfCounters) -> bool {
    per_packet
        && Kind::ALL
            .iter()
            .all(|k| received.get(*k) + c.lost.get(*k) + c.shed.get(*k) == c.seen.get(*k))
}

/// The stderr line that says which backend runs and why `auto` passed over
/// the ones before it.
pub fn selection_line(desc: &str, refused: &[Refusal]) -> String {
    let mut s = format!("conntrack-trace: backend {desc}");
    for r in refused {
        s.push_str(&format!("; {} refused: {}", r.backend.as_str(), r.reason));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Name;

    #[test]
    fn ring_pause_never_lets_the_ring_fill() {
        // The default 8 MiB ring holds ~40 000 records (208 bytes each):
        // 20 ms at 2 M/s.
        assert_eq!(ring_pause(8 << 20), Duration::from_millis(5));
        // 1 MiB: 5041 records, 2.5 ms to fill at 2 M/s, a quarter of it.
        assert_eq!(ring_pause(1 << 20), Duration::from_nanos(630_125));
        // A page (the tiny-ring test): 19 records, no wait at all.
        assert_eq!(ring_pause(4096), Duration::ZERO);
        assert_eq!(ring_pause(64 << 10), Duration::ZERO);
    }

    #[test]
    fn selection_line_names_every_refusal() {
        let refused = [Refusal {
            backend: Name::Fexit,
            reason: "kernel refused to attach program `ct_confirm_enter` to fentry/__nf_conntrack_confirm: Operation not permitted (os error 1)".into(),
        }];
        assert_eq!(
            selection_line("tracepoint (tp_btf/kfree_skb)", &refused),
            "conntrack-trace: backend tracepoint (tp_btf/kfree_skb); fexit refused: kernel refused to attach program `ct_confirm_enter` to fentry/__nf_conntrack_confirm: Operation not permitted (os error 1)"
        );
        assert_eq!(
            selection_line("fexit (fexit/nf_ct_delete)", &[]),
            "conntrack-trace: backend fexit (fexit/nf_ct_delete)"
        );
    }
}
