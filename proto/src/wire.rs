//! The supervisor↔worker wire protocol (PROTOCOL.md is the reference).
//!
//! Each worker has one `SOCK_SEQPACKET` unix socketpair with the supervisor.
//! One `sendmsg` carries one whole message, and a client connection travels
//! as an `SCM_RIGHTS` descriptor attached to the message that describes it,
//! so the two sides can never fall out of step.
//!
//! Every message starts with the protocol version and a kind byte; integers
//! are little-endian.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

/// Bumped on any incompatible change to the messages below.
pub const VERSION: u8 = 1;

const ASSIGN: u8 = 1;
const READY: u8 = 2;
const DONE: u8 = 3;
const RETIRING: u8 = 4;
const ASSIGN_AHEAD: u8 = 5;
const SKIPPED: u8 = 6;
const ADOPT: u8 = 8;
const FREE: u8 = 9;
const DEPOSIT: u8 = 10;
const GO: u8 = 11;
const DONES: u8 = 12;
const WARM: u8 = 14;
const COOL: u8 = 15;

/// `Ready` feature bit: the worker takes connections sent ahead (it claims
/// each on its scoreboard and answers `Skipped` for one taken back).
pub const FEATURE_AHEAD: u8 = 1;

/// `Ready` feature bit: the worker wants each request parsed by the
/// supervisor (`parsed::ParsedRequest`, kind 7) instead of Assign's bytes.
pub const FEATURE_PARSED: u8 = 2;

/// `Ready` feature bit: the worker accepts connections from the listeners
/// it was given (`MONODON_LISTEN_FDS`) while its scoreboard's `attention`
/// is free, and its Ready carries its vault (see [`Deposit`]).
pub const FEATURE_ACCEPT: u8 = 4;

/// `Ready` feature bit: the worker claims in the scoreboard's third ahead
/// cell too, so the supervisor may have two connections ahead of it.
pub const FEATURE_AHEAD_TWO: u8 = 8;

/// `Ready` feature bit (with `FEATURE_ACCEPT` only): the worker keeps
/// connections it served kept alive, in its scoreboard's warm cells, and
/// serves their next requests itself while its attention is free (see
/// [`FromWorker::Warm`]).
pub const FEATURE_WARM: u8 = 16;

/// The largest message either side may send, for request limits `limits`:
/// the supervisor passes at most a head plus one read's worth of bytes, and
/// a worker hands back at most as much as it was given or one read's worth.
/// Both ends size their buffers (and the socket's) from this.
pub fn max_message(limits: &crate::http::Limits) -> usize {
    2 * limits.max_head + limits.buffered_body + 64 * 1024
}

/// Supervisor → worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker<'a> {
    /// Serve this connection (its fd rides along). `data` holds the bytes the
    /// supervisor already read from it: at least one complete request head.
    /// `ahead`: sent while the worker was busy; serve it only if it can be
    /// claimed on the scoreboard, else answer `Skipped`.
    Assign { conn_id: u64, served: u32, peer: &'a str, data: &'a [u8], ahead: bool },
    /// A worker that accepts and was parked may accept again (its
    /// scoreboard's attention is free).
    Go,
}

