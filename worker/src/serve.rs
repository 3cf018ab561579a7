//! HTTP/1.1 on one connection: parse each request the client has sent, read
//! its body, run the app, write the response, and stop as soon as the
//! connection would have to wait for the client (the supervisor waits for
//! idle clients, not a worker).

use std::io::{self, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};

use log::{debug, warn};
use monodon_proto::forwarded::TrustedProxies;
use monodon_proto::http::{self, BodyFraming, BodyReader, Limits, Rejection};
use monodon_proto::scoreboard::Slot;

use std::cell::RefCell;
use std::time::Instant;

use crate::app::{App, Body, Request, Response, WorkerInfo};
use crate::stream::{Connection, Input};
use monodon_proto::access_log::{AccessLog, Entry, RawRequestLine};

/// How the runtime left a connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The connection may carry another request.
    pub keep: bool,
    /// Requests served on the connection so far, this pass included.
    pub served: u32,
    /// Bytes read past the last request served (the start of the next one).
    pub leftover: Vec<u8>,
    /// The worker has served its last request and must exit.
    pub retiring: bool,
}

/// What the runtime knows while serving.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// How long to wait for a keep-alive client's next request before
    /// handing the connection back (only while no connection waits).
    pub read_ahead: std::time::Duration,
    /// Bytes per second a request body must average (after a grace period).
    pub min_body_rate: u64,
    /// How long one read or write on the client may block.
    pub io_timeout: std::time::Duration,
    pub limits: &'a Limits,
    pub pid: u32,
    pub generation: u64,
    pub slot: &'a Slot,
    pub peer: &'a str,
    /// The peers whose forwarding fields say who the client is.
    pub forwarded_allow: &'a TrustedProxies,
    pub access_log: Option<&'a RefCell<AccessLog>>,
}

/// The most body bytes read and thrown away after the app returns without
/// reading its whole body, to keep the connection; past that, close it.
const MAX_DRAIN: u64 = 1 << 20;

/// A worker's remaining allowance of requests (its max-requests limit).
pub struct Budget<'a> {
    /// Requests left before the worker retires; `None`: no limit.
    pub remaining: Option<u64>,
    /// Called when the last request starts, so the supervisor can start a
    /// replacement while it is being served.
    pub on_last: &'a mut dyn FnMut(),
}

/// Serves every complete request buffered on `input`, or until the budget
/// runs out (`Outcome::retiring`).
pub fn serve_connection<C: Connection>(
    app: &mut dyn App,
    input: &mut Input<C>,
    served: u32,
    ctx: &Context<'_>,
    budget: &mut Budget<'_>,
) -> Outcome {
    serve_parsed(app, input, None, served, ctx, budget)
}

/// The head at the start of a connection's buffer, parsed already (a
/// worker's first read, which decided from it to serve the request).
pub struct FirstHead(OwnedHead);

impl FirstHead {
    pub fn new(head: &http::Head<'_>) -> FirstHead {
        FirstHead(OwnedHead::from(head))
    }
}

