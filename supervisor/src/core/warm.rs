//! Warm connections (`FEATURE_WARM`): a kept-alive connection that a worker
//! which accepts keeps between requests, in a cell of its scoreboard, and
//! serves itself while its attention is free, so that a keep-alive request
//! costs the supervisor nothing. The core still holds each one (the shell
//! keeps its fd, unwatched) and takes it back, by swapping the cell's id
//! for 0, whenever the worker cannot serve it soon: a request waits on it
//! while the worker is busy with something else, it has idled out, the
//! worker retires or exits, the supervisor stops.

use std::time::Instant;

use log::debug;

use super::{Action, Activity, Channel, ConnKey, Core, Named, Peer, Place, Port, Stopping, WorkerKey};
use monodon_proto::scoreboard::WARM_CELLS;

impl<C: Peer, W: Named> Core<C, W> {
    /// Warm: the worker is done with the connection it was on, after
    /// `served` requests, and keeps it in warm cell `cell`.
    pub fn worker_warm(
        &mut self,
        wkey: WorkerKey,
        conn_id: u64,
        served: u32,
        cell: u8,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) -> Result<ConnKey, super::Misbehaviour> {
        let w = self.workers.get(wkey.0).ok_or(super::Misbehaviour("no such worker"))?;
        let taken = w.warm.iter().any(|k| {
            self.conns.get(k.0).is_some_and(|c| matches!(c.place, Place::Warm { cell: n, .. } if n == cell))
        });
        if !w.keeps_warm || usize::from(cell) >= WARM_CELLS || taken {
            return Err(self.misbehaving(wkey, "Warm in a cell it may not use"));
        }
        let ckey = self.finish_current(wkey, conn_id, served, port, now)?;
        let deadline = now + self.settings.keepalive_timeout;
        self.conns[ckey.0].place = Place::Warm { worker: wkey, cell, deadline };
        self.workers[wkey.0].warm.push(ckey);
        self.act(Action::Warmed { conn: ckey });
        // A stop closes idle connections, and this one is idle until the
        // worker claims it (then its response says close, and it comes back
        // in a Cool).
        if self.stopping != Stopping::No {
            self.take_back_warm(ckey, port, now);
        }
        Ok(ckey)
    }

    /// Cool: the worker gives back a warm connection, after `served`
    /// requests, kept alive (with what it read of the next request in the
    /// shell's buffer) or to close after its last response.
    pub fn worker_cool(
        &mut self,
        wkey: WorkerKey,
        conn_id: u64,
        served: u32,
        keep: bool,
        now: Instant,
    ) -> Result<ConnKey, super::Misbehaviour> {
        let w = self.workers.get_mut(wkey.0).ok_or(super::Misbehaviour("no such worker"))?;
        let Some(at) = w.warm.iter().position(|k| self.conns.get(k.0).is_some_and(|c| c.id == conn_id))
        else {
            return Err(self.misbehaving(wkey, "Cool for a connection it does not keep"));
        };
        let ckey = w.warm.swap_remove(at);
        let conn = &mut self.conns[ckey.0];
        conn.served = served;
        conn.place = Place::Reading { deadline: now + self.settings.keepalive_timeout, partial: false };
        // A request under way is read on and served even at a stop.
        self.act(if keep {
            Action::Resume { conn: ckey }
        } else {
            Action::CloseAfterResponse { conn: ckey }
        });
        Ok(ckey)
    }

    /// Takes warm connection `ckey` back from its worker, unless the worker
    /// is serving a request on it; it is read again by the supervisor, its
    /// keep-alive timeout counted from the worker's last response on it
    /// (at a stop too: a request that has arrived on it is served).
    pub(super) fn take_back_warm(&mut self, ckey: ConnKey, port: &mut impl Port<C, W>, now: Instant) -> bool {
        let Some(conn) = self.conns.get(ckey.0) else { return false };
        let Place::Warm { worker: wkey, cell, .. } = conn.place else { return false };
        let Some(w) = self.workers.get_mut(wkey.0) else { return false };
        let idle = port.warm_idle(&w.io, cell);
        if !port.revoke_warm(&w.io, cell, conn.id) {
            return false;
        }
        w.warm.retain(|&k| k != ckey);
        debug!("took warm connection {} back from worker {}", conn.id, w.io.pid());
        self.read_again(ckey, idle, now);
        true
    }

