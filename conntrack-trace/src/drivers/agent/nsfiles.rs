//! Per-namespace conntrack files opened once, inside each namespace, while
//! the agent still has the capabilities to enter it; read later with
//! `pread` from any thread and without any capability.
//!
//! Both kinds of file bind their namespace at open time: the stat file is a
//! seq_file opened with the opener's `struct net` (seq_open_net(),
//! fs/proc/proc_net.c), and a /proc/sys file belongs to the namespace's
//! own copy of the sysctl table (register_net_sysctl(); the inode points
//! at that table, whose `.data` is the namespace's counter). So the agent
//! can drop CAP_SYS_ADMIN (setns) after attaching and still read every
//! namespace it knew then.
//!
//! [`Tables`] is the set the agent reads each tick: the namespaces of the
//! start, plus those that appear later (opened when a rescan finds them,
//! which needs the capabilities to enter them), minus those that went
//! away. Retiring matters: an open stat file holds a reference on its
//! namespace (seq_open_net() takes one with get_proc_net()), so an agent
//! that kept the files of a gone namespace would keep its whole network
//! stack alive.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    os::unix::fs::FileExt,
};

use crate::{
    kernel::kstats::Uncovered,
    kernel::kstats::{self, CtStats, Fill},
    kernel::netns::{self, Held, NetnsInfo},
};

#[derive(Debug)]
pub struct NsFiles {
    pub inode: u32,
    pub name: String,
    stat: Option<File>,
    count: Option<File>,
    max: Option<File>,
    buckets: Option<File>,
}

