//! `cargo xtask bench sampling`: are the answers still right once the
//! events are a sample (issue 21)? Two floods into [`super::flood`]'s full
//! server, from a raw-socket generator that writes its own IPv4 headers,
//! so every datagram can come from any source address and the bench knows
//! exactly what each source sent:
//!
//! * **top sources**: 16 sources at 16 different known rates hidden among
//!   more than a million one-off spoofed sources. The tracer's top
//!   sources (from the programs' exact per-source counts) must list the
//!   16, each with exactly the count it sent.
//! * **amplification**: a DNS-like flood where every query is sent a known
//!   number of times (its retries come from new source ports, as dig and
//!   resolvers retry), from 64 clients. The reported factor (attempts /
//!   flows over the flagged sources) against the truth, and the flagged
//!   sources with the default budget against `--event-budget 0`.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_tests::{KernelLock, Sysctl, Topology, in_netns};

use super::{Traced, fmt_spread, kinds_total};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Measurements per configuration.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

impl Default for Args {
    fn default() -> Self {
        Args { rounds: 3 }
    }
}

/// Generator threads.
const THREADS: u32 = 2;
/// Datagrams per sendmmsg call.
const BATCH: usize = 256;
/// Longest flood.
const LIMIT: Duration = Duration::from_secs(60);
/// The known sources: 10.200.0.1 ... 10.200.0.16.
const KNOWN: usize = 16;
/// Every `KNOWN_EVERY`-th datagram is from a known source.
const KNOWN_EVERY: u64 = 8;
/// Datagrams per thread in the top-sources flood: 2 x 640 000, of which
/// 7/8 (1 120 000) from one-off spoofed sources.
const TOP_PER_THREAD: u64 = 640_000;
/// DNS clients of the amplification flood: 100.127.0.1 ...
const DNS_CLIENTS: u32 = 64;
/// Tries of every query (the first and its retries).
const TRIES: u64 = 4;
/// Queries per thread: 2 x 50 000 flows, 400 000 datagrams in all.
const QUERIES_PER_THREAD: u64 = 50_000;
/// Destination port of both floods.
const DPORT: u16 = 53;

/// Known source `k` (0-based) gets `k + 1` of every 136 known datagrams:
/// sixteen different rates.
fn known_schedule() -> Vec<usize> {
    (0..KNOWN)
        .flat_map(|k| std::iter::repeat_n(k, k + 1))
        .collect()
}

fn known_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 1 + k as u8)
}

/// `socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`: IP_HDRINCL implied; the
/// kernel fills the IP checksum, total length and id (raw(7)).
fn raw_socket() -> Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes an IPv4 + UDP datagram into `buf`; returns its length. The UDP
/// checksum is 0 (none), allowed over IPv4.
fn datagram(
    buf: &mut [u8; 128],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    payload: &[u8],
) -> usize {
    let len = 28 + payload.len();
    buf[..28].fill(0);
    buf[0] = 0x45;
    buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    buf[8] = 64;
    buf[9] = 17;
    buf[12..16].copy_from_slice(&src.octets());
    buf[16..20].copy_from_slice(&dst.octets());
    buf[20..22].copy_from_slice(&sport.to_be_bytes());
    buf[22..24].copy_from_slice(&DPORT.to_be_bytes());
    buf[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    buf[28..len].copy_from_slice(payload);
    len
}

/// A standard DNS query (RD, one question, type A, class IN) for `name`.
fn dns_query(out: &mut Vec<u8>, id: u16, name: &str) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.extend_from_slice(&[0, 0, 1, 0, 1]);
}

/// Sends the datagrams `fill(i, buf)` writes, for i in `0..n`, through a
/// raw socket in batches; returns how many were sent.
fn send_raw(
    dst: Ipv4Addr,
    n: u64,
    mut fill: impl FnMut(u64, &mut [u8; 128]) -> usize,
) -> Result<u64> {
    let sock = raw_socket()?;
    let mut bufs = vec![[0u8; 128]; BATCH];
    let mut iovs: Vec<libc::iovec> = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0
        };
        BATCH
    ];
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    to.sin_family = libc::AF_INET as libc::sa_family_t;
    to.sin_addr.s_addr = u32::from(dst).to_be();
    let deadline = Instant::now() + LIMIT;
    let mut sent = 0u64;
    while sent < n && Instant::now() < deadline {
        let k = (BATCH as u64).min(n - sent) as usize;
        for j in 0..k {
            let len = fill(sent + j as u64, &mut bufs[j]);
            iovs[j].iov_base = bufs[j].as_mut_ptr().cast();
            iovs[j].iov_len = len;
        }
        let mut msgs: Vec<libc::mmsghdr> = (0..k)
            .map(|j| {
                // SAFETY: all-zero is a valid mmsghdr.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (&raw mut to).cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                m.msg_hdr.msg_iov = &raw mut iovs[j];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: msgs, iovs, bufs and `to` outlive the call.
        let r = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), k as u32, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                continue;
            }
            bail!("sendmmsg (raw): {e}");
        }
        // A partial send: the rest of the batch is rebuilt from `sent` on.
        sent += r as u64;
    }
    Ok(sent)
}

