//! The command line: `monodon serve`, and the internal `monodon worker` role.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use monodon_proto::access_log::Format;
use monodon_proto::forwarded::TrustedProxies;
use monodon_proto::http::Limits;
use monodon_supervisor::config::{Defaults, DEFAULTS};
use monodon_supervisor::{control, Config, ListenAddr};

use crate::apps::AppName;
use crate::byte_size::ByteSize;

/// A prefork HTTP/1.1 application server and process supervisor.
///
/// One supervisor process holds every client connection (idle keep-alive
/// and slow clients cost it a few kilobytes, never a process) and passes
/// each complete request to one of a pool of worker processes, which serve
/// it with plain blocking code.
#[derive(Debug, Parser)]
#[command(name = "monodon", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server in the foreground (the way systemd wants it).
    Serve(Box<ServeArgs>),
    /// Show the state of a running supervisor: workers, connections, totals.
    Status {
        /// Print one JSON document (stable field names, see README) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: ControlArgs,
    },
    /// A live view of a running supervisor in the terminal: workers with
    /// their state, request, age and memory; connections; requests/s.
    /// Keys: q quit, s sort (pid, requests, age, memory, state), r reverse,
    /// space refresh.
    Top {
        /// How often to refresh.
        #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        #[command(flatten)]
        target: ControlArgs,
    },
    /// Start a new generation of workers (same as SIGHUP) and wait until it
    /// serves or the reload fails; the exit status says which.
    Reload {
        #[command(flatten)]
        target: ControlArgs,
    },
    /// Stop the supervisor: gracefully (requests in flight finish), or at
    /// once with --fast; waits until it has exited.
    Stop {
        /// Kill the workers at once instead of letting them finish.
        #[arg(long)]
        fast: bool,
        #[command(flatten)]
        target: ControlArgs,
    },
    /// Set the number of workers: N, or +N / -N relative to now.
    Scale {
        /// N, +N or -N.
        #[arg(allow_hyphen_values = true, value_parser = parse_scale)]
        workers: ScaleTo,
        #[command(flatten)]
        target: ControlArgs,
    },
    /// Internal: the worker role, started by `monodon serve`.
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// Which supervisor a control command talks to.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The supervisor's control socket [default: derived from --listen, as
    /// `serve` does].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// The first address the supervisor listens on, to find its control socket.
    #[arg(short, long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: ListenAddr,
}

impl ControlArgs {
    pub fn path(&self) -> PathBuf {
        self.control.clone().unwrap_or_else(|| control::default_control_path(Some(&self.listen)))
    }
}

/// The argument of `monodon scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleTo {
    Absolute(usize),
    Relative(i64),
}

fn parse_scale(s: &str) -> Result<ScaleTo, String> {
    let bad = || format!("{s:?} is not a worker count: use N, +N or -N");
    if s.starts_with('+') || s.starts_with('-') {
        s.parse::<i64>().map(ScaleTo::Relative).map_err(|_| bad())
    } else {
        s.parse::<usize>().map(ScaleTo::Absolute).map_err(|_| bad())
    }
}

/// The app a worker runs.
#[derive(Debug, Clone, Args)]
pub struct AppArgs {
    /// Built-in app for the workers to run (when no worker command is given).
    #[arg(long, value_enum, default_value_t = AppName::Static)]
    pub app: AppName,

    /// Directory the `static` app serves.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub root: PathBuf,
}

/// An app in Python, Perl or Ruby as the workers.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Python, Perl and Ruby apps")]
pub struct LanguageArgs {
    /// Serve this WSGI application, `package.module:callable` (`module`
    /// alone: its `application`), imported from --chdir (or the current
    /// directory) and PYTHONPATH. The template imports it once per
    /// generation and forks the workers.
    #[arg(long, value_name = "MODULE:APP", conflicts_with_all = ["command", "psgi", "rack"])]
    pub wsgi: Option<String>,

