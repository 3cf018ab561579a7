//! What the worker's in-memory tests share: a client connection made of
//! bytes, a response splitter, and a small app.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Duration;

use monodon_proto::forwarded::TrustedProxies;
use monodon_proto::http::Limits;
use monodon_proto::scoreboard::Slot;

use crate::app::{Request, Response};
use crate::serve::Context;
use crate::stream::Connection;

/// A client in memory. `arrived` holds what it has sent (each element is
/// what one read returns): a look without waiting finds it. `future` holds
/// what it sends later: a blocking read waits for it, as a real one would.
/// Then EOF. What the worker writes lands in `out`.
#[derive(Default)]
pub struct MemConn {
    pub arrived: VecDeque<Vec<u8>>,
    pub future: VecDeque<Vec<u8>>,
    pub out: Vec<u8>,
}

impl MemConn {
    /// A client that has already sent all of `pieces`.
    pub fn sent(pieces: &[&[u8]]) -> MemConn {
        MemConn { arrived: pieces.iter().map(|p| p.to_vec()).collect(), ..MemConn::default() }
    }
}

impl Read for MemConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.arrived.is_empty() {
            // Time passes until the client sends its next piece.
            match self.future.pop_front() {
                Some(piece) => self.arrived.push_back(piece),
                None => return Ok(0),
            }
        }
        self.read_now(buf)
    }
}

impl Write for MemConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for MemConn {
    fn readable_within(&self, _window: Duration) -> bool {
        !self.arrived.is_empty()
    }

    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(front) = self.arrived.front_mut() else { return Ok(0) };
        let n = front.len().min(buf.len());
        buf[..n].copy_from_slice(&front[..n]);
        front.drain(..n);
        if front.is_empty() {
            self.arrived.pop_front();
        }
        Ok(n)
    }
}

static NO_PROXIES: TrustedProxies = TrustedProxies::none();

/// What serving needs to know, for a test worker (pid 1, generation 1).
pub fn context<'a>(slot: &'a Slot, limits: &'a Limits, read_ahead: Duration) -> Context<'a> {
    Context {
        read_ahead,
        min_body_rate: 0,
        io_timeout: Duration::from_secs(30),
        limits,
        pid: 1,
        generation: 1,
        slot,
        peer: "127.0.0.1:1",
        forwarded_allow: &NO_PROXIES,
        access_log: None,
    }
}

/// One response as the client reads it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

/// Splits what the worker wrote into responses (bodies by Content-Length;
/// `head_only`: none, as after HEAD).
pub fn replies(mut out: &[u8], head_only: bool) -> Vec<Reply> {
    let mut all = Vec::new();
    while !out.is_empty() {
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head") + 4;
        let head = String::from_utf8_lossy(&out[..end]).into_owned();
        let status = head[9..12].parse().expect("a status");
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().to_owned())
            })
            .map_or(0, |v| v.parse::<usize>().expect("a length"));
        let length = if head_only || status == 100 { 0 } else { length };
        all.push(Reply { status, head, body: out[end..end + length].to_vec() });
        out = &out[end + length..];
    }
    all
}

/// The app under test: `/read` reads the body and says how long it was;
/// anything else answers with its method and target, leaving any body.
pub fn app(req: &mut Request<'_>) -> Response {
    if req.path() == "/read" {
        let body = req.read_body().unwrap_or_default();
        return Response::text(200, format!("read {}", body.len()));
    }
    Response::text(200, format!("{} {}", req.method, req.target))
}
