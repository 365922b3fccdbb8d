//! What to change, with the exact commands: pure selection from what the
//! diagnosis observed (no I/O), so every rule is unit-tested.
//!
//! * `notrack`: one UDP service takes most of a namespace's drops (or its
//!   unreplied entries most of the table) — exempt it from conntrack with a
//!   `notrack` rule in raw-priority chains (before conntrack, priority -300);
//! * `raise_max`: the table is full or getting there — a power-of-two
//!   `nf_conntrack_max` that clears the estimated demand with headroom, one
//!   bucket per entry, within the memory budget ([`super::memory`]);
//! * `udp_timeouts`: unassured UDP entries hold most of the table — they
//!   live `nf_conntrack_udp_timeout` (30 s) although a DNS exchange takes
//!   milliseconds.
//!
//! `nf_conntrack_max` and `nf_conntrack_buckets` are global and writable
//! only from the init namespace (nf_conntrack_standalone.c makes them 0444
//! elsewhere); the UDP timeouts and nftables rules are per namespace, so
//! their commands run inside it (`ip netns exec NAME` for a named one).

use crate::model::KindCounts;
use serde::Serialize;

use super::{
    memory::{self, EntryCost},
    table::Holders,
};
use crate::analysis::forecast::Forecast;

/// Where a namespace's commands run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// The init namespace: commands as they are.
    Init,
    /// `ip netns exec NAME ...`.
    Named(String),
    /// `nsenter --net=PATH ...` (a namespace only a process holds).
    Path(String),
}

impl Place {
    pub fn prefix(&self) -> String {
        match self {
            Place::Init => String::new(),
            Place::Named(n) => format!("ip netns exec {} ", shell_word(n)),
            Place::Path(p) => format!("nsenter --net={} ", shell_word(p)),
        }
    }
}

/// Quotes `s` for sh when it needs it.
pub fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A dropped service in a namespace, most drops first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Victim {
    pub service: String,
    pub proto: String,
    pub port: u16,
    /// Failures (table_full + insert_failed + early_drop) of this service.
    pub drops: u64,
    /// Distinct sources seen for it.
    pub sources: u64,
    /// The top source address.
    pub top_src: Option<String>,
}

/// What advice is selected from, per namespace.
#[derive(Clone, Debug)]
pub struct NsFacts<'a> {
    pub name: &'a str,
    pub place: Place,
    pub entries: u64,
    pub max: u64,
    pub buckets: u64,
    /// Highest count seen.
    pub peak: u64,
    pub duration_s: f64,
    /// Failures in the window, per kind.
    pub drops: KindCounts,
    pub victims: &'a [Victim],
    pub holders: Option<&'a Holders>,
    pub forecast: Option<&'a Forecast>,
    /// nf_conntrack_udp_timeout in this namespace.
    pub udp_timeout: Option<u64>,
    /// nf_conntrack_tcp_timeout_syn_sent in this namespace.
    pub tcp_syn_sent_timeout: Option<u64>,
    /// At risk or dropping (advice is only given for those).
    pub troubled: bool,
}

