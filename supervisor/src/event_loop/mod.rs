//! The shell around the core: one thread, one epoll loop (`poll`) over the
//! listeners, every client connection, every worker channel, the control
//! socket and the signal pipe. It turns what the kernel reports into the
//! core's events and carries out the core's actions; what to do is the
//! core's decision (`crate::core`), how to do it is this module's.
//!
//! Files: `mod.rs` (the state, the loop, `carry_out`, the core's port),
//! `setup.rs` (start-up), `clients.rs` (accepting, reading heads, closing),
//! `workers.rs` (spawning, channels, exits), `reload.rs` (re-reading the
//! configuration for a new generation), `stopping.rs` (signals, the sweep),
//! `control.rs` (the control socket), `status.rs`, `invariants.rs`.
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
//!   supervisor reads it only while the core has it `Reading` or
//!   `Lingering`; an edge that arrives while the queue or a worker has it
//!   only sets `unread`, and the supervisor reads when the connection comes
//!   back. A read shorter than the buffer took everything there was, so any
//!   later byte raises a new edge: nothing is left unnoticed.
//! - Every fd is deleted from the poller before it is closed.
//! - The supervisor keeps its own copy of a connection while a worker serves
//!   it; nothing is passed back, and a worker's death never loses it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::poll::{Events, Poller};
use log::{debug, info};
use monodon_proto::access_log::AccessLog;
use monodon_proto::http::{PendingRequest, Rejection};
use monodon_proto::parsed::ParsedRequest;
use monodon_proto::scoreboard::{ResponseCounts, Scoreboard};
use monodon_proto::wire::{self, ToWorker};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
use slab::Slab;

use crate::config::Config;
use crate::core::{self, Action, ConnKey, Notice, Port, SendError, WorkerKey};
use crate::listener::Listener;
use crate::spawn::Code;

mod clients;
mod control;
mod invariants;
mod metrics;
mod reload;
mod setup;
mod status;
mod stopping;
mod templates;
mod workers;

use crate::notify::Notifier;
use control::ControlConn;

const SIGNAL_KEY: usize = usize::MAX - 1;
const CONTROL_KEY: usize = usize::MAX - 2;
const METRICS_KEY: usize = usize::MAX - 3;
/// Plus the scrape's slab index.
const METRICS_BASE: usize = 1 << 44;
const CONTROL_BASE: usize = 1 << 42;
const LISTENER_BASE: usize = 1 << 40;
const WORKER_BASE: usize = 1 << 41;
/// Plus the generation number.
const TEMPLATE_BASE: usize = 1 << 43;
// Connections use their slab index as key: below every other range.

/// How often workers' private memory is read for --max-worker-memory.
const MEMORY_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often idle, slow and lingering connections are checked for timeouts.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes read from a client in one go.
const READ_CHUNK: usize = 16 * 1024;
/// Accepts per listener readiness event, so one busy listener cannot starve the rest.
const ACCEPT_BATCH: usize = 64;

/// The shell's part of a client connection (the core keeps where it is).
struct ConnIo {
    fd: OwnedFd,
    peer: String,
    /// Bytes read and not yet handed to a worker, with how far the framing
    /// code has got with them.
    pending: PendingRequest,
    /// The socket may hold bytes nobody has read: an edge arrived while a
    /// worker had the connection, or the last read filled the buffer.
    unread: bool,
    /// Registered in the poller (from the first time we waited for it).
    watched: bool,
    /// Its PROXY protocol header has yet to be read (`--proxy-protocol`).
    proxy_pending: bool,
    /// The worker's byte counter at the last hand-over, to tell whether any
    /// response byte went out, for a worker whose scoreboard does not say
    /// (`Slot::wrote_on`).
    written_before: u64,
    /// Its own address, asked for once, at its first parsed hand-over.
    local: Option<String>,
    /// A worker has kept it warm: a copy of its fd may outlive the worker's
    /// claim on it (until the worker notices it was taken back), so closing
    /// it takes a shutdown, not just a close of ours.
    was_warm: bool,
}

impl ConnIo {
    /// A connection as accepted, with nothing read from it yet.
    fn new(fd: OwnedFd, peer: String) -> ConnIo {
        ConnIo {
            fd,
            peer,
            pending: PendingRequest::default(),
            unread: true,
            watched: false,
            proxy_pending: false,
            written_before: 0,
            local: None,
            was_warm: false,
        }
    }
}

impl core::Peer for ConnIo {
    fn peer(&self) -> &str {
        &self.peer
    }
}

