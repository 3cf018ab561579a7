//! The client side of the loop: accepting, reading heads, lingering close.

use super::*;

impl Supervisor {
    // ---- accepting ------------------------------------------------------

    pub(super) fn update_accepting(&mut self) {
        if self.listeners.is_empty() {
            return;
        }
        let paused = self.accept_paused_until.is_some_and(|t| Instant::now() < t);
        let want = self.stopping == Stopping::No && !paused && !self.dispatcher.is_full();
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
        // Registered disarmed; armed only when we want to read (see module doc).
        // SAFETY: every connection is deleted from the poller in `close_now`
        // before its fd is dropped.
        if let Err(e) =
            unsafe { self.poller.add_with_mode(fd.as_raw_fd(), Event::none(key), PollMode::Oneshot) }
        {
            error!("cannot watch a new connection: {e}");
            return;
        }
        self.totals.accepted += 1;
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        entry.insert(Conn {
            id,
            fd,
            peer,
            buf: Vec::new(),
            state: ConnState::Reading,
            deadline: now + self.config.head_timeout,
            served: 0,
            request_line: String::new(),
        });
        // With TCP_DEFER_ACCEPT the request is usually here already.
        self.on_conn_readable(key);
    }

    // ---- client connections --------------------------------------------

    pub(super) fn on_conn_readable(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        match conn.state {
            ConnState::Reading => {}
            ConnState::Lingering => return self.drain_lingering(key),
            // A stale event from before a hand-over: not ours to read.
            ConnState::Queued | ConnState::InWorker { .. } => return,
        }
        let was_empty = conn.buf.is_empty();
        match nix::unistd::read(conn.fd.as_fd(), &mut self.scratch[..READ_CHUNK]) {
            Ok(0) => {
                if conn.buf.is_empty() {
                    self.close_now(key);
                } else {
                    self.reject(
                        key,
                        Rejection { status: 400, reason: "connection closed inside the request head" },
                    );
                }
            }
            Ok(n) => {
                conn.buf.extend_from_slice(&self.scratch[..n]);
                let now = Instant::now();
                if was_empty {
                    conn.deadline = now + self.config.head_timeout;
                }
                self.after_input(key, now);
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => self.arm(key),
            Err(e) => {
                debug!("read from {}: {e}", conn.peer);
                self.close_now(key);
            }
        }
    }

    /// Decides what a connection in `Reading` needs after its buffer changed.
    pub(super) fn after_input(&mut self, key: ConnKey, now: Instant) {
        let conn = &mut self.conns[key];
        match http::parse_head(&conn.buf, &self.config.limits) {
            Ok(Some(head)) => {
                conn.request_line.clear();
                let target = &head.target[..head.target.len().min(200)];
                let _ = write!(conn.request_line, "{} {}", head.method, target);
                conn.state = ConnState::Queued;
                match self.dispatcher.conn_ready(key) {
                    Some(wkey) => self.hand_over(wkey, key),
                    None => self.update_accepting(),
                }
            }
            Ok(None) => {
                if conn.buf.is_empty() {
                    conn.deadline = now + self.config.keepalive_timeout;
                }
                self.arm(key);
            }
            Err(rejection) => self.reject(key, rejection),
        }
    }

    pub(super) fn arm(&mut self, key: ConnKey) {
        let conn = &self.conns[key];
        if let Err(e) = self.poller.modify_with_mode(conn.fd.as_fd(), Event::readable(key), PollMode::Oneshot)
        {
            debug!("re-arming {}: {e}", conn.peer);
            self.close_now(key);
        }
    }

    pub(super) fn reject(&mut self, key: ConnKey, rejection: Rejection) {
        debug!("{}: {rejection}", self.conns[key].peer);
        self.send_error(key, rejection.response());
        self.linger(key);
    }

    /// Best-effort write of a small response on a non-blocking socket.
    pub(super) fn send_error(&mut self, key: ConnKey, response: Vec<u8>) {
        let conn = &self.conns[key];
        let _ = socket::send(conn.fd.as_raw_fd(), &response, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT);
    }

    /// Lingering close: send our FIN, then read and discard what the client
    /// still sends, so its unread data cannot make the kernel answer with an
    /// RST that would destroy our last response.
    pub(super) fn linger(&mut self, key: ConnKey) {
        let conn = &mut self.conns[key];
        let _ = socket::shutdown(conn.fd.as_raw_fd(), Shutdown::Write);
        conn.state = ConnState::Lingering;
        conn.buf = Vec::new();
        conn.deadline = Instant::now() + self.config.linger_timeout;
        self.arm(key);
    }

    pub(super) fn drain_lingering(&mut self, key: ConnKey) {
        let conn = &self.conns[key];
        for _ in 0..16 {
            match nix::unistd::read(conn.fd.as_fd(), &mut self.scratch[..READ_CHUNK]) {
                Ok(0) => return self.close_now(key),
                Ok(_) => continue,
                Err(Errno::EAGAIN) => return self.arm(key),
                Err(Errno::EINTR) => continue,
                Err(_) => return self.close_now(key),
            }
        }
        self.arm(key);
    }

    pub(super) fn close_now(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.try_remove(key) else {
            return;
        };
        let _ = self.poller.delete(&conn.fd);
        if conn.state == ConnState::Queued {
            self.dispatcher.remove_conn(key);
        }
        drop(conn);
    }
}
