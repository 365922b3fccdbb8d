//! Which entries hold the table: conntrack's own table, read over
//! ctnetlink (an `IPCTNL_MSG_CT_GET` dump, netlink-packet-netfilter), or
//! from /proc/net/nf_conntrack where the kernel has it
//! (CONFIG_NF_CONNTRACK_PROCFS), grouped by protocol, original destination
//! port and state.

use std::{collections::HashMap, os::fd::AsRawFd, time::Duration};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, ProtoInfo, ProtoInfoTCP, ProtoTuple, Status, Tuple,
    },
};
use serde::Serialize;

use crate::model::event::Proto;

/// One entry, reduced to what the breakdown groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub proto: u8,
    /// Original direction's destination port; ICMP: the type; else 0.
    pub dport: u16,
    pub replied: bool,
    pub assured: bool,
    /// conntrack's TCP state (enum tcp_conntrack), for TCP.
    pub tcp_state: Option<u8>,
}

/// Names of enum tcp_conntrack (include/uapi/linux/netfilter/nf_conntrack_tcp.h).
pub fn tcp_state_name(s: u8) -> &'static str {
    match s {
        0 => "NONE",
        1 => "SYN_SENT",
        2 => "SYN_RECV",
        3 => "ESTABLISHED",
        4 => "FIN_WAIT",
        5 => "CLOSE_WAIT",
        6 => "LAST_ACK",
        7 => "TIME_WAIT",
        8 => "CLOSE",
        9 => "SYN_SENT2",
        _ => "?",
    }
}

impl Entry {
    /// The state it is grouped by: TCP's state, else unreplied / replied
    /// (a reply seen, not assured) / assured.
    pub fn state(&self) -> String {
        match self.tcp_state {
            Some(s) => tcp_state_name(s).to_owned(),
            None if !self.replied => "unreplied".into(),
            None if !self.assured => "replied".into(),
            None => "assured".into(),
        }
    }
}

/// Entries of one (protocol, port, state).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Group {
    pub proto: String,
    /// Original destination port (ICMP: type); absent for other protocols.
    pub port: Option<u16>,
    pub state: String,
    pub count: u64,
    /// Of all entries read.
    pub share: f64,
}

/// The breakdown of one namespace's table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Holders {
    /// `netlink` or `/proc/net/nf_conntrack`.
    pub source: String,
    pub total: u64,
    /// Largest first, at most [`MAX_GROUPS`].
    pub groups: Vec<Group>,
    /// `81 % are UDP entries to port 53 that never got a reply`.
    pub summary: String,
    /// UDP entries, and those without an assured stream, as shares of all.
    pub udp_share: f64,
    pub udp_unassured_share: f64,
}

/// Groups listed (the rest are summed in `total` only).
pub const MAX_GROUPS: usize = 12;

/// Distinct groups tracked while reading (a table of 65536 ports × states
/// stays well under it; beyond, new groups are not split out).
const GROUP_CAP: usize = 100_000;

#[derive(Default)]
pub struct Tally {
    groups: HashMap<(u8, u16, String), u64>,
    total: u64,
    udp: u64,
    udp_unassured: u64,
}

impl Tally {
    pub fn add(&mut self, e: &Entry) {
        self.total += 1;
        if e.proto == Proto::UDP.0 {
            self.udp += 1;
            if !e.assured {
                self.udp_unassured += 1;
            }
        }
        let key = (e.proto, e.dport, e.state());
        let len = self.groups.len();
        if let Some(n) = self.groups.get_mut(&key) {
            *n += 1;
        } else if len < GROUP_CAP {
            self.groups.insert(key, 1);
        }
    }

    pub fn finish(self, source: &str) -> Holders {
        let total = self.total;
        let share = |n: u64| {
            if total == 0 {
                0.0
            } else {
                n as f64 / total as f64
            }
        };
        let mut v: Vec<((u8, u16, String), u64)> = self.groups.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(MAX_GROUPS);
        let groups: Vec<Group> = v
            .into_iter()
            .map(|((p, port, state), count)| {
                let proto = Proto(p);
                Group {
                    proto: proto.to_string(),
                    port: (proto.has_ports() || proto.is_icmp()).then_some(port),
                    state,
                    count,
                    share: share(count),
                }
            })
            .collect();
        let summary = match groups.first() {
            None => "the table is empty".into(),
            Some(g) => describe(g),
        };
        Holders {
            source: source.into(),
            total,
            groups,
            summary,
            udp_share: share(self.udp),
            udp_unassured_share: share(self.udp_unassured),
        }
    }
}

