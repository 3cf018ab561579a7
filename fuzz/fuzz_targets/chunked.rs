//! Arbitrary bytes as a chunked request body, through `BodyReader` and
//! `chunked_body_len`.
//!
//! Checks, for the default limits and for small ones:
//! - neither ever panics;
//! - decoding does not depend on the size of the reads;
//! - `chunked_body_len` agrees with `BodyReader`: `Ok(Some(n))` means that
//!   decoding `data[..n]` succeeds and consumes exactly `n` bytes (and that
//!   decoding all of `data` gives the same body, leaving the rest unread);
//!   `Err(r)` means that decoding fails with the same rejection; `Ok(None)`
//!   means that decoding runs out of bytes;
//! - every strict prefix of a complete body is "incomplete" (`Ok(None)`).
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use monodon_proto::http::{body_rejection, chunked_body_len, BodyFraming, BodyReader, Limits, Rejection};

struct Decoded {
    /// The body, or the rejection (`None`: an error that is not a body error).
    result: Result<Vec<u8>, Option<Rejection>>,
    /// Bytes of the input the reader took.
    consumed: usize,
}

/// Decodes with `read_to_end`, or with reads of at most `step` bytes.
fn decode(data: &[u8], limits: &Limits, step: Option<usize>) -> Decoded {
    let mut reader = BodyReader::new(data, BodyFraming::Chunked, limits);
    let mut out = Vec::new();
    let result = match step {
        None => reader.read_to_end(&mut out).map(|_| ()),
        Some(step) => {
            let mut buf = vec![0u8; step];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        assert!(n <= step);
                        out.extend_from_slice(&buf[..n]);
                    }
                    Err(e) => break Err(e),
                }
            }
        }
    };
    let result = match result {
        Ok(()) => {
            assert!(reader.is_done());
            assert_eq!(reader.decoded(), out.len() as u64);
            assert!(reader.decoded() <= limits.max_body);
            Ok(out)
        }
        Err(e) => {
            assert!(!reader.is_done());
            Err(body_rejection(&e))
        }
    };
    let consumed = data.len() - reader.into_inner().len();
    Decoded { result, consumed }
}

const PREFIX_CHECK_MAX: usize = 1024;

fn check(data: &[u8], limits: &Limits) {
    let whole = decode(data, limits, None);
    for step in [1, 7] {
        let d = decode(data, limits, Some(step));
        assert_eq!(d.result, whole.result, "reads of {step} bytes decode otherwise");
        assert_eq!(d.consumed, whole.consumed, "reads of {step} bytes consume otherwise");
    }
    match chunked_body_len(data, limits) {
        Ok(Some(n)) => {
            assert!(n <= data.len());
            let exact = decode(&data[..n], limits, None);
            assert!(exact.result.is_ok(), "chunked_body_len says {n} bytes, decoding them gives {:?}", exact.result);
            assert_eq!(exact.consumed, n);
            assert_eq!(whole.result, exact.result);
            assert_eq!(whole.consumed, n);
            if n <= PREFIX_CHECK_MAX {
                for cut in 0..n {
                    assert_eq!(chunked_body_len(&data[..cut], limits), Ok(None), "prefix of {cut} of {n} bytes");
                }
            }
        }
        Ok(None) => {
            assert_eq!(whole.consumed, data.len());
            assert!(whole.result.is_err(), "chunked_body_len waits for more, decoding ends: {:?}", whole.result);
            assert_eq!(whole.result.as_ref().unwrap_err().map(|r| r.status), Some(400));
        }
        Err(r) => {
            assert_eq!(whole.result, Err(Some(r)), "chunked_body_len rejects, decoding does otherwise");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, &Limits::default());
    let small = Limits { max_header_line: 24, max_body: 40, ..Limits::default() };
    check(data, &small);
});
