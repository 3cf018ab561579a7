//! The core's invariants, written as code. The shell checks them after
//! every event in debug builds (so every integration test runs under
//! them) and the simulation after every step; a violation names what broke.

use std::collections::{HashMap, HashSet};

use super::{Activity, ConnKey, Core, Named, Peer, Place, Service, Stopping, WorkerKey};

/// Who holds a connection (how many of them is checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Queue,
    Busy(WorkerKey),
    Ahead(WorkerKey),
    Warm(WorkerKey),
}

impl<C: Peer, W: Named> Core<C, W> {
    /// Every invariant, or the first that does not hold.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_conns()?;
        self.check_idle_workers()?;
        self.check_generations()
    }

    /// Each connection is in exactly one place, and its place says which.
    fn check_conns(&self) -> Result<(), String> {
        // Who holds each connection, seen from the workers and the queue:
        // how many, and the first (no allocation per holder: this runs
        // after every event).
        let mut holders: HashMap<ConnKey, (usize, Holder)> = HashMap::new();
        let mut hold = |conn: ConnKey, by: Holder| holders.entry(conn).or_insert((0, by)).0 += 1;
        for (wkey, w) in self.workers() {
            if w.skips_pending as usize > super::AHEAD_DEPTH {
                return Err(format!("worker {wkey} owes {} Skipped", w.skips_pending));
            }
            if w.outgoing.is_some() && (w.service != Service::InService || w.activity == Activity::Starting) {
                return Err(format!("worker {wkey} is outgoing but {:?}, {:?}", w.service, w.activity));
            }
            if w.warm.len() > monodon_proto::scoreboard::WARM_CELLS || (!w.warm.is_empty() && !w.keeps_warm) {
                return Err(format!("worker {wkey} keeps {} warm (it may: {})", w.warm.len(), w.keeps_warm));
            }
            let mut cells = 0u64;
            for &ckey in &w.warm {
                hold(ckey, Holder::Warm(wkey));
                if let Some(Place::Warm { cell, .. }) = self.conn(ckey).map(|c| c.place) {
                    if cells & (1 << cell) != 0 {
                        return Err(format!("worker {wkey} keeps two connections in warm cell {cell}"));
                    }
                    cells |= 1 << cell;
                }
            }
            let Activity::Busy { conn, ahead, .. } = w.activity else { continue };
            hold(conn, Holder::Busy(wkey));
            for next in ahead.iter() {
                hold(next, Holder::Ahead(wkey));
                if next == conn {
                    return Err(format!("worker {wkey} has connection {conn} both current and ahead"));
                }
            }
            // At most `1 + ahead_depth` messages of ours in its channel: the
            // current Assign (maybe unread), those ahead, and those taken
            // back that it has not yet answered with Skipped.
            let unread = ahead.len() + w.skips_pending as usize;
            if unread > w.ahead_depth {
                return Err(format!(
                    "worker {wkey} has {} ahead and owes {} Skipped: more than its {} in its channel",
                    ahead.len(),
                    w.skips_pending,
                    w.ahead_depth
                ));
            }
        }
        for ckey in self.dispatcher.waiting() {
            hold(*ckey, Holder::Queue);
        }
        for (ckey, conn) in self.conns() {
            let held = holders.remove(&ckey);
            let expected = match conn.place {
                Place::Queued => Some(Holder::Queue),
                Place::InWorker { worker, ahead: false } => Some(Holder::Busy(worker)),
                Place::InWorker { worker, ahead: true } => Some(Holder::Ahead(worker)),
                Place::Warm { worker, .. } => Some(Holder::Warm(worker)),
                Place::Reading { .. } | Place::Lingering { .. } => None,
            };
            let as_expected = match (held, expected) {
                (None, None) => true,
                (Some((1, by)), Some(want)) => by == want,
                _ => false,
            };
            if !as_expected {
                return Err(format!("connection {ckey} ({:?}) is held by {held:?}", conn.place));
            }
        }
        if let Some((ckey, held)) = holders.into_iter().next() {
            return Err(format!("{held:?} hold connection {ckey}, which does not exist"));
        }
        Ok(())
    }

    /// Idle workers: of the serving generation, in service, reachable, each
    /// listed once; and no connection waits while one of them is free.
    fn check_idle_workers(&self) -> Result<(), String> {
        let idle = self.dispatcher.idle();
        for &wkey in idle {
            let Some(w) = self.worker(wkey) else {
                return Err(format!("idle worker {wkey} does not exist"));
            };
            let usable = w.activity == Activity::Idle && w.reachable() && w.generation == self.serving;
            if !usable {
                return Err(format!(
                    "worker {wkey} is offered as idle but is {:?} (generation {}, {:?}, channel {:?})",
                    w.activity, w.generation, w.service, w.channel
                ));
            }
            if self.dispatcher.queued() > 0 {
                return Err(format!(
                    "{} connections wait while worker {wkey} is idle",
                    self.dispatcher.queued()
                ));
            }
        }
        if idle.len() != idle.iter().collect::<HashSet<_>>().len() {
            return Err(format!("a worker is offered as idle twice: {idle:?}"));
        }
        // A worker on a connection of its own is one that accepts, known
        // from a claim that found it so; it has no connection of ours.
        for (k, w) in self.workers.iter() {
            if !matches!(w.activity, Activity::Own { .. }) {
                continue;
            }
            if !w.accepts_own {
                return Err(format!("worker w{k} is on a connection of its own but does not accept"));
            }
            if let Some((c, _)) = self
                .conns
                .iter()
                .find(|(_, c)| matches!(c.place, Place::InWorker { worker, .. } if worker.0 == k))
            {
                return Err(format!("worker w{k} is on a connection of its own and holds c{c} of ours"));
            }
        }
        Ok(())
    }

    /// Generations: a reload starts the newest one, newer than the one
    /// serving; only the serving generation (and older ones finishing)
    /// ever has a connection; nothing reloads while stopping.
    fn check_generations(&self) -> Result<(), String> {
        if let Some(r) = &self.reload {
            if r.generation <= self.serving || r.generation != self.newest {
                return Err(format!(
                    "reload to generation {} with generation {} serving, {} the newest",
                    r.generation, self.serving, self.newest
                ));
            }
            if self.stopping != Stopping::No {
                return Err(format!("reload to generation {} while stopping", r.generation));
            }
        }
        for &generation in self.templates.keys() {
            let live = generation == self.serving
                || self.reload.as_ref().is_some_and(|r| r.generation == generation);
            if !live || self.stopping == Stopping::Fast {
                return Err(format!(
                    "the template of generation {generation} is kept, which neither serves nor starts"
                ));
            }
        }
        for &generation in &self.limits_held {
            let template_ready =
                self.templates.get(&generation).is_some_and(|t| t.life == super::TemplateLife::Ready);
            if template_ready {
                return Err(format!("generation {generation} holds its limits with its template ready"));
            }
        }
        for (wkey, w) in self.workers() {
            if w.generation > self.serving && w.current().is_some() {
                return Err(format!(
                    "worker {wkey} of generation {} serves before its generation",
                    w.generation
                ));
            }
        }
        Ok(())
    }
}
