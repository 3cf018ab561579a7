//! Request bodies: decoding Content-Length and chunked bodies from any
//! `BufRead`, and finding where a buffered chunked body ends.

use std::io::{self, BufRead, Read};

use super::{BodyFraming, Limits, Rejection};

/// large; the worker answers it with `rejection` instead of the app's response.
#[derive(Debug)]
pub struct BodyError(pub Rejection);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {}

fn body_error(status: u16, reason: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, BodyError(Rejection::new(status, reason)))
}

/// If `e` came from a malformed body, the rejection to answer with.
pub fn body_rejection(e: &io::Error) -> Option<Rejection> {
    e.get_ref()?.downcast_ref::<BodyError>().map(|b| b.0)
}

/// Reads a request body as framed by its head, yielding the decoded bytes.
pub struct BodyReader<R> {
    inner: R,
    state: BodyState,
    max_body: u64,
    decoded: u64,
    max_line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// `n` bytes of the body (or of the current chunk) remain.
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers(usize),
    Done,
}

impl<R: BufRead> BodyReader<R> {
    pub fn new(inner: R, framing: BodyFraming, limits: &Limits) -> Self {
        let state = match framing {
            BodyFraming::None | BodyFraming::Length(0) => BodyState::Done,
            BodyFraming::Length(n) => BodyState::Length(n),
            BodyFraming::Chunked => BodyState::ChunkSize,
        };
        BodyReader { inner, state, max_body: limits.max_body, decoded: 0, max_line: limits.max_header_line }
    }

    /// True once the whole body, trailers included, has been read.
    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Bytes of body delivered so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Reads one CRLF-terminated line (without it) of at most `max_line` bytes.
    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            let available = self.inner.fill_buf()?;
            if available.is_empty() {
                return Err(body_error(400, "connection closed inside a chunked body"));
            }
            let (take, found) = match available.iter().position(|&c| c == b'\n') {
                Some(i) => (i + 1, true),
                None => (available.len(), false),
            };
            line.extend_from_slice(&available[..take]);
            self.inner.consume(take);
            if line.len() > self.max_line {
                return Err(body_error(400, "chunk size or trailer line too long"));
            }
            if found {
                break;
            }
        }
        line.pop();
        if line.pop() != Some(b'\r') || line.contains(&b'\r') {
            return Err(body_error(400, "bare CR or LF in a chunked body"));
        }
        Ok(line)
    }
}

/// Where a chunked body that starts at `buf[0]` ends, if all of it is in
/// `buf`: `Ok(Some(len))` (trailers included), `Ok(None)` if more is
/// needed, or the rejection for a malformed body. A caller whose buffer
/// grows keeps a [`ChunkedScanner`] instead.
pub fn chunked_body_len(buf: &[u8], limits: &Limits) -> Result<Option<usize>, Rejection> {
    ChunkedScanner::default().scan(buf, limits)
}

/// Finds where a chunked body ends in a buffer that grows between calls,
/// resuming where the previous call stopped: each byte is looked at once.
/// Lets the supervisor buffer small bodies, so that slow senders never hold
/// a worker, for linear work however the body trickles in. It decides as
/// [`BodyReader`] does (the same line grammar, the same limits), which the
/// property tests and the fuzz target check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkedScanner {
    state: ChunkScan,
    /// Bytes of the body taken by complete lines and chunk data.
    pos: usize,
    /// Bytes after `pos` already searched for the current line's LF.
    searched: usize,
    decoded: u64,
    /// Bytes looked at, plus one per chunk of data skipped over.
    work: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkScan {
    #[default]
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    DataEnd,
    /// This many trailer fields so far.
    Trailers(usize),
    Done,
}

