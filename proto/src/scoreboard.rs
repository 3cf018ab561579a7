//! One shared-memory page per worker, written by the worker and read by the
//! supervisor.
//!
//! It answers questions the supervisor must be able to ask even after the
//! worker has died: did the worker write any response bytes on the
//! connection it held (502 or a plain close)? It costs no message and no
//! system call on the request path: the worker bumps atomics.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::histogram::{self, Histogram};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{madvise, mmap, munmap, MapFlags, MmapAdvise, ProtFlags};

/// What a worker publishes. Only atomics, so both processes may touch it
/// at any time.
#[repr(C)]
#[derive(Debug)]
pub struct Slot {
    /// Response bytes written since the worker started.
    pub bytes_written: AtomicU64,
    /// Requests completed since the worker started.
    pub requests: AtomicU64,
    /// When the request being served started ([`monotonic_ms`]), 0 between
    /// requests. The supervisor's stuck-worker timeout reads it.
    pub request_started_ms: AtomicU64,
    /// Set by the supervisor when it is stopping: finish the current
    /// request with `Connection: close`.
    pub draining: AtomicU64,
    /// Set by the supervisor while connections wait for a free worker: a
    /// worker must then not linger on its connection for a next request.
    pub others_waiting: AtomicU64,
    /// A sequence lock over `request_len` and `request_line`: odd while the
    /// worker is writing them.
    pub request_seq: AtomicU64,
    pub request_len: AtomicU64,
    /// `METHOD target` of the request being served (cut at its capacity).
    pub request_line: [AtomicU8; REQUEST_LINE_MAX],
    /// The ids of connections the supervisor has sent ahead to this busy
    /// worker that nobody has claimed yet (0: free cell). The worker claims
    /// one, or the supervisor takes it back, by swapping its id for 0:
    /// exactly one of them succeeds. Two cells, because the next connection
    /// may be sent ahead before the worker has claimed the one before,
    /// which it is about to serve; `ahead_third` (at the end: fields keep
    /// their offsets across versions) for a second one sent ahead.
    pub ahead: [AtomicU64; 2],
    /// The connection the worker is serving (its id; 0 before the first),
    /// and `bytes_written` when it started it: whether any response byte
    /// went out on it, exactly, even for one sent ahead.
    pub conn_id: AtomicU64,
    pub conn_written_base: AtomicU64,
    /// Set by the supervisor while the worker's generation cannot make
    /// workers (its template is down): the worker does not retire at its
    /// max-requests limit, so the generation keeps the workers it has.
    /// Cleared, the worker retires at its next request if past the limit.
    pub hold_limit: AtomicU64,
    /// Responses the worker sent, by status class: 1xx at index 0 to 5xx
    /// at index 4 (its own refusals of malformed requests included).
    pub responses: [AtomicU64; 5],
    /// How long the requests it served took, from a complete head to the
    /// last byte of the response: counts per [`histogram`] bucket (not
    /// cumulative), and their sum in microseconds.
    pub duration_counts: [AtomicU64; histogram::BUCKETS],
    pub duration_sum_us: AtomicU64,
    /// Whose the worker's attention is, for a worker that accepts
    /// connections itself (`FEATURE_ACCEPT`): [`attention`]'s values.
    /// The worker takes a connection from a listener only by swapping
    /// `FREE` for `OWN`; the supervisor hands it one only by swapping
    /// `FREE` for `HELD`: exactly one of them wins.
    pub attention: AtomicU64,
    /// Connections the worker accepted itself (served or handed over).
    pub accepted: AtomicU64,
    /// A third ahead cell, for a worker that takes two connections ahead
    /// (`FEATURE_AHEAD_TWO`): two sent ahead, and the one a Done made
    /// current before the worker claimed it. Claimed and taken back like
    /// the other two.
    pub ahead_third: AtomicU64,
    /// The worker's warm connections (`FEATURE_WARM`): each cell holds the
    /// id of a connection the worker keeps between requests (0: free), with
    /// [`WARM_CLAIMED`] set while it serves a request on it. The worker
    /// claims by swapping the id for the id with the bit; the supervisor
    /// takes one back by swapping the id for 0: exactly one of them wins.
    pub warm: [AtomicU64; WARM_CELLS],
    /// For each warm cell, when the worker last finished a request on it
    /// ([`monotonic_ms`]): the keep-alive timeout counts from there.
    pub warm_done_ms: [AtomicU64; WARM_CELLS],
}

