//! `cargo xtask image`: the agent's container image as an OCI image layout
//! (image-spec 1.1: `oci-layout`, `index.json`, `blobs/sha256/`), built
//! without a daemon or a registry from deploy/Containerfile and the static
//! musl binary. The Containerfile stays the one definition of the image
//! (`podman build` reads it too); this reads its few instructions.
//!
//! Deterministic: the layer's one entry has uid/gid 0, mode 0755 and the
//! mtime SOURCE_DATE_EPOCH (0 when unset), gzip's header carries no time
//! or name, and JSON keys are sorted, so the same binary gives the same
//! digests on every run and machine.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::workspace_root;

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// The OCI layout directory to write (replaced when it already holds
    /// one). Default: target/image/oci.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also write the layout as one tar file (an OCI archive: what
    /// `skopeo copy oci-archive:FILE ...` or `ctr images import FILE`
    /// read).
    #[arg(long, value_name = "FILE")]
    pub tarball: Option<PathBuf>,
}

/// Where `cargo xtask image` (and `cargo xtask test`) put the layout; the
/// runc test (tests/tests/oci.rs) reads it from here.
pub fn default_out() -> PathBuf {
    workspace_root().join("target/image/oci")
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Builds the musl binary and writes the layout (and the tarball);
/// returns the layout's directory.
pub fn run(a: &Args) -> Result<PathBuf> {
    crate::setup::musl_target()?;
    let bin = crate::vm::build_musl_release()?;
    let path = workspace_root().join("deploy/Containerfile");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let spec = Containerfile::parse(&text).with_context(|| format!("{}", path.display()))?;
    // The Containerfile names the binary by its path in the workspace.
    ensure!(
        workspace_root().join(&spec.copy_src) == bin,
        "{}: COPY {} is not the musl release binary {}",
        path.display(),
        spec.copy_src,
        bin.display()
    );
    let data = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    let image = Image::build(&spec, &data, source_date_epoch()?)?;
    let out = a.out.clone().unwrap_or_else(default_out);
    image.write_layout(&out)?;
    eprintln!(
        "xtask image: {} (manifest {}, layer {} bytes)",
        out.display(),
        image.manifest_digest,
        image.layer_size
    );
    if let Some(t) = &a.tarball {
        fs::write(t, image.tarball()?).with_context(|| format!("writing {}", t.display()))?;
        eprintln!("xtask image: {}", t.display());
    }
    Ok(out)
}

/// The layer entries' mtime: SOURCE_DATE_EPOCH (reproducible-builds.org),
/// else 0.
fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?}: not a number of seconds")),
        Err(_) => Ok(0),
    }
}

