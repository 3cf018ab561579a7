//! What the monodon supervisor and its workers share.
//!
//! - [`access_log`]: the access log's line formats and file, written by
//!   workers for the requests they serve and by the supervisor for those it
//!   answers itself.
//! - [`http`]: HTTP/1.1 request framing over byte buffers (head limits and
//!   validation, body framing, chunked decoding, the keep-alive decision).
//!   The supervisor uses it to know when a head is complete and sound; the
//!   worker uses it to parse that head again and read the body.
//! - [`wire`]: the supervisor↔worker messages and the descriptor passing that
//!   carries client connections across (see PROTOCOL.md).
//! - [`scoreboard`]: one shared-memory page per worker where the worker
//!   publishes what it is doing, so the supervisor can read it without a
//!   message round trip (and after the worker has died).

pub mod access_log;
pub mod http;
pub mod scoreboard;
pub mod wire;

/// Environment variables through which the supervisor configures a worker.
pub mod env {
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
    /// Where the worker writes its access log (`-`: stdout); unset: none.
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
}
