//! The supervisor's one thread: a `polling` loop over the listeners, every
//! client connection, every worker channel and the signal pipe.
//!
//! Invariants (see ARCHITECTURE.md):
//! - A client connection is registered in the poller from accept to close,
//!   in oneshot mode, and is armed only while the supervisor itself wants to
//!   read it (reading a head, idle, lingering). While a worker or the queue
//!   has it, it is disarmed, so only one process ever reads it.
//! - Every fd is deleted from the poller before it is closed.
//! - The supervisor keeps its own copy of a connection while a worker serves
//!   it; nothing is passed back, and a worker's death never loses it.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use monodon_proto::http::{self, error_response, Rejection};
use monodon_proto::scoreboard::Scoreboard;
use monodon_proto::wire::{self, FromWorker, Received, ToWorker};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{self, MsgFlags, Shutdown};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use polling::{Event, Events, PollMode, Poller};
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
use slab::Slab;

use crate::config::Config;
use crate::listener::Listener;
use crate::sched::{Backoff, Dispatcher};
use crate::spawn::{spawn_worker, WorkerSpec};

const SIGNAL_KEY: usize = usize::MAX - 1;
const LISTENER_BASE: usize = 1 << 40;
const WORKER_BASE: usize = 1 << 41;
// Connections use their slab index as key: below every other range.

/// How often idle, slow and lingering connections are checked for timeouts.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes read from a client in one go.
const READ_CHUNK: usize = 16 * 1024;
/// Accepts per listener readiness event, so one busy listener cannot starve the rest.
const ACCEPT_BATCH: usize = 64;

type ConnKey = usize;
type WorkerKey = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// The supervisor reads until a head is complete (or the connection is idle).
    Reading,
    /// Has a complete head, waits for a worker.
    Queued,
    /// A worker serves it. `written_before` is the worker's byte counter at
    /// hand-over, to tell later whether any response byte went out.
    InWorker { worker: WorkerKey, written_before: u64 },
    /// Our last response is out; draining input until EOF or the timeout.
    Lingering,
}

