//! `agent --web-config-file`: a real Prometheus scrapes the agent over TLS
//! with basic auth; a wrong password gets 401; plain HTTP to the TLS
//! listener is closed and the agent keeps serving; 200 slow clients do not
//! keep a real client from /metrics; a bad file fails the start with one
//! line and exit 2.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use conntrack_trace_tests::{
    agent::Agent,
    ctt, kernel_test, path_str,
    prometheus::{Prometheus, needs, temp_dir},
};

const USER: &str = "prom";
const PASSWORD: &str = "s3cret-for-the-test";
/// A TLS record header announcing a 512-byte ClientHello, and its first
/// bytes: what a slow client sends a byte at a time.
const SLOW_HELLO: [u8; 9] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

/// A self-signed certificate for 127.0.0.1 (openssl CLI), a bcrypt user,
/// and the web config naming them (relative paths: resolved against the
/// file's directory).
fn web_config(dir: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=conntrack-trace-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = bcrypt::hash(PASSWORD, bcrypt::DEFAULT_COST)?;
    fs::write(
        dir.join("web.yml"),
        format!(
            "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\nbasic_auth_users:\n  {USER}: '{hash}'\n"
        ),
    )?;
    Ok(())
}

/// `curl` over TLS (trusting only the test's certificate): status code
/// and seconds taken; `auth` as `user:password`.
fn curl(
    dir: &Path,
    addr: SocketAddr,
    path: &str,
    auth: Option<&str>,
) -> Result<(u16, f64, String)> {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "5", "--cacert"])
        .arg(dir.join("cert.pem"))
        .args([
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-w",
            "%{http_code} %{time_total}",
        ]);
    if let Some(a) = auth {
        c.args(["-u", a]);
    }
    let out = c.arg(format!("https://{addr}{path}")).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = text.lines().last().unwrap_or_default().to_owned();
    let (code, secs) = last.split_once(' ').context(format!(
        "curl: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    ))?;
    Ok((code.parse()?, secs.parse()?, text))
}

/// Refused before anything is loaded: one line naming the file, exit 2.
#[test]
fn bad_web_config_is_a_usage_error() -> Result<()> {
    let dir = temp_dir("webbad")?;
    let cases = [
        (
            "unknown.yml",
            "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_ca_file: ca\n",
            "unknown field `client_ca_file`",
        ),
        (
            "hash.yml",
            "basic_auth_users:\n  prom: not-a-hash\n",
            "not a bcrypt hash",
        ),
        (
            "cert.yml",
            "tls_server_config:\n  cert_file: missing.pem\n  key_file: missing.key\n",
            "cert_file",
        ),
    ];
    for (name, text, want) in cases {
        let p = dir.join(name);
        fs::write(&p, text)?;
        let (code, _, err) = ctt(&[
            "agent",
            "--metrics-addr",
            "127.0.0.1:0",
            "--web-config-file",
            path_str(&p),
        ])?;
        eprintln!("{name}: exit {code}: {}", err.trim());
        assert_eq!(code, 2, "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth() -> Result<()> {
    let test = "prometheus_scrapes_over_tls_with_basic_auth";
    if !needs("prometheus", test) {
        return Ok(());
    }
    // The agent attaches its programs: nothing else may be flooding.
    let Some(_lock) = kernel_test(test)? else {
        return Ok(());
    };
    let dir = temp_dir("web")?;
    web_config(&dir)?;
    let web = dir.join("web.yml");
    let agent = Agent::start_tls(&["--web-config-file", path_str(&web)])?;
    let addr = agent.addr;
    let auth = format!("{USER}:{PASSWORD}");

    let (code, first, _) = curl(&dir, addr, "/metrics", Some(&auth))?;
    assert_eq!(code, 200, "/metrics with the right password");
    let (code, again, _) = curl(&dir, addr, "/metrics", Some(&auth))?;
    assert_eq!(code, 200);
    let (code, _, head) = curl(&dir, addr, "/metrics", Some(&format!("{USER}:wrong")))?;
    assert_eq!(code, 401, "wrong password: {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic"),
        "{head}"
    );
    let (code, _, _) = curl(&dir, addr, "/metrics", None)?;
    assert_eq!(code, 401, "no credentials");
    let (code, _, _) = curl(&dir, addr, "/readyz", None)?;
    assert_eq!(code, 200, "probes need no credentials");
    // No --record-dir: the webhook has nothing to pin.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert"])
        .arg(dir.join("cert.pem"))
        .args(["-u", &auth, "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-X", "POST", "--data", "{}"])
        .arg(format!("https://{addr}/alertmanager"))
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "409",
        "webhook without a recorder"
    );
    eprintln!("first /metrics (bcrypt) {first:.3} s, then {again:.3} s (remembered)");

    // Plain HTTP to the TLS listener: the connection is closed, no answer.
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    eprintln!(
        "plain HTTP to the TLS port: {r:?}, {} bytes back",
        buf.len()
    );
    assert!(
        !String::from_utf8_lossy(&buf).contains("conntrack_trace_"),
        "no metrics in clear"
    );
    ensure!(r.is_ok() || buf.is_empty(), "closed: {r:?}");
    assert_eq!(
        curl(&dir, addr, "/metrics", Some(&auth))?.0,
        200,
        "still serving"
    );

    // A real Prometheus, over TLS with basic auth.
    let prom = Prometheus::start_config(&format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n  - job_name: conntrack-trace\n    scheme: https\n\
         \x20   tls_config:\n      ca_file: {}\n\
         \x20   basic_auth:\n      username: {USER}\n      password: {PASSWORD}\n\
         \x20   static_configs:\n      - targets: ['{addr}']\n",
        dir.join("cert.pem").display()
    ))?;
    let up = prom.wait_for("up{job=\"conntrack-trace\"}", 1.0, Duration::from_secs(30))?;
    assert_eq!(up, Some(1.0), "Prometheus scrapes over TLS with basic auth");
    let info = prom.query("conntrack_trace_info")?;
    assert_eq!(info.len(), 1, "{info:?}");

    // 200 slow clients: half send nothing, half a byte a second (bounded
    // to 10 s); meanwhile a real client gets /metrics within 2 s and
    // /readyz stays 200.
    let t0 = Instant::now();
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .collect::<std::io::Result<_>>()?;
    let mut worst = 0.0f64;
    let mut polls = 0;
    let mut closed_by_agent = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        // A ClientHello's record header, then its body, a byte at a time.
        let byte = SLOW_HELLO[(polls as usize).min(SLOW_HELLO.len() - 1)];
        for s in slow.iter_mut().skip(100) {
            let _ = s.write_all(&[byte]);
        }
        let (code, secs, _) = curl(&dir, addr, "/metrics", Some(&auth))?;
        assert_eq!(code, 200, "/metrics under 200 slow clients");
        worst = worst.max(secs);
        assert_eq!(
            curl(&dir, addr, "/readyz", None)?.0,
            200,
            "/readyz under 200 slow clients"
        );
        polls += 1;
        std::thread::sleep(Duration::from_millis(700));
    }
    // The handshake bound (5 s) closed every slow client by now.
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut b = [0u8; 64];
        // Closed: end of stream (or reset) after whatever alert came.
        loop {
            match s.read(&mut b) {
                Ok(n) if n > 0 => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                _ => {
                    closed_by_agent += 1;
                    break;
                }
            }
        }
    }
    drop(slow);
    eprintln!(
        "200 slow clients for {:.1} s: {polls} polls, slowest /metrics {worst:.3} s; {closed_by_agent} of 200 closed by the agent",
        t0.elapsed().as_secs_f64()
    );
    assert!(worst < 2.0, "/metrics within 2 s: {worst}");
    assert_eq!(
        closed_by_agent, 200,
        "the handshake bound closed every slow client"
    );
    assert_eq!(up_now(&prom)?, 1.0, "Prometheus still scrapes");
    agent.stop()?;
    let _ = fs::remove_dir_all(&dir);
    Ok(())
}

fn up_now(prom: &Prometheus) -> Result<f64> {
    Ok(prom
        .query("up{job=\"conntrack-trace\"}")?
        .first()
        .map_or(0.0, |x| x.1))
}
