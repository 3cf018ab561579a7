//! The supervisor's one thread: a `polling` loop over the listeners, every
//! client connection, every worker channel and the signal pipe.
//!
//! This file holds the state and the loop; the other files of the module
//! each add the methods of one concern (ARCHITECTURE.md has the map).
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

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use log::info;
use monodon_proto::access_log::AccessLog;
use monodon_proto::http::PendingRequest;
use monodon_proto::scoreboard::Scoreboard;
use nix::unistd::Pid;
use polling::{Events, Poller};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
use slab::Slab;

use crate::config::Config;
use crate::listener::Listener;
use crate::sched::{Backoff, Dispatcher};
use crate::spawn::Code;

mod clients;
mod control;
mod deaths;
mod dispatch;
mod invariants;
mod messages;
mod pool;
mod reload;
mod setup;
mod status;
mod stopping;

use crate::control::Totals;
use crate::notify::Notifier;
use control::ControlConn;

const SIGNAL_KEY: usize = usize::MAX - 1;
const CONTROL_KEY: usize = usize::MAX - 2;
const CONTROL_BASE: usize = 1 << 42;
const LISTENER_BASE: usize = 1 << 40;
const WORKER_BASE: usize = 1 << 41;
// Connections use their slab index as key: below every other range.

/// How often workers' private memory is read for --max-worker-memory.
const MEMORY_CHECK_INTERVAL: Duration = Duration::from_secs(1);
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
    /// Its PROXY protocol header has yet to be read (`--proxy-protocol`).
    proxy_pending: bool,
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
    /// Takes no new connection, and why; exits after the current one.
    retiring: Option<Retirement>,
    /// Its --max-worker-age draw: retired once older.
    age_limit: Option<Duration>,
    /// Its max-requests draw (0: none).
    max_requests: u64,
    /// The largest message its generation's limits allow (it may send a
    /// Done that large, whatever the serving generation's limits are now).
    max_message: usize,
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

/// Why a worker leaves service (status shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retirement {
    /// It served its --max-requests-per-child.
    MaxRequests,
    /// It passed its --max-worker-age.
    MaxAge,
    /// Its private memory passed --max-worker-memory.
    MaxMemory,
    /// A newer generation serves.
    Reloaded,
    /// Its generation's reload failed.
    ReloadFailed,
    /// The worker count went down.
    ScaledDown,
    /// Its generation no longer serves or starts.
    Outdated,
}

impl Retirement {
    fn as_str(self) -> &'static str {
        match self {
            Retirement::MaxRequests => "max-requests",
            Retirement::MaxAge => "max-worker-age",
            Retirement::MaxMemory => "max-worker-memory",
            Retirement::Reloaded => "reload",
            Retirement::ReloadFailed => "reload failed",
            Retirement::ScaledDown => "scale",
            Retirement::Outdated => "old generation",
        }
    }
}

/// A reload in progress: generation `generation` is starting.
#[derive(Debug, Clone)]
struct Reload {
    generation: u64,
    /// The code as resolved when the reload began.
    code: Code,
    /// The configuration the new generation starts with: it becomes the
    /// supervisor's when that generation serves, and is dropped if the
    /// reload fails, so a bad or abandoned reload changes nothing.
    config: Config,
    /// How many workers the new generation needs before it serves.
    workers: usize,
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
    /// The code of the serving generation (command and directory),
    /// resolved when that generation started, so its replacements run the
    /// same release.
    serving_code: Code,
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
    /// When --max-worker-memory is next checked.
    next_memory_check: Instant,
    /// Where the requests the supervisor answers itself are logged (the
    /// workers' access log).
    access_log: Option<AccessLog>,
}

impl Supervisor {
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
            if self.active_workers(self.serving_generation) < self.wanted_workers(self.serving_generation) {
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
}
