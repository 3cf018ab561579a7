//! The environment through which the supervisor configures a worker: the
//! variable names, and [`WorkerEnv`], the one type both sides use to write
//! and to read them (PROTOCOL.md's table lists the same names; a test keeps
//! the two in step).

use std::fmt;
use std::time::Duration;

use crate::access_log::Format;
use crate::forwarded::TrustedProxies;
use crate::http::Limits;

/// The fd number of the worker's channel (always 3). Its presence is what
/// tells a binary that it was started as a worker.
pub const CHANNEL_FD: &str = "MONODON_CHANNEL_FD";
/// The fd number of the worker's scoreboard page (always 4).
pub const SCOREBOARD_FD: &str = "MONODON_SCOREBOARD_FD";
/// The supervisor's pid: a worker whose parent is another has been
/// orphaned and exits.
pub const SUPERVISOR_PID: &str = "MONODON_SUPERVISOR_PID";
/// The generation this worker belongs to.
pub const GENERATION: &str = "MONODON_GENERATION";
/// The request limits, as `Limits::to_env` writes them.
pub const LIMITS: &str = "MONODON_LIMITS";
/// Requests after which the worker retires (0: no limit).
pub const MAX_REQUESTS: &str = "MONODON_MAX_REQUESTS";
/// Where the worker writes its access log (`-`: stdout); empty: none.
pub const ACCESS_LOG: &str = "MONODON_ACCESS_LOG";
/// `combined` or `json`.
pub const ACCESS_LOG_FORMAT: &str = "MONODON_ACCESS_LOG_FORMAT";
/// Microseconds a worker may wait for the next request on its connection
/// when no other connection waits (0: hand it back at once).
pub const READ_AHEAD_US: &str = "MONODON_READ_AHEAD_US";
/// Bytes per second a request body must average after 10 s (0: no minimum).
pub const MIN_BODY_RATE: &str = "MONODON_MIN_BODY_RATE";
/// Seconds a worker waits on a client's body or on a slow reader.
pub const IO_TIMEOUT: &str = "MONODON_IO_TIMEOUT";
/// The peers whose `Forwarded`/`X-Forwarded-*` fields name the client, as
/// `TrustedProxies::to_list` writes them; absent: none.
pub const FORWARDED_ALLOW_IPS: &str = "MONODON_FORWARDED_ALLOW_IPS";
/// How many listening sockets the worker may accept from itself, on fds
/// 5, 6, ... (`FEATURE_ACCEPT`); absent or 0: none, it accepts nothing.
pub const LISTENERS: &str = "MONODON_LISTENERS";
/// The path the supervisor answers as a health check (`--health-path`):
/// a worker that accepts hands such a request to the supervisor. Empty: none.
pub const HEALTH_PATH: &str = "MONODON_HEALTH_PATH";
/// How many connections a worker that accepts may keep warm between
/// requests (`FEATURE_WARM`), at most the scoreboard's `WARM_CELLS`;
/// absent or 0: none.
pub const WARM_CONNECTIONS: &str = "MONODON_WARM_CONNECTIONS";
/// `template`: the process is its generation's template, not a worker: it
/// loads the app and forks workers when asked (PROTOCOL.md, "Templates").
/// Absent in a worker.
pub const ROLE: &str = "MONODON_ROLE";

/// Every variable the supervisor sets for a worker.
pub const ALL: [&str; 15] = [
    CHANNEL_FD,
    SCOREBOARD_FD,
    SUPERVISOR_PID,
    GENERATION,
    LIMITS,
    IO_TIMEOUT,
    MAX_REQUESTS,
    READ_AHEAD_US,
    ACCESS_LOG,
    ACCESS_LOG_FORMAT,
    MIN_BODY_RATE,
    FORWARDED_ALLOW_IPS,
    LISTENERS,
    HEALTH_PATH,
    WARM_CONNECTIONS,
];

/// Where the worker finds its channel and scoreboard.
pub const CHANNEL: i32 = 3;
pub const SCOREBOARD: i32 = 4;
/// The first listener's fd, for a worker given [`LISTENERS`].
pub const FIRST_LISTENER: i32 = 5;

/// What one worker is told at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    pub supervisor_pid: u32,
    pub generation: u64,
    pub limits: Limits,
    /// Whole seconds on the wire, at least one.
    pub io_timeout: Duration,
    /// Requests after which the worker retires; 0: never.
    pub max_requests: u64,
    /// `-`: stdout; `None`: no access log.
    pub access_log: Option<String>,
    pub access_log_format: Format,
    /// Microseconds on the wire.
    pub read_ahead: Duration,
    pub min_body_rate: u64,
    pub forwarded_allow: TrustedProxies,
    /// Listeners on fds [`FIRST_LISTENER`].. that the worker accepts from.
    pub listeners: u16,
    pub health_path: Option<String>,
    /// Connections it may keep warm (with listeners only).
    pub warm_connections: usize,
}

/// A variable the worker cannot use, named with what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError {
    pub variable: &'static str,
    pub value: String,
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?} is not valid (see PROTOCOL.md)", self.variable, self.value)
    }
}

impl std::error::Error for EnvError {}