/// Settings of the selection.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// The forecast horizon that counts as at risk (seconds): a filling
    /// table is sized for its growth over this long.
    pub horizon_s: f64,
    pub ram: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Persist {
    pub file: String,
    pub content: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Advice {
    /// `notrack`, `raise_max` or `udp_timeouts`.
    pub id: String,
    /// 1 = do this first.
    pub rank: usize,
    /// The namespace whose commands these are (`raise_max`: global).
    pub netns: String,
    pub title: String,
    pub why: String,
    pub cost: String,
    pub risk: String,
    /// Exactly what to run, in order, as root.
    pub commands: Vec<String>,
    /// How to keep it across reboots.
    pub persist: Vec<Persist>,
    /// The proposed table (raise_max).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sizing: Option<memory::Sizing>,
}

/// UDP services whose servers keep no per-client state: conntrack buys
/// them nothing but a table entry per query.
const STATELESS_UDP: [(u16, &str); 5] = [
    (53, "DNS"),
    (123, "NTP"),
    (161, "SNMP"),
    (514, "syslog"),
    (69, "TFTP (requests)"),
];

/// Share of a namespace's drops from one service that makes it "the"
/// victim.
const DOMINANT: f64 = 0.5;

/// Proposed nf_conntrack_udp_timeout (seconds).
pub const SHORT_UDP_TIMEOUT: u64 = 10;

/// Selects and ranks the advice.
pub fn select(facts: &[NsFacts<'_>], cost: &EntryCost, s: &Settings) -> Vec<Advice> {
    let mut out: Vec<(u32, Advice)> = Vec::new();
    for f in facts.iter().filter(|f| f.troubled) {
        if let Some(a) = notrack(f) {
            out.push(a);
        }
    }
    if let Some(a) = raise_max(facts, cost, s) {
        out.push(a);
    }
    for f in facts.iter().filter(|f| f.troubled) {
        if let Some(a) = udp_timeouts(f) {
            out.push(a);
        }
    }
    out.sort_by_key(|(score, _)| std::cmp::Reverse(*score));
    out.into_iter()
        .enumerate()
        .map(|(i, (_, mut a))| {
            a.rank = i + 1;
            a
        })
        .collect()
}

fn failures(d: &KindCounts) -> u64 {
    d.table_full + d.insert_failed + d.early_drop
}

/// The UDP port that dominates the namespace's drops, or failing that its
/// unassured entries: (port, evidence).
fn dominant_udp(f: &NsFacts<'_>) -> Option<(u16, String)> {
    // Events and counters cover nearly the same window; never claim more
    // than 100 %.
    let total = failures(&f.drops).max(f.victims.iter().map(|v| v.drops).sum());
    if let Some(v) = f.victims.first()
        && v.proto == "udp"
        && total > 0
        && v.drops as f64 >= DOMINANT * total as f64
    {
        return Some((
            v.port,
            format!(
                "{} of the {} failures in {} ({:.0} %) were udp/{} packets{}",
                v.drops,
                total,
                f.name,
                v.drops as f64 * 100.0 / total as f64,
                v.port,
                v.top_src
                    .as_ref()
                    .map(|s| format!(" (top source {s}, {} sources)", v.sources))
                    .unwrap_or_default()
            ),
        ));
    }
    let h = f.holders?;
    let g = h.groups.first()?;
    (g.proto == "udp" && g.state != "assured" && g.share >= DOMINANT).then(|| {
        (
            g.port.unwrap_or(0),
            format!("in {}: {}", f.name, super::table::describe(g)),
        )
    })
}

/// The nftables commands that exempt udp/`port` from conntrack in `f`'s
/// namespace, and the ruleset file that keeps them.
fn notrack_steps(f: &NsFacts<'_>, port: u16) -> (Vec<String>, Vec<Persist>) {
    let p = f.place.prefix();
    let t = "conntrack_trace";
    let commands = vec![
        format!("{p}nft add table inet {t}"),
        format!(
            "{p}nft 'add chain inet {t} notrack_in {{ type filter hook prerouting priority raw; policy accept; }}'"
        ),
        format!("{p}nft add rule inet {t} notrack_in udp dport {port} notrack"),
        format!(
            "{p}nft 'add chain inet {t} notrack_out {{ type filter hook output priority raw; policy accept; }}'"
        ),
        format!("{p}nft add rule inet {t} notrack_out udp sport {port} notrack"),
    ];
    let ruleset = format!(
        "table inet {t} {{\n\tchain notrack_in {{\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\tudp dport {port} notrack\n\t}}\n\tchain notrack_out {{\n\t\ttype filter hook output priority raw; policy accept;\n\t\tudp sport {port} notrack\n\t}}\n}}\n"
    );
    let persist = match &f.place {
        Place::Init => vec![Persist {
            file: format!(
                "/etc/nftables.d/{t}-notrack-udp-{port}.nft (include it from /etc/nftables.conf)"
            ),
            content: ruleset,
        }],
        _ => vec![Persist {
            file: format!(
                "{t}-notrack-udp-{port}.nft, loaded with `{p}nft -f FILE` wherever {} is created",
                f.name
            ),
            content: ruleset,
        }],
    };
    (commands, persist)
}

fn notrack(f: &NsFacts<'_>) -> Option<(u32, Advice)> {
    let (port, evidence) = dominant_udp(f)?;
    if port == 0 {
        return None;
    }
    let known = STATELESS_UDP
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, n)| *n);
    let p = f.place.prefix();
    let (commands, persist) = notrack_steps(f, port);
    let service = known.map_or_else(|| format!("udp/{port}"), |n| format!("{n} (udp/{port})"));
    let why = format!(
        "{evidence}. {service} {}: untracked, its queries and answers need no entry, so they can neither fill the table nor be dropped by it.",
        if known.is_some() {
            "is a stateless request/response service"
        } else {
            "looks like the load; if its server keeps no per-flow state"
        }
    );
    Some((
        if known.is_some() { 300 } else { 150 },
        Advice {
            id: "notrack".into(),
            rank: 0,
            netns: f.name.into(),
            title: format!(
                "exempt {service} from conntrack in {} (nftables notrack)",
                f.name
            ),
            why,
            cost: format!(
                "udp/{port} is no longer tracked in {}: no NAT for it, no conntrack accounting or events; `ct state` sees it as `untracked`, so a ruleset that accepts replies with `ct state established,related` must accept `udp dport {port}` / `udp sport {port}` (or `ct state untracked`) explicitly. Two raw-priority rule lookups per packet (negligible).",
                f.name
            ),
            risk: format!(
                "Breaks udp/{port} if it is NATed (DNAT to a backend, masquerade) or a stateful firewall relies on ct state for it; check `{p}nft list ruleset` first. Entries already in the table stay until they time out."
            ),
            commands,
            persist,
            sizing: None,
        },
    ))
}