struct Conn {
    id: u64,
    fd: OwnedFd,
    peer: String,
    /// Bytes read and not yet handed to a worker.
    buf: Vec<u8>,
    state: ConnState,
    /// When the current state times out (not used while queued or in a worker).
    deadline: Instant,
    /// Requests served on this connection.
    served: u32,
    /// `METHOD target` of the complete head waiting to be served, for logs.
    request_line: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerState {
    /// Spawned; its app is still initialising.
    Starting,
    Idle,
    Busy(ConnKey),
}

struct Worker {
    pid: Pid,
    /// `None` once released: the worker sees EOF and exits.
    channel: Option<OwnedFd>,
    scoreboard: Scoreboard,
    state: WorkerState,
    generation: u64,
    started: Instant,
    /// Takes no new connection; exits after the current one.
    retiring: bool,
    /// Its max-requests draw (0: none).
    max_requests: u64,
    /// The first request line of the connection it was handed, for logs.
    current: String,
    /// When it was sent SIGTERM for running past `--timeout`, and whether
    /// SIGKILL followed.
    killed: Option<(Instant, bool)>,
}

/// A reload in progress: generation `generation` is starting.
#[derive(Debug, Clone)]
struct Reload {
    generation: u64,
    /// The worker command as resolved when the reload began.
    command: Vec<OsString>,
    started: Instant,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    No,
    /// TERM/QUIT: finish what is in flight, then exit.
    Graceful {
        deadline: Instant,
    },
    /// INT: kill the workers and exit.
    Fast,
}

/// The supervisor: owns every socket and every worker.
pub struct Supervisor {
    config: Config,
    poller: Poller,
    events: Events,
    listeners: Vec<Listener>,
    accepting: bool,
    /// After EMFILE and the like, accepting pauses until then.
    accept_paused_until: Option<Instant>,
    signals: SignalDelivery<UnixStream, SignalOnly>,
    conns: Slab<Conn>,
    workers: Slab<Worker>,
    dispatcher: Dispatcher<WorkerKey, ConnKey>,
    backoff: Backoff,
    /// When the next worker may be started (after a quick death).
    next_spawn_at: Instant,
    /// The newest generation started.
    generation: u64,
    /// The generation connections are dispatched to.
    serving_generation: u64,
    /// The worker command of the serving generation, resolved when that
    /// generation started, so its replacements run the same code.
    serving_command: Vec<OsString>,
    reload: Option<Reload>,
    /// Workers wanted per generation (`--workers`, changed by TTIN/TTOU).
    target_workers: usize,
    rng: fastrand::Rng,
    next_conn_id: u64,
    scratch: Vec<u8>,
    msg: Vec<u8>,
    next_sweep: Instant,
    stopping: Stopping,
}

impl Supervisor {
    /// Binds the listeners and installs the signal handlers; no worker yet.
    pub fn new(config: Config) -> io::Result<Supervisor> {
        raise_fd_limit();
        let poller = Poller::new()?;
        let mut listeners = Vec::new();
        for addr in &config.listen {
            let l = Listener::bind(addr, config.backlog)?;
            info!("listening on {}", l.addr);
            listeners.push(l);
        }
        for (i, l) in listeners.iter().enumerate() {
            // SAFETY: each listener is deleted from the poller before it is
            // dropped (see `close_listeners`).
            unsafe {
                poller.add_with_mode(
                    l.fd().as_raw_fd(),
                    Event::readable(LISTENER_BASE + i),
                    PollMode::Level,
                )?
            };
        }
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let signals = SignalDelivery::with_pipe(
            read,
            write,
            SignalOnly,
            [SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU],
        )?;
        // SAFETY: the signal pipe lives as long as the supervisor (and so the poller).
        unsafe {
            poller.add_with_mode(
                signals.get_read().as_raw_fd(),
                Event::readable(SIGNAL_KEY),
                PollMode::Level,
            )?
        };
        let now = Instant::now();
        Ok(Supervisor {
            target_workers: config.workers,
            serving_command: resolve_command(&config.worker_command),
            dispatcher: Dispatcher::new(config.queue_capacity),
            config,
            poller,
            events: Events::new(),
            listeners,
            accepting: true,
            accept_paused_until: None,
            signals,
            conns: Slab::new(),
            workers: Slab::new(),
            backoff: Backoff::default(),
            next_spawn_at: now,
            generation: 1,
            serving_generation: 1,
            reload: None,
            rng: fastrand::Rng::new(),
            next_conn_id: 1,
            scratch: vec![0; READ_CHUNK],
            msg: Vec::with_capacity(READ_CHUNK),
            next_sweep: now,
            stopping: Stopping::No,
        })
    }

    /// Runs until stopped by a signal.
    pub fn run(mut self) -> io::Result<()> {
        info!(
            "monodon {} supervisor {} starting {} workers: {:?}",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            self.config.workers,
            self.config.worker_command
        );
        loop {
            self.spawn_missing_workers();
            if self.finished() {
                break;
            }
            let now = Instant::now();
            let mut wake = self.next_sweep;
            if self.active_workers(self.serving_generation) < self.wanted_workers() {
                wake = wake.min(self.next_spawn_at);
            }
            let timeout = wake.saturating_duration_since(now).min(SWEEP_INTERVAL);
            self.events.clear();
            self.poller.wait(&mut self.events, Some(timeout))?;
            let keys: Vec<usize> = self.events.iter().map(|e| e.key).collect();
            for key in keys {
                self.on_event(key);
            }
            let now = Instant::now();
            if now >= self.next_sweep {
                self.sweep(now);
                self.next_sweep = now + SWEEP_INTERVAL;
            }
        }
        for l in &self.listeners {
            l.unlink();
        }
        info!("supervisor {} stopped", std::process::id());
        Ok(())
    }

    fn on_event(&mut self, key: usize) {
        if key == SIGNAL_KEY {
            self.on_signals();
        } else if key >= WORKER_BASE {
            self.on_channel_readable(key - WORKER_BASE);
        } else if key >= LISTENER_BASE {
            self.on_listener_readable(key - LISTENER_BASE);
        } else {
            self.on_conn_readable(key);
        }
    }

    // ---- signals and stopping ---------------------------------------------

