//! A worker that accepts (`FEATURE_ACCEPT`): while its scoreboard's
//! `attention` is free it takes new connections from the listeners it was
//! given itself, and serves one when its whole request is already there;
//! anything else (a head still coming, a health check, a request the
//! supervisor must refuse, a connection kept alive after its response) is
//! handed to the supervisor (Adopt). Each connection it serves sits in its
//! vault meanwhile, so that the supervisor can answer for it if the worker
//! dies.
//!
//! Such a worker also keeps connections warm (`FEATURE_WARM`): one it has
//! served and that is kept alive stays in its epoll set and in a warm cell
//! of its scoreboard, and while its attention is free it serves the next
//! request on it itself, claiming the cell first, when that request is all
//! there; anything else goes back to the supervisor (Cool). The supervisor
//! keeps its own copy and takes a warm connection back (the cell's id
//! swapped for 0) when the worker cannot serve it soon.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use log::debug;
use monodon_proto::env;
use monodon_proto::http::{self, Limits, PendingRequest};
use monodon_proto::scoreboard::{Slot, WARM_CELLS};
use monodon_proto::wire::{self, Deposit, FromWorker};

use crate::serve::FirstHead;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};

/// The epoll key of the channel; listener `i` is `i + 1`.
const CHANNEL: u64 = 0;

/// The epoll key of warm cell `i` is `WARM_KEY + i`.
const WARM_KEY: u64 = 1 << 32;

/// A connection the worker keeps warm: the supervisor's id for it, the
/// requests served on it, its client.
pub struct WarmConn {
    pub id: u64,
    pub fd: OwnedFd,
    pub served: u32,
    pub peer: String,
    /// In the epoll set already (it stays there while it is served).
    registered: bool,
}

impl WarmConn {
    /// One of the supervisor's connections, just served, about to be kept.
    pub fn new(id: u64, fd: OwnedFd, served: u32, peer: String) -> WarmConn {
        WarmConn { id, fd, served, peer, registered: false }
    }

    /// The same connection after another request, still in the epoll set.
    pub fn served_again(id: u64, fd: OwnedFd, served: u32, peer: String) -> WarmConn {
        WarmConn { id, fd, served, peer, registered: true }
    }
}

/// What woke the worker.
pub enum Wake {
    /// Its channel has a message (or has closed), or the worker is parked
    /// and must wait for one.
    Channel,
    /// A connection the worker accepted, with its attention its own.
    Accepted { fd: OwnedFd, peer: String },
    /// It took its attention, found no connection after all, and the
    /// supervisor had asked for it meanwhile: say Free.
    Missed,
    /// A warm connection has input, its cell is claimed and the attention
    /// is the worker's own.
    Warm { cell: usize, conn: WarmConn },
}

/// A connection of the worker's own, after its first read.
pub enum Arrival {
    /// Its request is all there: serve it (its head is parsed already).
    Serve(Vec<u8>, FirstHead),
    /// Not the worker's to serve: hand it, with what was read, to the supervisor.
    HandOver(Vec<u8>),
    /// The client has gone.
    Gone,
    /// Nothing to read after all (a warm connection woke the worker
    /// spuriously).
    Nothing,
}

pub struct Accepter {
    /// The listeners, open for the worker's life (their numbers are in
    /// `watched` while the epoll set has them).
    listeners: Vec<OwnedFd>,
    watched: Vec<RawFd>,
    epoll: Epoll,
    /// The vault: the worker puts a copy of each connection of its own in
    /// `vault_in`, and takes it out of `vault_out` when it is done.
    vault_in: OwnedFd,
    vault_out: OwnedFd,
    next_id: u64,
    health_path: Option<String>,
    /// The warm connections, by cell (`None`: free, or being served).
    warm: Vec<Option<WarmConn>>,
    /// Warm cells the last wait found readable, not yet looked at.
    ready: VecDeque<usize>,
    /// How many cells it may use (`MONODON_WARM_CONNECTIONS`).
    warm_limit: usize,
    /// The first read's buffer, reused from one connection to the next.
    spare: Vec<u8>,
}

/// How much the first read of a connection takes.
const FIRST_READ: usize = 16 * 1024;

/// The ids of connections a worker accepted itself: the top bit set, so
/// they never meet the supervisor's.
const OWN_ID: u64 = 1 << 63;

