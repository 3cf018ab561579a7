//! What the worker's in-memory tests share: a client connection made of
//! bytes, a response splitter, and a small app.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Duration;

use crate::app::{Request, Response};
use crate::stream::Connection;

/// A client in memory: each element of `incoming` is what one read returns
/// (then EOF); what the worker writes lands in `out`.
#[derive(Default)]
pub struct MemConn {
    pub incoming: VecDeque<Vec<u8>>,
    pub out: Vec<u8>,
}

impl Read for MemConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(front) = self.incoming.front_mut() else { return Ok(0) };
        let n = front.len().min(buf.len());
        buf[..n].copy_from_slice(&front[..n]);
        front.drain(..n);
        if front.is_empty() {
            self.incoming.pop_front();
        }
        Ok(n)
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
        !self.incoming.is_empty()
    }

    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
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