    /// The Python interpreter [default: $VIRTUAL_ENV/bin/python, else
    /// python3 on PATH].
    #[arg(long, value_name = "PATH", requires = "wsgi")]
    pub python: Option<PathBuf>,

    /// Call `module:function` in each worker after the fork, before it
    /// serves: reconnect to databases, start per-process threads.
    #[arg(long, value_name = "MODULE:FUNCTION", requires = "wsgi")]
    pub post_fork: Option<String>,

    /// Serve this PSGI application file (`app.psgi`, as plackup takes it),
    /// relative to --chdir. The template loads it once per generation and
    /// forks the workers. Needs Debian's libsocket-msghdr-perl and
    /// libfile-map-perl.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["command", "rack"])]
    pub psgi: Option<PathBuf>,

    /// The Perl interpreter [default: perl on PATH].
    #[arg(long, value_name = "PATH", requires = "psgi")]
    pub perl: Option<PathBuf>,

    /// Add DIR to Perl's @INC (as `perl -I`); repeat for several.
    #[arg(short = 'I', long = "include", value_name = "DIR", requires = "psgi")]
    pub include: Vec<PathBuf>,

    /// Serve this Rack application (`config.ru`, as rackup takes it),
    /// relative to --chdir. The template loads it once per generation and
    /// forks the workers. Ruby's standard library is enough; Rack's own
    /// builder (ruby-rack) is used when it is installed.
    #[arg(long, value_name = "FILE", conflicts_with = "command")]
    pub rack: Option<PathBuf>,

    /// The Ruby interpreter [default: ruby on PATH].
    #[arg(long, value_name = "PATH", requires = "rack")]
    pub ruby: Option<PathBuf>,

    /// Load the app in each worker instead of once in the template.
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value_t = false, default_missing_value = "true")]
    pub no_preload: bool,

    /// Request header names with `_` (which the CGI-style HTTP_* names of
    /// WSGI, PSGI and Rack would confuse with `-`): `drop` them, `refuse`
    /// the request with 400, or `allow` them (an underscore name never
    /// replaces a dash one).
    #[arg(long, value_name = "POLICY", value_parser = ["drop", "refuse", "allow"], default_value = "drop")]
    pub underscore_headers: String,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub app: AppArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Durations take a number of seconds or a unit: 30, 30s, 500ms, 2m.\n\
Sizes take bytes or a 1024-based unit: 65536, 64K, 64KiB, 1M, 1GiB.\n\n\
Examples:\n  monodon serve --listen 127.0.0.1:8080 --app hello\n  \
monodon serve --listen [::1]:8080 --listen unix:/run/app.sock --workers 8 -- /srv/app/bin/my-app")]
pub struct ServeArgs {
    /// Settings from a TOML file whose keys are these flags' names
    /// (`workers = 4`, `max-requests-per-child = 500`, `command = [..]` for the
    /// worker command); flags given here win. Re-read on every reload.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to listen on: HOST:PORT, [IPv6]:PORT or unix:/path.
    /// Repeat for several. Port 0 picks a free port (logged at start).
    #[arg(short, long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: Vec<ListenAddr>,

    /// Number of worker processes [default: number of CPUs].
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: Option<u32>,

    #[command(flatten)]
    pub app: AppArgs,

    #[command(flatten)]
    pub lang: LanguageArgs,

    /// How long an idle keep-alive connection is held between requests.
    #[arg(long, value_name = "DURATION", default_value_t = Seconds(DEFAULTS.keepalive_timeout))]
    pub keepalive_timeout: Seconds,

    /// How long a client may take to send a request head, from its first byte.
    #[arg(long, value_name = "DURATION", default_value_t = Seconds(DEFAULTS.head_timeout))]
    pub head_timeout: Seconds,

    /// How long a worker waits on one read or write to a client (request
    /// bodies, slow readers) before dropping the connection.
    #[arg(long, value_name = "DURATION", default_value_t = Seconds(DEFAULTS.io_timeout))]
    pub io_timeout: Seconds,

