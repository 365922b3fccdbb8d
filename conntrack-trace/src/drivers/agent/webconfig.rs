//! `--web-config-file`: TLS and basic authentication for the agent's HTTP
//! server, in the Prometheus exporter-toolkit's file format
//! (<https://github.com/prometheus/exporter-toolkit/blob/master/docs/web-configuration.md>),
//! so one file serves node_exporter and the agent alike. Two of its parts
//! are supported — `tls_server_config` (`cert_file`, `key_file`) and
//! `basic_auth_users` (user: bcrypt hash) — and every other key is refused
//! by name rather than silently ignored (a `client_ca_file` that did
//! nothing would be a false sense of security).

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// The parsed file: a TLS configuration and the users, either optional.
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: Option<Arc<Auth>>,
}

/// What is wrong with the file, in one line naming it.
#[derive(Debug, thiserror::Error)]
#[error("--web-config-file {path}: {why}")]
pub struct WebConfigError {
    path: String,
    why: String,
}

impl WebConfig {
    /// Reads and checks `path`: the YAML, the certificate chain and key
    /// (paths relative to the file's directory, as exporter-toolkit does),
    /// and that every user's hash is a bcrypt hash.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let err = |why: String| WebConfigError {
            path: path.display().to_string(),
            why: one_line(&why),
        };
        let text = fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_norway::from_str(&text).map_err(|e| err(e.to_string()))?
        };
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = match file.tls_server_config {
            Some(t) => Some(Arc::new(
                tls_config(&base.join(&t.cert_file), &base.join(&t.key_file)).map_err(err)?,
            )),
            None => None,
        };
        for (user, hash) in &file.basic_auth_users {
            // A bcrypt hash: $2a$/$2b$/$2y$, cost, 53 characters of salt
            // and hash. Checked now, so a typo fails the start, not every
            // scrape.
            hash.parse::<bcrypt::HashParts>()
                .map_err(|e| err(format!("basic_auth_users: {user}: not a bcrypt hash ({e})")))?;
        }
        let auth = (!file.basic_auth_users.is_empty()).then(|| {
            Arc::new(Auth {
                users: file.basic_auth_users,
                verified: Mutex::default(),
            })
        });
        Ok(WebConfig { tls, auth })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, String> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("cert_file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "cert_file {}: no PEM certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("key_file {}: {e}", key.display()))?;
    // ring, not aws-lc-rs: no C/cmake build of aws-lc in the tree. rustls
    // 0.23.48 deprecates ring's provider for lacking post-quantum key
    // exchange, which a scrape endpoint's confidentiality can do without.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("cert_file/key_file: {e}"))?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

/// The basic-auth users, and the (user, password) pairs already verified.
///
/// A bcrypt check costs tens of milliseconds of CPU by design; Prometheus
/// sends the same credentials with every scrape, so a successful check is
/// remembered (as a SHA-256 of user and password, never the password) and
/// a scrape every second costs one hash, not one bcrypt. Failures are not
/// remembered: each costs a bcrypt, and the server runs at most
/// [`BCRYPT_AT_ONCE`] at a time off the event loop.
pub struct Auth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<[u8; 32]>>,
}

/// Concurrent bcrypt checks (each on a blocking thread).
pub const BCRYPT_AT_ONCE: usize = 2;
/// Verified pairs remembered (more distinct ones clear the memory).
const VERIFIED_CAP: usize = 64;

/// A bcrypt hash of nothing anyone knows: an unknown user costs the same
/// as a wrong password (no user enumeration by timing).
const DUMMY: &str = "$2b$10$CwTycUXWue0Thq9StjUM0uJ8.xu7lsw1Rb2pSJGg2RpNw5kqlQ2ua";

/// Basic credentials from an `Authorization` header value.
pub fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    let b64 = header.strip_prefix(b"Basic ")?;
    let raw = base64_decode(b64.trim_ascii())?;
    let s = String::from_utf8(raw).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, chunk) in s.chunks(4).enumerate() {
        let last = i == s.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

impl Auth {
    fn key(user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(user.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Already verified: no bcrypt needed.
    pub fn known(&self, user: &str, password: &str) -> bool {
        let k = Self::key(user, password);
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&k)
    }

    /// The slow check (call off the event loop); remembers a success.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let (hash, known_user) = match self.users.get(user) {
            Some(h) => (h.as_str(), true),
            None => (DUMMY, false),
        };
        let ok = bcrypt::verify(password, hash).unwrap_or(false) && known_user;
        if ok {
            let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if v.len() >= VERIFIED_CAP {
                v.clear();
            }
            v.insert(Self::key(user, password));
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn basic_header_decodes() {
        // "prom:secret"
        assert_eq!(
            basic_credentials(b"Basic cHJvbTpzZWNyZXQ="),
            Some(("prom".into(), "secret".into()))
        );
        assert_eq!(basic_credentials(b"Bearer x"), None);
        assert_eq!(basic_credentials(b"Basic !!!!"), None);
        assert_eq!(basic_credentials(b"Basic cHJvbQ=="), None, "no colon");
        assert_eq!(base64_decode(b"YQ==").unwrap(), b"a");
        assert_eq!(base64_decode(b"YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode(b"YWJj").unwrap(), b"abc");
        assert_eq!(base64_decode(b"YQ==YWJj"), None);
    }

    #[test]
    fn users_verify_and_are_remembered() {
        let t = crate::formats::capture::tests::TempDir::new("webcfg");
        let hash = bcrypt::hash("secret", 4).unwrap();
        let p = write(
            &t.0,
            "web.yml",
            &format!("basic_auth_users:\n  prom: '{hash}'\n"),
        );
        let c = WebConfig::load(&p).unwrap();
        assert!(c.tls.is_none());
        let a = c.auth.unwrap();
        assert!(!a.known("prom", "secret"));
        assert!(!a.verify("prom", "wrong"));
        assert!(!a.verify("nobody", "secret"));
        assert!(a.verify("prom", "secret"));
        assert!(a.known("prom", "secret"));
        assert!(!a.known("prom", "wrong"));
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let t = crate::formats::capture::tests::TempDir::new("webcfg-bad");
        let cases = [
            (
                "unknown.yml",
                "http_server_config:\n  http2: false\n",
                "unknown field `http_server_config`",
            ),
            (
                "tlskey.yml",
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n",
                "unknown field `client_ca_file`",
            ),
            (
                "hash.yml",
                "basic_auth_users:\n  prom: plain\n",
                "prom: not a bcrypt hash",
            ),
            ("yaml.yml", "basic_auth_users: [\n", "--web-config-file"),
            (
                "cert.yml",
                "tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n",
                "cert_file",
            ),
        ];
        for (name, text, want) in cases {
            let p = write(&t.0, name, text);
            let e = WebConfig::load(&p).err().unwrap().to_string();
            assert!(e.contains(want), "{name}: {e}");
            assert!(!e.contains('\n'), "{name}: one line: {e}");
        }
        let e = WebConfig::load(&t.0.join("none.yml"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("none.yml"), "{e}");
        // An empty file is valid: neither TLS nor users.
        let p = write(&t.0, "empty.yml", "");
        let c = WebConfig::load(&p).unwrap();
        assert!(c.tls.is_none() && c.auth.is_none());
    }
}
