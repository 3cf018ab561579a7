//! The supervisor's decisions, as a state machine over plain data.
//!
//! [`Core`] takes events (a connection has a complete request, is idle or
//! lingering, closed; a worker said something, its channel closed, it
//! exited; a reload, a scale, a stop; the time) and decides: which worker
//! gets which connection, what is sent ahead and taken back, which workers
//! start, retire, are signalled, which connection is closed or answered,
//! what systemd and the control clients are told. It never makes a system
//! call and never reads the clock: time comes in with every event, and the
//! event loop (`event_loop`, the shell) carries out what it decides.
//!
//! What it decides goes out two ways:
//! - [`Action`]s, queued in order for the shell to take ([`Core::next_action`]);
//! - the [`Port`], for the few effects whose result the very next decision
//!   depends on: sending an Assign (a worker that has gone makes the
//!   connection someone else's at once), and the scoreboard's
//!   compare-and-swap on a connection sent ahead (the worker may claim it
//!   at the same moment the core takes it back: exactly one wins).
//!
//! The shell's own data for a connection (`C`: its fd, its bytes) and a
//! worker (`W`: its process, channel, scoreboard) rides along in the core's
//! tables, so a key names one entry and nothing is kept in step by hand.
//! The simulation (`sim`) drives the same core with a simulated world.
//!
//! The parts, each owning its data: `clients` (where each connection is),
//! `pool` (each worker's lifecycle, spawning, release and retirement),
//! `dispatch` (hand-over, sending ahead, taking back), `messages` (what
//! workers say, and their exits), `generations` (reloads and scaling),
//! `stopping` (stops and the periodic tick). `invariants` checks them all.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::control::Totals;
use crate::sched::{Backoff, Dispatcher};

mod clients;
mod dispatch;
mod generations;
mod invariants;
mod messages;
mod pool;
#[cfg(test)]
mod sim;
mod stopping;
mod templates;
mod warm;

pub use clients::{Conn, Place};
pub use generations::Reload;
pub use messages::{Exit, Misbehaviour};
pub use monodon_proto::scoreboard::Claim;
pub use pool::{Activity, Ahead, Channel, Kill, Retirement, Service, SpawnOrder, Worker, AHEAD_DEPTH};
pub use templates::{Make, TemplateLife};

/// How long a worker that accepts may be on a request of its own before
/// the tick asks for it (a claim), so that the core knows it is busy: with
/// every worker so, the supervisor accepts again and holds what comes.
pub const OWN_NOTICE: Duration = Duration::from_millis(100);

/// How long a connection sent ahead may wait behind its worker's current
/// request before a worker that comes free takes it instead.
pub const AHEAD_PATIENCE: Duration = Duration::from_millis(2);

/// A client connection's key (also its key in the poller).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey(pub usize);

/// A worker's key (its channel's key in the poller is derived from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerKey(pub usize);

impl fmt::Display for ConnKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

impl fmt::Display for WorkerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// The settings the decisions depend on (a part of `Config`; a reload
/// brings new ones, adopted when its generation serves).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub head_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub linger_timeout: Duration,
    /// A worker busy on one request longer than this is killed.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    pub graceful_timeout: Duration,
    pub reload_timeout: Duration,
    pub queue_capacity: usize,
    pub min_requests: u64,
    pub max_requests: u64,
    pub max_worker_age: Option<Duration>,
    pub max_worker_memory: Option<u64>,
    /// Workers are forked from the generation's template (`--spawn
    /// template`), else each exec'd.
    pub templates: bool,
}

impl From<&crate::Config> for Settings {
    fn from(c: &crate::Config) -> Settings {
        Settings {
            head_timeout: c.head_timeout,
            keepalive_timeout: c.keepalive_timeout,
            linger_timeout: c.linger_timeout,
            timeout: c.timeout,
            kill_grace: c.kill_grace,
            graceful_timeout: c.graceful_timeout,
            reload_timeout: c.reload_timeout,
            queue_capacity: c.queue_capacity,
            min_requests: c.min_requests,
            max_requests: c.max_requests,
            max_worker_age: c.max_worker_age,
            max_worker_memory: c.max_worker_memory,
            templates: c.spawn == crate::config::SpawnMode::Template,
        }
    }
}