    /// How long a graceful stop (SIGTERM) waits for requests in flight.
    #[arg(long, value_name = "DURATION", default_value_t = Seconds(DEFAULTS.graceful_timeout))]
    pub graceful_timeout: Seconds,

    /// Longest request line (longer: 414).
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(Limits::default().max_request_line as u64))]
    pub max_request_line: ByteSize,

    /// Longest header field line (longer: 431).
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(Limits::default().max_header_line as u64))]
    pub max_header_line: ByteSize,

    /// Most header fields in a request (more: 431).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_headers)]
    pub max_headers: usize,

    /// Largest request head, 1KiB to 1MiB (larger: 431).
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(Limits::default().max_head as u64),
          value_parser = |s: &str| ByteSize::parse_within(s, 1 << 10, 1 << 20))]
    pub max_head: ByteSize,

    /// Request bodies up to this size are received whole by the supervisor
    /// before a worker sees the request, so slow senders never hold a
    /// worker; larger bodies are streamed to the app by the worker. At most 16MiB.
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(Limits::default().buffered_body as u64),
          value_parser = |s: &str| ByteSize::parse_within(s, 0, 16 << 20))]
    pub buffer_body: ByteSize,

    /// Most requests a client may pipeline: send before reading the response
    /// it waits for. The request past them is answered 429 and the
    /// connection closed (0: no pipelining).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_pipelined)]
    pub max_pipelined: usize,

    /// Largest request body (larger: 413).
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(Limits::default().max_body))]
    pub max_body: ByteSize,

    /// A worker retires after this many requests (0: never). Within a tenth
    /// of its limit its successor starts, and it retires once the successor
    /// is ready (so it may serve up to a tenth fewer).
    #[arg(long, value_name = "N", default_value_t = DEFAULTS.max_requests)]
    pub max_requests_per_child: u64,

    /// Each worker draws its limit uniformly from [this, --max-requests-per-child],
    /// so workers do not all recycle at once [default: 80% of the maximum].
    #[arg(long, value_name = "N")]
    pub min_requests_per_child: Option<u64>,

    /// A worker retires after this long in service (each draws from 80-100%
    /// of it, so they do not all leave at once); its successor starts first,
    /// and it retires once the successor is ready [default: no limit].
    #[arg(long, value_name = "DURATION")]
    pub max_worker_age: Option<Seconds>,

    /// A worker whose private memory (pages no other process shares, from
    /// /proc/PID/smaps_rollup, checked every second) passes this retires:
    /// its successor starts first, and it retires once the successor is
    /// ready [default: no limit].
    #[arg(long, value_name = "SIZE")]
    pub max_worker_memory: Option<ByteSize>,

    /// A worker busy on one request longer than this is killed (SIGTERM, then
    /// SIGKILL); its client gets 504 if nothing was sent yet.
    #[arg(long, value_name = "DURATION", default_value_t = Seconds(DEFAULTS.timeout))]
    pub timeout: Seconds,

    /// How long a new generation of workers (SIGHUP) has to become ready
    /// before the reload is abandoned and the old generation keeps serving.
    #[arg(long, value_name = "DURATION", default_value_t = Seconds(DEFAULTS.reload_timeout))]
    pub reload_timeout: Seconds,

    /// After a response, how long a worker may wait for the same keep-alive
    /// client's next request before handing the connection back to the
    /// supervisor; only while no other connection waits for a worker, and
    /// the worker has no warm cell free to keep the connection in instead
    /// (--warm-connections).
    /// A waiting connection is noticed within this time. 0 turns it off.
    #[arg(long, value_name = "DURATION", default_value_t = Seconds(DEFAULTS.read_ahead))]
    pub read_ahead: Seconds,

    /// Connections with a complete request that may wait for a free worker;
    /// when that many wait, monodon stops accepting until one is served.
    #[arg(long, value_name = "N", default_value_t = DEFAULTS.queue_capacity)]
    pub queue: usize,

    /// The directory workers start in: the app's release. Resolved through
    /// symlinks when each generation starts (`/srv/app/current` ->
    /// `releases/42`), so a generation keeps its release until a reload,
    /// whatever a deploy moves meanwhile; a relative worker command is
    /// taken from it [default: the supervisor's directory].
    #[arg(long, value_name = "DIR")]
    pub chdir: Option<PathBuf>,

    /// Every connection starts with a PROXY protocol header (HAProxy's v1
    /// or v2) from the load balancer in front: the client it names is the
    /// peer the app, the access log and the status see. A connection that
    /// does not start with a valid one is closed without a response.
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value_t = false, default_missing_value = "true")]
    pub proxy_protocol: bool,

    /// The peers trusted to say who the client is: only a request from one
    /// of these has its `Forwarded` (or `X-Forwarded-For` and
    /// `X-Forwarded-Proto`) fields give the client address and scheme the
    /// app and the access log see. Comma-separated IP addresses, networks
    /// (10.0.0.0/8), `unix` (peers on unix-socket listeners) and `*`;
    /// `none` trusts no peer. The fields' hops are read from the nearest
    /// back, past every trusted hop, to the first untrusted one.
    #[arg(long, value_name = "LIST", default_value = TrustedProxies::DEFAULT,
          value_parser = |s: &str| TrustedProxies::parse(s).map_err(|e| e.to_string()))]
    pub forwarded_allow_ips: TrustedProxies,

    /// Answer GET/HEAD of this path (e.g. /healthz) on the listeners from
    /// the supervisor itself, for a load balancer's checks: 200 while it
    /// serves, 503 while it starts or stops. No worker sees it, and it is
    /// not in the access log [default: none, every path goes to the app].
    #[arg(long, value_name = "PATH")]
    pub health_path: Option<String>,

    /// Let a free worker accept a new connection itself and serve it, when
    /// its whole request is there, without the supervisor (which still
    /// holds whatever must wait: an incomplete head, a keep-alive client
    /// between requests, connections while every worker is busy). Faster
    /// for a new connection per request; responses, timeouts and 502/504
    /// are as for connections the supervisor hands over. Only workers built
    /// on monodon's Rust runtime do it (not --wsgi, --psgi, --rack), and
    /// never with --proxy-protocol.
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set, num_args = 0..=1,
          default_value_t = true, default_missing_value = "true")]
    pub worker_accept: bool,

    /// Keep-alive connections each worker that accepts (--worker-accept)
    /// may keep after a response and serve again itself, with no hand-over
    /// through the supervisor: their next requests cost no message and no
    /// wake-up of the supervisor. The supervisor takes one back when its
    /// worker is busy on a long request while it has a request waiting,
    /// when it idles past --keepalive-timeout, and when the worker goes
    /// (recycled, retired or dead: the successor serves them on). 0 turns
    /// it off (every idle connection then waits in the supervisor).
    #[arg(long, value_name = "N", default_value_t = DEFAULTS.warm_connections as u64,
          value_parser = clap::value_parser!(u64).range(0..=monodon_proto::scoreboard::WARM_CELLS as u64))]
    pub warm_connections: u64,

    /// How workers are made. `template`: each generation starts one template
    /// process from the worker command, which loads the app once and forks
    /// every worker of that generation, so a generation keeps running the
    /// code it started with whatever changes on disk, and recycling a
    /// worker costs a fork. `exec`: every worker is started from the
    /// command as it is on disk (for apps that cannot fork once loaded,
    /// e.g. because loading starts threads) [default: template].
    #[arg(long, value_name = "MODE", value_parser = ["template", "exec"], default_value = "template")]
    pub spawn: String,

    /// The control socket for `monodon status|reload|stop|scale` (owner-only)
    /// [default: $RUNTIME_DIRECTORY/control.sock under systemd, else derived
    /// from the first --listen, e.g. /tmp/monodon-127.0.0.1-8080.sock].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Serve Prometheus metrics at GET /metrics on this address (HOST:PORT
    /// or unix:/path), answered by the supervisor itself, never a worker
    /// [default: none].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<ListenAddr>,

    /// Access log, one line per request, written by the workers (and by the
    /// supervisor for what it answers itself): a file (reopened on SIGUSR1,
    /// for logrotate) or `-` for stdout [default: none].
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<String>,

    /// Access log line format.
    #[arg(long, value_name = "FORMAT", default_value = "combined", value_parser = ["combined", "json"])]
    pub access_log_format: String,

    /// After binding its sockets, the supervisor (and so every worker) runs
    /// as this user (name or uid); needs root to start.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// The group to run as with --user (name or gid) [default: the user's
    /// primary group].
    #[arg(long, value_name = "GROUP", requires = "user")]
    pub group: Option<String>,

    /// A request body (read by a worker) must average at least this many
    /// bytes per second once it has taken 10 s, or it is cut off with 408.
    /// 0: no minimum.
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(DEFAULTS.min_body_rate))]
    pub min_body_rate: ByteSize,

    /// Client connections held at most; when reached, the longest-idle
    /// keep-alive connections are closed to make room, and with none idle
    /// new ones wait in the listen backlog [default: the open-file limit,
    /// less a reserve].
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    pub max_connections: usize,

    /// Listen backlog for new connections.
    #[arg(long, value_name = "N", default_value_t = DEFAULTS.backlog)]
    pub backlog: i32,

    /// The worker command, run from disk at every worker start (so a new
    /// deploy is picked up). Default: this binary's `worker` role with --app.
    #[arg(last = true, value_name = "WORKER_COMMAND")]
    pub command: Vec<OsString>,
}

