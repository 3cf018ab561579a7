//! Signals, stopping (graceful and fast), and the periodic sweep of
//! timeouts.

use std::time::{Duration, Instant};

use log::{debug, info, warn};
use monodon_proto::http::Rejection;
use nix::sys::signal::{kill, Signal};
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1};

use super::{ConnKey, ConnState, Stopping, Supervisor, WorkerKey, WorkerState, MEMORY_CHECK_INTERVAL};

impl Supervisor {
    pub(super) fn on_signals(&mut self) {
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

    pub(super) fn begin_graceful_stop(&mut self) {
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
    pub(super) fn reopen_logs(&mut self) {
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

    pub(super) fn begin_fast_stop(&mut self) {
        info!("fast stop: killing {} workers", self.workers.len());
        self.stopping = Stopping::Fast;
        self.notifier.stopping();
        self.close_listeners();
        for (_, w) in &self.workers {
            let _ = kill(w.pid, Signal::SIGKILL);
        }
    }

    pub(super) fn close_listeners(&mut self) {
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
    pub(super) fn release_idle_workers(&mut self) {
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
    pub(super) fn requests_pending(&self) -> bool {
        self.dispatcher.queued() > 0
            || self.conns.iter().any(|(_, c)| c.state == ConnState::Reading && !c.is_idle())
    }

    pub(super) fn finished(&mut self) -> bool {
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
    pub(super) fn publish_queue_state(&mut self) {
        let waiting = self.dispatcher.queued() > 0;
        if waiting != self.others_waiting {
            self.others_waiting = waiting;
            for (_, w) in &self.workers {
                w.scoreboard.slot().set_others_waiting(waiting);
            }
        }
    }

    /// Closes connections whose head, idle or linger time is up.
    pub(super) fn sweep(&mut self, now: Instant) {
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
                reload.workers, reload.config.reload_timeout
            );
            self.abandon_reload(reload, &reason);
        }
        self.check_stuck_workers(now);
        let read_memory = now >= self.next_memory_check;
        if read_memory {
            self.next_memory_check = now + MEMORY_CHECK_INTERVAL;
        }
        if self.stopping == Stopping::No {
            self.retire_aged_and_grown(now, read_memory);
        }
    }
}
