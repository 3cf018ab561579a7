//! The worker side of the loop: spawning, messages from workers, hand-over,
//! retirement, reloads (generations), scaling, deaths and stuck workers.

use super::*;

impl Supervisor {
    // ---- workers --------------------------------------------------------

    pub(super) fn wanted_workers(&self) -> usize {
        if self.stopping == Stopping::No {
            self.target_workers
        } else {
            0
        }
    }

    /// Workers of `generation` that take new connections (or will, once ready).
    pub(super) fn active_workers(&self, generation: u64) -> usize {
        self.workers.iter().filter(|(_, w)| w.generation == generation && !w.retiring).count()
    }

    pub(super) fn spawn_missing_workers(&mut self) {
        let serving = self.serving_generation;
        while self.active_workers(serving) < self.wanted_workers() && Instant::now() >= self.next_spawn_at {
            if self.spawn(serving).is_err() {
                let delay = self.backoff.on_spawn_failure();
                warn!("next worker start in {delay:?}");
                self.next_spawn_at = Instant::now() + delay;
            }
        }
        while let Some(generation) = self.reload.as_ref().map(|r| r.generation) {
            if self.active_workers(generation) >= self.wanted_workers() {
                break;
            }
            if let Err(e) = self.spawn(generation) {
                if let Some(reload) = self.reload.take() {
                    self.abandon_reload(reload, &e.to_string());
                }
            }
        }
    }

    /// Starts a worker of `generation` (the serving one or the one a reload
    /// is starting), with that generation's command.
    pub(super) fn spawn(&mut self, generation: u64) -> io::Result<WorkerKey> {
        let command = match &self.reload {
            Some(r) if r.generation == generation => r.command.clone(),
            _ => self.serving_command.clone(),
        };
        let max_requests = match (self.config.min_requests, self.config.max_requests) {
            (_, 0) => 0,
            (min, max) => self.rng.u64(min.clamp(1, max)..=max),
        };
        let spec = WorkerSpec {
            command: &command,
            env: WorkerEnv {
                supervisor_pid: std::process::id(),
                generation,
                limits: self.config.limits,
                io_timeout: self.config.io_timeout,
                max_requests,
                access_log: self.config.access_log.clone(),
                access_log_format: self.config.access_log_format,
                read_ahead: self.config.read_ahead,
                min_body_rate: self.config.min_body_rate,
            },
        };
        let s = spawn_worker(&spec).inspect_err(|e| error!("{e}"))?;
        let entry = self.workers.vacant_entry();
        let key = entry.key();
        // SAFETY: the channel is deleted from the poller before it is
        // dropped (`release`, `on_worker_exit`).
        let added = unsafe {
            self.poller.add_with_mode(
                s.channel.as_raw_fd(),
                Event::readable(WORKER_BASE + key),
                PollMode::Level,
            )
        };
        if let Err(e) = added {
            error!("cannot watch worker {} channel: {e}", s.pid);
            let _ = kill(s.pid, Signal::SIGKILL);
        }
        info!("spawned worker {} (generation {generation}, max requests {max_requests})", s.pid);
        s.scoreboard.slot().set_others_waiting(self.others_waiting);
        entry.insert(Worker {
            pid: s.pid,
            channel: Some(s.channel),
            scoreboard: s.scoreboard,
            state: WorkerState::Starting,
            generation,
            started: Instant::now(),
            retiring: false,
            max_requests,
            killed: None,
            busy_since: Instant::now(),
            channel_lost: None,
            accepts_ahead: false,
            ahead: None,
            skips_pending: 0,
        });
        Ok(key)
    }

    /// Closes a worker's channel: it exits when it next waits for work.
    pub(super) fn release(&mut self, wkey: WorkerKey) {
        // Nothing may be handed to it any more.
        self.dispatcher.remove_worker(wkey);
        let w = &mut self.workers[wkey];
        if let Some(ch) = w.channel.take() {
            let _ = self.poller.delete(&ch);
        }
        if w.state == WorkerState::Starting {
            // Its app may be stuck initialising: it has nothing to finish.
            let _ = kill(w.pid, Signal::SIGTERM);
        }
    }

    /// Takes a worker out of service; it exits after its current connection.
    pub(super) fn retire(&mut self, wkey: WorkerKey) {
        self.take_back_ahead(wkey);
        let w = &mut self.workers[wkey];
        w.retiring = true;
        self.dispatcher.remove_worker(wkey);
        if !matches!(w.state, WorkerState::Busy(_)) {
            self.release(wkey);
        }
    }

