//! The supervisor's one thread: a `polling` loop over the listeners, every
//! client connection, every worker channel and the signal pipe.
//!
//! Invariants (see ARCHITECTURE.md):
//! - A client connection is registered in the poller the first time the
//!   supervisor has to wait for it (`watched`), and stays registered until
//!   it is closed, edge-triggered, so no system call re-arms it per request.
//!   With TCP_DEFER_ACCEPT a request usually arrives with the accept, so a
//!   `Connection: close` client is often served and closed without ever
//!   being registered. An unwatched connection is read before the
//!   supervisor waits on it, so nothing sent before the registration is
//!   missed (registering also reports data already there). The
//!   supervisor reads it only in `Reading` and `Lingering`; an edge that
//!   arrives while the queue or a worker has it only sets `unread`, and the
//!   supervisor reads when the connection comes back. A read shorter than
//!   the buffer took everything there was, so any later byte raises a new
//!   edge: nothing is left unnoticed.
//! - Every fd is deleted from the poller before it is closed.
//! - The supervisor keeps its own copy of a connection while a worker serves
//!   it; nothing is passed back, and a worker's death never loses it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use monodon_proto::access_log::{AccessLog, Entry, RawRequestLine};
use monodon_proto::env::WorkerEnv;
use monodon_proto::http::{error_response, PendingRequest, Rejection};
use monodon_proto::scoreboard::Scoreboard;
use monodon_proto::wire::{self, FromWorker, Received, ToWorker};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{self, MsgFlags, Shutdown};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use polling::{Event, Events, PollMode, Poller};
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
use slab::Slab;

use crate::config::Config;
use crate::listener::Listener;
use crate::sched::{Backoff, Dispatcher};

mod clients;
mod control;
mod invariants;
mod status;
mod workers;

use std::io::{Read, Write};

use crate::control::Totals;
use crate::notify::Notifier;
use crate::spawn::{spawn_worker, WorkerSpec};
use control::ControlConn;

const SIGNAL_KEY: usize = usize::MAX - 1;
const CONTROL_KEY: usize = usize::MAX - 2;
const CONTROL_BASE: usize = 1 << 42;
const LISTENER_BASE: usize = 1 << 40;
const WORKER_BASE: usize = 1 << 41;
// Connections use their slab index as key: below every other range.

/// How often idle, slow and lingering connections are checked for timeouts.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);
/// How long a connection sent ahead may wait behind its worker's current
/// request before a worker that comes free takes it instead.
const AHEAD_PATIENCE: Duration = Duration::from_millis(2);
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
    /// A worker serves it (or will: sent ahead). `written_before` is the
    /// worker's byte counter at hand-over, to tell later whether any
    /// response byte went out, for a worker whose scoreboard does not say
    /// (`Slot::wrote_on`).
    InWorker { worker: WorkerKey, written_before: u64 },
    /// Our last response is out; draining input until EOF or the timeout.
    Lingering,
}

struct Conn {
    id: u64,
    fd: OwnedFd,
    peer: String,
    /// Bytes read and not yet handed to a worker, with how far the framing
    /// code has got with them.
    pending: PendingRequest,
    state: ConnState,
    /// When the current state times out (not used while queued or in a worker).
    deadline: Instant,
    /// Requests served on this connection.
    served: u32,
    /// The socket may hold bytes nobody has read: an edge arrived while a
    /// worker had the connection, or the last read filled the buffer.
    unread: bool,
    /// Registered in the poller (from the first time we waited for it).
    watched: bool,
}

impl Conn {
    /// Between requests of a keep-alive connection, with nothing pending.
    fn is_idle(&self) -> bool {
        self.state == ConnState::Reading && self.pending.is_empty() && !self.unread && self.served > 0
    }
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
    /// When it was sent SIGTERM for running past `--timeout`, and whether
    /// SIGKILL followed.
    killed: Option<(Instant, bool)>,
    /// When it was last handed a connection.
    busy_since: Instant,
    /// When it closed its channel (it should be exiting).
    channel_lost: Option<Instant>,
    /// It said in `Ready` that it takes connections sent ahead.
    accepts_ahead: bool,
    /// A connection sent to it while busy, to serve next (see `send_ahead`).
    ahead: Option<ConnKey>,
    /// Connections sent ahead and taken back, whose `Skipped` has not come
    /// yet: while any is unread in its channel nothing more is sent ahead,
    /// so the channel never holds more than two messages from us.
    skips_pending: u32,
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
    /// Client reads land here first (idle connections hold no buffer).
    scratch: Vec<u8>,
    /// Messages from workers are received here.
    channel_buf: Vec<u8>,
    msg: Vec<u8>,
    next_sweep: Instant,
    stopping: Stopping,
    /// The control socket and its path (removed on exit).
    control: Option<control::ControlSocket>,
    control_conns: Slab<ControlConn>,
    started: Instant,
    totals: Totals,
    last_reload_failure: Option<(String, Instant)>,
    notifier: Notifier,
    /// READY=1 has been sent for the first generation.
    ready_notified: bool,
    /// What the workers' scoreboards say about connections waiting for one.
    others_waiting: bool,
    /// Client connections held at most (from the config or the fd limit).
    max_connections: usize,
    /// (when, total requests then): the last sample for the request rate.
    rate_sample: (Instant, u64),
    requests_per_sec: f64,
    /// Where the requests the supervisor answers itself are logged (the
    /// workers' access log).
    access_log: Option<AccessLog>,
}

