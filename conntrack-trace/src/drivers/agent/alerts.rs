//! `POST /alertmanager`: Alertmanager's webhook (payload version 4). A
//! firing alert pins an incident capture in the flight recorder — the
//! same incident drops starting or SIGUSR1 keep — and the alerts are
//! written beside the capture files as `alert.json` (`alert-2.json`, ...
//! when later alerts join an incident still open).
//!
//! The HTTP side ([`super::http`]) checks the method, size and JSON and
//! hands the firing alerts to the agent's loop, which owns the recorder
//! ([`Request`]); the loop answers with the incident's directory.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The webhook's path on the agent's server.
pub const PATH: &str = "/alertmanager";
/// Largest body accepted (Alertmanager sends every alert of a group; a
/// group of a few hundred alerts fits).
pub const MAX_BODY: usize = 256 << 10;
/// Alert files kept per incident (a storm of notifications extends the
/// incident without filling its directory).
const MAX_NOTES: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

/// The webhook payload (fields the agent does not use are ignored:
/// Alertmanager adds fields within a version).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub version: String,
    pub status: Status,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub group_key: String,
    pub alerts: Vec<Alert>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: Status,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: String,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: String,
    #[serde(default)]
    pub fingerprint: String,
}

impl Alert {
    pub fn name(&self) -> &str {
        self.labels
            .get("alertname")
            .map_or("unnamed", String::as_str)
    }
}

/// Parses a body: the alerts that fire, or why the body is refused.
pub fn firing(body: &[u8]) -> Result<Firing, String> {
    let w: Webhook = serde_json::from_slice(body).map_err(|e| format!("not a webhook: {e}"))?;
    if w.version != "4" {
        return Err(format!(
            "webhook version {:?}: only version 4 is understood",
            w.version
        ));
    }
    Ok(Firing {
        receiver: w.receiver,
        group_key: w.group_key,
        alerts: w
            .alerts
            .into_iter()
            .filter(|a| a.status == Status::Firing)
            .collect(),
    })
}

/// What the loop keeps: the firing alerts of one notification.
#[derive(Debug, Serialize)]
pub struct Firing {
    pub receiver: String,
    pub group_key: String,
    pub alerts: Vec<Alert>,
}

impl Firing {
    /// `alert ConntrackTableFullDrops` (the distinct names, in order).
    pub fn reason(&self) -> String {
        let mut names: Vec<&str> = self.alerts.iter().map(Alert::name).collect();
        names.dedup();
        format!("alert {}", names.join(","))
    }
}

/// A notification handed to the agent's loop, and where it answers.
pub struct Request {
    pub firing: Firing,
    pub reply: tokio::sync::oneshot::Sender<Result<PathBuf, String>>,
}

/// Writes the notification into the incident directory `dir` (created by
/// the recorder, mode 0700) as a new file: `alert.json`, then
/// `alert-2.json`, ...; never overwrites (O_EXCL). Returns the file, or
/// `None` past [`MAX_NOTES`].
pub fn write_note(dir: &Path, firing: &Firing) -> std::io::Result<Option<PathBuf>> {
    #[derive(Serialize)]
    struct Note<'a> {
        received_unix_ms: u128,
        #[serde(flatten)]
        firing: &'a Firing,
    }
    let received_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let body = serde_json::to_vec_pretty(&Note {
        received_unix_ms,
        firing,
    })?;
    for n in 1..=MAX_NOTES {
        let p = match n {
            1 => dir.join("alert.json"),
            n => dir.join(format!("alert-{n}.json")),
        };
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(mut f) => {
                f.write_all(&body)?;
                f.write_all(b"\n")?;
                return Ok(Some(p));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"receiver":"ctt","status":"firing","alerts":[
      {"status":"firing","labels":{"alertname":"ConntrackTableFullDrops","instance":"127.0.0.1:9637","netns":"ns1"},
       "annotations":{"summary":"s"},"startsAt":"2026-12-06T12:00:00Z","endsAt":"0001-01-01T00:00:00Z",
       "generatorURL":"http://p/graph","fingerprint":"abc"},
      {"status":"resolved","labels":{"alertname":"Other"},"startsAt":"2026-12-06T11:00:00Z"}],
      "groupLabels":{},"commonLabels":{},"commonAnnotations":{},"externalURL":"http://am",
      "version":"4","groupKey":"{}:{}","truncatedAlerts":0}"#;

    #[test]
    fn parses_alertmanager_v4_and_keeps_the_firing() {
        let f = firing(BODY.as_bytes()).unwrap();
        assert_eq!(f.alerts.len(), 1);
        assert_eq!(f.reason(), "alert ConntrackTableFullDrops");
        assert_eq!(f.alerts[0].labels["netns"], "ns1");
        assert_eq!(f.alerts[0].generator_url, "http://p/graph");
        let t = crate::formats::capture::tests::TempDir::new("alerts");
        let p = write_note(&t.0, &f).unwrap().unwrap();
        assert!(p.ends_with("alert.json"));
        let p2 = write_note(&t.0, &f).unwrap().unwrap();
        assert!(p2.ends_with("alert-2.json"));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        assert_eq!(
            v["alerts"][0]["labels"]["alertname"],
            "ConntrackTableFullDrops"
        );
        assert_eq!(v["receiver"], "ctt");
    }

    #[test]
    fn refuses_what_is_not_a_v4_webhook() {
        assert!(firing(b"{").is_err());
        assert!(firing(b"[]").is_err());
        assert!(firing(br#"{"version":"3","status":"firing","alerts":[]}"#).is_err());
        assert!(firing(br#"{"version":"4","status":"burning","alerts":[]}"#).is_err());
        let none = firing(br#"{"version":"4","status":"resolved","alerts":[]}"#).unwrap();
        assert!(none.alerts.is_empty());
    }
}