/// How many connections a worker may keep warm.
pub const WARM_CELLS: usize = 32;

/// Set in a warm cell while the worker serves a request on its connection.
/// (The supervisor's connection ids never reach it.)
pub const WARM_CLAIMED: u64 = 1 << 62;

/// The values of [`Slot::attention`].
pub mod attention {
    /// The supervisor's (the start, and from its claim until it lets the
    /// worker go again): the worker serves what its channel brings and
    /// accepts nothing. Zero, so a fresh page holds a worker back until its
    /// generation serves.
    pub const HELD: u64 = 0;
    /// Nobody's: the worker waits on its channel and the listeners.
    pub const FREE: u64 = 1;
    /// The worker serves a connection it accepted itself.
    pub const OWN: u64 = 2;
    /// As `OWN`, and the supervisor has asked for the worker: when it is
    /// done it sets `HELD` and sends Free.
    pub const WATCHED: u64 = 3;
    /// As `HELD`, and the worker, woken by a listener it may not take
    /// from, sleeps on its channel: letting it go takes a Go message.
    pub const PARKED: u64 = 4;
}

/// What the supervisor's claim on an idle worker found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The worker is the supervisor's until it lets it go.
    Held,
    /// The worker is serving a connection of its own; it sends Free when done.
    Own,
}

/// Responses by status class (1xx at index 0 ... 5xx at 4) and the
/// durations of the requests they answered: one worker's, or many added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseCounts {
    pub by_class: [u64; 5],
    pub durations: Histogram,
}

impl ResponseCounts {
    /// Counts a response with `status` (no duration: its request was not served).
    pub fn count(&mut self, status: u16) {
        if let Some(class) = status_class(status) {
            self.by_class[class] += 1;
        }
    }

    pub fn merge(&mut self, other: &ResponseCounts) {
        for (mine, theirs) in self.by_class.iter_mut().zip(other.by_class) {
            *mine += theirs;
        }
        self.durations.merge(&other.durations);
    }
}

/// The index of `status`'s class (1xx: 0 ... 5xx: 4); `None` outside 100-599.
pub fn status_class(status: u16) -> Option<usize> {
    (100..600).contains(&status).then(|| usize::from(status / 100 - 1))
}

/// Room for the request line in a slot.
pub const REQUEST_LINE_MAX: usize = 256;

/// Where each field of a [`Slot`] lies, as PROTOCOL.md gives it: workers in
/// other languages map the page and use these offsets. Checked against the
/// struct at compile time and against PROTOCOL.md by a test.
pub const LAYOUT: [(usize, &str); 20] = [
    (0, "bytes_written"),
    (8, "requests"),
    (16, "request_started_ms"),
    (24, "draining"),
    (32, "others_waiting"),
    (40, "request_seq"),
    (48, "request_len"),
    (56, "request_line"),
    (312, "ahead"),
    (328, "conn_id"),
    (336, "conn_written_base"),
    (344, "hold_limit"),
    (352, "responses"),
    (392, "duration_counts"),
    (528, "duration_sum_us"),
    (536, "attention"),
    (544, "accepted"),
    (552, "ahead_third"),
    (560, "warm"),
    (816, "warm_done_ms"),
];