/// The shell's part of a worker (the core keeps its lifecycle).
struct WorkerIo {
    /// `None` for a worker its template is forking, until the template
    /// (or the worker's Ready) names it.
    pid: Option<Pid>,
    /// A signal the core sent it before its pid was known, sent once it is.
    pending_signal: Option<Signal>,
    /// `None` once the core has closed it, or the worker has.
    channel: Option<OwnedFd>,
    scoreboard: Scoreboard,
    /// The largest message its generation's limits allow (it may send a
    /// Done that large, whatever the serving generation's limits are now).
    max_message: usize,
    /// Set at Ready if the worker asked for parsed requests
    /// (`FEATURE_PARSED`): what the parse needs from its generation.
    parsed: Option<Box<ParsedFor>>,
    /// For a worker that accepts (`FEATURE_ACCEPT`), the receiving end of
    /// its vault, from its Ready: read only when it dies.
    vault: Option<OwnedFd>,
    /// The id of the last connection of its own it handed us (Adopt): its
    /// copy in the vault, if the worker died before taking it out, is
    /// ours already.
    adopted_own: u64,
}

/// What sending a worker parsed requests takes: its generation's limits
/// (under which the heads were checked) and trusted proxies (which name
/// the client it is told of).
struct ParsedFor {
    limits: monodon_proto::http::Limits,
    trusted: monodon_proto::forwarded::TrustedProxies,
}

impl core::Named for WorkerIo {
    fn pid(&self) -> u32 {
        self.pid.map_or(0, |p| p.as_raw() as u32)
    }

    fn request_line(&self) -> Option<String> {
        self.scoreboard.slot().current_request()
    }
}

impl WorkerIo {
    /// Signals it, or, its pid not known yet, remembers to (SIGKILL wins).
    fn signal(&mut self, signal: Signal) {
        match self.pid {
            Some(pid) => {
                let _ = kill(pid, signal);
            }
            None if self.pending_signal != Some(Signal::SIGKILL) => self.pending_signal = Some(signal),
            None => {}
        }
    }

    /// Its pid is known now: a signal that waited for it is sent.
    fn named(&mut self, pid: Pid) {
        self.pid = Some(pid);
        if let Some(signal) = self.pending_signal.take() {
            let _ = kill(pid, signal);
        }
    }