/// Worker → supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromWorker<'a> {
    /// The app is initialised; send connections. `features`: `FEATURE_*`
    /// bits (absent from older workers: 0).
    Ready { pid: u32, features: u8 },
    /// The worker is done with the connection and has closed its copy.
    /// `keep`: the connection may carry another request, and `leftover` holds
    /// bytes the worker read past the last request it served.
    Done { conn_id: u64, served: u32, keep: bool, leftover: &'a [u8] },
    /// The worker has started its last request (its max-requests limit) and
    /// will exit after the Done for it: start a replacement now.
    Retiring,
    /// A connection sent ahead was taken back before the worker got to it;
    /// the worker has closed its copy.
    Skipped { conn_id: u64 },
    /// A connection the worker accepted itself is the supervisor's now (its
    /// fd rides along): its head was not all there or not the worker's to
    /// serve (`served` 0), or it is kept alive after `served` requests
    /// (`keep`), or it closes with input pending (`keep` false: the
    /// supervisor lingers). `leftover`: the bytes read and not served.
    Adopt { conn_id: u64, served: u32, keep: bool, leftover: &'a [u8] },
    /// The supervisor asked for the worker while it served a connection of
    /// its own; that is done, and the worker waits on its channel only.
    Free,
    /// Several Dones in one message, in the order the worker finished the
    /// connections, each kept alive with nothing left over (see [`Dones`]).
    Dones(Dones<'a>),
    /// Done with connection `conn_id` after `served` requests, kept alive,
    /// and kept by the worker: it is in the worker's warm cell `cell`,
    /// and the worker serves its next requests itself (claiming the cell
    /// first) until it gives it back (Cool) or the supervisor takes it
    /// back (swapping the cell's id for 0).
    Warm { conn_id: u64, served: u32, cell: u8 },
    /// The worker gives back warm connection `conn_id`, as Done's fields
    /// say: after `served` requests in all, kept alive or not, with the
    /// bytes it read and did not serve (a head still coming, one the
    /// supervisor must answer). It has cleared the cell and closed its
    /// copy first.
    Cool { conn_id: u64, served: u32, keep: bool, leftover: &'a [u8] },
}

/// The Dones a busy worker held back while connections sent ahead were
/// waiting for it, sent together when it is about to wait (one message and
/// one wake-up instead of one per request). Only a Done with `keep` and no
/// leftover is held back, so each record is a connection id and `served`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dones<'a> {
    records: &'a [u8],
}

impl<'a> Dones<'a> {
    const RECORD: usize = 12;

    /// The most a Dones message carries (a worker holds back no more).
    pub const MAX: usize = 8;

    /// `(conn_id, served)` of each connection, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + 'a {
        self.records.chunks_exact(Self::RECORD).map(|r| {
            let (id, served) = r.split_at(8);
            (
                u64::from_le_bytes(id.try_into().unwrap_or_default()),
                u32::from_le_bytes(served.try_into().unwrap_or_default()),
            )
        })
    }

    pub fn len(&self) -> usize {
        self.records.len() / Self::RECORD
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Encodes `dones` (`(conn_id, served)` each, at most `MAX`).
    pub fn encode(dones: &[(u64, u32)], out: &mut Vec<u8>) {
        debug_assert!(dones.len() <= Self::MAX);
        out.clear();
        out.extend_from_slice(&[VERSION, DONES]);
        for (id, served) in dones {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&served.to_le_bytes());
        }
    }
}

/// What a worker that accepts puts in its vault (a socketpair whose
/// receiving end the supervisor holds too) before it serves a connection
/// of its own, with a copy of the connection's fd, and takes out again
/// when it is done: if the worker dies meanwhile, the supervisor finds the
/// connection there and answers 502 (or 504) as for one it handed over.
/// `written`: the worker's response bytes when it began the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deposit {
    pub conn_id: u64,
    pub written: u64,
}

impl Deposit {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&[VERSION, DEPOSIT]);
        out.extend_from_slice(&self.conn_id.to_le_bytes());
        out.extend_from_slice(&self.written.to_le_bytes());
    }

    pub fn decode(msg: &[u8]) -> Result<Deposit, WireError> {
        let mut r = Cursor::new(msg)?;
        if r.kind != DEPOSIT {
            return Err(WireError("not a deposit"));
        }
        Ok(Deposit { conn_id: r.u64()?, written: r.u64()? })
    }
}

/// A message that does not follow this protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub &'static str);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "protocol error: {}", self.0)
    }
}

impl std::error::Error for WireError {}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl ToWorker<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        match self {
            ToWorker::Assign { conn_id, served, peer, data, ahead } => {
                let peer = &peer.as_bytes()[..peer.len().min(u16::MAX as usize)];
                out.extend_from_slice(&[VERSION, if *ahead { ASSIGN_AHEAD } else { ASSIGN }]);
                out.extend_from_slice(&conn_id.to_le_bytes());
                out.extend_from_slice(&served.to_le_bytes());
                out.extend_from_slice(&(peer.len() as u16).to_le_bytes());
                out.extend_from_slice(peer);
                out.extend_from_slice(data);
            }
            ToWorker::Go => out.extend_from_slice(&[VERSION, GO]),
        }
    }

    pub fn decode(msg: &[u8]) -> Result<ToWorker<'_>, WireError> {
        let mut r = Cursor::new(msg)?;
        match r.kind {
            kind @ (ASSIGN | ASSIGN_AHEAD) => {
                let conn_id = r.u64()?;
                let served = r.u32()?;
                let peer_len = r.u16()? as usize;
                let peer =
                    std::str::from_utf8(r.bytes(peer_len)?).map_err(|_| WireError("peer is not UTF-8"))?;
                Ok(ToWorker::Assign { conn_id, served, peer, data: r.rest(), ahead: kind == ASSIGN_AHEAD })
            }
            GO => Ok(ToWorker::Go),
            _ => Err(WireError("unknown message kind")),
        }
    }
}

