//! What the supervisor is told to do: addresses, worker command, limits and
//! timeouts. Plain data, filled in by the CLI.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use monodon_proto::access_log::Format;
use monodon_proto::http::Limits;

/// An address to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    /// `127.0.0.1:8080`, `[::1]:8080`, `:8080` (all IPv4 interfaces) or
    /// `unix:/path/to/socket`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, as in unix:/run/app.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let with_host = if s.starts_with(':') { format!("0.0.0.0{s}") } else { s.to_owned() };
        with_host.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!("{s:?} is not an address: use HOST:PORT (127.0.0.1:8080, [::1]:8080) or unix:/path")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How a generation makes its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpawnMode {
    /// One template process per generation loads the app once and forks
    /// every worker of it: a generation runs the code it started with for
    /// its whole life, and a replacement costs a fork.
    #[default]
    Template,
    /// Every worker is started from the command on disk (for apps that
    /// cannot fork once loaded, e.g. because they start threads).
    Exec,
}

impl FromStr for SpawnMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "template" => Ok(SpawnMode::Template),
            "exec" => Ok(SpawnMode::Exec),
            _ => Err(format!("{s:?}: the spawn mode is `template` or `exec`")),
        }
    }
}

/// The default of every setting that has a fixed one: [`Config::new`] and
/// the command line (its `--help` too) both take them from here.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub head_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub io_timeout: Duration,
    pub queue_capacity: usize,
    pub backlog: i32,
    pub min_body_rate: u64,
    pub linger_timeout: Duration,
    pub graceful_timeout: Duration,
    pub max_requests: u64,
    pub timeout: Duration,
    pub reload_timeout: Duration,
    pub kill_grace: Duration,
    pub read_ahead: Duration,
    pub warm_connections: usize,
}

pub const DEFAULTS: Defaults = Defaults {
    head_timeout: Duration::from_secs(10),
    keepalive_timeout: Duration::from_secs(75),
    io_timeout: Duration::from_secs(30),
    queue_capacity: 1024,
    backlog: 1024,
    min_body_rate: 1024,
    linger_timeout: Duration::from_secs(2),
    graceful_timeout: Duration::from_secs(30),
    max_requests: 1000,
    timeout: Duration::from_secs(30),
    reload_timeout: Duration::from_secs(30),
    kill_grace: Duration::from_secs(2),
    read_ahead: Duration::from_micros(200),
    warm_connections: monodon_proto::scoreboard::WARM_CELLS,
};

impl Defaults {
    /// The lower bound of each worker's max-requests draw, for a maximum
    /// of `max`: 80% of it.
    pub fn min_requests(max: u64) -> u64 {
        (max * 4 / 5).max(1)
    }
}