/// What one top-sources generator thread sent.
struct TopSent {
    total: u64,
    known: [u64; KNOWN],
}

/// Thread `t`'s share of the top-sources flood: one-off sources from its
/// own /11 of 100.64.0.0/10, every [`KNOWN_EVERY`]-th datagram from the
/// next known source of the schedule.
fn top_flood(t: u32, dst: Ipv4Addr) -> Result<TopSent> {
    let schedule = known_schedule();
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (t << 21);
    let mut known = [0u64; KNOWN];
    let payload = *b"conntrack-trace bench";
    let total = send_raw(dst, TOP_PER_THREAD, |i, buf| {
        let (src, sport) = if i % KNOWN_EVERY == 0 {
            let k = schedule[((i / KNOWN_EVERY) % schedule.len() as u64) as usize];
            (known_addr(k), 40_000)
        } else {
            (Ipv4Addr::from(base + i as u32), 40_000)
        };
        datagram(buf, src, dst, sport, &payload)
    })?;
    // Recount what was sent (a deadline may have cut the flood short).
    for i in (0..total).step_by(KNOWN_EVERY as usize) {
        known[schedule[((i / KNOWN_EVERY) % schedule.len() as u64) as usize]] += 1;
    }
    Ok(TopSent { total, known })
}

/// Thread `t`'s share of the DNS flood: query `q` (a name of its own)
/// from client `q % DNS_CLIENTS`, [`TRIES`] times in a row, each try from
/// a new source port.
fn dns_flood(t: u32, dst: Ipv4Addr) -> Result<u64> {
    let mut payload = Vec::with_capacity(64);
    send_raw(dst, QUERIES_PER_THREAD * TRIES, |i, buf| {
        let q = i / TRIES;
        let client =
            Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 127, 0, 1)) + (q as u32 % DNS_CLIENTS));
        dns_query(&mut payload, q as u16, &format!("q{t}x{q}.bench.test"));
        let sport = 10_000 + (i % 50_000) as u16;
        datagram(buf, client, dst, sport, &payload)
    })
}

/// Runs `per_thread` on [`THREADS`] threads in the client namespace.
fn in_client<T: Send>(
    topo: &Topology,
    per_thread: impl Fn(u32, Ipv4Addr) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let path = topo.client.path();
    let dst = topo.server_ip;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (path, per_thread) = (&path, &per_thread);
                s.spawn(move || in_netns(path, || per_thread(t, dst)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("generator panicked"))??
            })
            .collect()
    })
}

/// One flood under one tracer: the kernel's drops and rate, and the
/// tracer's summary.
struct Run<T> {
    sent: T,
    drops: u64,
    drops_per_s: f64,
    summary: serde_json::Value,
}

fn traced<T: Send>(
    bin: &Path,
    topo: &Topology,
    extra: &[&str],
    flood: impl Fn(u32, Ipv4Addr) -> Result<T> + Sync,
) -> Result<Run<Vec<T>>> {
    let mut a = vec![
        "--format",
        "ndjson",
        "--netns",
        &topo.server.name,
        "--top",
        "32",
    ];
    a.extend_from_slice(extra);
    let tracer = Traced::tracer(bin, &a)?;
    let before = topo.server.ct_stats()?.drop;
    let started = Instant::now();
    let sent = in_client(topo, flood)?;
    let secs = started.elapsed().as_secs_f64();
    let drops = topo.server.ct_stats()?.drop - before;
    let (summary, _) = tracer.stop()?;
    Ok(Run {
        sent,
        drops,
        drops_per_s: drops as f64 / secs,
        summary: summary.context("the tracer printed no summary")?,
    })
}

/// The top-sources flood once: per known source, (sent, reported).
struct TopSample {
    sent: u64,
    drops: u64,
    drops_per_s: f64,
    shed: u64,
    lost: u64,
    known: Vec<(u64, Option<u64>)>,
    one_off: u64,
}