/// `81 % are UDP entries to port 53 that never got a reply`.
pub fn describe(g: &Group) -> String {
    let what = match &g.port {
        Some(p) if g.proto.starts_with("icmp") => {
            format!("{} entries of type {p}", g.proto.to_uppercase())
        }
        Some(p) => format!("{} entries to port {p}", g.proto.to_uppercase()),
        None => format!("{} entries", g.proto.to_uppercase()),
    };
    let state = match g.state.as_str() {
        "unreplied" => "that never got a reply".to_owned(),
        "replied" => "that got a reply but are not assured".to_owned(),
        "assured" => "assured (traffic seen both ways)".to_owned(),
        s => format!("in state {s}"),
    };
    format!("{:.0} % are {what} {state}", g.share * 100.0)
}

/// Parses one line of /proc/net/nf_conntrack
/// (ct_seq_show(), nf_conntrack_standalone.c):
/// `ipv4 2 udp 17 29 src=.. dst=.. sport=.. dport=53 [UNREPLIED] src=.. ...`
/// or `ipv4 2 tcp 6 431999 ESTABLISHED src=.. ... [ASSURED] ...`.
pub fn parse_proc_line(line: &str) -> Option<Entry> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let proto: u8 = f.get(3)?.parse().ok()?;
    let mut dport = None;
    let mut icmp_type = None;
    let mut replied = true;
    let mut assured = false;
    for w in &f[5..] {
        if let Some(v) = w.strip_prefix("dport=") {
            dport = dport.or(v.parse().ok());
        } else if let Some(v) = w.strip_prefix("type=") {
            icmp_type = icmp_type.or(v.parse().ok());
        } else if *w == "[UNREPLIED]" {
            replied = false;
        } else if *w == "[ASSURED]" {
            assured = true;
        }
    }
    let tcp_state = if proto == Proto::TCP.0 {
        let name = *f.get(5)?;
        (0..=9u8).find(|s| tcp_state_name(*s) == name)
    } else {
        None
    };
    Some(Entry {
        proto,
        dport: dport.or(icmp_type).unwrap_or(0),
        replied,
        assured,
        tcp_state,
    })
}

/// Reads /proc/thread-self/net/nf_conntrack (the calling thread's netns).
pub fn read_proc() -> std::io::Result<Holders> {
    let text = std::fs::read_to_string("/proc/thread-self/net/nf_conntrack")?;
    let mut t = Tally::default();
    for e in text.lines().filter_map(parse_proc_line) {
        t.add(&e);
    }
    Ok(t.finish("/proc/net/nf_conntrack"))
}

