//! The kernel modules a guest needs and their load order. Debian's image
//! packages ship no modules.dep (depmod runs at install time), so the
//! dependencies come from each module's own `.modinfo` section
//! (`depends=a,b`, written by modpost). 6.12's modules are .ko.xz: they are
//! decompressed here, on the host, so the guest's busybox `insmod` loads
//! plain ELF files.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// What the scenario tests use: conntrack itself, the nft ruleset with
/// `ct state` (nf_tables, nft_ct), `dnat` (nft_nat, which depends on
/// nf_nat, in a `type nat` chain: nft_chain_nat), the veth pairs between
/// namespaces, and nf_conntrack_netlink
/// (doctor reads which entries hold the table over ctnetlink).
pub const WANTED: [&str; 7] = [
    "nf_conntrack",
    "nf_tables",
    "nft_ct",
    "nft_nat",
    "nft_chain_nat",
    "veth",
    "nf_conntrack_netlink",
];

/// A module ready for insmod.
pub struct Module {
    pub name: String,
    pub elf: Vec<u8>,
}

/// Module names use `_` and `-` interchangeably; the kernel's own name uses
/// `_` (scripts/Makefile.lib: modname).
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file such as `nf_conntrack.ko.xz`.
fn name_of(path: &Path) -> Option<String> {
    let f = path.file_name()?.to_str()?;
    let stem = f.split_once(".ko")?.0;
    Some(normalize(stem))
}

/// Every module file under `dir`, by name.
pub fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = name_of(&p) {
                out.insert(n, p);
            }
        }
    }
    Ok(out)
}

