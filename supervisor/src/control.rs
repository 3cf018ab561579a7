//! The control protocol: what `monodon status|reload|stop|scale` send to a
//! running supervisor over its control socket, and what comes back.
//!
//! One JSON object per line, one request per connection. Field names are
//! stable; `protocol` is bumped on any incompatible change.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ListenAddr;

pub const PROTOCOL: u32 = 1;

/// A request from the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub protocol: u32,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Command {
    /// The full status document.
    Status,
    /// Start a new generation; answered when it serves or has failed.
    Reload,
    /// Stop (gracefully unless `fast`); answered at once.
    Stop {
        #[serde(default)]
        fast: bool,
    },
    /// Set the number of workers, or change it by `delta`.
    Scale {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workers: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delta: Option<i64>,
    },
}

/// The answer to a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub protocol: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Response {
        Response { protocol: PROTOCOL, ok: true, message: Some(message.into()), error: None, status: None }
    }

    pub fn error(error: impl Into<String>) -> Response {
        Response { protocol: PROTOCOL, ok: false, message: None, error: Some(error.into()), status: None }
    }

    pub fn status(status: Status) -> Response {
        Response { protocol: PROTOCOL, ok: true, message: None, error: None, status: Some(status) }
    }
}

/// Everything `monodon status` shows. Documented in README.md; keep names stable.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: f64,
    /// The generation connections are dispatched to.
    pub generation: u64,
    pub listeners: Vec<String>,
    pub control: String,
    /// Where `GET /metrics` is answered (`--metrics`), if anywhere.
    #[serde(default)]
    pub metrics: Option<String>,
    pub reload: ReloadStatus,
    pub connections: ConnectionCounts,
    pub workers: WorkerCounts,
    pub totals: Totals,
    /// Requests per second over the last second or so.
    #[serde(default)]
    pub requests_per_sec: f64,
    /// The serving generation's code, and the incoming one's while reloading.
    #[serde(default)]
    pub generations: Vec<GenerationStatus>,
    /// How long workers took from being started (exec'd or forked) to
    /// Ready, over the last starts.
    #[serde(default)]
    pub worker_start: StartTimes,
    pub worker_list: Vec<WorkerStatus>,
}

/// Worker start times, over the last (up to 1,024) starts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StartTimes {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// What one generation runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub generation: u64,
    /// Dispatch goes to it (else it is on its way in).
    pub serving: bool,
    /// The worker command, its program resolved through symlinks.
    pub command: Vec<String>,
    /// `--chdir`, resolved likewise.
    pub dir: Option<String>,
    /// The program file when the generation started.
    pub program_inode: Option<u64>,
    pub program_mtime_secs: Option<i64>,
    /// The program file on disk is no longer the one the generation
    /// started from (replaced or rewritten). With templates its workers
    /// still run the code loaded when it started; with `--spawn exec` its
    /// new workers run the new file.
    pub program_changed: bool,
    /// `template` or `exec`.
    #[serde(default)]
    pub spawn: String,
    /// Its template process (with `--spawn template`).
    #[serde(default)]
    pub template: Option<TemplateStatus>,
    /// It cannot make workers now (its template is down, or its command
    /// fails), so its workers serve on past their max-requests limit.
    #[serde(default)]
    pub limits_held: bool,
}

/// A generation's template, as the status shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TemplateStatus {
    pub pid: Option<u32>,
    /// `starting`, `ready`, or `down` (being started again after a back-off:
    /// the generation is degraded, serving with the workers it has).
    pub state: String,
    /// Times it has been started again after dying.
    pub restarts: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// `idle`, `reloading` or `stopping`.
    pub state: String,
    /// The generation being started, while reloading.
    pub generation: Option<u64>,
    pub for_secs: Option<f64>,
    /// Why the last failed reload failed, and how long ago.
    pub last_failure: Option<String>,
    pub last_failure_ago_secs: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectionCounts {
    pub total: usize,
    /// Keep-alive connections between requests.
    pub idle: usize,
    /// A request head is arriving.
    pub reading_head: usize,
    /// Complete head, waiting for a worker.
    pub queued: usize,
    pub in_workers: usize,
    /// Closed by us, draining the client's last bytes.
    pub lingering: usize,
    /// Kept alive by the worker that served them, which serves their next
    /// requests itself (warm connections).
    #[serde(default)]
    pub warm: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerCounts {
    /// Workers wanted per generation.
    pub target: usize,
    pub total: usize,
    pub busy: usize,
    pub idle: usize,
    pub starting: usize,
    pub retiring: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    /// Connections accepted, by the supervisor and by workers.
    pub accepted: u64,
    /// Of those, the ones workers accepted themselves (`--worker-accept`).
    #[serde(default)]
    pub accepted_by_workers: u64,
    pub requests: u64,
    /// Connections the supervisor handed to workers, one per Assign (sent
    /// ahead or not) with a request ready. The requests workers took up
    /// themselves, on connections they accepted or keep warm, are not.
    #[serde(default)]
    pub handed_over: u64,
    pub reloads: u64,
    pub failed_reloads: u64,
    /// Workers replaced after an unexpected exit.
    pub respawns: u64,
    /// Workers killed for running past `--timeout`.
    pub timeouts: u64,
    /// Workers recycled, by cause: `max-requests`, `max-worker-age`,
    /// `max-worker-memory`.
    #[serde(default)]
    pub recycled: std::collections::BTreeMap<String, u64>,
    /// Responses workers sent (their apps', and their own refusals), by
    /// status class: `1xx` ... `5xx`.
    #[serde(default)]
    pub worker_responses: std::collections::BTreeMap<String, u64>,
    /// Responses the supervisor sent itself (malformed requests, 502, 504,
    /// a full queue), by status class. Health checks are not counted.
    #[serde(default)]
    pub supervisor_responses: std::collections::BTreeMap<String, u64>,
    /// How long the workers' requests took, complete head to last byte.
    #[serde(default)]
    pub request_duration: HistogramStatus,
    /// How long complete requests waited for a worker (to their hand-over).
    #[serde(default)]
    pub queue_wait: HistogramStatus,
}

/// A histogram as the status shows it: cumulative counts, one per bound
/// in `le_secs` and then the total (the `+Inf` bucket).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HistogramStatus {
    pub le_secs: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub sum_secs: f64,
    pub count: u64,
}

