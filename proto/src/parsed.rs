//! The parsed hand-over (PROTOCOL.md, "Parsed requests"): instead of raw
//! bytes, a worker that announced `FEATURE_PARSED` in Ready gets the
//! supervisor's own parse of the request it is to serve: method, target,
//! version, fields, the framing and keep-alive decisions, and the body as
//! far as the supervisor has it (de-chunked when it has all of it). A
//! worker in another language then never decides framing and never
//! validates a head; the Python worker is one.
//!
//! One request per hand-over: bytes past it (a pipelined next request) ride
//! along as `rest`, and the worker hands them back in Done for the
//! supervisor to parse.

use std::io::Read;

use crate::forwarded::Scheme;
use crate::http::{self, BodyFraming, BodyReader, Limits};
use crate::wire::{Cursor, WireError, VERSION};

/// The message kind (PROTOCOL.md).
pub(crate) const KIND: u8 = 7;

/// One request, parsed, as the supervisor sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest<'a> {
    pub conn_id: u64,
    pub served: u32,
    /// The client (after the PROXY header and trusted forwarding fields).
    pub client: &'a str,
    /// The connection's own address (`ip:port`, `[v6]:port`, `unix`): the
    /// server's name and port for the app, and the socket's family.
    pub local: &'a str,
    pub scheme: Scheme,
    pub method: &'a str,
    pub target: &'a str,
    pub minor_version: u8,
    pub keep_alive: bool,
    pub expect_continue: bool,
    pub framing: BodyFraming,
    /// `body` is all of it (decoded); otherwise it is the raw bytes that
    /// followed the head so far, and the worker reads the rest of the body
    /// from the connection (decoding it, if chunked).
    pub body_complete: bool,
    pub headers: Vec<(&'a str, &'a [u8])>,
    pub body: std::borrow::Cow<'a, [u8]>,
    /// Bytes past the request (only when its body is complete).
    pub rest: &'a [u8],
}

/// Limits past any a head accepted under the configured ones could reach
/// (but `max_headers`, which sizes the parser's table), for a head that a
/// reload's stricter limits would now refuse: it was accepted when it
/// arrived, and is only taken apart again here.
const LOOSE: Limits = Limits {
    max_request_line: 1 << 30,
    max_header_line: 1 << 30,
    max_headers: 1 << 10,
    max_head: 1 << 30,
    max_body: u64::MAX >> 2,
    buffered_body: 1 << 30,
    max_pipelined: 1 << 20,
};

