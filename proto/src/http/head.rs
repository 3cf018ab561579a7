//! The request head: where it ends, whether it is sound, and what it says
//! about the body and the connection.

use super::{BodyFraming, Limits, Rejection};

/// A complete, validated request head, borrowing from the buffer it was
/// parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head<'b> {
    /// Bytes from the start of the buffer to the end of the blank line.
    pub len: usize,
    pub method: &'b str,
    pub target: &'b str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1 (and for a higher HTTP/1.x, served as
    /// 1.1: RFC 9110 §2.5).
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
///
/// Each call looks at `buf` from its first byte; a caller whose buffer
/// grows between calls keeps a [`HeadScanner`] instead (or a
/// [`PendingRequest`](super::PendingRequest)), so that a head sent a byte
/// at a time costs linear work, not quadratic.
pub fn parse_head<'b>(buf: &'b [u8], limits: &Limits) -> Result<Option<Head<'b>>, Rejection> {
    match HeadScanner::default().scan(buf, limits)? {
        Some(len) => parse_complete_head(&buf[..len], limits).map(Some),
        None => Ok(None),
    }
}

/// Finds the end of a request head (just past the blank line) in a buffer
/// that may grow between calls, while enforcing the line limits and
/// CRLF-only line endings. It resumes where the previous call stopped, so
/// every byte is looked at once however the head arrives.
///
/// Every limit is judged at the byte that crosses it, so the decision is
/// the same whether the head arrives whole or a byte at a time, and an
/// oversized head is refused before it is all buffered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeadScanner {
    /// Bytes of the buffer looked at so far: the next call starts here.
    scanned: usize,
    /// Where the line being scanned starts.
    line_start: usize,
    seen_request_line: bool,
    /// Bytes looked at over the scanner's life, counted where it looks at
    /// them (what `parse_head` costs; tests check it stays linear).
    work: u64,
}

impl HeadScanner {
    /// `Ok(Some(len))`: the head is `buf[..len]`. `Ok(None)`: not complete,
    /// call again once `buf` has grown (it must start with the same bytes).
    pub fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<usize>, Rejection> {
        debug_assert!(buf.len() >= self.scanned, "the buffer of a head only grows");
        for i in self.scanned..buf.len() {
            self.work += 1;
            if i >= limits.max_head {
                return Err(Rejection::new(431, "request head too large"));
            }
            let byte = buf[i];
            let after_cr = i > 0 && buf[i - 1] == b'\r';
            if after_cr != (byte == b'\n') {
                return Err(BAD_LINE_ENDING);
            }
            match byte {
                b'\r' => {}
                b'\n' => {
                    let line_len = i - 1 - self.line_start;
                    self.line_start = i + 1;
                    if !self.seen_request_line {
                        // RFC 9112 §2.2: empty lines before the request line are ignored.
                        self.seen_request_line = line_len > 0;
                    } else if line_len == 0 {
                        self.scanned = i + 1;
                        return Ok(Some(i + 1));
                    }
                }
                _ => {
                    let line_len = i + 1 - self.line_start;
                    if !self.seen_request_line && line_len > limits.max_request_line {
                        return Err(Rejection::new(414, "request line too long"));
                    }
                    if self.seen_request_line && line_len + 2 > limits.max_header_line {
                        return Err(Rejection::new(431, "header field too large"));
                    }
                }
            }
        }
        self.scanned = buf.len();
        Ok(None)
    }

    /// Bytes looked at so far, counting each time a byte is looked at.
    pub fn work(&self) -> u64 {
        self.work
    }
}

/// Parses and validates a head whose end [`HeadScanner`] found: `head` is
/// exactly its bytes, blank line included.
pub(super) fn parse_complete_head<'b>(head: &'b [u8], limits: &Limits) -> Result<Head<'b>, Rejection> {
    let len = head.len();
    let mut stack = [httparse::EMPTY_HEADER; 101];
    let mut heap;
    let storage: &mut [httparse::Header<'b>] = if limits.max_headers < stack.len() {
        &mut stack[..limits.max_headers + 1]
    } else {
        heap = vec![httparse::EMPTY_HEADER; limits.max_headers + 1];
        &mut heap
    };
    let mut req = httparse::Request::new(storage);
    let parsed = match req.parse(head) {
        Err(httparse::Error::Version) => return parse_other_version(head, limits),
        other => other,
    };
    match parsed {
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
    if method == "CONNECT" {
        // RFC 9110 §9.3.6: a 2xx to CONNECT turns the connection into a
        // tunnel. monodon serves requests, it does not tunnel, and no
        // resource behind it can (RFC 9110 §15.6.2: 501).
        return Err(Rejection::new(501, "CONNECT (tunnelling) is not supported"));
    }
    Ok(Head {
        len,
        method,
        target,
        minor_version,
        headers,
        framing: fields.framing,
        keep_alive: fields.keep_alive,
        expect_continue: fields.expect_continue && fields.framing != BodyFraming::None,
    })
}

