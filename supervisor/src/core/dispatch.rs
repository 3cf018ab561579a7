//! Connections to workers: hand-over to an idle worker, sending ahead to a
//! busy one (up to two deep), and taking back what was sent ahead and not
//! yet claimed.

use std::time::Instant;

use log::{debug, error};

use super::{Action, AHEAD_PATIENCE};
use super::{
    Activity, Ahead, Channel, ConnKey, Core, Named, Peer, Place, Port, SendError, Signal, Worker, WorkerKey,
};

impl<C: Peer, W: Named> Core<C, W> {
    /// Passes a queued connection to an idle worker.
    pub(super) fn hand_over(
        &mut self,
        wkey: WorkerKey,
        ckey: ConnKey,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) {
        if !self.claim_idle(wkey, port, now) {
            // On a connection of its own: another idle worker, or the queue.
            match self.dispatcher.conn_back(ckey) {
                Some(idle) => self.hand_over(idle, ckey, port, now),
                None => self.send_ahead_to_a_busy_worker(port, now),
            }
            return;
        }
        match self.send_assign(wkey, ckey, false, port, now) {
            Ok(()) => {
                if let Some(w) = self.workers.get_mut(wkey.0) {
                    debug_assert_eq!(w.activity, Activity::Idle, "hand-over to a worker not idle");
                    w.activity = Activity::Busy { conn: ckey, since: now, ahead: Ahead::default() };
                }
            }
            Err(e) => {
                self.send_failed(wkey, e, now);
                if let Some(idle) = self.dispatcher.conn_back(ckey) {
                    self.hand_over(idle, ckey, port, now);
                }
                return;
            }
        }
        self.send_ahead(wkey, port, now);
    }

    /// Sends `ckey` to `wkey` in an Assign (or an Assign ahead); on success
    /// the connection is the worker's.
    fn send_assign(
        &mut self,
        wkey: WorkerKey,
        ckey: ConnKey,
        ahead: bool,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) -> Result<(), SendError> {
        let (Some(w), Some(conn)) = (self.workers.get(wkey.0), self.conns.get_mut(ckey.0)) else {
            return Err(SendError::Gone);
        };
        if w.channel != Channel::Open {
            return Err(SendError::Gone);
        }
        port.assign(&w.io, &mut conn.io, conn.id, conn.served, ahead)?;
        conn.place = Place::InWorker { worker: wkey, ahead };
        self.totals.handed_over += 1;
        if let Some(ready_at) = conn.ready_at.take() {
            self.queue_wait.observe(now.saturating_duration_since(ready_at));
        }
        Ok(())
    }

    /// A message to a worker could not be sent. A worker that has exited
    /// (it retired, or died) is not misbehaving: what it said before going
    /// is still read, and its exit tells the rest.
    fn send_failed(&mut self, wkey: WorkerKey, e: SendError, now: Instant) {
        self.dispatcher.remove_worker(wkey);
        let Some(w) = self.workers.get_mut(wkey.0) else { return };
        match e {
            SendError::Gone => {
                if w.channel == Channel::Open {
                    debug!("worker {} is gone; waiting for its exit", w.io.pid());
                    // Set once: a later EOF does not restart the grace period.
                    w.channel = Channel::Lost { at: now };
                }
            }
            // Only a send ahead may find the channel full (large heads
            // queued behind a slow request); an Assign to an idle worker that
            // finds it full finds a broken worker.
            SendError::Full => self.misbehaved(wkey, "sending to it failed: its channel is full"),
            SendError::Failed(why) => self.misbehaved(wkey, &format!("sending to it failed: {why}")),
        }
    }

    /// The worker broke the protocol: it is killed.
    pub fn misbehaved(&mut self, wkey: WorkerKey, what: &str) {
        self.dispatcher.remove_worker(wkey);
        let Some(w) = self.workers.get_mut(wkey.0) else { return };
        error!("worker {} broke the protocol ({what}); killing it", w.io.pid());
        if w.channel != Channel::Closed {
            self.actions.push_back(Action::CloseChannel { worker: wkey });
            w.channel = Channel::Closed;
        }
        self.actions.push_back(Action::Signal { worker: wkey, signal: Signal::Kill });
    }

    /// Sends the connections that have waited longest to busy worker
    /// `wkey` (as many as it takes ahead), to serve as soon as it has
    /// finished its current one: it then finds its next connection already
    /// in its channel, instead of going to sleep and waiting for the
    /// supervisor to answer its Done. Each stays ours to take back until
    /// the worker claims it on its scoreboard.
    pub(super) fn send_ahead(&mut self, wkey: WorkerKey, port: &mut impl Port<C, W>, now: Instant) {
        while self.send_one_ahead(wkey, port, now) {}
    }

