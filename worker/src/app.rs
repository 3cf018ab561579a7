//! The interface between the worker runtime and an application.
//!
//! An application is anything that implements [`App`]: it gets one
//! [`Request`] at a time (with a blocking body reader) and returns a
//! [`Response`]. Closures `FnMut(&mut Request) -> Response` are apps too.

use std::fs::File;
use std::io::{self, Read};

/// A request handler. Called for one request at a time; may block freely.
pub trait App {
    fn call(&mut self, req: &mut Request<'_>) -> Response;

    /// Loads what every worker of a generation shares, once per
    /// generation: in the template, before any worker is forked, so that
    /// its memory is shared copy-on-write (with `--spawn exec`, once in each
    /// worker). Code and data loaded here are the generation's own: a file
    /// replaced on disk later does not reach it.
    fn preload(&mut self) {}

    /// Per-process set-up, in each worker after the fork and before it says
    /// Ready: connections, random seeds, anything that must not be shared.
    fn init_worker(&mut self) {}
}

impl<F> App for F
where
    F: FnMut(&mut Request<'_>) -> Response,
{
    fn call(&mut self, req: &mut Request<'_>) -> Response {
        self(req)
    }
}

/// Facts about the worker process serving a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    pub pid: u32,
    pub generation: u64,
    /// Requests this worker completed before this one.
    pub requests: u64,
}

/// One HTTP request, as received.
pub struct Request<'a> {
    /// The method token, as sent (methods are case-sensitive).
    pub method: String,
    /// The raw request-target (`/path?query`, an absolute URI, `*`, ...).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in the order received, names as received.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The client's address (`ip:port`, or `unix` for unix sockets): the
    /// connection's peer (or the PROXY protocol's source), unless that peer
    /// is trusted (`--forwarded-allow-ips`) and its `Forwarded` or
    /// `X-Forwarded-For` field names another; port 0 when that field gave
    /// none.
    pub peer: String,
    /// `"http"`, or `"https"` when a trusted proxy says the client used it.
    pub scheme: &'static str,
    pub worker: WorkerInfo,
    pub(crate) body: &'a mut dyn Read,
}

impl<'a> Request<'a> {
    /// Builds a request by hand (tests, adapters). The worker runtime builds
    /// them itself.
    pub fn new(method: &str, target: &str, headers: Vec<(String, Vec<u8>)>, body: &'a mut dyn Read) -> Self {
        Request {
            method: method.to_owned(),
            target: target.to_owned(),
            minor_version: 1,
            headers,
            peer: String::new(),
            scheme: "http",
            worker: WorkerInfo { pid: std::process::id(), generation: 0, requests: 0 },
            body,
        }
    }

    /// `"HTTP/1.0"` or `"HTTP/1.1"`.
    pub fn version(&self) -> &'static str {
        if self.minor_version == 0 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        }
    }

    /// The path part of the target (everything before `?` and `#`).
    pub fn path(&self) -> &str {
        let end = self.target.find(['?', '#']).unwrap_or(self.target.len());
        &self.target[..end]
    }

    /// The query part of the target, without the `?`.
    pub fn query(&self) -> Option<&str> {
        let (_, rest) = self.target.split_once('?')?;
        Some(rest.split('#').next().unwrap_or(""))
    }

    /// The value of the query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query()?
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The first header field called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    /// [`Request::header`] as text, if it is UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        std::str::from_utf8(self.header(name)?).ok()
    }

    /// The request body, decoded (chunked framing removed). Reading it blocks
    /// until the client sends; `Expect: 100-continue` is answered on the
    /// first read.
    pub fn body(&mut self) -> &mut dyn Read {
        self.body
    }

    /// Reads the whole body into memory.
    pub fn read_body(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.body.read_to_end(&mut out)?;
        Ok(out)
    }
}

/// The body of a response.
pub enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// `len` bytes of `file` from `offset`, sent with sendfile(2).
    File {
        file: File,
        offset: u64,
        len: u64,
    },
    /// A body of unknown length: chunked for HTTP/1.1 clients, ended by
    /// closing the connection for HTTP/1.0 ones.
    Stream(Box<dyn Read>),
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Empty => write!(f, "Empty"),
            Body::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Body::File { offset, len, .. } => write!(f, "File {{ offset: {offset}, len: {len} }}"),
            Body::Stream(_) => write!(f, "Stream"),
        }
    }
}

/// An HTTP response. `Content-Length`, `Transfer-Encoding` and `Connection`
/// are set by the runtime (an app's `Connection: close` is honoured).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Response {
    pub fn new(status: u16) -> Self {
        Response { status, headers: Vec::new(), body: Body::Empty }
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        Response::new(status)
            .header("Content-Type", "text/plain; charset=utf-8")
            .body(text.into().into_bytes())
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.body = Body::Bytes(bytes.into());
        self
    }

    pub fn file(mut self, file: File, offset: u64, len: u64) -> Self {
        self.body = Body::File { file, offset, len };
        self
    }

    pub fn stream(mut self, reader: impl Read + 'static) -> Self {
        self.body = Body::Stream(Box::new(reader));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parts() {
        let mut empty: &[u8] = b"";
        let req = Request::new("GET", "/a/b?x=1&y&z=3#frag", vec![("X-A".into(), b"v".to_vec())], &mut empty);
        assert_eq!(req.path(), "/a/b");
        assert_eq!(req.query(), Some("x=1&y&z=3"));
        assert_eq!(req.query_param("z"), Some("3"));
        assert_eq!(req.query_param("y"), Some(""));
        assert_eq!(req.query_param("w"), None);
        assert_eq!(req.header_str("x-a"), Some("v"));
    }
}