impl Accepter {
    /// Takes the `count` listeners on fds 5.. and makes the vault; the
    /// vault's receiving end goes to the supervisor with Ready.
    pub fn new(
        count: u16,
        channel: BorrowedFd<'_>,
        health_path: Option<String>,
        warm_limit: usize,
    ) -> io::Result<Accepter> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(channel, EpollEvent::new(EpollFlags::EPOLLIN, CHANNEL))?;
        let mut listeners = Vec::new();
        for i in 0..i32::from(count) {
            let raw = env::FIRST_LISTENER + i;
            // SAFETY: the supervisor placed listener `i` on this fd for us
            // (`MONODON_LISTENERS`), and nothing else here claims it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
            // One free worker is woken per connection, not all of them.
            let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
            epoll.add(&fd, EpollEvent::new(flags, i as u64 + 1))?;
            listeners.push(fd);
        }
        let watched = listeners.iter().map(|l| l.as_raw_fd()).collect();
        let (vault_in, vault_out) =
            socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        Ok(Accepter {
            listeners,
            watched,
            epoll,
            vault_in,
            vault_out,
            next_id: 0,
            health_path,
            warm: (0..WARM_CELLS).map(|_| None).collect(),
            ready: VecDeque::new(),
            warm_limit: warm_limit.min(WARM_CELLS),
            spare: Vec::with_capacity(FIRST_READ),
        })
    }

    /// Whether it keeps connections warm (`FEATURE_WARM`).
    pub fn keeps_warm(&self) -> bool {
        self.warm_limit > 0
    }

    /// The listeners it still accepts from, to end a read-ahead when a new
    /// client waits on one.
    pub fn listeners(&self) -> &[RawFd] {
        &self.watched
    }

    /// The vault's end the supervisor keeps.
    pub fn vault_for_supervisor(&self) -> BorrowedFd<'_> {
        self.vault_out.as_fd()
    }

    /// Waits for the channel or a new connection. While the supervisor
    /// stops (draining), only the channel.
    pub fn wait(&mut self, slot: &Slot) -> io::Result<Wake> {
        let mut events = [EpollEvent::empty(); 16];
        loop {
            if slot.is_draining() {
                self.stop_accepting();
                return Ok(Wake::Channel);
            }
            while let Some(cell) = self.ready.pop_front() {
                if let Some(wake) = self.warm_ready(cell, slot) {
                    return Ok(wake);
                }
            }
            self.drop_taken_back(slot);
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let ready = &events[..n];
            if ready.iter().any(|e| e.data() == CHANNEL) {
                return Ok(Wake::Channel);
            }
            self.ready.extend(
                ready.iter().filter(|e| e.data() >= WARM_KEY).map(|e| (e.data() - WARM_KEY) as usize),
            );
            for e in ready.iter().filter(|e| e.data() < WARM_KEY) {
                let i = (e.data() - 1) as usize;
                if let Some(wake) = self.accept(i, slot) {
                    return Ok(wake);
                }
            }
        }
    }

    /// Warm cell `cell` had input: the worker's to serve if its attention
    /// is free and the supervisor has not taken the connection back.
    fn warm_ready(&mut self, cell: usize, slot: &Slot) -> Option<Wake> {
        let id = self.warm.get(cell)?.as_ref()?.id;
        if slot.warm_cell(cell) != id {
            self.let_go_warm(cell);
            return None;
        }
        if !slot.take_own() {
            // Held: the supervisor hands us something. Look again later.
            self.ready.push_front(cell);
            return slot.park().then_some(Wake::Channel);
        }
        match self.claim_warm(slot, cell) {
            Some(conn) => Some(Wake::Warm { cell, conn }),
            None => slot.end_own().then_some(Wake::Missed),
        }
    }

    /// Claims warm cell `cell` and takes out its connection, to serve its
    /// request; `None` if the supervisor has taken it back (our copy is
    /// closed then).
    pub fn claim_warm(&mut self, slot: &Slot, cell: usize) -> Option<WarmConn> {
        let id = self.warm.get(cell)?.as_ref()?.id;
        if !slot.warm_claim(cell, id) {
            self.let_go_warm(cell);
            return None;
        }
        self.warm[cell].take()
    }

    /// A free warm cell, if the worker may keep one more connection.
    pub fn free_warm_cell(&mut self, slot: &Slot) -> Option<usize> {
        if slot.is_draining() {
            return None;
        }
        self.drop_taken_back(slot);
        (0..self.warm_limit).find(|&c| self.warm[c].is_none() && slot.warm_cell(c) == 0)
    }

    /// Keeps `conn` warm in cell `cell` (free, by `free_warm_cell`, or the
    /// one it was just served from), finished now.
    pub fn keep_warm(&mut self, slot: &Slot, cell: usize, mut conn: WarmConn) -> io::Result<()> {
        if !conn.registered {
            self.epoll.add(&conn.fd, EpollEvent::new(EpollFlags::EPOLLIN, WARM_KEY + cell as u64))?;
            conn.registered = true;
        }
        slot.warm_keep(cell, conn.id);
        self.warm[cell] = Some(conn);
        Ok(())
    }

    /// Puts back a warm connection that had nothing to read after all,
    /// unclaimed.
    pub fn put_back_warm(&mut self, slot: &Slot, cell: usize, conn: WarmConn) {
        slot.warm_unclaim(cell, conn.id);
        self.warm[cell] = Some(conn);
    }

    /// Forgets a warm connection being given back or taken back: out of the
    /// epoll set (the supervisor's copy keeps it in there otherwise), then
    /// closed.
    pub fn forget_warm(&self, fd: OwnedFd) {
        let _ = self.epoll.delete(&fd);
        drop(fd);
    }

    fn let_go_warm(&mut self, cell: usize) {
        if let Some(conn) = self.warm.get_mut(cell).and_then(Option::take) {
            self.forget_warm(conn.fd);
        }
    }

    /// The cells of the warm connections that have input, looked at
    /// without waiting (once the worker has served one of the supervisor's
    /// connections).
    pub fn ready_warm(&self) -> Vec<usize> {
        if self.warm.iter().all(Option::is_none) {
            return Vec::new();
        }
        let mut events = [EpollEvent::empty(); 16];
        let n = self.epoll.wait(&mut events, EpollTimeout::ZERO).unwrap_or(0);
        events[..n]
            .iter()
            .filter(|e| e.data() >= WARM_KEY)
            .map(|e| (e.data() - WARM_KEY) as usize)
            .filter(|&cell| self.warm.get(cell).is_some_and(Option::is_some))
            .collect()
    }

    /// Gives warm cell `cell`'s connection back unread: its cell emptied
    /// and our copy closed. Its id and requests served, unless the
    /// supervisor took it back first.
    pub fn release_warm(&mut self, slot: &Slot, cell: usize) -> Option<(u64, u32)> {
        let conn = self.warm.get_mut(cell).and_then(Option::take)?;
        let released = slot.warm_release(cell, conn.id).then_some((conn.id, conn.served));
        self.forget_warm(conn.fd);
        released
    }

    /// Lets go of the warm connections the supervisor has taken back.
    fn drop_taken_back(&mut self, slot: &Slot) {
        for cell in 0..WARM_CELLS {
            if self.warm[cell].as_ref().is_some_and(|c| slot.warm_cell(cell) != c.id) {
                self.let_go_warm(cell);
            }
        }
    }

    /// Accepts from listener `i` if the worker's attention is free; if the
    /// supervisor holds it, parks (the connection is left to another
    /// worker, or the supervisor).
    fn accept(&mut self, i: usize, slot: &Slot) -> Option<Wake> {
        let listener = self.listeners.get(i)?;
        if !self.watched.contains(&listener.as_raw_fd()) {
            return None;
        }
        if !slot.take_own() {
            // Held: sleep on the channel rather than be woken by this
            // listener again and again. Let go meanwhile: try again.
            return slot.park().then_some(Wake::Channel);
        }
        let accepted = monodon_proto::net::accept(listener.as_fd());
        let (fd, peer) = match accepted {
            Ok(Some(conn)) => conn,
            Ok(None) => return slot.end_own().then_some(Wake::Missed),
            Err(e) => {
                let missed = slot.end_own();
                let transient =
                    [nix::libc::EAGAIN, nix::libc::EINTR, nix::libc::ECONNABORTED, nix::libc::EPROTO];
                if !e.raw_os_error().is_some_and(|n| transient.contains(&n)) {
                    // EINVAL: the supervisor stopped listening (a stop). Out of
                    // descriptors or memory: rather than spin on a listener we
                    // cannot take from, leave it to the supervisor (its sweep
                    // sees connections wait and accepts them).
                    if e.raw_os_error() == Some(nix::libc::EINVAL) {
                        debug!("accept: {e}; leaving listener {i}");
                    } else {
                        log::error!("accept: {e}; this worker stops accepting from listener {i}");
                    }
                    self.unwatch(i);
                }
                return missed.then_some(Wake::Missed);
            }
        };
        slot.count_accepted();
        Some(Wake::Accepted { fd, peer })
    }

    fn stop_accepting(&mut self) {
        for i in 0..self.listeners.len() {
            self.unwatch(i);
        }
    }

    fn unwatch(&mut self, i: usize) {
        let raw = self.listeners[i].as_raw_fd();
        if self.watched.contains(&raw) {
            let _ = self.epoll.delete(&self.listeners[i]);
            self.watched.retain(|&w| w != raw);
        }
    }

    /// A new id for a connection of our own.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        OWN_ID | self.next_id
    }

    /// Puts a copy of `conn` in the vault before serving it.
    pub fn deposit(&self, conn: BorrowedFd<'_>, id: u64, written: u64) -> io::Result<()> {
        let mut msg = Vec::with_capacity(18);
        Deposit { conn_id: id, written }.encode(&mut msg);
        wire::send(self.vault_in.as_fd(), &msg, Some(conn))
    }

    /// Takes the copy out again (and closes it).
    pub fn withdraw(&self) {
        let mut buf = [0u8; 32];
        let _ = wire::recv_nonblocking(self.vault_out.as_fd(), &mut buf);
    }

    /// Reads what the client has sent with the accept, and decides whether
    /// the worker may serve it: exactly when the supervisor would hand it
    /// over (a complete, sound head, and a small body all there), and it is
    /// no health check (the supervisor answers those).
    /// The bytes of an `Arrival` go back with [`Accepter::recycle`].
    pub fn first_read(&mut self, conn: BorrowedFd<'_>, limits: &Limits) -> Arrival {
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        buf.reserve(FIRST_READ);
        let n = loop {
            match read_into(conn, &mut buf) {
                Ok(0) => break 0,
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    self.spare = buf;
                    return Arrival::Nothing;
                }
                Err(_) => break 0,
            }
        };
        if n == 0 {
            self.spare = buf;
            return Arrival::Gone;
        }
        // A read that filled the buffer may have left more behind.
        let head = PendingRequest::check_once(&buf, limits).ok().flatten().filter(|_| n < FIRST_READ);
        let health = self.health_path.as_deref().is_some_and(|p| http::is_health_check(&buf, p).is_some());
        match head.filter(|_| !health).map(|h| FirstHead::new(&h)) {
            Some(first) => Arrival::Serve(buf, first),
            None => Arrival::HandOver(buf),
        }
    }

    /// Takes back the buffer of an `Arrival`, for the next first read.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        // One grown by a large body is not kept.
        if buf.capacity() <= 4 * FIRST_READ {
            self.spare = buf;
        }
    }
}