    // ---- reloads and scaling ----------------------------------------------

    /// Starts a new generation (after re-reading the config file, if there
    /// is one); the generation started, or why none was.
    pub(super) fn begin_reload(&mut self) -> Result<u64, String> {
        if self.stopping != Stopping::No {
            return Err("the supervisor is stopping".into());
        }
        if let Some(source) = self.config.source.clone() {
            let checked = (source.0)().and_then(|fresh| {
                crate::spawn::channel(&fresh.limits).map_err(|e| e.to_string())?;
                Ok(fresh)
            });
            match checked {
                Ok(fresh) => self.apply_config(fresh),
                Err(e) => {
                    let message = format!("reload refused: {e}");
                    error!("{message}; generation {} keeps serving", self.serving_generation);
                    self.totals.failed_reloads += 1;
                    self.last_reload_failure = Some((message.clone(), Instant::now()));
                    return Err(message);
                }
            }
        }
        if let Some(r) = self.reload.take() {
            self.abandon_reload(r, "superseded by a newer reload");
        }
        self.generation += 1;
        self.totals.reloads += 1;
        self.notifier.reloading();
        let now = Instant::now();
        let command = resolve_command(&self.config.worker_command);
        info!(
            "reload: starting generation {} ({} workers) from {:?}",
            self.generation, self.target_workers, command
        );
        self.reload = Some(Reload {
            generation: self.generation,
            command,
            started: now,
            deadline: now + self.config.reload_timeout,
        });
        Ok(self.generation)
    }

    /// Takes fresh settings for the next generation. What only a new
    /// supervisor can change (listeners, control socket) is kept, and said so.
    fn apply_config(&mut self, mut fresh: Config) {
        let old = &self.config;
        for (what, changed) in [
            ("listen", fresh.listen != old.listen),
            ("backlog", fresh.backlog != old.backlog),
            ("control", fresh.control != old.control),
        ] {
            if changed {
                warn!("config: a change of `{what}` takes effect only when the supervisor restarts; keeping the old value");
            }
        }
        if fresh.workers != old.workers {
            info!("config: workers {} -> {}", old.workers, fresh.workers);
            self.target_workers = fresh.workers;
        }
        fresh.listen = old.listen.clone();
        fresh.backlog = old.backlog;
        fresh.control = old.control.clone();
        self.dispatcher.set_capacity(fresh.queue_capacity);
        if (&fresh.access_log, &fresh.access_log_format) != (&old.access_log, &old.access_log_format) {
            match open_access_log(&fresh) {
                Ok(log) => self.access_log = log,
                Err(e) => warn!("config: {e}; the supervisor keeps logging where it did"),
            }
        }
        self.config = fresh;
    }

    /// Stops a reload's workers; the serving generation carries on.
    /// The caller has taken `reload` out of `self.reload`.
    pub(super) fn abandon_reload(&mut self, reload: Reload, reason: &str) {
        error!(
            "reload to generation {} failed: {reason}; generation {} keeps serving",
            reload.generation, self.serving_generation
        );
        let doomed: Vec<WorkerKey> =
            self.workers.iter().filter(|(_, w)| w.generation == reload.generation).map(|(k, _)| k).collect();
        for wkey in doomed {
            self.retire(wkey);
            let _ = kill(self.workers[wkey].pid, Signal::SIGTERM);
        }
        let message = format!("reload to generation {} failed: {reason}", reload.generation);
        self.totals.failed_reloads += 1;
        self.last_reload_failure = Some((message.clone(), Instant::now()));
        self.reload_finished(reload.generation, Err(message));
        if self.stopping == Stopping::No {
            let line = self.status_line();
            self.notifier.ready(line);
        }
    }

