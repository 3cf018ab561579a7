//! The monodon worker runtime.
//!
//! A worker process is started by the supervisor (or forked by its
//! generation's template: `template`) with its channel on fd 3 and its
//! scoreboard page on fd 4. It initialises its app, says `Ready`,
//! then serves the connections it is handed, one at a time, with plain
//! blocking code, handing each back when it is done. It exits when the
//! supervisor closes the channel.
//!
//! A Rust application links this crate, implements [`App`], and calls
//! [`run`] when [`is_worker`] says it was started as a worker.

mod accept;
mod app;
mod date;
#[cfg(test)]
mod handover_sim;
mod serve;
#[cfg(test)]
mod serve_tests;
mod stream;
mod template;
#[cfg(test)]
mod test_support;

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;

use log::{debug, error};
use monodon_proto::access_log;
use monodon_proto::env::{self, WorkerEnv};
use monodon_proto::scoreboard::Scoreboard;
use monodon_proto::wire::{self, FromWorker, Received, ToWorker};

pub use app::{App, Body, Request, Response, WorkerInfo};

use serve::{serve_connection, serve_parsed, Budget, Context};
use stream::{Input, Stream};

/// True when this process was started by a monodon supervisor as a worker.
pub fn is_worker() -> bool {
    std::env::var_os(env::CHANNEL_FD).is_some()
}

/// Runs the role the supervisor started this process in (a worker, or its
/// generation's template, which forks workers) with `app`, until the
/// supervisor lets it go. In a worker forked from a template it does not
/// return: it drops `app`, flushes stdout and ends the process (`_exit`).
pub fn run(app: impl App) -> ExitCode {
    let mut app = app;
    let (outcome, forked) = match std::env::var(env::ROLE).as_deref() {
        Ok("template") => match template::serve_as_template(&mut app) {
            Ok(template::Role::Worker) => (serve_forever(&mut app, true), true),
            Ok(template::Role::Done) => (Ok(()), false),
            Err(e) => (Err(e), false),
        },
        _ => (serve_forever(&mut app, false), false),
    };
    let code: u8 = match outcome {
        Ok(()) => 0,
        Err(e) => {
            error!("worker {}: {e}", std::process::id());
            1
        }
    };
    if forked {
        // Most of a forked worker's memory is still shared with its
        // template: the C runtime's teardown at exit (atexit handlers,
        // library destructors, freeing the heap) would copy those pages
        // only to discard them, a large part of what a recycle costs. The
        // app is dropped (its own clean-up runs) and what is buffered is
        // written; then the process ends at once.
        drop(app);
        let _ = std::io::Write::flush(&mut std::io::stdout());
        // SAFETY: _exit ends the process; no Rust state is used after it.
        unsafe { nix::libc::_exit(code.into()) }
    }
    ExitCode::from(code)
}