    /// A warm connection is the supervisor's again, idle for `idle` since
    /// the worker's last response on it: read at once, even at a stop (a
    /// request may have arrived on it, to be served).
    fn read_again(&mut self, ckey: ConnKey, idle: std::time::Duration, now: Instant) {
        let remaining = self.settings.keepalive_timeout.saturating_sub(idle);
        if let Some(conn) = self.conns.get_mut(ckey.0) {
            conn.place = Place::Reading { deadline: now + remaining, partial: false };
            self.actions.push_back(Action::Resume { conn: ckey });
        }
    }

    /// Takes back every warm connection of `wkey` that it is not serving.
    pub(super) fn take_back_all_warm(&mut self, wkey: WorkerKey, port: &mut impl Port<C, W>, now: Instant) {
        let warm = self.workers.get(wkey.0).map(|w| w.warm.clone()).unwrap_or_default();
        for ckey in warm {
            self.take_back_warm(ckey, port, now);
        }
    }

    /// The tick's look at warm connections: one with a request waiting
    /// while its worker is busy with another connection (for the core, or
    /// for `OWN_NOTICE` on one of its own) goes back to be served by
    /// whoever is free; one idle past the keep-alive timeout goes back to
    /// be closed; a worker on its way out keeps none.
    pub(super) fn tend_warm(&mut self, now: Instant, port: &mut impl Port<C, W>) {
        let keepalive = self.settings.keepalive_timeout;
        let stopping = self.stopping != Stopping::No;
        let mut due = Vec::new();
        for (_, w) in self.workers.iter_mut() {
            if w.warm.is_empty() {
                continue;
            }
            let leaving =
                stopping || w.retiring().is_some() || w.channel != Channel::Open || w.killed.is_some();
            let busy = matches!(w.activity, Activity::Busy { .. })
                || port.request_age(&w.io).is_some_and(|age| age >= super::OWN_NOTICE);
            for &ckey in &w.warm {
                let Some(conn) = self.conns.get_mut(ckey.0) else { continue };
                let Place::Warm { cell, deadline, .. } = &mut conn.place else { continue };
                let stranded = busy && port.input_waiting(&conn.io);
                if leaving || stranded {
                    due.push(ckey);
                } else if *deadline <= now {
                    let idle = port.warm_idle(&w.io, *cell);
                    if idle >= keepalive {
                        due.push(ckey);
                    } else {
                        *deadline = now + (keepalive - idle);
                    }
                }
            }
        }
        for ckey in due {
            self.take_back_warm(ckey, port, now);
        }
    }

    /// At a worker's exit: the warm connection it had claimed was the one
    /// it was serving (returned, for its 502/504 or close); the others had
    /// no request of theirs read, and are the supervisor's again.
    pub(super) fn warm_at_exit(
        &mut self,
        wkey: WorkerKey,
        port: &mut impl Port<C, W>,
        now: Instant,
    ) -> Option<ConnKey> {
        let warm = std::mem::take(&mut self.workers.get_mut(wkey.0)?.warm);
        let mut current = None;
        for ckey in warm {
            let (Some(conn), Some(w)) = (self.conns.get_mut(ckey.0), self.workers.get(wkey.0)) else {
                continue;
            };
            let Place::Warm { cell, .. } = conn.place else { continue };
            if port.warm_claimed(&w.io, cell, conn.id) {
                conn.place = Place::InWorker { worker: wkey, ahead: false };
                current = Some(ckey);
                continue;
            }
            let idle = port.warm_idle(&w.io, cell);
            self.read_again(ckey, idle, now);
        }
        current
    }
}
