//! Worker processes in the shell: spawning what the core orders, reading
//! their channels, reaping their exits and answering for a worker that
//! died mid-request.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use crate::poll::{Event, PollMode};
use log::{debug, error, info, warn};
use monodon_proto::access_log::{Entry, RawRequestLine};
use monodon_proto::env::WorkerEnv;
use monodon_proto::http::error_response;
use monodon_proto::wire::{self, FromWorker, Received};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{Supervisor, Wire, WorkerIo, WORKER_BASE};
use crate::config::Config;
use crate::core::{Exit, Make, Misbehaviour, Named, SpawnOrder, Stopping, WorkerKey};
use crate::spawn::{spawn_worker, Code, WorkerSpec};

impl Supervisor {
    /// Starts the workers the core says are missing: forked from their
    /// generation's template, or exec'd (`--spawn exec`).
    pub(super) fn spawn_missing_workers(&mut self) {
        // Called after every event: nothing to carry out when nothing was due.
        let mut started = false;
        while let Some(order) = self.core.next_spawn(Instant::now()) {
            started = true;
            let made = match order.make {
                Make::Exec => self.spawn(order),
                Make::Fork => match self.fork_worker(order) {
                    // The template broke: the core has it down, and orders
                    // this worker again once a new one is ready.
                    Err(e) if e.kind() != io::ErrorKind::Other => {
                        error!("{e}");
                        continue;
                    }
                    made => made,
                },
                Make::StartTemplate => {
                    // The worker is ordered again once the template is ready.
                    self.start_template(order.generation);
                    continue;
                }
            };
            match made {
                Ok(io) => {
                    match io.pid {
                        Some(pid) => info!(
                            "spawned worker {pid} (generation {}, max requests {})",
                            order.generation, order.max_requests
                        ),
                        None => debug!(
                            "asked the template of generation {} for a worker (max requests {})",
                            order.generation, order.max_requests
                        ),
                    }
                    io.scoreboard.slot().set_others_waiting(self.others_waiting);
                    if self.core.stopping() != Stopping::No {
                        // Started during a graceful stop, to serve what waits:
                        // its responses say `Connection: close` like everyone's.
                        io.scoreboard.slot().set_draining();
                    }
                    let forked = io.pid.is_none();
                    let key = self.core.spawned(order, io, Instant::now());
                    self.watch_channel(key);
                    if forked {
                        self.fork_pending(order.generation, key);
                    }
                }
                Err(e) => {
                    error!("{e}");
                    self.core.spawn_failed(order, &e.to_string(), Instant::now());
                }
            }
        }
        if started {
            self.carry_out();
        }
    }

    /// Starts a worker of the order's generation from its command on disk,
    /// with that generation's configuration.
    fn spawn(&mut self, order: SpawnOrder) -> io::Result<WorkerIo> {
        let board = self.spare_boards.take()?;
        let (code, config) = self.code_of(order.generation);
        let spec = WorkerSpec {
            code,
            env: self.worker_env(order.generation, order.max_requests, config),
            listeners: self.listeners_for(config),
        };
        let max_message = wire::max_message(&config.limits);
        let s = spawn_worker(&spec, board)?;
        Ok(WorkerIo {
            pid: Some(s.pid),
            pending_signal: None,
            channel: Some(s.channel),
            scoreboard: s.scoreboard,
            max_message,
            parsed: None,
            vault: None,
            adopted_own: 0,
        })
    }

    /// The environment a worker (or the template) of `generation` starts with.
    pub(super) fn worker_env(&self, generation: u64, max_requests: u64, config: &Config) -> WorkerEnv {
        WorkerEnv {
            supervisor_pid: std::process::id(),
            generation,
            limits: config.limits,
            io_timeout: config.io_timeout,
            max_requests,
            access_log: config.access_log.clone(),
            access_log_format: config.access_log_format,
            read_ahead: config.read_ahead,
            min_body_rate: config.min_body_rate,
            forwarded_allow: config.forwarded_allow.clone(),
            listeners: u16::try_from(self.listeners_for(config).len()).unwrap_or(0),
            health_path: config.health_path.clone(),
            warm_connections: config.warm_connections,
        }
    }