fn top_round(bin: &Path, topo: &Topology) -> Result<TopSample> {
    let run = traced(bin, topo, &[], top_flood)?;
    let mut known = Vec::new();
    let top = run.summary["top"].as_array().cloned().unwrap_or_default();
    for k in 0..KNOWN {
        let sent: u64 = run.sent.iter().map(|s| s.known[k]).sum();
        let src = known_addr(k).to_string();
        let reported = top
            .iter()
            .find(|r| r["src"].as_str() == Some(&src))
            .and_then(|r| r["counts"]["table_full"].as_u64());
        known.push((sent, reported));
    }
    let sent: u64 = run.sent.iter().map(|s| s.total).sum();
    let known_sent: u64 = known.iter().map(|(s, _)| s).sum();
    Ok(TopSample {
        sent,
        drops: run.drops,
        drops_per_s: run.drops_per_s,
        shed: kinds_total(&run.summary, "shed").unwrap_or(0),
        lost: kinds_total(&run.summary, "lost").unwrap_or(0),
        known,
        one_off: sent - known_sent,
    })
}

/// The DNS flood once under one budget.
struct AmpSample {
    drops_per_s: f64,
    drops: u64,
    shed: u64,
    flagged: Vec<String>,
    attempts: u64,
    flows: u64,
}

