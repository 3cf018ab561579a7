//! Arbitrary bytes as the start of a connection, through `parse_head`.
//!
//! Checks, for the default limits and for two small sets of limits:
//! - `parse_head` never panics;
//! - a head it accepts is sound: it ends in the blank line, fits the limits,
//!   and parses the same from exactly its own bytes;
//! - the decision does not depend on how the bytes arrive: every prefix of
//!   the input (inputs up to 2 KiB) is either "incomplete" (`Ok(None)`) or
//!   the same decision as the first decisive prefix, which is what the
//!   supervisor relies on when it re-parses after each read;
//! - limits are monotonic: what the small limits accept (or still wait on),
//!   the default limits accept identically (or still wait on).
#![no_main]

use libfuzzer_sys::fuzz_target;
use monodon_proto::http::{parse_head, BodyFraming, Head, Limits, Rejection};

/// What the property compares: a head by its length, framing and
/// keep-alive decision (the rest is compared too, as a stricter check),
/// a rejection by its status.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Head { len: usize, framing: BodyFraming, keep_alive: bool },
    Reject { status: u16 },
}

fn decision(r: &Result<Option<Head<'_>>, Rejection>) -> Option<Decision> {
    match r {
        Ok(None) => None,
        Ok(Some(h)) => Some(Decision::Head { len: h.len, framing: h.framing, keep_alive: h.keep_alive }),
        Err(e) => Some(Decision::Reject { status: e.status }),
    }
}

const PREFIX_CHECK_MAX: usize = 2048;

fn small() -> Limits {
    Limits {
        max_request_line: 64,
        max_header_line: 48,
        max_headers: 4,
        max_head: 256,
        max_body: 1000,
        buffered_body: 100,
    }
}

fn tiny() -> Limits {
    Limits {
        max_request_line: 16,
        max_header_line: 16,
        max_headers: 1,
        max_head: 48,
        max_body: 9,
        buffered_body: 4,
    }
}

fn check_head(data: &[u8], limits: &Limits, head: &Head<'_>) {
    assert!(head.len <= data.len());
    assert!(head.len <= limits.max_head, "head of {} bytes over max_head {}", head.len, limits.max_head);
    assert!(data[..head.len].ends_with(b"\r\n\r\n"));
    assert!(head.headers.len() <= limits.max_headers);
    match head.framing {
        BodyFraming::Length(n) => assert!(n > 0 && n <= limits.max_body),
        BodyFraming::None => assert!(!head.expect_continue),
        BodyFraming::Chunked => assert_eq!(head.minor_version, 1),
    }
    assert!(head.minor_version <= 1);
    // The head alone, without whatever followed it, gives the same head.
    let again = parse_head(&data[..head.len], limits);
    assert_eq!(again.as_ref(), Ok(&Some(head.clone())));
}

fn check(data: &[u8], limits: &Limits) -> Result<Option<usize>, Rejection> {
    let whole = parse_head(data, limits);
    if let Ok(Some(head)) = &whole {
        check_head(data, limits, head);
    }
    if data.len() <= PREFIX_CHECK_MAX {
        let mut first: Option<(usize, Result<Option<Head<'_>>, Rejection>)> = None;
        for cut in 0..=data.len() {
            let r = parse_head(&data[..cut], limits);
            let Some(d) = decision(&r) else {
                assert!(first.is_none(), "prefix of {cut} bytes is incomplete after a decision at {:?}", first);
                continue;
            };
            match &first {
                None => first = Some((cut, r)),
                Some((at, r0)) => {
                    assert_eq!(
                        Some(d),
                        decision(r0),
                        "prefix of {cut} bytes decides otherwise than the prefix of {at} bytes"
                    );
                    // Stricter: the whole result (fields, reason) is the same.
                    assert_eq!(&r, r0, "prefix of {cut} bytes vs {at} bytes");
                }
            }
        }
        let last = first.map(|(_, r)| r).unwrap_or(Ok(None));
        assert_eq!(last, whole);
    }
    whole.map(|h| h.map(|h| h.len))
}

fuzz_target!(|data: &[u8]| {
    let default = Limits::default();
    let d = check(data, &default);
    for limits in [small(), tiny()] {
        let s = check(data, &limits);
        match s {
            Ok(None) => assert_eq!(d, Ok(None), "small limits wait, default limits decide"),
            Ok(Some(len)) => {
                assert_eq!(d, Ok(Some(len)), "small limits accept, default limits do not");
                assert_eq!(parse_head(data, &limits), parse_head(data, &default));
            }
            Err(_) => {}
        }
    }
});
