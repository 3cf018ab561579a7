//! The simulated world the core runs against: worker processes that follow
//! PROTOCOL.md (or break in the ways real ones do), clients, and the
//! scoreboard's ahead cells with their compare-and-swap.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use monodon_proto::scoreboard::{attention, wrote_since_handover, WriteCounters};

use crate::core::{Claim, ConnKey, Named, Peer, Port, SendError, WorkerKey};

/// The core's part of a simulated connection: which client it is.
pub struct SimConn {
    pub client: usize,
    /// The worker's byte count at the last hand-over (as the shell keeps it).
    pub written_before: u64,
}

impl Peer for SimConn {
    fn peer(&self) -> &str {
        "sim"
    }
}

/// The core's part of a simulated worker: which process it is.
pub struct SimWorker {
    pub proc_index: usize,
    pub pid: u32,
}

impl Named for SimWorker {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn request_line(&self) -> Option<String> {
        None
    }
}

/// A deliberate bug, to check that the simulation finds what it guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    None,
    /// The take-back always wins, even over a worker that has claimed the
    /// connection.
    Revoke,
    /// A worker that accepts frees its attention after its last request,
    /// before it exits.
    EarlyRelease,
    /// The core forgets what a dead worker had claimed after the Dones it
    /// held back (`Core::forget_unreported`).
    ForgetUnreported,
    /// Taking a warm connection back wins even over the worker's claim.
    WarmRevoke,
    /// The core forgets that a worker dead on a warm connection had
    /// finished the one of ours before it (`Core::forget_before_warm`).
    ForgetBeforeWarm,
}

/// What a deploy does when its workers start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deploy {
    Good,
    /// The program cannot be started at all.
    ExecFails,
    /// Workers die before they are ready.
    DiesStarting,
    /// Workers never become ready (the reload times out).
    NeverReady,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcLife {
    Starting,
    Waiting,
    Serving {
        conn: ConnKey,
        id: u64,
        served: u32,
        started: Instant,
    },
    /// Serving client `client`, a connection it accepted itself (`id`, in
    /// its vault with the byte count `deposited`); `partial`: its head is
    /// not all there, so it hands it to the supervisor.
    Own {
        client: usize,
        id: u64,
        started: Instant,
        partial: bool,
        deposited: u64,
    },
    /// Serving the request waiting on a connection it keeps warm (`cell`),
    /// its cell claimed and its attention its own.
    Warm {
        cell: usize,
        conn: ConnKey,
        id: u64,
        served: u32,
        started: Instant,
    },
    /// Done with its last request (max requests): it exits at its next
    /// step, and anything handed to it meanwhile is lost with it.
    Exiting,
    Exited,
}

/// An Assign in a worker's channel.
#[derive(Debug, Clone, Copy)]
pub struct Assign {
    pub conn: ConnKey,
    pub id: u64,
    pub served: u32,
    pub ahead: bool,
}

/// A message in the supervisor's end of a worker's channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// A template has loaded its app.
    TemplateReady,
    Ready,
    Retiring,
    Skipped,
    Done {
        id: u64,
        served: u32,
        keep: bool,
    },
    /// A connection it accepted is the supervisor's now (client `client`).
    Adopt {
        client: usize,
        id: u64,
        served: u32,
        keep: bool,
    },
    Free,
    /// It keeps the connection it was on warm, in `cell`.
    Warm {
        id: u64,
        served: u32,
        cell: u8,
    },
    /// It gives a warm connection back.
    Cool {
        id: u64,
        served: u32,
        keep: bool,
    },
}

/// The warm cells a simulated worker uses (a real one has `WARM_CELLS`).
pub const SIM_WARM_CELLS: usize = 3;

/// A connection a simulated worker keeps warm.
#[derive(Debug, Clone, Copy)]
pub struct WarmHeld {
    pub conn: ConnKey,
    pub id: u64,
    pub served: u32,
}

/// The supervisor's connection a worker finished before serving warm ones
/// (`Proc::between`): reported after them.
#[derive(Debug, Clone, Copy)]
pub struct Between {
    pub conn: ConnKey,
    pub id: u64,
    /// Requests served on it, the last one included.
    pub served: u32,
    pub client: usize,
    /// The scoreboard's record of it (connection, byte count when begun),
    /// put back after each warm request served in between.
    pub began: (u64, u64),
}

