//! A real DNS server for the scenario tests: dnsmasq in the server
//! namespace, answering `*.example.test`, and DNS queries in wire format.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

use crate::{Daemon, Topology, spawn_in, wait_bounded};

/// The address dnsmasq answers for every name under example.test.
pub const ANSWER: &str = "192.0.2.53";

/// Starts dnsmasq on the server's address and waits (bounded) until it
/// answers a query over TCP (an assured entry, so it cannot be evicted to
/// let a later query through a full table).
pub fn start_dnsmasq(topo: &Topology) -> Result<Daemon> {
    let server = topo.server_ip.to_string();
    let d = Daemon(
        spawn_in(
            &topo.server,
            &[
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={server}"),
                &format!("--address=/example.test/{ANSWER}"),
                "--pid-file=",
                "--user=root",
            ],
        )
        .context("dnsmasq (Debian package dnsmasq-base) is needed")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let o = wait_bounded(
            spawn_in(
                &topo.client,
                &[
                    "dig",
                    &format!("@{server}"),
                    "+tcp",
                    "+short",
                    "+tries=1",
                    "+timeout=1",
                    "probe.example.test",
                ],
            )?,
            Instant::now() + Duration::from_secs(5),
        )?;
        let a = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        if a == ANSWER || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(answer == ANSWER, "dnsmasq did not answer: {answer:?}");
    Ok(d)
}

/// A standard query (RD set) for `name`, type A, class IN.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(17 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_wire_format() {
        let q = super::query(0x1234, "q1.example.test");
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..16], &[2, b'q', b'1', 7]);
        assert_eq!(&q[q.len() - 5..], &[0, 0, 1, 0, 1]);
    }
}
