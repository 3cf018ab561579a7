//! HTTP/1.1 request framing over byte buffers.
//!
//! This module decides where a request head ends, whether it is acceptable,
//! how its body is framed and whether the connection may be kept alive. It
//! does no I/O of its own (the body readers wrap any `BufRead`), so the
//! supervisor's head check, the worker's parser and the unit tests all run
//! the very same code.
//!
//! The rules are strict on purpose (RFC 9112): anything that could let two
//! parsers disagree about where a request ends is rejected with a 4xx, never
//! guessed at.

/// Size limits on what a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line, without its CRLF (longer: 414).
    pub max_request_line: usize,
    /// Longest header field line, with its CRLF (longer: 431).
    pub max_header_line: usize,
    /// Most header fields in one head (more: 431).
    pub max_headers: usize,
    /// Largest head in bytes, from the request line to the blank line (431).
    pub max_head: usize,
    /// Largest request body in bytes (413).
    pub max_body: u64,
    /// Bodies up to this size are read by the supervisor before a worker
    /// gets the request (slow senders never hold a worker); larger ones are
    /// streamed by the worker.
    pub buffered_body: usize,
    /// Most requests a client may send ahead of the response it is waiting
    /// for (pipelining); the one past them is answered 429.
    pub max_pipelined: usize,
}

impl Default for Limits {
    /// gunicorn's defaults for the head (so the same requests pass), and
    /// 1 GiB for bodies.
    fn default() -> Self {
        Limits {
            max_request_line: 4094,
            max_header_line: 8190,
            max_headers: 100,
            max_head: 64 * 1024,
            max_body: 1 << 30,
            buffered_body: 64 * 1024,
            max_pipelined: 100,
        }
    }
}

impl Limits {
    /// The form the supervisor hands to a worker in its environment.
    pub fn to_env(&self) -> String {
        format!(
            "{},{},{},{},{},{},{}",
            self.max_request_line,
            self.max_header_line,
            self.max_headers,
            self.max_head,
            self.max_body,
            self.buffered_body,
            self.max_pipelined
        )
    }

    /// Reads what [`Limits::to_env`] wrote; `None` if it is malformed.
    /// Fields added after the first six may be missing (a newly deployed
    /// worker under an older supervisor): they take their defaults.
    pub fn from_env(s: &str) -> Option<Limits> {
        let mut it = s.split(',').map(|p| p.trim().parse::<u64>().ok());
        let mut next = || it.next().flatten();
        let defaults = Limits::default();
        Some(Limits {
            max_request_line: usize::try_from(next()?).ok()?,
            max_header_line: usize::try_from(next()?).ok()?,
            max_headers: usize::try_from(next()?).ok()?,
            max_head: usize::try_from(next()?).ok()?,
            max_body: next()?,
            buffered_body: usize::try_from(next()?).ok()?,
            max_pipelined: match it.next() {
                None => defaults.max_pipelined,
                Some(v) => usize::try_from(v?).ok()?,
            },
        })
    }
}

/// Why a request is refused, and the status that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: &'static str,
}

impl Rejection {
    const fn new(status: u16, reason: &'static str) -> Self {
        Rejection { status, reason }
    }

    /// A complete response for this rejection that closes the connection.
    pub fn response(&self) -> Vec<u8> {
        error_response(self.status, self.reason)
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

/// A short plain-text response with `Connection: close`, for errors that
/// monodon itself answers (bad requests, a worker that died or timed out).
pub fn error_response(status: u16, detail: &str) -> Vec<u8> {
    let body = format!("{} {}: {}\n", status, reason_phrase(status), detail);
    format!(
        "HTTP/1.1 {} {}\r\nDate: {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        status,
        reason_phrase(status),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        body.len(),
        body
    )
    .into_bytes()
}

/// The standard reason phrase for a status code ("" when unknown).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        418 => "I'm a teapot",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// How the body of a request is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body at all.
    None,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

mod body;
mod head;
mod pending;

/// Whether a complete request is for the health-check `path` (GET or HEAD,
/// any query): `Some(head_only)` if it is.
pub fn is_health_check(received: &[u8], path: &str) -> Option<bool> {
    let line = crate::access_log::RawRequestLine::from_bytes(received);
    let (method, target, _) = line.parts();
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    (target.split('?').next() == Some(path)).then_some(head_only)
}

pub use body::{
    body_rejection, chunked_body_len, parse_chunk_size_line, BodyError, BodyReader, ChunkedScanner,
};
pub use head::{parse_head, Head, HeadScanner};
pub use pending::PendingRequest;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_round_trip_through_env() {
        let l = Limits { max_body: 7, ..Limits::default() };
        assert_eq!(Limits::from_env(&l.to_env()), Some(l));
        assert_eq!(Limits::from_env("1,2"), None);
        // From a supervisor older than max_pipelined: the rest is kept.
        let older = Limits::from_env("1,2,3,4,5,6").unwrap();
        assert_eq!((older.max_head, older.buffered_body), (4, 6));
        assert_eq!(older.max_pipelined, Limits::default().max_pipelined);
        assert_eq!(Limits::from_env("1,2,3,4,5,6,x"), None);
    }
}
