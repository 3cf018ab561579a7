//! Connections to workers: hand-over to an idle worker, sending ahead to a
//! busy one, and taking back what was sent ahead and not yet claimed.

use std::io;
use std::os::fd::AsFd;
use std::time::Instant;

use log::{debug, info};
use monodon_proto::wire::{self, ToWorker};

use super::{ConnKey, ConnState, Retirement, Supervisor, Worker, WorkerKey, WorkerState, AHEAD_PATIENCE};

impl Supervisor {
    pub(super) fn worker_idle(&mut self, wkey: WorkerKey) {
        let w = &mut self.workers[wkey];
        w.state = WorkerState::Idle;
        if w.channel_lost.is_some() {
            // Exiting: nothing more for it.
            return;
        }
        if w.retiring.is_some() {
            self.release(wkey);
            return;
        }
        if w.generation != self.serving_generation {
            if self.reload.as_ref().is_some_and(|r| r.generation == w.generation) {
                self.maybe_finish_reload();
            } else {
                self.retire(wkey, Retirement::Outdated);
            }
            return;
        }
        let serving = self.serving_generation;
        let ready = || {
            self.workers
                .iter()
                .filter(|(_, w)| {
                    w.generation == serving && w.retiring.is_none() && w.state != WorkerState::Starting
                })
                .count()
        };
        if !self.ready_notified && ready() >= self.target_workers {
            self.ready_notified = true;
            info!("generation {} ready: {} workers", self.serving_generation, self.target_workers);
            let line = self.status_line();
            self.notifier.ready(line);
        }
        // A connection sent ahead to a worker that is still on a long request
        // has waited longer than any in the queue: it goes first.
        let any = self.dispatcher.queued() == 0;
        if let Some(ckey) = self.take_back_waiting_ahead(wkey, any) {
            self.hand_over(wkey, ckey);
        } else if let Some(ckey) = self.dispatcher.worker_idle(wkey) {
            self.hand_over(wkey, ckey);
        } else {
            self.update_accepting();
            self.release_idle_workers();
        }
    }

    /// Passes a connection with a complete head to an idle worker.
    pub(super) fn hand_over(&mut self, wkey: WorkerKey, ckey: ConnKey) {
        match self.send_assign(wkey, ckey, false) {
            Ok(()) => {
                // Idle connections must stay cheap: drop the buffer, not just clear it.
                self.conns[ckey].pending.release();
                let worker = &mut self.workers[wkey];
                worker.state = WorkerState::Busy(ckey);
                worker.busy_since = Instant::now();
            }
            Err(e) => {
                self.send_failed(wkey, &e);
                if let Some(idle) = self.dispatcher.conn_back(ckey) {
                    self.hand_over(idle, ckey);
                }
                return;
            }
        }
        self.send_ahead(wkey);
        self.update_accepting();
    }

    /// Sends connection `ckey` (its fd, and the bytes read from it) to
    /// worker `wkey` in an Assign, or an Assign ahead; on success the
    /// connection is the worker's.
    pub(super) fn send_assign(&mut self, wkey: WorkerKey, ckey: ConnKey, ahead: bool) -> io::Result<()> {
        let conn = &mut self.conns[ckey];
        let w = &self.workers[wkey];
        let channel = w.channel.as_ref().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        ToWorker::Assign {
            conn_id: conn.id,
            served: conn.served,
            peer: &conn.peer,
            data: conn.pending.bytes(),
            ahead,
        }
        .encode(&mut self.msg);
        wire::send(channel.as_fd(), &self.msg, Some(conn.fd.as_fd()))?;
        // Whether the worker wrote on it is told by the scoreboard
        // (`wrote_on`); this count is only for workers too old to say, and
        // for one sent ahead errs on the side of "close" rather than "502".
        conn.state = ConnState::InWorker { worker: wkey, written_before: w.scoreboard.slot().written() };
        Ok(())
    }