/// The instructions of deploy/Containerfile this builder supports: an image
/// FROM scratch with one COPY of a file.
#[derive(Debug, PartialEq)]
pub struct Containerfile {
    pub copy_src: String,
    pub copy_dst: String,
    pub user: String,
    /// "9637/tcp"
    pub expose: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

impl Containerfile {
    pub fn parse(text: &str) -> Result<Containerfile> {
        let mut from = None;
        let mut copy = None;
        let mut f = Containerfile {
            copy_src: String::new(),
            copy_dst: String::new(),
            user: String::new(),
            expose: Vec::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("line {}", n + 1);
            ensure!(
                !line.ends_with('\\'),
                "{}: continuation lines are not supported",
                at()
            );
            let (instr, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            // Exec form only: a shell form would need a shell in the image.
            let exec = || -> Result<Vec<String>> {
                serde_json::from_str(rest)
                    .with_context(|| format!("{}: {instr} must be a JSON array (exec form)", at()))
            };
            match instr.to_ascii_uppercase().as_str() {
                "FROM" => from = Some(rest.to_owned()),
                "COPY" => {
                    let w: Vec<&str> = rest.split_whitespace().collect();
                    let [src, dst] = w[..] else {
                        bail!("{}: COPY takes one source and a destination", at());
                    };
                    ensure!(
                        copy.replace(()).is_none(),
                        "{}: only one COPY is supported",
                        at()
                    );
                    ensure!(
                        dst.starts_with('/') && !dst.ends_with('/'),
                        "{}: COPY's destination must be an absolute file path",
                        at()
                    );
                    f.copy_src = src.to_owned();
                    f.copy_dst = dst.to_owned();
                }
                "USER" => f.user = rest.to_owned(),
                "EXPOSE" => {
                    for p in rest.split_whitespace() {
                        f.expose.push(if p.contains('/') {
                            p.to_owned()
                        } else {
                            format!("{p}/tcp")
                        });
                    }
                }
                "ENTRYPOINT" => f.entrypoint = exec()?,
                "CMD" => f.cmd = exec()?,
                other => bail!(
                    "{}: {other} is not supported by `cargo xtask image` \
                     (FROM scratch, COPY, USER, EXPOSE, ENTRYPOINT, CMD)",
                    at()
                ),
            }
        }
        ensure!(
            from.as_deref() == Some("scratch"),
            "the image must be FROM scratch (found {from:?})"
        );
        ensure!(copy.is_some(), "no COPY of the binary");
        Ok(f)
    }
}

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A regular file's or directory's ustar header: root-owned, fixed mtime.
fn header(path: &str, size: u64, mode: u32, mtime: u64, dir: bool) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .with_context(|| format!("tar path {path}"))?;
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_entry_type(if dir {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    h.set_cksum();
    Ok(h)
}

/// A tar archive of `(path, data)` entries in the given order (`None` data:
/// a directory).
fn tar_of(entries: &[(&str, Option<&[u8]>, u32)], mtime: u64) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in entries {
        let d = data.unwrap_or_default();
        let h = header(path, d.len() as u64, *mode, mtime, data.is_none())?;
        b.append(&h, d)
            .with_context(|| format!("tar entry {path}"))?;
    }
    b.into_inner().context("finishing the tar")
}

/// The image's blobs, ready to write.
pub struct Image {
    /// (sha256 hex, content): layer, config, manifest.
    blobs: Vec<(String, Vec<u8>)>,
    index: Vec<u8>,
    pub manifest_digest: String,
    pub layer_size: usize,
    mtime: u64,
}

impl Image {
    pub fn build(spec: &Containerfile, binary: &[u8], mtime: u64) -> Result<Image> {
        // Layer paths are relative to the root ("conntrack-trace").
        let path = spec.copy_dst.trim_start_matches('/');
        let tar = tar_of(&[(path, Some(binary), 0o755)], mtime)?;
        // GzBuilder writes mtime 0, no file name and OS "unknown".
        let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).context("gzip")?;
        let layer = gz.finish().context("gzip")?;
        let ports: serde_json::Map<String, Value> =
            spec.expose.iter().map(|p| (p.clone(), json!({}))).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "User": spec.user,
                "ExposedPorts": ports,
                "Entrypoint": spec.entrypoint,
                "Cmd": spec.cmd,
            },
            "rootfs": {
                "type": "layers",
                "diff_ids": [format!("sha256:{}", sha256(&tar))],
            },
        }))?;
        let descriptor = |media: &str, data: &[u8]| {
            json!({
                "mediaType": media,
                "digest": format!("sha256:{}", sha256(data)),
                "size": data.len(),
            })
        };
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": descriptor(CONFIG, &config),
            "layers": [descriptor(LAYER, &layer)],
        }))?;
        let version = env!("CARGO_PKG_VERSION");
        let mut m = descriptor(MANIFEST, &manifest);
        // The tag (image-spec's ref.name) and the full name containerd's
        // import uses: the DaemonSet's `image: conntrack-trace:VERSION`.
        m["annotations"] = json!({
            "org.opencontainers.image.ref.name": version,
            "io.containerd.image.name": format!("docker.io/library/conntrack-trace:{version}"),
        });
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [m],
        }))?;
        Ok(Image {
            manifest_digest: format!("sha256:{}", sha256(&manifest)),
            layer_size: layer.len(),
            blobs: [layer, config, manifest]
                .into_iter()
                .map(|b| (sha256(&b), b))
                .collect(),
            index,
            mtime,
        })
    }

    const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

    /// Writes the layout into `out`, replacing a previous layout there (a
    /// non-empty directory that is not one is refused, not deleted).
    pub fn write_layout(&self, out: &Path) -> Result<()> {
        if out.exists() {
            let empty = fs::read_dir(out)
                .with_context(|| format!("reading {}", out.display()))?
                .next()
                .is_none();
            ensure!(
                empty || out.join("oci-layout").is_file(),
                "{}: exists and is not an OCI layout; not replacing it",
                out.display()
            );
            fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
        }
        let blobs = out.join("blobs/sha256");
        fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        let write = |p: PathBuf, data: &[u8]| {
            fs::write(&p, data).with_context(|| format!("writing {}", p.display()))
        };
        for (hex, data) in &self.blobs {
            write(blobs.join(hex), data)?;
        }
        write(out.join("index.json"), &self.index)?;
        write(out.join("oci-layout"), Self::OCI_LAYOUT)
    }

    /// The layout as one tar (directories first, blobs by digest).
    pub fn tarball(&self) -> Result<Vec<u8>> {
        let mut blobs: Vec<(String, &[u8])> = self
            .blobs
            .iter()
            .map(|(hex, d)| (format!("blobs/sha256/{hex}"), d.as_slice()))
            .collect();
        blobs.sort();
        let mut entries: Vec<(&str, Option<&[u8]>, u32)> = vec![
            ("oci-layout", Some(Self::OCI_LAYOUT), 0o644),
            ("index.json", Some(&self.index), 0o644),
            ("blobs/", None, 0o755),
            ("blobs/sha256/", None, 0o755),
        ];
        entries.extend(blobs.iter().map(|(p, d)| (p.as_str(), Some(*d), 0o644)));
        tar_of(&entries, self.mtime)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn spec() -> Containerfile {
        let text = fs::read_to_string(workspace_root().join("deploy/Containerfile")).unwrap();
        Containerfile::parse(&text).unwrap()
    }

    /// Real bytes to package: the start of this test executable (all of
    /// it takes a debug build's gzip half a minute).
    fn binary() -> Vec<u8> {
        let mut b = fs::read(std::env::current_exe().unwrap()).unwrap();
        b.truncate(1 << 20);
        b
    }

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("xtask-image-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    /// Every file under `dir`, relative path and content, sorted.
    fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v = Vec::new();
        for sub in ["", "blobs/sha256"] {
            for e in fs::read_dir(dir.join(sub)).unwrap().flatten() {
                if e.path().is_file() {
                    let name = Path::new(sub).join(e.file_name());
                    v.push((
                        name.to_string_lossy().into_owned(),
                        fs::read(e.path()).unwrap(),
                    ));
                }
            }
        }
        v.sort();
        v
    }

    fn sh(cmd: &str) -> String {
        let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn containerfile_is_the_agents_image() {
        let s = spec();
        assert_eq!(
            s.copy_src,
            format!("target/{}/release/conntrack-trace", crate::vm::MUSL)
        );
        assert_eq!(s.copy_dst, "/conntrack-trace");
        assert_eq!(s.user, "0");
        assert_eq!(s.expose, ["9637/tcp"]);
        assert_eq!(s.entrypoint, ["/conntrack-trace"]);
        assert_eq!(s.cmd, ["agent", "--metrics-addr=0.0.0.0:9637"]);
    }

    #[test]
    fn unsupported_containerfiles_are_refused_by_line() {
        let base = "FROM scratch\nCOPY a /a\n";
        for (text, want) in [
            ("FROM debian\nCOPY a /a\n", "must be FROM scratch"),
            ("FROM scratch\n", "no COPY"),
            (&format!("{base}RUN true\n"), "line 3: RUN is not supported"),
            (
                &format!("{base}CMD agent\n"),
                "line 3: CMD must be a JSON array",
            ),
            (&format!("{base}COPY b /b\n"), "line 3: only one COPY"),
            ("FROM scratch\nCOPY a a\n", "absolute file path"),
        ] {
            let e = format!("{:#}", Containerfile::parse(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn two_builds_give_identical_layouts_and_tarballs() {
        let (s, bin) = (spec(), binary());
        let (a, b) = (scratch("a"), scratch("b"));
        let one = Image::build(&s, &bin, 0).unwrap();
        one.write_layout(&a).unwrap();
        let two = Image::build(&s, &bin, 0).unwrap();
        two.write_layout(&b).unwrap();
        assert_eq!(one.manifest_digest, two.manifest_digest);
        assert_eq!(tree(&a), tree(&b));
        assert_eq!(one.tarball().unwrap(), two.tarball().unwrap());
        // Writing again replaces the layout in place.
        two.write_layout(&a).unwrap();
        assert_eq!(tree(&a), tree(&b));
        // The mtime is part of the layer: another epoch, another digest.
        let later = Image::build(&s, &bin, 1_700_000_000).unwrap();
        assert_ne!(later.manifest_digest, one.manifest_digest);
        let _ = fs::remove_dir_all(&a);
        let _ = fs::remove_dir_all(&b);
    }

    #[test]
    fn a_directory_that_is_not_a_layout_is_not_replaced() {
        let d = scratch("keep");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("precious"), "x").unwrap();
        let e = Image::build(&spec(), b"x", 0)
            .unwrap()
            .write_layout(&d)
            .unwrap_err();
        assert!(format!("{e}").contains("is not an OCI layout"), "{e}");
        assert!(d.join("precious").exists());
        let _ = fs::remove_dir_all(&d);
    }

    /// The layout read back with other tools: sha256sum for every digest,
    /// gzip + tar for the layer (its one entry root-owned, 0755, mtime 0),
    /// and tar for the tarball.
    #[test]
    fn layout_checks_with_independent_tools() {
        let bin = binary();
        let d = scratch("check");
        let image = Image::build(&spec(), &bin, 0).unwrap();
        image.write_layout(&d).unwrap();
        let blob = |digest: &Value| {
            let hex = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
            d.join("blobs/sha256").join(hex)
        };
        let read = |p: PathBuf| -> Value { serde_json::from_slice(&fs::read(p).unwrap()).unwrap() };
        let index = read(d.join("index.json"));
        let m = &index["manifests"][0];
        assert_eq!(m["mediaType"], MANIFEST);
        let manifest = read(blob(&m["digest"]));
        let config = read(blob(&manifest["config"]["digest"]));
        let layer = blob(&manifest["layers"][0]["digest"]);
        assert_eq!(manifest["layers"][0]["mediaType"], LAYER);
        let sums = sh(&format!(
            "cd {} && sha256sum blobs/sha256/* | sed 's,blobs/sha256/,,'",
            d.display()
        ));
        for l in sums.lines() {
            let (sum, name) = l.split_once("  ").unwrap();
            assert_eq!(sum, name, "blob content matches its name");
        }
        assert_eq!(sums.lines().count(), 3);
        for desc in [m, &manifest["config"], &manifest["layers"][0]] {
            let size = fs::metadata(blob(&desc["digest"])).unwrap().len();
            assert_eq!(desc["size"], size);
        }
        let layer = layer.display();
        let diff = sh(&format!("gzip -dc {layer} | sha256sum"));
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", &diff[..64])
        );
        let list = sh(&format!(
            "TZ=UTC tar --numeric-owner --full-time -tvzf {layer}"
        ));
        let want = format!(
            "-rwxr-xr-x 0/0 {} 1970-01-01 00:00:00 conntrack-trace",
            bin.len()
        );
        assert_eq!(list.split_whitespace().collect::<Vec<_>>().join(" "), want);
        assert_eq!(config["config"]["Entrypoint"], json!(["/conntrack-trace"]));
        assert_eq!(config["config"]["ExposedPorts"], json!({"9637/tcp": {}}));
        assert_eq!(
            (&config["os"], &config["architecture"]),
            (&json!("linux"), &json!("amd64"))
        );
        let t = d.with_extension("tar");
        fs::write(&t, image.tarball().unwrap()).unwrap();
        let names = sh(&format!("tar -tf {}", t.display()));
        assert_eq!(
            names.lines().take(4).collect::<Vec<_>>(),
            ["oci-layout", "index.json", "blobs/", "blobs/sha256/"]
        );
        assert_eq!(names.lines().count(), 7);
        let _ = fs::remove_dir_all(&d);
        let _ = fs::remove_file(&t);
    }
}