/// The entry a ctnetlink message describes.
pub fn entry_of(attrs: &[ConntrackAttribute]) -> Option<Entry> {
    let mut e = Entry {
        proto: 0,
        dport: 0,
        replied: false,
        assured: false,
        tcp_state: None,
    };
    let mut have_tuple = false;
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(tuple) => {
                have_tuple = true;
                for t in tuple {
                    let Tuple::Proto(pt) = t else { continue };
                    for p in pt {
                        match p {
                            ProtoTuple::Protocol(p) => e.proto = u8::from(*p),
                            ProtoTuple::DestinationPort(d) => e.dport = *d,
                            // CTA_PROTO_ICMP_TYPE / CTA_PROTO_ICMPV6_TYPE.
                            ProtoTuple::Other(nla) => {
                                use netlink_packet_core::Nla;
                                let mut b = [0u8; 1];
                                if matches!(nla.kind(), 5 | 8) && nla.value_len() == 1 {
                                    nla.emit_value(&mut b);
                                    e.dport = u16::from(b[0]);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            ConntrackAttribute::CtaStatus(s) => {
                e.replied = s.contains(Status::SeenReply);
                e.assured = s.contains(Status::Assured);
            }
            ConntrackAttribute::CtaProtoInfo(info) => {
                for i in info {
                    if let ProtoInfo::TCP(tcp) = i {
                        for t in tcp {
                            if let ProtoInfoTCP::State(s) = t {
                                e.tcp_state = Some(*s);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    have_tuple.then_some(e)
}

/// Dumps the calling thread's netns's table over ctnetlink.
pub fn read_netlink() -> std::io::Result<Holders> {
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt on an open fd with a valid timeval.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
    // AF_UNSPEC: IPv4 and IPv6 entries alike.
    let mut req = NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            ConntrackMessage::Get(vec![]),
        )),
    );
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut t = Tally::default();
    let mut rx = vec![0u8; 1 << 16];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        let mut off = 0;
        while off < n.min(rx.len()) {
            let msg = <NetlinkMessage<NetfilterMessage>>::deserialize(&rx[off..n.min(rx.len())])
                .map_err(|e| std::io::Error::other(format!("ctnetlink: {e}")))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(t.finish("netlink")),
                NetlinkPayload::Error(e) => {
                    let code = e.code.map_or(0, |c| -c.get());
                    return Err(std::io::Error::from_raw_os_error(code));
                }
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attrs)),
                    ..
                }) => {
                    if let Some(e) = entry_of(&attrs) {
                        t.add(&e);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += nl_align(len);
        }
        if std::time::Instant::now() > deadline {
            return Err(std::io::Error::other("ctnetlink dump took over 60 s"));
        }
    }
}

fn nl_align(len: usize) -> usize {
    (len + 3) & !3
}

/// ctnetlink, else /proc/net/nf_conntrack; `Err` says why neither worked.
pub fn read() -> Result<Holders, String> {
    match read_netlink() {
        Ok(h) => Ok(h),
        Err(nl) => read_proc().map_err(|p| {
            format!(
                "ctnetlink: {nl} (is nf_conntrack_netlink available?); /proc/net/nf_conntrack: {p}"
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_netfilter::conntrack::Protocol;

    #[test]
    fn proc_lines() {
        let udp = "ipv4     2 udp      17 28 src=10.77.40.2 dst=10.77.40.1 sport=40001 dport=53 [UNREPLIED] src=10.77.40.1 dst=10.77.40.2 sport=53 dport=40001 mark=0 zone=0 use=2";
        assert_eq!(
            parse_proc_line(udp),
            Some(Entry {
                proto: 17,
                dport: 53,
                replied: false,
                assured: false,
                tcp_state: None
            })
        );
        let tcp = "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.2 dst=10.0.0.1 sport=5000 dport=9 src=10.0.0.1 dst=10.0.0.2 sport=9 dport=5000 [ASSURED] mark=0 zone=0 use=2";
        let e = parse_proc_line(tcp).unwrap();
        assert_eq!(
            (e.proto, e.dport, e.state().as_str()),
            (6, 9, "ESTABLISHED")
        );
        let icmp = "ipv4     2 icmp     1 29 src=10.0.0.2 dst=10.0.0.1 type=8 code=0 id=7 src=10.0.0.1 dst=10.0.0.2 type=0 code=0 id=7 mark=0 zone=0 use=2";
        let e = parse_proc_line(icmp).unwrap();
        assert_eq!((e.proto, e.dport, e.state().as_str()), (1, 8, "replied"));
        assert_eq!(parse_proc_line("garbage"), None);
        assert_eq!(parse_proc_line(""), None);
    }

    #[test]
    fn breakdown_names_the_biggest_group() {
        let mut t = Tally::default();
        let unreplied = Entry {
            proto: 17,
            dport: 53,
            replied: false,
            assured: false,
            tcp_state: None,
        };
        for _ in 0..81 {
            t.add(&unreplied);
        }
        for _ in 0..19 {
            t.add(&Entry {
                proto: 6,
                dport: 443,
                replied: true,
                assured: true,
                tcp_state: Some(3),
            });
        }
        let h = t.finish("netlink");
        assert_eq!(h.total, 100);
        assert_eq!(
            h.summary,
            "81 % are UDP entries to port 53 that never got a reply"
        );
        assert_eq!(h.groups[1].state, "ESTABLISHED");
        assert_eq!(
            describe(&h.groups[1]),
            "19 % are TCP entries to port 443 in state ESTABLISHED"
        );
        assert!((h.udp_share - 0.81).abs() < 1e-9 && (h.udp_unassured_share - 0.81).abs() < 1e-9);
        assert_eq!(Tally::default().finish("x").summary, "the table is empty");
    }

    #[test]
    fn netlink_attributes_to_entry() {
        let attrs = vec![
            ConntrackAttribute::CtaTupleOrig(vec![Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Udp),
                ProtoTuple::SourcePort(40001),
                ProtoTuple::DestinationPort(53),
            ])]),
            ConntrackAttribute::CtaTupleReply(vec![Tuple::Proto(vec![
                ProtoTuple::Protocol(Protocol::Udp),
                ProtoTuple::SourcePort(53),
                ProtoTuple::DestinationPort(40001),
            ])]),
            ConntrackAttribute::CtaStatus(Status::Confirmed | Status::SeenReply),
        ];
        let e = entry_of(&attrs).unwrap();
        assert_eq!((e.proto, e.dport, e.state().as_str()), (17, 53, "replied"));
        assert_eq!(entry_of(&[]), None);
    }
}