/// A signal for a worker's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// What systemd is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// READY=1 with a status line (first serving, and after each reload).
    Ready,
    Reloading,
    Stopping,
}

/// What the core has decided, for the shell to carry out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Signal {
        worker: WorkerKey,
        signal: Signal,
    },
    /// Close our end of the worker's channel (and stop watching it): it
    /// exits when it next waits for work.
    CloseChannel {
        worker: WorkerKey,
    },
    /// Back from a worker and kept alive: read on from what the worker
    /// left over (the shell has put that in the connection's buffer), and
    /// tell the core what it finds.
    Resume {
        conn: ConnKey,
    },
    /// Its last response is out: close it, lingering if the client has
    /// sent more.
    CloseAfterResponse {
        conn: ConnKey,
    },
    /// Close it now (idle at a stop, or idle or lingering too long).
    Close {
        conn: ConnKey,
    },
    /// A worker keeps it warm: stop watching it (its requests are the
    /// worker's to see) until it comes back with a `Resume`.
    Warmed {
        conn: ConnKey,
    },
    /// Its head did not arrive in time: answer 408 and close.
    HeadTimedOut {
        conn: ConnKey,
    },
    /// A connection sent ahead is its worker's now: its buffer can go.
    Claimed {
        conn: ConnKey,
    },
    /// Responses in progress say `Connection: close` (a graceful stop).
    Drain,
    Notify(Notice),
    /// A reload ended: its generation serves (Ok) or it was abandoned;
    /// the control clients waiting for it get the message.
    ReloadFinished {
        generation: u64,
        outcome: Result<String, String>,
    },
    /// The template of a generation that is over: close its channel (it
    /// exits) and let it go.
    ReleaseTemplate {
        generation: u64,
    },
    /// The workers of `generation` are not to retire at their max-requests
    /// limit (`hold`: it cannot make new ones), or may again.
    HoldLimits {
        generation: u64,
        hold: bool,
    },
}

/// Why a message could not be sent to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The worker has exited or is exiting (its end is closed).
    Gone,
    /// Its channel has no room: nothing was sent.
    Full,
    /// Anything else: the worker is broken.
    Failed(String),
}

/// The effects whose outcome the core needs at once.
pub trait Port<C, W> {
    /// Sends `conn` (with the bytes read from it) to `worker` in an Assign,
    /// or an Assign ahead.
    fn assign(
        &mut self,
        worker: &W,
        conn: &mut C,
        id: u64,
        served: u32,
        ahead: bool,
    ) -> Result<(), SendError>;
    /// Marks `id` as sent ahead on the worker's scoreboard; false if both
    /// cells are taken.
    fn offer_ahead(&mut self, worker: &W, id: u64) -> bool;
    /// Takes `id` back; false if the worker has claimed it first.
    fn revoke_ahead(&mut self, worker: &W, id: u64) -> bool;
    /// How long the worker has been on its current request (its scoreboard),
    /// if it says.
    fn request_age(&self, worker: &W) -> Option<Duration>;
    /// Whether any response byte went out on `conn` from this worker.
    fn wrote_on(&self, worker: &W, conn: &C, id: u64) -> bool;
    /// Requests it has served (its scoreboard).
    fn served(&self, worker: &W) -> u64;
    /// The worker's private memory in bytes (read only when asked).
    fn private_memory(&self, worker: &W) -> Option<u64>;
    /// Claims an idle worker that accepts connections itself
    /// (`FEATURE_ACCEPT`) before it is handed anything or let go: `Own` if
    /// it is serving a connection of its own (it says Free when done).
    fn claim(&mut self, worker: &W) -> Claim;
    /// Lets a claimed worker that is idle accept on its own again.
    fn let_go(&mut self, worker: &W);
    /// Takes warm connection `id` back from the worker's cell `cell`; false
    /// if the worker is serving a request on it.
    fn revoke_warm(&mut self, worker: &W, cell: u8, id: u64) -> bool;
    /// Whether the worker had claimed warm connection `id` (it was serving
    /// a request on it), for a worker that has died.
    fn warm_claimed(&self, worker: &W, cell: u8, id: u64) -> bool;
    /// How long ago the worker finished its last request on cell `cell`.
    fn warm_idle(&self, worker: &W, cell: u8) -> Duration;
    /// Whether a warm connection has input waiting (a request nobody has
    /// read), so it must not be left behind a busy worker.
    fn input_waiting(&self, conn: &C) -> bool;
}

