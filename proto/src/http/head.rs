//! The request head: where it ends, whether it is sound, and what it says
//! about the body and the connection.

use super::{BodyFraming, Limits, Rejection};

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
}
