//! Bounded traffic generators, run inside a namespace.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    sync::{Arc, Barrier},
};

use anyhow::{Context as _, Result, bail};

use crate::in_netns;

/// One datagram from each source port in `sports`, each from a fresh socket
/// (a new conntrack entry per datagram, no retries).
pub fn udp_oneshots(
    ns: &Path,
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    dport: u16,
    sports: std::ops::Range<u16>,
) -> Result<u64> {
    let (src, dst) = (src.into(), dst.into());
    in_netns(ns, || -> Result<u64> {
        let mut sent = 0;
        for sport in sports {
            let s = UdpSocket::bind(SocketAddr::new(src, sport))
                .with_context(|| format!("bind {src}:{sport}"))?;
            s.send_to(b"conntrack-trace test\0", SocketAddr::new(dst, dport))?;
            sent += 1;
        }
        Ok(sent)
    })?
}

/// `queries` DNS queries (`q<n>.<zone>`, type A) from `src` to `dst:53`,
/// each sent `tries` times in a row, every try from a fresh socket (a new
/// source port, a new DNS id) as dig and resolvers retry — the flows the
/// amplification detector keys on. Pinned to `cpu` so that every drop
/// happens on one CPU (a veth delivers in the sender's softirq). Returns
/// the datagrams sent.
pub fn dns_retries(
    ns: &Path,
    src: IpAddr,
    dst: IpAddr,
    zone: &str,
    queries: u32,
    tries: u32,
    cpu: usize,
) -> Result<u64> {
    in_netns(ns, || -> Result<u64> {
        pin_to_cpu(cpu)?;
        let mut sent = 0;
        for q in 0..queries {
            let name = format!("q{q}.{zone}");
            for t in 0..tries {
                let s = UdpSocket::bind(SocketAddr::new(src, 0))
                    .with_context(|| format!("bind {src}:0"))?;
                let id = (q.wrapping_mul(tries) + t) as u16;
                s.send_to(&crate::dns::query(id, &name), SocketAddr::new(dst, 53))?;
                sent += 1;
            }
        }
        Ok(sent)
    })?
}

/// [`udp_oneshots`] at `rate` datagrams per second (a flood that lasts),
/// `payload(sport)` as each datagram's bytes; stops early once `stop` is
/// set.
#[allow(clippy::too_many_arguments, reason = "a flood's whole shape")]
pub fn udp_paced(
    ns: &Path,
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    dport: u16,
    sports: std::ops::Range<u16>,
    rate: f64,
    payload: impl Fn(u16) -> Vec<u8> + Send,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<u64> {
    let (src, dst) = (src.into(), dst.into());
    in_netns(ns, move || -> Result<u64> {
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        for sport in sports {
            if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
                break;
            }
            let due = start + std::time::Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            let s = UdpSocket::bind(SocketAddr::new(src, sport))
                .with_context(|| format!("bind {src}:{sport}"))?;
            s.send_to(&payload(sport), SocketAddr::new(dst, dport))?;
            sent += 1;
        }
        Ok(sent)
    })?
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 TCP SYN with valid checksums.
pub fn syn_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    tcp_packet(src, dst, sport, dport, TCP_SYN)
}

/// TCP flag bits (byte 13 of the header).
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// An IPv4 TCP segment with `flags` and valid checksums, no payload.
pub fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    if flags & TCP_ACK != 0 {
        tcp[8..12].copy_from_slice(&2000u32.to_be_bytes());
    }
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    let c = checksum(&pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pkt = ip.to_vec();
    pkt.extend_from_slice(&tcp);
    pkt
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

fn raw_send(fd: i32, pkt: &[u8], dst: Ipv4Addr) -> Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid buffer and sockaddr for the duration of the call.
    let rc = unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc < 0 {
        bail!("sendto: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One TCP segment with `flags` from each source port in `sports`, sent
/// through a raw socket (no handshake, no connection: an ACK-only segment
/// belongs to no connection the receiver knows).
pub fn tcp_oneshots(
    ns: &Path,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    sports: std::ops::Range<u16>,
    flags: u8,
) -> Result<u64> {
    in_netns(ns, || -> Result<u64> {
        // SAFETY: plain socket(2) call; fd closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        let mut r = Ok(0);
        for p in sports {
            if let Err(e) = raw_send(fd, &tcp_packet(src, dst, p, dport, flags), dst) {
                r = Err(e);
                break;
            }
            r = r.map(|n| n + 1);
        }
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        r
    })?
}

/// For every source port, sends the *same* SYN from two threads pinned to
/// CPUs 0 and 1, released together by a barrier: the receiving namespace
/// processes both on different CPUs, and when both create an entry before
/// either confirms, the loser fails to insert (`insert_failed`).
pub fn syn_race(
    ns: &Path,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    sports: std::ops::Range<u16>,
) -> Result<()> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cpus < 2 {
        bail!("the insert_failed race needs 2 CPUs, this machine has {cpus}");
    }
    let barrier = Arc::new(Barrier::new(2));
    let packets: Arc<Vec<Vec<u8>>> =
        Arc::new(sports.map(|p| syn_packet(src, dst, p, dport)).collect());
    let mut handles = Vec::new();
    for cpu in 0..2 {
        let (barrier, packets, ns) = (barrier.clone(), packets.clone(), ns.to_owned());
        handles.push(std::thread::spawn(move || -> Result<()> {
            in_netns(&ns, || -> Result<()> {
                pin_to_cpu(cpu)?;
                // SAFETY: plain socket(2) call; fd closed below.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
                if fd < 0 {
                    bail!("raw socket: {}", std::io::Error::last_os_error());
                }
                let mut r = Ok(());
                for p in packets.iter() {
                    barrier.wait();
                    if let Err(e) = raw_send(fd, p, dst) {
                        r = Err(e);
                    }
                }
                // SAFETY: closing our own fd.
                unsafe { libc::close(fd) };
                r
            })?
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("race thread panicked"))??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_checksums_verify() {
        let p = syn_packet(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 1),
            40000,
            80,
        );
        assert_eq!(p.len(), 40);
        assert_eq!(checksum(&p[..20]), 0, "IP header checksum");
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(checksum(&pseudo), 0, "TCP checksum");
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 40000);
    }
}
