//! The workers: each one's lifecycle, how many are wanted, starting them,
//! and taking them out of service (release, retire).

use std::time::{Duration, Instant};

use log::{info, warn};

use super::{Action, ConnKey, Core, Named, Notice, Peer, Port, Signal, Stopping, WorkerKey};

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Spawned; its app is still initialising.
    Starting,
    Idle,
    /// Serving `conn` since `since`; `ahead`: connections sent to it to
    /// serve next, each ours to take back until it claims it.
    Busy {
        conn: ConnKey,
        since: Instant,
        ahead: Ahead,
    },
    /// Serving a connection it accepted itself (known from a claim that
    /// found it so, at `since`); it says Free when done. Its connection is
    /// in its vault, not in the core, until it dies.
    Own {
        since: Instant,
    },
}

/// The most connections sent ahead to one busy worker. Its scoreboard has
/// a claim cell for each, and one more for the connection a Done made
/// current before the worker claimed it.
pub const AHEAD_DEPTH: usize = 2;

/// The connections sent ahead to a busy worker, in the order of its
/// channel, which is the order it serves them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ahead {
    keys: [Option<ConnKey>; AHEAD_DEPTH],
}

impl Ahead {
    pub fn len(&self) -> usize {
        self.keys.iter().take_while(|k| k.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.keys[0].is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = ConnKey> + '_ {
        self.keys.iter().map_while(|k| *k)
    }

    /// Sent after the others (`can_take_ahead` checked there is room; the
    /// invariants would find one lost).
    pub fn push(&mut self, ckey: ConnKey) {
        let len = self.len();
        debug_assert!(len < AHEAD_DEPTH, "more sent ahead than the scoreboard has cells for");
        if let Some(free) = self.keys.get_mut(len) {
            *free = Some(ckey);
        }
    }

    /// The one the worker serves next.
    pub fn pop_front(&mut self) -> Option<ConnKey> {
        let first = self.keys[0];
        self.keys.rotate_left(1);
        self.keys[AHEAD_DEPTH - 1] = None;
        first
    }

    /// The one sent last (the one that waits longest for the worker).
    pub fn last(&self) -> Option<ConnKey> {
        self.iter().last()
    }

    pub fn pop_last(&mut self) -> Option<ConnKey> {
        let len = self.len();
        (len > 0).then(|| self.keys[len - 1].take()).flatten()
    }
}

/// Whether a worker takes new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    InService,
    /// Takes nothing new, and why; exits after its current connection.
    Retiring(Retirement),
}

/// The supervisor's end of a worker's channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Open,
    /// We closed it (released, or the worker broke the protocol).
    Closed,
    /// The worker closed its end at `at`: it should be exiting.
    Lost {
        at: Instant,
    },
}

/// A worker being killed: SIGTERM at `at`, and whether SIGKILL followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kill {
    pub at: Instant,
    pub escalated: bool,
}

/// Why a worker leaves service (status shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retirement {
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
    pub fn as_str(self) -> &'static str {
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

    fn is_recycling(self) -> bool {
        matches!(self, Retirement::MaxRequests | Retirement::MaxAge | Retirement::MaxMemory)
    }
}

/// A worker process.
pub struct Worker<W> {
    /// The shell's part: pid, channel, scoreboard.
    pub io: W,
    pub generation: u64,
    pub started: Instant,
    pub activity: Activity,
    pub service: Service,
    pub channel: Channel,
    /// Sent SIGTERM for running past `--timeout`.
    pub killed: Option<Kill>,
    /// Its max-requests draw (0: none).
    pub max_requests: u64,
    /// Its --max-worker-age draw: retired once older.
    pub age_limit: Option<Duration>,
    /// How many connections it takes ahead, by what it said in Ready
    /// (`FEATURE_AHEAD`, `FEATURE_AHEAD_TWO`): 0 to `AHEAD_DEPTH`.
    pub ahead_depth: usize,
    /// It said in Ready that it accepts connections itself when free.
    pub accepts_own: bool,
    /// It said in Ready that it keeps connections warm (`FEATURE_WARM`).
    pub keeps_warm: bool,
    /// The connections it keeps warm (`Place::Warm`), at most `WARM_CELLS`.
    pub warm: Vec<ConnKey>,
    /// Connections sent ahead and taken back whose Skipped has not come
    /// yet: while any is unread in its channel nothing more is sent ahead,
    /// so the channel never holds more than `1 + ahead_depth` messages
    /// from us.
    pub skips_pending: u32,
    /// Near a recycling limit: its successor has been ordered, and it
    /// serves on until the successor is ready, then retires for this reason.
    /// So a recycled worker leaves no gap in the pool.
    pub outgoing: Option<Retirement>,
}