    /// The listeners the workers of a generation with `config` accept from
    /// themselves: none without `--worker-accept`, or with
    /// `--proxy-protocol` (whose headers only the supervisor reads).
    pub(super) fn listeners_for(&self, config: &Config) -> Vec<std::os::fd::BorrowedFd<'_>> {
        if !config.worker_accept || config.proxy_protocol {
            return Vec::new();
        }
        self.listeners.iter().map(|l| l.fd()).collect()
    }

    /// The code and configuration of `generation`: the serving one's, or
    /// the one a reload is starting.
    pub(super) fn code_of(&self, generation: u64) -> (&Code, &Config) {
        match &self.reload_code {
            Some(r) if r.generation == generation => (&r.code, &r.config),
            _ => (&self.serving_code, &self.config),
        }
    }

    fn watch_channel(&mut self, key: WorkerKey) {
        let Some(w) = self.core.worker(key) else { return };
        let Some(channel) = &w.io.channel else { return };
        // SAFETY: the channel is deleted from the poller before it is
        // dropped (`Action::CloseChannel`, `channel_gone`, `on_worker_exit`).
        let added = unsafe {
            self.poller.add_with_mode(
                channel.as_raw_fd(),
                Event::readable(WORKER_BASE + key.0),
                PollMode::Level,
            )
        };
        if let Err(e) = added {
            error!("cannot watch a channel of generation {}: {e}", w.generation);
            if let Some(w) = self.core.worker_io_mut(key) {
                w.signal(Signal::SIGKILL);
            }
        }
    }

    pub(super) fn on_channel_readable(&mut self, wkey: WorkerKey) {
        // One message per readiness event: a worker rarely has more than one
        // queued, and the channel is level-triggered, so a second message
        // raises the event again; reading on to EAGAIN would cost a recvmsg
        // per request for nothing.
        self.receive_from(wkey);
    }

    /// Handles every message a worker has sent (it is exiting, or its
    /// channel is being closed).
    pub(super) fn drain_channel(&mut self, wkey: WorkerKey) {
        while self.receive_from(wkey) {}
    }

    /// Receives and handles one message; false when there was none, or the
    /// channel is gone.
    fn receive_from(&mut self, wkey: WorkerKey) -> bool {
        let mut buf = std::mem::take(&mut self.channel_buf);
        let Some(w) = self.core.worker(wkey) else {
            self.channel_buf = buf;
            return false;
        };
        if buf.len() < w.io.max_message {
            buf.resize(w.io.max_message, 0);
        }
        let Some(channel) = &w.io.channel else {
            self.channel_buf = buf;
            return false;
        };
        let more = match wire::recv(channel.as_fd(), &mut buf) {
            Ok(Received::Message(n, fd)) => match FromWorker::decode(&buf[..n]) {
                Ok(msg) => {
                    self.on_worker_message(wkey, msg, fd);
                    true
                }
                Err(e) => {
                    self.core.misbehaved(wkey, &e.to_string());
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
                self.core.misbehaved(wkey, &e.to_string());
                false
            }
        };
        self.channel_buf = buf;
        more
    }

    /// The worker's end of the channel is gone: it is exiting. One whose
    /// template never named it was never forked (its end went down with
    /// the template's unread message): it is gone already.
    fn channel_gone(&mut self, wkey: WorkerKey) {
        if let Some(ch) = self.core.worker_io_mut(wkey).and_then(|w| w.channel.take()) {
            let _ = self.poller.delete(&ch);
        }
        if self.core.worker(wkey).is_some_and(|w| w.io.pid.is_none()) {
            return self.on_worker_exit(wkey, "was never forked (its template went away)".to_owned());
        }
        self.core.channel_closed(wkey, Instant::now());
    }

    /// Handles a message, and the descriptor it carried: a worker's vault
    /// comes with a Ready announcing `FEATURE_ACCEPT`, a connection with an
    /// Adopt; anything else with one breaks the protocol.
    fn on_worker_message(&mut self, wkey: WorkerKey, msg: FromWorker<'_>, fd: Option<OwnedFd>) {
        let now = Instant::now();
        let fd = match (msg.clone(), fd) {
            (FromWorker::Adopt { conn_id, served, keep, leftover }, Some(conn)) => {
                return self.on_adopt(wkey, conn, conn_id, served, keep, leftover);
            }
            (FromWorker::Adopt { .. }, None) => {
                return self.core.misbehaved(wkey, "Adopt without a connection")
            }
            (FromWorker::Ready { features, .. }, fd) if features & wire::FEATURE_ACCEPT != 0 => match fd {
                Some(vault) => Some(vault),
                None => return self.core.misbehaved(wkey, "FEATURE_ACCEPT without its vault"),
            },
            (_, Some(_)) => return self.core.misbehaved(wkey, "sent a descriptor"),
            (_, None) => None,
        };
        // A worker that wants parsed requests gets them under its own
        // generation's settings.
        let parsed = match msg {
            FromWorker::Ready { features, .. } if features & wire::FEATURE_PARSED != 0 => {
                let generation = self.core.worker(wkey).map_or(0, |w| w.generation);
                let config = self.code_of(generation).1;
                Some(Box::new(super::ParsedFor {
                    limits: config.limits,
                    trusted: config.forwarded_allow.clone(),
                }))
            }
            _ => None,
        };
        let mut port = Wire { msg: &mut self.msg };
        let outcome: Result<(), Misbehaviour> = match msg {
            FromWorker::Ready { pid, features } => {
                let Some(w) = self.core.worker_io_mut(wkey) else { return };
                w.parsed = parsed;
                match w.pid {
                    // Forked, and its Ready came before its template's
                    // Forked: it names itself.
                    None => match i32::try_from(pid) {
                        Ok(raw) if raw > 0 => w.named(Pid::from_raw(raw)),
                        _ => return self.core.misbehaved(wkey, "Ready with an impossible pid"),
                    },
                    Some(known) if known.as_raw() as u32 != pid => {
                        return self.core.misbehaved(wkey, "Ready from another process");
                    }
                    Some(_) => {}
                }
                let ahead = match (features & wire::FEATURE_AHEAD, features & wire::FEATURE_AHEAD_TWO) {
                    (0, _) => 0,
                    (_, 0) => 1,
                    _ => 2,
                };
                let own = features & wire::FEATURE_ACCEPT != 0;
                let warm = features & wire::FEATURE_WARM != 0;
                w.vault = fd;
                self.core.worker_ready(wkey, ahead, own, warm, &mut port, now)
            }
            FromWorker::Retiring => {
                self.core.worker_retiring(wkey, &mut port, now);
                Ok(())
            }
            FromWorker::Skipped { .. } => self.core.worker_skipped(wkey),
            FromWorker::Free => self.core.worker_free(wkey, &mut port, now),
            // Taken above, with its connection.
            FromWorker::Adopt { .. } => Ok(()),
            FromWorker::Done { conn_id, served, keep, leftover } => {
                self.take_done(wkey, conn_id, served, keep, leftover, now)
            }
            // Each as a Done kept alive with nothing left over, in order.
            FromWorker::Dones(dones) => dones
                .iter()
                .try_for_each(|(conn_id, served)| self.take_done(wkey, conn_id, served, true, &[], now)),
            FromWorker::Warm { conn_id, served, cell } => {
                let mut port = Wire { msg: &mut self.msg };
                self.core.worker_warm(wkey, conn_id, served, cell, &mut port, now).map(|ckey| {
                    if let Some(c) = self.core.conn_io_mut(ckey) {
                        c.was_warm = true;
                    }
                })
            }
            FromWorker::Cool { conn_id, served, keep, leftover } => {
                self.core.worker_cool(wkey, conn_id, served, keep, now).map(|ckey| {
                    if let Some(c) = self.core.conn_io_mut(ckey) {
                        c.pending.reset_to(leftover);
                    }
                })
            }
        };
        if let Err(Misbehaviour(what)) = outcome {
            debug!("worker message refused: {what}");
        }
    }

    /// A Done: the core decides, and what the worker read past its last
    /// request is the connection's buffer, to read on from when the core's
    /// Resume comes.
    fn take_done(
        &mut self,
        wkey: WorkerKey,
        conn_id: u64,
        served: u32,
        keep: bool,
        leftover: &[u8],
        now: Instant,
    ) -> Result<(), Misbehaviour> {
        let ckey =
            self.core.worker_done(wkey, conn_id, served, keep, &mut Wire { msg: &mut self.msg }, now)?;
        if let Some(c) = self.core.conn_io_mut(ckey) {
            c.pending.reset_to(leftover);
        }
        Ok(())
    }

    /// A connection the worker accepted itself is ours now: read on from
    /// what it had read, or close it after its response.
    fn on_adopt(
        &mut self,
        wkey: WorkerKey,
        fd: OwnedFd,
        conn_id: u64,
        served: u32,
        keep: bool,
        leftover: &[u8],
    ) {
        let Some(w) = self.core.worker_io_mut(wkey) else { return };
        if w.vault.is_none() {
            return self.core.misbehaved(wkey, "Adopt from a worker that does not accept");
        }
        w.adopted_own = conn_id;
        let peer = monodon_proto::net::peer_of(fd.as_fd());
        let mut io = super::ConnIo::new(fd, peer);
        io.pending.reset_to(leftover);
        self.core.adopt(io, served, keep, Instant::now());
        // At the limit, as after an accept of ours: the longest idle go,
        // or, with none idle, workers stop accepting too (update_accepting).
        if self.core.conn_count() >= self.max_connections {
            self.make_room();
        }
    }

    /// What a dead worker left in its vault: the connection of its own it
    /// was serving, if any, becomes its current one, answered 502 (or 504)
    /// at its exit like one handed over; one it had handed us already, or
    /// had finished, is closed here.
    fn empty_vault(&mut self, wkey: WorkerKey) {
        let Some(w) = self.core.worker_io_mut(wkey) else { return };
        let Some(vault) = w.vault.take() else { return };
        let adopted = w.adopted_own;
        let mut buf = [0u8; 64];
        loop {
            let (n, fd) = match wire::recv_nonblocking(vault.as_fd(), &mut buf) {
                Ok(Some((n, mut fds))) if fds.len() == 1 => (n, fds.remove(0)),
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        debug!("reading a vault: {e}");
                    }
                    return;
                }
            };
            let Ok(deposit) = wire::Deposit::decode(&buf[..n]) else { continue };
            if deposit.conn_id == adopted {
                continue;
            }
            let peer = monodon_proto::net::peer_of(fd.as_fd());
            let mut io = super::ConnIo::new(fd, peer);
            io.written_before = deposit.written;
            // Unclaimed (the worker had one of ours): dropped, closed.
            let _ = self.core.vaulted(wkey, io, deposit.conn_id, Instant::now());
        }
    }

    pub(super) fn reap_children(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    let how = describe(status);
                    let found = self.core.workers().find(|(_, w)| w.io.pid == Some(pid)).map(|(k, _)| k);
                    match found {
                        Some(wkey) => self.on_worker_exit(wkey, how),
                        None if self.template_exited(pid, &how) => {}
                        // A worker that died before its template named it,
                        // or an orphan of a worker's (we are a subreaper).
                        None => self.unclaimed_exit(pid, how),
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

    /// A child nobody knew: kept a while, in case a template names it.
    fn unclaimed_exit(&mut self, pid: Pid, how: String) {
        debug!("reaped child {pid}, not (yet) known: {how}");
        if self.unclaimed_exits.len() >= 1024 {
            self.unclaimed_exits.clear();
        }
        self.unclaimed_exits.insert(pid, how);
    }

    pub(super) fn on_worker_exit(&mut self, wkey: WorkerKey, how: String) {
        // Whatever it said before dying comes first (typically the Done of a
        // worker that retired on purpose): SIGCHLD may overtake the channel.
        self.drain_channel(wkey);
        self.empty_vault(wkey);
        self.forget_fork(wkey);
        let now = Instant::now();
        let Some(exit) = self.core.worker_exited(wkey, &how, &mut Wire { msg: &mut self.msg }, now) else {
            return;
        };
        let Exit { io: w, generation, lived, conn, busy_for, expected, killed } = exit;
        self.core.totals_mut().requests += w.requests();
        self.core.totals_mut().accepted_by_workers += w.scoreboard.slot().accepted();
        self.departed_responses.merge(&w.scoreboard.slot().responses());
        if let Some(ch) = &w.channel {
            let _ = self.poller.delete(ch);
        }
        if let Some((ckey, answer)) = conn {
            let request = w.scoreboard.slot().current_request().unwrap_or_default();
            let (conn_id, peer) = match self.core.conn(ckey) {
                Some(c) => (c.id, c.io.peer.clone()),
                None => (0, String::new()),
            };
            warn!(
                "worker {} {how} while serving {request:?} on connection {conn_id} from {peer}{}",
                w.pid(),
                match answer {
                    Some(status) => format!("; answering {status}"),
                    None => "; closing it".to_owned(),
                }
            );
            if let Some(status) = answer {
                let why = if status == 504 {
                    "the request took longer than the server's timeout"
                } else {
                    "the worker serving this request died"
                };
                let sent = self.send_error(ckey, error_response(status, why));
                self.own_responses.count(status);
                if let Some(log) = &mut self.access_log {
                    let line = RawRequestLine::from_bytes(request.as_bytes());
                    log.write(&Entry {
                        duration: busy_for.unwrap_or_default(),
                        pid: w.pid(),
                        generation,
                        ..Entry::refused(&peer, line.parts(), status, sent)
                    });
                }
            }
            self.linger(ckey);
        }
        if expected {
            info!("worker {} (generation {generation}) {how}", w.pid());
        } else if !killed {
            warn!("worker {} (generation {generation}) {how} after {lived:.1?}", w.pid());
        }
        // Reaped, so nobody maps its scoreboard any more. (One never named
        // may yet be forked by a template that was about to.)
        if w.pid.is_some() {
            self.spare_boards.give(w.scoreboard);
        }
    }
}

/// How a child ended, for the log.
fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
        other => format!("{other:?}"),
    }
}
