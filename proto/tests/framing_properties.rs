//! Property tests of the request framing: whatever the bytes and however
//! they arrive, the framing decides the same way, never panics, and a valid
//! request written out parses back to itself.

use std::io::{BufRead, BufReader, Read};

use monodon_proto::http::{
    body_rejection, parse_head, BodyFraming, BodyReader, ChunkedScanner, Limits, PendingRequest, Rejection,
};
use proptest::prelude::*;

/// What a parse decided, comparable across calls.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Incomplete,
    Complete { len: usize, framing: BodyFraming, keep_alive: bool },
    Rejected(u16),
}

fn decide(buf: &[u8], limits: &Limits) -> Decision {
    match parse_head(buf, limits) {
        Ok(None) => Decision::Incomplete,
        Ok(Some(h)) => Decision::Complete { len: h.len, framing: h.framing, keep_alive: h.keep_alive },
        Err(r) => Decision::Rejected(r.status),
    }
}

/// Bytes that matter to HTTP framing, so random strings hit the edge cases.
fn framing_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(b'\r'),
        Just(b'\n'),
        Just(b' '),
        Just(b'\t'),
        Just(b':'),
        Just(b','),
        Just(b';'),
        Just(0u8),
        Just(0x7f),
        Just(0xc3),
        b'0'..=b'9',
        b'a'..=b'f',
        b'A'..=b'Z',
    ]
}

const TEMPLATES: &[&str] = &[
    "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST /p?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.1\r\nHost: y\r\n\r\n",
    "5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
    "GET /v HTTP/1.5\r\nHost: x\r\nX-Empty:\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
];

/// A template with random edits: inputs that look almost right.
fn mutated_request() -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, framing_byte()), 0..6);
    (0..TEMPLATES.len(), edits).prop_map(|(t, edits)| {
        let mut b = TEMPLATES[t].as_bytes().to_vec();
        for (at, kind, byte) in edits {
            let i = at.index(b.len() + 1);
            match kind {
                0 => b.insert(i, byte),
                1 if i < b.len() => {
                    b.remove(i);
                }
                _ if i < b.len() => b[i] = byte,
                _ => b.push(byte),
            }
        }
        b
    })
}

fn any_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        mutated_request(),
        prop::collection::vec(framing_byte(), 0..200),
        prop::collection::vec(any::<u8>(), 0..200)
    ]
}

/// Decodes a chunked body: the bytes, or the status of the rejection.
fn decode(input: impl BufRead, limits: &Limits) -> Result<Vec<u8>, Option<u16>> {
    let mut reader = BodyReader::new(input, BodyFraming::Chunked, limits);
    let mut out = Vec::new();
    match reader.read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(e) => Err(body_rejection(&e).map(|r| r.status)),
    }
}

