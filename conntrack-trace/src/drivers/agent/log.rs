//! State changes as one JSON line each on stderr, for log collectors.

use serde::Serialize;

use crate::model::Name;

/// One line: `{"type":"state","event":"drops_started",...}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum State {
    /// Attached (or fell back, `refused` says why): metrics are live.
    Started {
        version: String,
        /// The backend with its hooks.
        #[serde(rename = "backend")]
        hooks: String,
        refused: Vec<String>,
        metrics_addr: String,
        namespaces: usize,
        uncovered: Vec<String>,
    },
    /// `--backend auto` passed over a backend (each refusal, why).
    BackendFellBack {
        backend: Name,
        refused: Vec<String>,
    },
    /// Capabilities left after attaching.
    CapabilitiesDropped {
        kept: Vec<String>,
    },
    /// A network namespace appeared: its table is in the metrics now.
    NetnsAdded {
        netns: String,
        inode: u32,
    },
    /// A network namespace went away: its table's series are gone.
    NetnsRemoved {
        netns: String,
        inode: u32,
    },
    /// A namespace's table went above 90 % of its limit.
    TableHigh {
        netns: String,
        entries: u64,
        max: u64,
        fill_percent: f64,
    },
    /// ... and back below 85 %.
    TableNormal {
        netns: String,
        entries: u64,
        max: u64,
        fill_percent: f64,
    },
    /// Packets are being dropped (table_full or insert_failed).
    DropsStarted {
        drops: u64,
    },
    /// No drop for the quiet period.
    DropsStopped {
        drops: u64,
        quiet_s: f64,
    },
    AmplificationOpened {
        src: String,
        service: String,
        factor: f64,
        message: String,
    },
    AmplificationClosed {
        src: String,
        service: String,
        attempts: u64,
    },
    /// The flight recorder kept an incident capture.
    IncidentStarted {
        dir: String,
        reason: String,
    },
    IncidentClosed {
        dir: String,
        files: usize,
    },
    /// `--autopilot dry-run|on` is active (with its settings).
    AutopilotArmed {
        mode: super::autopilot::Mode,
        horizon_s: f64,
        cooldown_s: f64,
        /// The most a full table may take (`--autopilot-memory`).
        memory_budget_bytes: u64,
        memory_budget: String,
        /// nf_conntrack_max at start.
        max: u64,
    },
    /// The autopilot raised nf_conntrack_max (`dry_run`: would have).
    AutopilotRaised(super::autopilot::Raise),
    /// ... but only to what `--autopilot-memory` allows: short of the
    /// demand.
    AutopilotCapped(super::autopilot::Raise),
    /// The autopilot changed nothing, and why.
    AutopilotSkipped {
        netns: String,
        why: String,
        dry_run: bool,
    },
    /// Something went wrong but the agent goes on.
    Warning {
        message: String,
    },
    Stopping {
        signal: String,
    },
}

/// A line of the agent's log, tagged by `type`.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line<'a> {
    State(Stamped<'a>),
    /// A line of the programs' own log (`--bpf-log`).
    BpfLog {
        ts_unix_ms: u128,
        level: &'a str,
        message: &'a str,
    },
}

/// A state change and when it was seen.
#[derive(Serialize)]
struct Stamped<'a> {
    ts_unix_ms: u128,
    #[serde(flatten)]
    state: &'a State,
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

pub fn emit(state: &State) {
    let ts_unix_ms = now_ms();
    if let Ok(s) = serde_json::to_string(&Line::State(Stamped { ts_unix_ms, state })) {
        crate::formats::output::pipe::diag(s);
    }
}

/// `--bpf-log`'s sink for the agent: `{"type":"bpf_log","level":...,
/// "message":...}`, one line per record of the programs' log.
pub fn emit_bpf(level: ::log::Level, message: &str) {
    let level = level.as_str().to_ascii_lowercase();
    let line = Line::BpfLog {
        ts_unix_ms: now_ms(),
        level: &level,
        message,
    };
    if let Ok(s) = serde_json::to_string(&line) {
        crate::formats::output::pipe::diag(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_log_line() {
        let s = serde_json::to_value(Line::BpfLog {
            ts_unix_ms: 5,
            level: "debug",
            message: "rule_drop: netns 1 ...",
        })
        .unwrap();
        assert_eq!(
            s,
            serde_json::json!({"type": "bpf_log", "ts_unix_ms": 5, "level": "debug", "message": "rule_drop: netns 1 ..."})
        );
    }

    #[test]
    fn one_tagged_line() {
        let s = serde_json::to_value(Line::State(Stamped {
            ts_unix_ms: 5,
            state: &State::DropsStarted { drops: 3 },
        }))
        .unwrap();
        assert_eq!(
            s,
            serde_json::json!({"type": "state", "ts_unix_ms": 5, "event": "drops_started", "drops": 3})
        );
    }
}