/// Entries the namespace would hold if nothing were refused: the peak, plus
/// what was refused or evicted kept for the victims' timeout, plus a
/// filling table's growth over the horizon.
fn demand(f: &NsFacts<'_>, horizon_s: f64) -> (f64, String) {
    let refused = f.drops.table_full + f.drops.early_drop;
    let lifetime = match f.victims.first().map(|v| v.proto.as_str()) {
        Some("tcp") => f.tcp_syn_sent_timeout.unwrap_or(120),
        _ => f.udp_timeout.unwrap_or(30),
    };
    let rate = if f.duration_s > 0.0 {
        refused as f64 / f.duration_s
    } else {
        0.0
    };
    let growth = f
        .forecast
        .filter(|fc| fc.trend == crate::analysis::forecast::Trend::Filling)
        .map_or(0.0, |fc| fc.slope_per_s.max(0.0) * horizon_s);
    let peak = f.peak.max(f.entries) as f64;
    let d = peak + rate * lifetime as f64 + growth;
    let mut why = format!("peak {} entries", f.peak.max(f.entries));
    if refused > 0 {
        why.push_str(&format!(
            " + {rate:.0}/s refused or evicted × {lifetime} s timeout"
        ));
    }
    if growth > 0.0 {
        why.push_str(&format!(" + {growth:.0} growth over {horizon_s:.0} s"));
    }
    (d, why)
}

/// The commands that apply `sizing` (buckets first, so the larger table
/// never runs on longer chains) and the files that keep it.
fn sysctl_steps(worst: &NsFacts<'_>, sizing: &memory::Sizing) -> (Vec<String>, Vec<Persist>) {
    let mut commands = Vec::new();
    let mut persist_sysctl = format!("net.netfilter.nf_conntrack_max = {}\n", sizing.max);
    let mut persist = Vec::new();
    if sizing.buckets > worst.buckets {
        commands.push(format!(
            "sysctl -w net.netfilter.nf_conntrack_buckets={}",
            sizing.buckets
        ));
        persist_sysctl.push_str(&format!(
            "net.netfilter.nf_conntrack_buckets = {}\n",
            sizing.buckets
        ));
        persist.push(Persist {
            file: "/etc/modprobe.d/nf_conntrack.conf (built-in conntrack: kernel command line nf_conntrack.hashsize=N)".into(),
            content: format!("options nf_conntrack hashsize={}\n", sizing.buckets),
        });
    }
    commands.push(format!(
        "sysctl -w net.netfilter.nf_conntrack_max={}",
        sizing.max
    ));
    persist.insert(
        0,
        Persist {
            file: "/etc/sysctl.d/90-conntrack.conf".into(),
            content: persist_sysctl,
        },
    );
    (commands, persist)
}

/// Raising the max is what the table needs, but not what memory allows.
fn does_not_fit(why: String) -> Advice {
    Advice {
        id: "raise_max".into(),
        rank: 0,
        netns: "all (global)".into(),
        title: "raising nf_conntrack_max does not fit in memory".into(),
        why,
        cost: String::new(),
        risk: "shed the load instead (notrack, shorter timeouts)".into(),
        commands: Vec::new(),
        persist: Vec::new(),
        sizing: None,
    }
}

