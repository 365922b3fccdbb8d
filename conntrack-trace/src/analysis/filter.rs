//! Which events the user asked to see (`--netns`, `--proto`, `--port`, `--src`).

use std::net::IpAddr;

use crate::model::event::{Event, Proto};

/// An address prefix, e.g. `10.0.0.0/8` or `fd00::/64`; a bare address is a
/// /32 or /128.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid CIDR `{0}` (expected ADDR or ADDR/LEN, e.g. 10.0.0.0/8)")]
pub struct CidrError(pub String);

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().map_err(|_| err())?,
            None => max,
        };
        if len > max {
            return Err(err());
        }
        Ok(Cidr { addr, len })
    }
}

impl Cidr {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.len)
                };
                u32::from(net) & mask == u32::from(*ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.len)
                };
                u128::from(net) & mask == u128::from(*ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// All given conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub netns: Option<u32>,
    pub proto: Option<Proto>,
    /// Matches the source or destination port (port protocols only).
    pub port: Option<u16>,
    pub src: Option<Cidr>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        if self.netns.is_some_and(|n| n != e.netns) {
            return false;
        }
        if self.proto.is_some_and(|p| p != e.proto) {
            return false;
        }
        if let Some(port) = self.port
            && (!e.proto.has_ports() || (e.sport != port && e.dport != port))
        {
            return false;
        }
        if let Some(cidr) = &self.src {
            match &e.src {
                Some(ip) if cidr.contains(ip) => {}
                _ => return false,
            }
        }
        true
    }

    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }
}

/// A point in time given to `--since/--until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSpec {
    /// This long after the capture started (`90s`, `5m`).
    Offset(std::time::Duration),
    /// Wall clock, Unix nanoseconds (`@1700000000`, `2026-11-25T14:05:00Z`).
    Unix(u128),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Event, Kind};

    fn ev(src: &str, proto: Proto, sport: u16, dport: u16, netns: u32) -> Event {
        Event {
            kind: Kind::TableFull,
            ts_ns: 0,
            cpu: 0,
            netns,
            proto,
            src: Some(src.parse().unwrap()),
            dst: Some("10.0.0.53".parse().unwrap()),
            sport,
            dport,
            reply: None,
            packet: Default::default(),
            sample: 1,
        }
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().len, 8);
        assert_eq!("10.0.0.7".parse::<Cidr>().unwrap().len, 32);
        assert_eq!("fd00::/64".parse::<Cidr>().unwrap().len, 64);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("banana/3".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(&"10.1.255.3".parse().unwrap()));
        assert!(!c.contains(&"10.2.0.1".parse().unwrap()));
        assert!(!c.contains(&"::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&"192.0.2.1".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(&"fdff::1".parse().unwrap()));
    }

    #[test]
    fn filter_conditions_combine() {
        let e = ev("10.0.0.7", Proto::UDP, 40001, 53, 7);
        assert!(Filter::default().matches(&e));
        let f = Filter {
            proto: Some(Proto::UDP),
            port: Some(53),
            ..Default::default()
        };
        assert!(f.matches(&e));
        let f = Filter {
            port: Some(40001),
            ..Default::default()
        };
        assert!(f.matches(&e), "source port matches too");
        let f = Filter {
            proto: Some(Proto::TCP),
            ..Default::default()
        };
        assert!(!f.matches(&e));
        let f = Filter {
            netns: Some(8),
            ..Default::default()
        };
        assert!(!f.matches(&e));
        let f = Filter {
            src: Some("10.0.0.0/24".parse().unwrap()),
            ..Default::default()
        };
        assert!(f.matches(&e));
        let f = Filter {
            src: Some("10.0.1.0/24".parse().unwrap()),
            ..Default::default()
        };
        assert!(!f.matches(&e));
    }

    #[test]
    fn port_filter_ignores_icmp() {
        // ICMP type 0/code 53 must not look like "port 53".
        let e = ev("10.0.0.7", Proto::ICMP, 53, 53, 7);
        assert!(
            !Filter {
                port: Some(53),
                ..Default::default()
            }
            .matches(&e)
        );
    }
}
