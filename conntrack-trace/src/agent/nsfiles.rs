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

use std::{fs::File, os::unix::fs::FileExt};

use crate::{
    kstats::{self, CtStats, Fill},
    netns::Held,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_reads_repeatedly() {
        let own = crate::netns::own_inode().unwrap();
        let list = crate::netns::list();
        let held = crate::netns::hold(&[list[&own].clone()]);
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
}