impl FromWorker<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        match self {
            FromWorker::Ready { pid, features } => {
                out.extend_from_slice(&[VERSION, READY]);
                out.extend_from_slice(&pid.to_le_bytes());
                out.push(*features);
            }
            FromWorker::Done { conn_id, served, keep, leftover } => {
                out.extend_from_slice(&[VERSION, DONE]);
                out.extend_from_slice(&conn_id.to_le_bytes());
                out.extend_from_slice(&served.to_le_bytes());
                out.push(u8::from(*keep));
                out.extend_from_slice(leftover);
            }
            FromWorker::Retiring => out.extend_from_slice(&[VERSION, RETIRING]),
            FromWorker::Skipped { conn_id } => {
                out.extend_from_slice(&[VERSION, SKIPPED]);
                out.extend_from_slice(&conn_id.to_le_bytes());
            }
            FromWorker::Adopt { conn_id, served, keep, leftover } => {
                out.extend_from_slice(&[VERSION, ADOPT]);
                out.extend_from_slice(&conn_id.to_le_bytes());
                out.extend_from_slice(&served.to_le_bytes());
                out.push(u8::from(*keep));
                out.extend_from_slice(leftover);
            }
            FromWorker::Free => out.extend_from_slice(&[VERSION, FREE]),
            FromWorker::Dones(d) => {
                out.extend_from_slice(&[VERSION, DONES]);
                out.extend_from_slice(d.records);
            }
            FromWorker::Warm { conn_id, served, cell } => {
                out.extend_from_slice(&[VERSION, WARM]);
                out.extend_from_slice(&conn_id.to_le_bytes());
                out.extend_from_slice(&served.to_le_bytes());
                out.push(*cell);
            }
            FromWorker::Cool { conn_id, served, keep, leftover } => {
                out.extend_from_slice(&[VERSION, COOL]);
                out.extend_from_slice(&conn_id.to_le_bytes());
                out.extend_from_slice(&served.to_le_bytes());
                out.push(u8::from(*keep));
                out.extend_from_slice(leftover);
            }
        }
    }

    pub fn decode(msg: &[u8]) -> Result<FromWorker<'_>, WireError> {
        let mut r = Cursor::new(msg)?;
        match r.kind {
            READY => {
                let pid = r.u32()?;
                // Older workers send no features byte.
                let features = r.rest().first().copied().unwrap_or(0);
                Ok(FromWorker::Ready { pid, features })
            }
            WARM => {
                let (conn_id, served) = (r.u64()?, r.u32()?);
                let cell = r.bytes(1)?[0];
                if usize::from(cell) >= crate::scoreboard::WARM_CELLS || !r.rest().is_empty() {
                    return Err(WireError("Warm names no warm cell"));
                }
                Ok(FromWorker::Warm { conn_id, served, cell })
            }
            kind @ (DONE | ADOPT | COOL) => {
                let conn_id = r.u64()?;
                let served = r.u32()?;
                let keep = match r.bytes(1)?[0] {
                    0 => false,
                    1 => true,
                    _ => return Err(WireError("keep flag is not 0 or 1")),
                };
                let leftover = r.rest();
                Ok(match kind {
                    DONE => FromWorker::Done { conn_id, served, keep, leftover },
                    ADOPT => FromWorker::Adopt { conn_id, served, keep, leftover },
                    _ => FromWorker::Cool { conn_id, served, keep, leftover },
                })
            }
            FREE => Ok(FromWorker::Free),
            RETIRING => Ok(FromWorker::Retiring),
            SKIPPED => Ok(FromWorker::Skipped { conn_id: r.u64()? }),
            DONES => {
                let records = r.rest();
                let count = records.len() / Dones::RECORD;
                if records.len() % Dones::RECORD != 0 || count == 0 || count > Dones::MAX {
                    return Err(WireError("Dones is not 1 to 8 whole records"));
                }
                Ok(FromWorker::Dones(Dones { records }))
            }
            _ => Err(WireError("unknown message kind")),
        }
    }
}