impl<W> Worker<W> {
    pub fn retiring(&self) -> Option<Retirement> {
        match self.service {
            Service::InService => None,
            Service::Retiring(why) => Some(why),
        }
    }

    pub fn current(&self) -> Option<ConnKey> {
        match self.activity {
            Activity::Busy { conn, .. } => Some(conn),
            _ => None,
        }
    }

    pub fn ahead(&self) -> Ahead {
        match self.activity {
            Activity::Busy { ahead, .. } => ahead,
            _ => Ahead::default(),
        }
    }

    /// When its current connection was handed to it.
    pub fn busy_since(&self) -> Option<Instant> {
        match self.activity {
            Activity::Busy { since, .. } | Activity::Own { since } => Some(since),
            _ => None,
        }
    }

    /// In service and not outgoing: it counts toward the workers wanted.
    pub fn staying(&self) -> bool {
        self.service == Service::InService && self.outgoing.is_none()
    }

    /// In service with its channel open: it may be handed connections.
    pub fn reachable(&self) -> bool {
        self.service == Service::InService && self.channel == Channel::Open
    }
}

/// A worker to start: the shell spawns it and reports back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnOrder {
    pub generation: u64,
    /// Exec it, fork it, or start the generation's template first.
    pub make: super::Make,
    /// Its max-requests draw (0: none).
    pub max_requests: u64,
    pub age_limit: Option<Duration>,
}

impl<C: Peer, W: Named> Core<C, W> {
    /// Workers wanted in `generation`: the serving one's target, or the
    /// size a reload's generation needs.
    pub(super) fn wanted_workers(&self, generation: u64) -> usize {
        match &self.reload {
            _ if self.stopping == Stopping::Fast => 0,
            // A graceful stop serves what has arrived: a worker that retires
            // meanwhile (max requests) is replaced while requests wait.
            _ if self.stopping != Stopping::No && !self.requests_pending() => 0,
            Some(r) if r.generation == generation => r.workers,
            _ => self.target,
        }
    }

    /// Workers of `generation` that take new connections (or will, once
    /// ready) and are not on their way out.
    pub(super) fn active_workers(&self, generation: u64) -> usize {
        self.workers.iter().filter(|(_, w)| w.generation == generation && w.staying()).count()
    }

    /// The next worker to start now, if one is missing: the serving
    /// generation's first (unless backing off), then a reload's; each only
    /// when it can be made (a template still loading makes none).
    pub fn next_spawn(&mut self, now: Instant) -> Option<SpawnOrder> {
        if let Some(generation) = self.template_due(now) {
            // A template that died is started again at once (after its
            // back-off), not when a worker is next needed: that worker
            // would wait for the app to load.
            return Some(SpawnOrder {
                generation,
                make: super::Make::StartTemplate,
                max_requests: 0,
                age_limit: None,
            });
        }
        let serving = self.serving;
        let serving_due =
            self.active_workers(serving) < self.wanted_workers(serving) && now >= self.next_spawn_at;
        let reloading = self
            .reload
            .as_ref()
            .map(|r| r.generation)
            .filter(|&g| self.active_workers(g) < self.wanted_workers(g));
        let due = [serving_due.then_some(serving), reloading];
        let (generation, make) = due.into_iter().flatten().find_map(|g| {
            let templates = self.settings_of(g).templates;
            Some((g, self.make_for(g, templates, now)?))
        })?;
        let settings = self.settings_of(generation);
        let (max_worker_age, limits) =
            (settings.max_worker_age, (settings.min_requests, settings.max_requests));
        // Drawn from [80%, 100%] of the limit, so workers started together
        // do not all leave together.
        let age_limit = max_worker_age.map(|max| max.mul_f64(0.8 + 0.2 * self.rng.f64()));
        let max_requests = match limits {
            (_, 0) => 0,
            (min, max) => self.rng.u64(min.clamp(1, max)..=max),
        };
        Some(SpawnOrder { generation, make, max_requests, age_limit })
    }

