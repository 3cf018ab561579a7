//! The core's actions carried out in the simulated world, and the checks
//! that belong to them (a generation serves only when ready).

use super::world::ProcLife;
use super::{Action, Signal, Sim};
use crate::core::ConnKey;

impl Sim {
    pub(super) fn carry_out(&mut self) {
        while let Some(action) = self.core.next_action() {
            note!(self, "action {action:?}");
            match action {
                Action::Signal { worker, signal } => {
                    let Some(p) = self.core.worker(worker).map(|w| w.io.proc_index) else { continue };
                    let proc_ = &self.world.procs[p];
                    let dies =
                        signal == Signal::Kill || proc_.life == ProcLife::Starting || !proc_.ignores_term;
                    if proc_.alive() && dies {
                        self.exit(p, &format!("dies of {signal:?}"));
                    }
                }
                Action::CloseChannel { worker } => {
                    if let Some(p) = self.core.worker(worker).map(|w| w.io.proc_index) {
                        // As the shell does, what the worker sent is read
                        // first (a connection it handed over among it).
                        while !self.world.procs[p].outbox.is_empty() {
                            self.deliver_from(p);
                        }
                        self.world.procs[p].released = true;
                    }
                }
                Action::Resume { conn } => self.resume(conn),
                Action::CloseAfterResponse { conn } | Action::Close { conn } => {
                    if let Some(index) = self.client_of(conn) {
                        self.core.remove_conn(conn);
                        self.closed(index);
                    }
                }
                Action::HeadTimedOut { conn } => {
                    if let Some(index) = self.client_of(conn) {
                        self.world.clients[index].errors.push(408);
                        self.world.clients[index].partial = false;
                        self.core.lingering(conn, self.world.now);
                    }
                }
                Action::Claimed { .. } | Action::Warmed { .. } | Action::Notify(_) => {}
                Action::Drain => self.world.draining = true,
                Action::ReloadFinished { generation, outcome } => {
                    self.reload_finished(generation, outcome.is_ok())
                }
                Action::HoldLimits { generation, hold } => {
                    let procs = self.world.procs.iter_mut();
                    for p in procs.filter(|p| !p.template && p.generation == generation) {
                        p.limit_held = hold;
                    }
                }
                Action::ReleaseTemplate { generation } => {
                    if let Some(p) = self.templates.remove(&generation) {
                        // Its channel closes and it gets SIGTERM (one still
                        // loading is not listening).
                        self.world.procs[p].released = true;
                        self.world.procs[p].outbox.clear();
                        if self.world.procs[p].alive() {
                            self.exit(p, "dies of SIGTERM: its generation is over");
                        }
                    }
                }
            }
        }
    }

    /// Back from a worker: the next request is in the leftover (eager), or
    /// the connection waits for one.
    pub(super) fn resume(&mut self, conn: ConnKey) {
        let Some(index) = self.client_of(conn) else { return };
        let c = &self.world.clients[index];
        if c.in_flight() {
            // Handed over by a worker that accepted it, its request whole.
            let now = self.world.now;
            self.core.head_started(conn, now);
            self.core.request_ready(conn, &mut self.world, now);
        } else if c.partial && c.eager && c.sent < c.wants {
            self.send_request(index);
        } else if c.partial {
            self.core.head_started(conn, self.world.now);
        } else {
            self.core.idle(conn, self.world.now);
        }
    }

    /// A generation serves only once all its workers are ready; a failed
    /// reload leaves the one before serving.
    pub(super) fn reload_finished(&mut self, generation: u64, ok: bool) {
        let serving = self.core.serving_generation();
        if ok {
            let ready =
                self.world.procs.iter().filter(|p| p.generation == generation && p.ready_told).count();
            if serving != generation || ready < self.core.target_workers() {
                self.world.violate(format!(
                    "generation {generation} serves (serving: {serving}) with {ready} of {} workers ready",
                    self.core.target_workers()
                ));
            }
        } else if serving >= generation {
            self.world.violate(format!("failed generation {generation} serves"));
        }
    }
}