/// Takes ownership of an inherited descriptor named by an environment variable.
fn inherited_fd(var: &str) -> std::io::Result<OwnedFd> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{var}: {what}"));
    let raw: RawFd =
        std::env::var(var).map_err(|_| bad("not set"))?.parse().map_err(|_| bad("not a number"))?;
    if raw < 3 {
        return Err(bad("not an inherited descriptor"));
    }
    nix::fcntl::fcntl(
        // SAFETY: only borrowed for this one call, to check the fd is open.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .map_err(|_| bad("descriptor is not open"))?;
    // SAFETY: the supervisor placed this descriptor here for us alone, and
    // nothing else in this process has claimed it (checked open above).
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// No worker outlives its supervisor: SIGTERM when the parent dies, and an
/// exit now if it already has (the pid check closes the race).
/// (`supervisor` 0: not told, nothing to check.)
fn die_with_supervisor(supervisor: u32) -> std::io::Result<()> {
    if supervisor == 0 {
        return Ok(());
    }
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
    if nix::unistd::getppid().as_raw() as u32 != supervisor {
        return Err(std::io::Error::other("the supervisor is gone"));
    }
    Ok(())
}

/// `preloaded`: forked from a template, which ran `App::preload` already.
fn serve_forever(app: &mut dyn App, preloaded: bool) -> std::io::Result<()> {
    let settings =
        WorkerEnv::from_process().map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    die_with_supervisor(settings.supervisor_pid)?;
    let channel = inherited_fd(env::CHANNEL_FD)?;
    let scoreboard = Scoreboard::map(inherited_fd(env::SCOREBOARD_FD)?)?;
    if !preloaded {
        app.preload();
    }
    app.init_worker();
    let WorkerEnv { generation, limits, io_timeout, max_requests, read_ahead, min_body_rate, .. } = settings;
    let mut remaining = (max_requests > 0).then_some(max_requests);
    let pid = std::process::id();
    let access_log = match &settings.access_log {
        Some(path) => {
            let log = access_log::AccessLog::open(path, settings.access_log_format)?;
            // The supervisor forwards SIGUSR1 (logrotate) to its workers.
            signal_hook::flag::register(signal_hook::consts::SIGUSR1, log.reopen_flag())?;
            Some(std::cell::RefCell::new(log))
        }
        None => None,
    };

    let mut accepter = match settings.listeners {
        0 => None,
        n => Some(accept::Accepter::new(
            n,
            channel.as_fd(),
            settings.health_path.clone(),
            settings.warm_connections,
        )?),
    };
    let mut out = Vec::with_capacity(256);
    let features = wire::FEATURE_AHEAD
        | wire::FEATURE_AHEAD_TWO
        | if accepter.is_some() { wire::FEATURE_ACCEPT } else { 0 }
        | if accepter.as_ref().is_some_and(|a| a.keeps_warm()) { wire::FEATURE_WARM } else { 0 };
    FromWorker::Ready { pid, features }.encode(&mut out);
    wire::send(channel.as_fd(), &out, accepter.as_ref().map(|a| a.vault_for_supervisor()))?;
    // The supervisor logs each worker's start and exit; ours are detail.
    debug!("worker {pid} (generation {generation}) ready");

    let mut buf = vec![0u8; wire::max_message(&limits)];
    let slot = scoreboard.slot();
    // What serving any connection needs; each gets its own peer.
    let serving = Context {
        read_ahead,
        min_body_rate,
        io_timeout,
        limits: &limits,
        pid,
        generation,
        slot,
        peer: "",
        forwarded_allow: &settings.forwarded_allow,
        access_log: access_log.as_ref(),
    };
    let send_free = || {
        let mut msg = Vec::with_capacity(2);
        FromWorker::Free.encode(&mut msg);
        if let Err(e) = wire::send(channel.as_fd(), &msg, None) {
            debug!("worker {pid}: cannot say Free: {e}");
        }
    };
    // Done with a connection of its own: its attention is free again, or
    // the supervisor's, which asked for it meanwhile (then it hears Free).
    let end_own = || {
        if slot.end_own() {
            send_free();
        }
    };
    let mut held = HeldDones::default();
    loop {
        // With a connection sent ahead its Assign is next in the channel:
        // no need to ask epoll, and no listener is ours to watch meanwhile.
        // Without one, we are about to wait: the Dones held back go first.
        let next_is_queued = slot.has_ahead();
        if !next_is_queued {
            match held.send(channel.as_fd(), &mut out) {
                Ok(()) => {}
                // Let go (retired) meanwhile: nothing more will come.
                Err(e) if let_go(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if let Some(acc) = accepter.as_mut().filter(|_| !next_is_queued) {
            match acc.wait(slot)? {
                accept::Wake::Channel => {}
                accept::Wake::Missed => {
                    send_free();
                    continue;
                }
                accept::Wake::Warm { cell, conn } => {
                    let mut announce = || announce_retiring(channel.as_fd(), pid);
                    let mut budget = Budget { remaining, on_last: &mut announce };
                    let mut cool = |id, served, keep, leftover: &[u8]| {
                        send_cool(channel.as_fd(), &mut out, id, served, keep, leftover)
                    };
                    let retiring = serve_warm(app, acc, (cell, conn), &serving, &mut budget, &mut cool)?;
                    remaining = budget.remaining;
                    if retiring {
                        // Our attention stays our own until we exit; the
                        // supervisor takes our warm connections back.
                        debug!("worker {pid} served its {max_requests} requests; exiting");
                        return Ok(());
                    }
                    end_own();
                    continue;
                }
                accept::Wake::Accepted { fd, peer } => {
                    let id = acc.next_id();
                    let (data, first) = match acc.first_read(fd.as_fd(), &limits) {
                        accept::Arrival::Serve(data, first) => (data, first),
                        accept::Arrival::Nothing => {
                            hand_over_or_close(channel.as_fd(), fd.as_fd(), id, 0, true, &[]);
                            end_own();
                            continue;
                        }
                        accept::Arrival::HandOver(data) => {
                            hand_over_or_close(channel.as_fd(), fd.as_fd(), id, 0, true, &data);
                            acc.recycle(data);
                            end_own();
                            continue;
                        }
                        accept::Arrival::Gone => {
                            end_own();
                            continue;
                        }
                    };
                    // In the vault while we serve it: if we die, the
                    // supervisor finds it there and answers for it.
                    slot.begin_connection(id);
                    if let Err(e) = acc.deposit(fd.as_fd(), id, slot.written()) {
                        debug!("worker {pid}: vault: {e}; handing the connection over");
                        hand_over_or_close(channel.as_fd(), fd.as_fd(), id, 0, true, &data);
                        end_own();
                        continue;
                    }
                    // Kept alive, it goes to the supervisor and from there to a
                    // warm cell, if there is room: no waiting for its next
                    // request here meanwhile.
                    let read_ahead = match acc.free_warm_cell(slot) {
                        Some(_) => std::time::Duration::ZERO,
                        None => serving.read_ahead,
                    };
                    let ctx = Context { peer: &peer, read_ahead, ..serving };
                    let stream = Stream::new(fd, serving.io_timeout, slot).with_rivals(acc.listeners());
                    let mut input = Input::with_buffer(stream, data);
                    let mut announce = || announce_retiring(channel.as_fd(), pid);
                    let mut budget = Budget { remaining, on_last: &mut announce };
                    let outcome = serve_parsed(app, &mut input, Some(first), 0, &ctx, &mut budget);
                    remaining = budget.remaining;
                    let conn = input.stream.as_fd();
                    // Kept alive, or closing with input to linger on: the
                    // supervisor's from here.
                    let keep = outcome.keep;
                    if keep || !input.buffered().is_empty() || accept::input_pending(conn) {
                        hand_over_or_close(
                            channel.as_fd(),
                            conn,
                            id,
                            outcome.served,
                            keep,
                            &outcome.leftover,
                        );
                    }
                    let (stream, buf) = input.into_parts();
                    drop(stream);
                    acc.recycle(buf);
                    acc.withdraw();
                    if outcome.retiring {
                        // Our attention stays our own: nothing may be handed
                        // to us between here and our exit.
                        debug!("worker {pid} served its {max_requests} requests; exiting");
                        return Ok(());
                    }
                    end_own();
                    continue;
                }
            }
        }
        // A reset is the supervisor letting us go with a message of ours
        // unread (a Skipped): as good as a close.
        let received = match wire::recv(channel.as_fd(), &mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Received::Closed,
            other => other?,
        };
        let (len, fd) = match received {
            Received::Closed => {
                debug!("worker {pid}: channel closed, exiting");
                return Ok(());
            }
            Received::Message(len, fd) => (len, fd),
        };
        let (conn_id, served, peer, data, ahead) = match ToWorker::decode(&buf[..len])? {
            ToWorker::Assign { conn_id, served, peer, data, ahead } => (conn_id, served, peer, data, ahead),
            // Let go after being parked: accept again.
            ToWorker::Go => continue,
        };
        let Some(fd) = fd else {
            return Err(wire::WireError("Assign without a connection").into());
        };
        if ahead && !scoreboard.slot().claim_ahead(conn_id) {
            // Sent while we were busy, then given to another worker.
            drop(fd);
            FromWorker::Skipped { conn_id }.encode(&mut out);
            let sent = held
                .send(channel.as_fd(), &mut Vec::new())
                .and_then(|()| wire::send(channel.as_fd(), &out, None));
            match sent {
                Ok(()) => continue,
                // Released (retired) meanwhile: nothing more will come.
                Err(e) if let_go(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // One it can keep warm goes back to its epoll set for free after
        // the response: no waiting for its next request meanwhile.
        let warm_room = accepter.as_mut().is_some_and(|a| a.free_warm_cell(slot).is_some());
        let read_ahead = if warm_room { std::time::Duration::ZERO } else { serving.read_ahead };
        let ctx = Context { peer, read_ahead, ..serving };
        slot.begin_connection(conn_id);
        let rivals = accepter.as_ref().map_or(&[][..], |a| a.listeners());
        let mut input = Input::new(Stream::new(fd, serving.io_timeout, slot).with_rivals(rivals), data);
        let mut announce = || {
            // In order: what we held back was finished before this began.
            if let Err(e) = held.send(channel.as_fd(), &mut Vec::new()) {
                error!("worker {pid}: cannot send its Dones: {e}");
            }
            announce_retiring(channel.as_fd(), pid)
        };
        let mut budget = Budget { remaining, on_last: &mut announce };
        let outcome = serve_connection(app, &mut input, served, &ctx, &mut budget);
        remaining = budget.remaining;
        let plain = outcome.keep && outcome.leftover.is_empty() && !outcome.retiring;
        let fd = input.into_stream().into_fd();
        let mut retiring = outcome.retiring;
        // Requests that came meanwhile on our warm connections: served now,
        // for up to WARM_BETWEEN, before we report this one; the rest go to
        // the supervisor's queue rather than wait behind what it hands us
        // next. The supervisor still counts us busy with this connection
        // until we report it (and, if we die on a warm one meanwhile, knows
        // that this one was finished: it ended plain).
        if let Some(acc) = accepter.as_mut() {
            let ready = acc.ready_warm();
            let between = plain && !slot.is_draining();
            let since = std::time::Instant::now();
            // Until we report it, the scoreboard names this connection: if
            // we die between two warm requests, it was finished, its
            // response all out.
            let this_one = slot.current_connection();
            for cell in ready {
                if between && !retiring && since.elapsed() < WARM_BETWEEN {
                    let Some(conn) = acc.claim_warm(slot, cell) else { continue };
                    held.send(channel.as_fd(), &mut out)?;
                    let mut announce = || announce_retiring(channel.as_fd(), pid);
                    let mut budget = Budget { remaining, on_last: &mut announce };
                    let mut cool = |id, served, keep, leftover: &[u8]| {
                        send_cool(channel.as_fd(), &mut out, id, served, keep, leftover)
                    };
                    retiring = serve_warm(app, acc, (cell, conn), &serving, &mut budget, &mut cool)?;
                    remaining = budget.remaining;
                    slot.resume_connection(this_one);
                } else if let Some((id, served)) = acc.release_warm(slot, cell) {
                    held.send(channel.as_fd(), &mut out)?;
                    send_cool(channel.as_fd(), &mut out, id, served, true, &[])?;
                }
            }
        }
        let plain = plain && !retiring;
        // Kept alive with nothing left over: keep it warm if there is room,
        // and serve its next request without the supervisor.
        if let Some(acc) = accepter.as_mut().filter(|_| plain) {
            if let Some(cell) = acc.free_warm_cell(slot) {
                acc.keep_warm(
                    slot,
                    cell,
                    accept::WarmConn::new(conn_id, fd, outcome.served, peer.to_owned()),
                )?;
                held.send(channel.as_fd(), &mut out)?;
                let cell = u8::try_from(cell).map_err(|_| wire::WireError("warm cell out of range"))?;
                FromWorker::Warm { conn_id, served: outcome.served, cell }.encode(&mut out);
                wire::send(channel.as_fd(), &out, None)?;
                continue;
            }
        }
        // Our copy of the connection goes before we report, so a "close"
        // is final once the supervisor closes its own copy.
        drop(fd);
        // Busy with more (a connection ahead waits in the channel): a plain
        // keep-alive Done can wait to go with the next ones, in one message.
        if plain && slot.has_ahead() && held.hold(conn_id, outcome.served) {
            continue;
        }
        held.send(channel.as_fd(), &mut out)?;
        FromWorker::Done { conn_id, served: outcome.served, keep: outcome.keep, leftover: &outcome.leftover }
            .encode(&mut out);
        wire::send(channel.as_fd(), &out, None)?;
        if retiring {
            debug!("worker {pid} served its {max_requests} requests; exiting");
            return Ok(());
        }
    }
}

/// How long a worker that has finished one of the supervisor's connections
/// goes on starting requests waiting on its warm connections before it
/// reports that one and takes the next (a connection sent ahead waits
/// meanwhile); what is still waiting then goes back to the supervisor.
const WARM_BETWEEN: std::time::Duration = std::time::Duration::from_millis(1);

/// Gives a warm connection back (Cool): its id, requests served, keep, and
/// what was read past the last request.
type SendCool<'a> = dyn FnMut(u64, u32, bool, &[u8]) -> std::io::Result<()> + 'a;

/// Serves the request waiting on a warm connection whose cell the worker
/// has claimed, if it is all there; then the connection stays warm if it is
/// kept alive with nothing left over. Anything else (a head still coming, a
/// request the supervisor must answer, the client gone, a response that
/// closes the connection) gives it back with `cool`. Whether that was the
/// worker's last request.
fn serve_warm(
    app: &mut dyn App,
    acc: &mut accept::Accepter,
    (cell, conn): (usize, accept::WarmConn),
    serving: &Context<'_>,
    budget: &mut Budget<'_>,
    cool: &mut SendCool<'_>,
) -> std::io::Result<bool> {
    let slot = serving.slot;
    let accept::WarmConn { id, fd, served, peer, .. } = conn;
    let (data, first) = match acc.first_read(fd.as_fd(), serving.limits) {
        accept::Arrival::Serve(data, first) => (data, first),
        accept::Arrival::Nothing => {
            acc.put_back_warm(slot, cell, accept::WarmConn::served_again(id, fd, served, peer));
            return Ok(false);
        }
        // Gone, or not ours to serve: the supervisor's again, with what was
        // read.
        gone_or_not_ours => {
            slot.warm_clear(cell);
            acc.forget_warm(fd);
            if let accept::Arrival::HandOver(data) = gone_or_not_ours {
                cool(id, served, true, &data)?;
                acc.recycle(data);
            } else {
                cool(id, served, false, &[])?;
            }
            return Ok(false);
        }
    };
    slot.begin_connection(id);
    // Handing it back costs nothing now: no reading ahead.
    let ctx = Context { peer: &peer, read_ahead: std::time::Duration::ZERO, ..*serving };
    let stream = Stream::new(fd, serving.io_timeout, slot).with_rivals(acc.listeners());
    let mut input = Input::with_buffer(stream, data);
    let outcome = serve_parsed(app, &mut input, Some(first), served, &ctx, budget);
    let (stream, buf) = input.into_parts();
    let fd = stream.into_fd();
    acc.recycle(buf);
    let plain = outcome.keep && outcome.leftover.is_empty() && !outcome.retiring;
    if plain && !slot.is_draining() {
        acc.keep_warm(slot, cell, accept::WarmConn::served_again(id, fd, outcome.served, peer))?;
    } else {
        slot.warm_clear(cell);
        acc.forget_warm(fd);
        cool(id, outcome.served, outcome.keep, &outcome.leftover)?;
    }
    Ok(outcome.retiring)
}

/// The Dones a busy worker holds back while a connection sent ahead waits
/// for it (PROTOCOL.md, Dones): sent together, before anything else it
/// says and before it waits, so the supervisor reads one message, and is
/// woken once, for several requests. If the worker dies holding them, the
/// supervisor knows those connections were finished from the claims of the
/// ones after them.
#[derive(Default)]
struct HeldDones {
    dones: Vec<(u64, u32)>,
}

impl HeldDones {
    /// Holds back the Done for `conn_id`; false if no more may be held.
    fn hold(&mut self, conn_id: u64, served: u32) -> bool {
        if self.dones.len() >= wire::Dones::MAX {
            return false;
        }
        self.dones.push((conn_id, served));
        true
    }

    /// Sends what is held: one plain Done, or a Dones.
    fn send(&mut self, channel: std::os::fd::BorrowedFd<'_>, out: &mut Vec<u8>) -> std::io::Result<()> {
        match self.dones.as_slice() {
            [] => return Ok(()),
            [(conn_id, served)] => {
                FromWorker::Done { conn_id: *conn_id, served: *served, keep: true, leftover: &[] }.encode(out)
            }
            many => wire::Dones::encode(many, out),
        }
        self.dones.clear();
        wire::send(channel, out, None)
    }
}

/// A send failed because the supervisor has closed our channel: it let us
/// go (a retirement or a stop), which is no error.
fn let_go(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(nix::libc::EPIPE | nix::libc::ECONNRESET))
}

/// Gives a warm connection back to the supervisor (Cool); our copy is closed.
fn send_cool(
    channel: std::os::fd::BorrowedFd<'_>,
    out: &mut Vec<u8>,
    conn_id: u64,
    served: u32,
    keep: bool,
    leftover: &[u8],
) -> std::io::Result<()> {
    FromWorker::Cool { conn_id, served, keep, leftover }.encode(out);
    match wire::send(channel, out, None) {
        // Let go (a stop, a retirement): the supervisor has it anyway.
        Err(e) if let_go(&e) => Ok(()),
        other => other,
    }
}

/// Tells the supervisor the last request has started (max requests).
fn announce_retiring(channel: std::os::fd::BorrowedFd<'_>, pid: u32) {
    let mut msg = Vec::with_capacity(2);
    FromWorker::Retiring.encode(&mut msg);
    if let Err(e) = wire::send(channel, &msg, None) {
        error!("worker {pid}: cannot announce retirement: {e}");
    }
}

/// Hands a connection of our own to the supervisor. If it cannot take it
/// (it has let us go: a stop, or a protocol error), the connection closes
/// with us: its response, if any, is out.
fn hand_over_or_close(
    channel: std::os::fd::BorrowedFd<'_>,
    conn: std::os::fd::BorrowedFd<'_>,
    id: u64,
    served: u32,
    keep: bool,
    leftover: &[u8],
) {
    if let Err(e) = accept::hand_over(channel, conn, id, served, keep, leftover) {
        debug!("handing a connection to the supervisor: {e}; closing it");
    }
}
