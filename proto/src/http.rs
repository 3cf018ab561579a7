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

use std::io::{self, BufRead, Read};

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

/// A complete, validated request head, borrowing from the buffer it was
/// parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head<'b> {
    /// Bytes from the start of the buffer to the end of the blank line.
    pub len: usize,
    pub method: &'b str,
    pub target: &'b str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Fields in the order received, names as received.
    pub headers: Vec<(&'b str, &'b [u8])>,
    pub framing: BodyFraming,
    /// Whether the client allows another request on this connection.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

const BAD_LINE_ENDING: Rejection = Rejection::new(400, "bare CR or LF in the request head");

/// Looks for a complete request head at the start of `buf`.
///
/// `Ok(None)`: not complete yet, read more. `Ok(Some(head))`: complete and
/// acceptable. `Err(_)`: answer with the rejection and close.
pub fn parse_head<'b>(buf: &'b [u8], limits: &Limits) -> Result<Option<Head<'b>>, Rejection> {
    let Some(len) = find_head_end(buf, limits)? else {
        return Ok(None);
    };
    let mut stack = [httparse::EMPTY_HEADER; 101];
    let mut heap;
    let storage: &mut [httparse::Header<'b>] = if limits.max_headers < stack.len() {
        &mut stack[..limits.max_headers + 1]
    } else {
        heap = vec![httparse::EMPTY_HEADER; limits.max_headers + 1];
        &mut heap
    };
    let mut req = httparse::Request::new(storage);
    match req.parse(&buf[..len]) {
        Ok(httparse::Status::Complete(n)) if n == len => {}
        Ok(_) => return Err(Rejection::new(400, "malformed request head")),
        Err(e) => return Err(httparse_rejection(e)),
    }
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version) else {
        return Err(Rejection::new(400, "malformed request line"));
    };
    if req.headers.len() > limits.max_headers {
        return Err(Rejection::new(431, "too many header fields"));
    }
    check_target(method, target)?;
    let headers: Vec<(&'b str, &'b [u8])> = req.headers.iter().map(|h| (h.name, h.value)).collect();
    let fields = interpret_fields(&headers, minor_version)?;
    if let BodyFraming::Length(n) = fields.framing {
        if n > limits.max_body {
            return Err(Rejection::new(413, "request body larger than the limit"));
        }
    }
    Ok(Some(Head {
        len,
        method,
        target,
        minor_version,
        headers,
        framing: fields.framing,
        keep_alive: fields.keep_alive,
        expect_continue: fields.expect_continue && fields.framing != BodyFraming::None,
    }))
}

/// Finds the end of the head (just past the blank line) while enforcing the
/// line limits and CRLF-only line endings. Every limit is judged at the byte
/// that crosses it, so the decision is the same whether the head arrives
/// whole or a byte at a time, and an oversized head is refused before it is
/// all buffered.
fn find_head_end(buf: &[u8], limits: &Limits) -> Result<Option<usize>, Rejection> {
    let mut line_start = 0;
    let mut seen_request_line = false;
    for (i, &byte) in buf.iter().enumerate() {
        if i >= limits.max_head {
            return Err(Rejection::new(431, "request head too large"));
        }
        match byte {
            b'\r' => {
                if i + 1 < buf.len() && buf[i + 1] != b'\n' {
                    return Err(BAD_LINE_ENDING);
                }
            }
            b'\n' => {
                if i == 0 || buf[i - 1] != b'\r' {
                    return Err(BAD_LINE_ENDING);
                }
                let line_len = i - 1 - line_start;
                if !seen_request_line {
                    // RFC 9112 §2.2: empty lines before the request line are ignored.
                    seen_request_line = line_len > 0;
                } else if line_len == 0 {
                    return Ok(Some(i + 1));
                }
                line_start = i + 1;
            }
            _ => {
                let line_len = i + 1 - line_start;
                if !seen_request_line && line_len > limits.max_request_line {
                    return Err(Rejection::new(414, "request line too long"));
                }
                if seen_request_line && line_len + 2 > limits.max_header_line {
                    return Err(Rejection::new(431, "header field too large"));
                }
            }
        }
    }
    Ok(None)
}

