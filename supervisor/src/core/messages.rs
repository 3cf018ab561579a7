//! What workers say (Ready, Done, Retiring, Skipped), their channels
//! closing, and their exits: what their connection is answered, back-off,
//! and what an exit does to a reload.

use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::{
    Action, Activity, Ahead, Channel, ConnKey, Core, Named, Peer, Place, Port, Retirement, Service, Stopping,
    TemplateLife, WorkerKey,
};

/// A message the worker had no business sending; it has been killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misbehaviour(pub &'static str);

/// A worker has exited: its part, and what became of its connection.
pub struct Exit<W> {
    pub io: W,
    pub generation: u64,
    pub lived: Duration,
    /// The connection it was serving, now lingering, and the status to
    /// answer first (502 died, 504 killed for --timeout) unless it had
    /// already written a response byte.
    pub conn: Option<(ConnKey, Option<u16>)>,
    /// How long it had been on that connection.
    pub busy_for: Option<Duration>,
    /// It was retiring or the supervisor is stopping: no alarm, no back-off.
    pub expected: bool,
    /// It had been killed for --timeout.
    pub killed: bool,
}

impl<C: Peer, W: Named> Core<C, W> {
    /// Ready: its app is up; it takes `ahead_depth` connections sent ahead
    /// (at most `AHEAD_DEPTH` are), and `accepts_own` if it accepts
    /// connections itself when let go.
    pub fn worker_ready(
        &mut self,
        wkey: WorkerKey,
        ahead_depth: usize,
        accepts_own: bool,
        keeps_warm: bool,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) -> Result<(), Misbehaviour> {
        let w = self.workers.get_mut(wkey.0).ok_or(Misbehaviour("no such worker"))?;
        if w.activity != Activity::Starting {
            return Err(self.misbehaving(wkey, "unexpected Ready"));
        }
        w.ahead_depth = ahead_depth.min(super::AHEAD_DEPTH);
        w.accepts_own = accepts_own;
        // Its warm connections are served while its attention is free.
        w.keeps_warm = accepts_own && keeps_warm;
        debug!("worker {} ready", w.io.pid());
        let (took, generation) = (now.saturating_duration_since(w.started), w.generation);
        self.record_start(took);
        let template_ready = self.template(generation).is_some_and(|t| t.life == TemplateLife::Ready);
        if !self.settings_of(generation).templates || template_ready {
            // Workers can be made again (exec'd: its command works).
            self.hold_limits(generation, false);
        }
        if template_ready {
            self.template_proved(generation);
        }
        self.worker_idle(wkey, port, now);
        self.retire_outgoing(generation, port, now);
        Ok(())
    }

    /// Retiring: its last request has started (max requests); its
    /// replacement starts at once.
    pub fn worker_retiring(&mut self, wkey: WorkerKey, port: &mut impl Port<C, W>, now: Instant) {
        let Some(w) = self.workers.get_mut(wkey.0) else { return };
        info!("worker {} reached its {} requests; starting its replacement", w.io.pid(), w.max_requests);
        w.service = Service::Retiring(Retirement::MaxRequests);
        w.outgoing = None;
        self.count_recycle(Retirement::MaxRequests);
        self.dispatcher.remove_worker(wkey);
        // It exits after this request: it will never read the next one.
        self.take_back_ahead(wkey, port, now);
        self.take_back_all_warm(wkey, port, now);
    }

    /// Free: asked for while on a connection of its own, it is done with it
    /// and the core's again.
    pub fn worker_free(
        &mut self,
        wkey: WorkerKey,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) -> Result<(), Misbehaviour> {
        let w = self.workers.get_mut(wkey.0).ok_or(Misbehaviour("no such worker"))?;
        if !matches!(w.activity, Activity::Own { .. }) {
            return Err(self.misbehaving(wkey, "Free while not asked for"));
        }
        self.worker_idle(wkey, port, now);
        Ok(())
    }

    /// A connection a worker accepted itself was in its vault when it died
    /// (the shell found it there): it is the worker's current connection,
    /// answered at the exit like one handed over (`id`: the worker's own).
    /// `None` (the shell closes it) if the worker had one of ours instead.
    pub fn vaulted(&mut self, wkey: WorkerKey, io: C, id: u64, now: Instant) -> Option<ConnKey> {
        let w = self.workers.get(wkey.0)?;
        if !w.accepts_own || !matches!(w.activity, Activity::Idle | Activity::Own { .. }) {
            return None;
        }
        let since = w.busy_since().unwrap_or(now);
        let place = Place::InWorker { worker: wkey, ahead: false };
        let ckey = ConnKey(self.conns.insert(super::Conn { io, id, served: 0, place, ready_at: None }));
        self.dispatcher.remove_worker(wkey);
        self.workers[wkey.0].activity = Activity::Busy { conn: ckey, since, ahead: Ahead::default() };
        Some(ckey)
    }