    /// The settings `generation` runs with: a reload's own, or the core's.
    pub(super) fn settings_of(&self, generation: u64) -> &super::Settings {
        match &self.reload {
            Some(r) if r.generation == generation => &r.settings,
            _ => &self.settings,
        }
    }

    /// The shell started the worker of `order`.
    pub fn spawned(&mut self, order: SpawnOrder, io: W, now: Instant) -> WorkerKey {
        debug_assert_ne!(order.make, super::Make::StartTemplate, "a template is not a worker");
        WorkerKey(self.workers.insert(Worker {
            io,
            generation: order.generation,
            started: now,
            activity: Activity::Starting,
            service: Service::InService,
            channel: Channel::Open,
            killed: None,
            max_requests: order.max_requests,
            age_limit: order.age_limit,
            ahead_depth: 0,
            accepts_own: false,
            keeps_warm: false,
            warm: Vec::new(),
            skips_pending: 0,
            outgoing: None,
        }))
    }

    /// The worker of `order` could not be started: the serving generation
    /// backs off; a reload is abandoned.
    pub fn spawn_failed(&mut self, order: SpawnOrder, why: &str, now: Instant) {
        self.generation_failed(order.generation, why, now);
    }

    /// Workers of `generation` cannot be made now (its program fails to
    /// start, or its template died before it was ready): a reload's is
    /// abandoned; the serving generation backs off.
    pub fn generation_failed(&mut self, generation: u64, why: &str, now: Instant) {
        if self.reload.as_ref().is_some_and(|r| r.generation == generation) {
            self.abandon_reload(why, now);
        } else if generation == self.serving {
            let delay = self.backoff.on_spawn_failure();
            warn!("next worker start in {delay:?}");
            self.next_spawn_at = now + delay;
            self.hold_limits(generation, true);
        }
    }

    /// A worker has nothing to do: it takes a connection that waits, or
    /// joins the idle list; one leaving service is let go.
    pub(super) fn worker_idle(&mut self, wkey: WorkerKey, port: &mut impl Port<C, W>, now: Instant) {
        let Some(w) = self.workers.get_mut(wkey.0) else { return };
        w.activity = Activity::Idle;
        if w.channel != Channel::Open {
            // Exiting, or being killed: nothing more for it.
            return;
        }
        if w.retiring().is_some() {
            self.release(wkey);
            return;
        }
        if w.generation != self.serving {
            if self.reload.as_ref().is_some_and(|r| r.generation == w.generation) {
                self.maybe_finish_reload(port, now);
            } else {
                self.retire(wkey, Retirement::Outdated, port, now);
            }
            return;
        }
        if !self.ready_notified && self.ready_workers(self.serving) >= self.target {
            self.ready_notified = true;
            info!("generation {} ready: {} workers", self.serving, self.target);
            self.act(Action::Notify(Notice::Ready));
        }
        // A connection sent ahead to a worker that is still on a long request
        // has waited longer than any in the queue: it goes first.
        let any = self.dispatcher.queued() == 0;
        if let Some(ckey) = self.take_back_waiting_ahead(wkey, any, port, now) {
            self.hand_over(wkey, ckey, port, now);
        } else if let Some(ckey) = self.dispatcher.worker_idle(wkey) {
            self.hand_over(wkey, ckey, port, now);
        } else {
            if self.stopping == Stopping::No && !self.accept_held && self.workers[wkey.0].accepts_own {
                port.let_go(&self.workers[wkey.0].io);
            }
            self.release_idle_workers();
        }
    }

    /// Makes sure idle worker `wkey` is the core's, not on a connection of
    /// its own, before it is handed one or let go. One that is on its own
    /// leaves the idle list until its Free.
    pub(super) fn claim_idle(&mut self, wkey: WorkerKey, port: &mut impl Port<C, W>, now: Instant) -> bool {
        let Some(w) = self.workers.get_mut(wkey.0) else { return false };
        if !w.accepts_own || w.activity != Activity::Idle {
            return true;
        }
        match port.claim(&w.io) {
            super::Claim::Held => true,
            super::Claim::Own => {
                w.activity = Activity::Own { since: now };
                self.dispatcher.remove_worker(wkey);
                false
            }
        }
    }

