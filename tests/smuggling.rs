//! Request smuggling and framing attacks, each with the rule it breaks and
//! the status monodon answers. Every vector is sent to the real server (the
//! `echo` app, which would answer 200 with a JSON body if reached) and must
//! get exactly that status, `Connection: close`, and a closed connection.

mod common;

use common::Server;

/// (what, raw request, expected status, rule)
const VECTORS: &[(&str, &str, u16, &str)] = &[
    (
        "Content-Length with Transfer-Encoding",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 §6.1: a server MAY reject; monodon always does (classic CL.TE/TE.CL)",
    ),
    (
        "Transfer-Encoding not ending in chunked",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 §6.3: a request whose final coding is not chunked cannot be framed: 400",
    ),
    (
        "chunked twice",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 §7: chunked MUST NOT be applied more than once",
    ),
    (
        "chunked twice across fields",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 §7: chunked MUST NOT be applied more than once",
    ),
    (
        "Transfer-Encoding in HTTP/1.0",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing",
    ),
    (
        "conflicting Content-Length fields",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        400,
        "RFC 9112 §6.3 (5): differing Content-Length values are unrecoverable: 400",
    ),
    (
        "Content-Length list",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nabcde",
        400,
        "RFC 9110 §8.6: Content-Length = 1*DIGIT; lists are refused rather than folded",
    ),
    (
        "Content-Length with a sign",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nabcde",
        400,
        "RFC 9110 §8.6: Content-Length = 1*DIGIT",
    ),
    (
        "Content-Length with inner space",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1 0\r\n\r\nabcdefghij",
        400,
        "RFC 9110 §8.6: Content-Length = 1*DIGIT",
    ),
    (
        "Content-Length overflowing 64 bits",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        400,
        "RFC 9110 §8.6: a value that cannot be represented is invalid",
    ),
    (
        "chunk size with a sign",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 §7.1: chunk-size = 1*HEXDIG",
    ),
    (
        "chunk size overflowing 64 bits",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000001\r\nx\r\n0\r\n\r\n",
        400,
        "RFC 9112 §7.1: a recipient MUST anticipate and guard against overflow",
    ),
    (
        "chunk size with trailing space and no extension",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 §7.1: only BWS before a chunk extension",
    ),
    (
        "bare CR inside a chunk extension",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\rc\r\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 §2.2: a bare CR MUST be rejected or replaced; monodon rejects",
    ),
    (
        "chunk data longer than its size",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 §7.1: chunk-data is followed by CRLF",
    ),
    (
        "Content-Length in trailers",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 10\r\n\r\n",
        400,
        "RFC 9110 §6.5.1: framing fields are not allowed in trailers",
    ),
    (
        "bare LF ending the request line",
        "GET / HTTP/1.1\nHost: x\r\n\r\n",
        400,
        "RFC 9112 §2.2: monodon requires CRLF (a bare LF MAY be accepted; accepting it invites disagreement)",
    ),
    (
        "bare LF ending a field line",
        "GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
        400,
        "RFC 9112 §2.2",
    ),
    ("bare CR in a field value", "GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", 400, "RFC 9112 §2.2"),
    ("NUL in a field value", "GET / HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n", 400, "RFC 9110 §5.5: NUL MUST be rejected"),
    ("NUL in the method", "G\0T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "RFC 9110 §9.1: a method is a token"),
    ("control byte in a field value", "GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n", 400, "RFC 9110 §5.5"),
    (
        "space before the colon",
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc",
        400,
        "RFC 9112 §5.1: no whitespace between field name and colon; MUST be rejected with 400",
    ),
    (
        "obsolete line folding",
        "GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
        400,
        "RFC 9112 §5.2: a server MAY reject obs-fold with 400; monodon does",
    ),
    (
        "space in a field name",
        "GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
        400,
        "RFC 9110 §5.1: a field name is a token",
    ),
    ("two Host fields", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "RFC 9112 §3.2: MUST respond 400"),
    ("no Host in HTTP/1.1", "GET / HTTP/1.1\r\n\r\n", 400, "RFC 9112 §3.2: MUST respond 400"),
    (
        "authority-form without CONNECT",
        "GET example.com:80 HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "RFC 9112 §3.2.3: authority-form is only for CONNECT",
    ),
    (
        "asterisk-form without OPTIONS",
        "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "RFC 9112 §3.2.4: asterisk-form is only for OPTIONS",
    ),
    (
        "absolute-form with a broken authority",
        "GET http://]x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "RFC 9112 §3.2.2 and RFC 3986 §3.2",
    ),
    ("HTTP/0.9 request", "GET /\r\n\r\n", 400, "RFC 9112 §2.3 / §3: HTTP/0.9 is not supported"),
    (
        "HTTP/2 version on HTTP/1 framing",
        "GET / HTTP/2.0\r\nHost: x\r\n\r\n",
        505,
        "RFC 9110 §15.6.6: a major version the server does not support is 505",
    ),
    (
        "Transfer-Encoding: identity with Content-Length",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 1\r\n\r\nWorld",
        400,
        "RFC 9112 §6.3 item 4: Transfer-Encoding not ending in chunked is 400 and close (identity is no coding, §7)",
    ),
    (
        "chunked, then a second Transfer-Encoding line with identity",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 §6.3 item 4: the codings of all lines form one list (RFC 9110 §5.3); it ends in identity",
    ),
    (
        "empty Transfer-Encoding lines with Content-Length",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\nTransfer-Encoding:\r\nContent-Length: 10\r\n\r\n0123456789",
        400,
        "RFC 9112 §6.1 and §6.3 item 4: a Transfer-Encoding field frames the request, here with no coding at all",
    ),
    (
        "Transfer-Encoding: gzip alone",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        400,
        "RFC 9112 §6.3 item 4: the final coding of a request must be chunked",
    ),
    (
        "the same Content-Length on two field lines",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nabcde",
        400,
        "RFC 9110 §8.6 and §5.3: two lines are the list \"5, 5\", refused like it (never folded)",
    ),
    (
        "the same Content-Length twice in one list",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000, 1000\r\n\r\n",
        400,
        "RFC 9110 §8.6: Content-Length = 1*DIGIT",
    ),
    (
        "CONNECT",
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        501,
        "RFC 9110 §9.3.6: a 2xx to CONNECT makes a tunnel, which monodon does not offer (§15.6.2: 501)",
    ),
    ("unsupported expectation", "GET / HTTP/1.1\r\nHost: x\r\nExpect: 101-go\r\n\r\n", 417, "RFC 9110 §10.1.1"),
];

#[test]
fn every_framing_attack_is_refused_before_the_app() {
    let server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let mut failures = Vec::new();
    for (what, raw, status, rule) in VECTORS {
        let mut c = server.connect();
        c.send(raw.as_bytes());
        match c.response() {
            Ok(r) if r.status == *status && r.header("Connection") == Some("close") && c.is_closed() => {}
            Ok(r) => failures.push(format!("{what} ({rule}): got {} {:?}", r.status, r.text())),
            Err(e) => failures.push(format!("{what} ({rule}): no response: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} vectors not refused as expected:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The server is still fine.
    assert_eq!(server.get("/").status, 200);
}

/// RFC 9110 §2.5: a request of a higher HTTP/1 minor version is served as
/// HTTP/1.1, the highest this server implements.
#[test]
fn a_higher_minor_version_is_served_as_http_1_1() {
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let mut c = server.connect();
    c.send(b"GET /v?x=1 HTTP/1.2\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/1.1");
    assert_eq!(r.json()["target"], "/v?x=1");
    assert_eq!(c.response().unwrap().json()["target"], "/after", "the connection is kept");
}

/// RFC 9112 §6.3 item 4: with `Transfer-Encoding: identity`, the bytes after
/// a Content-Length are not framed as a next request.
#[test]
fn a_body_behind_identity_is_never_read_as_a_next_request() {
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let mut c = server.connect();
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 1\r\n\r\nWGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.status, 400);
    assert!(c.is_closed(), "nothing after the 400");
}

#[test]
fn limits_answer_with_their_status() {
    let server = Server::start(
        &[
            "--app",
            "echo",
            "--workers",
            "1",
            "--max-request-line",
            "100",
            "--max-header-line",
            "100",
            "--max-headers",
            "5",
            "--max-head",
            "2048",
            "--max-body",
            "10",
            "--max-pipelined",
            "2",
        ],
        1,
    );
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100));
    let long_field = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(100));
    let many: String = (0..6).map(|i| format!("X{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    let cases = [
        (long_line, 414),
        (long_field, 431),
        (many, 431),
        ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n".to_owned(), 413),
        ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nabcdef\r\n0\r\n\r\n".to_owned(), 413),
        (format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\na\r\n0\r\n\r\n", "e".repeat(200)), 400),
    ];
    for (raw, status) in cases {
        let mut c = server.connect();
        c.send(raw.as_bytes());
        let r = c.response().unwrap();
        assert_eq!(r.status, status, "{}", &raw[..raw.len().min(80)]);
        assert!(c.is_closed());
    }

    // Two requests may wait behind the one being answered; a third is too many.
    let mut c = server.connect();
    c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n".repeat(5).as_slice());
    for i in 1..=3 {
        assert_eq!(c.response().unwrap().status, 200, "pipelined request {i}");
    }
    let r = c.response().unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(c.is_closed());
    // A client that waits for each response is never counted as pipelining.
    let mut c = server.connect();
    for i in 0..6 {
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(c.response().unwrap().status, 200, "request {i}");
    }
}
