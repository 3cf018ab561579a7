//! A request arriving in pieces: the supervisor's buffer for one connection,
//! with what the framing code has learnt of it so far, so that each read
//! costs work in proportion to the bytes it brought.

use super::body::ChunkedScanner;
use super::head::{parse_complete_head, HeadScanner};
use super::{BodyFraming, Head, Limits, Rejection};

/// The bytes read of a connection's next request, not yet handed to a
/// worker, and how far they have been examined.
///
/// A client may send its request a byte at a time; every read appends and
/// calls [`PendingRequest::check`], which resumes where the last call
/// stopped. Re-scanning the whole buffer instead would let a few trickling
/// clients make the supervisor's one thread do quadratic work.
///
/// With nothing pending (an idle keep-alive connection) it is one null
/// pointer: the bytes and the scan live in a box made when the first byte
/// of a request arrives.
#[derive(Debug, Default)]
pub struct PendingRequest {
    arriving: Option<Box<Arriving>>,
}

#[derive(Debug, Default)]
struct Arriving {
    bytes: Vec<u8>,
    stage: Stage,
    /// Work of the stages already passed (see [`PendingRequest::work`]).
    work_done: u64,
}

#[derive(Debug)]
enum Stage {
    /// Looking for the end of the head.
    Head(HeadScanner),
    /// The head is `bytes[..head_len]` and sound; the body is as `body` says.
    Framed { head_len: usize, body: PendingBody },
}

impl Default for Stage {
    fn default() -> Self {
        Stage::Head(HeadScanner::default())
    }
}

#[derive(Debug)]
enum PendingBody {
    /// Nothing to wait for: no body, a body too large to buffer (the worker
    /// streams it), or one the client sends only after `100 Continue`.
    Ready,
    /// A body of this many bytes, small enough to be buffered.
    Length(u64),
    /// A chunked body, buffered until it ends or passes the buffering limit.
    Chunked(ChunkedScanner),
}

impl PendingBody {
    /// What a request with `head` waits for before it is handed over.
    fn of(head: &Head<'_>, limits: &Limits) -> PendingBody {
        match head.framing {
            _ if head.expect_continue => PendingBody::Ready,
            BodyFraming::None => PendingBody::Ready,
            BodyFraming::Length(n) if n > limits.buffered_body as u64 => PendingBody::Ready,
            BodyFraming::Length(n) => PendingBody::Length(n),
            BodyFraming::Chunked => PendingBody::Chunked(ChunkedScanner::default()),
        }
    }

    /// Whether it is all there in `body_bytes` (what followed the head).
    fn ready(&mut self, body_bytes: &[u8], limits: &Limits) -> Result<bool, Rejection> {
        Ok(match self {
            PendingBody::Ready => true,
            PendingBody::Length(n) => body_bytes.len() as u64 >= *n,
            PendingBody::Chunked(scanner) => {
                scanner.scan(body_bytes, limits)?.is_some() || body_bytes.len() > limits.buffered_body
            }
        })
    }
}

impl PendingRequest {
    pub fn bytes(&self) -> &[u8] {
        self.arriving.as_ref().map_or(&[], |a| &a.bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    /// Appends what was just read.
    pub fn extend(&mut self, data: &[u8]) {
        self.arriving.get_or_insert_with(Box::default).bytes.extend_from_slice(data);
    }

    /// Starts over with `leftover` (what a worker read past the requests it
    /// served: the start of the next one).
    pub fn reset_to(&mut self, leftover: &[u8]) {
        self.release();
        if !leftover.is_empty() {
            self.extend(leftover);
        }
    }

    /// Drops the first `n` bytes (a PROXY header read before the request)
    /// and starts the scan over on what follows.
    pub fn skip_front(&mut self, n: usize) {
        if let Some(a) = self.arriving.as_deref_mut() {
            a.bytes.drain(..n.min(a.bytes.len()));
            a.stage = Stage::default();
            a.work_done = 0;
        }
    }

    /// Drops the bytes and their allocation: an idle connection must stay cheap.
    pub fn release(&mut self) {
        self.arriving = None;
    }

    /// Whether the request may be handed to a worker now: its head is
    /// complete and sound, and its body is either here whole, too large to
    /// be buffered (`limits.buffered_body`), or waits for `100 Continue`.
    /// `Err`: answer the rejection and close.
    pub fn check(&mut self, limits: &Limits) -> Result<bool, Rejection> {
        let Some(a) = self.arriving.as_deref_mut() else { return Ok(false) };
        if let Stage::Head(scanner) = &mut a.stage {
            let Some(head_len) = scanner.scan(&a.bytes, limits)? else {
                return Ok(false);
            };
            a.work_done = scanner.work() + head_len as u64;
            let head = parse_complete_head(&a.bytes[..head_len], limits)?;
            a.stage = Stage::Framed { head_len, body: PendingBody::of(&head, limits) };
        }
        let Stage::Framed { head_len, body } = &mut a.stage else {
            return Ok(false);
        };
        body.ready(&a.bytes[*head_len..], limits)
    }

    /// [`PendingRequest::check`] of bytes read in one go (a worker's first
    /// read of a connection it accepted), parsing the head once: the head
    /// if the request may be served now.
    pub fn check_once<'b>(bytes: &'b [u8], limits: &Limits) -> Result<Option<Head<'b>>, Rejection> {
        let Some(head) = super::parse_head(bytes, limits)? else { return Ok(None) };
        let ready = PendingBody::of(&head, limits).ready(&bytes[head.len..], limits)?;
        Ok(ready.then_some(head))
    }

