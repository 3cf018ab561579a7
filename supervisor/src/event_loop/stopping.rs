//! Signals, the listeners' part of a stop, and the periodic sweep.

use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::sys::signal::{kill, Signal};
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1};

use super::{Supervisor, Wire, MEMORY_CHECK_INTERVAL};
use crate::core::Activity;

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
                SIGTTIN => self.core.scale(1, &mut Wire { msg: &mut self.msg }, Instant::now()),
                SIGTTOU => self.core.scale(-1, &mut Wire { msg: &mut self.msg }, Instant::now()),
                SIGUSR1 => self.reopen_logs(),
                other => debug!("ignoring signal {other}"),
            }
            self.carry_out();
        }
    }

    pub(super) fn begin_graceful_stop(&mut self) {
        self.core.stop_gracefully(Instant::now());
        self.close_listeners();
    }

    pub(super) fn begin_fast_stop(&mut self) {
        self.core.stop_fast(Instant::now());
        self.close_listeners();
    }

    /// SIGUSR1: the supervisor and its workers reopen the access log (after
    /// logrotate moved it). Starting workers open it afresh anyway, and may
    /// not handle USR1 yet.
    pub(super) fn reopen_logs(&mut self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
        let mut told = 0;
        for (_, w) in self.core.workers() {
            let Some(pid) = w.io.pid else { continue };
            if w.activity != Activity::Starting && kill(pid, Signal::SIGUSR1).is_ok() {
                told += 1;
            }
        }
        info!("SIGUSR1: {told} workers reopen their access log");
    }

    fn close_listeners(&mut self) {
        for l in &self.listeners {
            let _ = self.poller.delete(l.fd());
        }
        self.accepting = false;
        for l in &self.listeners {
            // Workers that accept hold copies: ours stops listening for
            // them too. (An inherited one is its owner's to keep open.)
            if !l.is_inherited() {
                l.stop_listening();
            }
            l.unlink();
        }
        self.listeners.clear();
    }

    /// Tells the workers whether connections wait for one of them, so that
    /// none lingers on its own keep-alive client meanwhile (read-ahead).
    pub(super) fn publish_queue_state(&mut self) {
        let waiting = self.core.queued() > 0;
        if waiting != self.others_waiting {
            self.others_waiting = waiting;
            for (_, w) in self.core.workers() {
                w.io.scoreboard.slot().set_others_waiting(waiting);
            }
        }
    }

    /// While workers are free to accept, connections should not wait on a
    /// listener: ones that wait from one sweep to the next with no worker
    /// accepting anything meanwhile mean the workers are not (one wedged
    /// outside a request, stopped, swapping): the supervisor accepts again
    /// and hands them over, under `--timeout`, until the backlog is empty.
    fn check_backlog(&mut self) {
        if !self.core.workers_accept() && !self.workers_stalled {
            self.backlog_seen = None;
            return;
        }
        let waiting = self.listeners.iter().any(|l| {
            let mut fds = [nix::poll::PollFd::new(l.fd(), nix::poll::PollFlags::POLLIN)];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0)
        });
        let accepted: u64 = self.core.workers().map(|(_, w)| w.io.scoreboard.slot().accepted()).sum();
        let stalled = waiting && self.backlog_seen == Some(accepted);
        self.backlog_seen = waiting.then_some(accepted);
        if stalled != self.workers_stalled {
            if stalled {
                warn!("connections wait on the listeners and no free worker takes them; accepting them here");
            }
            self.workers_stalled = stalled;
            self.update_accepting();
        }
    }

    /// The periodic work: the request rate, systemd's watchdog and status,
    /// a paused accept resumed, and the core's tick (timeouts, stuck
    /// workers, recycling by age and memory).
    pub(super) fn sweep(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.rate_sample.0);
        if elapsed >= Duration::from_secs(1) {
            let total = self.total_requests();
            self.requests_per_sec = total.saturating_sub(self.rate_sample.1) as f64 / elapsed.as_secs_f64();
            self.rate_sample = (now, total);
        }
        if self.core.ready_notified() && self.notifier.enabled() {
            // The status line reads /proc for every worker: only when due.
            let line = self.notifier.status_due(now).then(|| self.status_line());
            self.notifier.tick(now, line);
        }
        self.check_backlog();
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
            self.update_accepting();
        }
        let read_memory = now >= self.next_memory_check;
        if read_memory {
            self.next_memory_check = now + MEMORY_CHECK_INTERVAL;
        }
        self.core.tick(now, read_memory, &mut Wire { msg: &mut self.msg });
        self.check_templates(now);
        self.expire_scrapes(now);
    }
}