pub(crate) struct Cursor<'a> {
    pub(crate) kind: u8,
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(msg: &'a [u8]) -> Result<Self, WireError> {
        match msg {
            [VERSION, kind, rest @ ..] => Ok(Cursor { kind: *kind, rest }),
            [_, _, ..] => Err(WireError("unsupported protocol version")),
            _ => Err(WireError("message too short")),
        }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError("message truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(a))
    }

    pub(crate) fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Sends one message, with `pass` attached as SCM_RIGHTS if given.
/// Never raises SIGPIPE; on a non-blocking socket a full buffer is `EAGAIN`.
pub fn send(channel: BorrowedFd<'_>, msg: &[u8], pass: Option<BorrowedFd<'_>>) -> io::Result<()> {
    match pass {
        Some(fd) => send_fds(channel, msg, &[fd]),
        None => send_fds(channel, msg, &[]),
    }
}

/// Sends one message with any number of fds attached (a template's Fork
/// carries two).
pub fn send_fds(channel: BorrowedFd<'_>, msg: &[u8], pass: &[BorrowedFd<'_>]) -> io::Result<()> {
    let iov = [IoSlice::new(msg)];
    let fds: Vec<RawFd> = pass.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<()>(channel.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == msg.len() => return Ok(()),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "message sent in part")),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// What one `recv` produced.
#[derive(Debug)]
pub enum Received {
    /// A message of this many bytes (in the caller's buffer) and the fd it
    /// carried, if any.
    Message(usize, Option<OwnedFd>),
    /// The other side has closed the channel.
    Closed,
}

/// Receives one message into `buf`. Received fds are close-on-exec; a
/// message that was cut short, or carried more than one fd, is an error
/// (any extra fds are closed).
pub fn recv(channel: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    match recv_fds(channel, buf, 1)? {
        None => Ok(Received::Closed),
        Some((n, mut fds)) => Ok(Received::Message(n, fds.pop())),
    }
}

/// Receives one message into `buf` with up to `max_fds` fds (close-on-exec);
/// `None` when the other side has closed the channel. A message cut short,
/// or with more fds than that, is an error (the extras are closed).
pub fn recv_fds(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    recv_with(channel, buf, max_fds, MsgFlags::empty())
}

/// [`recv_fds`] with one fd at most that does not wait: `WouldBlock` when
/// nothing is there (a vault is read this way, by both its holders).
pub fn recv_nonblocking(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    recv_with(channel, buf, 1, MsgFlags::MSG_DONTWAIT)
}