    /// How many bytes the framing code has looked at for this request, each
    /// time it looked (the head's scan, its one parse, the body's scan):
    /// linear in the request's size however it arrived, as tests check.
    pub fn work(&self) -> u64 {
        let Some(a) = self.arriving.as_deref() else { return 0 };
        match &a.stage {
            Stage::Head(scanner) => scanner.work(),
            Stage::Framed { body: PendingBody::Chunked(scanner), .. } => a.work_done + scanner.work(),
            Stage::Framed { .. } => a.work_done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` in pieces of `step` bytes, checking after each; returns
    /// what the last check said and the work done.
    fn trickle(raw: &[u8], step: usize, limits: &Limits) -> (Result<bool, Rejection>, u64) {
        let mut pending = PendingRequest::default();
        let mut last = Ok(false);
        for piece in raw.chunks(step) {
            pending.extend(piece);
            last = pending.check(limits);
            if last != Ok(false) {
                break;
            }
        }
        (last, pending.work())
    }

    fn big_head(fields: usize) -> Vec<u8> {
        let mut head = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..fields {
            head.extend_from_slice(format!("X-Field-{i}: {}\r\n", "v".repeat(380)).as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    }

    #[test]
    fn a_head_sent_a_byte_at_a_time_costs_linear_work() {
        let head = big_head(90);
        assert!(head.len() > 30_000);
        let (whole, whole_work) = trickle(&head, head.len(), &Limits::default());
        let (bytewise, bytewise_work) = trickle(&head, 1, &Limits::default());
        assert_eq!((whole, bytewise), (Ok(true), Ok(true)));
        // The scan looks at each byte once and the parse once more: the
        // same work whole or trickled. Re-scanning from the start on each
        // read would be about len²/2 = 500 million here.
        assert_eq!(whole_work, 2 * head.len() as u64);
        assert_eq!(bytewise_work, whole_work);
    }

    #[test]
    fn a_chunked_body_sent_a_byte_at_a_time_costs_linear_work() {
        let mut raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let head_len = raw.len();
        for _ in 0..1000 {
            raw.extend_from_slice(b"20;ext=1\r\n");
            raw.extend_from_slice(&[b'a'; 0x20]);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
        let (whole, _) = trickle(&raw, raw.len(), &Limits::default());
        let (bytewise, work) = trickle(&raw, 1, &Limits::default());
        assert_eq!((whole, bytewise), (Ok(true), Ok(true)));
        // Lines are looked at once, each byte of chunk data skipped over
        // costs at most one step: linear, far from len²/2 (1.2 billion).
        assert!(
            work <= 2 * head_len as u64 + 2 * (raw.len() - head_len) as u64,
            "{work} for {} bytes",
            raw.len()
        );
    }

    #[test]
    fn bodies_are_waited_for_up_to_the_buffering_limit() {
        let limits = Limits { buffered_body: 8, ..Limits::default() };
        let check = |raw: &[u8]| {
            let mut p = PendingRequest::default();
            p.extend(raw);
            p.check(&limits)
        };
        assert_eq!(check(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel"), Ok(false));
        assert_eq!(check(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"), Ok(true));
        assert_eq!(check(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n"), Ok(true), "streamed");
        let expect = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
        assert_eq!(check(expect), Ok(true), "the body comes after 100 Continue");
        let chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(check(&[&chunked[..], b"3\r\nabc\r\n"].concat()), Ok(false));
        assert_eq!(check(&[&chunked[..], b"3\r\nabc\r\n0\r\n\r\n"].concat()), Ok(true));
        assert_eq!(check(&[&chunked[..], b"9\r\nabcdefghi"].concat()), Ok(true), "past the limit");
        assert_eq!(check(&[&chunked[..], b"zz\r\n"].concat()).map_err(|r| r.status), Err(400));
    }

    #[test]
    fn starting_over_forgets_the_previous_request() {
        let mut p = PendingRequest::default();
        p.extend(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(p.check(&Limits::default()), Ok(true));
        p.reset_to(b"GET /b HTTP/1.1\r\n");
        assert_eq!(p.check(&Limits::default()), Ok(false));
        p.extend(b"Host: x\r\n\r\n");
        assert_eq!(p.check(&Limits::default()), Ok(true));
        p.reset_to(b"PROXY UNKNOWN\r\nGET /c HTTP/1.1\r\nHost: x\r\n\r\n");
        p.skip_front(15);
        assert_eq!(p.check(&Limits::default()), Ok(true));
        assert!(p.bytes().starts_with(b"GET /c"));
        p.release();
        assert!(p.is_empty() && p.arriving.is_none());
        assert_eq!(
            std::mem::size_of::<PendingRequest>(),
            std::mem::size_of::<usize>(),
            "idle costs a pointer"
        );
    }
}