    /// Switches dispatch to the new generation once all of it is ready.
    pub(super) fn maybe_finish_reload(&mut self) {
        let Some(reload) = self.reload.as_ref() else { return };
        let ready: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == reload.generation && !w.retiring && w.state == WorkerState::Idle)
            .map(|(k, _)| k)
            .collect();
        if ready.len() < self.target_workers {
            return;
        }
        let Some(reload) = self.reload.take() else { return };
        let old = self.serving_generation;
        self.serving_generation = reload.generation;
        self.serving_command = reload.command.clone();
        let outgoing: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation != reload.generation && !w.retiring)
            .map(|(k, _)| k)
            .collect();
        let retired = outgoing.len();
        for wkey in outgoing {
            self.retire(wkey);
        }
        for wkey in ready {
            self.worker_idle(wkey);
        }
        let message = format!(
            "generation {} serving after {:.1?}; retiring {retired} workers of generation {old}",
            reload.generation,
            reload.started.elapsed()
        );
        info!("reload: {message}");
        self.reload_finished(reload.generation, Ok(message));
        let line = self.status_line();
        self.notifier.ready(line);
    }

    /// SIGTTIN / SIGTTOU: one worker more or less.
    pub(super) fn scale(&mut self, delta: i32) {
        if self.stopping != Stopping::No {
            return;
        }
        if delta < 0 && self.target_workers <= 1 {
            warn!("SIGTTOU ignored: already down to one worker");
            return;
        }
        let target = if delta > 0 { self.target_workers + 1 } else { self.target_workers - 1 };
        self.set_target_workers(target.min(4096));
    }

    /// Sets the number of workers per generation; surplus workers retire,
    /// idle ones first.
    pub(super) fn set_target_workers(&mut self, target: usize) {
        let serving = self.serving_generation;
        self.target_workers = target;
        let mut candidates: Vec<(u8, WorkerKey)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == serving && !w.retiring)
            .map(|(k, w)| {
                let rank = match w.state {
                    WorkerState::Idle => 0,
                    WorkerState::Starting => 1,
                    WorkerState::Busy(_) => 2,
                };
                (rank, k)
            })
            .collect();
        candidates.sort();
        let surplus = candidates.len().saturating_sub(target);
        for &(_, wkey) in candidates.iter().take(surplus) {
            self.retire(wkey);
        }
        info!("scaled to {target} workers");
    }

    pub(super) fn on_channel_readable(&mut self, wkey: WorkerKey) {
        // One message per readiness event: a worker rarely has more than one
        // queued, and the channel is level-triggered, so a second message
        // raises the event again; reading on to EAGAIN would cost a recvmsg
        // per request for nothing.
        self.receive_from(wkey);
    }

    /// Handles every message a worker has sent (it is exiting).
    fn drain_channel(&mut self, wkey: WorkerKey) {
        while self.receive_from(wkey) {}
    }

    /// Receives and handles one message; false when there was none, or the
    /// channel is gone.
    fn receive_from(&mut self, wkey: WorkerKey) -> bool {
        // Taken out so handlers may use `self`; a nested call (a death
        // handled while messages are) finds it empty and makes its own.
        let mut buf = std::mem::take(&mut self.channel_buf);
        if buf.len() < wire::max_message(&self.config.limits) {
            buf.resize(wire::max_message(&self.config.limits), 0);
        }
        let Some(channel) = self.workers.get(wkey).and_then(|w| w.channel.as_ref()) else {
            self.channel_buf = buf;
            return false;
        };
        let more = match wire::recv(channel.as_fd(), &mut buf) {
            Ok(Received::Message(_, Some(_))) => {
                self.worker_misbehaved(wkey, "sent a descriptor");
                false
            }
            Ok(Received::Message(n, None)) => match FromWorker::decode(&buf[..n]) {
                Ok(msg) => {
                    self.on_worker_message(wkey, msg);
                    true
                }
                Err(e) => {
                    self.worker_misbehaved(wkey, &e.to_string());
                    false
                }
            },
            // The worker is exiting.
            Ok(Received::Closed) => {
                self.channel_gone(wkey);
                false
            }
            // The worker exited with a message from us unread (a connection
            // sent ahead, or any, if it was killed). The kernel reports that
            // once, before what the worker sent: read on to EOF.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                self.worker_misbehaved(wkey, &e.to_string());
                false
            }
        };
        self.channel_buf = buf;
        more
    }

    /// The worker's end of the channel is gone: it is exiting, and SIGCHLD
    /// will tell how; one that lives on anyway is killed in the sweep.
    fn channel_gone(&mut self, wkey: WorkerKey) {
        let w = &mut self.workers[wkey];
        if let Some(ch) = w.channel.take() {
            let _ = self.poller.delete(&ch);
            w.channel_lost = Some(Instant::now());
        }
        self.dispatcher.remove_worker(wkey);
    }

    pub(super) fn worker_misbehaved(&mut self, wkey: WorkerKey, what: &str) {
        let w = &mut self.workers[wkey];
        error!("worker {} broke the protocol ({what}); killing it", w.pid);
        if let Some(ch) = w.channel.take() {
            let _ = self.poller.delete(&ch);
        }
        let _ = kill(w.pid, Signal::SIGKILL);
        self.dispatcher.remove_worker(wkey);
    }

    pub(super) fn on_worker_message(&mut self, wkey: WorkerKey, msg: FromWorker<'_>) {
        match msg {
            FromWorker::Ready { pid, features } => {
                let w = &mut self.workers[wkey];
                if w.state != WorkerState::Starting || pid != w.pid.as_raw() as u32 {
                    self.worker_misbehaved(wkey, "unexpected Ready");
                    return;
                }
                w.accepts_ahead = features & wire::FEATURE_AHEAD != 0;
                debug!("worker {pid} ready");
                self.worker_idle(wkey);
            }
            FromWorker::Retiring => {
                let w = &mut self.workers[wkey];
                info!("worker {} reached its {} requests; starting its replacement", w.pid, w.max_requests);
                w.retiring = true;
                self.dispatcher.remove_worker(wkey);
                // It exits after this request: it will never read the next one.
                self.take_back_ahead(wkey);
            }
            FromWorker::Skipped { .. } => {
                let w = &mut self.workers[wkey];
                if w.skips_pending == 0 {
                    self.worker_misbehaved(wkey, "Skipped a connection it was not sent ahead");
                    return;
                }
                w.skips_pending -= 1;
            }
            FromWorker::Done { conn_id, served, keep, leftover } => {
                let WorkerState::Busy(ckey) = self.workers[wkey].state else {
                    self.worker_misbehaved(wkey, "Done while not busy");
                    return;
                };
                if self.conns.get(ckey).map(|c| c.id) != Some(conn_id) {
                    self.worker_misbehaved(wkey, "Done for a connection it does not hold");
                    return;
                }
                // The worker first: free now, or on to the connection sent
                // ahead (it claims that one as soon as it has sent this Done,
                // and nothing takes it back any more).
                let w = &mut self.workers[wkey];
                let next = w.ahead.take();
                match next {
                    Some(next) => {
                        w.state = WorkerState::Busy(next);
                        w.busy_since = Instant::now();
                        if let Some(c) = self.conns.get_mut(next) {
                            c.pending.release();
                        }
                    }
                    None => w.state = WorkerState::Idle,
                }
                let conn = &mut self.conns[ckey];
                conn.served = served;
                conn.state = ConnState::Reading;
                if next.is_none() {
                    // Before the connection may queue again: the free worker
                    // takes what waited before it (and nothing sent ahead
                    // elsewhere meanwhile needs taking back).
                    self.worker_idle(wkey);
                }
                // (Checked again: nothing in worker_idle closes connections
                // today, but a panic here would take the supervisor down.)
                if self.conns.contains(ckey) {
                    if keep && self.stopping == Stopping::No {
                        self.resume_reading(ckey, leftover);
                    } else {
                        self.close_after_response(ckey);
                    }
                }
                if next.is_some() {
                    self.send_ahead(wkey);
                }
            }
        }
    }

    pub(super) fn worker_idle(&mut self, wkey: WorkerKey) {
        let w = &mut self.workers[wkey];
        w.state = WorkerState::Idle;
        if w.channel_lost.is_some() {
            // Exiting: nothing more for it.
            return;
        }
        if w.retiring {
            self.release(wkey);
            return;
        }
        if w.generation != self.serving_generation {
            if self.reload.as_ref().is_some_and(|r| r.generation == w.generation) {
                self.maybe_finish_reload();
            } else {
                self.retire(wkey);
            }
            return;
        }
        let serving = self.serving_generation;
        let ready = || {
            self.workers
                .iter()
                .filter(|(_, w)| w.generation == serving && !w.retiring && w.state != WorkerState::Starting)
                .count()
        };
        if !self.ready_notified && ready() >= self.target_workers {
            self.ready_notified = true;
            info!("generation {} ready: {} workers", self.serving_generation, self.target_workers);
            let line = self.status_line();
            self.notifier.ready(line);
        }
        // A connection sent ahead to a worker that is still on a long request
        // has waited longer than any in the queue: it goes first.
        let any = self.dispatcher.queued() == 0;
        if let Some(ckey) = self.take_back_waiting_ahead(wkey, any) {
            self.hand_over(wkey, ckey);
        } else if let Some(ckey) = self.dispatcher.worker_idle(wkey) {
            self.hand_over(wkey, ckey);
        } else {
            self.update_accepting();
            self.release_idle_workers();
        }
    }

    /// Sends the connection that has waited longest to busy worker `wkey`,
    /// to serve as soon as it has finished its current one: it then finds
    /// its next connection already in its channel, instead of going to
    /// sleep and waiting for the supervisor to answer its Done. It stays
    /// ours to take back until the worker claims it on its scoreboard.
    pub(super) fn send_ahead(&mut self, wkey: WorkerKey) {
        if !self.workers.get(wkey).is_some_and(|w| self.can_take_ahead(w)) {
            return;
        }
        let Some(ckey) = self.dispatcher.take_next() else { return };
        let conn_id = self.conns[ckey].id;
        // With nothing ahead, at most one cell is taken (by the connection
        // a Done made current, until the worker claims it); but the cells
        // are shared memory, so the offer is checked all the same.
        if !self.workers[wkey].scoreboard.slot().offer_ahead(conn_id) {
            self.dispatcher.requeue_front(ckey);
            return;
        }
        match self.send_assign(wkey, ckey, true) {
            Ok(()) => {
                // The buffer stays until the worker has it for sure.
                let w = &mut self.workers[wkey];
                w.ahead = Some(ckey);
                debug!("connection {conn_id} sent ahead to busy worker {}", w.pid);
            }
            Err(e) => {
                self.workers[wkey].scoreboard.slot().revoke_ahead(conn_id);
                self.dispatcher.requeue_front(ckey);
                self.send_failed(wkey, &e);
            }
        }
    }

    /// Sends connection `ckey` (its fd, and the bytes read from it) to
    /// worker `wkey` in an Assign, or an Assign ahead; on success the
    /// connection is the worker's.
    fn send_assign(&mut self, wkey: WorkerKey, ckey: ConnKey, ahead: bool) -> io::Result<()> {
        let conn = &mut self.conns[ckey];
        let w = &self.workers[wkey];
        let channel = w.channel.as_ref().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        ToWorker::Assign {
            conn_id: conn.id,
            served: conn.served,
            peer: &conn.peer,
            data: conn.pending.bytes(),
            ahead,
        }
        .encode(&mut self.msg);
        wire::send(channel.as_fd(), &self.msg, Some(conn.fd.as_fd()))?;
        // Whether the worker wrote on it is told by the scoreboard
        // (`wrote_on`); this count is only for workers too old to say, and
        // for one sent ahead errs on the side of "close" rather than "502".
        conn.state = ConnState::InWorker { worker: wkey, written_before: w.scoreboard.slot().written() };
        Ok(())
    }

    /// A message to a worker could not be sent. A worker that has exited
    /// (it retired, or died) is not misbehaving: its channel stays, so what
    /// it said before going is still read, and SIGCHLD tells the rest.
    fn send_failed(&mut self, wkey: WorkerKey, e: &io::Error) {
        let w = &mut self.workers[wkey];
        if e.kind() == io::ErrorKind::NotConnected {
            // We closed its channel already (released, or gone).
            self.dispatcher.remove_worker(wkey);
        } else if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) {
            debug!("worker {} is gone ({e}); waiting for its exit", w.pid);
            w.channel_lost.get_or_insert_with(Instant::now);
            self.dispatcher.remove_worker(wkey);
        } else {
            // A worker has at most two messages from us in its channel (one
            // sent ahead), so a full buffer means it is broken.
            let what = format!("sending to worker {} failed: {e}", w.pid);
            self.worker_misbehaved(wkey, &what);
        }
    }

    /// A busy worker of the serving generation, able and free to take a
    /// connection ahead.
    fn can_take_ahead(&self, w: &Worker) -> bool {
        w.accepts_ahead
            && !w.retiring
            && w.ahead.is_none()
            && w.skips_pending == 0
            && w.killed.is_none()
            && w.channel.is_some()
            && w.channel_lost.is_none()
            && w.generation == self.serving_generation
            && matches!(w.state, WorkerState::Busy(_))
    }

    /// A connection was queued with no worker free: sends it ahead to the
    /// busy worker whose current request started last (the one most likely
    /// to be quick; a long one may be stuck).
    pub(super) fn send_ahead_to_a_busy_worker(&mut self) {
        let best = self
            .workers
            .iter()
            .filter(|(_, w)| self.can_take_ahead(w))
            .max_by_key(|(_, w)| w.busy_since)
            .map(|(k, _)| k);
        if let Some(wkey) = best {
            self.send_ahead(wkey);
        }
    }

    /// Takes back the connection sent ahead to `wkey`, if the worker has not
    /// claimed it yet, and dispatches it again.
    fn take_back_ahead(&mut self, wkey: WorkerKey) {
        if let Some(ckey) = self.revoke_ahead(wkey) {
            if let Some(idle) = self.dispatcher.conn_back(ckey) {
                self.hand_over(idle, ckey);
            }
        }
    }

    /// Takes back from another worker a connection sent ahead that waits
    /// behind a long request (`any`: or behind any request), for free worker
    /// `wkey`. A worker that has already claimed its connection keeps it.
    fn take_back_waiting_ahead(&mut self, wkey: WorkerKey, any: bool) -> Option<ConnKey> {
        let now = Instant::now();
        let holder = self
            .workers
            .iter()
            .filter(|&(k, w)| k != wkey && w.ahead.is_some())
            .filter(|(_, w)| any || now.duration_since(w.busy_since) >= AHEAD_PATIENCE)
            .min_by_key(|(_, w)| w.busy_since)
            .map(|(k, _)| k)?;
        self.revoke_ahead(holder)
    }

    /// Revokes the connection sent ahead to `wkey` on its scoreboard; the
    /// connection, queued again, if that won the race with the worker.
    fn revoke_ahead(&mut self, wkey: WorkerKey) -> Option<ConnKey> {
        let w = self.workers.get_mut(wkey)?;
        let ckey = w.ahead?;
        let conn = self.conns.get_mut(ckey)?;
        if !w.scoreboard.slot().revoke_ahead(conn.id) {
            // Claimed: the worker's Done for the connection before it is on
            // its way, and makes this one its current.
            return None;
        }
        w.ahead = None;
        w.skips_pending += 1;
        conn.state = ConnState::Queued;
        debug!("took back connection {} sent ahead to worker {}", conn.id, w.pid);
        Some(ckey)
    }

    /// Passes a connection with a complete head to an idle worker.
    pub(super) fn hand_over(&mut self, wkey: WorkerKey, ckey: ConnKey) {
        match self.send_assign(wkey, ckey, false) {
            Ok(()) => {
                // Idle connections must stay cheap: drop the buffer, not just clear it.
                self.conns[ckey].pending.release();
                let worker = &mut self.workers[wkey];
                worker.state = WorkerState::Busy(ckey);
                worker.busy_since = Instant::now();
            }
            Err(e) => {
                self.send_failed(wkey, &e);
                if let Some(idle) = self.dispatcher.conn_back(ckey) {
                    self.hand_over(idle, ckey);
                }
                return;
            }
        }
        self.send_ahead(wkey);
        self.update_accepting();
    }

    pub(super) fn reap_children(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    match self.workers.iter().find(|(_, w)| w.pid == pid).map(|(k, _)| k) {
                        Some(wkey) => self.on_worker_exit(wkey, status),
                        None => debug!("reaped unknown child {pid}: {status:?}"),
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid: {e}");
                    break;
                }
            }
        }
    }

    pub(super) fn on_worker_exit(&mut self, wkey: WorkerKey, status: WaitStatus) {
        // Whatever it said before dying comes first (typically the Done of a
        // worker that retired on purpose): SIGCHLD may overtake the channel.
        self.drain_channel(wkey);
        // A connection sent ahead and never claimed was not started: it is
        // served by another worker, not answered 502.
        self.take_back_ahead(wkey);
        let w = self.workers.remove(wkey);
        self.totals.requests += w.scoreboard.slot().requests.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(ch) = &w.channel {
            let _ = self.poller.delete(ch);
        }
        self.dispatcher.remove_worker(wkey);
        let lived = w.started.elapsed();
        let how = match status {
            WaitStatus::Exited(_, code) => format!("exited with status {code}"),
            WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
            other => format!("{other:?}"),
        };
        if let WorkerState::Busy(ckey) = w.state {
            if let Some(ConnState::InWorker { written_before, .. }) = self.conns.get(ckey).map(|c| c.state) {
                let conn = &self.conns[ckey];
                let wrote = w.scoreboard.slot().wrote_on(conn.id, written_before);
                let (status, why) = if w.killed.is_some() {
                    (504, "the request took longer than the server's timeout")
                } else {
                    (502, "the worker serving this request died")
                };
                let request = w.scoreboard.slot().current_request().unwrap_or_default();
                warn!(
                    "worker {} {how} while serving {request:?} on connection {} from {}{}",
                    w.pid,
                    conn.id,
                    conn.peer,
                    if wrote { "; closing it".to_owned() } else { format!("; answering {status}") }
                );
                if !wrote {
                    let sent = self.send_error(ckey, error_response(status, why));
                    if let Some(log) = &mut self.access_log {
                        let line = RawRequestLine::from_bytes(request.as_bytes());
                        log.write(&Entry {
                            duration: w.busy_since.elapsed(),
                            pid: w.pid.as_raw() as u32,
                            generation: w.generation,
                            ..Entry::refused(&self.conns[ckey].peer, line.parts(), status, sent)
                        });
                    }
                }
                self.conns[ckey].state = ConnState::Reading;
                self.linger(ckey);
            }
        }
        let expected = w.retiring || self.stopping != Stopping::No;
        if expected {
            info!("worker {} (generation {}) {how}", w.pid, w.generation);
            return;
        }
        if w.killed.is_none() {
            warn!("worker {} (generation {}) {how} after {:.1?}", w.pid, w.generation, lived);
        }
        if self.reload.as_ref().is_some_and(|r| r.generation == w.generation) {
            let reload = self.reload.take().expect("checked above");
            let when =
                if w.state == WorkerState::Starting { "before it was ready" } else { "during the reload" };
            self.abandon_reload(reload, &format!("worker {} {how} {when}", w.pid));
            return;
        }
        self.totals.respawns += 1;
        let served = w.scoreboard.slot().requests.load(std::sync::atomic::Ordering::Relaxed);
        let delay = if w.killed.is_some() { Duration::ZERO } else { self.backoff.on_death(lived, served) };
        if delay > Duration::ZERO {
            warn!("workers keep dying young ({} in a row); next start in {delay:?}", self.backoff.failures());
        }
        self.next_spawn_at = self.next_spawn_at.max(Instant::now() + delay);
    }

    /// Kills workers busy on one request for longer than `--timeout`
    /// (SIGTERM, then SIGKILL after the grace period).
    pub(super) fn check_stuck_workers(&mut self, now: Instant) {
        let timeout_ms = self.config.timeout.as_millis() as u64;
        let mut killed = Vec::new();
        for (wkey, w) in self.workers.iter_mut() {
            if let Some(at) = w.channel_lost {
                if now.duration_since(at) >= self.config.kill_grace && w.killed.is_none() {
                    warn!("worker {} closed its channel but did not exit; killing it", w.pid);
                    let _ = kill(w.pid, Signal::SIGKILL);
                    w.channel_lost = None;
                }
            }
            match w.killed {
                Some((at, false)) if now.duration_since(at) >= self.config.kill_grace => {
                    warn!("worker {} did not exit after SIGTERM; sending SIGKILL", w.pid);
                    let _ = kill(w.pid, Signal::SIGKILL);
                    w.killed = Some((at, true));
                }
                Some(_) => {}
                None => {
                    let WorkerState::Busy(ckey) = w.state else { continue };
                    // A worker that never even started the request counts from the hand-over.
                    let age = w
                        .scoreboard
                        .slot()
                        .request_age_ms()
                        .unwrap_or_else(|| now.duration_since(w.busy_since).as_millis() as u64);
                    if age <= timeout_ms {
                        continue;
                    }
                    let peer = self.conns.get(ckey).map(|c| c.peer.as_str()).unwrap_or("?");
                    let request =
                        w.scoreboard.slot().current_request().unwrap_or_else(|| "(not started)".into());
                    warn!(
                        "worker {} has been busy for {:.1}s on {request:?} from {peer} (--timeout {:?}); killing it",
                        w.pid,
                        age as f64 / 1000.0,
                        self.config.timeout
                    );
                    let _ = kill(w.pid, Signal::SIGTERM);
                    w.killed = Some((now, false));
                    self.totals.timeouts += 1;
                    killed.push(wkey);
                }
            }
        }
        for wkey in killed {
            self.take_back_ahead(wkey);
        }
    }
}
