//! Debian cloud kernels for the VM matrix: resolve the current
//! `linux-image-cloud-amd64` of a suite (its ABI name changes with security
//! updates), download what it pins with the private apt configuration,
//! unpack it with `dpkg -x` (never installed into /), and extract the
//! uncompressed vmlinux that qemu boots directly (PVH entry; decompressing a
//! bzImage under TCG costs seconds per boot).
//!
//! The packaging is followed, not assumed: up to 6.12 the metapackage pins
//! one `linux-image-ABI` that holds `boot/vmlinuz-ABI` and
//! `lib/modules/ABI/`; from 7.x it pins `linux-base-cloud-amd64`, an empty
//! `linux-image-ABI` and `linux-modules-cloud-amd64`, which pin in turn
//! `linux-base-ABI`, `linux-binary-ABI` (`usr/lib/modules/ABI/vmlinuz`) and
//! `linux-modules-ABI` (merged /usr). Every package reached through exact
//! `(= version)` pins is the kernel's; loose dependencies (`kmod`,
//! `linux-base (>= ...)`, an initramfs tool) are the installed system's.

use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::apt::{self, Apt, Mirrors};

/// A kernel of the matrix: a Debian suite's cloud kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// What `--kernel` names it.
    pub label: &'static str,
    /// Suites on the archive mirror, and on the security mirror.
    pub archive: &'static [&'static str],
    pub security: &'static [&'static str],
}

pub const SPECS: [Spec; 4] = [
    Spec {
        label: "6.1",
        archive: &["bookworm"],
        security: &["bookworm-security"],
    },
    // Backports alone: its candidate is then the backports kernel.
    Spec {
        label: "6.12",
        archive: &["bookworm-backports"],
        security: &[],
    },
    // Debian's newest cloud kernel (7.3.4 in December 2026): whatever
    // trixie-backports ships when the cache is filled or `--refresh`ed. Its
    // version shows in every summary; known failures name the version
    // (known.rs), so a newer kernel is judged afresh.
    Spec {
        label: "newest",
        archive: &["trixie-backports"],
        security: &[],
    },
    Spec {
        label: "5.10",
        archive: &["bullseye"],
        security: &["bullseye-security"],
    },
];

const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// An unpacked kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub label: &'static str,
    /// The packages unpacked, as `name=version`.
    pub packages: Vec<String>,
    /// The metapackage's version.
    pub version: String,
    /// `uname -r`, the directory under (usr/)lib/modules.
    pub release: String,
    pub vmlinux: PathBuf,
    /// The unpacked packages, one tree.
    pub root: PathBuf,
}

impl Kernel {
    /// `lib/modules/<release>`, or `usr/lib/modules/<release>` (merged /usr).
    pub fn modules_dir(&self) -> PathBuf {
        MODULE_DIRS
            .iter()
            .map(|d| self.root.join(d).join(&self.release))
            .find(|d| d.is_dir())
            .unwrap_or_else(|| self.root.join(MODULE_DIRS[0]).join(&self.release))
    }

    /// The package that carries the kernel image, for the summary.
    pub fn package(&self) -> &str {
        self.packages
            .iter()
            .find(|p| p.starts_with("linux-binary-"))
            .or_else(|| self.packages.iter().find(|p| p.starts_with("linux-image-")))
            .or(self.packages.first())
            .map_or("?", |p| p.split('=').next().unwrap_or(p))
    }
}

/// Where packages put modules: before and after Debian merged /usr.
const MODULE_DIRS: [&str; 2] = ["lib/modules", "usr/lib/modules"];

const STAMP: &str = "kernel.txt";