/// [`serve_connection`], with the first request's head parsed already.
pub fn serve_parsed<C: Connection>(
    app: &mut dyn App,
    input: &mut Input<C>,
    mut first: Option<FirstHead>,
    mut served: u32,
    ctx: &Context<'_>,
    budget: &mut Budget<'_>,
) -> Outcome {
    let closed = |served| Outcome { keep: false, served, leftover: Vec::new(), retiring: false };
    // Requests in a row the client sent before reading the previous response.
    let mut pipelined = 0usize;
    loop {
        let parsed = match first.take() {
            Some(FirstHead(head)) => Ok(Some(head)),
            None => http::parse_head(input.buffered(), ctx.limits).map(|h| h.as_ref().map(OwnedHead::from)),
        };
        let head = match parsed {
            Ok(Some(head)) => head,
            Ok(None) => {
                return Outcome { keep: true, served, leftover: input.buffered().to_vec(), retiring: false };
            }
            Err(rejection) => {
                let line = RawRequestLine::from_bytes(input.buffered());
                let (method, target, version) = line.parts();
                let bytes = reject(&mut input.stream, rejection);
                record_refused(ctx, (method, target, version), rejection.status, bytes);
                return closed(served);
            }
        };
        input_consume(input, head.len);
        if pipelined > ctx.limits.max_pipelined {
            let rejection = Rejection { status: 429, reason: "too many pipelined requests" };
            let bytes = reject(&mut input.stream, rejection);
            record_refused(ctx, (&head.method, &head.target, head.version()), rejection.status, bytes);
            return closed(served);
        }
        // Past the limit too (it was held while no replacement could be made).
        let last = budget.remaining.is_some_and(|r| r <= 1) && !ctx.slot.limit_held();
        if last {
            (budget.on_last)();
        }
        ctx.slot.set_request_line(&[head.method.as_bytes(), b" ", head.target.as_bytes()]);
        ctx.slot.begin_request();
        let keep = serve_one(app, input, &head, ctx);
        ctx.slot.end_request();
        if let Some(r) = budget.remaining.as_mut() {
            *r = r.saturating_sub(1);
        }
        served = served.saturating_add(1);
        if !keep {
            return Outcome { retiring: last, ..closed(served) };
        }
        if last {
            return Outcome { keep: true, served, leftover: input.buffered().to_vec(), retiring: true };
        }
        pipelined = if input.buffered().is_empty() { 0 } else { pipelined + 1 };
        // Read-ahead: a keep-alive client usually sends its next request
        // right after our response; waiting a moment for it saves two
        // hand-overs, but only while no other connection waits for a worker.
        if input.buffered().is_empty()
            && !ctx.read_ahead.is_zero()
            && !ctx.slot.others_waiting()
            && input.stream.readable_within(ctx.read_ahead)
        {
            match input.read_available() {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(_) => return closed(served),
            }
        }
    }
}

fn input_consume<C: Connection>(input: &mut Input<C>, n: usize) {
    io::BufRead::consume(input, n);
}

/// Answers a refused request; returns the bytes written.
fn reject(stream: &mut impl Write, rejection: Rejection) -> u64 {
    debug!("rejecting request: {rejection}");
    let response = rejection.response();
    match stream.write_all(&response) {
        Ok(()) => response.len() as u64,
        Err(_) => 0,
    }
}

/// An owned copy of a parsed head, so the input buffer can move on.
struct OwnedHead {
    len: usize,
    method: String,
    target: String,
    minor_version: u8,
    headers: Vec<(String, Vec<u8>)>,
    framing: BodyFraming,
    keep_alive: bool,
    expect_continue: bool,
}

impl OwnedHead {
    /// The version as served (a higher HTTP/1.x is served as 1.1).
    fn version(&self) -> &'static str {
        if self.minor_version == 0 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        }
    }
}

impl From<&http::Head<'_>> for OwnedHead {
    fn from(h: &http::Head<'_>) -> Self {
        OwnedHead {
            len: h.len,
            method: h.method.to_owned(),
            target: h.target.to_owned(),
            minor_version: h.minor_version,
            headers: h.headers.iter().map(|(n, v)| ((*n).to_owned(), v.to_vec())).collect(),
            framing: h.framing,
            keep_alive: h.keep_alive,
            expect_continue: h.expect_continue,
        }
    }
}

/// The body as the app sees it: decoded, with `100 Continue` sent on the
/// first read, and any framing error remembered for the runtime.
struct AppBody<'a, C> {
    reader: BodyReader<&'a mut Input<C>>,
    continue_pending: bool,
    rejection: Option<Rejection>,
    failed: bool,
    /// When the body started to be read, for the minimum rate.
    since: Option<Instant>,
    min_rate: u64,
}

/// A body slower than `--min-body-rate` is given this long to pick up
/// before it is cut off.
const BODY_RATE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl<C: Connection> AppBody<'_, C> {
    /// A client trickling its body holds a worker: past the grace period it
    /// must average at least `min_rate` bytes per second.
    fn too_slow(&mut self) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        let elapsed = since.elapsed();
        self.min_rate > 0
            && elapsed > BODY_RATE_GRACE
            && (self.reader.decoded() as f64) < self.min_rate as f64 * elapsed.as_secs_f64()
    }
}