impl ChunkedScanner {
    /// `Ok(Some(len))`: the body, trailers included, is `buf[..len]`.
    /// `Ok(None)`: call again once `buf` has grown (same first bytes).
    pub fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<Option<usize>, Rejection> {
        debug_assert!(buf.len() >= self.pos + self.searched, "the buffer of a body only grows");
        loop {
            match self.state {
                ChunkScan::Done => return Ok(Some(self.pos)),
                ChunkScan::Data(left) => {
                    self.work += 1;
                    let take = left.min((buf.len() - self.pos) as u64);
                    self.pos += take as usize;
                    self.decoded += take;
                    if take < left {
                        self.state = ChunkScan::Data(left - take);
                        return Ok(None);
                    }
                    self.state = ChunkScan::DataEnd;
                }
                ChunkScan::Size => {
                    let Some(line) = self.next_line(buf, limits.max_header_line)? else { return Ok(None) };
                    let size = parse_chunk_size_line(line)?;
                    if self.decoded.saturating_add(size) > limits.max_body {
                        return Err(Rejection::new(413, "request body larger than the limit"));
                    }
                    self.state = if size == 0 { ChunkScan::Trailers(0) } else { ChunkScan::Data(size) };
                }
                ChunkScan::DataEnd => {
                    let Some(line) = self.next_line(buf, limits.max_header_line)? else { return Ok(None) };
                    if !line.is_empty() {
                        return Err(Rejection::new(400, "chunk data longer than its size"));
                    }
                    self.state = ChunkScan::Size;
                }
                ChunkScan::Trailers(count) => {
                    let Some(line) = self.next_line(buf, limits.max_header_line)? else { return Ok(None) };
                    if line.is_empty() {
                        self.state = ChunkScan::Done;
                    } else if count >= MAX_TRAILERS {
                        return Err(Rejection::new(431, "too many trailer fields"));
                    } else {
                        check_trailer_line(line)?;
                        self.state = ChunkScan::Trailers(count + 1);
                    }
                }
            }
        }
    }

    /// The next CRLF-terminated line (without it), once all of it is here.
    fn next_line<'b>(&mut self, buf: &'b [u8], max_line: usize) -> Result<Option<&'b [u8]>, Rejection> {
        let from = self.pos + self.searched;
        let found = buf[from..].iter().position(|&c| c == b'\n');
        self.work += found.map_or(buf.len() - from, |i| i + 1) as u64;
        let Some(i) = found else {
            self.searched = buf.len() - self.pos;
            if self.searched > max_line {
                return Err(Rejection::new(400, "chunk size or trailer line too long"));
            }
            return Ok(None);
        };
        let end = from + i;
        let line = &buf[self.pos..end];
        if line.len() + 1 > max_line {
            return Err(Rejection::new(400, "chunk size or trailer line too long"));
        }
        let Some((b'\r', line)) = line.split_last() else {
            return Err(Rejection::new(400, "bare CR or LF in a chunked body"));
        };
        if line.contains(&b'\r') {
            return Err(Rejection::new(400, "bare CR or LF in a chunked body"));
        }
        self.pos = end + 1;
        self.searched = 0;
        Ok(Some(line))
    }

    /// Bytes looked at so far (tests check it stays linear).
    pub fn work(&self) -> u64 {
        self.work
    }
}

/// Most trailer fields after a chunked body (more: 431).
const MAX_TRAILERS: usize = 100;

/// Parses a chunk-size line: `1*HEXDIG [ BWS ";" chunk-ext ]` (RFC 9112 §7.1).
pub fn parse_chunk_size_line(line: &[u8]) -> Result<u64, Rejection> {
    const BAD: Rejection = Rejection::new(400, "invalid chunk size");
    let digits = line.iter().take_while(|c| c.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(BAD);
    }
    let rest = &line[digits..];
    if !rest.is_empty() {
        let after_ws = rest.iter().position(|&c| c != b' ' && c != b'\t').map(|i| &rest[i..]);
        match after_ws {
            Some(ext) if ext[0] == b';' => {
                if !ext.iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c) || c >= 0x80) {
                    return Err(Rejection::new(400, "invalid chunk extension"));
                }
            }
            _ => return Err(BAD),
        }
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| BAD)?;
    u64::from_str_radix(hex, 16).map_err(|_| BAD)
}

/// Trailer fields that would change framing or routing if anything
/// downstream honoured them (RFC 9110 §6.5.1): a request carrying one is
/// refused as a smuggling attempt. Other trailers are read and dropped.
fn forbidden_trailer(name: &[u8]) -> bool {
    const FORBIDDEN: [&[u8]; 4] = [b"content-length", b"transfer-encoding", b"host", b"trailer"];
    FORBIDDEN.iter().any(|f| f.eq_ignore_ascii_case(name))
}

fn check_trailer_line(line: &[u8]) -> Result<(), Rejection> {
    const BAD: Rejection = Rejection::new(400, "invalid trailer field");
    let colon = line.iter().position(|&c| c == b':').ok_or(BAD)?;
    let name = &line[..colon];
    let is_tchar = |c: &u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.iter().all(is_tchar) {
        return Err(BAD);
    }
    if forbidden_trailer(name) {
        return Err(Rejection::new(400, "forbidden field in trailers"));
    }
    if !line[colon + 1..].iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c) || c >= 0x80) {
        return Err(BAD);
    }
    Ok(())
}