/// A head whose version httparse refused. RFC 9110 §2.5: a higher minor
/// version of HTTP/1 is served as the highest we implement (1.1); another
/// well-formed `HTTP/d.d` is a major version we do not serve (505); the
/// rest is malformed (400).
fn parse_other_version<'b>(head: &'b [u8], limits: &Limits) -> Result<Head<'b>, Rejection> {
    const MALFORMED: Rejection = Rejection::new(400, "malformed HTTP version");
    let line_start = head.iter().position(|&c| c != b'\r' && c != b'\n').unwrap_or(0);
    let line_end = head[line_start..].iter().position(|&c| c == b'\r').map_or(head.len(), |i| line_start + i);
    let line = &head[line_start..line_end];
    let Some(at) = line.len().checked_sub(8).filter(|&at| at > 0 && line[at - 1] == b' ') else {
        return Err(MALFORMED);
    };
    let version = &line[at..];
    let (prefix, major, dot, minor) = (&version[..5], version[5], version[6], version[7]);
    if prefix != b"HTTP/" || dot != b'.' || !major.is_ascii_digit() || !minor.is_ascii_digit() {
        return Err(MALFORMED);
    }
    if major != b'1' {
        return Err(Rejection::new(505, "only HTTP/1.x is served"));
    }
    if minor <= b'1' {
        // httparse knows these: the request line is at fault elsewhere.
        return Err(MALFORMED);
    }
    // HTTP/1.2 to 1.9: parse it as 1.1 from a copy, then borrow the same
    // ranges from `head` (only the minor digit differs between the two).
    let mut copy = head.to_vec();
    copy[line_start + at + 7] = b'1';
    let parsed = parse_complete_head(&copy, limits)?;
    let base = copy.as_ptr() as usize;
    // Checked, not assumed: an empty slice need not point into the copy.
    let bytes = |s: &[u8]| -> Result<&'b [u8], Rejection> {
        if s.is_empty() {
            return Ok(&[]);
        }
        let from = (s.as_ptr() as usize).checked_sub(base).ok_or(MALFORMED)?;
        head.get(from..from + s.len()).ok_or(MALFORMED)
    };
    let text = |s: &str| std::str::from_utf8(bytes(s.as_bytes())?).map_err(|_| MALFORMED);
    Ok(Head {
        method: text(parsed.method)?,
        target: text(parsed.target)?,
        headers: parsed
            .headers
            .iter()
            .map(|&(name, value)| Ok((text(name)?, bytes(value)?)))
            .collect::<Result<_, Rejection>>()?,
        len: parsed.len,
        minor_version: parsed.minor_version,
        framing: parsed.framing,
        keep_alive: parsed.keep_alive,
        expect_continue: parsed.expect_continue,
    })
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

/// The `Transfer-Encoding` field lines of a request, taken together as one
/// list of codings in the order received (RFC 9110 §5.3).
#[derive(Default)]
struct Codings {
    /// A `Transfer-Encoding` line was received, even an empty one.
    present: bool,
    chunked: usize,
    /// The last non-empty element is `chunked`.
    ends_in_chunked: bool,
}

impl Codings {
    fn add(&mut self, value: &[u8]) {
        self.present = true;
        // Empty elements do not count (RFC 9110 §5.6.1); every other one
        // does, `identity` included: it is no transfer coding any more
        // (RFC 9112 §7), so it cannot make a list end in anything else.
        for token in list_tokens(value) {
            self.ends_in_chunked = token.eq_ignore_ascii_case("chunked");
            self.chunked += usize::from(self.ends_in_chunked);
        }
    }
}