impl<C: Connection> Read for AppBody<'_, C> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.continue_pending && !self.reader.is_done() {
            self.continue_pending = false;
            self.reader.get_mut().stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        if !self.reader.is_done() && self.too_slow() {
            self.rejection = Some(Rejection { status: 408, reason: "request body sent too slowly" });
            self.failed = true;
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request body below the minimum rate"));
        }
        match self.reader.read(buf) {
            Ok(n) => Ok(n),
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    self.rejection =
                        Some(Rejection { status: 408, reason: "request body not received in time" });
                }
                self.rejection = self.rejection.or(http::body_rejection(&e));
                self.failed = true;
                Err(e)
            }
        }
    }
}

/// Serves one request whose head has been consumed; returns whether the
/// connection can be kept.
fn serve_one<C: Connection>(
    app: &mut dyn App,
    input: &mut Input<C>,
    head: &OwnedHead,
    ctx: &Context<'_>,
) -> bool {
    let started = Instant::now();
    let written_before = ctx.slot.written();
    let mut body = AppBody {
        reader: BodyReader::new(&mut *input, head.framing, ctx.limits),
        continue_pending: head.expect_continue,
        rejection: None,
        failed: false,
        since: None,
        min_rate: ctx.min_body_rate,
    };
    let requests = ctx.slot.requests.load(std::sync::atomic::Ordering::Relaxed);
    let origin = ctx.forwarded_allow.resolve(ctx.peer, &head.headers);
    let mut request = Request {
        method: head.method.clone(),
        target: head.target.clone(),
        minor_version: head.minor_version,
        headers: head.headers.clone(),
        peer: origin.client,
        scheme: origin.scheme.as_str(),
        worker: WorkerInfo { pid: ctx.pid, generation: ctx.generation, requests },
        body: &mut body,
    };
    let response = match catch_unwind(AssertUnwindSafe(|| app.call(&mut request))) {
        Ok(r) => r,
        Err(_) => {
            warn!("app panicked on {} {}", head.method, head.target);
            Response::text(500, "internal server error\n").header("Connection", "close")
        }
    };
    let client = std::mem::take(&mut request.peer);
    drop(request);

    // Settle the body before answering, so the Connection header tells the truth.
    let mut keep = head.keep_alive;
    if !body.reader.is_done() && !body.failed {
        if body.continue_pending {
            // The client is still waiting for permission to send the body.
            keep = false;
        } else {
            let mut sink = io::sink();
            let mut limited = (&mut body).take(MAX_DRAIN);
            let _ = io::copy(&mut limited, &mut sink);
            keep &= body.reader.is_done();
        }
    }
    if let Some(rejection) = body.rejection {
        reject(&mut input.stream, rejection);
        record_request(ctx, &client, head, rejection.status, written_before, started);
        return false;
    }
    keep &= !body.failed && !ctx.slot.is_draining();
    let head_only = head.method == "HEAD";
    let status = response.status;
    let kept = match write_response(&mut input.stream, response, head_only, head.minor_version, keep) {
        Ok(kept) => kept,
        Err(e) => {
            debug!("writing response to {}: {e}", ctx.peer);
            false
        }
    };
    record_request(ctx, &client, head, status, written_before, started);
    kept
}