/// A duration on the command line: `30` (seconds), or anything humantime
/// reads (`30s`, `500ms`, `2m`); shown in its largest whole unit (`75s`,
/// `200us`), which reads back as itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl std::str::FromStr for Seconds {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(Seconds)
    }
}

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}us", d.as_micros())
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (use a number of seconds, or 500ms, 10s, 2m)"))
}

impl ServeArgs {
    /// The supervisor's configuration; `default_command` runs when no worker
    /// command was given.
    pub fn to_config(&self, default_command: Vec<OsString>) -> Config {
        let mut config =
            Config::new(if self.command.is_empty() { default_command } else { self.command.clone() });
        config.listen = self.listen.clone();
        config.workers = self
            .workers
            .map(|n| n as usize)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
        config.limits = Limits {
            max_request_line: self.max_request_line.as_usize(),
            max_header_line: self.max_header_line.as_usize(),
            max_headers: self.max_headers,
            max_head: self.max_head.as_usize(),
            max_body: self.max_body.0,
            buffered_body: self.buffer_body.as_usize(),
            max_pipelined: self.max_pipelined,
        };
        config.head_timeout = self.head_timeout.0;
        config.keepalive_timeout = self.keepalive_timeout.0;
        config.io_timeout = self.io_timeout.0;
        config.graceful_timeout = self.graceful_timeout.0;
        config.queue_capacity = self.queue.max(1);
        config.backlog = self.backlog;
        config.max_connections = self.max_connections;
        config.min_body_rate = self.min_body_rate.0;
        config.max_requests = self.max_requests_per_child;
        config.min_requests =
            self.min_requests_per_child.unwrap_or(Defaults::min_requests(self.max_requests_per_child));
        config.timeout = self.timeout.0;
        config.max_worker_age = self.max_worker_age.map(|s| s.0).filter(|d| !d.is_zero());
        config.max_worker_memory = self.max_worker_memory.map(|b| b.0).filter(|&b| b > 0);
        config.reload_timeout = self.reload_timeout.0;
        config.control = self.control.clone();
        config.metrics = self.metrics.clone();
        config.chdir = self.chdir.clone();
        config.proxy_protocol = self.proxy_protocol;
        config.forwarded_allow = self.forwarded_allow_ips.clone();
        config.health_path = self.health_path.clone();
        config.worker_accept = self.worker_accept;
        // clap has checked it is at most WARM_CELLS.
        config.warm_connections = usize::try_from(self.warm_connections).unwrap_or(0);
        // clap has checked it is one of the two.
        config.spawn = self.spawn.parse().unwrap_or_default();
        config.read_ahead = self.read_ahead.0;
        config.run_as = self
            .user
            .as_ref()
            .and_then(|u| monodon_supervisor::privileges::RunAs::resolve(u, self.group.as_deref()).ok());
        config.access_log = self.access_log.clone();
        // clap allows only the names Format::parse knows.
        config.access_log_format = Format::parse(&self.access_log_format).unwrap_or(Format::Combined);
        config
    }