/// Applies the header fields that decide framing and connection handling.
///
/// Framing (RFC 9112 §6): a request with any `Transfer-Encoding` line is
/// framed by it alone, and only when its codings end in `chunked`, which
/// appears once; anything else is refused (400, §6.3 item 4), as is
/// `Transfer-Encoding` with `Content-Length` (§6.1: we reject rather than
/// guess) and in HTTP/1.0. `Content-Length` must be one field line with
/// one value (§6.3 item 5, RFC 9110 §8.6): a repeated field or a list is
/// refused even when every value is the same, so the field line and the
/// comma forms (which RFC 9110 §5.3 makes equivalent) are judged alike.
fn interpret_fields(headers: &[(&str, &[u8])], minor_version: u8) -> Result<Fields, Rejection> {
    let mut host_count = 0;
    let mut content_type_count = 0;
    let mut content_length: Option<u64> = None;
    let mut codings = Codings::default();
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
            if content_length.is_some() {
                return Err(Rejection::new(400, "more than one Content-Length field"));
            }
            let n = parse_content_length(value).ok_or(Rejection::new(400, "invalid Content-Length"))?;
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            codings.add(value);
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
    let framing = if !codings.present {
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
        if codings.chunked != 1 || !codings.ends_in_chunked {
            return Err(Rejection::new(400, "Transfer-Encoding must end in chunked, once"));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<Head<'_>>, Rejection> {
        parse_head(raw, &Limits::default())
    }

    fn status(raw: &[u8]) -> u16 {
        parse(raw).expect_err("should be rejected").status
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
            f(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"),
            BodyFraming::Chunked
        );
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            BodyFraming::Chunked
        );
        // Codings before the final chunked are the app's business.
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n"),
            BodyFraming::Chunked
        );
        assert_eq!(
            f(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n"),
            BodyFraming::Chunked,
            "RFC 9110 §5.6.1: empty list elements do not count"
        );
    }

    #[test]
    fn transfer_encoding_frames_only_when_it_ends_in_chunked() {
        // RFC 9112 §6.3 item 4: a request whose Transfer-Encoding does not
        // end in chunked is answered 400 and closed. Every coding counts,
        // identity included (RFC 9112 §7: no longer a transfer coding).
        for raw in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 1\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\nTransfer-Encoding:\r\nContent-Length: 10\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ,\r\n\r\n",
        ] {
            assert_eq!(status(raw), 400, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn content_length_is_one_field_with_one_value() {
        // RFC 9110 §8.6 lets a recipient either fold identical repeated
        // values or refuse them; the list and the repeated field line are
        // the same thing (RFC 9110 §5.3), so both are refused.
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            400
        );
        assert_eq!(status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000, 1000\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\n"),
            400
        );
    }

    #[test]
    fn connect_is_refused_not_tunnelled() {
        // RFC 9110 §9.3.6: a 2xx to CONNECT makes the connection a tunnel;
        // monodon does not tunnel, for any resource (§15.6.2: 501).
        assert_eq!(status(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"), 501);
        assert_eq!(status(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n"), 501);
        assert_eq!(status(b"CONNECT /path HTTP/1.1\r\nHost: a\r\n\r\n"), 400, "not authority-form");
    }

    #[test]
    fn versions() {
        // RFC 9110 §2.5: a higher minor version is served as HTTP/1.1.
        let raw = b"GET /v HTTP/1.2\r\nHost: a\r\nX-Y: z\r\n\r\n";
        let h = parse(raw).unwrap().unwrap();
        assert_eq!((h.method, h.target, h.minor_version), ("GET", "/v", 1));
        assert_eq!(h.headers, vec![("Host", &b"a"[..]), ("X-Y", &b"z"[..])]);
        assert_eq!(h.len, raw.len());
        let h = parse(b"GET / HTTP/1.3\r\nHost: a\r\nX-Empty:\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.headers, vec![("Host", &b"a"[..]), ("X-Empty", &b""[..])]);
        let h = parse(b"\r\nPOST / HTTP/1.9\r\nHost: a\r\nContent-Length: 2\r\n\r\nab").unwrap().unwrap();
        assert_eq!((h.minor_version, h.framing), (1, BodyFraming::Length(2)));
        assert_eq!(status(b"GET / HTTP/1.2\r\n\r\n"), 400, "still needs Host");
        // RFC 9110 §15.6.6: another major version is 505.
        assert_eq!(status(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(status(b"GET / HTTP/0.9\r\nHost: a\r\n\r\n"), 505);
        // Not an HTTP-version at all: 400.
        for raw in [
            &b"GET / HTTP/111\r\n\r\n"[..],
            b"GET / FTP/1.1\r\n\r\n",
            b"GET / HTTP/0.99\r\n\r\n",
            b"GET / HTTP/1.x\r\n\r\n",
        ] {
            assert_eq!(status(raw), 400, "{}", String::from_utf8_lossy(raw));
        }
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
}