/// A module file's contents, decompressed by its extension.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return fs::read(path).with_context(|| format!("reading {name}"));
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        bail!("{name}: unknown module compression");
    };
    let out = Command::new(tool)
        .args(["-dc", &name])
        .output()
        .with_context(|| format!("running {tool} on {name}"))?;
    ensure!(
        out.status.success(),
        "{tool} -dc {name}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// The `key=value` strings of an ELF64 little-endian module's `.modinfo`
/// section.
pub fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>> {
    let u16_at = |o: usize| -> Result<usize> {
        let b = elf.get(o..o + 2).context("truncated ELF")?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| -> Result<usize> {
        let b = elf.get(o..o + 4).context("truncated ELF")?;
        Ok(u32::from_le_bytes(b.try_into()?) as usize)
    };
    let u64_at = |o: usize| -> Result<usize> {
        let b = elf.get(o..o + 8).context("truncated ELF")?;
        Ok(u64::from_le_bytes(b.try_into()?) as usize)
    };
    // e_ident: magic, EI_CLASS 2 (64-bit), EI_DATA 1 (little-endian).
    ensure!(
        elf.starts_with(b"\x7fELF") && elf.get(4) == Some(&2) && elf.get(5) == Some(&1),
        "not an ELF64 little-endian file"
    );
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    // Elf64_Shdr: sh_name at 0, sh_offset at 0x18, sh_size at 0x20.
    let section = |i: usize| -> Result<(usize, &[u8])> {
        let h = shoff + i * shentsize;
        let (off, size) = (u64_at(h + 0x18)?, u64_at(h + 0x20)?);
        Ok((
            u32_at(h)?,
            elf.get(off..off + size)
                .context("section beyond the file")?,
        ))
    };
    let (_, names) = section(shstrndx)?;
    for i in 0..shnum {
        let (name_off, data) = section(i)?;
        let name = names
            .get(name_off..)
            .and_then(|n| n.split(|b| *b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return Ok(data
                .split(|b| *b == 0)
                .filter_map(|kv| {
                    let kv = std::str::from_utf8(kv).ok()?;
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect());
        }
    }
    bail!("no .modinfo section")
}

/// The modules named in `wanted` and everything they depend on, in an
/// order where each module follows its dependencies.
pub fn resolve(dir: &Path, wanted: &[&str]) -> Result<Vec<Module>> {
    let index = index(dir)?;
    let mut elfs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut todo: Vec<String> = wanted.iter().map(|w| normalize(w)).collect();
    while let Some(name) = todo.pop() {
        if elfs.contains_key(&name) {
            continue;
        }
        let path = index.get(&name).with_context(|| {
            format!(
                "module {name} not found under {} (built into this kernel, or missing?)",
                dir.display()
            )
        })?;
        let elf = read_module(path)?;
        let d: Vec<String> = modinfo(&elf)
            .with_context(|| format!("{}", path.display()))?
            .into_iter()
            .filter(|(k, _)| k == "depends")
            .flat_map(|(_, v)| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(normalize)
                    .collect::<Vec<_>>()
            })
            .collect();
        todo.extend(d.iter().cloned());
        deps.insert(name.clone(), d);
        elfs.insert(name, elf);
    }
    Ok(load_order(&deps)?
        .into_iter()
        .map(|name| Module {
            elf: elfs.remove(&name).unwrap_or_default(),
            name,
        })
        .collect())
}

/// Orders modules so that every module comes after its dependencies
/// (depth-first; a cycle is an error, modpost forbids them).
pub fn load_order(deps: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>> {
    fn visit(
        n: &str,
        deps: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(n) {
            return Ok(());
        }
        if path.iter().any(|p| p == n) {
            bail!("module dependency cycle: {} -> {n}", path.join(" -> "));
        }
        path.push(n.to_owned());
        for d in deps.get(n).into_iter().flatten() {
            visit(d, deps, path, done, out)?;
        }
        path.pop();
        done.insert(n.to_owned());
        out.push(n.to_owned());
        Ok(())
    }
    let (mut path, mut done, mut out) = (Vec::new(), BTreeSet::new(), Vec::new());
    for n in deps.keys() {
        visit(n, deps, &mut path, &mut done, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn dependencies_load_first() {
        let d = deps(&[
            ("nft_ct", &["nf_tables", "nf_conntrack"]),
            ("nf_tables", &["nfnetlink", "libcrc32c"]),
            (
                "nf_conntrack",
                &["nf_defrag_ipv6", "nf_defrag_ipv4", "libcrc32c"],
            ),
            ("nfnetlink", &[]),
            ("libcrc32c", &[]),
            ("nf_defrag_ipv4", &[]),
            ("nf_defrag_ipv6", &[]),
        ]);
        let order = load_order(&d).unwrap();
        assert_eq!(order.len(), d.len());
        let pos = |n: &str| order.iter().position(|o| o == n).unwrap();
        for (n, ds) in &d {
            for dep in ds {
                assert!(pos(dep) < pos(n), "{dep} before {n}: {order:?}");
            }
        }
        assert!(load_order(&deps(&[("a", &["b"]), ("b", &["a"])])).is_err());
    }

    #[test]
    fn names_from_files() {
        assert_eq!(
            name_of(Path::new("/x/nf_conntrack.ko.xz")).as_deref(),
            Some("nf_conntrack")
        );
        assert_eq!(
            name_of(Path::new("/x/nf-defrag.ko")).as_deref(),
            Some("nf_defrag")
        );
        assert_eq!(name_of(Path::new("/x/modules.order")), None);
    }

    /// A minimal ELF64 with a section-name table and a `.modinfo`.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let mut f = vec![0u8; 64];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let shstr_off = f.len();
        f.extend_from_slice(shstr);
        let mi_off = f.len();
        f.extend_from_slice(modinfo);
        let shoff = f.len();
        f[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        for (name, off, size) in [
            (0u32, 0usize, 0usize),
            (1, shstr_off, shstr.len()),
            (11, mi_off, modinfo.len()),
        ] {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            f.extend_from_slice(&h);
        }
        f
    }

    #[test]
    fn reads_modinfo() {
        let elf = elf_with_modinfo(b"license=GPL\0depends=nf_tables,nf_conntrack\0\0name=nft_ct\0");
        let mi = modinfo(&elf).unwrap();
        assert!(mi.contains(&("depends".into(), "nf_tables,nf_conntrack".into())));
        assert!(mi.contains(&("name".into(), "nft_ct".into())));
        assert!(modinfo(b"\x7fELF\x01\x01").is_err());
        assert!(modinfo(&elf[..70]).is_err());
    }
}