fn httparse_rejection(e: httparse::Error) -> Rejection {
    use httparse::Error as E;
    match e {
        E::HeaderName => Rejection::new(400, "invalid header field name"),
        E::HeaderValue => Rejection::new(400, "invalid header field value"),
        E::NewLine => BAD_LINE_ENDING,
        E::Token => Rejection::new(400, "invalid method or request target"),
        E::Version => Rejection::new(400, "unsupported HTTP version"),
        E::TooManyHeaders => Rejection::new(431, "too many header fields"),
        E::Status => Rejection::new(400, "malformed request line"),
    }
}

/// Checks the request-target against the four forms of RFC 9112 §3.2.
fn check_target(method: &str, target: &str) -> Result<(), Rejection> {
    const BAD: Rejection = Rejection::new(400, "invalid request target");
    if target.starts_with('/') {
        return if method == "CONNECT" { Err(BAD) } else { Ok(()) };
    }
    if target == "*" {
        return if method == "OPTIONS" { Ok(()) } else { Err(BAD) };
    }
    if method == "CONNECT" {
        // authority-form: uri-host ":" port
        return match valid_authority(target) {
            Some(true) => Ok(()),
            _ => Err(BAD),
        };
    }
    // absolute-form: scheme "://" authority path-abempty [ "?" query ]
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(BAD);
    };
    let mut chars = scheme.bytes();
    let scheme_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if scheme_ok && valid_authority(&rest[..authority_end]).is_some() {
        Ok(())
    } else {
        Err(BAD)
    }
}

/// Validates `[userinfo "@"] host [":" port]`; `Some(has_port)` if valid.
fn valid_authority(authority: &str) -> Option<bool> {
    let is_sub_delim = |c: u8| b"!$&'()*+,;=".contains(&c);
    let is_unreserved = |c: u8| c.is_ascii_alphanumeric() || b"-._~".contains(&c);
    let host_port = match authority.rsplit_once('@') {
        Some((userinfo, hp)) => {
            if !userinfo.bytes().all(|c| is_unreserved(c) || is_sub_delim(c) || c == b':' || c == b'%') {
                return None;
            }
            hp
        }
        None => authority,
    };
    let (host, port) = if let Some(rest) = host_port.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        if literal.is_empty() || !literal.bytes().all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.') {
            return None;
        }
        match after {
            "" => (literal, None),
            p => (literal, Some(p.strip_prefix(':')?)),
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    let reg_name_ok =
        host_port.starts_with('[') || host.bytes().all(|c| is_unreserved(c) || is_sub_delim(c) || c == b'%');
    if host.is_empty() || !reg_name_ok {
        return None;
    }
    match port {
        Some(p) if !p.bytes().all(|c| c.is_ascii_digit()) => None,
        Some(p) => Some(!p.is_empty()),
        None => Some(false),
    }
}

struct Fields {
    framing: BodyFraming,
    keep_alive: bool,
    expect_continue: bool,
}

/// Applies the header fields that decide framing and connection handling.
fn interpret_fields(headers: &[(&str, &[u8])], minor_version: u8) -> Result<Fields, Rejection> {
    let mut host_count = 0;
    let mut content_type_count = 0;
    let mut content_length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    for &(name, value) in headers {
        if !value.iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c) || c >= 0x80) {
            return Err(Rejection::new(400, "control character in a header field value"));
        }
        if name.eq_ignore_ascii_case("host") {
            host_count += 1;
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type_count += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(value).ok_or(Rejection::new(400, "invalid Content-Length"))?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(Rejection::new(400, "conflicting Content-Length fields"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            for token in list_tokens(value) {
                if !token.eq_ignore_ascii_case("identity") {
                    codings.push(token.to_ascii_lowercase());
                }
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in list_tokens(value) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = minor_version >= 1;
            } else {
                return Err(Rejection::new(417, "unsupported expectation"));
            }
        }
    }
    if host_count > 1 {
        return Err(Rejection::new(400, "more than one Host field"));
    }
    if host_count == 0 && minor_version >= 1 {
        // RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
        return Err(Rejection::new(400, "missing Host field"));
    }
    if content_type_count > 1 {
        return Err(Rejection::new(400, "more than one Content-Type field"));
    }
    let framing = if codings.is_empty() {
        match content_length {
            Some(0) | None => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
        }
    } else {
        if minor_version == 0 {
            // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
            return Err(Rejection::new(400, "Transfer-Encoding in an HTTP/1.0 request"));
        }
        if content_length.is_some() {
            return Err(Rejection::new(400, "both Content-Length and Transfer-Encoding"));
        }
        let chunked = codings.iter().filter(|c| *c == "chunked").count();
        if chunked != 1 || codings.last().map(String::as_str) != Some("chunked") {
            return Err(Rejection::new(400, "chunked must be the final transfer coding, once"));
        }
        BodyFraming::Chunked
    };
    let keep_alive = !close && (minor_version >= 1 || keep_alive_token);
    Ok(Fields { framing, keep_alive, expect_continue })
}

