//! Real Prometheus and Alertmanager servers (Debian's packages) for the
//! agent's tests: each on a free loopback port, with its configuration and
//! storage in a temporary directory; killed (and the directory removed)
//! on drop.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    Daemon,
    agent::{free_port, http_get},
};

/// In the VM image there is no Prometheus or Alertmanager (busybox
/// userland): the test says so and passes.
pub fn needs(tool: &str, test: &str) -> bool {
    if std::env::var_os("CONNTRACK_TRACE_VM").is_some() {
        eprintln!("SKIPPED {test}: {tool} is not in the VM image (it runs on the host)");
        return false;
    }
    true
}

pub fn temp_dir(tag: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "ctt-agent-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    fs::create_dir_all(&d)?;
    Ok(d)
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Starts `cmd args`, logging to `dir/log`, and waits (60 s) until
/// `ready` answers 200 on `addr`.
fn spawn_ready(
    cmd: &str,
    args: &[String],
    dir: &std::path::Path,
    addr: SocketAddr,
    ready: &str,
) -> Result<Daemon> {
    let log = fs::File::create(dir.join(format!("{cmd}.log")))?;
    let child = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawning {cmd} (`cargo xtask setup` installs it)"))?;
    let d = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = http_get(addr, ready) {
            return Ok(d);
        }
        ensure!(
            Instant::now() < deadline,
            "{cmd} not ready after 60 s: {}",
            fs::read_to_string(dir.join(format!("{cmd}.log"))).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Prometheus server.
pub struct Prometheus {
    _daemon: Daemon,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Prometheus {
    /// Scraping `target` (plain HTTP) every second.
    pub fn start(target: SocketAddr) -> Result<Prometheus> {
        Prometheus::start_config(&format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: conntrack-trace\n    static_configs:\n      - targets: ['{target}']\n"
        ))
    }

    /// With `config` as its prometheus.yml.
    pub fn start_config(config: &str) -> Result<Prometheus> {
        let dir = temp_dir("prom")?;
        let cfg = dir.join("prometheus.yml");
        fs::write(&cfg, config)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let args = vec![
            format!("--config.file={}", cfg.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--storage.tsdb.retention.time=1h".into(),
        ];
        let daemon =
            spawn_ready("prometheus", &args, &dir, addr, "/-/ready").inspect_err(|_| {
                let _ = fs::remove_dir_all(&dir);
            })?;
        Ok(Prometheus {
            _daemon: daemon,
            addr,
            dir,
        })
    }

    fn api(&self, path: &str, q: &str) -> Result<serde_json::Value> {
        let (code, body) = http_get(self.addr, &format!("{path}query={}", urlencode(q)))?;
        ensure!(code == 200, "query `{q}`: HTTP {code}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        ensure!(v["status"] == "success", "query `{q}`: {body}");
        Ok(v)
    }

    /// An instant query; each result as (labels, value).
    pub fn query(&self, q: &str) -> Result<Vec<(serde_json::Value, f64)>> {
        let v = self.api("/api/v1/query?", q)?;
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().context("no result array")? {
            let val: f64 = r["value"][1].as_str().context("no value")?.parse()?;
            out.push((r["metric"].clone(), val));
        }
        Ok(out)
    }

    /// A range query over the last `range` (step 1 s), as Grafana's
    /// time-series panels ask; each series as (labels, values).
    pub fn query_range(
        &self,
        q: &str,
        range: Duration,
    ) -> Result<Vec<(serde_json::Value, Vec<f64>)>> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let start = now.saturating_sub(range);
        let v = self.api(
            &format!(
                "/api/v1/query_range?start={:.3}&end={:.3}&step=1&",
                start.as_secs_f64(),
                now.as_secs_f64()
            ),
            q,
        )?;
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().context("no result array")? {
            let vals = r["values"]
                .as_array()
                .context("no values")?
                .iter()
                .filter_map(|p| p[1].as_str()?.parse().ok())
                .collect();
            out.push((r["metric"].clone(), vals));
        }
        Ok(out)
    }

    /// Waits (bounded) until `q` returns exactly one sample equal to `want`;
    /// returns the last value seen either way.
    pub fn wait_for(&self, q: &str, want: f64, within: Duration) -> Result<Option<f64>> {
        let deadline = Instant::now() + within;
        let mut last = None;
        while Instant::now() < deadline {
            let r = self.query(q)?;
            last = r.first().map(|x| x.1);
            if r.len() == 1 && last == Some(want) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(last)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// An Alertmanager (Debian's `prometheus-alertmanager`), clustering off.
pub struct Alertmanager {
    _daemon: Daemon,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl Alertmanager {
    /// With `config` as its alertmanager.yml.
    pub fn start(config: &str) -> Result<Alertmanager> {
        let dir = temp_dir("am")?;
        let cfg = dir.join("alertmanager.yml");
        fs::write(&cfg, config)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let args = vec![
            format!("--config.file={}", cfg.display()),
            format!("--storage.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            // No peers: no gossip settling before the first notification.
            "--cluster.listen-address=".into(),
        ];
        let daemon = spawn_ready("prometheus-alertmanager", &args, &dir, addr, "/-/ready")
            .inspect_err(|_| {
                let _ = fs::remove_dir_all(&dir);
            })?;
        Ok(Alertmanager {
            _daemon: daemon,
            addr,
            dir,
        })
    }

    /// `GET /api/v2/alerts` (active, as Alertmanager's UI lists them).
    pub fn alerts(&self) -> Result<Vec<serde_json::Value>> {
        let (code, body) = http_get(self.addr, "/api/v2/alerts?active=true")?;
        ensure!(code == 200, "/api/v2/alerts: HTTP {code}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus-alertmanager.log")).unwrap_or_default()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