/// What the log says about a worker: its process, and the request it is on
/// (its scoreboard).
pub trait Named {
    fn pid(&self) -> u32;
    fn request_line(&self) -> Option<String>;
}

/// What the log says about a connection: the client.
pub trait Peer {
    fn peer(&self) -> &str;
}

/// Whether the supervisor is stopping, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopping {
    No,
    /// TERM/QUIT: finish what is in flight, then exit.
    Graceful {
        deadline: Instant,
    },
    /// INT: kill the workers and exit.
    Fast,
}

/// The supervisor's decisions and the state they are made from.
pub struct Core<C, W> {
    settings: Settings,
    conns: Slab<Conn<C>>,
    workers: Slab<Worker<W>>,
    dispatcher: Dispatcher<WorkerKey, ConnKey>,
    backoff: Backoff,
    /// When the next worker may be started (after a quick death).
    next_spawn_at: Instant,
    /// The newest generation started.
    newest: u64,
    /// The generation connections are dispatched to.
    serving: u64,
    reload: Option<Reload>,
    /// Workers wanted per generation (`--workers`, TTIN/TTOU, `scale`).
    target: usize,
    stopping: Stopping,
    /// READY=1 has been sent for the first generation.
    ready_notified: bool,
    totals: Totals,
    /// How long complete requests waited for a worker.
    queue_wait: monodon_proto::histogram::Histogram,
    last_reload_failure: Option<(String, Instant)>,
    next_conn_id: u64,
    rng: fastrand::Rng,
    actions: VecDeque<Action>,
    /// How long the last workers took from start to Ready (for status).
    start_times: VecDeque<Duration>,
    templates: templates::Templates,
    /// Generations that cannot make workers now: theirs serve on past
    /// their max-requests limit (`Action::HoldLimits`).
    limits_held: std::collections::BTreeSet<u64>,
    /// Workers are not to accept connections themselves (the shell holds
    /// as many as `--max-connections` allows): idle ones stay claimed.
    accept_held: bool,
    /// The simulation's deliberate bug: a dead worker's claimed
    /// connections are forgotten, not closed as finished.
    #[cfg(test)]
    pub(crate) forget_unreported: bool,
    /// Another: a worker dead on a warm connection it served between two
    /// of ours was still on the one before.
    #[cfg(test)]
    pub(crate) forget_before_warm: bool,
}

/// Start times kept for the status.
const START_TIMES_KEPT: usize = 1024;

impl<C: Peer, W: Named> Core<C, W> {
    /// Generation 1, with `workers` wanted; `seed` drives the per-worker draws.
    pub fn new(settings: Settings, workers: usize, now: Instant, seed: u64) -> Self {
        Core {
            dispatcher: Dispatcher::new(settings.queue_capacity),
            settings,
            conns: Slab::new(),
            workers: Slab::new(),
            backoff: Backoff::default(),
            next_spawn_at: now,
            newest: 1,
            serving: 1,
            reload: None,
            target: workers,
            stopping: Stopping::No,
            ready_notified: false,
            totals: Totals::default(),
            queue_wait: Default::default(),
            last_reload_failure: None,
            next_conn_id: 1,
            rng: fastrand::Rng::with_seed(seed),
            actions: VecDeque::new(),
            start_times: VecDeque::new(),
            templates: Default::default(),
            limits_held: Default::default(),
            accept_held: false,
            #[cfg(test)]
            forget_unreported: false,
            #[cfg(test)]
            forget_before_warm: false,
        }
    }

    /// The next thing to do, in the order decided.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn act(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    // ---- what the shell may read -------------------------------------------