fn read_all(f: &File) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match f.read_at(&mut buf[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(_) => return None,
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

fn read_u64(f: &Option<File>) -> Option<u64> {
    read_all(f.as_ref()?)?.trim().parse().ok()
}

impl NsFiles {
    /// Opens the files of `ns` inside it; `Err` says why it cannot be read.
    pub fn open(ns: &Held) -> Result<NsFiles, String> {
        let (stat, count, max, buckets) = ns.run(|| {
            let o = |p: &str| File::open(p).ok();
            (
                o("/proc/thread-self/net/stat/nf_conntrack"),
                o("/proc/sys/net/netfilter/nf_conntrack_count"),
                o("/proc/sys/net/netfilter/nf_conntrack_max"),
                o("/proc/sys/net/netfilter/nf_conntrack_buckets"),
            )
        })?;
        if stat.is_none() && count.is_none() {
            return Err("no conntrack files in this namespace (is nf_conntrack loaded?)".into());
        }
        Ok(NsFiles {
            inode: ns.info.inode,
            name: ns.info.name.clone(),
            stat,
            count,
            max,
            buckets,
        })
    }

    pub fn fill(&self) -> Option<Fill> {
        Some(Fill {
            count: read_u64(&self.count)?,
            max: read_u64(&self.max)?,
            buckets: read_u64(&self.buckets).unwrap_or(0),
        })
    }

    pub fn stats(&self) -> Option<CtStats> {
        let text = read_all(self.stat.as_ref()?)?;
        kstats::parse("nf_conntrack", &text).ok()
    }
}

/// The namespaces whose tables the agent reads.
#[derive(Debug, Default)]
pub struct Tables {
    open: BTreeMap<u32, NsFiles>,
    /// Namespaces of the start that went away: the teardown's counters
    /// window cannot cover them.
    retired_at_start: BTreeMap<u32, String>,
    start: BTreeSet<u32>,
    /// Namespaces found by a rescan that could not be opened: not asked
    /// again while they exist (one warning each, not one per tick).
    refused: BTreeSet<u32>,
}

/// What a rescan changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rescan {
    /// (inode, name) opened.
    pub added: Vec<(u32, String)>,
    /// (inode, name) closed because the namespace is gone.
    pub removed: Vec<(u32, String)>,
    /// Namespaces that could not be opened, and why.
    pub refused: Vec<String>,
}

impl Tables {
    /// The files of every namespace of `held`; the ones that cannot be
    /// read come back as `name: why`.
    pub fn open(held: &[Held]) -> (Tables, Vec<String>) {
        let mut t = Tables::default();
        let mut uncovered = Vec::new();
        for h in held {
            match NsFiles::open(h) {
                Ok(f) => {
                    t.start.insert(f.inode);
                    t.open.insert(f.inode, f);
                }
                Err(why) => uncovered.push(format!("{}: {why}", h.info.name)),
            }
        }
        (t, uncovered)
    }

    pub fn iter(&self) -> impl Iterator<Item = &NsFiles> {
        self.open.values()
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    pub fn contains(&self, inode: u32) -> bool {
        self.open.contains_key(&inode)
    }

    /// Brings the set in line with `list` (every namespace that exists
    /// now): opens the new ones, closes the gone ones. `list` must be
    /// complete — a namespace missing from it is closed — so the caller
    /// only rescans while it can see every process (CAP_SYS_PTRACE).
    pub fn rescan(&mut self, list: &BTreeMap<u32, NetnsInfo>) -> Rescan {
        let mut r = Rescan::default();
        let gone: Vec<u32> = self
            .open
            .keys()
            .copied()
            .filter(|i| !list.contains_key(i))
            .collect();
        for ino in gone {
            if let Some(f) = self.open.remove(&ino) {
                if self.start.contains(&ino) {
                    self.retired_at_start.insert(ino, f.name.clone());
                }
                r.removed.push((ino, f.name));
            }
        }
        self.refused.retain(|i| list.contains_key(i));
        let new: Vec<NetnsInfo> = list
            .values()
            .filter(|ns| !self.open.contains_key(&ns.inode) && !self.refused.contains(&ns.inode))
            .cloned()
            .collect();
        for h in netns::hold(&new) {
            match NsFiles::open(&h) {
                Ok(f) => {
                    // A namespace of the start seen again (a process
                    // entered it): the same one, as `netns::hold` keeps
                    // it, so its counters window holds again.
                    self.retired_at_start.remove(&f.inode);
                    r.added.push((f.inode, f.name.clone()));
                    self.open.insert(f.inode, f);
                }
                Err(why) => {
                    self.refused.insert(h.info.inode);
                    r.refused.push(format!("{}: {why}", h.info.name));
                }
            }
        }
        r
    }

    /// The counters at the end: every open namespace's, and the reason
    /// for the start's namespaces that went away meanwhile.
    pub fn end_snapshot(&self) -> kstats::Snapshot {
        kstats::Snapshot {
            stats: self
                .open
                .values()
                .filter_map(|f| Some((f.inode, f.stats()?)))
                .collect(),
            missing: self
                .retired_at_start
                .iter()
                .map(|(ino, name)| Uncovered {
                    netns: name.clone(),
                    inode: *ino,
                    reason: "the namespace went away during the run".into(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_reads_repeatedly() {
        let own = crate::kernel::netns::own_inode().unwrap();
        let list = crate::kernel::netns::list();
        let held = crate::kernel::netns::hold(&[list[&own].clone()]);
        let Ok(f) = NsFiles::open(&held[0]) else {
            eprintln!("skipped: no nf_conntrack here");
            return;
        };
        // pread from offset 0: every read is whole (values may change
        // meanwhile: other tests set nf_conntrack_max).
        for _ in 0..3 {
            assert!(f.fill().is_some_and(|x| x.max > 0));
            assert!(f.stats().is_some());
        }
    }

    #[test]
    fn rescan_retires_the_gone_and_opens_the_new() {
        let own = crate::kernel::netns::own_inode().unwrap();
        let all = crate::kernel::netns::list();
        let mine = BTreeMap::from([(own, all[&own].clone())]);
        let held = crate::kernel::netns::hold(&[all[&own].clone()]);
        let (mut t, uncovered) = Tables::open(&held);
        if !uncovered.is_empty() {
            eprintln!("skipped: {uncovered:?}");
            return;
        }
        assert!(t.contains(own));
        assert_eq!(t.rescan(&mine), Rescan::default(), "nothing changed");
        let r = t.rescan(&BTreeMap::new());
        assert_eq!(r.removed, [(own, all[&own].name.clone())]);
        assert!(t.is_empty());
        let end = t.end_snapshot();
        assert!(end.stats.is_empty());
        assert_eq!(end.missing.len(), 1, "a start namespace gone: said why");
        assert_eq!(end.missing[0].inode, own);
        let r = t.rescan(&mine);
        assert_eq!(r.added, [(own, all[&own].name.clone())]);
        assert!(t.end_snapshot().missing.is_empty(), "back: covered again");
        assert!(t.end_snapshot().stats.contains_key(&own));
    }
}