    /// Checks what clap cannot check flag by flag.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(min) = self.min_requests_per_child {
            if self.max_requests_per_child > 0 && min > self.max_requests_per_child {
                return Err(format!(
                    "--min-requests-per-child ({min}) is larger than --max-requests-per-child ({})",
                    self.max_requests_per_child
                ));
            }
        }
        if let Some(path) = self.access_log.as_deref().filter(|p| *p != "-") {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("--access-log {path}: {e}"))?;
        }
        if let Some(user) = &self.user {
            monodon_supervisor::privileges::RunAs::resolve(user, self.group.as_deref())?;
        }
        if let Some(path) = self.health_path.as_deref().filter(|p| !p.starts_with('/')) {
            return Err(format!("--health-path {path:?}: must start with /"));
        }
        if let Some(dir) = self.chdir.as_deref().filter(|d| !d.is_dir()) {
            return Err(format!("--chdir {}: not a directory", dir.display()));
        }
        if self.timeout.0.is_zero() {
            return Err("--timeout must be longer than 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// One source of truth: the flags' defaults are the supervisor's.
    #[test]
    fn flag_defaults_are_the_supervisors() {
        let Command::Serve(args) = Cli::try_parse_from(["monodon", "serve"]).unwrap().command else {
            panic!("not serve")
        };
        let ours = args.to_config(vec!["w".into()]);
        let theirs = Config::new(vec!["w".into()]);
        let fields = |c: &Config| {
            format!(
                "{:?}",
                (
                    c.limits,
                    (c.head_timeout, c.keepalive_timeout, c.io_timeout, c.graceful_timeout),
                    (c.timeout, c.reload_timeout, c.read_ahead),
                    (c.queue_capacity, c.backlog, c.min_body_rate, c.max_requests, c.min_requests),
                    c.access_log_format,
                )
            )
        };
        assert_eq!(fields(&ours), fields(&theirs));
    }

    #[test]
    fn durations_show_in_a_unit_that_reads_back() {
        for (d, shown) in [
            (Duration::from_secs(75), "75s"),
            (Duration::from_micros(200), "200us"),
            (Duration::from_millis(1500), "1500ms"),
        ] {
            assert_eq!(Seconds(d).to_string(), shown);
            assert_eq!(shown.parse::<Seconds>(), Ok(Seconds(d)));
        }
    }

    #[test]
    fn scale_arguments() {
        assert_eq!(parse_scale("3"), Ok(ScaleTo::Absolute(3)));
        assert_eq!(parse_scale("+1"), Ok(ScaleTo::Relative(1)));
        assert_eq!(parse_scale("-2"), Ok(ScaleTo::Relative(-2)));
        assert!(parse_scale("many").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn worker_command_after_double_dash() {
        let cli = Cli::try_parse_from(["monodon", "serve", "-l", "unix:/tmp/x", "--", "/bin/app", "--flag"])
            .unwrap();
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.command, vec![OsString::from("/bin/app"), OsString::from("--flag")]);
        assert_eq!(args.listen, vec![ListenAddr::Unix("/tmp/x".into())]);
    }
}
