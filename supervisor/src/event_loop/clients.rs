//! The client side of the loop: accepting, reading heads, lingering close.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::poll::{Event, PollMode};
use log::{debug, error, warn};
use monodon_proto::access_log::{Entry, RawRequestLine};
use monodon_proto::http::Rejection;
use monodon_proto::proxy;
use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, Shutdown};

use super::{ConnIo, Supervisor, Wire, ACCEPT_BATCH, LISTENER_BASE, READ_CHUNK};
use crate::core::{ConnKey, Place, Stopping};

impl Supervisor {
    // ---- accepting ------------------------------------------------------

    pub(super) fn update_accepting(&mut self) {
        if self.listeners.is_empty() {
            return;
        }
        let paused = self.accept_paused_until.is_some_and(|t| Instant::now() < t);
        let full = self.core.conn_count() >= self.max_connections;
        // What a worker accepts and cannot serve at once comes here: at the
        // limit, workers accept nothing either.
        let hold = full || self.workers_stalled;
        self.core.hold_accepting(hold, &mut Wire { msg: &mut self.msg }, Instant::now());
        // While a worker is free to accept, the supervisor leaves new
        // connections to it (it would only race it for them); with all of
        // them busy it accepts and holds what comes.
        let want = self.core.stopping() == Stopping::No
            && !paused
            && !self.core.queue_full()
            && !full
            && !self.core.workers_accept();
        if want == self.accepting {
            return;
        }
        self.accepting = want;
        for (i, l) in self.listeners.iter().enumerate() {
            let ev = if want { Event::readable(LISTENER_BASE + i) } else { Event::none(LISTENER_BASE + i) };
            if let Err(e) = self.poller.modify_with_mode(l.fd(), ev, PollMode::Level) {
                error!("cannot {} listener {}: {e}", if want { "resume" } else { "pause" }, l.addr);
            }
        }
        if !want {
            debug!("accepting paused ({} connections queued)", self.core.queued());
        }
    }