/// Everything `Supervisor::new` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<ListenAddr>,
    /// Number of worker processes.
    pub workers: usize,
    /// Program and arguments of a worker, looked up on disk at every spawn.
    pub worker_command: Vec<OsString>,
    pub limits: Limits,
    /// From the first byte of a request head to its end.
    pub head_timeout: Duration,
    /// How long an idle connection is kept between requests.
    pub keepalive_timeout: Duration,
    /// How long a worker waits on one read or write to a client.
    pub io_timeout: Duration,
    /// Connections with a complete request that may wait for a worker
    /// before the supervisor stops accepting.
    pub queue_capacity: usize,
    /// Listen backlog.
    pub backlog: i32,
    /// Bytes per second a request body must average after a 10 s grace.
    pub min_body_rate: u64,
    /// Client connections held at most (0: what the fd limit allows).
    pub max_connections: usize,
    /// How long to drain a client's input after our last response, so that
    /// an RST does not destroy that response.
    pub linger_timeout: Duration,
    /// How long a graceful stop waits for busy workers.
    pub graceful_timeout: Duration,
    /// Each worker retires after a number of requests drawn uniformly from
    /// `min_requests..=max_requests` (0: never).
    pub max_requests: u64,
    pub min_requests: u64,
    /// A worker retires once older than this (each draws from 80-100% of
    /// it); `None`: no limit.
    pub max_worker_age: Option<Duration>,
    /// A worker retires once its private memory passes this many bytes;
    /// `None`: no limit.
    pub max_worker_memory: Option<u64>,
    /// A worker busy on one request longer than this is killed.
    pub timeout: Duration,
    /// How long a new generation has to become ready on reload.
    pub reload_timeout: Duration,
    /// Between SIGTERM and SIGKILL for a worker being killed.
    pub kill_grace: Duration,
    /// The control socket (`None`: `control::default_control_path`).
    pub control: Option<PathBuf>,
    /// Where the supervisor answers `GET /metrics` (`--metrics`).
    pub metrics: Option<ListenAddr>,
    /// The directory workers start in (`--chdir`), resolved through
    /// symlinks when each generation starts; `None`: the supervisor's.
    pub chdir: Option<PathBuf>,
    /// Every connection starts with a PROXY protocol header (v1 or v2)
    /// naming the client; one without is closed.
    pub proxy_protocol: bool,
    /// The peers whose `Forwarded`/`X-Forwarded-*` fields name the client
    /// and scheme workers give the app.
    pub forwarded_allow: monodon_proto::forwarded::TrustedProxies,
    /// The path the supervisor answers itself for health checks.
    pub health_path: Option<String>,
    /// Workers that can (the Rust runtime's) accept connections from the
    /// listeners themselves while free (`--worker-accept`; never with
    /// `--proxy-protocol`, whose headers the supervisor reads).
    pub worker_accept: bool,
    /// Keep-alive connections each worker that accepts may keep between
    /// requests and serve itself (0: none; at most `WARM_CELLS`).
    pub warm_connections: usize,
    /// Workers forked from their generation's template, or each exec'd.
    pub spawn: SpawnMode,
    /// Where workers write the access log (`-`: stdout; `None`: nowhere).
    pub access_log: Option<String>,
    pub access_log_format: Format,
    /// How long a worker may wait for a keep-alive client's next request
    /// while no other connection waits for a worker (zero: never).
    pub read_ahead: Duration,
    /// Who to become once the sockets are bound (`--user`/`--group`).
    pub run_as: Option<crate::privileges::RunAs>,
    /// Where a reload gets fresh settings (the config file), if anywhere.
    pub source: Option<ConfigSource>,
}

/// Re-reads the settings (a config file merged with the command line), for
/// reloads.
#[derive(Clone)]
pub struct ConfigSource(pub std::sync::Arc<dyn Fn() -> Result<Config, String> + Send + Sync>);

impl fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfigSource")
    }
}

impl Config {
    /// A config with defaults for everything but the worker command.
    pub fn new(worker_command: Vec<OsString>) -> Config {
        let d = DEFAULTS;
        Config {
            listen: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 8080)))],
            workers: 2,
            worker_command,
            limits: Limits::default(),
            head_timeout: d.head_timeout,
            keepalive_timeout: d.keepalive_timeout,
            io_timeout: d.io_timeout,
            queue_capacity: d.queue_capacity,
            backlog: d.backlog,
            max_connections: 0,
            min_body_rate: d.min_body_rate,
            linger_timeout: d.linger_timeout,
            graceful_timeout: d.graceful_timeout,
            max_requests: d.max_requests,
            min_requests: Defaults::min_requests(d.max_requests),
            max_worker_age: None,
            max_worker_memory: None,
            timeout: d.timeout,
            reload_timeout: d.reload_timeout,
            kill_grace: d.kill_grace,
            control: None,
            metrics: None,
            chdir: None,
            proxy_protocol: false,
            forwarded_allow: monodon_proto::forwarded::TrustedProxies::parse(
                monodon_proto::forwarded::TrustedProxies::DEFAULT,
            )
            .unwrap_or_default(),
            health_path: None,
            worker_accept: true,
            warm_connections: d.warm_connections,
            spawn: SpawnMode::default(),
            access_log: None,
            access_log_format: Format::Combined,
            source: None,
            run_as: None,
            read_ahead: d.read_ahead,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!("127.0.0.1:80".parse(), Ok(ListenAddr::Tcp("127.0.0.1:80".parse().unwrap())));
        assert_eq!("[::1]:80".parse(), Ok(ListenAddr::Tcp("[::1]:80".parse().unwrap())));
        assert_eq!(":80".parse(), Ok(ListenAddr::Tcp("0.0.0.0:80".parse().unwrap())));
        assert_eq!("unix:/tmp/s".parse(), Ok(ListenAddr::Unix("/tmp/s".into())));
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("localhost".parse::<ListenAddr>().is_err());
        assert!("1.2.3.4:99999".parse::<ListenAddr>().is_err());
    }
}
