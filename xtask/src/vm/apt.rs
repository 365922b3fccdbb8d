//! A private apt configuration: our own sources list, package lists, cache
//! and (empty) dpkg status under ~/.cache/conntrack-trace/vm/apt/<name>, so
//! resolving and downloading Debian packages never reads or changes the
//! machine's /etc/apt or /var/lib/apt state. The mirror is the one this
//! machine's own sources use (the one it is known to reach), and the keyring
//! is Debian's archive keyring.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The Debian archive and security mirrors this machine's apt uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrors {
    pub archive: String,
    pub security: String,
}

impl Mirrors {
    /// Reads /etc/apt/sources.list and sources.list.d/*.{list,sources}.
    pub fn from_host() -> Result<Mirrors> {
        let mut text = String::new();
        let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
        if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
            let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
            more.sort();
            files.extend(more);
        }
        for f in &files {
            let name = f.to_string_lossy();
            if (name.ends_with(".list") || name.ends_with(".sources"))
                && let Ok(t) = fs::read_to_string(f)
            {
                text.push_str(&t);
                text.push_str("\n\n");
            }
        }
        Mirrors::parse(&text).context(
            "no Debian archive and security mirror found in /etc/apt/sources.list{,.d/*} \
             (the VM kernels are fetched from the mirror this machine uses)",
        )
    }

    /// Finds, in one-line (`deb URI suite ...`) or deb822 (`URIs:` /
    /// `Suites:`) sources, a URI serving a `<codename>-security` suite and one
    /// serving a plain Debian codename.
    pub fn parse(text: &str) -> Option<Mirrors> {
        let mut entries: Vec<(Vec<String>, Vec<String>)> = Vec::new();
        // deb822 stanzas are separated by blank lines.
        for stanza in text.split("\n\n") {
            let mut uris = Vec::new();
            let mut suites = Vec::new();
            for line in stanza.lines().map(str::trim) {
                if line.starts_with('#') {
                    continue;
                }
                if let Some(v) = line.strip_prefix("URIs:") {
                    uris.extend(v.split_whitespace().map(str::to_owned));
                } else if let Some(v) = line.strip_prefix("Suites:") {
                    suites.extend(v.split_whitespace().map(str::to_owned));
                } else if let Some(rest) = line.strip_prefix("deb ") {
                    // deb [options] URI suite components...
                    let rest = match rest.trim_start().strip_prefix('[') {
                        Some(r) => r.split_once(']').map(|(_, r)| r).unwrap_or(""),
                        None => rest,
                    };
                    let mut w = rest.split_whitespace();
                    if let (Some(uri), Some(suite)) = (w.next(), w.next()) {
                        entries.push((vec![uri.to_owned()], vec![suite.to_owned()]));
                    }
                }
            }
            if !uris.is_empty() && !suites.is_empty() {
                entries.push((uris, suites));
            }
        }
        let codename = |s: &str| {
            let base = s.split('-').next().unwrap_or(s);
            DEBIAN_CODENAMES.contains(&base)
        };
        let find = |security: bool| {
            entries.iter().find_map(|(uris, suites)| {
                suites
                    .iter()
                    .any(|s| codename(s) && s.ends_with("-security") == security)
                    .then(|| uris[0].trim_end_matches('/').to_owned())
            })
        };
        Some(Mirrors {
            archive: find(false)?,
            security: find(true)?,
        })
    }
}

const DEBIAN_CODENAMES: [&str; 5] = ["buster", "bullseye", "bookworm", "trixie", "forky"];

/// One private apt configuration.
pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// `suites` are (mirror URI, suite) pairs, component `main`.
    pub fn new(dir: &Path, suites: &[(&str, &str)]) -> Result<Apt> {
        ensure!(
            Path::new(KEYRING).exists(),
            "{KEYRING} missing (apt-get install debian-archive-keyring)"
        );
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources: String = suites
            .iter()
            .map(|(uri, suite)| format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"))
            .collect();
        fs::write(dir.join("sources.list"), sources)?;
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        Ok(Apt {
            dir: dir.to_owned(),
        })
    }

    /// The `-o` options that point apt at our files only. `status` is
    /// the dpkg status file: our empty one for resolving and downloading,
    /// the host's when installing host tools (setup).
    fn options(&self, host_status: bool) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).to_string_lossy().into_owned();
        let mut o = vec![
            format!("Dir::Etc::SourceList={}", d("sources.list")),
            "Dir::Etc::SourceParts=-".to_owned(),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            format!("Dir::Cache::Archives={}", d("cache/archives")),
            // Only package lists: no translations or AppStream metadata.
            "Acquire::Languages=none".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_owned(),
            // Installed or unpacked .debs are not needed again.
            "APT::Keep-Downloaded-Packages=false".to_owned(),
            // The _apt sandbox user cannot write under root's home.
            "APT::Sandbox::User=root".to_owned(),
        ];
        if !host_status {
            o.push(format!("Dir::State::status={}", d("status")));
            // Our lists are ours alone: no need for the system's lock.
            o.push("Debug::NoLocking=1".to_owned());
        }
        o.into_iter().flat_map(|o| ["-o".to_owned(), o]).collect()
    }

    fn run(&self, program: &str, host_status: bool, args: &[&str], cwd: &Path) -> Result<String> {
        let out = Command::new(program)
            .args(self.options(host_status))
            .args(args)
            .current_dir(cwd)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "`{program} {}` (private apt config {}) failed: {}",
                args.join(" "),
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn update(&self) -> Result<()> {
        self.run("apt-get", false, &["-q", "update"], &self.dir)
            .map(|_| ())
    }

    /// The candidate version's control record of `package`.
    pub fn show(&self, package: &str) -> Result<String> {
        self.run(
            "apt-cache",
            false,
            &["show", "--no-all-versions", package],
            &self.dir,
        )
    }

    /// Downloads `packages` (names or name=version) into `dest`; returns
    /// the .debs' paths, in the order of `packages`.
    pub fn download(&self, packages: &[String], dest: &Path) -> Result<Vec<PathBuf>> {
        fs::create_dir_all(dest)?;
        let mut args = vec!["-q", "download"];
        args.extend(packages.iter().map(String::as_str));
        self.run("apt-get", false, &args, dest)?;
        let files = debs(dest);
        packages
            .iter()
            .map(|package| {
                // apt-get download names the file <name>_<version>_<arch>.deb.
                let prefix = format!("{}_", package.split('=').next().unwrap_or(package));
                files
                    .iter()
                    .find(|p| {
                        p.file_name()
                            .is_some_and(|f| f.to_string_lossy().starts_with(&prefix))
                    })
                    .cloned()
                    .with_context(|| {
                        format!("apt-get download {package}: no .deb in {}", dest.display())
                    })
            })
            .collect()
    }

    /// Installs packages into the host (setup's host tools), resolving with
    /// our lists and the host's dpkg status; `target` is a suite to prefer
    /// (`-t`).
    pub fn install_host(&self, target: &str, packages: &[&str]) -> Result<()> {
        let mut args = vec![
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            target,
        ];
        args.extend_from_slice(packages);
        let status = Command::new("apt-get")
            .args(self.options(true))
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(crate::stderr_as_stdout())
            .status()
            .context("running apt-get install")?;
        ensure!(
            status.success(),
            "apt-get {} failed ({status})",
            args.join(" ")
        );
        Ok(())
    }
}