/// One read(2) into `buf`'s spare capacity, appended: no zeroing first.
fn read_into(conn: BorrowedFd<'_>, buf: &mut Vec<u8>) -> nix::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: read(2) writes at most `spare.len()` bytes at the start of
    // the spare capacity, which `buf` owns and nothing else borrows.
    let n = unsafe { nix::libc::read(conn.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
    let n = usize::try_from(nix::errno::Errno::result(n)?).unwrap_or(0);
    // SAFETY: those `n` bytes were written by the read just above.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Hands connection `conn` to the supervisor (Adopt).
pub fn hand_over(
    channel: BorrowedFd<'_>,
    conn: BorrowedFd<'_>,
    id: u64,
    served: u32,
    keep: bool,
    leftover: &[u8],
) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + leftover.len());
    FromWorker::Adopt { conn_id: id, served, keep, leftover }.encode(&mut msg);
    wire::send(channel, &msg, Some(conn))
}

/// Whether the client has sent anything not yet read (a close then needs
/// lingering, which the supervisor does, or the kernel would reset).
pub fn input_pending(conn: BorrowedFd<'_>) -> bool {
    let mut byte = [0u8; 1];
    let flags = socket::MsgFlags::MSG_PEEK | socket::MsgFlags::MSG_DONTWAIT;
    matches!(socket::recv(conn.as_raw_fd(), &mut byte, flags), Ok(n) if n > 0)
}