/// `input` cut at the given points (sorted, deduplicated, in range).
fn pieces(input: &[u8], cuts: &[prop::sample::Index]) -> Vec<usize> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
    at.push(input.len());
    at.sort_unstable();
    at.dedup();
    at
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The supervisor's incremental check, fed the bytes in any pieces,
    /// decides as one parse of the whole buffer does.
    #[test]
    fn incremental_checks_decide_as_a_whole_parse(input in any_input(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12)) {
        let limits = Limits { max_request_line: 64, max_header_line: 64, max_headers: 8, max_head: 256, max_body: 1000, buffered_body: 0, ..Limits::default() };
        // The head alone: what follows it is the body's business.
        let whole = parse_head(&input, &limits);
        let head_only = match &whole {
            Ok(Some(h)) => &input[..h.len],
            _ => &input[..],
        };
        let mut pending = PendingRequest::default();
        let mut from = 0;
        let mut decided = Ok(false);
        for to in pieces(head_only, &cuts) {
            pending.extend(&head_only[from..to]);
            from = to;
            decided = pending.check(&limits);
            if decided != Ok(false) {
                break;
            }
        }
        // Nothing may be buffered: a complete head is ready at once, but
        // for a chunked body, which is scanned first (none is here yet).
        let whole = whole.map(|h| h.is_some_and(|h| h.expect_continue || h.framing != BodyFraming::Chunked));
        prop_assert_eq!(decided, whole, "{:?}", String::from_utf8_lossy(&input));
    }

    /// The chunked scanner, fed the bytes in any pieces, finds the end (or
    /// the fault) the decoder finds.
    #[test]
    fn chunked_scanning_agrees_with_decoding(input in any_input(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12)) {
        let limits = Limits { max_body: 64, max_header_line: 32, ..Limits::default() };
        let mut scanner = ChunkedScanner::default();
        let mut scanned = Ok(None);
        for to in pieces(&input, &cuts) {
            scanned = scanner.scan(&input[..to], &limits);
            if scanned != Ok(None) {
                break;
            }
        }
        let mut reader = BodyReader::new(&input[..], BodyFraming::Chunked, &limits);
        let decoded: Result<(), Rejection> = std::io::copy(&mut reader, &mut std::io::sink())
            .map(drop)
            .map_err(|e| body_rejection(&e).expect("a body error"));
        match scanned {
            Ok(Some(len)) => {
                prop_assert_eq!(decoded, Ok(()));
                prop_assert_eq!(reader.into_inner().len(), input.len() - len, "the same end");
            }
            // More is needed: the decoder hits the end of its input.
            Ok(None) => prop_assert_eq!(decoded.map_err(|r| r.status), Err(400)),
            Err(r) => prop_assert_eq!(decoded, Err(r)),
        }
    }

    /// The supervisor re-parses a growing buffer: once a prefix gives a
    /// decision, every longer prefix (and the whole) gives the same one.
    #[test]
    fn decisions_do_not_depend_on_how_bytes_arrive(input in any_input()) {
        let limits = Limits { max_request_line: 64, max_header_line: 64, max_headers: 8, max_head: 256, max_body: 1000, ..Limits::default() };
        let mut first: Option<Decision> = None;
        for k in 0..=input.len() {
            let d = decide(&input[..k], &limits);
            match &first {
                None if d != Decision::Incomplete => first = Some(d),
                Some(f) => prop_assert_eq!(&d, f, "prefix {} of {:?}", k, String::from_utf8_lossy(&input)),
                None => {}
            }
        }
    }

    /// The chunked decoder gives the same bytes (or the same error) whether
    /// the body arrives whole or one byte at a time.
    #[test]
    fn chunked_decoding_does_not_depend_on_how_bytes_arrive(input in any_input()) {
        let limits = Limits { max_body: 64, max_header_line: 32, ..Limits::default() };
        let whole = decode(&input[..], &limits);
        let trickled = decode(BufReader::with_capacity(1, &input[..]), &limits);
        prop_assert_eq!(whole, trickled);
    }

    /// A valid request, written out, parses back to what was written.
    #[test]
    fn valid_requests_round_trip(
        method in "[A-Z]{1,8}",
        path in "/[a-zA-Z0-9._~%!$&'()*+,;=:@/-]{0,40}",
        query in proptest::option::of("[a-zA-Z0-9=&%]{0,20}"),
        headers in prop::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~]{0,30}"), 0..8),
        body in prop::collection::vec(any::<u8>(), 0..100),
        chunked in any::<bool>(),
        keep in any::<bool>(),
    ) {
        let reserved = ["host", "content-length", "transfer-encoding", "connection", "expect", "content-type"];
        let headers: Vec<(String, String)> = headers
            .into_iter()
            .filter(|(n, _)| !reserved.contains(&n.to_ascii_lowercase().as_str()))
            .map(|(n, v)| (n, v.trim_matches([' ', '\t']).to_owned()))
            .collect();
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: example\r\n");
        for (n, v) in &headers {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        if !keep {
            raw.push_str("Connection: close\r\n");
        }
        let mut raw = raw.into_bytes();
        if chunked {
            raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for part in body.chunks(7) {
                raw.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                raw.extend_from_slice(part);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"0\r\n\r\n");
        } else {
            raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            raw.extend_from_slice(&body);
        }
        let limits = Limits::default();
        let head = parse_head(&raw, &limits).unwrap().expect("complete");
        prop_assert_eq!(head.method, method.as_str());
        prop_assert_eq!(head.target, target.as_str());
        prop_assert_eq!(head.keep_alive, keep);
        let framing_fields = ["host", "content-length", "transfer-encoding", "connection"];
        let got: Vec<(String, String)> = head
            .headers
            .iter()
            .filter(|(n, _)| !framing_fields.contains(&n.to_ascii_lowercase().as_str()))
            .map(|(n, v)| ((*n).to_owned(), String::from_utf8(v.to_vec()).unwrap()))
            .collect();
        prop_assert_eq!(got, headers);
        let mut reader = BodyReader::new(&raw[head.len..], head.framing, &limits);
        let mut decoded = Vec::new();
        reader.read_to_end(&mut decoded).unwrap();
        prop_assert_eq!(decoded, body);
        prop_assert!(reader.is_done());
    }
}