    /// Skipped: it found a connection we had taken back.
    pub fn worker_skipped(&mut self, wkey: WorkerKey) -> Result<(), Misbehaviour> {
        let w = self.workers.get_mut(wkey.0).ok_or(Misbehaviour("no such worker"))?;
        if w.skips_pending == 0 {
            return Err(self.misbehaving(wkey, "Skipped a connection it was not sent ahead"));
        }
        w.skips_pending -= 1;
        Ok(())
    }

    /// Done with connection `conn_id` after `served` requests on it, kept
    /// alive or not. The connection's key, for the shell to put what the
    /// worker left over in its buffer (before it carries out `Resume`).
    pub fn worker_done(
        &mut self,
        wkey: WorkerKey,
        conn_id: u64,
        served: u32,
        keep: bool,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) -> Result<ConnKey, Misbehaviour> {
        let ckey = self.finish_current(wkey, conn_id, served, port, now)?;
        if keep && self.stopping == Stopping::No {
            self.act(Action::Resume { conn: ckey });
        } else {
            self.act(Action::CloseAfterResponse { conn: ckey });
        }
        Ok(ckey)
    }

    /// What a Done and a Warm do alike: the worker is on to what was sent
    /// ahead, or idle, and its connection (served `served` times) is back
    /// as Reading; the caller says what becomes of it.
    pub(super) fn finish_current(
        &mut self,
        wkey: WorkerKey,
        conn_id: u64,
        served: u32,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) -> Result<ConnKey, Misbehaviour> {
        let w = self.workers.get_mut(wkey.0).ok_or(Misbehaviour("no such worker"))?;
        let Activity::Busy { conn: ckey, mut ahead, .. } = w.activity else {
            return Err(self.misbehaving(wkey, "Done while not busy"));
        };
        if self.conns.get(ckey.0).map(|c| c.id) != Some(conn_id) {
            return Err(self.misbehaving(wkey, "Done for a connection it does not hold"));
        }
        // The worker first: free now, or on to the first connection sent
        // ahead (it claims that one as soon as it has sent this Done, and
        // nothing takes it back any more).
        let was_ahead = !ahead.is_empty();
        match ahead.pop_front() {
            Some(next) => {
                w.activity = Activity::Busy { conn: next, since: now, ahead };
                if let Some(c) = self.conns.get_mut(next.0) {
                    c.place = Place::InWorker { worker: wkey, ahead: false };
                }
                self.act(Action::Claimed { conn: next });
            }
            None => w.activity = Activity::Idle,
        }
        let keepalive = self.settings.keepalive_timeout;
        let conn = &mut self.conns[ckey.0];
        conn.served = served;
        conn.place = Place::Reading { deadline: now + keepalive, partial: false };
        if !was_ahead {
            // Before the connection may queue again: the free worker takes
            // what waited before it (and nothing sent ahead elsewhere
            // meanwhile needs taking back).
            self.worker_idle(wkey, port, now);
        }
        if was_ahead {
            self.send_ahead(wkey, port, now);
        }
        self.order_successor_near_limit(wkey, port);
        Ok(ckey)
    }

    /// A worker within a tenth of its max-requests draw gets its successor
    /// now, so that the successor is ready when it leaves. (Below ten
    /// requests there is no tenth: it is replaced as its last one starts.)
    fn order_successor_near_limit(&mut self, wkey: WorkerKey, port: &mut impl Port<C, W>) {
        let Some(w) = self.workers.get(wkey.0) else { return };
        let limit = w.max_requests;
        if w.staying() && limit >= 10 && port.served(&w.io) >= limit - limit / 10 {
            debug!("worker {} is near its {limit} requests; starting its successor", w.io.pid());
            self.make_outgoing(wkey, Retirement::MaxRequests);
        }
    }

    /// Kills a misbehaving worker and names what it did.
    pub(super) fn misbehaving(&mut self, wkey: WorkerKey, what: &'static str) -> Misbehaviour {
        self.misbehaved(wkey, what);
        Misbehaviour(what)
    }

    /// The worker's end of the channel is gone (the shell read EOF and
    /// dropped its end): it is exiting, and its exit will tell how; one
    /// that lives on anyway is killed by the tick.
    pub fn channel_closed(&mut self, wkey: WorkerKey, now: Instant) {
        self.dispatcher.remove_worker(wkey);
        // One seen gone by a failed send first keeps that time: the grace
        // runs from then.
        if let Some(w) = self.workers.get_mut(wkey.0).filter(|w| w.channel == Channel::Open) {
            w.channel = Channel::Lost { at: now };
        }
    }