    /// In-service workers of `generation` past their start.
    pub(super) fn ready_workers(&self, generation: u64) -> usize {
        self.workers
            .iter()
            .filter(|(_, w)| w.generation == generation && w.reachable() && w.activity != Activity::Starting)
            .count()
    }

    /// Closes a worker's channel: it exits when it next waits for work (one
    /// on a connection of its own first finishes it: at a stop, whose
    /// responses say `Connection: close`, it has nothing to hand back).
    pub(super) fn release(&mut self, wkey: WorkerKey) {
        // Nothing may be handed to it any more.
        self.dispatcher.remove_worker(wkey);
        let Some(w) = self.workers.get_mut(wkey.0) else { return };
        if w.channel == Channel::Open {
            w.channel = Channel::Closed;
            self.actions.push_back(Action::CloseChannel { worker: wkey });
        }
        if w.activity == Activity::Starting {
            // Its app may be stuck initialising: it has nothing to finish.
            self.actions.push_back(Action::Signal { worker: wkey, signal: Signal::Term });
        }
    }

    /// Takes a worker out of service; it exits after its current connection.
    pub(super) fn retire(
        &mut self,
        wkey: WorkerKey,
        why: Retirement,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) {
        self.take_back_ahead(wkey, port, now);
        // One on a connection of its own is let go after its Free: it may
        // have a keep-alive connection to hand back first.
        self.claim_idle(wkey, port, now);
        self.leave_service(wkey, why);
    }

    /// Puts a serving worker on its way out: its successor is ordered now
    /// (it no longer counts toward the workers wanted), and it retires for
    /// `why` once the successor is ready (`retire_outgoing`).
    pub(super) fn make_outgoing(&mut self, wkey: WorkerKey, why: Retirement) {
        let Some(w) = self.workers.get_mut(wkey.0) else { return };
        if w.staying() {
            w.outgoing = Some(why);
        }
    }

    /// Retires outgoing workers of `generation` that the workers ready
    /// without them cover: each successor that becomes ready lets one go.
    pub(super) fn retire_outgoing(&mut self, generation: u64, port: &mut impl Port<C, W>, now: Instant) {
        let ready = self
            .workers
            .iter()
            .filter(|(_, w)| {
                w.generation == generation && w.staying() && w.reachable() && w.activity != Activity::Starting
            })
            .count();
        let outgoing: Vec<(WorkerKey, Retirement)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == generation && w.service == Service::InService)
            .filter_map(|(k, w)| Some((WorkerKey(k), w.outgoing?)))
            .collect();
        let surplus = (ready + outgoing.len()).saturating_sub(self.wanted_workers(generation));
        for &(wkey, why) in outgoing.iter().take(surplus) {
            info!(
                "worker {} retires ({}): its successor is ready",
                self.workers[wkey.0].io.pid(),
                why.as_str()
            );
            self.retire(wkey, why, port, now);
        }
    }

    /// Takes a worker out of service, leaving what was sent ahead to it
    /// where it is (taken back already, or claimed by the worker, whose
    /// Done will make it current).
    pub(super) fn leave_service(&mut self, wkey: WorkerKey, why: Retirement) {
        let Some(w) = self.workers.get_mut(wkey.0) else { return };
        w.service = Service::Retiring(why);
        w.outgoing = None;
        let busy = matches!(w.activity, Activity::Busy { .. } | Activity::Own { .. });
        self.count_recycle(why);
        self.dispatcher.remove_worker(wkey);
        if !busy {
            self.release(wkey);
        }
    }

    /// Counts a worker leaving for one of the recycling limits.
    pub(super) fn count_recycle(&mut self, why: Retirement) {
        if why.is_recycling() {
            *self.totals.recycled.entry(why.as_str().to_owned()).or_default() += 1;
        }
    }

    /// While stopping, a worker with nothing left to do gets its channel
    /// closed, which tells it to exit.
    pub(super) fn release_idle_workers(&mut self) {
        if self.stopping == Stopping::No || self.requests_pending() {
            return;
        }
        let done: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                w.channel == Channel::Open && matches!(w.activity, Activity::Idle | Activity::Starting)
            })
            .map(|(k, _)| WorkerKey(k))
            .collect();
        for wkey in done {
            self.release(wkey);
        }
    }
}