const _: () = {
    use std::mem::offset_of;
    let offsets = [
        offset_of!(Slot, bytes_written),
        offset_of!(Slot, requests),
        offset_of!(Slot, request_started_ms),
        offset_of!(Slot, draining),
        offset_of!(Slot, others_waiting),
        offset_of!(Slot, request_seq),
        offset_of!(Slot, request_len),
        offset_of!(Slot, request_line),
        offset_of!(Slot, ahead),
        offset_of!(Slot, conn_id),
        offset_of!(Slot, conn_written_base),
        offset_of!(Slot, hold_limit),
        offset_of!(Slot, responses),
        offset_of!(Slot, duration_counts),
        offset_of!(Slot, duration_sum_us),
        offset_of!(Slot, attention),
        offset_of!(Slot, accepted),
        offset_of!(Slot, ahead_third),
        offset_of!(Slot, warm),
        offset_of!(Slot, warm_done_ms),
    ];
    let mut i = 0;
    while i < LAYOUT.len() {
        assert!(
            offsets[i] == LAYOUT[i].0,
            "a Slot field moved: PROTOCOL.md and other languages depend on it"
        );
        i += 1;
    }
    assert!(std::mem::size_of::<Slot>() == 1072, "the Slot grew or shrank: say so in PROTOCOL.md");
    assert!(std::mem::size_of::<Slot>() <= 4096, "a Slot must fit its page");
};