    /// Requests it has completed, from its scoreboard.
    fn requests(&self) -> u64 {
        self.scoreboard.slot().requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

type Core = core::Core<ConnIo, WorkerIo>;

/// The code and configuration of a generation a reload is starting (the
/// core keeps its settings and progress).
struct ReloadCode {
    generation: u64,
    code: Code,
    /// Becomes the supervisor's when that generation serves; dropped if
    /// the reload fails, so a bad or abandoned reload changes nothing.
    config: Config,
}

/// The supervisor: owns every socket and every worker; its decisions are
/// the core's.
pub struct Supervisor {
    core: Core,
    config: Config,
    poller: Poller,
    events: Events,
    listeners: Vec<Listener>,
    accepting: bool,
    /// After EMFILE and the like, accepting pauses until then.
    accept_paused_until: Option<Instant>,
    /// Connections waited on a listener at the last sweep while workers
    /// were free to accept: how many they had accepted then.
    backlog_seen: Option<u64>,
    /// Workers free to accept took none of the connections waiting over a
    /// sweep (a worker wedged outside a request): the supervisor accepts.
    workers_stalled: bool,
    signals: SignalDelivery<UnixStream, SignalOnly>,
    /// The code of the serving generation (command and directory),
    /// resolved when that generation started, so its replacements run the
    /// same release.
    serving_code: Code,
    reload_code: Option<ReloadCode>,
    /// Each generation's template (`--spawn template`).
    templates: templates::Templates,
    /// Children reaped before their template said who they were (a forked
    /// worker that died at once), by pid.
    unclaimed_exits: std::collections::HashMap<Pid, String>,
    /// Scoreboards of reaped workers, for the next ones.
    spare_boards: crate::spawn::SpareBoards,
    /// Client reads land here first (idle connections hold no buffer).
    scratch: Vec<u8>,
    /// Messages from workers are received here.
    channel_buf: Vec<u8>,
    /// Messages to workers are encoded here.
    msg: Vec<u8>,
    next_sweep: Instant,
    /// The control socket and its path (removed on exit).
    control: Option<control::ControlSocket>,
    control_conns: Slab<ControlConn>,
    /// `--metrics`: its listener and the scrapes in progress.
    metrics: Option<metrics::MetricsEndpoint>,
    started: Instant,
    notifier: Notifier,
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
    /// Responses the supervisor sent itself, by status class (health checks
    /// aside).
    own_responses: ResponseCounts,
    /// What the scoreboards of reaped workers counted.
    departed_responses: ResponseCounts,
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
            if self.core.finished(Instant::now()) {
                self.carry_out();
                break;
            }
            self.carry_out();
            let now = Instant::now();
            let mut wake = self.next_sweep;
            if let Some(t) = self.notifier.next_wake() {
                wake = wake.min(t);
            }
            if let Some(t) = self.core.spawn_wake() {
                wake = wake.min(t);
            }
            let timeout = wake.saturating_duration_since(now).min(SWEEP_INTERVAL);
            self.events.clear();
            self.poller.wait(&mut self.events, Some(timeout))?;
            let keys: Vec<usize> = self.events.keys().collect();
            for key in keys {
                self.on_event(key);
                self.carry_out();
                // A worker that retires or dies is replaced before the next
                // event (a status request would otherwise see the gap).
                self.spawn_missing_workers();
                self.debug_check_invariants();
            }
            self.publish_queue_state();
            let now = Instant::now();
            if now >= self.next_sweep {
                self.sweep(now);
                self.carry_out();
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
        if let Some(metrics) = &self.metrics {
            metrics.unlink();
        }
        self.drop_all_templates();
        info!("supervisor {} stopped", std::process::id());
        Ok(())
    }

    fn on_event(&mut self, key: usize) {
        if key == SIGNAL_KEY {
            self.on_signals();
        } else if key == CONTROL_KEY {
            self.on_control_listener_readable();
        } else if key == METRICS_KEY {
            self.on_metrics_listener_readable();
        } else if key >= METRICS_BASE {
            self.on_scrape_event(key - METRICS_BASE);
        } else if key >= TEMPLATE_BASE {
            self.on_template_readable((key - TEMPLATE_BASE) as u64);
        } else if key >= CONTROL_BASE {
            self.on_control_event(key - CONTROL_BASE);
        } else if key >= WORKER_BASE {
            self.on_channel_readable(WorkerKey(key - WORKER_BASE));
        } else if key >= LISTENER_BASE {
            self.on_listener_readable(key - LISTENER_BASE);
        } else {
            self.on_conn_readable(ConnKey(key));
        }
    }

    /// Carries out what the core has decided, in order, until nothing is
    /// left (what an action finds out may lead the core to decide more).
    fn carry_out(&mut self) {
        while let Some(action) = self.core.next_action() {
            match action {
                Action::Signal { worker, signal } => {
                    let signal = match signal {
                        core::Signal::Term => Signal::SIGTERM,
                        core::Signal::Kill => Signal::SIGKILL,
                    };
                    if let Some(w) = self.core.worker_io_mut(worker) {
                        w.signal(signal);
                    }
                }
                Action::CloseChannel { worker } => {
                    // What it sent first is read first: a worker that accepts
                    // may have handed us a connection (Adopt), which a close
                    // would reset.
                    self.drain_channel(worker);
                    if let Some(ch) = self.core.worker_io_mut(worker).and_then(|w| w.channel.take()) {
                        let _ = self.poller.delete(&ch);
                    }
                }
                Action::Resume { conn } => self.resume_reading(conn),
                Action::CloseAfterResponse { conn } => self.close_after_response(conn),
                Action::Close { conn } => self.close_now(conn),
                Action::Warmed { conn } => self.unwatch_warm(conn),
                Action::HeadTimedOut { conn } => {
                    self.reject(conn, Rejection { status: 408, reason: "request not received in time" })
                }
                Action::Claimed { conn } => {
                    if let Some(c) = self.core.conn_io_mut(conn) {
                        // The worker has it for sure: idle connections stay cheap.
                        c.pending.release();
                    }
                }
                Action::Drain => {
                    for (_, w) in self.core.workers() {
                        w.io.scoreboard.slot().set_draining();
                    }
                }
                Action::Notify(Notice::Ready) => {
                    let line = self.status_line();
                    self.notifier.ready(line);
                }
                Action::Notify(Notice::Reloading) => self.notifier.reloading(),
                Action::Notify(Notice::Stopping) => self.notifier.stopping(),
                Action::ReloadFinished { generation, outcome } => self.reload_finished(generation, outcome),
                Action::ReleaseTemplate { generation } => self.drop_template(generation, Signal::SIGTERM),
                Action::HoldLimits { generation, hold } => {
                    for (_, w) in self.core.workers().filter(|(_, w)| w.generation == generation) {
                        w.io.scoreboard.slot().set_hold_limit(hold);
                    }
                }
            }
        }
        self.update_accepting();
    }
}

/// The core's [`Port`]: Assigns over the workers' channels, and the
/// scoreboards' compare-and-swap.
struct Wire<'a> {
    /// The encoding buffer.
    msg: &'a mut Vec<u8>,
}

impl Port<ConnIo, WorkerIo> for Wire<'_> {
    fn assign(
        &mut self,
        worker: &WorkerIo,
        conn: &mut ConnIo,
        id: u64,
        served: u32,
        ahead: bool,
    ) -> Result<(), SendError> {
        let channel = worker.channel.as_ref().ok_or(SendError::Gone)?;
        match &worker.parsed {
            None => {
                ToWorker::Assign { conn_id: id, served, peer: &conn.peer, data: conn.pending.bytes(), ahead }
                    .encode(self.msg)
            }
            Some(p) => {
                let request = ParsedRequest::from_buffer(id, served, conn.pending.bytes(), &p.limits)
                    .ok_or_else(|| SendError::Failed("no complete request to hand over".into()))?;
                // Who the client is, by the generation's trusted proxies.
                let origin = p.trusted.resolve(&conn.peer, &request.headers);
                let local = conn.local.get_or_insert_with(|| crate::listener::local_address(conn.fd.as_fd()));
                let request =
                    ParsedRequest { client: &origin.client, local, scheme: origin.scheme, ..request };
                request.encode(self.msg);
            }
        }
        match wire::send(channel.as_fd(), self.msg, Some(conn.fd.as_fd())) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                return Err(SendError::Gone)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Err(SendError::Full),
            Err(e) => return Err(SendError::Failed(e.to_string())),
        }
        // Whether the worker wrote on it is told by the scoreboard
        // (`wrote_on`); this count is only for workers too old to say, and
        // for one sent ahead errs on the side of "close" rather than "502".
        conn.written_before = worker.scoreboard.slot().written();
        if !ahead {
            // Idle connections must stay cheap: drop the buffer, not just
            // clear it. One sent ahead keeps it until the worker has it for sure.
            conn.pending.release();
        }
        Ok(())
    }

    fn offer_ahead(&mut self, worker: &WorkerIo, id: u64) -> bool {
        worker.scoreboard.slot().offer_ahead(id)
    }

    fn revoke_ahead(&mut self, worker: &WorkerIo, id: u64) -> bool {
        worker.scoreboard.slot().revoke_ahead(id)
    }

    fn request_age(&self, worker: &WorkerIo) -> Option<Duration> {
        worker.scoreboard.slot().request_age_ms().map(Duration::from_millis)
    }

    fn wrote_on(&self, worker: &WorkerIo, conn: &ConnIo, id: u64) -> bool {
        worker.scoreboard.slot().wrote_on(id, conn.written_before)
    }

    fn claim(&mut self, worker: &WorkerIo) -> core::Claim {
        worker.scoreboard.slot().claim()
    }

    fn let_go(&mut self, worker: &WorkerIo) {
        if !worker.scoreboard.slot().let_go() {
            return;
        }
        // It sleeps on its channel: wake it. (One gone is found by its exit.)
        if let Some(channel) = &worker.channel {
            ToWorker::Go.encode(self.msg);
            if let Err(e) = wire::send(channel.as_fd(), self.msg, None) {
                debug!("telling worker {} it may accept: {e}", core::Named::pid(worker));
            }
        }
    }

    fn served(&self, worker: &WorkerIo) -> u64 {
        worker.requests()
    }

    fn revoke_warm(&mut self, worker: &WorkerIo, cell: u8, id: u64) -> bool {
        worker.scoreboard.slot().warm_revoke(usize::from(cell), id)
    }

    fn warm_claimed(&self, worker: &WorkerIo, cell: u8, id: u64) -> bool {
        worker.scoreboard.slot().warm_cell(usize::from(cell)) == id | monodon_proto::scoreboard::WARM_CLAIMED
    }

    fn warm_idle(&self, worker: &WorkerIo, cell: u8) -> Duration {
        Duration::from_millis(worker.scoreboard.slot().warm_idle_ms(usize::from(cell)))
    }

    fn input_waiting(&self, conn: &ConnIo) -> bool {
        let mut byte = [0u8; 1];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        // An EOF (0) or an error is news for the supervisor as well.
        !matches!(
            nix::sys::socket::recv(std::os::fd::AsRawFd::as_raw_fd(&conn.fd), &mut byte, flags),
            Err(nix::errno::Errno::EAGAIN)
        )
    }

    fn private_memory(&self, worker: &WorkerIo) -> Option<u64> {
        status::smaps(worker.pid?.as_raw()).map(|(private_kib, _)| private_kib.saturating_mul(1024))
    }
}