    /// A message to a worker could not be sent. A worker that has exited
    /// (it retired, or died) is not misbehaving: its channel stays, so what
    /// it said before going is still read, and SIGCHLD tells the rest.
    pub(super) fn send_failed(&mut self, wkey: WorkerKey, e: &io::Error) {
        let w = &mut self.workers[wkey];
        if e.kind() == io::ErrorKind::NotConnected {
            // We closed its channel already (released, or gone).
            self.dispatcher.remove_worker(wkey);
        } else if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) {
            debug!("worker {} is gone ({e}); waiting for its exit", w.pid);
            w.channel_lost.get_or_insert_with(Instant::now);
            self.dispatcher.remove_worker(wkey);
        } else {
            // A worker has at most two messages from us in its channel (one
            // sent ahead), so a full buffer means it is broken.
            let what = format!("sending to worker {} failed: {e}", w.pid);
            self.worker_misbehaved(wkey, &what);
        }
    }

    /// Sends the connection that has waited longest to busy worker `wkey`,
    /// to serve as soon as it has finished its current one: it then finds
    /// its next connection already in its channel, instead of going to
    /// sleep and waiting for the supervisor to answer its Done. It stays
    /// ours to take back until the worker claims it on its scoreboard.
    pub(super) fn send_ahead(&mut self, wkey: WorkerKey) {
        if !self.workers.get(wkey).is_some_and(|w| self.can_take_ahead(w)) {
            return;
        }
        let Some(ckey) = self.dispatcher.take_next() else { return };
        let conn_id = self.conns[ckey].id;
        // With nothing ahead, at most one cell is taken (by the connection
        // a Done made current, until the worker claims it); but the cells
        // are shared memory, so the offer is checked all the same.
        if !self.workers[wkey].scoreboard.slot().offer_ahead(conn_id) {
            self.dispatcher.requeue_front(ckey);
            return;
        }
        match self.send_assign(wkey, ckey, true) {
            Ok(()) => {
                // The buffer stays until the worker has it for sure.
                let w = &mut self.workers[wkey];
                w.ahead = Some(ckey);
                debug!("connection {conn_id} sent ahead to busy worker {}", w.pid);
            }
            Err(e) => {
                self.workers[wkey].scoreboard.slot().revoke_ahead(conn_id);
                self.dispatcher.requeue_front(ckey);
                self.send_failed(wkey, &e);
            }
        }
    }

    /// A busy worker of the serving generation, able and free to take a
    /// connection ahead.
    pub(super) fn can_take_ahead(&self, w: &Worker) -> bool {
        w.accepts_ahead
            && w.retiring.is_none()
            && w.ahead.is_none()
            && w.skips_pending == 0
            && w.killed.is_none()
            && w.channel.is_some()
            && w.channel_lost.is_none()
            && w.generation == self.serving_generation
            && matches!(w.state, WorkerState::Busy(_))
    }

    /// A connection was queued with no worker free: sends it ahead to the
    /// busy worker whose current request started last (the one most likely
    /// to be quick; a long one may be stuck).
    pub(super) fn send_ahead_to_a_busy_worker(&mut self) {
        let best = self
            .workers
            .iter()
            .filter(|(_, w)| self.can_take_ahead(w))
            .max_by_key(|(_, w)| w.busy_since)
            .map(|(k, _)| k);
        if let Some(wkey) = best {
            self.send_ahead(wkey);
        }
    }

    /// Takes back the connection sent ahead to `wkey`, if the worker has not
    /// claimed it yet, and dispatches it again.
    pub(super) fn take_back_ahead(&mut self, wkey: WorkerKey) {
        if let Some(ckey) = self.revoke_ahead(wkey) {
            if let Some(idle) = self.dispatcher.conn_back(ckey) {
                self.hand_over(idle, ckey);
            }
        }
    }

    /// Takes back from another worker a connection sent ahead that waits
    /// behind a long request (`any`: or behind any request), for free worker
    /// `wkey`. A worker that has already claimed its connection keeps it.
    pub(super) fn take_back_waiting_ahead(&mut self, wkey: WorkerKey, any: bool) -> Option<ConnKey> {
        let now = Instant::now();
        let holder = self
            .workers
            .iter()
            .filter(|&(k, w)| k != wkey && w.ahead.is_some())
            .filter(|(_, w)| any || now.duration_since(w.busy_since) >= AHEAD_PATIENCE)
            .min_by_key(|(_, w)| w.busy_since)
            .map(|(k, _)| k)?;
        self.revoke_ahead(holder)
    }

    /// Revokes the connection sent ahead to `wkey` on its scoreboard; the
    /// connection, queued again, if that won the race with the worker.
    pub(super) fn revoke_ahead(&mut self, wkey: WorkerKey) -> Option<ConnKey> {
        let w = self.workers.get_mut(wkey)?;
        let ckey = w.ahead?;
        let conn = self.conns.get_mut(ckey)?;
        if !w.scoreboard.slot().revoke_ahead(conn.id) {
            // Claimed: the worker's Done for the connection before it is on
            // its way, and makes this one its current.
            return None;
        }
        w.ahead = None;
        w.skips_pending += 1;
        conn.state = ConnState::Queued;
        debug!("took back connection {} sent ahead to worker {}", conn.id, w.pid);
        Some(ckey)
    }
}