impl<R: BufRead> Read for BodyReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.state {
                BodyState::Done => return Ok(0),
                BodyState::Length(0) => self.state = BodyState::Done,
                BodyState::ChunkData(0) => self.state = BodyState::ChunkDataEnd,
                BodyState::Length(n) | BodyState::ChunkData(n) => {
                    if out.is_empty() {
                        return Ok(0);
                    }
                    let want = out.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                    let got = self.inner.read(&mut out[..want])?;
                    if got == 0 {
                        return Err(body_error(400, "connection closed before the end of the body"));
                    }
                    let left = n - got as u64;
                    self.state = match self.state {
                        BodyState::Length(_) => BodyState::Length(left),
                        _ => BodyState::ChunkData(left),
                    };
                    self.decoded += got as u64;
                    return Ok(got);
                }
                BodyState::ChunkSize => {
                    let line = self.read_line()?;
                    let size = parse_chunk_size_line(&line).map_err(|r| body_error(r.status, r.reason))?;
                    if self.decoded.saturating_add(size) > self.max_body {
                        return Err(body_error(413, "request body larger than the limit"));
                    }
                    self.state = if size == 0 { BodyState::Trailers(0) } else { BodyState::ChunkData(size) };
                }
                BodyState::ChunkDataEnd => {
                    let line = self.read_line()?;
                    if !line.is_empty() {
                        return Err(body_error(400, "chunk data longer than its size"));
                    }
                    self.state = BodyState::ChunkSize;
                }
                BodyState::Trailers(count) => {
                    let line = self.read_line()?;
                    if line.is_empty() {
                        self.state = BodyState::Done;
                    } else if count >= MAX_TRAILERS {
                        return Err(body_error(431, "too many trailer fields"));
                    } else {
                        check_trailer_line(&line).map_err(|r| body_error(r.status, r.reason))?;
                        self.state = BodyState::Trailers(count + 1);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(raw_body: &[u8], framing: BodyFraming) -> Result<Vec<u8>, Rejection> {
        let mut r = BodyReader::new(raw_body, framing, &Limits::default());
        let mut out = Vec::new();
        r.read_to_end(&mut out).map_err(|e| body_rejection(&e).expect("body error"))?;
        Ok(out)
    }

    #[test]
    fn chunked_bodies_decode() {
        let raw = b"5;a=\"b c\"\r\nhello\r\n6\r\n world\r\n000\r\nVary: *\r\n\r\nNEXT";
        let mut r = BodyReader::new(&raw[..], BodyFraming::Chunked, &Limits::default());
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"hello world");
        assert!(r.is_done());
        assert_eq!(r.into_inner(), b"NEXT", "nothing past the body is consumed");
    }

    #[test]
    fn bad_chunks_are_rejected() {
        for raw in [
            &b"6_0\r\nhello!\r\n0\r\n\r\n"[..],
            b"5\r\nhello\r\n0 \r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5\n;\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"5;ext=val\rue\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nContent-Length: 9\r\n\r\n",
            b"5\r\nhello\r\n0\r\n",
            b"11111111111111111\r\n",
        ] {
            assert_eq!(
                body(raw, BodyFraming::Chunked).map_err(|r| r.status),
                Err(400),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn chunked_body_len_finds_the_end_or_waits() {
        let limits = Limits::default();
        let body = b"5\r\nhello\r\n0\r\nX: y\r\n\r\nGET /next";
        assert_eq!(chunked_body_len(body, &limits), Ok(Some(body.len() - 9)));
        for cut in 0..body.len() - 9 {
            assert_eq!(chunked_body_len(&body[..cut], &limits), Ok(None), "cut at {cut}");
        }
        assert_eq!(chunked_body_len(b"zz\r\n", &limits).map_err(|r| r.status), Err(400));
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        assert_eq!(body(b"hello world", BodyFraming::Length(5)).unwrap(), b"hello");
        assert_eq!(body(b"hel", BodyFraming::Length(5)).map_err(|r| r.status), Err(400));
    }

    #[test]
    fn chunked_body_over_limit_is_413() {
        let limits = Limits { max_body: 4, ..Limits::default() };
        let mut r = BodyReader::new(&b"5\r\nhello\r\n0\r\n\r\n"[..], BodyFraming::Chunked, &limits);
        let e = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(body_rejection(&e).map(|r| r.status), Some(413));
    }
}