impl<'a> ParsedRequest<'a> {
    /// The request at the start of `buf`, a complete head the supervisor
    /// accepted under `limits`; the caller fills in `client`, `scheme` and
    /// `local` (who the client is depends on the head's fields). `None` if
    /// `buf` holds no complete, valid head, which a caller that checked it
    /// first never sees.
    pub fn from_buffer(
        conn_id: u64,
        served: u32,
        buf: &'a [u8],
        limits: &Limits,
    ) -> Option<ParsedRequest<'a>> {
        let limits = Limits { max_body: u64::MAX >> 2, ..*limits };
        let head = match http::parse_head(buf, &limits) {
            Ok(Some(head)) => head,
            _ => http::parse_head(buf, &LOOSE).ok()??,
        };
        let after = &buf[head.len..];
        let (body_complete, body, rest): (bool, std::borrow::Cow<'a, [u8]>, &'a [u8]) = match head.framing {
            BodyFraming::None => (true, (&[][..]).into(), after),
            BodyFraming::Length(n) => match usize::try_from(n).ok().filter(|&n| n <= after.len()) {
                Some(n) => (true, after[..n].into(), &after[n..]),
                None => (false, after.into(), &[][..]),
            },
            BodyFraming::Chunked => match http::chunked_body_len(after, &limits) {
                Ok(Some(len)) => {
                    let mut decoded = Vec::new();
                    BodyReader::new(&after[..len], BodyFraming::Chunked, &limits)
                        .read_to_end(&mut decoded)
                        .ok()?;
                    (true, decoded.into(), &after[len..])
                }
                _ => (false, after.into(), &[][..]),
            },
        };
        Some(ParsedRequest {
            conn_id,
            served,
            client: "",
            local: "",
            scheme: Scheme::Http,
            method: head.method,
            target: head.target,
            minor_version: head.minor_version,
            keep_alive: head.keep_alive,
            expect_continue: head.expect_continue,
            framing: head.framing,
            body_complete,
            headers: head.headers,
            body,
            rest,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        fn short(out: &mut Vec<u8>, s: &[u8]) {
            let s = &s[..s.len().min(u16::MAX.into())];
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s);
        }
        fn long(out: &mut Vec<u8>, s: &[u8]) {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s);
        }
        out.clear();
        out.extend_from_slice(&[VERSION, KIND]);
        out.extend_from_slice(&self.conn_id.to_le_bytes());
        out.extend_from_slice(&self.served.to_le_bytes());
        short(out, self.client.as_bytes());
        short(out, self.local.as_bytes());
        let flags = u8::from(self.keep_alive)
            | u8::from(self.expect_continue) << 1
            | u8::from(self.body_complete) << 2
            | u8::from(self.scheme == Scheme::Https) << 3;
        out.push(self.minor_version);
        out.push(flags);
        let (framing, length) = match self.framing {
            BodyFraming::None => (0u8, 0u64),
            BodyFraming::Length(n) => (1, n),
            BodyFraming::Chunked => (2, 0),
        };
        out.push(framing);
        out.extend_from_slice(&length.to_le_bytes());
        short(out, self.method.as_bytes());
        long(out, self.target.as_bytes());
        // A head has at most --max-headers fields, far below 65,535.
        out.extend_from_slice(&(self.headers.len().min(u16::MAX.into()) as u16).to_le_bytes());
        for (name, value) in self.headers.iter().take(u16::MAX.into()) {
            short(out, name.as_bytes());
            long(out, value);
        }
        long(out, &self.body);
        out.extend_from_slice(self.rest);
    }

    pub fn decode(msg: &'a [u8]) -> Result<ParsedRequest<'a>, WireError> {
        let mut r = Cursor::new(msg)?;
        if r.kind != KIND {
            return Err(WireError("not a parsed request"));
        }
        let text = |b: &'a [u8]| std::str::from_utf8(b).map_err(|_| WireError("text is not UTF-8"));
        let conn_id = r.u64()?;
        let served = r.u32()?;
        let n = r.u16()?.into();
        let client = text(r.bytes(n)?)?;
        let n = r.u16()?.into();
        let local = text(r.bytes(n)?)?;
        let minor_version = r.bytes(1)?[0];
        let flags = r.bytes(1)?[0];
        let framing = r.bytes(1)?[0];
        let length = r.u64()?;
        let framing = match framing {
            0 => BodyFraming::None,
            1 => BodyFraming::Length(length),
            2 => BodyFraming::Chunked,
            _ => return Err(WireError("unknown body framing")),
        };
        let n = r.u16()?.into();
        let method = text(r.bytes(n)?)?;
        let n = r.u32()? as usize;
        let target = text(r.bytes(n)?)?;
        let count = r.u16()?;
        let mut headers = Vec::with_capacity(count.into());
        for _ in 0..count {
            let n = r.u16()?.into();
            let name = text(r.bytes(n)?)?;
            let n = r.u32()? as usize;
            headers.push((name, r.bytes(n)?));
        }
        let n = r.u32()? as usize;
        let body = r.bytes(n)?.into();
        Ok(ParsedRequest {
            conn_id,
            served,
            client,
            local,
            scheme: if flags & 8 != 0 { Scheme::Https } else { Scheme::Http },
            method,
            target,
            minor_version,
            keep_alive: flags & 1 != 0,
            expect_continue: flags & 2 != 0,
            framing,
            body_complete: flags & 4 != 0,
            headers,
            body,
            rest: r.rest(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(buf: &[u8]) -> ParsedRequest<'_> {
        let p = ParsedRequest::from_buffer(9, 2, buf, &Limits::default()).expect("a head");
        ParsedRequest { client: "192.0.2.1:5", scheme: Scheme::Https, ..p }
    }

    fn round_trip(p: &ParsedRequest<'_>) {
        let mut out = Vec::new();
        let p = ParsedRequest { local: "[::1]:8080", ..p.clone() };
        p.encode(&mut out);
        assert_eq!(ParsedRequest::decode(&out).unwrap(), p);
    }

    #[test]
    fn a_bodiless_request_and_what_follows_it() {
        let buf = b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Y: z\r\n\r\nGET /next";
        let p = parsed(buf);
        assert_eq!((p.method, p.target, p.minor_version, p.keep_alive), ("GET", "/a?b=1", 1, true));
        assert_eq!(p.headers, [("Host", &b"x"[..]), ("X-Y", &b"z"[..])]);
        assert!(p.body_complete && p.body.is_empty());
        assert_eq!(p.rest, b"GET /next");
        round_trip(&p);
    }

    #[test]
    fn bodies_whole_or_in_part() {
        let whole = parsed(b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nabcGET");
        assert_eq!(
            (whole.framing, whole.body_complete, &whole.body[..], whole.rest),
            (BodyFraming::Length(3), true, &b"abc"[..], &b"GET"[..])
        );
        assert!(!whole.keep_alive, "HTTP/1.0 without keep-alive");
        round_trip(&whole);
        let part = parsed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc");
        assert_eq!((part.body_complete, &part.body[..], part.rest), (false, &b"abc"[..], &b""[..]));
        round_trip(&part);
        let chunked = parsed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nNEXT");
        assert_eq!((chunked.framing, chunked.body_complete), (BodyFraming::Chunked, true));
        assert_eq!((&chunked.body[..], chunked.rest), (&b"abcde"[..], &b"NEXT"[..]));
        round_trip(&chunked);
        let raw = parsed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n3\r\nab");
        assert_eq!((raw.body_complete, &raw.body[..], raw.expect_continue), (false, &b"3\r\nab"[..], true));
        round_trip(&raw);
    }

    #[test]
    fn no_head_no_request_and_truncations_are_errors() {
        let limits = Limits::default();
        assert!(ParsedRequest::from_buffer(1, 0, b"GET / HTTP/1.1\r\n", &limits).is_none());
        // Accepted under looser limits before a reload: still taken apart.
        let strict = Limits { max_headers: 1, ..limits };
        let two = b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n\r\n";
        assert_eq!(ParsedRequest::from_buffer(1, 0, two, &strict).unwrap().headers.len(), 2);
        let mut out = Vec::new();
        parsed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").encode(&mut out);
        // Everything up to the body is fixed or length-prefixed: any cut shows.
        for cut in 2..out.len() {
            assert!(ParsedRequest::decode(&out[..cut]).is_err(), "cut at {cut}");
        }
        assert!(ParsedRequest::decode(&out[..2]).is_err());
    }
}