    /// What is still ahead of a worker that has exited, once the unclaimed
    /// ones are taken back, it had claimed: a worker claims its next
    /// connection only after finishing the one before, so it had finished
    /// its current one and all but the last claimed, and held back their
    /// Dones (PROTOCOL.md, Dones). Only a Done kept alive with nothing left
    /// over is held back, so they are taken back as after such a Done (with
    /// at least one more request served). The last claimed is the one it
    /// was on, unless it died on a warm connection (`on_warm`): it serves
    /// one between two of ours only after finishing the one before the same
    /// way, so that one is taken back too, and the worker was on none of
    /// ours.
    fn resume_finished_unreported(&mut self, wkey: WorkerKey, on_warm: bool, now: Instant) {
        let Some(w) = self.workers.get_mut(wkey.0) else { return };
        let Activity::Busy { conn: current, ahead, .. } = &mut w.activity else { return };
        #[cfg(test)]
        if self.forget_unreported {
            *ahead = super::Ahead::default();
            return;
        }
        let mut finished = Vec::new();
        while let Some(next) = ahead.pop_front() {
            finished.push(std::mem::replace(current, next));
            if let Some(c) = self.conns.get_mut(next.0) {
                c.place = Place::InWorker { worker: wkey, ahead: false };
            }
        }
        #[cfg(test)]
        let on_warm = on_warm && !self.forget_before_warm;
        if on_warm {
            finished.push(*current);
            w.activity = Activity::Idle;
        }
        let pid = w.io.pid();
        let resume = self.stopping == Stopping::No;
        for ckey in finished {
            let Some(c) = self.conns.get_mut(ckey.0) else { continue };
            debug!("worker {pid} had finished connection {} before it died", c.id);
            c.served = c.served.saturating_add(1);
            c.place = Place::Reading { deadline: now + self.settings.keepalive_timeout, partial: false };
            // What it had read of its request (it was sent ahead) goes first.
            self.actions.push_back(Action::Claimed { conn: ckey });
            self.actions.push_back(if resume {
                Action::Resume { conn: ckey }
            } else {
                Action::CloseAfterResponse { conn: ckey }
            });
        }
    }

    /// The worker has exited (`how`, for the log), after the shell handled
    /// everything it had said on its channel.
    pub fn worker_exited(
        &mut self,
        wkey: WorkerKey,
        how: &str,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) -> Option<Exit<W>> {
        // A connection sent ahead and never claimed was not started: it is
        // served by another worker, not answered 502.
        self.take_back_ahead(wkey, port, now);
        let warm_current = self.warm_at_exit(wkey, port, now);
        self.resume_finished_unreported(wkey, warm_current.is_some(), now);
        let w = self.workers.try_remove(wkey.0)?;
        self.dispatcher.remove_worker(wkey);
        let lived = now.saturating_duration_since(w.started);
        let mut conn = None;
        let mut busy_for = None;
        // On a warm connection, it was on none of ours (made Idle above).
        let current = match (w.activity, warm_current) {
            (Activity::Busy { conn, since, ahead }, None) => {
                debug_assert!(ahead.is_empty(), "taken back, or claimed and made current above");
                Some((conn, since))
            }
            (_, Some(warm)) => Some((warm, w.busy_since().unwrap_or(now))),
            _ => None,
        };
        if let Some((ckey, since)) = current {
            busy_for = Some(now.saturating_duration_since(since));
            if let Some(c) = self.conns.get_mut(ckey.0) {
                if matches!(c.place, Place::InWorker { worker, .. } if worker == wkey) {
                    let wrote = port.wrote_on(&w.io, &c.io, c.id);
                    let status = if w.killed.is_some() { 504 } else { 502 };
                    c.place = Place::Lingering { deadline: now + self.settings.linger_timeout };
                    conn = Some((ckey, (!wrote).then_some(status)));
                }
            }
        }
        // A claimed connection the Done never came for (the worker died
        // between its Done and serving the next) is in its hands too: the
        // `Busy` above names it, as the Done made it current.
        let expected = w.retiring().is_some() || self.stopping != Stopping::No;
        let exit = Exit {
            generation: w.generation,
            lived,
            conn,
            busy_for,
            expected,
            killed: w.killed.is_some(),
            io: w.io,
        };
        if expected {
            return Some(exit);
        }
        if self.reload.as_ref().is_some_and(|r| r.generation == exit.generation) {
            let when =
                if w.activity == Activity::Starting { "before it was ready" } else { "during the reload" };
            self.abandon_reload(&format!("worker {} {how} {when}", exit.io.pid()), now);
            return Some(exit);
        }
        self.totals.respawns += 1;
        let delay =
            if exit.killed { Duration::ZERO } else { self.backoff.on_death(lived, port.served(&exit.io)) };
        if delay > Duration::ZERO {
            warn!("workers keep dying young ({} in a row); next start in {delay:?}", self.backoff.failures());
        }
        self.next_spawn_at = self.next_spawn_at.max(now + delay);
        Some(exit)
    }
}
