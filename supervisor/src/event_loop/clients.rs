//! The client side of the loop: accepting, reading heads, lingering close.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use monodon_proto::access_log::{Entry, RawRequestLine};
use monodon_proto::http::{PendingRequest, Rejection};
use monodon_proto::proxy;
use nix::errno::Errno;
use nix::sys::socket::{self, MsgFlags, Shutdown};
use polling::{Event, PollMode};

use super::{Conn, ConnKey, ConnState, Stopping, Supervisor, ACCEPT_BATCH, LISTENER_BASE, READ_CHUNK};

impl Supervisor {
    // ---- accepting ------------------------------------------------------

    pub(super) fn update_accepting(&mut self) {
        if self.listeners.is_empty() {
            return;
        }
        let paused = self.accept_paused_until.is_some_and(|t| Instant::now() < t);
        let full = self.conns.len() >= self.max_connections;
        let want = self.stopping == Stopping::No && !paused && !self.dispatcher.is_full() && !full;
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
            debug!("accepting paused ({} connections queued)", self.dispatcher.queued());
        }
    }

    pub(super) fn on_listener_readable(&mut self, index: usize) {
        for _ in 0..ACCEPT_BATCH {
            if self.conns.len() >= self.max_connections {
                self.make_room();
            }
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
        let now = Instant::now();
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        self.totals.accepted += 1;
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        entry.insert(Conn {
            id,
            fd,
            peer,
            pending: PendingRequest::default(),
            state: ConnState::Reading,
            deadline: now + self.config.head_timeout,
            served: 0,
            unread: true,
            watched: false,
            proxy_pending: self.config.proxy_protocol,
        });
        // With TCP_DEFER_ACCEPT the request is usually here already.
        self.on_conn_readable(key);
    }

    /// Registers a connection the supervisor is about to wait for, once:
    /// edge-triggered for the rest of its life, so no re-arming per request
    /// (the module doc of event_loop says why that is safe).
    fn watch_if_waiting(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if conn.watched || !matches!(conn.state, ConnState::Reading | ConnState::Lingering) {
            return;
        }
        // SAFETY: a watched connection is deleted from the poller in
        // `close_now` before its fd is dropped.
        match unsafe { self.poller.add_with_mode(conn.fd.as_raw_fd(), Event::readable(key), PollMode::Edge) }
        {
            Ok(()) => conn.watched = true,
            Err(e) => {
                error!("cannot watch a connection from {}: {e}", conn.peer);
                self.close_now(key);
            }
        }
    }

    // ---- client connections --------------------------------------------

    /// Readiness (or its possibility) on a client connection.
    pub(super) fn on_conn_readable(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.state {
            ConnState::Reading => self.read_head(key),
            // Watched already (`linger` saw to it).
            ConnState::Lingering => self.drain_lingering(key),
            // Not ours to read now; remember to look when it comes back.
            ConnState::Queued | ConnState::InWorker { .. } => conn.unread = true,
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
            let Some(conn) = self.conns.get_mut(key) else { return };
            if conn.state != ConnState::Reading {
                return;
            }
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
                        conn.deadline = now + self.config.head_timeout;
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

    /// Decides what a connection in `Reading` needs after its buffer changed.
    /// True if it still waits for input that may already be in the socket.
    pub(super) fn after_input(&mut self, key: ConnKey, now: Instant) -> bool {
        let conn = &mut self.conns[key];
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
        match conn.pending.check(&self.config.limits) {
            Ok(true) => {
                conn.state = ConnState::Queued;
                match self.dispatcher.conn_ready(key) {
                    Some(wkey) => self.hand_over(wkey, key),
                    None => {
                        self.send_ahead_to_a_busy_worker();
                        self.update_accepting();
                    }
                }
                false
            }
            Ok(false) => {
                if conn.pending.is_empty() {
                    conn.deadline = now + self.config.keepalive_timeout;
                }
                conn.unread
            }
            Err(rejection) => {
                self.reject(key, rejection);
                false
            }
        }
    }

    /// A connection is back from a worker, with what it had read past the
    /// last request.
    pub(super) fn resume_reading(&mut self, key: ConnKey, leftover: &[u8]) {
        let conn = &mut self.conns[key];
        conn.state = ConnState::Reading;
        conn.pending.reset_to(leftover);
        // Unwatched, it may have been sent more we were never told about.
        let unwatched = !conn.watched;
        if self.after_input(key, Instant::now()) || unwatched {
            self.read_head(key);
        }
    }

    pub(super) fn reject(&mut self, key: ConnKey, rejection: Rejection) {
        debug!("{}: {rejection}", self.conns[key].peer);
        let sent = self.send_error(key, rejection.response());
        if self.access_log.is_some() {
            let conn = &self.conns[key];
            let line = RawRequestLine::from_bytes(conn.pending.bytes());
            let entry = Entry {
                pid: std::process::id(),
                generation: self.serving_generation,
                ..Entry::refused(&conn.peer, line.parts(), rejection.status, sent)
            };
            if let Some(log) = &mut self.access_log {
                log.write(&entry);
            }
        }
        self.linger(key);
    }

    /// Best-effort write of a small response on a non-blocking socket;
    /// returns the bytes sent.
    pub(super) fn send_error(&mut self, key: ConnKey, response: Vec<u8>) -> u64 {
        let conn = &self.conns[key];
        let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
        socket::send(conn.fd.as_raw_fd(), &response, flags).map_or(0, |n| n as u64)
    }

    /// Closes a connection whose last response is out. If the client has
    /// sent nothing more, a plain close is safe (the FIN follows the data);
    /// if it has, or may still be sending, it gets a lingering close.
    pub(super) fn close_after_response(&mut self, key: ConnKey) {
        let conn = &mut self.conns[key];
        let mut probe = [0u8; 1];
        match socket::recv(conn.fd.as_raw_fd(), &mut probe, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(Errno::EAGAIN) => self.close_now(key),
            _ => self.linger(key),
        }
    }

    /// Lingering close: send our FIN, then read and discard what the client
    /// still sends, so its unread data cannot make the kernel answer with an
    /// RST that would destroy our last response.
    pub(super) fn linger(&mut self, key: ConnKey) {
        let conn = &mut self.conns[key];
        let _ = socket::shutdown(conn.fd.as_raw_fd(), Shutdown::Write);
        conn.state = ConnState::Lingering;
        conn.pending.release();
        conn.deadline = Instant::now() + self.config.linger_timeout;
        self.drain_lingering(key);
        self.watch_if_waiting(key);
    }

    pub(super) fn drain_lingering(&mut self, key: ConnKey) {
        let conn = &self.conns[key];
        // Bounded, so one chatty client cannot hold the loop; the linger
        // timeout ends it in any case.
        for _ in 0..16 {
            match nix::unistd::read(conn.fd.as_fd(), &mut self.scratch[..READ_CHUNK]) {
                Ok(0) => return self.close_now(key),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => return self.close_now(key),
            }
        }
    }

    pub(super) fn close_now(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.try_remove(key) else {
            return;
        };
        if conn.watched {
            let _ = self.poller.delete(&conn.fd);
        }
        if conn.state == ConnState::Queued {
            self.dispatcher.remove_conn(key);
        }
        drop(conn);
        if !self.accepting && self.conns.len() + 1 == self.max_connections {
            self.update_accepting();
        }
    }

    /// At `--max-connections`: closes the longest-idle keep-alive
    /// connections (a batch, so a flood of new clients does not scan the
    /// table for each one). With none idle, accepting pauses until a
    /// connection ends: the kernel's backlog holds the newcomers.
    fn make_room(&mut self) {
        let mut idle: Vec<(Instant, ConnKey)> =
            self.conns.iter().filter(|(_, c)| c.is_idle()).map(|(k, c)| (c.deadline, k)).collect();
        let batch = (self.max_connections / 64).clamp(1, 256).min(idle.len());
        if batch == 0 {
            warn!("{} connections, none idle: not accepting until one ends", self.conns.len());
            self.update_accepting();
            return;
        }
        if batch < idle.len() {
            idle.select_nth_unstable(batch);
        }
        for &(_, key) in &idle[..batch] {
            self.close_now(key);
        }
        debug!("--max-connections {}: closed {batch} idle keep-alive connections", self.max_connections);
    }
}