/// Content-Length is 1*DIGIT: no sign, no spaces, no list (RFC 9110 §8.6).
fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The non-empty elements of a comma-separated field value, trimmed.
fn list_tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("\u{fffd}")
        .split(',')
        .map(|t| t.trim_matches([' ', '\t']))
        .filter(|t| !t.is_empty())
}

/// The error a body reader returns when the body itself is malformed or too
/// large; the worker answers it with `rejection` instead of the app's response.
#[derive(Debug)]
pub struct BodyError(pub Rejection);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {}

fn body_error(status: u16, reason: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, BodyError(Rejection::new(status, reason)))
}

/// If `e` came from a malformed body, the rejection to answer with.
pub fn body_rejection(e: &io::Error) -> Option<Rejection> {
    e.get_ref()?.downcast_ref::<BodyError>().map(|b| b.0)
}

/// Reads a request body as framed by its head, yielding the decoded bytes.
pub struct BodyReader<R> {
    inner: R,
    state: BodyState,
    max_body: u64,
    decoded: u64,
    max_line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// `n` bytes of the body (or of the current chunk) remain.
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers(usize),
    Done,
}

impl<R: BufRead> BodyReader<R> {
    pub fn new(inner: R, framing: BodyFraming, limits: &Limits) -> Self {
        let state = match framing {
            BodyFraming::None | BodyFraming::Length(0) => BodyState::Done,
            BodyFraming::Length(n) => BodyState::Length(n),
            BodyFraming::Chunked => BodyState::ChunkSize,
        };
        BodyReader { inner, state, max_body: limits.max_body, decoded: 0, max_line: limits.max_header_line }
    }

    /// True once the whole body, trailers included, has been read.
    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Bytes of body delivered so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads one CRLF-terminated line (without it) of at most `max_line` bytes.
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            let available = self.inner.fill_buf()?;
            if available.is_empty() {
                return Err(body_error(400, "connection closed inside a chunked body"));
            }
            let (take, found) = match available.iter().position(|&c| c == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            line.extend_from_slice(&available[..take]);
            self.inner.consume(take);
            if line.len() > self.max_line {
                return Err(body_error(400, "chunk size or trailer line too long"));
            }
            if found {
                break;
            }
        }
        line.pop();
        if line.pop() != Some(b'\r') || line.contains(&b'\r') {
            return Err(body_error(400, "bare CR or LF in a chunked body"));
        }
        Ok(line)
    }
}

/// Where a chunked body that starts at `buf[0]` ends, if all of it is in
/// `buf`: `Ok(Some(len))` (trailers included), `Ok(None)` if more is
/// needed, or the rejection for a malformed body. Lets the supervisor buffer
/// small bodies so that slow senders never hold a worker.
pub fn chunked_body_len(buf: &[u8], limits: &Limits) -> Result<Option<usize>, Rejection> {
    let mut reader = BodyReader::new(Partial(buf), BodyFraming::Chunked, limits);
    let mut sink = [0u8; 4096];
    loop {
        match reader.read(&mut sink) {
            Ok(0) => return Ok(Some(buf.len() - reader.get_ref().0.len())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(body_rejection(&e).unwrap_or(Rejection::new(400, "malformed chunked body"))),
        }
    }
}

/// The bytes received so far, ending in "would block" rather than EOF.
struct Partial<'a>(&'a [u8]);

impl Read for Partial<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.fill_buf()?.read(out)?;
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Partial<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.0.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(self.0)
    }

    fn consume(&mut self, amt: usize) {
        self.0 = &self.0[amt.min(self.0.len())..];
    }
}

