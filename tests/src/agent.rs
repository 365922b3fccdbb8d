//! A running `conntrack-trace agent` (killed on drop) and the bits of HTTP
//! the tests need to read its endpoints.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{backend_args, binary};

/// A free loopback port (bound, then released for the process under test).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A minimal HTTP/1.0 GET (the test's own client: no HTTP crate needed).
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    read_response(&mut s)
}

/// Reads an HTTP/1.0 response to its end: (status, body).
fn read_response(s: &mut TcpStream) -> Result<(u16, String)> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((status, body.to_owned()))
}

/// A minimal HTTP/1.0 request with `method` and a body (the webhook's
/// tests); returns (status, body).
pub fn http_send(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    // The server may answer (413) before taking the whole body.
    let _ = s.write_all(body);
    read_response(&mut s)
}

/// A running agent, killed on drop.
pub struct Agent {
    child: Option<Child>,
    pub addr: SocketAddr,
    stderr: Option<std::thread::JoinHandle<String>>,
    ready: PathBuf,
}

impl Agent {
    pub fn start(extra: &[&str]) -> Result<Agent> {
        Agent::start_with(&binary(), extra, &[])
    }

    pub fn start_bin(bin: &Path, extra: &[&str]) -> Result<Agent> {
        Agent::start_with(bin, extra, &[])
    }

    /// Starts `bin agent` with `extra` arguments and `env` added to the
    /// environment; returns once it is ready (bounded: 60 s).
    pub fn start_with(bin: &Path, extra: &[&str], env: &[(&str, String)]) -> Result<Agent> {
        Agent::launch(bin, extra, env, true)
    }

    /// Starts the agent serving TLS (`--web-config-file` in `extra`):
    /// ready once its ready file exists (the caller checks /readyz over
    /// TLS).
    pub fn start_tls(extra: &[&str]) -> Result<Agent> {
        Agent::launch(&binary(), extra, &[], false)
    }

    fn launch(bin: &Path, extra: &[&str], env: &[(&str, String)], plain: bool) -> Result<Agent> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let ready =
            std::env::temp_dir().join(format!("ctt-agent-ready-{}-{port}", std::process::id()));
        let _ = fs::remove_file(&ready);
        let mut child = Command::new(bin)
            .arg("agent")
            .args(["--metrics-addr", &addr.to_string(), "--ready-file"])
            .arg(&ready)
            .args(backend_args())
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning the agent")?;
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = e.read_to_string(&mut s);
                s
            })
        });
        let mut a = Agent {
            child: Some(child),
            addr,
            stderr,
            ready: ready.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready.exists() {
            if let Some(st) = a.child.as_mut().context("no child")?.try_wait()? {
                bail!("agent exited before ready ({st}): {}", a.take_stderr());
            }
            ensure!(Instant::now() < deadline, "agent not ready after 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        if plain {
            let (code, _) = http_get(addr, "/readyz")?;
            ensure!(code == 200, "/readyz {code} after the ready file");
        }
        Ok(a)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    pub fn metrics(&self) -> Result<String> {
        let (code, body) = http_get(self.addr, "/metrics")?;
        ensure!(code == 200, "/metrics: {code}");
        Ok(body)
    }

    /// SIGTERM; returns stderr (bounded wait, must exit 0).
    pub fn stop(mut self) -> Result<String> {
        let mut child = self.child.take().context("stopped")?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let st = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("agent did not exit 30 s after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self.take_stderr();
        ensure!(st.success(), "agent failed ({st}): {err}");
        ensure!(!self.ready.exists(), "ready file withdrawn on exit");
        Ok(err)
    }

    pub fn kill(mut self) -> Result<String> {
        let mut child = self.child.take().context("stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(self.take_stderr())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file(&self.ready);
    }
}

/// The value of one sample line `name{labels} value` of an exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
