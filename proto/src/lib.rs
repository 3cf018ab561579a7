//! What the monodon supervisor and its workers share.
//!
//! - [`access_log`]: the access log's line formats and file, written by
//!   workers for the requests they serve and by the supervisor for those it
//!   answers itself.
//! - [`env`]: the worker's environment, written by the supervisor and read
//!   by the worker through one type.
//! - [`forwarded`]: which peers may say who the client is
//!   (`--forwarded-allow-ips`), and the client address and scheme their
//!   `Forwarded`/`X-Forwarded-*` fields give.
//! - [`histogram`]: durations in fixed buckets (requests, queue waits),
//!   the same bounds for every source.
//! - [`http`]: HTTP/1.1 request framing over byte buffers (head limits and
//!   validation, body framing, chunked decoding, the keep-alive decision).
//!   The supervisor uses it to know when a head is complete and sound; the
//!   worker uses it to parse that head again and read the body.
//! - [`parsed`]: the parsed hand-over, for workers that would rather not
//!   parse HTTP (the Python worker): the supervisor's parse of a request.
//! - [`proxy`]: the PROXY protocol header a load balancer sends first.
//! - [`wire`]: the supervisor↔worker messages and the descriptor passing that
//!   carries client connections across (see PROTOCOL.md).
//! - [`template`]: the messages between the supervisor and a generation's
//!   template process, which forks that generation's workers.
//! - [`scoreboard`]: one shared-memory page per worker where the worker
//!   publishes what it is doing, so the supervisor can read it without a
//!   message round trip (and after the worker has died).

pub mod access_log;
pub mod env;
pub mod forwarded;
pub mod histogram;
pub mod http;
pub mod net;
pub mod parsed;
pub mod proxy;
pub mod scoreboard;
pub mod template;
pub mod wire;