/// Parses a chunk-size line: `1*HEXDIG [ BWS ";" chunk-ext ]` (RFC 9112 §7.1).
pub fn parse_chunk_size_line(line: &[u8]) -> Result<u64, Rejection> {
    const BAD: Rejection = Rejection::new(400, "invalid chunk size");
    let digits = line.iter().take_while(|c| c.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(BAD);
    }
    let rest = &line[digits..];
    if !rest.is_empty() {
        let after_ws = rest.iter().position(|&c| c != b' ' && c != b'\t').map(|i| &rest[i..]);
        match after_ws {
            Some(ext) if ext[0] == b';' => {
                if !ext.iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c) || c >= 0x80) {
                    return Err(Rejection::new(400, "invalid chunk extension"));
                }
            }
            _ => return Err(BAD),
        }
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| BAD)?;
    u64::from_str_radix(hex, 16).map_err(|_| BAD)
}

/// Trailer fields that would change framing or routing if anything
/// downstream honoured them (RFC 9110 §6.5.1): a request carrying one is
/// refused as a smuggling attempt. Other trailers are read and dropped.
fn forbidden_trailer(name: &[u8]) -> bool {
    const FORBIDDEN: [&[u8]; 4] = [b"content-length", b"transfer-encoding", b"host", b"trailer"];
    FORBIDDEN.iter().any(|f| f.eq_ignore_ascii_case(name))
}

fn check_trailer_line(line: &[u8]) -> Result<(), Rejection> {
    const BAD: Rejection = Rejection::new(400, "invalid trailer field");
    let colon = line.iter().position(|&c| c == b':').ok_or(BAD)?;
    let name = &line[..colon];
    let is_tchar = |c: &u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.iter().all(is_tchar) {
        return Err(BAD);
    }
    if forbidden_trailer(name) {
        return Err(Rejection::new(400, "forbidden field in trailers"));
    }
    if !line[colon + 1..].iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c) || c >= 0x80) {
        return Err(BAD);
    }
    Ok(())
}

impl<R: BufRead> Read for BodyReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.state {
                BodyState::Done => return Ok(0),
                BodyState::Length(0) => self.state = BodyState::Done,
                BodyState::ChunkData(0) => self.state = BodyState::ChunkDataEnd,
                BodyState::Length(n) | BodyState::ChunkData(n) => {
                    if out.is_empty() {
                        return Ok(0);
                    }
                    let want = out.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    let got = self.inner.read(&mut out[..want])?;
                    if got == 0 {
                        return Err(body_error(400, "connection closed before the end of the body"));
                    }
                    let left = n - got as u64;
                    self.state = match self.state {
                        BodyState::Length(_) => BodyState::Length(left),
                        _ => BodyState::ChunkData(left),
                    };
                    self.decoded += got as u64;
                    return Ok(got);
                }
                BodyState::ChunkSize => {
                    let line = self.read_line()?;
                    let size = parse_chunk_size_line(&line).map_err(|r| body_error(r.status, r.reason))?;
                    if self.decoded.saturating_add(size) > self.max_body {
                        return Err(body_error(413, "request body larger than the limit"));
                    }
                    self.state = if size == 0 { BodyState::Trailers(0) } else { BodyState::ChunkData(size) };
                }
                BodyState::ChunkDataEnd => {
                    let line = self.read_line()?;
                    if !line.is_empty() {
                        return Err(body_error(400, "chunk data longer than its size"));
                    }
                    self.state = BodyState::ChunkSize;
                }
                BodyState::Trailers(count) => {
                    let line = self.read_line()?;
                    if line.is_empty() {
                        self.state = BodyState::Done;
                    } else if count >= 100 {
                        return Err(body_error(431, "too many trailer fields"));
                    } else {
                        check_trailer_line(&line).map_err(|r| body_error(r.status, r.reason))?;
                        self.state = BodyState::Trailers(count + 1);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Head<'_>>, Rejection> {
        parse_head(raw, &Limits::default())
    }

    fn status(raw: &[u8]) -> u16 {
        parse(raw).expect_err("should be rejected").status
    }

    fn body(raw_body: &[u8], framing: BodyFraming) -> Result<Vec<u8>, Rejection> {
        let mut r = BodyReader::new(raw_body, framing, &Limits::default());
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(|e| body_rejection(&e).expect("body error"))?;
        Ok(out)
    }

    #[test]
    fn simple_get() {
        let h = parse(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nrest").unwrap().unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/a?b=c");
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.headers, vec![("Host", &b"x"[..]), ("X-A", &b"1"[..])]);
        assert_eq!(h.len, 40);
        assert_eq!(h.framing, BodyFraming::None);
        assert!(h.keep_alive);
    }