/// The namespace that needs the biggest table, and how big: only a full
/// or filling table calls for a bigger one (an insert clash does not).
fn neediest<'f, 'a>(
    facts: &'f [NsFacts<'a>],
    horizon_s: f64,
) -> Option<(&'f NsFacts<'a>, (f64, String))> {
    facts
        .iter()
        .filter(|f| {
            f.troubled
                && (f.drops.table_full > 0
                    || f.drops.early_drop > 0
                    || (f.max > 0 && f.entries.max(f.peak) as f64 >= 0.5 * f.max as f64))
        })
        .map(|f| (f, demand(f, horizon_s)))
        .max_by(|a, b| a.1.0.total_cmp(&b.1.0))
}

fn raise_max(facts: &[NsFacts<'_>], cost: &EntryCost, s: &Settings) -> Option<(u32, Advice)> {
    let (worst, (d, dwhy)) = neediest(facts, s.horizon_s)?;
    let sizing = match memory::propose(worst.max, worst.buckets, d, cost, s.ram) {
        Ok(z) => z,
        Err(why) => {
            let why = format!("{} needs ~{d:.0} entries ({dwhy}), but {why}", worst.name);
            return Some((100, does_not_fit(why)));
        }
    };
    let (commands, persist) = sysctl_steps(worst, &sizing);
    let cur = cost.table_bytes(worst.max, worst.buckets);
    let buckets_note = if sizing.buckets > worst.buckets {
        format!("{} buckets (one per entry)", sizing.buckets)
    } else {
        format!("buckets stay {} (already ≥ one per entry)", worst.buckets)
    };
    Some((
        200,
        Advice {
            id: "raise_max".into(),
            rank: 0,
            netns: "all (global; set from the init namespace)".into(),
            title: format!(
                "raise nf_conntrack_max {} → {}",
                worst.max, sizing.max
            ),
            why: format!(
                "{} is at {} / {} entries and needs ~{d:.0} ({dwhy}); {} is the power of two ≥ {:.1} × that{}; {buckets_note}.",
                worst.name,
                worst.entries,
                worst.max,
                sizing.max,
                memory::HEADROOM,
                if sizing.capped { ", capped by the memory budget — it will not clear the demand" } else { "" },
            ),
            cost: format!(
                "{} of kernel memory at a full table ({} × {} B per entry + {} × {} B buckets), {:.2} % of RAM; today's limit costs {}. Entries are allocated as used; the bucket array at once.",
                memory::fmt_bytes(sizing.bytes),
                sizing.max,
                cost.object_bytes + cost.extension_bytes,
                sizing.buckets,
                cost.bucket_bytes,
                sizing.ram_share * 100.0,
                memory::fmt_bytes(cur),
            ),
            risk: "Low. A bigger table hides rather than fixes a flood: if the load keeps growing it fills again; every namespace may use up to the new max. Resizing buckets rehashes the table once (brief stall).".into(),
            commands,
            persist,
            sizing: Some(sizing),
        },
    ))
}

/// Why `f`'s UDP entries look like they outlive their use: the table's
/// unassured UDP share, or (without the table) the failures' share.
fn udp_evidence(f: &NsFacts<'_>) -> Option<String> {
    match f.holders {
        Some(h) if h.udp_unassured_share >= DOMINANT => Some(format!(
            "{:.0} % of {}'s entries are UDP without an assured stream ({})",
            h.udp_unassured_share * 100.0,
            f.name,
            h.summary
        )),
        Some(_) => None,
        None => {
            // Without the table itself, the drops are the only evidence.
            let v = f.victims.first()?;
            let total = failures(&f.drops);
            if v.proto != "udp" || total == 0 || (v.drops as f64) < DOMINANT * total as f64 {
                return None;
            }
            Some(format!(
                "{} of {}'s failures are udp/{} (the table itself could not be read)",
                v.drops, f.name, v.port
            ))
        }
    }
}

fn udp_timeouts(f: &NsFacts<'_>) -> Option<(u32, Advice)> {
    let cur = f.udp_timeout?;
    if cur <= SHORT_UDP_TIMEOUT {
        return None;
    }
    let evidence = udp_evidence(f)?;
    let p = f.place.prefix();
    Some((
        100,
        Advice {
            id: "udp_timeouts".into(),
            rank: 0,
            netns: f.name.into(),
            title: format!(
                "shorten nf_conntrack_udp_timeout {cur} s → {SHORT_UDP_TIMEOUT} s in {}",
                f.name
            ),
            why: format!(
                "{evidence}. Such an entry lives nf_conntrack_udp_timeout = {cur} s after its last packet, although a request/response exchange takes milliseconds: at {SHORT_UDP_TIMEOUT} s the same traffic holds ~{:.0} × fewer entries.",
                cur as f64 / SHORT_UDP_TIMEOUT as f64
            ),
            cost: "None in memory; slightly more entry churn.".into(),
            risk: format!(
                "A UDP flow silent for more than {SHORT_UDP_TIMEOUT} s before its reply loses its entry (replies then look new: NAT mappings change, a stateful firewall drops them). Streams (assured) keep nf_conntrack_udp_timeout_stream."
            ),
            commands: vec![format!(
                "{p}sysctl -w net.netfilter.nf_conntrack_udp_timeout={SHORT_UDP_TIMEOUT}"
            )],
            persist: vec![match &f.place {
                Place::Init => Persist {
                    file: "/etc/sysctl.d/90-conntrack.conf".into(),
                    content: format!(
                        "net.netfilter.nf_conntrack_udp_timeout = {SHORT_UDP_TIMEOUT}\n"
                    ),
                },
                _ => Persist {
                    file: format!(
                        "(per namespace: /etc/sysctl.d applies to the init namespace only) run after {} is created",
                        f.name
                    ),
                    content: format!(
                        "{p}sysctl -w net.netfilter.nf_conntrack_udp_timeout={SHORT_UDP_TIMEOUT}\n"
                    ),
                },
            }],
            sizing: None,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::doctor::table::{Entry, Tally};

    fn cost() -> EntryCost {
        EntryCost {
            object_bytes: 256,
            object_source: "test".into(),
            extension_bytes: 128,
            bucket_bytes: 8,
        }
    }

    fn settings() -> Settings {
        Settings {
            horizon_s: 600.0,
            ram: 24 << 30,
        }
    }

    fn dns_victims() -> Vec<Victim> {
        vec![Victim {
            service: "udp/53".into(),
            proto: "udp".into(),
            port: 53,
            drops: 950,
            sources: 1,
            top_src: Some("10.77.40.2".into()),
        }]
    }

    fn dns_flood<'a>(victims: &'a [Victim], holders: Option<&'a Holders>) -> NsFacts<'a> {
        NsFacts {
            name: "ctt-dd-srv",
            place: Place::Named("ctt-dd-srv".into()),
            entries: 64,
            max: 64,
            buckets: 262_144,
            peak: 64,
            duration_s: 5.0,
            drops: KindCounts {
                table_full: 950,
                ..Default::default()
            },
            victims,
            holders,
            forecast: None,
            udp_timeout: Some(30),
            tcp_syn_sent_timeout: Some(120),
            troubled: true,
        }
    }

    #[test]
    fn dns_flood_gets_notrack_then_raise_max_then_timeouts() {
        let v = dns_victims();
        let mut t = Tally::default();
        for _ in 0..64 {
            t.add(&Entry {
                proto: 17,
                dport: 53,
                replied: false,
                assured: false,
                tcp_state: None,
            });
        }
        let h = t.finish("netlink");
        let a = select(&[dns_flood(&v, Some(&h))], &cost(), &settings());
        let ids: Vec<&str> = a.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["notrack", "raise_max", "udp_timeouts"]);
        assert_eq!(a.iter().map(|a| a.rank).collect::<Vec<_>>(), [1, 2, 3]);
        let n = &a[0];
        assert_eq!(
            n.commands,
            [
                "ip netns exec ctt-dd-srv nft add table inet conntrack_trace",
                "ip netns exec ctt-dd-srv nft 'add chain inet conntrack_trace notrack_in { type filter hook prerouting priority raw; policy accept; }'",
                "ip netns exec ctt-dd-srv nft add rule inet conntrack_trace notrack_in udp dport 53 notrack",
                "ip netns exec ctt-dd-srv nft 'add chain inet conntrack_trace notrack_out { type filter hook output priority raw; policy accept; }'",
                "ip netns exec ctt-dd-srv nft add rule inet conntrack_trace notrack_out udp sport 53 notrack",
            ]
        );
        assert!(
            n.why
                .starts_with("950 of the 950 failures in ctt-dd-srv (100 %) were udp/53"),
            "{}",
            n.why
        );
        assert!(n.why.contains("DNS (udp/53) is a stateless"));
        assert!(n.cost.contains("no NAT"));
        // 950 refused in 5 s = 190/s × 30 s + 64 = 5764 → × 1.5 → 16384.
        let r = &a[1];
        assert_eq!(
            r.commands,
            ["sysctl -w net.netfilter.nf_conntrack_max=16384"]
        );
        assert_eq!(r.sizing.as_ref().unwrap().demand, 5764);
        assert_eq!(
            r.persist[0].content,
            "net.netfilter.nf_conntrack_max = 16384\n"
        );
        assert!(r.why.contains("buckets stay 262144"), "{}", r.why);
        let u = &a[2];
        assert_eq!(
            u.commands,
            ["ip netns exec ctt-dd-srv sysctl -w net.netfilter.nf_conntrack_udp_timeout=10"]
        );
        assert!(
            u.why.starts_with("100 % of ctt-dd-srv's entries are UDP"),
            "{}",
            u.why
        );
    }

    #[test]
    fn init_namespace_commands_have_no_prefix_and_buckets_grow_with_max() {
        let v = dns_victims();
        let mut f = dns_flood(&v, None);
        f.place = Place::Init;
        f.name = "init";
        f.max = 262_144;
        f.buckets = 262_144;
        f.entries = 262_144;
        f.peak = 262_144;
        let a = select(&[f], &cost(), &settings());
        let r = a.iter().find(|a| a.id == "raise_max").unwrap();
        assert_eq!(
            r.commands,
            [
                "sysctl -w net.netfilter.nf_conntrack_buckets=524288",
                "sysctl -w net.netfilter.nf_conntrack_max=524288"
            ]
        );
        assert_eq!(
            r.persist[1].content,
            "options nf_conntrack hashsize=524288\n"
        );
        let n = a.iter().find(|a| a.id == "notrack").unwrap();
        assert!(n.commands[0].starts_with("nft add table"));
        // Without the table, timeouts are advised from the drops.
        assert!(a.iter().any(|a| a.id == "udp_timeouts"));
    }

    #[test]
    fn healthy_or_tcp_or_clash_only_gets_no_misplaced_advice() {
        let v = dns_victims();
        let mut f = dns_flood(&v, None);
        f.troubled = false;
        assert!(select(&[f], &cost(), &settings()).is_empty());
        // TCP victims: no notrack, no UDP timeouts; sized with the SYN_SENT
        // timeout.
        let tv = vec![Victim {
            service: "tcp/80".into(),
            proto: "tcp".into(),
            port: 80,
            drops: 100,
            sources: 4,
            top_src: None,
        }];
        let mut f = dns_flood(&tv, None);
        f.drops.table_full = 100;
        let a = select(&[f], &cost(), &settings());
        assert_eq!(
            a.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["raise_max"]
        );
        // 100/5 s × 120 s + 64 = 2464 → 3696 → 4096.
        assert_eq!(a[0].sizing.as_ref().unwrap().max, 4096);
        // Insert clashes alone in an empty table: nothing to resize.
        let mut f = dns_flood(&tv, None);
        f.drops = KindCounts {
            insert_failed: 3,
            ..Default::default()
        };
        f.entries = 10;
        f.peak = 10;
        assert!(
            select(&[f], &cost(), &settings())
                .iter()
                .all(|a| a.id != "raise_max")
        );
    }

    #[test]
    fn unknown_udp_port_ranks_below_raise_max_and_says_if() {
        let v = vec![Victim {
            service: "udp/4789".into(),
            proto: "udp".into(),
            port: 4789,
            drops: 950,
            sources: 3,
            top_src: None,
        }];
        let a = select(&[dns_flood(&v, None)], &cost(), &settings());
        assert_eq!(a[0].id, "raise_max");
        let n = a.iter().find(|a| a.id == "notrack").unwrap();
        assert!(n.why.contains("if its server keeps no per-flow state"));
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("ctt-dd-srv"), "ctt-dd-srv");
        assert_eq!(shell_word("my ns"), "'my ns'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(
            Place::Path("/proc/7/ns/net".into()).prefix(),
            "nsenter --net=/proc/7/ns/net "
        );
    }
}
