//! The supervisor's invariants, written as code: after every event the loop
//! handles (in debug builds, so in every integration test), each one is
//! checked, and a violation stops the supervisor with what broke, instead
//! of a connection lost or served twice somewhere later.

use std::collections::HashMap;

use super::{ConnKey, ConnState, Stopping, Supervisor, WorkerKey, WorkerState};

impl Supervisor {
    /// Panics (debug builds only) if an invariant does not hold.
    pub(super) fn debug_check_invariants(&self) {
        if cfg!(debug_assertions) {
            if let Err(broken) = self.check_invariants() {
                panic!("supervisor invariant broken: {broken}");
            }
        }
    }

    /// Every invariant, or the first that does not hold.
    pub(super) fn check_invariants(&self) -> Result<(), String> {
        // Who holds each connection, seen from the workers and the queue.
        let mut holders: HashMap<ConnKey, Vec<String>> = HashMap::new();
        for (wkey, w) in &self.workers {
            if let WorkerState::Busy(ckey) = w.state {
                holders.entry(ckey).or_default().push(format!("busy worker {wkey}"));
            }
            if let Some(ckey) = w.ahead {
                holders.entry(ckey).or_default().push(format!("sent ahead to worker {wkey}"));
                if w.state == WorkerState::Busy(ckey) {
                    return Err(format!("worker {wkey} has connection {ckey} both current and ahead"));
                }
                if !matches!(w.state, WorkerState::Busy(_)) {
                    return Err(format!("worker {wkey} has a connection ahead but serves none"));
                }
                // At most two messages of ours in its channel: the current
                // Assign (maybe unread) and this one; none while a Skipped is due.
                if w.skips_pending > 0 {
                    return Err(format!("worker {wkey} was sent ahead with a Skipped still due"));
                }
            }
        }
        for ckey in self.dispatcher.waiting() {
            holders.entry(*ckey).or_default().push("the queue".into());
        }
        // Each connection is in exactly one place, and its state says which.
        for (ckey, conn) in &self.conns {
            let held = holders.remove(&ckey).unwrap_or_default();
            let expected: usize = match conn.state {
                ConnState::Queued => {
                    if held.first().map(String::as_str) != Some("the queue") {
                        return Err(format!("queued connection {ckey} is held by {held:?}"));
                    }
                    1
                }
                ConnState::InWorker { worker, .. } => {
                    let by_it = self
                        .workers
                        .get(worker)
                        .is_some_and(|w| w.state == WorkerState::Busy(ckey) || w.ahead == Some(ckey));
                    if !by_it {
                        return Err(format!(
                            "connection {ckey} says worker {worker}, which does not hold it"
                        ));
                    }
                    1
                }
                ConnState::Reading | ConnState::Lingering => 0,
            };
            if held.len() != expected {
                return Err(format!("connection {ckey} ({:?}) is held by {held:?}", conn.state));
            }
        }
        if let Some((ckey, held)) = holders.into_iter().next() {
            return Err(format!("{held:?} hold connection {ckey}, which does not exist"));
        }
        // Idle workers: of the serving generation, in service, reachable;
        // and no connection waits while one of them is free.
        for &wkey in self.dispatcher.idle() {
            let Some(w) = self.workers.get(wkey) else {
                return Err(format!("idle worker {wkey} does not exist"));
            };
            let usable = w.state == WorkerState::Idle
                && w.retiring.is_none()
                && w.channel.is_some()
                && w.channel_lost.is_none()
                && w.generation == self.serving_generation;
            if !usable {
                return Err(format!(
                    "worker {wkey} is offered as idle but is {:?} (generation {}, retiring {:?}, channel {})",
                    w.state,
                    w.generation,
                    w.retiring,
                    w.channel.is_some()
                ));
            }
            if self.dispatcher.queued() > 0 {
                return Err(format!(
                    "{} connections wait while worker {wkey} is idle",
                    self.dispatcher.queued()
                ));
            }
        }
        let idle: Vec<WorkerKey> = self.dispatcher.idle().to_vec();
        if idle.len() != idle.iter().collect::<std::collections::HashSet<_>>().len() {
            return Err(format!("a worker is offered as idle twice: {idle:?}"));
        }
        // Generations: a reload starts a newer one than the one serving.
        if let Some(r) = &self.reload {
            if r.generation <= self.serving_generation || r.generation != self.generation {
                return Err(format!(
                    "reload to generation {} with generation {} serving, {} the newest",
                    r.generation, self.serving_generation, self.generation
                ));
            }
        }
        if self.stopping != Stopping::No && self.accepting {
            return Err("accepting while stopping".into());
        }
        Ok(())
    }
}