    #[test]
    fn partial_heads_wait_for_more() {
        let full = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |raw: &[u8]| parse(raw).unwrap().unwrap().keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n"));
    }

    #[test]
    fn framing_choices() {
        let f = |raw: &[u8]| parse(raw).unwrap().unwrap().framing;
        assert_eq!(f(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"), BodyFraming::Length(5));
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            BodyFraming::Length(5)
        );
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"),
            BodyFraming::Chunked
        );
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            BodyFraming::Chunked
        );
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\n"),
            BodyFraming::Length(3)
        );
    }

    #[test]
    fn ambiguous_framing_is_rejected() {
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            400
        );
        assert_eq!(status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n"), 400);
        assert_eq!(status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n"), 400);
        assert_eq!(status(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"), 400);
        assert_eq!(status(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"), 400);
        assert_eq!(status(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
    }

    #[test]
    fn malformed_heads_are_rejected() {
        assert_eq!(status(b"GET / HTTP/1.1\nHost: x\r\n\r\n"), 400, "bare LF");
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: x\rY\r\n\r\n"), 400, "bare CR");
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n c\r\n\r\n"), 400, "obs-fold");
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: b\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: x\r\nA: b\x07c\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\n\r\n"), 400, "no Host");
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"PUT s://]ufd/: HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n"), 417);
    }

    #[test]
    fn targets_in_all_four_forms() {
        for raw in [
            &b"GET http://user:pw@example.com:8080/x?q HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET http://[::1]:80/ HTTP/1.1\r\nHost: a\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"CONNECT [::1]:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(parse(raw).unwrap().is_some(), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn limits_give_their_statuses() {
        let limits = Limits::default();
        let long_target = format!("GET /{} HTTP/1.1\r\n", "a".repeat(limits.max_request_line));
        assert_eq!(status(long_target.as_bytes()), 414, "partial request line");
        let long_field = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(limits.max_header_line));
        assert_eq!(status(long_field.as_bytes()), 431);
        let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 0..limits.max_headers {
            many.push_str(&format!("H{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(status(many.as_bytes()), 431);
        let big = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", limits.max_body + 1);
        assert_eq!(status(big.as_bytes()), 413);
    }

    #[test]
    fn chunked_bodies_decode() {
        let raw = b"5;a=\"b c\"\r\nhello\r\n6\r\n world\r\n000\r\nVary: *\r\n\r\nNEXT";
        let mut r = BodyReader::new(&raw[..], BodyFraming::Chunked, &Limits::default());
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello world");
        assert!(r.is_done());
        assert_eq!(r.into_inner(), b"NEXT", "nothing past the body is consumed");
    }

    #[test]
    fn bad_chunks_are_rejected() {
        for raw in [
            &b"6_0\r\nhello!\r\n0\r\n\r\n"[..],
            b"5\r\nhello\r\n0 \r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5\n;\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"5;ext=val\rue\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nContent-Length: 9\r\n\r\n",
            b"5\r\nhello\r\n0\r\n",
            b"11111111111111111\r\n",
        ] {
            assert_eq!(
                body(raw, BodyFraming::Chunked).map_err(|r| r.status),
                Err(400),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn chunked_body_len_finds_the_end_or_waits() {
        let limits = Limits::default();
        let body = b"5\r\nhello\r\n0\r\nX: y\r\n\r\nGET /next";
        assert_eq!(chunked_body_len(body, &limits), Ok(Some(body.len() - 9)));
        for cut in 0..body.len() - 9 {
            assert_eq!(chunked_body_len(&body[..cut], &limits), Ok(None), "cut at {cut}");
        }
        assert_eq!(chunked_body_len(b"zz\r\n", &limits).map_err(|r| r.status), Err(400));
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        assert_eq!(body(b"hello world", BodyFraming::Length(5)).unwrap(), b"hello");
        assert_eq!(body(b"hel", BodyFraming::Length(5)).map_err(|r| r.status), Err(400));
    }

    #[test]
    fn chunked_body_over_limit_is_413() {
        let limits = Limits { max_body: 4, ..Limits::default() };
        let mut r = BodyReader::new(&b"5\r\nhello\r\n0\r\n\r\n"[..], BodyFraming::Chunked, &limits);
        let e = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(body_rejection(&e).map(|r| r.status), Some(413));
    }

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