/// A simulated worker process.
pub struct Proc {
    pub pid: u32,
    pub key: WorkerKey,
    pub generation: u64,
    pub life: ProcLife,
    pub inbox: VecDeque<Assign>,
    pub outbox: VecDeque<Said>,
    /// Dones held back while a connection sent ahead waits (PROTOCOL.md,
    /// Dones): they go before anything else it says, or before it waits;
    /// lost if it dies first.
    pub held: Vec<Said>,
    /// The scoreboard's ahead cells.
    pub cells: [u64; 3],
    /// How many connections it said it takes ahead.
    pub ahead_depth: usize,
    /// Its channel holds two messages: a third send finds it full.
    pub small_channel: bool,
    pub served: u64,
    pub max_requests: u64,
    /// Its scoreboard's hold-limit flag: not to retire at max_requests.
    pub limit_held: bool,
    /// It said Retiring: it exits after this request.
    pub last_request: bool,
    /// It exited on its own after its last request (not a crash or a kill).
    pub retired: bool,
    /// The supervisor closed its end: what we send is lost, and we see EOF
    /// once the inbox is read.
    pub released: bool,
    /// The core has been told the channel closed (EOF after our exit).
    pub eof_told: bool,
    /// Hangs on its next request until killed.
    pub stuck: bool,
    /// Does not die of SIGTERM.
    pub ignores_term: bool,
    /// Sends to it fail as if its buffer were full (broken).
    pub broken: bool,
    pub memory: u64,
    /// Its scoreboard's counters: bytes written in all, the connection it
    /// began last, and the count when it began it.
    pub written: u64,
    pub conn_id: u64,
    pub conn_written_base: u64,
    /// The connection it began last, and whether all of its response went out.
    pub last: Option<Last>,
    /// The core has been told it is ready.
    pub ready_told: bool,
    /// A generation's template, not a worker (it has no key in the core).
    pub template: bool,
    /// It accepts connections itself (`FEATURE_ACCEPT`), and its
    /// scoreboard's attention cell.
    pub accepts: bool,
    pub attention: u64,
    /// Forked from its generation's template (its deploy was loaded there).
    pub forked: bool,
    /// It keeps connections warm (`FEATURE_WARM`, with `accepts`): what it
    /// holds by cell, the scoreboard's warm cells (id, with `WARM_CLAIMED`
    /// while served) and when each last finished a request.
    pub keeps_warm: bool,
    pub warm: [Option<WarmHeld>; SIM_WARM_CELLS],
    pub warm_cells: [u64; SIM_WARM_CELLS],
    pub warm_done: [Instant; SIM_WARM_CELLS],
    /// One of the supervisor's connections it has finished (plain: kept
    /// alive, nothing left over) and not yet reported, while it serves
    /// requests waiting on its warm connections first.
    pub between: Option<Between>,
    /// A template that has started threads: it refuses to fork.
    pub refuses: bool,
}

/// What a worker's scoreboard says about the connection it began last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Last {
    pub id: u64,
    pub finished: bool,
}

impl Proc {
    pub fn alive(&self) -> bool {
        self.life != ProcLife::Exited
    }
}

/// A simulated client: one connection, `wants` requests on it, one at a time.
pub struct Client {
    pub key: ConnKey,
    pub wants: u32,
    /// Requests whose head the supervisor has complete.
    pub sent: u32,
    /// Responses (or 502/504, or a close mid-response) it has had.
    pub answered: u32,
    /// Part of its next head has arrived.
    pub partial: bool,
    /// A worker that accepted it serves it (the process's index): the core
    /// has no key for it until the worker hands it over or dies.
    pub own_by: Option<usize>,
    /// Sends its next request at once (it is in the leftover).
    pub eager: bool,
    pub closed: bool,
    /// Errors the supervisor answered it with.
    pub errors: Vec<u16>,
}

impl Client {
    /// Waiting for a response.
    pub fn in_flight(&self) -> bool {
        self.sent > self.answered
    }
}

/// Everything outside the core.
pub struct World {
    pub now: Instant,
    pub procs: Vec<Proc>,
    pub clients: Vec<Client>,
    /// Who serves each connection id right now: never two at once.
    pub serving: HashMap<u64, u32>,
    /// Scoreboard draining flag (a graceful stop).
    pub draining: bool,
    /// A deliberate bug for the simulation to find, or none.
    pub bug: Bug,
    /// The first thing that went wrong outside the core's own invariants.
    pub violation: Option<String>,
    pub next_pid: u32,
    /// The last id a worker gave a connection of its own.
    pub next_own_id: u64,
    /// What the core did through the port, for the trace (when tracing).
    pub notes: Vec<String>,
    pub tracing: bool,
}

impl World {
    pub fn violate(&mut self, what: String) {
        self.violation.get_or_insert(what);
    }

    fn proc_of(&self, worker: &SimWorker) -> &Proc {
        &self.procs[worker.proc_index]
    }
}

