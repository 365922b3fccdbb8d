//! The guest's root filesystem, written as an uncompressed `newc` cpio
//! archive (the kernel unpacks it into rootfs; uncompressed because
//! decompressing under TCG costs boot time and RAM is plentiful).
//!
//! Userland: busybox-static for the shell and /init, plus iproute2's `ip`,
//! `nft` and util-linux's `setpriv` copied from the host with the shared
//! libraries and dynamic loader `ldd` names (busybox's `ip` applet cannot
//! create namespaces or veths, and the tests shell out to these tools).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
    /// A character device (major, minor): /dev/console must exist before
    /// devtmpfs is mounted, or /init starts without stdio
    /// (init/main.c: console_on_rootfs()).
    CharDev(u32, u32),
}

/// A directory tree to archive; paths are absolute guest paths.
#[derive(Default)]
pub struct Rootfs {
    entries: BTreeMap<String, Entry>,
}

impl Rootfs {
    fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = Path::new(&path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Entry::Dir);
            parent = p.parent();
        }
        self.entries.insert(path, entry);
    }

    pub fn dir(&mut self, path: &str) {
        self.add(path, Entry::Dir);
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.add(path, Entry::File { data, mode });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Entry::Symlink(target.to_owned()));
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.add(path, Entry::CharDev(major, minor));
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    /// Copies a host file (following symlinks) to the same path in the
    /// guest, keeping its permission bits.
    pub fn host_file(&mut self, host: &Path, guest: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.file(guest, data, mode);
        Ok(())
    }

    /// Copies a dynamically linked host program and everything `ldd` says
    /// it loads (libraries at the paths ldd resolved, and the loader).
    pub fn host_program(&mut self, host: &Path, guest: &str) -> Result<()> {
        self.host_file(host, guest)?;
        let out = Command::new("ldd")
            .arg(host)
            .output()
            .context("running ldd")?;
        // ldd exits 1 with "not a dynamic executable" for static programs.
        if !out.status.success() {
            return Ok(());
        }
        for lib in ldd_paths(&String::from_utf8_lossy(&out.stdout))? {
            if !self.contains(&lib) {
                self.host_file(Path::new(&lib), &lib)?;
            }
        }
        Ok(())
    }

    /// The archive in `newc` format (Documentation/driver-api/early-userspace/
    /// buffer-format.rst), parents before children (BTreeMap order: "a" <
    /// "a/b"), ending with the TRAILER!!! entry.
    pub fn cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir => (0o040755, &[], (0, 0)),
                Entry::File { data, mode } => (0o100000 | mode, data, (0, 0)),
                Entry::Symlink(t) => (0o120777, t.as_bytes(), (0, 0)),
                Entry::CharDev(ma, mi) => (0o020600, &[], (*ma, *mi)),
            };
            let nlink = if matches!(entry, Entry::Dir) { 2 } else { 1 };
            write_entry(&mut out, ino as u32 + 1, mode, nlink, rdev, path, data);
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
    // devminor, rdevmajor, rdevminor, namesize (with NUL), check.
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// The absolute paths in `ldd` output: `libx.so.1 => /lib/.../libx.so.1
/// (0x...)` and the loader's own `/lib64/ld-linux-x86-64.so.2 (0x...)`;
/// `linux-vdso.so.1` has no file. A "not found" library is an error.
pub fn ldd_paths(text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("ldd: {line}");
        }
        let target = match line.split_once("=>") {
            Some((_, r)) => r.trim(),
            None => line,
        };
        if let Some(path) = target
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            out.push(path.to_owned());
        }
    }
    Ok(out)
}

/// Where a host program is, through PATH and the sbin directories.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Adds busybox at /bin/busybox and a symlink for each of its applets
/// (from `busybox --list-full`) that no copied program already provides.
pub fn add_busybox(root: &mut Rootfs, busybox: &Path) -> Result<()> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("running {} --list-full", busybox.display()))?;
    ensure!(out.status.success(), "busybox --list-full failed");
    // ldd fails on a static executable.
    let dynamic = Command::new("ldd")
        .arg(busybox)
        .output()
        .is_ok_and(|o| o.status.success());
    ensure!(
        !dynamic,
        "{} is dynamically linked; the guest needs busybox-static",
        busybox.display()
    );
    root.file("/bin/busybox", fs::read(busybox)?, 0o755);
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let guest = format!("/{}", applet.trim());
        if guest != "/bin/busybox" && !root.contains(&guest) {
            root.symlink(&guest, "/bin/busybox");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ldd() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libmnl.so.0",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(ldd_paths("\tlibfoo.so.1 => not found\n").is_err());
    }

    /// (name, mode, rdev, data) of one archive entry.
    type Read = (String, u32, (u32, u32), Vec<u8>);

    /// Reads back a newc archive.
    fn read_cpio(mut b: &[u8]) -> Vec<Read> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701");
            let f = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rdev, namesize) = (f(1), f(6) as usize, (f(9), f(10)), f(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = b[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            // Entries start 4-aligned in the archive.
            assert!(offset.is_multiple_of(4));
            offset += next;
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn writes_newc() {
        let mut r = Rootfs::default();
        r.file("/usr/sbin/ip", b"ELF".to_vec(), 0o755);
        r.symlink("/bin/sh", "/bin/busybox");
        r.char_dev("/dev/console", 5, 1);
        let entries = read_cpio(&r.cpio());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "usr",
                "usr/sbin",
                "usr/sbin/ip"
            ]
        );
        assert_eq!(entries[1].1, 0o120777);
        assert_eq!(entries[1].3, b"/bin/busybox");
        assert_eq!(entries[3].1, 0o020600);
        assert_eq!(entries[3].2, (5, 1));
        assert_eq!(entries[6].1, 0o100755);
        assert_eq!(entries[6].3, b"ELF");
        assert_eq!(entries[0].1, 0o040755);
    }
}