impl WorkerEnv {
    /// The variables, in the order of [`ALL`].
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        vec![
            (CHANNEL_FD, CHANNEL.to_string()),
            (SCOREBOARD_FD, SCOREBOARD.to_string()),
            (SUPERVISOR_PID, self.supervisor_pid.to_string()),
            (GENERATION, self.generation.to_string()),
            (LIMITS, self.limits.to_env()),
            (IO_TIMEOUT, self.io_timeout.as_secs().max(1).to_string()),
            (MAX_REQUESTS, self.max_requests.to_string()),
            (READ_AHEAD_US, self.read_ahead.as_micros().to_string()),
            (ACCESS_LOG, self.access_log.clone().unwrap_or_default()),
            (ACCESS_LOG_FORMAT, self.access_log_format.name().to_owned()),
            (MIN_BODY_RATE, self.min_body_rate.to_string()),
            (FORWARDED_ALLOW_IPS, self.forwarded_allow.to_list()),
            (LISTENERS, self.listeners.to_string()),
            (HEALTH_PATH, self.health_path.clone().unwrap_or_default()),
            (WARM_CONNECTIONS, self.warm_connections.to_string()),
        ]
    }

    /// Reads what [`WorkerEnv::to_vars`] wrote. A variable that is missing
    /// takes its default (an older supervisor may not set a newer one); one
    /// that is set but malformed is an error, never a silent default.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<WorkerEnv, EnvError> {
        fn read<T>(
            get: &impl Fn(&str) -> Option<String>,
            variable: &'static str,
            default: T,
            parse: impl FnOnce(&str) -> Option<T>,
        ) -> Result<T, EnvError> {
            match get(variable) {
                None => Ok(default),
                Some(value) => parse(&value).ok_or(EnvError { variable, value }),
            }
        }
        let number = |s: &str| s.parse::<u64>().ok();
        Ok(WorkerEnv {
            supervisor_pid: read(&get, SUPERVISOR_PID, 0, |s| s.parse().ok())?,
            generation: read(&get, GENERATION, 0, number)?,
            limits: read(&get, LIMITS, Limits::default(), Limits::from_env)?,
            io_timeout: read(&get, IO_TIMEOUT, Duration::from_secs(30), |s| {
                number(s).map(Duration::from_secs)
            })?,
            max_requests: read(&get, MAX_REQUESTS, 0, number)?,
            read_ahead: read(&get, READ_AHEAD_US, Duration::ZERO, |s| number(s).map(Duration::from_micros))?,
            access_log: read(&get, ACCESS_LOG, None, |s| Some((!s.is_empty()).then(|| s.to_owned())))?,
            access_log_format: read(&get, ACCESS_LOG_FORMAT, Format::Combined, Format::parse)?,
            min_body_rate: read(&get, MIN_BODY_RATE, 0, number)?,
            forwarded_allow: read(&get, FORWARDED_ALLOW_IPS, TrustedProxies::none(), |s| {
                TrustedProxies::parse(s).ok()
            })?,
            listeners: read(&get, LISTENERS, 0, |s| s.parse().ok())?,
            health_path: read(&get, HEALTH_PATH, None, |s| Some((!s.is_empty()).then(|| s.to_owned())))?,
            warm_connections: read(&get, WARM_CONNECTIONS, 0, |s| {
                s.parse().ok().filter(|&n| n <= crate::scoreboard::WARM_CELLS)
            })?,
        })
    }

    /// [`WorkerEnv::from_vars`] over this process's environment.
    pub fn from_process() -> Result<WorkerEnv, EnvError> {
        WorkerEnv::from_vars(|name| std::env::var(name).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn sample() -> WorkerEnv {
        WorkerEnv {
            supervisor_pid: 4242,
            generation: 7,
            limits: Limits { max_body: 12345, max_pipelined: 3, ..Limits::default() },
            io_timeout: Duration::from_secs(9),
            max_requests: 500,
            access_log: Some("/var/log/monodon/access.log".into()),
            access_log_format: Format::Json,
            read_ahead: Duration::from_micros(150),
            min_body_rate: 2048,
            forwarded_allow: TrustedProxies::parse("10.0.0.0/8,unix").unwrap(),
            listeners: 2,
            health_path: Some("/healthz".into()),
            warm_connections: 17,
        }
    }

    fn vars(env: &WorkerEnv) -> HashMap<&'static str, String> {
        env.to_vars().into_iter().collect()
    }

    #[test]
    fn round_trip() {
        let env = sample();
        let written = vars(&env);
        assert_eq!(WorkerEnv::from_vars(|k| written.get(k).cloned()), Ok(env.clone()));
        let none = WorkerEnv { access_log: None, ..env };
        let written = vars(&none);
        assert_eq!(written[ACCESS_LOG], "");
        assert_eq!(WorkerEnv::from_vars(|k| written.get(k).cloned()), Ok(none));
    }

    #[test]
    fn every_variable_is_written_once_in_the_order_of_all() {
        let names: Vec<&str> = sample().to_vars().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, ALL);
    }

    #[test]
    fn malformed_values_are_errors_naming_the_variable() {
        for variable in
            ALL.iter().filter(|v| ![CHANNEL_FD, SCOREBOARD_FD, ACCESS_LOG, HEALTH_PATH].contains(v))
        {
            let mut written = vars(&sample());
            written.insert(variable, "bogus".into());
            let e = WorkerEnv::from_vars(|k| written.get(k).cloned()).unwrap_err();
            assert_eq!(e.variable, *variable);
            assert!(e.to_string().contains(&format!("{variable}=\"bogus\"")), "{e}");
        }
    }

    #[test]
    fn missing_variables_take_defaults() {
        let env = WorkerEnv::from_vars(|_| None).unwrap();
        assert_eq!(env.limits, Limits::default());
        assert_eq!((env.max_requests, env.min_body_rate, env.access_log), (0, 0, None));
        assert_eq!(env.io_timeout, Duration::from_secs(30));
    }

    #[test]
    fn protocol_md_names_every_variable() {
        let protocol = include_str!("../../PROTOCOL.md");
        for variable in ALL.iter().chain([&ROLE]) {
            assert!(protocol.contains(&format!("| `{variable}` |")), "PROTOCOL.md's table lacks {variable}");
        }
    }
}