impl From<&monodon_proto::histogram::Histogram> for HistogramStatus {
    fn from(h: &monodon_proto::histogram::Histogram) -> Self {
        let cumulative = h
            .counts
            .iter()
            .scan(0u64, |total, &n| {
                *total += n;
                Some(*total)
            })
            .collect();
        HistogramStatus {
            le_secs: monodon_proto::histogram::BOUNDS_US.iter().map(|&us| us as f64 / 1e6).collect(),
            cumulative,
            sum_secs: h.sum_us as f64 / 1e6,
            count: h.count(),
        }
    }
}

/// Counts by status class as the status shows them, every class present.
pub fn by_class(counts: &[u64; 5]) -> std::collections::BTreeMap<String, u64> {
    counts.iter().enumerate().map(|(i, &n)| (format!("{}xx", i + 1), n)).collect()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: u32,
    pub generation: u64,
    /// `starting`, `idle`, `busy` or `retiring`.
    pub state: String,
    /// Why a retiring worker leaves: `max-requests`, `max-worker-age`,
    /// `max-worker-memory`, `reload`, `reload failed`, `scale`, `old generation`.
    #[serde(default)]
    pub retiring_because: Option<String>,
    pub requests: u64,
    pub age_secs: f64,
    pub rss_kib: Option<u64>,
    /// Memory only this worker uses (private pages), and pages it shares
    /// with others (its generation's, libraries), from smaps_rollup.
    #[serde(default)]
    pub private_kib: Option<u64>,
    #[serde(default)]
    pub shared_kib: Option<u64>,
    /// `METHOD target` of the connection it is serving.
    pub request: Option<String>,
    /// How long the current request has been running.
    pub request_secs: Option<f64>,
    /// Whether any response byte has been written on the current connection.
    pub response_started: Option<bool>,
    /// Connections sent ahead to it, to serve after its current one.
    #[serde(default)]
    pub ahead: usize,
    /// Connections it keeps warm: it serves their next requests itself.
    #[serde(default)]
    pub warm: usize,
}

/// Where the control socket lives when `--control` is not given: in
/// systemd's `RuntimeDirectory=` if there is one, else beside the first
/// listener's name in `$XDG_RUNTIME_DIR` (or `/tmp`); a unix listener's
/// control socket sits next to it.
pub fn default_control_path(first_listener: Option<&ListenAddr>) -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        let first = dir.to_string_lossy().split(':').next().unwrap_or("").to_owned();
        if !first.is_empty() {
            return Path::new(&first).join("control.sock");
        }
    }
    let base =
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    match first_listener {
        Some(ListenAddr::Unix(path)) => {
            let mut p = path.clone().into_os_string();
            p.push(".control");
            PathBuf::from(p)
        }
        Some(ListenAddr::Tcp(addr)) => {
            let ip = addr.ip().to_string().replace(':', "_");
            base.join(format!("monodon-{ip}-{}.sock", addr.port()))
        }
        None => base.join("monodon.sock"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_shape() {
        let r = Request { protocol: 1, command: Command::Stop { fast: true } };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"protocol":1,"command":"stop","fast":true}"#);
        let parsed: Request = serde_json::from_str(r#"{"protocol":1,"command":"scale","delta":-1}"#).unwrap();
        assert_eq!(parsed.command, Command::Scale { workers: None, delta: Some(-1) });
        assert!(serde_json::from_str::<Request>(r#"{"protocol":1,"command":"explode"}"#).is_err());
    }

    #[test]
    fn default_paths() {
        let tcp: ListenAddr = "127.0.0.1:8080".parse().unwrap();
        let unix: ListenAddr = "unix:/run/app.sock".parse().unwrap();
        if std::env::var_os("RUNTIME_DIRECTORY").is_none() {
            assert!(default_control_path(Some(&tcp)).ends_with("monodon-127.0.0.1-8080.sock"));
            assert_eq!(default_control_path(Some(&unix)), PathBuf::from("/run/app.sock.control"));
        }
    }
}