fn debs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "deb"))
                .collect()
        })
        .unwrap_or_default()
}

/// The field `name` of a control record (first line only).
pub fn field<'a>(record: &'a str, name: &str) -> Option<&'a str> {
    record.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The dependencies of a control record pinned to one version
/// (`Depends:`/`Pre-Depends:` `name (= version)`), as (name, version): the
/// parts of a kernel its metapackages name. Of alternatives (`a (= 1) | b`)
/// the first pinned one; unpinned clauses (`kmod`, `linux-base (>= 4.3~)`)
/// are the installed system's, not the kernel's, and are left out.
pub fn pinned_dependencies(record: &str) -> Vec<(&str, &str)> {
    ["Pre-Depends", "Depends"]
        .iter()
        .filter_map(|f| field(record, f))
        .flat_map(|deps| deps.split(','))
        .filter_map(|clause| {
            clause.split('|').find_map(|alt| {
                let (name, rest) = alt.trim().split_once(char::is_whitespace)?;
                let version = rest
                    .trim()
                    .strip_prefix('(')?
                    .strip_suffix(')')?
                    .trim()
                    .strip_prefix('=')?
                    .trim();
                // `(= v)` only: `(>= v)` starts with '>' and is not stripped.
                Some((name.split(':').next().unwrap_or(name), version))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_from_deb822() {
        let text = "Types: deb\n# http://snapshot.example/archive\nURIs: http://mirror.example/debian\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security/\n\
                    Suites: bookworm-security\nComponents: main\n\n\
                    Types: deb\nURIs: https://other.example/node\nSuites: nodistro\n";
        assert_eq!(
            Mirrors::parse(text),
            Some(Mirrors {
                archive: "http://mirror.example/debian".into(),
                security: "http://mirror.example/debian-security".into(),
            })
        );
    }

    #[test]
    fn mirrors_from_one_line_sources() {
        let text = "deb https://cloud.example/apt cloud-sdk main\n\
                    deb [signed-by=/k.gpg arch=amd64] http://a.example/debian bookworm main\n\
                    # deb http://commented.example/debian-security bookworm-security main\n\
                    deb http://s.example/debian-security bookworm-security main\n";
        assert_eq!(
            Mirrors::parse(text),
            Some(Mirrors {
                archive: "http://a.example/debian".into(),
                security: "http://s.example/debian-security".into(),
            })
        );
        assert_eq!(
            Mirrors::parse("deb http://a.example/debian bookworm main\n"),
            None
        );
    }

    #[test]
    fn pinned_dependencies_of_metapackages() {
        // bookworm: one image package holds kernel and modules.
        let rec = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n\
                   Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n";
        assert_eq!(
            pinned_dependencies(rec),
            [("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")]
        );
        assert_eq!(field(rec, "Version"), Some("6.1.192-2"));
        // trixie-backports 7.x: the image is an empty meta; base, binary
        // and modules are pinned beside loose system dependencies.
        let rec = "Package: linux-image-7.3.4+deb13-cloud-amd64\nVersion: 7.3.4-1~bpo13+1\n\
                   Depends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                   linux-base-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), \
                   linux-binary-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), \
                   linux-modules-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1)\n\
                   Pre-Depends: linux-base (>= 4.17~)\n";
        assert_eq!(
            pinned_dependencies(rec),
            [
                ("linux-base-7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1"),
                ("linux-binary-7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1"),
                ("linux-modules-7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1"),
            ]
        );
        assert_eq!(
            pinned_dependencies("Depends: kmod, a-unsigned (= 1) | a, b (>= 2), c:any (= 3)\n"),
            [("a-unsigned", "1"), ("c", "3")]
        );
        assert!(pinned_dependencies("Package: x\n").is_empty());
    }
}