impl Port<SimConn, SimWorker> for World {
    fn assign(
        &mut self,
        worker: &SimWorker,
        conn: &mut SimConn,
        id: u64,
        served: u32,
        ahead: bool,
    ) -> Result<(), SendError> {
        let p = &self.procs[worker.proc_index];
        if !p.alive() {
            return Err(SendError::Gone);
        }
        if p.released {
            // The core never sends on a channel it has closed.
            self.violate(format!("Assign to worker {} on a channel the core closed", p.pid));
            return Err(SendError::Gone);
        }
        if p.broken {
            return Err(SendError::Failed("no buffer space".into()));
        }
        if ahead && p.small_channel && p.inbox.len() >= 2 {
            if self.tracing {
                self.notes.push(format!("worker {}'s channel is full", p.pid));
            }
            return Err(SendError::Full);
        }
        if p.inbox.len() > p.ahead_depth {
            let allowed = 1 + p.ahead_depth;
            self.violate(format!(
                "message {} for worker {} (PROTOCOL.md allows {allowed})",
                p.inbox.len() + 1,
                p.pid
            ));
        }
        let key = self.clients[conn.client].key;
        let pid = self.procs[worker.proc_index].pid;
        conn.written_before = self.procs[worker.proc_index].written;
        if self.tracing {
            self.notes.push(format!("assign connection {id} {key} to worker {pid} (ahead: {ahead})"));
        }
        self.procs[worker.proc_index].inbox.push_back(Assign { conn: key, id, served, ahead });
        Ok(())
    }

    fn offer_ahead(&mut self, worker: &SimWorker, id: u64) -> bool {
        let p = &mut self.procs[worker.proc_index];
        // A worker that takes one ahead claims in two cells only.
        let cells = &mut p.cells[..=p.ahead_depth];
        match cells.iter_mut().find(|c| **c == 0) {
            Some(cell) => {
                *cell = id;
                true
            }
            None => false,
        }
    }

    fn revoke_ahead(&mut self, worker: &SimWorker, id: u64) -> bool {
        let broken = self.bug == Bug::Revoke;
        let cells = &mut self.procs[worker.proc_index].cells;
        match cells.iter_mut().find(|c| **c == id) {
            Some(cell) => {
                *cell = 0;
                if self.tracing {
                    self.notes.push(format!("took back connection {id}"));
                }
                true
            }
            None => broken,
        }
    }

    fn request_age(&self, worker: &SimWorker) -> Option<Duration> {
        match self.proc_of(worker).life {
            ProcLife::Serving { started, .. }
            | ProcLife::Warm { started, .. }
            | ProcLife::Own { started, partial: false, .. } => {
                Some(self.now.saturating_duration_since(started))
            }
            _ => None,
        }
    }

    fn wrote_on(&self, worker: &SimWorker, conn: &SimConn, id: u64) -> bool {
        let p = self.proc_of(worker);
        wrote_since_handover(WriteCounters {
            current_conn: p.conn_id,
            written: p.written,
            conn_written_base: p.conn_written_base,
            conn_id: id,
            written_at_handover: conn.written_before,
        })
    }

    fn served(&self, worker: &SimWorker) -> u64 {
        self.proc_of(worker).served
    }

    fn private_memory(&self, worker: &SimWorker) -> Option<u64> {
        Some(self.proc_of(worker).memory)
    }

    // The same transitions as `Slot::claim` and `Slot::let_go`.
    fn claim(&mut self, worker: &SimWorker) -> Claim {
        let p = &mut self.procs[worker.proc_index];
        if !p.accepts {
            self.violation.get_or_insert(format!("claimed worker {}, which does not accept", p.pid));
        }
        match p.attention {
            attention::FREE => {
                p.attention = attention::HELD;
                Claim::Held
            }
            attention::OWN | attention::WATCHED => {
                p.attention = attention::WATCHED;
                Claim::Own
            }
            _ => Claim::Held,
        }
    }

    // The same compare-and-swap as `Slot::warm_revoke`.
    fn revoke_warm(&mut self, worker: &SimWorker, cell: u8, id: u64) -> bool {
        let broken = self.bug == Bug::WarmRevoke;
        let p = &mut self.procs[worker.proc_index];
        match p.warm_cells.get_mut(usize::from(cell)) {
            Some(c) if *c == id || (broken && *c & !monodon_proto::scoreboard::WARM_CLAIMED == id) => {
                *c = 0;
                if self.tracing {
                    self.notes.push(format!("took warm connection {id} back"));
                }
                true
            }
            _ => false,
        }
    }

    fn warm_claimed(&self, worker: &SimWorker, cell: u8, id: u64) -> bool {
        let p = self.proc_of(worker);
        p.warm_cells.get(usize::from(cell)) == Some(&(id | monodon_proto::scoreboard::WARM_CLAIMED))
    }

    fn warm_idle(&self, worker: &SimWorker, cell: u8) -> Duration {
        let p = self.proc_of(worker);
        p.warm_done.get(usize::from(cell)).map_or(Duration::MAX, |&t| self.now.saturating_duration_since(t))
    }

    fn input_waiting(&self, conn: &SimConn) -> bool {
        let c = &self.clients[conn.client];
        c.in_flight() || c.partial
    }

    fn let_go(&mut self, worker: &SimWorker) {
        let p = &mut self.procs[worker.proc_index];
        if p.attention == attention::HELD {
            p.attention = attention::FREE;
        }
    }
}