/// Counts a request the app answered, and logs it under the client it was
/// told of.
fn record_request(
    ctx: &Context<'_>,
    client: &str,
    head: &OwnedHead,
    status: u16,
    written_before: u64,
    started: Instant,
) {
    ctx.slot.count_response(status, Some(started.elapsed()));
    let Some(log) = ctx.access_log else { return };
    let header = |name: &str| {
        head.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    log.borrow_mut().write(&Entry {
        peer: client,
        method: &head.method,
        target: &head.target,
        version: head.version(),
        status,
        bytes: ctx.slot.written() - written_before,
        referer: header("referer"),
        user_agent: header("user-agent"),
        duration: started.elapsed(),
        pid: ctx.pid,
        generation: ctx.generation,
    });
}

/// Counts and logs a request refused before the app saw it (its head did
/// not parse, or it was pipelined past the limit).
fn record_refused(ctx: &Context<'_>, request_line: (&str, &str, &str), status: u16, bytes: u64) {
    ctx.slot.count_response(status, None);
    let Some(log) = ctx.access_log else { return };
    log.borrow_mut().write(&Entry {
        pid: ctx.pid,
        generation: ctx.generation,
        ..Entry::refused(ctx.peer, request_line, status, bytes)
    });
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    NoBody,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes `response`; returns whether the connection stays open.
pub(crate) fn write_response(
    stream: &mut impl Connection,
    mut response: Response,
    head_only: bool,
    minor_version: u8,
    mut keep: bool,
) -> io::Result<bool> {
    let status = response.status;
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::NoBody
    } else {
        match &response.body {
            Body::Empty => Framing::Length(0),
            Body::Bytes(b) => Framing::Length(b.len() as u64),
            Body::File { len, .. } => Framing::Length(*len),
            Body::Stream(_) if minor_version >= 1 => Framing::Chunked,
            Body::Stream(_) => Framing::UntilClose,
        }
    };
    if framing == Framing::UntilClose && !head_only {
        keep = false;
    }
    let headers = std::mem::take(&mut response.headers);
    let mut out = Vec::with_capacity(256);
    let has_date = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("date"));
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(digits.format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(http::reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &headers {
        if name.eq_ignore_ascii_case("connection") {
            keep &= !value.to_ascii_lowercase().contains("close");
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding") {
            continue;
        }
        if !valid_header(name, value) {
            warn!("dropping invalid response header {name:?}");
            continue;
        }
        for part in [name.as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            out.extend_from_slice(part);
        }
    }
    if !has_date {
        out.extend_from_slice(b"Date: ");
        crate::date::append_now(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(digits.format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::NoBody | Framing::UntilClose => {}
    }
    if !keep {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if minor_version == 0 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");

    if head_only || framing == Framing::NoBody {
        stream.write_all(&out)?;
        return Ok(keep);
    }
    match response.body {
        Body::Empty => stream.write_all(&out)?,
        Body::Bytes(bytes) => {
            if bytes.len() <= 32 * 1024 {
                out.extend_from_slice(&bytes);
                stream.write_all(&out)?;
            } else {
                stream.write_all(&out)?;
                stream.write_all(&bytes)?;
            }
        }
        Body::File { file, offset, len } => {
            stream.write_all(&out)?;
            stream.send_file(&file, offset, len)?;
        }
        Body::Stream(mut reader) => {
            stream.write_all(&out)?;
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // The head is out: all we can do is cut the response short.
                    Err(e) => return Err(e),
                };
                if framing == Framing::Chunked {
                    let mut chunk = Vec::with_capacity(n + 16);
                    let _ = write!(chunk, "{n:x}\r\n");
                    chunk.extend_from_slice(&buf[..n]);
                    chunk.extend_from_slice(b"\r\n");
                    stream.write_all(&chunk)?;
                } else {
                    stream.write_all(&buf[..n])?;
                }
            }
            if framing == Framing::Chunked {
                stream.write_all(b"0\r\n\r\n")?;
            }
        }
    }
    Ok(keep)
}

fn valid_header(name: &str, value: &str) -> bool {
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    !name.is_empty()
        && name.bytes().all(is_tchar)
        && !value.bytes().any(|c| c == b'\r' || c == b'\n' || c == 0)
}

#[cfg(test)]
mod tests {
    use super::valid_header;

    #[test]
    fn response_headers_cannot_inject_lines() {
        assert!(valid_header("X-Ok", "a value; with=stuff"));
        assert!(!valid_header("X-Bad", "a\r\nSet-Cookie: evil=1"));
        assert!(!valid_header("X-Bad", "a\nb"));
        assert!(!valid_header("X-Bad", "a\0b"));
        assert!(!valid_header("Bad Name", "v"));
        assert!(!valid_header("Bad:Name", "v"));
        assert!(!valid_header("", "v"));
    }
}