impl Slot {
    pub fn add_written(&self, n: usize) {
        self.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// Worker side: counts a response with `status`, and how long its
    /// request took if the worker served it (`None`: refused unread).
    pub fn count_response(&self, status: u16, took: Option<std::time::Duration>) {
        if let Some(class) = status_class(status) {
            self.responses[class].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(took) = took {
            let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            self.duration_counts[Histogram::bucket_of(us)].fetch_add(1, Ordering::Relaxed);
            self.duration_sum_us.fetch_add(us, Ordering::Relaxed);
        }
    }

    /// Supervisor side: the responses counted so far, by class, and the
    /// requests' durations.
    pub fn responses(&self) -> ResponseCounts {
        ResponseCounts {
            by_class: std::array::from_fn(|i| self.responses[i].load(Ordering::Relaxed)),
            durations: Histogram {
                counts: std::array::from_fn(|i| self.duration_counts[i].load(Ordering::Relaxed)),
                sum_us: self.duration_sum_us.load(Ordering::Relaxed),
            },
        }
    }

    /// Worker side: takes its attention for a connection of its own, if
    /// nobody has it.
    pub fn take_own(&self) -> bool {
        self.attention
            .compare_exchange(attention::FREE, attention::OWN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Worker side: counts a connection it accepted.
    pub fn count_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections the worker accepted itself.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Worker side: done with its own connection. True if the supervisor
    /// asked for it meanwhile: it is the supervisor's now (send Free).
    pub fn end_own(&self) -> bool {
        match self.attention.compare_exchange(
            attention::OWN,
            attention::FREE,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => false,
            Err(_) => {
                self.attention.store(attention::HELD, Ordering::Release);
                true
            }
        }
    }

    /// Worker side: a listener woke it while the supervisor holds it: it
    /// sleeps on its channel until a message (Go, when it is let go).
    /// False if it has been let go meanwhile (it may accept).
    pub fn park(&self) -> bool {
        match self.attention.compare_exchange(
            attention::HELD,
            attention::PARKED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => true,
            Err(seen) => seen == attention::PARKED,
        }
    }

    /// Supervisor side: claims an idle worker before handing it anything
    /// or letting it go. A worker on a connection of its own is asked to
    /// say Free when it is done.
    pub fn claim(&self) -> Claim {
        use attention::*;
        let mut seen = self.attention.load(Ordering::Acquire);
        loop {
            let (next, claim) = match seen {
                FREE => (HELD, Claim::Held),
                OWN => (WATCHED, Claim::Own),
                WATCHED => return Claim::Own,
                // HELD, or a value no worker writes: ours already.
                _ => return Claim::Held,
            };
            match self.attention.compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return claim,
                Err(now) => seen = now,
            }
        }
    }

    /// Supervisor side: lets an idle worker accept on its own again; true
    /// if it was parked (send it Go).
    pub fn let_go(&self) -> bool {
        use attention::*;
        let swap = |from| self.attention.compare_exchange(from, FREE, Ordering::AcqRel, Ordering::Acquire);
        swap(HELD).is_err() && swap(PARKED).is_ok()
    }

    /// Worker side: starts serving connection `conn_id`.
    pub fn begin_connection(&self, conn_id: u64) {
        self.conn_written_base.store(self.written(), Ordering::Relaxed);
        self.conn_id.store(conn_id, Ordering::Release);
    }

    /// Worker side: the connection it began last and its byte count then,
    /// to put back with [`Slot::resume_connection`].
    pub fn current_connection(&self) -> (u64, u64) {
        (self.conn_id.load(Ordering::Relaxed), self.conn_written_base.load(Ordering::Relaxed))
    }

    /// Worker side: back to a connection it began before (as
    /// [`Slot::current_connection`] gave it) after serving another in
    /// between, so that what the supervisor reads of it at a death is
    /// what it was.
    pub fn resume_connection(&self, (conn_id, written_base): (u64, u64)) {
        self.conn_written_base.store(written_base, Ordering::Relaxed);
        self.conn_id.store(conn_id, Ordering::Release);
    }

    /// Supervisor side: has the worker written any response byte on
    /// connection `conn_id` since it was handed over? `written_at_handover`
    /// is the worker's byte count when the supervisor sent it.
    pub fn wrote_on(&self, conn_id: u64, written_at_handover: u64) -> bool {
        wrote_since_handover(WriteCounters {
            current_conn: self.conn_id.load(Ordering::Acquire),
            written: self.written(),
            conn_written_base: self.conn_written_base.load(Ordering::Relaxed),
            conn_id,
            written_at_handover,
        })
    }

    pub fn begin_request(&self) {
        self.request_started_ms.store(monotonic_ms().max(1), Ordering::Relaxed);
    }

    pub fn end_request(&self) {
        self.request_started_ms.store(0, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// How long the current request has run, if one is being served.
    pub fn request_age_ms(&self) -> Option<u64> {
        match self.request_started_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(monotonic_ms().saturating_sub(t)),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) != 0
    }

    pub fn set_draining(&self) {
        self.draining.store(1, Ordering::Relaxed);
    }

    /// Supervisor side: the worker is not to retire at its limit while held.
    pub fn set_hold_limit(&self, hold: bool) {
        self.hold_limit.store(u64::from(hold), Ordering::Relaxed);
    }

    /// Worker side: may it retire at its max-requests limit now?
    pub fn limit_held(&self) -> bool {
        self.hold_limit.load(Ordering::Relaxed) != 0
    }

    /// Publishes the request the worker is starting (worker side).
    /// Publishes the request line, given in parts (`METHOD`, ` `, `target`:
    /// no allocation to join them), cut at [`REQUEST_LINE_MAX`].
    pub fn set_request_line(&self, parts: &[&[u8]]) {
        let line = parts.iter().flat_map(|p| p.iter()).take(REQUEST_LINE_MAX);
        self.request_seq.fetch_add(1, Ordering::AcqRel);
        let mut len = 0;
        for (cell, &b) in self.request_line.iter().zip(line) {
            cell.store(b, Ordering::Relaxed);
            len += 1;
        }
        self.request_len.store(len, Ordering::Relaxed);
        self.request_seq.fetch_add(1, Ordering::Release);
    }

    /// The request line last published, if it can be read consistently
    /// (supervisor side; gives up rather than wait on a busy writer).
    pub fn request_line(&self) -> Option<String> {
        for _ in 0..8 {
            let before = self.request_seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let len = (self.request_len.load(Ordering::Relaxed) as usize).min(REQUEST_LINE_MAX);
            let bytes: Vec<u8> = self.request_line[..len].iter().map(|c| c.load(Ordering::Relaxed)).collect();
            std::sync::atomic::fence(Ordering::Acquire);
            if self.request_seq.load(Ordering::Relaxed) == before {
                return (before > 0).then(|| String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        None
    }

    /// The request being served right now, if the worker has started one.
    pub fn current_request(&self) -> Option<String> {
        self.request_age_ms()?;
        self.request_line()
    }

    /// Connections wait for a free worker, or one was sent ahead to this
    /// worker: it must not linger on its current client.
    pub fn others_waiting(&self) -> bool {
        self.others_waiting.load(Ordering::Relaxed) != 0 || self.has_ahead()
    }

    /// Every ahead cell (the two at offset 312 and the third at 552).
    fn ahead_cells(&self) -> impl Iterator<Item = &AtomicU64> {
        self.ahead.iter().chain(std::iter::once(&self.ahead_third))
    }

    /// Worker side: a connection was sent ahead to this worker and not
    /// taken back, so its Assign is in the channel (or on its way): the
    /// worker may read the channel without waiting for anything else.
    pub fn has_ahead(&self) -> bool {
        self.ahead_cells().any(|c| c.load(Ordering::Acquire) != 0)
    }

    /// Supervisor side: records connection `conn_id` as sent ahead; false
    /// if every cell is taken (then it must not be sent).
    pub fn offer_ahead(&self, conn_id: u64) -> bool {
        self.ahead_cells().any(|c| c.compare_exchange(0, conn_id, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }

    /// Worker side: takes connection `conn_id`, sent ahead; false if the
    /// supervisor took it back first.
    pub fn claim_ahead(&self, conn_id: u64) -> bool {
        self.swap_out(conn_id)
    }

    /// Supervisor side: takes back connection `conn_id`; false if the
    /// worker has claimed it already.
    pub fn revoke_ahead(&self, conn_id: u64) -> bool {
        self.swap_out(conn_id)
    }

    fn swap_out(&self, conn_id: u64) -> bool {
        conn_id != 0
            && self
                .ahead_cells()
                .any(|c| c.compare_exchange(conn_id, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }

    pub fn set_others_waiting(&self, waiting: bool) {
        self.others_waiting.store(u64::from(waiting), Ordering::Relaxed);
    }

    /// The id in warm cell `cell` (with [`WARM_CLAIMED`] while served).
    pub fn warm_cell(&self, cell: usize) -> u64 {
        self.warm.get(cell).map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Worker side: keeps connection `conn_id` in warm cell `cell`, which
    /// it knows to be free, finished now.
    pub fn warm_keep(&self, cell: usize, conn_id: u64) {
        if let (Some(c), Some(done)) = (self.warm.get(cell), self.warm_done_ms.get(cell)) {
            done.store(monotonic_ms(), Ordering::Relaxed);
            c.store(conn_id, Ordering::Release);
        }
    }

    /// Worker side: unclaims warm connection `conn_id`, which had nothing
    /// to read after all (its last request's time stands).
    pub fn warm_unclaim(&self, cell: usize, conn_id: u64) {
        if let Some(c) = self.warm.get(cell) {
            c.store(conn_id, Ordering::Release);
        }
    }

    /// Worker side: claims warm connection `conn_id` before reading from
    /// it; false if the supervisor took it back first.
    pub fn warm_claim(&self, cell: usize, conn_id: u64) -> bool {
        self.warm.get(cell).is_some_and(|c| {
            c.compare_exchange(conn_id, conn_id | WARM_CLAIMED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
        })
    }

    /// Worker side: empties a cell it has claimed (the connection goes back
    /// to the supervisor in a Cool).
    pub fn warm_clear(&self, cell: usize) {
        if let Some(c) = self.warm.get(cell) {
            c.store(0, Ordering::Release);
        }
    }

    /// Worker side: gives warm connection `conn_id` back unread (it has a
    /// request while the worker is busy with one of the supervisor's);
    /// false if the supervisor took it back first.
    pub fn warm_release(&self, cell: usize, conn_id: u64) -> bool {
        self.warm_revoke(cell, conn_id)
    }

    /// Supervisor side: takes warm connection `conn_id` back; false if the
    /// worker is serving a request on it (or gave it back).
    pub fn warm_revoke(&self, cell: usize, conn_id: u64) -> bool {
        conn_id != 0
            && self
                .warm
                .get(cell)
                .is_some_and(|c| c.compare_exchange(conn_id, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    }

    /// How long ago the worker last finished a request on warm cell `cell`.
    pub fn warm_idle_ms(&self, cell: usize) -> u64 {
        let done = self.warm_done_ms.get(cell).map_or(0, |d| d.load(Ordering::Relaxed));
        monotonic_ms().saturating_sub(done)
    }
}

/// What `wrote_on` decides from: a worker's counters and the hand-over's.
#[derive(Debug, Clone, Copy)]
pub struct WriteCounters {
    /// The connection the worker last began (0: it does not say).
    pub current_conn: u64,
    /// Bytes it has written in all.
    pub written: u64,
    /// `written` when it began `current_conn`.
    pub conn_written_base: u64,
    /// The connection asked about, and `written` when it was handed over.
    pub conn_id: u64,
    pub written_at_handover: u64,
}

/// Whether any response byte went out on a connection since its hand-over.
///
/// Both conditions are needed. The connection must be the one the worker
/// began last, with bytes since it began: bytes on an earlier connection
/// (the one before a connection sent ahead) do not count. And there must be
/// bytes since the hand-over: a keep-alive connection handed to the same
/// worker again is still "current" from the previous round until the
/// worker begins it, with that round's bytes. A worker that does not say
/// which connection it serves is judged by the byte count alone.
pub fn wrote_since_handover(c: WriteCounters) -> bool {
    let since_handover = c.written != c.written_at_handover;
    match c.current_conn {
        0 => since_handover,
        current if current == c.conn_id => since_handover && c.written != c.conn_written_base,
        // It never began this one.
        _ => false,
    }
}

/// Milliseconds on CLOCK_MONOTONIC: the same clock in every process, so a
/// time written by a worker means the same to the supervisor.
pub fn monotonic_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

const LEN: usize = 4096;

/// A mapping of one worker's [`Slot`].
#[derive(Debug)]
pub struct Scoreboard {
    ptr: NonNull<Slot>,
    fd: OwnedFd,
}

impl Scoreboard {
    /// A new, zeroed page (supervisor side). Its fd is close-on-exec; the
    /// spawner hands a copy to the worker explicitly.
    pub fn create() -> io::Result<Scoreboard> {
        let fd = memfd_create("monodon-scoreboard", MFdFlags::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&fd, LEN as i64)?;
        Scoreboard::map(fd)
    }

    /// Maps a page received from the supervisor (worker side).
    pub fn map(fd: OwnedFd) -> io::Result<Scoreboard> {
        let len = NonZeroUsize::new(LEN).expect("LEN is not zero");
        let stat = nix::sys::stat::fstat(&fd)?;
        if (stat.st_size as usize) < LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "scoreboard fd is too small"));
        }
        // SAFETY: a fresh shared mapping of a memfd we hold; the kernel picks
        // the address, so no existing memory is affected.
        let ptr = unsafe {
            mmap(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &fd, 0)?
        };
        // Processes the worker's app forks do not inherit the mapping, so
        // once the worker has been reaped nobody writes the page and the
        // supervisor may give it to the next worker (`reset`).
        // SAFETY: advice on exactly the mapping made above.
        unsafe { madvise(ptr, LEN, MmapAdvise::MADV_DONTFORK)? };
        Ok(Scoreboard { ptr: ptr.cast(), fd })
    }

    /// Zeroes the page for another worker (supervisor side, once the worker
    /// that had it has been reaped).
    pub fn reset(&self) {
        let Slot {
            bytes_written,
            requests,
            request_started_ms,
            draining,
            others_waiting,
            request_seq,
            request_len,
            request_line,
            ahead,
            conn_id,
            conn_written_base,
            hold_limit,
            responses,
            duration_counts,
            duration_sum_us,
            attention,
            accepted,
            ahead_third,
            warm,
            warm_done_ms,
        } = self.slot();
        let words = [bytes_written, requests, request_started_ms, draining, others_waiting, request_seq];
        let more = [
            request_len,
            conn_id,
            conn_written_base,
            hold_limit,
            duration_sum_us,
            attention,
            accepted,
            ahead_third,
        ];
        for word in words
            .into_iter()
            .chain(more)
            .chain(ahead)
            .chain(responses)
            .chain(duration_counts)
            .chain(warm)
            .chain(warm_done_ms)
        {
            word.store(0, Ordering::Relaxed);
        }
        for byte in request_line {
            byte.store(0, Ordering::Relaxed);
        }
    }

    pub fn slot(&self) -> &Slot {
        // SAFETY: the page is mapped for as long as `self` lives, is page
        // aligned, large enough for a Slot, starts zeroed (a valid Slot: all
        // atomics), and is only ever accessed through atomics.
        unsafe { self.ptr.as_ref() }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Scoreboard {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly LEN bytes at ptr and no reference into
        // the mapping outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PROTOCOL.md's scoreboard table gives the offsets of [`LAYOUT`].
    /// The attention cell: the worker takes its attention only when free,
    /// the supervisor's claim and the worker's own exclude each other, and
    /// each way back says what the other must be told (Free, Go).
    #[test]
    fn attention_passes_between_the_two_sides_by_compare_and_swap() {
        let board = Scoreboard::create().unwrap();
        let slot = board.slot();
        assert!(!slot.take_own(), "a new worker is held until let go");
        assert!(slot.park(), "woken while held, it parks");
        assert!(slot.park(), "and stays parked");
        assert_eq!(slot.claim(), Claim::Held, "parked is the supervisor's");
        assert!(slot.let_go(), "letting a parked worker go says: send Go");
        assert!(!slot.park(), "free: no parking");
        assert!(slot.take_own());
        assert!(!slot.take_own(), "one connection of its own at a time");
        assert!(!slot.end_own(), "nobody asked: no Free");
        assert!(slot.take_own());
        assert_eq!(slot.claim(), Claim::Own, "the supervisor finds it busy");
        assert_eq!(slot.claim(), Claim::Own, "and again, still watched");
        assert!(slot.end_own(), "asked for: it says Free");
        assert!(!slot.take_own(), "and is the supervisor's");
        assert!(!slot.let_go(), "held, not parked: no Go");
        assert_eq!(slot.claim(), Claim::Held);
        assert_eq!(slot.claim(), Claim::Held, "a claim of a held worker holds");
        slot.let_go();
        assert!(slot.take_own());
        board.reset();
        assert!(!board.slot().take_own(), "a reused page holds its next worker");
    }

    #[test]
    fn protocol_md_gives_the_layout() {
        let protocol = include_str!("../../PROTOCOL.md");
        let table = protocol.split("The memfd on fd 4 holds").nth(1).expect("the scoreboard section");
        let documented: Vec<usize> = table
            .lines()
            .skip_while(|l| !l.starts_with("| offset"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.split('|').nth(1).unwrap().trim().parse().expect("an offset"))
            .collect();
        let ours: Vec<usize> = LAYOUT.iter().map(|(offset, _)| *offset).collect();
        assert_eq!(documented, ours);
    }

    #[test]
    fn two_mappings_share_the_counters() {
        let a = Scoreboard::create().unwrap();
        let b = Scoreboard::map(a.fd().try_clone_to_owned().unwrap()).unwrap();
        b.slot().add_written(5);
        assert_eq!(a.slot().written(), 5);
        assert_eq!(a.slot().request_line(), None);
        b.slot().set_request_line(&[b"GET", b" ", b"/x"]);
        assert_eq!(a.slot().request_line().as_deref(), Some("GET /x"));
        b.slot().set_request_line(&[&[b'a'; 400]]);
        assert_eq!(a.slot().request_line().map(|l| l.len()), Some(REQUEST_LINE_MAX));
    }

    /// A connection served in between another's response and its report
    /// leaves the scoreboard naming the first again: written on, so a death
    /// now costs it no 502.
    #[test]
    fn a_connection_resumed_after_another_in_between_reads_as_written_on() {
        let board = Scoreboard::create().unwrap();
        let slot = board.slot();
        let handed_over_at = slot.written();
        slot.begin_connection(7);
        assert!(!slot.wrote_on(7, handed_over_at), "nothing written yet");
        slot.add_written(100);
        let seven = slot.current_connection();
        slot.begin_connection(9);
        slot.add_written(50);
        assert!(!slot.wrote_on(7, handed_over_at), "the board names 9 now");
        slot.resume_connection(seven);
        assert!(slot.wrote_on(7, handed_over_at), "7 again, its response out");
        assert!(!slot.wrote_on(9, handed_over_at + 100), "9 is not the current one");
    }

    #[test]
    fn a_reset_page_is_as_a_fresh_one() {
        let board = Scoreboard::create().unwrap();
        // Every byte of the slot set, through the atomics.
        let slot = board.slot();
        // SAFETY: a Slot is atomics only, so its bytes may be viewed as
        // AtomicU8s; the view ends before `reset` runs.
        let bytes = unsafe {
            std::slice::from_raw_parts(slot as *const Slot as *const AtomicU8, std::mem::size_of::<Slot>())
        };
        bytes.iter().for_each(|b| b.store(0xa5, Ordering::Relaxed));
        board.reset();
        assert!(bytes.iter().all(|b| b.load(Ordering::Relaxed) == 0), "a field was left as it was");
        assert_eq!(slot.request_line(), None);
    }

    #[test]
    fn a_connection_sent_ahead_is_claimed_or_revoked_never_both() {
        let supervisor = Scoreboard::create().unwrap();
        let worker = Scoreboard::map(supervisor.fd().try_clone_to_owned().unwrap()).unwrap();
        let (s, w) = (supervisor.slot(), worker.slot());
        assert!(!w.others_waiting());
        assert!(s.offer_ahead(7));
        assert!(w.others_waiting(), "a connection waits for this worker");
        assert!(w.claim_ahead(7));
        assert!(!s.revoke_ahead(7), "already claimed");
        assert!(s.offer_ahead(8));
        assert!(s.revoke_ahead(8));
        assert!(!w.claim_ahead(8), "already taken back");
        // Two may wait ahead while the worker has not yet claimed the one
        // it is about to serve; a fourth must wait for a free cell.
        assert!(s.offer_ahead(9));
        assert!(s.offer_ahead(10));
        assert!(s.offer_ahead(11));
        assert!(w.has_ahead());
        assert!(!s.offer_ahead(12));
        assert!(w.claim_ahead(9));
        assert!(s.revoke_ahead(11), "the third cell is taken back like the others");
        assert!(!w.claim_ahead(11));
        assert!(w.claim_ahead(10));
        assert!(!w.others_waiting());
        assert!(!w.has_ahead());
        assert!(!w.claim_ahead(0), "0 is no connection");
    }

    #[test]
    fn bytes_written_count_per_connection() {
        let supervisor = Scoreboard::create().unwrap();
        let worker = Scoreboard::map(supervisor.fd().try_clone_to_owned().unwrap()).unwrap();
        let (s, w) = (supervisor.slot(), worker.slot());
        // An older worker publishes nothing: bytes since the hand-over count.
        w.add_written(10);
        assert!(s.wrote_on(1, 0));
        assert!(!s.wrote_on(1, 10));
        w.begin_connection(1);
        assert!(!s.wrote_on(1, 0), "nothing written on 1 yet");
        w.add_written(5);
        assert!(s.wrote_on(1, 0));
        assert!(!s.wrote_on(2, 0), "2 was sent ahead and never started");
        w.begin_connection(2);
        assert!(!s.wrote_on(2, 0));
        // Connection 2 done (20 bytes in all), kept alive, and handed to the
        // same worker again at 20: it is still "current", with the first
        // round's bytes, until the worker begins it again.
        w.add_written(5);
        assert!(s.wrote_on(2, 15));
        assert!(!s.wrote_on(2, 20), "nothing written since the second hand-over");
        w.begin_connection(2);
        w.add_written(1);
        assert!(s.wrote_on(2, 20));
    }

    #[test]
    fn a_slot_fits_its_page() {
        assert!(std::mem::size_of::<Slot>() <= LEN);
    }
}