    fn on_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGCHLD => self.reap_children(),
                SIGTERM | SIGQUIT => self.begin_graceful_stop(),
                SIGINT => self.begin_fast_stop(),
                SIGHUP => self.begin_reload(),
                SIGTTIN => self.scale(1),
                SIGTTOU => self.scale(-1),
                other => debug!("ignoring signal {other}"),
            }
        }
    }

    fn begin_graceful_stop(&mut self) {
        if self.stopping != Stopping::No {
            return;
        }
        info!(
            "graceful stop: finishing {} busy and {} queued connections",
            self.conns.iter().filter(|(_, c)| matches!(c.state, ConnState::InWorker { .. })).count(),
            self.dispatcher.queued()
        );
        self.stopping = Stopping::Graceful { deadline: Instant::now() + self.config.graceful_timeout };
        if let Some(r) = self.reload.take() {
            self.abandon_reload(r, "the supervisor is stopping");
        }
        // Responses still being produced say `Connection: close`.
        for (_, w) in &self.workers {
            w.scoreboard.slot().set_draining();
        }
        self.close_listeners();
        let waiting: Vec<ConnKey> =
            self.conns.iter().filter(|(_, c)| c.state == ConnState::Reading).map(|(k, _)| k).collect();
        for key in waiting {
            self.close_now(key);
        }
        self.release_idle_workers();
    }

    fn begin_fast_stop(&mut self) {
        info!("fast stop: killing {} workers", self.workers.len());
        self.stopping = Stopping::Fast;
        self.close_listeners();
        for (_, w) in &self.workers {
            let _ = kill(w.pid, Signal::SIGKILL);
        }
    }

    fn close_listeners(&mut self) {
        for l in &self.listeners {
            let _ = self.poller.delete(l.fd());
        }
        self.accepting = false;
        for l in &self.listeners {
            l.unlink();
        }
        self.listeners.clear();
    }

    /// While stopping, a worker with nothing left to do gets its channel
    /// closed, which tells it to exit.
    fn release_idle_workers(&mut self) {
        if self.stopping == Stopping::No || self.dispatcher.queued() > 0 {
            return;
        }
        let done: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                w.channel.is_some() && matches!(w.state, WorkerState::Idle | WorkerState::Starting)
            })
            .map(|(k, _)| k)
            .collect();
        for wkey in done {
            self.release(wkey);
        }
    }

    fn finished(&mut self) -> bool {
        match self.stopping {
            Stopping::No => false,
            Stopping::Fast => self.workers.is_empty(),
            Stopping::Graceful { deadline } => {
                if Instant::now() >= deadline && !self.workers.is_empty() {
                    warn!("graceful stop timed out: killing {} workers", self.workers.len());
                    for (_, w) in &self.workers {
                        let _ = kill(w.pid, Signal::SIGKILL);
                    }
                    self.stopping = Stopping::Fast;
                }
                self.workers.is_empty()
            }
        }
    }

    // ---- workers --------------------------------------------------------

    fn wanted_workers(&self) -> usize {
        if self.stopping == Stopping::No {
            self.target_workers
        } else {
            0
        }
    }

    /// Workers of `generation` that take new connections (or will, once ready).
    fn active_workers(&self, generation: u64) -> usize {
        self.workers.iter().filter(|(_, w)| w.generation == generation && !w.retiring).count()
    }

    fn spawn_missing_workers(&mut self) {
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
    fn spawn(&mut self, generation: u64) -> io::Result<WorkerKey> {
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
            generation,
            limits: &self.config.limits,
            io_timeout: self.config.io_timeout,
            max_requests,
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
        entry.insert(Worker {
            pid: s.pid,
            channel: Some(s.channel),
            scoreboard: s.scoreboard,
            state: WorkerState::Starting,
            generation,
            started: Instant::now(),
            retiring: false,
            max_requests,
            current: String::new(),
            killed: None,
        });
        Ok(key)
    }

    /// Closes a worker's channel: it exits when it next waits for work.
    fn release(&mut self, wkey: WorkerKey) {
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
    fn retire(&mut self, wkey: WorkerKey) {
        let w = &mut self.workers[wkey];
        w.retiring = true;
        self.dispatcher.remove_worker(wkey);
        if !matches!(w.state, WorkerState::Busy(_)) {
            self.release(wkey);
        }
    }

    // ---- reloads and scaling ----------------------------------------------

    fn begin_reload(&mut self) {
        if self.stopping != Stopping::No {
            return;
        }
        if let Some(r) = self.reload.take() {
            self.abandon_reload(r, "superseded by a newer reload");
        }
        self.generation += 1;
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
    }

    /// Stops a reload's workers; the serving generation carries on.
    /// The caller has taken `reload` out of `self.reload`.
    fn abandon_reload(&mut self, reload: Reload, reason: &str) {
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
    }

    /// Switches dispatch to the new generation once all of it is ready.
    fn maybe_finish_reload(&mut self) {
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
        info!(
            "reload: generation {} serving after {:.1?}; retiring {retired} workers of generation {old}",
            reload.generation,
            reload.started.elapsed()
        );
    }

    fn scale(&mut self, delta: i32) {
        if self.stopping != Stopping::No {
            return;
        }
        if delta > 0 {
            self.target_workers = self.target_workers.saturating_add(1).min(4096);
        } else if self.target_workers > 1 {
            self.target_workers -= 1;
            // Prefer a worker with nothing to finish.
            let serving = self.serving_generation;
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
            if let Some(&(_, wkey)) = candidates.first() {
                self.retire(wkey);
            }
        } else {
            warn!("SIGTTOU ignored: already down to one worker");
            return;
        }
        info!("scaled to {} workers", self.target_workers);
    }

    fn on_channel_readable(&mut self, wkey: WorkerKey) {
        let mut buf = std::mem::take(&mut self.scratch);
        if buf.len() < wire::max_message(&self.config.limits) {
            buf.resize(wire::max_message(&self.config.limits), 0);
        }
        while let Some(channel) = self.workers.get(wkey).and_then(|w| w.channel.as_ref()) {
            match wire::recv(channel.as_fd(), &mut buf) {
                Ok(Received::Message(n, fd)) => {
                    if fd.is_some() {
                        self.worker_misbehaved(wkey, "sent a descriptor");
                        break;
                    }
                    match FromWorker::decode(&buf[..n]) {
                        Ok(msg) => self.on_worker_message(wkey, msg),
                        Err(e) => {
                            self.worker_misbehaved(wkey, &e.to_string());
                            break;
                        }
                    }
                }
                Ok(Received::Closed) => {
                    // It is exiting; SIGCHLD will tell us how.
                    if let Some(ch) = self.workers[wkey].channel.take() {
                        let _ = self.poller.delete(&ch);
                    }
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.worker_misbehaved(wkey, &e.to_string());
                    break;
                }
            }
        }
        self.scratch = buf;
    }

    fn worker_misbehaved(&mut self, wkey: WorkerKey, what: &str) {
        let w = &mut self.workers[wkey];
        error!("worker {} broke the protocol ({what}); killing it", w.pid);
        if let Some(ch) = w.channel.take() {
            let _ = self.poller.delete(&ch);
        }
        let _ = kill(w.pid, Signal::SIGKILL);
        self.dispatcher.remove_worker(wkey);
    }

    fn on_worker_message(&mut self, wkey: WorkerKey, msg: FromWorker<'_>) {
        match msg {
            FromWorker::Ready { pid } => {
                let w = &mut self.workers[wkey];
                if w.state != WorkerState::Starting || pid != w.pid.as_raw() as u32 {
                    self.worker_misbehaved(wkey, "unexpected Ready");
                    return;
                }
                debug!("worker {pid} ready");
                self.worker_idle(wkey);
            }
            FromWorker::Retiring => {
                let w = &mut self.workers[wkey];
                info!("worker {} reached its {} requests; starting its replacement", w.pid, w.max_requests);
                w.retiring = true;
                self.dispatcher.remove_worker(wkey);
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
                let conn = &mut self.conns[ckey];
                conn.served = served;
                conn.state = ConnState::Reading;
                if keep && self.stopping == Stopping::No {
                    conn.buf.clear();
                    conn.buf.extend_from_slice(leftover);
                    self.after_input(ckey, Instant::now());
                } else {
                    self.linger(ckey);
                }
                self.worker_idle(wkey);
            }
        }
    }

    fn worker_idle(&mut self, wkey: WorkerKey) {
        let w = &mut self.workers[wkey];
        w.state = WorkerState::Idle;
        w.current.clear();
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
        if let Some(ckey) = self.dispatcher.worker_idle(wkey) {
            self.hand_over(wkey, ckey);
        } else {
            self.update_accepting();
            self.release_idle_workers();
        }
    }

    /// Passes a connection with a complete head to an idle worker.
    fn hand_over(&mut self, wkey: WorkerKey, ckey: ConnKey) {
        let conn = &mut self.conns[ckey];
        let worker = &mut self.workers[wkey];
        let Some(channel) = worker.channel.as_ref() else {
            self.dispatcher.requeue_front(ckey);
            return;
        };
        ToWorker::Assign { conn_id: conn.id, served: conn.served, peer: &conn.peer, data: &conn.buf }
            .encode(&mut self.msg);
        match wire::send(channel.as_fd(), &self.msg, Some(conn.fd.as_fd())) {
            Ok(()) => {
                conn.state =
                    ConnState::InWorker { worker: wkey, written_before: worker.scoreboard.slot().written() };
                // Idle connections must stay cheap: drop the buffer, not just clear it.
                conn.buf = Vec::new();
                worker.state = WorkerState::Busy(ckey);
                std::mem::swap(&mut worker.current, &mut conn.request_line);
            }
            Err(e) => {
                // A worker only ever has one message from us in flight, so a
                // full buffer means it is broken, not busy.
                let pid = worker.pid;
                self.dispatcher.requeue_front(ckey);
                self.worker_misbehaved(wkey, &format!("hand-over to {pid} failed: {e}"));
                return;
            }
        }
        self.update_accepting();
    }

    fn reap_children(&mut self) {
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

    fn on_worker_exit(&mut self, wkey: WorkerKey, status: WaitStatus) {
        // Whatever it said before dying comes first (typically the Done of a
        // worker that retired on purpose): SIGCHLD may overtake the channel.
        self.on_channel_readable(wkey);
        let w = self.workers.remove(wkey);
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
                let wrote = w.scoreboard.slot().written() != written_before;
                let (status, why) = if w.killed.is_some() {
                    (504, "the request took longer than the server's timeout")
                } else {
                    (502, "the worker serving this request died")
                };
                warn!(
                    "worker {} {how} while serving {:?} on connection {} from {}{}",
                    w.pid,
                    w.current,
                    conn.id,
                    conn.peer,
                    if wrote { "; closing it".to_owned() } else { format!("; answering {status}") }
                );
                if !wrote {
                    self.send_error(ckey, error_response(status, why));
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
        let delay = if w.killed.is_some() { Duration::ZERO } else { self.backoff.on_death(lived) };
        if delay > Duration::ZERO {
            warn!("workers keep dying young ({} in a row); next start in {delay:?}", self.backoff.failures());
        }
        self.next_spawn_at = self.next_spawn_at.max(Instant::now() + delay);
    }

    /// Kills workers busy on one request for longer than `--timeout`
    /// (SIGTERM, then SIGKILL after the grace period).
    fn check_stuck_workers(&mut self, now: Instant) {
        let timeout_ms = self.config.timeout.as_millis() as u64;
        for (_, w) in self.workers.iter_mut() {
            match w.killed {
                Some((at, false)) if now.duration_since(at) >= self.config.kill_grace => {
                    warn!("worker {} did not exit after SIGTERM; sending SIGKILL", w.pid);
                    let _ = kill(w.pid, Signal::SIGKILL);
                    w.killed = Some((at, true));
                }
                Some(_) => {}
                None => {
                    let WorkerState::Busy(ckey) = w.state else { continue };
                    let Some(age) = w.scoreboard.slot().request_age_ms() else { continue };
                    if age <= timeout_ms {
                        continue;
                    }
                    let peer = self.conns.get(ckey).map(|c| c.peer.as_str()).unwrap_or("?");
                    warn!(
                        "worker {} has been busy for {:.1}s on {:?} from {peer} (--timeout {:?}); killing it",
                        w.pid,
                        age as f64 / 1000.0,
                        w.current,
                        self.config.timeout
                    );
                    let _ = kill(w.pid, Signal::SIGTERM);
                    w.killed = Some((now, false));
                }
            }
        }
    }

    // ---- accepting ------------------------------------------------------

    fn update_accepting(&mut self) {
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

    fn on_listener_readable(&mut self, index: usize) {
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

    fn on_accepted(&mut self, fd: OwnedFd, peer: String) {
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

    fn on_conn_readable(&mut self, key: ConnKey) {
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
    fn after_input(&mut self, key: ConnKey, now: Instant) {
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

    fn arm(&mut self, key: ConnKey) {
        let conn = &self.conns[key];
        if let Err(e) = self.poller.modify_with_mode(conn.fd.as_fd(), Event::readable(key), PollMode::Oneshot)
        {
            debug!("re-arming {}: {e}", conn.peer);
            self.close_now(key);
        }
    }

    fn reject(&mut self, key: ConnKey, rejection: Rejection) {
        debug!("{}: {rejection}", self.conns[key].peer);
        self.send_error(key, rejection.response());
        self.linger(key);
    }

    /// Best-effort write of a small response on a non-blocking socket.
    fn send_error(&mut self, key: ConnKey, response: Vec<u8>) {
        let conn = &self.conns[key];
        let _ = socket::send(conn.fd.as_raw_fd(), &response, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT);
    }

    /// Lingering close: send our FIN, then read and discard what the client
    /// still sends, so its unread data cannot make the kernel answer with an
    /// RST that would destroy our last response.
    fn linger(&mut self, key: ConnKey) {
        let conn = &mut self.conns[key];
        let _ = socket::shutdown(conn.fd.as_raw_fd(), Shutdown::Write);
        conn.state = ConnState::Lingering;
        conn.buf = Vec::new();
        conn.deadline = Instant::now() + self.config.linger_timeout;
        self.arm(key);
    }

    fn drain_lingering(&mut self, key: ConnKey) {
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

    fn close_now(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.try_remove(key) else {
            return;
        };
        let _ = self.poller.delete(&conn.fd);
        if conn.state == ConnState::Queued {
            self.dispatcher.remove_conn(key);
        }
        drop(conn);
    }

    /// Closes connections whose head, idle or linger time is up.
    fn sweep(&mut self, now: Instant) {
        let expired: Vec<(ConnKey, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.state, ConnState::Reading | ConnState::Lingering) && c.deadline <= now
            })
            .map(|(k, c)| (k, c.state == ConnState::Reading && !c.buf.is_empty()))
            .collect();
        for (key, mid_head) in expired {
            if mid_head {
                self.reject(key, Rejection { status: 408, reason: "request head not received in time" });
            } else {
                self.close_now(key);
            }
        }
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            self.update_accepting();
        }
        if matches!(self.stopping, Stopping::Graceful { .. }) {
            self.release_idle_workers();
        }
        if self.reload.as_ref().is_some_and(|r| now >= r.deadline) {
            let reload = self.reload.take().expect("checked above");
            let ready = self
                .workers
                .iter()
                .filter(|(_, w)| w.generation == reload.generation && w.state == WorkerState::Idle)
                .count();
            let reason = format!(
                "only {ready} of {} workers ready after --reload-timeout {:?}",
                self.target_workers, self.config.reload_timeout
            );
            self.abandon_reload(reload, &reason);
        }
        self.check_stuck_workers(now);
    }
}

/// Every idle client costs the supervisor one descriptor: raise the soft
/// limit to the hard one, as a front-line server should.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => debug!("open file limit raised from {soft} to {hard}"),
                Err(e) => warn!("cannot raise the open file limit from {soft}: {e}"),
            }
        }
    }
}

/// Resolves the program of a worker command to the file it names now
/// (following symlinks), so that every worker of one generation runs the
/// same code even after a deploy moves a symlink. A program without a `/`
/// is left to the PATH lookup at exec time.
fn resolve_command(command: &[OsString]) -> Vec<OsString> {
    let mut resolved = command.to_vec();
    if let Some(program) = resolved.first_mut() {
        let path = std::path::Path::new(program.as_os_str());
        if path.components().count() > 1 {
            if let Ok(real) = path.canonicalize() {
                *program = real.into_os_string();
            }
        }
    }
    resolved
}