fn recv_with(
    channel: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    extra: MsgFlags,
) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    // Room for several fds, so that a misbehaving peer's extras are seen
    // (and closed) instead of silently truncated.
    let mut cmsg_space = nix::cmsg_space!([RawFd; 8]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let flags = MsgFlags::MSG_CMSG_CLOEXEC | extra;
        let msg = match socket::recvmsg::<()>(channel.as_raw_fd(), &mut iov, Some(&mut cmsg_space), flags) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel has just installed these descriptors
                    // in our table for us; nothing else owns them.
                    fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
        }
        let truncated = msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        let n = msg.bytes;
        if truncated {
            return Err(WireError("message or its descriptors were truncated").into());
        }
        if fds.len() > max_fds {
            return Err(WireError("too many descriptors in a message").into());
        }
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        return Ok(Some((n, fds)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap()
    }

    #[test]
    fn dones_carry_one_to_eight_connections_in_order() {
        let mut buf = Vec::new();
        Dones::encode(&[(7, 1), (u64::MAX, 40), (3, 2)], &mut buf);
        let Ok(FromWorker::Dones(d)) = FromWorker::decode(&buf) else { panic!("not Dones") };
        assert_eq!(d.iter().collect::<Vec<_>>(), [(7, 1), (u64::MAX, 40), (3, 2)]);
        let mut again = Vec::new();
        FromWorker::Dones(d).encode(&mut again);
        assert_eq!(again, buf);
        Dones::encode(&[], &mut buf);
        assert!(FromWorker::decode(&buf).is_err(), "an empty Dones");
        buf.clear();
        buf.extend_from_slice(&[VERSION, DONES]);
        buf.extend((0..9).flat_map(|_| [1u8, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]));
        assert!(FromWorker::decode(&buf).is_err(), "more than MAX");
        Dones::encode(&[(1, 1)], &mut buf);
        buf.pop();
        assert!(FromWorker::decode(&buf).is_err(), "a cut record");
    }

    #[test]
    fn messages_round_trip() {
        let mut buf = Vec::new();
        for ahead in [false, true] {
            let assign =
                ToWorker::Assign { conn_id: 7, served: 3, peer: "127.0.0.1:9", data: b"GET /", ahead };
            assign.encode(&mut buf);
            assert_eq!(ToWorker::decode(&buf), Ok(assign));
        }
        let done = FromWorker::Done { conn_id: u64::MAX, served: 1, keep: true, leftover: b"GE" };
        done.encode(&mut buf);
        assert_eq!(FromWorker::decode(&buf), Ok(done));
        FromWorker::Ready { pid: 42, features: FEATURE_AHEAD }.encode(&mut buf);
        assert_eq!(FromWorker::decode(&buf), Ok(FromWorker::Ready { pid: 42, features: FEATURE_AHEAD }));
        FromWorker::Retiring.encode(&mut buf);
        assert_eq!(FromWorker::decode(&buf), Ok(FromWorker::Retiring));
        FromWorker::Skipped { conn_id: 9 }.encode(&mut buf);
        assert_eq!(FromWorker::decode(&buf), Ok(FromWorker::Skipped { conn_id: 9 }));
        let adopt = FromWorker::Adopt { conn_id: 1 << 63 | 5, served: 2, keep: false, leftover: b"GET" };
        adopt.encode(&mut buf);
        assert_eq!(FromWorker::decode(&buf), Ok(adopt));
        FromWorker::Free.encode(&mut buf);
        assert_eq!(FromWorker::decode(&buf), Ok(FromWorker::Free));
        ToWorker::Go.encode(&mut buf);
        assert_eq!(ToWorker::decode(&buf), Ok(ToWorker::Go));
        let deposit = Deposit { conn_id: 1 << 63 | 6, written: 1234 };
        deposit.encode(&mut buf);
        assert_eq!(Deposit::decode(&buf), Ok(deposit));
        assert!(Deposit::decode(&buf[..10]).is_err(), "a deposit cut short");
        FromWorker::Free.encode(&mut buf);
        assert!(Deposit::decode(&buf).is_err(), "a message that is no deposit");
    }

    #[test]
    fn a_ready_from_an_older_worker_has_no_features() {
        let older = [VERSION, READY, 42, 0, 0, 0];
        assert_eq!(FromWorker::decode(&older), Ok(FromWorker::Ready { pid: 42, features: 0 }));
    }

    #[test]
    fn malformed_messages_are_errors() {
        assert!(FromWorker::decode(b"").is_err());
        assert!(FromWorker::decode(&[VERSION + 1, READY, 0, 0, 0, 0]).is_err());
        assert!(FromWorker::decode(&[VERSION, READY, 0]).is_err());
        assert!(FromWorker::decode(&[VERSION, 99]).is_err());
        assert!(ToWorker::decode(&[VERSION, ASSIGN, 1, 2]).is_err());
    }

    #[test]
    fn an_fd_travels_with_its_message() {
        let (a, b) = pair();
        let (x, _y) = pair();
        send(a.as_fd(), b"hello", Some(x.as_fd())).unwrap();
        let mut buf = [0u8; 64];
        match recv(b.as_fd(), &mut buf).unwrap() {
            Received::Message(n, Some(fd)) => {
                assert_eq!(&buf[..n], b"hello");
                let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
                assert_ne!(flags & libc_cloexec(), 0, "received fds are close-on-exec");
            }
            other => panic!("unexpected {other:?}"),
        }
        drop(a);
        assert!(matches!(recv(b.as_fd(), &mut buf).unwrap(), Received::Closed));
    }

    #[test]
    fn a_short_buffer_is_an_error_not_a_silent_cut() {
        let (a, b) = pair();
        send(a.as_fd(), &[1u8; 100], None).unwrap();
        let mut buf = [0u8; 10];
        assert!(recv(b.as_fd(), &mut buf).is_err());
    }

    fn libc_cloexec() -> i32 {
        nix::fcntl::FdFlag::FD_CLOEXEC.bits()
    }
}