    #[cfg(test)]
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn conn(&self, key: ConnKey) -> Option<&Conn<C>> {
        self.conns.get(key.0)
    }

    pub fn conn_io_mut(&mut self, key: ConnKey) -> Option<&mut C> {
        self.conns.get_mut(key.0).map(|c| &mut c.io)
    }

    pub fn conns(&self) -> impl Iterator<Item = (ConnKey, &Conn<C>)> {
        self.conns.iter().map(|(k, c)| (ConnKey(k), c))
    }

    pub fn conn_count(&self) -> usize {
        self.conns.len()
    }

    pub fn worker(&self, key: WorkerKey) -> Option<&Worker<W>> {
        self.workers.get(key.0)
    }

    pub fn worker_io_mut(&mut self, key: WorkerKey) -> Option<&mut W> {
        self.workers.get_mut(key.0).map(|w| &mut w.io)
    }

    pub fn workers(&self) -> impl Iterator<Item = (WorkerKey, &Worker<W>)> {
        self.workers.iter().map(|(k, w)| (WorkerKey(k), w))
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    pub fn queued(&self) -> usize {
        self.dispatcher.queued()
    }

    pub fn queue_full(&self) -> bool {
        self.dispatcher.is_full()
    }

    /// An idle worker of the serving generation accepts connections itself:
    /// the supervisor need not (it would only race it for them).
    pub fn workers_accept(&self) -> bool {
        !self.accept_held
            && self.stopping == Stopping::No
            && self.dispatcher.idle().iter().any(|w| self.workers.get(w.0).is_some_and(|w| w.accepts_own))
    }

    /// Whether workers are kept from accepting ([`Core::hold_accepting`]).
    #[cfg(test)]
    pub fn accept_held(&self) -> bool {
        self.accept_held
    }

    /// Whether workers may accept connections themselves: not while the
    /// supervisor may take no more (`--max-connections`), for what they
    /// cannot serve at once comes to it. Idle ones are claimed, or let go.
    pub fn hold_accepting(&mut self, hold: bool, port: &mut impl Port<C, W>, now: Instant) {
        if hold == self.accept_held {
            return;
        }
        self.accept_held = hold;
        let idle: Vec<WorkerKey> = self.dispatcher.idle().to_vec();
        for wkey in idle {
            if hold {
                self.claim_idle(wkey, port, now);
            } else if let Some(w) = self.workers.get(wkey.0).filter(|w| w.accepts_own) {
                port.let_go(&w.io);
            }
        }
    }

    pub fn serving_generation(&self) -> u64 {
        self.serving
    }

    pub fn reload(&self) -> Option<&Reload> {
        self.reload.as_ref()
    }

    pub fn target_workers(&self) -> usize {
        self.target
    }

    pub fn stopping(&self) -> Stopping {
        self.stopping
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// How long complete requests waited for a worker, to their hand-over.
    pub fn queue_wait(&self) -> &monodon_proto::histogram::Histogram {
        &self.queue_wait
    }

    /// For what the shell counts itself (requests, read from scoreboards).
    pub fn totals_mut(&mut self) -> &mut Totals {
        &mut self.totals
    }

    pub fn last_reload_failure(&self) -> Option<&(String, Instant)> {
        self.last_reload_failure.as_ref()
    }

    pub fn ready_notified(&self) -> bool {
        self.ready_notified
    }

    /// How long the last workers took from start to Ready, oldest first.
    pub fn start_times(&self) -> impl Iterator<Item = Duration> + '_ {
        self.start_times.iter().copied()
    }

    fn record_start(&mut self, took: Duration) {
        if self.start_times.len() == START_TIMES_KEPT {
            self.start_times.pop_front();
        }
        self.start_times.push_back(took);
    }

    /// When the shell must wake to start a missing worker, if one is missing.
    pub fn spawn_wake(&self) -> Option<Instant> {
        let worker = (self.active_workers(self.serving) < self.wanted_workers(self.serving))
            .then_some(self.next_spawn_at)
            .and_then(|due| self.template_wake(due));
        match (worker, self.template_retry_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
