//! Stops (graceful and fast), and the tick: timeouts of connections,
//! reloads and stuck workers, and recycling by age and memory.

use std::time::Instant;

use log::{debug, info, warn};

use super::{
    Action, Activity, Channel, Core, Kill, Named, Peer, Port, Retirement, Signal, Stopping, WorkerKey,
};

impl<C: Peer, W: Named> Core<C, W> {
    /// TERM/QUIT: in-flight requests finish, then the workers go.
    pub fn stop_gracefully(&mut self, now: Instant) {
        if self.stopping != Stopping::No {
            return;
        }
        let busy = self.workers.iter().filter(|(_, w)| matches!(w.activity, Activity::Busy { .. })).count();
        info!("graceful stop: finishing {busy} busy and {} queued connections", self.dispatcher.queued());
        self.stopping = Stopping::Graceful { deadline: now + self.settings.graceful_timeout };
        self.act(Action::Notify(super::Notice::Stopping));
        self.abandon_reload("the supervisor is stopping", now);
        // Responses still being produced say `Connection: close`.
        self.act(Action::Drain);
        // Idle keep-alive connections close now; a request on its way (part
        // of a head, or a new connection whose first request has not arrived:
        // inherited listeners may lack TCP_DEFER_ACCEPT) is let in, bounded by
        // the head timeout, and served.
        self.close_idle_conns();
        self.release_idle_workers();
    }

    /// INT: every worker is killed now.
    pub fn stop_fast(&mut self, now: Instant) {
        info!("fast stop: killing {} workers", self.workers.len());
        if self.stopping == Stopping::No {
            self.act(Action::Notify(super::Notice::Stopping));
        }
        self.stopping = Stopping::Fast;
        // Its waiting control clients hear why, rather than an EOF.
        self.abandon_reload("the supervisor is stopping", now);
        self.kill_all();
    }

    /// Every worker is killed, and every template let go.
    fn kill_all(&mut self) {
        self.release_templates();
        let all: Vec<WorkerKey> = self.workers.iter().map(|(k, _)| WorkerKey(k)).collect();
        for worker in all {
            self.act(Action::Signal { worker, signal: Signal::Kill });
        }
    }

    /// Whether the supervisor is done: stopping, no worker left, and (a
    /// graceful stop) no request left. A graceful stop past its deadline
    /// kills what remains.
    pub fn finished(&mut self, now: Instant) -> bool {
        match self.stopping {
            Stopping::No => false,
            Stopping::Fast => self.workers.is_empty(),
            // Requests that have arrived are served first, even if the
            // workers to serve them must be started again (one retired, or
            // died, as the stop began).
            Stopping::Graceful { deadline } => {
                let pending = self.requests_pending();
                if now >= deadline && (pending || !self.workers.is_empty()) {
                    warn!("graceful stop timed out: killing {} workers", self.workers.len());
                    self.stopping = Stopping::Fast;
                    self.kill_all();
                    return self.workers.is_empty();
                }
                self.workers.is_empty() && !pending
            }
        }
    }

    /// The periodic check: connections, reloads and workers whose time is
    /// up; `read_memory`: also check --max-worker-memory (costly to read).
    pub fn tick(&mut self, now: Instant, read_memory: bool, port: &mut impl Port<C, W>) {
        self.expire_conns(now);
        if matches!(self.stopping, Stopping::Graceful { .. }) {
            self.release_idle_workers();
        }
        if let Some(reload) = self.reload.as_ref().filter(|r| now >= r.deadline) {
            let ready = self
                .workers
                .iter()
                .filter(|(_, w)| w.generation == reload.generation && w.activity == Activity::Idle)
                .count();
            let reason = format!(
                "only {ready} of {} workers ready after --reload-timeout {:?}",
                reload.workers, reload.settings.reload_timeout
            );
            self.abandon_reload(&reason, now);
        }
        self.notice_own_requests(now, port);
        self.tend_warm(now, port);
        self.check_stuck_workers(now, port);
        if self.stopping == Stopping::No {
            self.retire_aged_and_grown(now, read_memory, port);
        }
    }

