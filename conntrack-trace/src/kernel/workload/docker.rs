//! Docker / Moby: its Engine API on the local socket (`GET
//! /containers/json`, one request per refresh, never per event).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::Unreachable;

/// The daemon's socket: `DOCKER_HOST=unix://PATH`, else the default.
pub fn socket() -> PathBuf {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if h.starts_with("unix://") => PathBuf::from(&h["unix://".len()..]),
        _ => PathBuf::from("/var/run/docker.sock"),
    }
}

/// One container as `/containers/json` lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Listed {
    #[serde(rename = "Id")]
    pub id: String,
    /// `["/web"]`: names with a leading slash.
    #[serde(rename = "Names", default)]
    pub names: Vec<String>,
    #[serde(rename = "Image", default)]
    pub image: String,
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
}

impl Listed {
    pub fn name(&self) -> Option<&str> {
        self.names.first().map(|n| n.trim_start_matches('/'))
    }
}

/// Lists every container (running or not) by id.
pub fn list(sock: &Path) -> Result<BTreeMap<String, Listed>, Unreachable> {
    let body = get(sock, "/containers/json?all=1")?;
    let v: Vec<Listed> = serde_json::from_slice(&body).map_err(|e| Unreachable {
        path: sock.to_owned(),
        why: format!("bad answer to GET /containers/json: {e}"),
        permission: false,
    })?;
    Ok(v.into_iter().map(|c| (c.id.clone(), c)).collect())
}

/// One HTTP/1.1 GET with `Connection: close`, bounded in time; the body
/// (chunked or not).
fn get(sock: &Path, target: &str) -> Result<Vec<u8>, Unreachable> {
    let fail = |why: String, permission: bool| Unreachable {
        path: sock.to_owned(),
        why,
        permission,
    };
    let mut s = UnixStream::connect(sock).map_err(|e| {
        fail(
            e.to_string(),
            e.kind() == std::io::ErrorKind::PermissionDenied,
        )
    })?;
    let t = Some(Duration::from_secs(2));
    let _ = s.set_read_timeout(t);
    let _ = s.set_write_timeout(t);
    let req = format!("GET {target} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| fail(e.to_string(), false))?;
    let mut resp = Vec::new();
    // The listing of a host with thousands of containers stays far below.
    s.take(64 << 20)
        .read_to_end(&mut resp)
        .map_err(|e| fail(format!("reading the answer: {e}"), false))?;
    parse_response(&resp).map_err(|why| fail(why, false))
}

/// Splits an HTTP response into status and body, undoing chunking.
fn parse_response(resp: &[u8]) -> Result<Vec<u8>, String> {
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header in the answer")?;
    let head = String::from_utf8_lossy(&resp[..end]);
    let body = &resp[end + 4..];
    let status = head.lines().next().unwrap_or_default();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        return Err(format!("answered {status:?}"));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let nl = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_txt = String::from_utf8_lossy(&rest[..nl]);
        let size_txt = size_txt.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_txt, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_bodies() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]";
        assert_eq!(parse_response(r).unwrap(), b"[]");
        let r =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[{}\r\n1\r\n]\r\n0\r\n\r\n";
        assert_eq!(parse_response(r).unwrap(), b"[{}]");
        let r = b"HTTP/1.1 403 Forbidden\r\n\r\n";
        assert!(parse_response(r).unwrap_err().contains("403"));
        assert!(parse_response(b"garbage").is_err());
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab";
        assert!(parse_response(r).is_err());
    }

    #[test]
    fn listing_as_dockerd_20_10_writes_it() {
        // Trimmed from this machine's dockerd 20.10.24.
        let body = r#"[{"Id":"bc476804eb2af2157d625626809925a1bfa429e356d96195f836ba4a4dc30f0d","Names":["/ctt-web"],"Image":"ctt-busybox:test","ImageID":"sha256:26","Command":"/bin/sleep 300","Created":1,"Ports":[],"Labels":{"io.kubernetes.pod.name":"fake"},"State":"running","Status":"Up","HostConfig":{"NetworkMode":"none"},"NetworkSettings":{"Networks":{}},"Mounts":[]}]"#;
        let v: Vec<Listed> = serde_json::from_str(body).unwrap();
        assert_eq!(v[0].name(), Some("ctt-web"));
        assert_eq!(
            v[0].labels.as_ref().unwrap()["io.kubernetes.pod.name"],
            "fake"
        );
        let v: Vec<Listed> = serde_json::from_str(r#"[{"Id":"x","Labels":null}]"#).unwrap();
        assert_eq!(v[0].name(), None);
    }

    #[test]
    fn a_dead_socket_is_reported_not_silent() {
        let dir = std::env::temp_dir().join(format!("ctt-docker-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("docker.sock");
        let _ = std::fs::remove_file(&p);
        // A socket file nobody listens on any more.
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        let e = list(&p).unwrap_err();
        assert_eq!(e.path, p);
        assert!(e.why.contains("refused"), "{}", e.why);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
