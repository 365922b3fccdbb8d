//! Amplification detector throughput and memory (`cargo xtask bench amplify`
//! runs this in release mode).
//!
//! Three synthetic streams of 2 million drops each go through the real
//! `Detector`:
//! * `retries`: 20 000 clients, each flow sent 4 times 1 s apart (a flood of
//!   retrying DNS clients: the detector's busiest path, every lookup hits);
//! * `one-shots`: every drop a new flow from one of 1 million sources (the
//!   tables fill to their caps and stay there);
//! * `dns`: DNS queries with packet bytes, retried from new ports (question
//!   parsing on every event).
//!
//! Printed per stream: events/s, the resident-set growth while it ran, and
//! the configured memory ceiling.

use std::{net::Ipv4Addr, time::Instant};

use conntrack_trace::{
    analysis::amplify::{AmpConfig, Detector},
    model::clock::Clock,
    model::event::{Event, Kind, Packet, Proto},
};

const N: u64 = 2_000_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn udp(ts: u64, src: u32, sport: u16) -> Event {
    Event {
        kind: Kind::TableFull,
        ts_ns: ts,
        cpu: 0,
        netns: 1,
        proto: Proto::UDP,
        src: Some(Ipv4Addr::from(src).into()),
        dst: Some(Ipv4Addr::new(10, 0, 0, 53).into()),
        sport,
        dport: 53,
        reply: None,
        packet: Packet::EMPTY,
        sample: 1,
    }
}

fn dns(ts: u64, src: u32, sport: u16, q: u32) -> Event {
    let mut e = udp(ts, src, sport);
    let name = format!("q{q}.example.test");
    let mut d = (q as u16).to_be_bytes().to_vec();
    d.extend_from_slice(&[0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 0]);
    for l in name.split('.') {
        d.push(l.len() as u8);
        d.extend_from_slice(l.as_bytes());
    }
    d.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src.to_be_bytes());
    p.extend_from_slice(&[10, 0, 0, 53]);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&[0, 53, 0, 0, 0, 0]);
    p.extend_from_slice(&d);
    e.packet = Packet::new(&p, p.len() as u32);
    e
}

fn run(name: &str, events: impl Fn(u64) -> Event) {
    // Build the events first so the timing is the detector's alone.
    let evs: Vec<Event> = (0..N).map(&events).collect();
    let cfg = AmpConfig::default();
    let ceiling = cfg.memory_ceiling();
    let before = rss_kib();
    let mut d = Detector::new(cfg);
    let t = Instant::now();
    for e in &evs {
        d.record(e);
    }
    let findings = d.findings(&Clock::default()).len();
    let secs = t.elapsed().as_secs_f64();
    let grew = rss_kib().saturating_sub(before);
    let s = d.summary();
    println!(
        "{name:<10} {:>6.2} M events/s  rss +{:>6.1} MiB (ceiling {:.1} MiB)  \
         drops {} retransmissions {} forgotten {} untracked {} findings {findings}",
        N as f64 / secs / 1e6,
        grew as f64 / 1024.0,
        ceiling as f64 / 1048576.0,
        s.drops,
        s.retransmissions,
        s.flows_forgotten,
        s.untracked_drops,
    );
}

fn main() {
    const S: u64 = 1_000_000_000;
    // 20 000 clients × 25 flows × 4 tries, 1 s apart, interleaved in time.
    run("retries", |i| {
        let try_no = i % 4;
        let flow = i / 4;
        let client = (flow % 20_000) as u32;
        let ts = (flow / 20_000) * 4 * S + try_no * S + client as u64 * 1_000;
        udp(ts, 0x0a00_0000 | client, 1024 + (flow / 20_000) as u16)
    });
    run("one-shots", |i| {
        udp(
            i * 1_000,
            0x0a00_0000 | (i % 1_000_000) as u32,
            (i % 60_000) as u16,
        )
    });
    run("dns", |i| {
        let try_no = i % 3;
        let q = (i / 3) as u32;
        let client = q % 5_000;
        let ts = (i / 3) * 100_000 + try_no * S;
        dns(ts, 0x0a00_0000 | client, (i % 60_000) as u16, q)
    });
}