    /// Idle workers that have been on a request of their own for
    /// `OWN_NOTICE` are claimed, so the core knows they are busy (with all
    /// of them so, the supervisor accepts again) and times them out.
    fn notice_own_requests(&mut self, now: Instant, port: &mut impl Port<C, W>) {
        let long: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| w.accepts_own && w.activity == Activity::Idle)
            .filter(|(_, w)| port.request_age(&w.io).is_some_and(|age| age >= super::OWN_NOTICE))
            .map(|(k, _)| WorkerKey(k))
            .collect();
        for wkey in long {
            if !self.claim_idle(wkey, port, now) {
                debug!("worker {} is on a long request of its own", self.workers[wkey.0].io.pid());
            }
        }
    }

    /// Kills workers busy on one request for longer than `--timeout`
    /// (SIGTERM, then SIGKILL after the grace period), and workers that
    /// closed their channel but do not exit.
    fn check_stuck_workers(&mut self, now: Instant, port: &mut impl Port<C, W>) {
        let (timeout, grace) = (self.settings.timeout, self.settings.kill_grace);
        let mut signals = Vec::new();
        let mut killed = Vec::new();
        for (k, w) in self.workers.iter_mut() {
            let wkey = WorkerKey(k);
            if let Channel::Lost { at } = w.channel {
                if now.saturating_duration_since(at) >= grace && w.killed.is_none() {
                    warn!("worker {} closed its channel but did not exit; killing it", w.io.pid());
                    signals.push(Action::CloseChannel { worker: wkey });
                    signals.push(Action::Signal { worker: wkey, signal: Signal::Kill });
                    w.channel = Channel::Closed;
                }
            }
            match w.killed {
                Some(Kill { at, escalated: false }) if now.saturating_duration_since(at) >= grace => {
                    warn!("worker {} did not exit after SIGTERM; sending SIGKILL", w.io.pid());
                    signals.push(Action::Signal { worker: wkey, signal: Signal::Kill });
                    w.killed = Some(Kill { at, escalated: true });
                }
                Some(_) => {}
                None => {
                    let (conn, since) = match w.activity {
                        Activity::Busy { conn, since, .. } => (Some(conn), since),
                        Activity::Own { since } => (None, since),
                        _ => continue,
                    };
                    // A worker that never even started the request counts from the hand-over.
                    let age = port.request_age(&w.io).unwrap_or_else(|| now.saturating_duration_since(since));
                    if age <= timeout {
                        continue;
                    }
                    let peer =
                        conn.and_then(|c| self.conns.get(c.0)).map_or("its own client", |c| c.io.peer());
                    let request = w.io.request_line().unwrap_or_else(|| "(not started)".into());
                    warn!(
                        "worker {} has been busy for {:.1}s on {request:?} from {peer} (--timeout {timeout:?}); killing it",
                        w.io.pid(),
                        age.as_secs_f64(),
                    );
                    signals.push(Action::Signal { worker: wkey, signal: Signal::Term });
                    w.killed = Some(Kill { at: now, escalated: false });
                    self.totals.timeouts += 1;
                    killed.push(wkey);
                }
            }
        }
        self.actions.extend(signals);
        for wkey in killed {
            self.take_back_ahead(wkey, port, now);
        }
    }

    /// Serving workers past their --max-worker-age, or whose private memory
    /// passed --max-worker-memory, go out: each gets its successor at once,
    /// and serves on until the successor is ready.
    fn retire_aged_and_grown(&mut self, now: Instant, read_memory: bool, port: &mut impl Port<C, W>) {
        let memory_limit = self.settings.max_worker_memory.filter(|_| read_memory);
        let due: Vec<(WorkerKey, Retirement)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.staying() && w.activity != Activity::Starting && w.killed.is_none())
            .filter(|(_, w)| w.generation == self.serving)
            .filter_map(|(k, w)| {
                if w.age_limit.is_some_and(|limit| now.saturating_duration_since(w.started) >= limit) {
                    return Some((WorkerKey(k), Retirement::MaxAge));
                }
                let limit = memory_limit?;
                let private = port.private_memory(&w.io)?;
                (private > limit).then_some((WorkerKey(k), Retirement::MaxMemory))
            })
            .collect();
        for (wkey, why) in due {
            info!(
                "worker {} is going out ({}); starting its successor",
                self.workers[wkey.0].io.pid(),
                why.as_str()
            );
            self.make_outgoing(wkey, why);
        }
    }
}
