//! The agent's own CPU time and resident memory, from /proc/self.

/// (user + system CPU seconds, resident bytes).
pub fn read() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may contain spaces) start at ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15, rss 24.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(((utime + stime) as f64 / hz, rss_pages * page))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        let (cpu, rss) = super::read().unwrap();
        assert!(cpu >= 0.0);
        assert!(
            rss > 1 << 20,
            "a test binary has more than 1 MiB resident: {rss}"
        );
    }
}