    /// Sends one connection ahead to `wkey`; false if none was sent.
    fn send_one_ahead(&mut self, wkey: WorkerKey, port: &mut impl Port<C, W>, now: Instant) -> bool {
        if !self.workers.get(wkey.0).is_some_and(|w| self.can_take_ahead(w)) {
            return false;
        }
        let Some(ckey) = self.dispatcher.take_next() else { return false };
        let conn_id = self.conns[ckey.0].id;
        // There is a cell for each connection ahead and one for the
        // connection a Done made current until the worker claims it; but
        // the cells are shared memory, so the offer is checked all the same.
        if !port.offer_ahead(&self.workers[wkey.0].io, conn_id) {
            self.dispatcher.requeue_front(ckey);
            return false;
        }
        match self.send_assign(wkey, ckey, true, port, now) {
            Ok(()) => {
                let w = &mut self.workers[wkey.0];
                if let Activity::Busy { ahead, .. } = &mut w.activity {
                    ahead.push(ckey);
                }
                debug!("connection {conn_id} sent ahead to busy worker {}", w.io.pid());
                true
            }
            Err(e) => {
                // Not sent, so the worker cannot claim it: still ours.
                port.revoke_ahead(&self.workers[wkey.0].io, conn_id);
                self.dispatcher.requeue_front(ckey);
                // A full channel only waits for the worker to read on.
                if !matches!(e, SendError::Full) {
                    self.send_failed(wkey, e, now);
                }
                false
            }
        }
    }

    /// A busy worker of the serving generation, able and free to take a
    /// connection ahead.
    pub(super) fn can_take_ahead(&self, w: &Worker<W>) -> bool {
        w.reachable()
            && w.skips_pending == 0
            && w.killed.is_none()
            && w.generation == self.serving
            && matches!(w.activity, Activity::Busy { ahead, .. } if ahead.len() < w.ahead_depth)
    }

    /// A connection was queued with no worker free: sends it ahead to the
    /// busy worker with the fewest ahead of it, and of those the one whose
    /// current request started last (the one most likely to be quick; a
    /// long one may be stuck).
    pub(super) fn send_ahead_to_a_busy_worker(&mut self, port: &mut impl Port<C, W>, now: Instant) {
        let best = self
            .workers
            .iter()
            .filter(|(_, w)| self.can_take_ahead(w))
            .max_by_key(|(_, w)| (std::cmp::Reverse(w.ahead().len()), w.busy_since()))
            .map(|(k, _)| WorkerKey(k));
        if let Some(wkey) = best {
            self.send_one_ahead(wkey, port, now);
        }
    }

    /// Takes back every connection sent ahead to `wkey` that the worker has
    /// not claimed yet, and dispatches them again. The last sent goes back
    /// first, so that the queue's head keeps the order they were sent in.
    pub(super) fn take_back_ahead(&mut self, wkey: WorkerKey, port: &mut impl Port<C, W>, now: Instant) {
        while let Some(ckey) = self.revoke_ahead(wkey, port) {
            if let Some(idle) = self.dispatcher.conn_back(ckey) {
                self.hand_over(idle, ckey, port, now);
            }
        }
    }

    /// Takes back from another worker a connection sent ahead that waits
    /// behind a long request (`any`: or behind any request), for free worker
    /// `wkey`. A worker that has already claimed its connection keeps it.
    pub(super) fn take_back_waiting_ahead(
        &mut self,
        wkey: WorkerKey,
        any: bool,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) -> Option<ConnKey> {
        let holder = self
            .workers
            .iter()
            .filter(|&(k, w)| k != wkey.0 && !w.ahead().is_empty())
            .filter_map(|(k, w)| Some((k, w.busy_since()?)))
            .filter(|&(_, since)| any || now.duration_since(since) >= AHEAD_PATIENCE)
            .min_by_key(|&(_, since)| since)
            .map(|(k, _)| WorkerKey(k))?;
        self.revoke_ahead(holder, port)
    }

    /// Revokes the last connection sent ahead to `wkey` on its scoreboard;
    /// the connection, queued again, if that won the race with the worker.
    /// (The worker claims them in order, so if it has claimed the last one,
    /// it has claimed them all.)
    fn revoke_ahead(&mut self, wkey: WorkerKey, port: &mut impl Port<C, W>) -> Option<ConnKey> {
        let w = self.workers.get_mut(wkey.0)?;
        let ckey = w.ahead().last()?;
        let conn = self.conns.get_mut(ckey.0)?;
        if !port.revoke_ahead(&w.io, conn.id) {
            // Claimed: the worker's Done for the connections before it are
            // on their way, and make this one its current.
            return None;
        }
        if let Activity::Busy { ahead, .. } = &mut w.activity {
            ahead.pop_last();
        }
        w.skips_pending += 1;
        conn.place = Place::Queued;
        debug!("took back connection {} sent ahead to worker {}", conn.id, w.io.pid());
        Some(ckey)
    }
}