    pub(super) fn on_listener_readable(&mut self, index: usize) {
        for _ in 0..ACCEPT_BATCH {
            if self.core.conn_count() >= self.max_connections {
                self.make_room();
            }
            // What the last connection led to (a queue now full) may pause accepting.
            self.carry_out();
            if !self.accepting {
                return;
            }
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            match listener.accept() {
                Ok(Some((fd, peer))) => self.on_accepted(fd, peer),
                Ok(None) => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        error!("accept: {e}; pausing accepts for 100 ms");
                        self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                        self.update_accepting();
                        return;
                    }
                    _ => debug!("accept: {e}"),
                },
            }
        }
    }

    pub(super) fn on_accepted(&mut self, fd: OwnedFd, peer: String) {
        let io = ConnIo { proxy_pending: self.config.proxy_protocol, ..ConnIo::new(fd, peer) };
        let key = self.core.accept(io, Instant::now());
        // With TCP_DEFER_ACCEPT the request is usually here already.
        self.on_conn_readable(key);
    }

    /// Registers a connection the supervisor is about to wait for, once:
    /// edge-triggered for the rest of its life, so no re-arming per request
    /// (the module doc of event_loop says why that is safe).
    fn watch_if_waiting(&mut self, key: ConnKey) {
        let Some(conn) = self.core.conn(key) else { return };
        if conn.io.watched || !matches!(conn.place, Place::Reading { .. } | Place::Lingering { .. }) {
            return;
        }
        // SAFETY: a watched connection is deleted from the poller in
        // `close_now` before its fd is dropped.
        let added = unsafe {
            self.poller.add_with_mode(conn.io.fd.as_raw_fd(), Event::readable(key.0), PollMode::Edge)
        };
        match added {
            Ok(()) => {
                if let Some(io) = self.core.conn_io_mut(key) {
                    io.watched = true;
                }
            }
            Err(e) => {
                error!("cannot watch a connection from {}: {e}", conn.io.peer);
                self.close_now(key);
            }
        }
    }

    // ---- client connections --------------------------------------------

    /// A worker keeps the connection warm: its requests are the worker's to
    /// see, so the supervisor stops watching it (no wake-up per request);
    /// `resume_reading` reads and watches it again when it comes back.
    pub(super) fn unwatch_warm(&mut self, key: ConnKey) {
        let Some(io) = self.core.conn_io_mut(key) else { return };
        io.unread = false;
        io.pending.release();
        let watched = std::mem::replace(&mut io.watched, false);
        if let Some(conn) = self.core.conn(key).filter(|_| watched) {
            if let Err(e) = self.poller.delete(&conn.io.fd) {
                debug!("cannot stop watching a warm connection: {e}");
            }
        }
    }

    /// Readiness (or its possibility) on a client connection.
    pub(super) fn on_conn_readable(&mut self, key: ConnKey) {
        let Some(conn) = self.core.conn(key) else {
            return;
        };
        match conn.place {
            Place::Reading { .. } => self.read_head(key),
            // Watched already (`linger` saw to it).
            Place::Lingering { .. } => self.drain_lingering(key),
            // A worker keeps it warm: an event from before we stopped watching.
            Place::Warm { .. } => {}
            // Not ours to read now; remember to look when it comes back.
            Place::Queued | Place::InWorker { .. } => {
                if let Some(io) = self.core.conn_io_mut(key) {
                    io.unread = true;
                }
            }
        }
    }

    /// Reads until a head is complete or the socket has nothing more; in
    /// the latter case the connection is watched for more.
    fn read_head(&mut self, key: ConnKey) {
        self.read_available(key);
        self.watch_if_waiting(key);
    }

    fn read_available(&mut self, key: ConnKey) {
        loop {
            let Some(conn) = self.core.conn(key) else { return };
            if !matches!(conn.place, Place::Reading { .. }) {
                return;
            }
            let Some(conn) = self.core.conn_io_mut(key) else { return };
            let was_empty = conn.pending.is_empty();
            match nix::unistd::read(conn.fd.as_fd(), &mut self.scratch[..READ_CHUNK]) {
                Ok(0) => {
                    return if conn.pending.is_empty() {
                        self.close_now(key)
                    } else {
                        let closed = Rejection {
                            status: 400,
                            reason: "connection closed before the request was complete",
                        };
                        self.reject(key, closed)
                    };
                }
                Ok(n) => {
                    conn.pending.extend(&self.scratch[..n]);
                    // A short read took all there was; anything later raises a new edge.
                    conn.unread = n == READ_CHUNK;
                    let now = Instant::now();
                    if was_empty {
                        self.core.head_started(key, now);
                    }
                    if !self.after_input(key, now) {
                        return;
                    }
                }
                Err(Errno::EAGAIN) => {
                    conn.unread = false;
                    return;
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    debug!("read from {}: {e}", conn.peer);
                    return self.close_now(key);
                }
            }
        }
    }

    /// Decides what a connection being read needs after its buffer changed.
    /// True if it still waits for input that may already be in the socket.
    pub(super) fn after_input(&mut self, key: ConnKey, now: Instant) -> bool {
        let Some(conn) = self.core.conn_io_mut(key) else { return false };
        if conn.proxy_pending {
            match proxy::parse(conn.pending.bytes()) {
                proxy::Header::Incomplete => return conn.unread,
                proxy::Header::Invalid(why) => {
                    // The protocol's rule: no response, the connection is closed.
                    debug!("{}: {why}; closing", conn.peer);
                    self.close_now(key);
                    return false;
                }
                proxy::Header::Complete { len, source } => {
                    if let Some(client) = source {
                        conn.peer = client.to_string();
                    }
                    conn.pending.skip_front(len);
                    conn.proxy_pending = false;
                }
            }
        }
        // Small bodies are received here too, not by a worker: a slow
        // sender costs the supervisor a buffer, never a process.
        let checked = conn.pending.check(&self.config.limits);
        let (unread, empty) = (conn.unread, conn.pending.is_empty());
        match checked {
            Ok(true) => {
                match self.health_check(key) {
                    Some(head_only) => self.answer_health_check(key, head_only),
                    None => self.core.request_ready(key, &mut Wire { msg: &mut self.msg }, now),
                }
                false
            }
            Ok(false) => {
                if empty {
                    self.core.idle(key, now);
                }
                unread
            }
            Err(rejection) => {
                self.reject(key, rejection);
                false
            }
        }
    }

    /// A connection is back from a worker, with what it had read past the
    /// last request in its buffer.
    pub(super) fn resume_reading(&mut self, key: ConnKey) {
        let Some(conn) = self.core.conn(key) else { return };
        if !matches!(conn.place, Place::Reading { .. }) {
            return;
        }
        // Unwatched, it may have been sent more we were never told about.
        let unwatched = !conn.io.watched;
        let now = Instant::now();
        if !conn.io.pending.is_empty() {
            self.core.head_started(key, now);
        }
        if self.after_input(key, now) || unwatched {
            self.read_head(key);
        }
    }

    /// Whether a complete request is for `--health-path` (GET or HEAD, any
    /// query): `Some(head_only)` if it is.
    fn health_check(&self, key: ConnKey) -> Option<bool> {
        let path = self.config.health_path.as_deref()?;
        monodon_proto::http::is_health_check(self.core.conn(key)?.io.pending.bytes(), path)
    }

    /// Answers a health check from the supervisor's state, and closes: 200
    /// while the serving generation is ready and nothing stops, else 503.
    fn answer_health_check(&mut self, key: ConnKey, head_only: bool) {
        let (status, body) = match (self.core.stopping(), self.core.ready_notified()) {
            (Stopping::No, true) => ("200 OK", "serving\n"),
            (Stopping::No, false) => ("503 Service Unavailable", "starting\n"),
            _ => ("503 Service Unavailable", "stopping\n"),
        };
        let mut response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if !head_only {
            response.push_str(body);
        }
        self.send_error(key, response.into_bytes());
        self.linger(key);
    }

    pub(super) fn reject(&mut self, key: ConnKey, rejection: Rejection) {
        let Some(conn) = self.core.conn(key) else { return };
        debug!("{}: {rejection}", conn.io.peer);
        let sent = self.send_error(key, rejection.response());
        self.own_responses.count(rejection.status);
        if let (Some(log), Some(conn)) = (&mut self.access_log, self.core.conn(key)) {
            let line = RawRequestLine::from_bytes(conn.io.pending.bytes());
            log.write(&Entry {
                pid: std::process::id(),
                generation: self.core.serving_generation(),
                ..Entry::refused(&conn.io.peer, line.parts(), rejection.status, sent)
            });
        }
        self.linger(key);
    }

    /// Best-effort write of a small response on a non-blocking socket;
    /// returns the bytes sent.
    pub(super) fn send_error(&mut self, key: ConnKey, response: Vec<u8>) -> u64 {
        let Some(conn) = self.core.conn(key) else { return 0 };
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        socket::send(conn.io.fd.as_raw_fd(), &response, flags).map_or(0, |n| n as u64)
    }

    /// Closes a connection whose last response is out. If the client has
    /// sent nothing more, a plain close is safe (the FIN follows the data);
    /// if it has, or may still be sending, it gets a lingering close.
    pub(super) fn close_after_response(&mut self, key: ConnKey) {
        let Some(conn) = self.core.conn(key) else { return };
        let mut probe = [0u8; 1];
        let peek = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        match socket::recv(conn.io.fd.as_raw_fd(), &mut probe, peek) {
            Ok(0) | Err(Errno::EAGAIN) => self.close_now(key),
            _ => self.linger(key),
        }
    }

    /// Lingering close: send our FIN, then read and discard what the client
    /// still sends, so its unread data cannot make the kernel answer with an
    /// RST that would destroy our last response.
    pub(super) fn linger(&mut self, key: ConnKey) {
        let Some(conn) = self.core.conn_io_mut(key) else { return };
        let _ = socket::shutdown(conn.fd.as_raw_fd(), Shutdown::Write);
        conn.pending.release();
        self.core.lingering(key, Instant::now());
        self.drain_lingering(key);
        self.watch_if_waiting(key);
    }

    pub(super) fn drain_lingering(&mut self, key: ConnKey) {
        let Some(conn) = self.core.conn(key) else { return };
        // Bounded, so one chatty client cannot hold the loop; the linger
        // timeout ends it in any case.
        for _ in 0..16 {
            match nix::unistd::read(conn.io.fd.as_fd(), &mut self.scratch[..READ_CHUNK]) {
                Ok(0) => return self.close_now(key),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => return self.close_now(key),
            }
        }
    }

    pub(super) fn close_now(&mut self, key: ConnKey) {
        let Some(conn) = self.core.remove_conn(key) else {
            return;
        };
        if conn.watched {
            let _ = self.poller.delete(&conn.fd);
        }
        if conn.was_warm {
            // A worker may still have a copy it has not yet seen taken back:
            // the client must see the close now, not when the worker looks.
            let _ = socket::shutdown(conn.fd.as_raw_fd(), Shutdown::Both);
        }
        drop(conn);
        if !self.accepting && self.core.conn_count() + 1 == self.max_connections {
            self.update_accepting();
        }
    }

    /// At `--max-connections`: closes the longest-idle keep-alive
    /// connections (a batch, so a flood of new clients does not scan the
    /// table for each one). With none idle, accepting pauses until a
    /// connection ends: the kernel's backlog holds the newcomers.
    pub(super) fn make_room(&mut self) {
        let batch = (self.max_connections / 64).clamp(1, 256);
        let idle = self.core.longest_idle(batch);
        if idle.is_empty() {
            warn!("{} connections, none idle: not accepting until one ends", self.core.conn_count());
            self.update_accepting();
            return;
        }
        for &key in &idle {
            self.close_now(key);
        }
        debug!(
            "--max-connections {}: closed {} idle keep-alive connections",
            self.max_connections,
            idle.len()
        );
    }
}