/// The kernel of `spec`, from the cache under `cache` unless `refresh` asks
/// to resolve the suite's current package again (a cached kernel needs no
/// network at all).
pub fn fetch(spec: &Spec, cache: &Path, refresh: bool) -> Result<Kernel> {
    let dir = cache.join("kernels").join(spec.label);
    if !refresh && let Some(k) = cached(spec, &dir) {
        return Ok(k);
    }
    let mirrors = Mirrors::from_host()?;
    let mut suites: Vec<(&str, &str)> = spec
        .archive
        .iter()
        .map(|s| (mirrors.archive.as_str(), *s))
        .collect();
    suites.extend(
        spec.security
            .iter()
            .map(|s| (mirrors.security.as_str(), *s)),
    );
    let apt = Apt::new(&cache.join("apt").join(spec.label), &suites)?;
    eprintln!(
        "vm-test: {}: resolving {METAPACKAGE} in {}",
        spec.label,
        suites
            .iter()
            .map(|(_, s)| *s)
            .collect::<Vec<_>>()
            .join(" + ")
    );
    apt.update()?;
    let meta = apt.show(METAPACKAGE)?;
    let version = apt::field(&meta, "Version")
        .with_context(|| format!("{METAPACKAGE} has no Version"))?
        .to_owned();
    let packages = pinned_closure(&apt, &meta)?;
    ensure!(
        !packages.is_empty(),
        "{METAPACKAGE} {version} pins no package with `(= version)`: {meta}"
    );
    if let Some(k) = cached(spec, &dir)
        && k.packages == packages
    {
        return Ok(k);
    }
    eprintln!(
        "vm-test: {}: downloading {}",
        spec.label,
        packages.join(" ")
    );
    let debs = dir.join("debs");
    let _ = fs::remove_dir_all(&debs);
    let files = apt.download(&packages, &debs)?;
    let root = dir.join("root");
    let _ = fs::remove_dir_all(&root);
    for deb in &files {
        crate::cmd(
            "dpkg",
            &["-x", &deb.to_string_lossy(), &root.to_string_lossy()],
        )?;
    }
    let release = release_of(&root)?;
    let vmlinuz = image_of(&root, &release)?;
    let image = fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let vmlinux = extract_vmlinux(&image).with_context(|| format!("{}", vmlinuz.display()))?;
    fs::write(dir.join("vmlinux"), vmlinux)?;
    // The .debs are unpacked: keep the cache small.
    let _ = fs::remove_dir_all(&debs);
    fs::write(
        dir.join(STAMP),
        format!("{}\n{version}\n{release}\n", packages.join(" ")),
    )?;
    cached(spec, &dir).context("kernel cache incomplete right after unpacking")
}

/// Every package the metapackage `record` reaches through exact
/// `(= version)` pins, as sorted `name=version` strings. Each pinned
/// record is shown at its pinned version, so the closure is the one the
/// metapackage names even when a newer kernel is the candidate.
fn pinned_closure(apt: &Apt, record: &str) -> Result<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = apt::pinned_dependencies(record)
        .into_iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    while let Some(p) = todo.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        ensure!(
            seen.len() <= 32,
            "{METAPACKAGE}: more than 32 pinned packages ({seen:?})"
        );
        let rec = apt.show(&p)?;
        todo.extend(
            apt::pinned_dependencies(&rec)
                .into_iter()
                .map(|(n, v)| format!("{n}={v}")),
        );
    }
    Ok(seen.into_iter().collect())
}

fn cached(spec: &Spec, dir: &Path) -> Option<Kernel> {
    let stamp = fs::read_to_string(dir.join(STAMP)).ok()?;
    let mut l = stamp.lines();
    let (packages, version, release) = (l.next()?, l.next()?, l.next()?);
    let packages: Vec<String> = packages
        .split_whitespace()
        .map(|p| {
            // Stamps written before 7.x name one package, without its version.
            if p.contains('=') {
                p.to_owned()
            } else {
                format!("{p}={version}")
            }
        })
        .collect();
    let k = Kernel {
        label: spec.label,
        packages,
        version: version.to_owned(),
        release: release.to_owned(),
        vmlinux: dir.join("vmlinux"),
        root: dir.join("root"),
    };
    (k.vmlinux.exists() && k.modules_dir().is_dir()).then_some(k)
}

/// The one `<release>` directory under `lib/modules` and `usr/lib/modules`
/// of the unpacked packages.
fn release_of(root: &Path) -> Result<String> {
    let names: BTreeSet<String> = MODULE_DIRS
        .iter()
        .filter_map(|d| fs::read_dir(root.join(d)).ok())
        .flat_map(|rd| rd.flatten())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.len() {
        1 => Ok(names.into_iter().next().unwrap_or_default()),
        _ => bail!(
            "expected one kernel under {} or {} of {}, found {names:?}",
            MODULE_DIRS[0],
            MODULE_DIRS[1],
            root.display()
        ),
    }
}

/// The compressed kernel image of `release`: `boot/vmlinuz-<release>` up to
/// 6.12, `usr/lib/modules/<release>/vmlinuz` from 7.x.
fn image_of(root: &Path, release: &str) -> Result<PathBuf> {
    let candidates = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        root.join("usr/lib/modules").join(release).join("vmlinuz"),
        root.join("lib/modules").join(release).join("vmlinuz"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| format!("no kernel image among {candidates:?}"))
}