fn amp_round(bin: &Path, topo: &Topology, extra: &[&str]) -> Result<AmpSample> {
    let run = traced(bin, topo, extra, dns_flood)?;
    let sent: u64 = run.sent.iter().sum();
    if run.drops < sent {
        bail!(
            "{sent} queries sent, {} dropped: is the table full?",
            run.drops
        );
    }
    let findings = run.summary["findings"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut flagged: Vec<String> = findings
        .iter()
        .filter_map(|f| f["src"].as_str().map(str::to_owned))
        .collect();
    flagged.sort();
    let sum = |field: &str| -> u64 { findings.iter().filter_map(|f| f[field].as_u64()).sum() };
    Ok(AmpSample {
        drops_per_s: run.drops_per_s,
        drops: run.drops,
        shed: kinds_total(&run.summary, "shed").unwrap_or(0),
        flagged,
        attempts: sum("attempts"),
        flows: sum("flows"),
    })
}

pub fn run(bin: &Path, args: &Args) -> Result<String> {
    let _lock = KernelLock::acquire()?;
    let topo = Topology::new("bs", 93)?;
    const MAX: u64 = 64;
    let _max = Sysctl::set("net.netfilter.nf_conntrack_max", MAX)?;
    let _filler = topo.fill_assured(MAX)?;
    let mut tops = Vec::new();
    let mut amps: Vec<(AmpSample, AmpSample)> = Vec::new();
    for round in 0..args.rounds {
        let t = top_round(bin, &topo).with_context(|| format!("round {round}, top sources"))?;
        let exact = t.known.iter().filter(|(s, r)| Some(*s) == *r).count();
        eprintln!(
            "round {round}: top sources: {} sent ({} one-off), {} dropped at {:.0}/s, shed {}, lost {}; {exact}/{KNOWN} known sources exact: {:?}",
            t.sent, t.one_off, t.drops, t.drops_per_s, t.shed, t.lost, t.known
        );
        tops.push(t);
        let with = amp_round(bin, &topo, &[]).with_context(|| format!("round {round}, dns"))?;
        let without = amp_round(bin, &topo, &["--event-budget", "0"])
            .with_context(|| format!("round {round}, dns, --event-budget 0"))?;
        for (label, s) in [("default budget", &with), ("--event-budget 0", &without)] {
            eprintln!(
                "round {round}: dns, {label}: {} dropped at {:.0}/s, shed {}, {} flagged, factor {:.3}",
                s.drops,
                s.drops_per_s,
                s.shed,
                s.flagged.len(),
                s.attempts as f64 / s.flows.max(1) as f64
            );
        }
        amps.push((with, without));
    }
    let mut md = format!(
        "Raw-socket floods (the generator writes the IPv4 header, so any source address) into \
         the table-full server of the flood above, `trace --format ndjson --top 32` with the \
         default budget; {} rounds, median [min–max].\n\n\
         **Top sources among one-off spoofed sources**: {THREADS} x {TOP_PER_THREAD} datagrams \
         to udp/{DPORT}; every {KNOWN_EVERY}th from one of {KNOWN} known sources (10.200.0.1–16, \
         source k sending k+1 of every 136 known datagrams), the rest each from a source of its \
         own in 100.64.0.0/10. A known source is exact when the tracer's top-sources count equals \
         what it sent.\n\n\
         | datagrams | from one-off sources | kernel drops/s | shed | lost | known sources listed with their exact count |\n\
         |---|---|---|---|---|---|\n",
        args.rounds
    );
    let col = |v: Vec<f64>, p| fmt_spread(v, p);
    md.push_str(&format!(
        "| {} | {} | {} | {} | {} | {} |\n\n",
        col(tops.iter().map(|t| t.sent as f64).collect(), 0),
        col(tops.iter().map(|t| t.one_off as f64).collect(), 0),
        col(tops.iter().map(|t| t.drops_per_s).collect(), 0),
        col(tops.iter().map(|t| t.shed as f64).collect(), 0),
        col(tops.iter().map(|t| t.lost as f64).collect(), 0),
        tops.iter()
            .map(|t| format!(
                "{}/{KNOWN}",
                t.known.iter().filter(|(s, r)| Some(*s) == *r).count()
            ))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    if let Some(t) = tops.last() {
        md.push_str("Last round, per known source (sent = reported): ");
        md.push_str(
            &t.known
                .iter()
                .enumerate()
                .map(|(k, (s, r))| match r {
                    Some(r) if r == s => format!("{} {s}", known_addr(k)),
                    Some(r) => format!("{} {s} ≠ {r}", known_addr(k)),
                    None => format!("{} {s} (missing)", known_addr(k)),
                })
                .collect::<Vec<_>>()
                .join(", "),
        );
        md.push_str("\n\n");
    }
    md.push_str(&format!(
        "**Amplification under sampling**: {THREADS} x {QUERIES_PER_THREAD} DNS queries (a name \
         each) from {DNS_CLIENTS} clients, each sent {TRIES} times in a row from new source \
         ports: the true factor is {TRIES}. Factor = attempts / flows summed over the flagged \
         sources; flagged = the clients with a finding.\n\n\
         | budget | kernel drops/s | shed | flagged sources | factor | factor / truth | same flagged sources as `--event-budget 0` |\n\
         |---|---|---|---|---|---|---|\n"
    ));
    for (label, pick) in [
        (
            "default",
            (|p: &(AmpSample, AmpSample)| &p.0) as fn(&(AmpSample, AmpSample)) -> &AmpSample,
        ),
        ("0 (every drop an event)", |p| &p.1),
    ] {
        let factor = |s: &AmpSample| s.attempts as f64 / s.flows.max(1) as f64;
        md.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} |\n",
            col(amps.iter().map(|p| pick(p).drops_per_s).collect(), 0),
            col(amps.iter().map(|p| pick(p).shed as f64).collect(), 0),
            col(
                amps.iter().map(|p| pick(p).flagged.len() as f64).collect(),
                0
            ),
            col(amps.iter().map(|p| factor(pick(p))).collect(), 3),
            col(
                amps.iter()
                    .map(|p| factor(pick(p)) / TRIES as f64)
                    .collect(),
                3
            ),
            amps.iter()
                .map(|p| if p.0.flagged == p.1.flagged {
                    "yes"
                } else {
                    "no"
                })
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_rates() {
        let s = known_schedule();
        assert_eq!(s.len(), 136);
        for k in 0..KNOWN {
            assert_eq!(s.iter().filter(|&&x| x == k).count(), k + 1);
        }
    }

    #[test]
    fn a_query_is_what_the_detector_calls_one() {
        let mut q = Vec::new();
        dns_query(&mut q, 7, "q0x1.bench.test");
        // id, flags RD, one question, then 1 'q0x1' 5 'bench' 4 'test' 0, A, IN.
        assert_eq!(&q[..6], &[0, 7, 1, 0, 0, 1]);
        assert_eq!(q[12], 4);
        assert_eq!(&q[13..17], b"q0x1");
        assert_eq!(&q[q.len() - 5..], &[0, 0, 1, 0, 1]);
        let mut buf = [0u8; 128];
        let n = datagram(
            &mut buf,
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(5, 6, 7, 8),
            9,
            &q,
        );
        assert_eq!(n, 28 + q.len());
        assert_eq!(buf[0], 0x45);
        assert_eq!(&buf[12..16], &[1, 2, 3, 4]);
        assert_eq!(u16::from_be_bytes([buf[22], buf[23]]), 53);
        assert_eq!(
            usize::from(u16::from_be_bytes([buf[24], buf[25]])),
            8 + q.len()
        );
    }
}