impl Supervisor {
    /// Binds the listeners and installs the signal handlers; no worker yet.
    pub fn new(config: Config) -> io::Result<Supervisor> {
        // A configuration whose messages cannot cross a worker channel is
        // refused now, not found out at the first large request.
        crate::spawn::channel(&config.limits)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        raise_fd_limit();
        let poller = Poller::new()?;
        mark_inherited_fds_cloexec();
        let max_connections = match config.max_connections {
            0 => default_max_connections(config.workers),
            n => n,
        };
        let mut listeners = crate::listener::inherited()?;
        for l in &listeners {
            info!("listening on {} (inherited)", l.addr);
        }
        if listeners.is_empty() {
            for addr in &config.listen {
                let l = Listener::bind(addr, config.backlog)?;
                info!("listening on {}", l.addr);
                listeners.push(l);
            }
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
        let control_path = config
            .control
            .clone()
            .unwrap_or_else(|| crate::control::default_control_path(listeners.first().map(|l| &l.addr)));
        let inherited = listeners.iter().any(|l| l.is_inherited());
        let control_socket = control::bind_control(&control_path, inherited)?;
        let control_listener = &control_socket.listener;
        // SAFETY: the control listener lives as long as the supervisor.
        unsafe {
            poller.add_with_mode(
                control_listener.as_raw_fd(),
                Event::readable(CONTROL_KEY),
                PollMode::Level,
            )?
        };
        info!("control socket at {}", control_path.display());
        if let Some(run_as) = &config.run_as {
            let mut owned: Vec<&std::path::Path> = vec![&control_path];
            if let Some(log) = config.access_log.as_deref().filter(|p| *p != "-") {
                owned.push(std::path::Path::new(log));
            }
            run_as.drop_to(&owned)?;
        }
        let control = Some(control_socket);
        let access_log = open_access_log(&config)?;
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let signals = SignalDelivery::with_pipe(
            read,
            write,
            SignalOnly,
            [SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1],
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
            channel_buf: Vec::new(),
            msg: Vec::with_capacity(READ_CHUNK),
            next_sweep: now,
            stopping: Stopping::No,
            control,
            control_conns: Slab::new(),
            started: now,
            totals: Totals::default(),
            last_reload_failure: None,
            notifier: Notifier::from_env(),
            ready_notified: false,
            others_waiting: false,
            max_connections,
            rate_sample: (now, 0),
            requests_per_sec: 0.0,
            access_log,
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
            if let Some(t) = self.notifier.next_wake() {
                wake = wake.min(t);
            }
            if self.active_workers(self.serving_generation) < self.wanted_workers() {
                wake = wake.min(self.next_spawn_at);
            }
            let timeout = wake.saturating_duration_since(now).min(SWEEP_INTERVAL);
            self.events.clear();
            self.poller.wait(&mut self.events, Some(timeout))?;
            let keys: Vec<usize> = self.events.iter().map(|e| e.key).collect();
            for key in keys {
                self.on_event(key);
                self.debug_check_invariants();
            }
            self.publish_queue_state();
            let now = Instant::now();
            if now >= self.next_sweep {
                self.sweep(now);
                self.next_sweep = now + SWEEP_INTERVAL;
                self.debug_check_invariants();
            }
        }
        for l in &self.listeners {
            l.unlink();
        }
        if let Some(control) = &self.control {
            control.remove();
        }
        info!("supervisor {} stopped", std::process::id());
        Ok(())
    }

    fn on_event(&mut self, key: usize) {
        if key == SIGNAL_KEY {
            self.on_signals();
        } else if key == CONTROL_KEY {
            self.on_control_listener_readable();
        } else if key >= CONTROL_BASE {
            self.on_control_event(key - CONTROL_BASE);
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
                SIGHUP => {
                    let _ = self.begin_reload();
                }
                SIGTTIN => self.scale(1),
                SIGTTOU => self.scale(-1),
                SIGUSR1 => self.reopen_logs(),
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
        self.notifier.stopping();
        if let Some(r) = self.reload.take() {
            self.abandon_reload(r, "the supervisor is stopping");
        }
        // Responses still being produced say `Connection: close`.
        for (_, w) in &self.workers {
            w.scoreboard.slot().set_draining();
        }
        self.close_listeners();
        // Idle keep-alive connections close now; a request on its way (part
        // of a head, or a new connection whose first request has not arrived:
        // inherited listeners may lack TCP_DEFER_ACCEPT) is let in, bounded by
        // the head timeout, and served.
        let idle: Vec<ConnKey> = self.conns.iter().filter(|(_, c)| c.is_idle()).map(|(k, _)| k).collect();
        for key in idle {
            self.close_now(key);
        }
        self.release_idle_workers();
    }

    /// SIGUSR1: the supervisor and its workers reopen the access log (after
    /// logrotate moved it). Starting workers open it afresh anyway, and may
    /// not handle USR1 yet.
    fn reopen_logs(&mut self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
        let mut told = 0;
        for (_, w) in &self.workers {
            if w.state != WorkerState::Starting && kill(w.pid, Signal::SIGUSR1).is_ok() {
                told += 1;
            }
        }
        info!("SIGUSR1: {told} workers reopen their access log");
    }

    fn begin_fast_stop(&mut self) {
        info!("fast stop: killing {} workers", self.workers.len());
        self.stopping = Stopping::Fast;
        self.notifier.stopping();
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
        if self.stopping == Stopping::No || self.requests_pending() {
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

    /// Requests not yet handed to a worker: queued, or with part of a head.
    fn requests_pending(&self) -> bool {
        self.dispatcher.queued() > 0
            || self.conns.iter().any(|(_, c)| c.state == ConnState::Reading && !c.is_idle())
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

    /// Tells the workers whether connections wait for one of them, so that
    /// none lingers on its own keep-alive client meanwhile (read-ahead).
    fn publish_queue_state(&mut self) {
        let waiting = self.dispatcher.queued() > 0;
        if waiting != self.others_waiting {
            self.others_waiting = waiting;
            for (_, w) in &self.workers {
                w.scoreboard.slot().set_others_waiting(waiting);
            }
        }
    }

    /// Closes connections whose head, idle or linger time is up.
    fn sweep(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.rate_sample.0);
        if elapsed >= Duration::from_secs(1) {
            let total = self.total_requests();
            self.requests_per_sec = total.saturating_sub(self.rate_sample.1) as f64 / elapsed.as_secs_f64();
            self.rate_sample = (now, total);
        }
        if self.ready_notified && self.notifier.enabled() {
            // The status line reads /proc for every worker: only when due.
            let line = self.notifier.status_due(now).then(|| self.status_line());
            self.notifier.tick(now, line);
        }
        let expired: Vec<(ConnKey, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.state, ConnState::Reading | ConnState::Lingering) && c.deadline <= now
            })
            .map(|(k, c)| (k, c.state == ConnState::Reading && !c.pending.is_empty()))
            .collect();
        for (key, mid_head) in expired {
            if mid_head {
                self.reject(key, Rejection { status: 408, reason: "request not received in time" });
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

/// The access log named by the configuration, if any, opened (created) now.
fn open_access_log(config: &Config) -> io::Result<Option<AccessLog>> {
    let Some(path) = config.access_log.as_deref() else { return Ok(None) };
    AccessLog::open(path, config.access_log_format)
        .map(Some)
        .map_err(|e| io::Error::new(e.kind(), format!("access log {path}: {e}")))
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

/// As many connections as the open-file limit allows, less room for the
/// supervisor's other descriptors (listeners, channels, scoreboards, logs).
fn default_max_connections(workers: usize) -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(1024);
    let reserve = 64 + 4 * workers as u64;
    usize::try_from(soft.saturating_sub(reserve)).unwrap_or(usize::MAX).max(16)
}

/// Whatever descriptors the launcher left open must not reach the workers:
/// mark every inherited fd above stderr close-on-exec (listeners inherited
/// on purpose are adopted afterwards, and are close-on-exec too).
fn mark_inherited_fds_cloexec() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it only
    // sets a flag on descriptors of this process.
    let rc = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    if rc != 0 {
        debug!("close_range: {}", io::Error::last_os_error());
    }
}