/// A compression format of the kernel payload, by its magic bytes (the
/// ones scripts/extract-vmlinux searches for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Lzma,
    Bzip2,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn detect(data: &[u8]) -> Option<Compression> {
        const MAGICS: [(&[u8], Compression); 6] = [
            (&[0x1f, 0x8b, 0x08], Compression::Gzip),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (b"BZh", Compression::Bzip2),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        ];
        MAGICS
            .iter()
            .find(|(m, _)| data.starts_with(m))
            .map(|(_, c)| *c)
    }

    /// A decompressor reading stdin and writing stdout.
    fn command(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Compression::Gzip => ("gzip", &["-dc"]),
            Compression::Xz => ("xz", &["-dc", "--single-stream"]),
            Compression::Lzma => ("xz", &["-dc", "--format=lzma"]),
            Compression::Bzip2 => ("bzip2", &["-dc"]),
            Compression::Lz4 => ("lz4", &["-dc"]),
            Compression::Zstd => ("zstd", &["-dcq"]),
        }
    }
}

/// Where a bzImage keeps its compressed vmlinux, from the setup header
/// (Documentation/arch/x86/boot.rst: `setup_sects` at 0x1f1, `HdrS` at
/// 0x202, protocol version at 0x206, `payload_offset`/`payload_length` at
/// 0x248/0x24c since protocol 2.08, relative to the protected-mode code
/// that follows the (setup_sects + 1) real-mode sectors).
pub fn payload(image: &[u8]) -> Result<&[u8]> {
    let u16_at = |o: usize| {
        image
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        image
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    ensure!(
        image.get(0x202..0x206) == Some(b"HdrS"),
        "not a bzImage (no HdrS setup header)"
    );
    let version = u16_at(0x206).context("short header")?;
    ensure!(
        version >= 0x208,
        "boot protocol {version:#x} has no payload fields"
    );
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248).context("short header")?;
    let len = u32_at(0x24c).context("short header")?;
    image.get(start..start + len).with_context(|| {
        format!(
            "payload {start}+{len} beyond the image's {} bytes",
            image.len()
        )
    })
}

/// The uncompressed vmlinux ELF inside a bzImage.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>> {
    let payload = payload(image)?;
    let compression = Compression::detect(payload).with_context(|| {
        format!(
            "unknown compression of the kernel payload (starts {:02x?})",
            &payload[..payload.len().min(6)]
        )
    })?;
    ensure!(payload.len() > 4, "empty payload");
    // The build appends the uncompressed size as 4 little-endian bytes
    // (arch/x86/boot/compressed/Makefile, `*_with_size`); gzip's own
    // trailer ends with the same ISIZE field.
    let (body, size) = payload.split_at(payload.len() - 4);
    let size = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
    let stream = if compression == Compression::Gzip {
        payload
    } else {
        body
    };
    let (program, args) = compression.command();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} (install it to unpack {compression:?})"))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let data = stream.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let elf = out.stdout;
    ensure!(
        elf.starts_with(b"\x7fELF"),
        "decompressed {compression:?} payload is not an ELF file"
    );
    ensure!(
        elf.len() == size,
        "decompressed {} bytes, the image says {size}",
        elf.len()
    );
    Ok(elf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic bzImage: 2 setup sectors, then 16 bytes of code, then
    /// the payload.
    fn image(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 3 * 512 + 16];
        img[0x1f1] = 2;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(b"trailing");
        img
    }

    #[test]
    fn finds_the_payload() {
        let img = image(b"\x28\xb5\x2f\xfdzstd-data");
        let p = payload(&img).unwrap();
        assert_eq!(p, b"\x28\xb5\x2f\xfdzstd-data");
        assert_eq!(Compression::detect(p), Some(Compression::Zstd));
        assert!(payload(b"not a kernel").is_err());
        let mut old = image(b"x");
        old[0x206..0x208].copy_from_slice(&0x206u16.to_le_bytes());
        assert!(payload(&old).is_err());
    }

    #[test]
    fn extracts_an_xz_kernel_with_appended_size() {
        let elf = b"\x7fELF fake kernel".repeat(100);
        let mut child = Command::new("xz")
            .args(["-c", "--check=crc32"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz");
        child.stdin.take().unwrap().write_all(&elf).unwrap();
        let mut xz = child.wait_with_output().unwrap().stdout;
        xz.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(extract_vmlinux(&image(&xz)).unwrap(), elf);
        // A wrong size field is caught.
        let n = xz.len();
        xz[n - 4] ^= 1;
        assert!(extract_vmlinux(&image(&xz)).is_err());
    }
}
