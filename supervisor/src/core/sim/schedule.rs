//! What happens next: the chaos steps (time, the operator, faults), the
//! calm ones, and the phases of a schedule with their end-to-end checks.

use std::time::Duration;

use monodon_proto::scoreboard::attention;

use super::world::{Proc, ProcLife};
use super::{settings, Deploy, Sim, Stop, Stopping};
use crate::core::{Activity, Place};

impl Sim {
    pub(super) fn advance(&mut self) {
        let jump = match self.rng.u8(..50) {
            // Settling: time creeps to the next timer, so that recycling by
            // age does not keep the pool churning between two looks.
            _ if !self.chaos => Duration::from_millis(self.rng.u64(50..500)),
            0 => Duration::from_millis(self.rng.u64(5_000..15_000)),
            1..=5 => Duration::from_millis(self.rng.u64(500..3_000)),
            _ => Duration::from_millis(self.rng.u64(0..100)),
        };
        self.world.now += jump;
        let read_memory = self.rng.bool();
        self.core.tick(self.world.now, read_memory, &mut self.world);
        self.carry_out();
    }

    pub(super) fn fault(&mut self) {
        let now = self.world.now;
        match self.rng.u8(..10) {
            0 | 1 => {
                let deploy =
                    [Deploy::Good, Deploy::Good, Deploy::ExecFails, Deploy::DiesStarting, Deploy::NeverReady]
                        [self.rng.usize(..5)];
                let settings = settings(&mut self.rng);
                let workers = self.core.target_workers();
                if let Ok(generation) = self.core.begin_reload(settings, workers, now) {
                    note!(self, "HUP: generation {generation} ({deploy:?})");
                    self.deploys.insert(generation, deploy);
                }
            }
            2 => {
                let delta = if self.rng.bool() { 1 } else { -1 };
                note!(self, "scale {delta:+}");
                self.core.scale(delta, &mut self.world, now);
            }
            3 => {
                let target = self.rng.usize(1..=4);
                note!(self, "scale to {target}");
                self.core.set_target_workers(target, &mut self.world, now);
            }
            4 | 5 => {
                if let Some(p) = self.random_proc(Proc::alive) {
                    self.exit(p, "killed by SIGKILL (operator)");
                }
            }
            6 => {
                if let Some(p) = self.random_proc(|p| p.alive() && !p.stuck) {
                    self.world.procs[p].stuck = true;
                    self.world.procs[p].ignores_term = self.rng.bool();
                    note!(self, "worker {} hangs", self.world.procs[p].pid);
                }
            }
            7 => {
                if let Some(p) = self.random_proc(|p| p.alive() && !p.broken) {
                    self.world.procs[p].broken = self.rng.u8(..4) == 0;
                    self.world.procs[p].memory += 400;
                }
            }
            8 if self.accepting => {
                // --max-connections reached, or left (or a stalled backlog).
                let hold = self.rng.bool();
                note!(self, "workers may {}accept", if hold { "not " } else { "" });
                self.core.hold_accepting(hold, &mut self.world, now);
            }
            _ => self.advance(),
        }
        self.carry_out();
    }

    /// Without faults: one of the things that can happen now, or, when
    /// nothing can, time passes to the next timer.
    pub(super) fn calm_step(&mut self) {
        let procs: Vec<usize> = (0..self.world.procs.len())
            .filter(|&i| {
                let p = &self.world.procs[i];
                match p.life {
                    ProcLife::Starting => self.deploy_of(i) != Deploy::NeverReady,
                    ProcLife::Waiting => {
                        p.released
                            || (!p.template && (!p.inbox.is_empty() || !p.held.is_empty()))
                            || self.warm_input(i)
                    }
                    ProcLife::Warm { .. } => !p.stuck,
                    // A head still coming is handed over whatever the app does.
                    ProcLife::Own { partial: true, .. } => true,
                    ProcLife::Serving { .. } | ProcLife::Own { .. } => !p.stuck,
                    ProcLife::Exiting => true,
                    ProcLife::Exited => false,
                }
            })
            .collect();
        let talking = self.world.procs.iter().any(|p| !p.outbox.is_empty() && !p.released);
        // One whose connection is queued or in a worker has nothing to do
        // (it may be a worker's that holds back its Done, and has hung).
        let clients = self.world.clients.iter().any(|c| {
            !c.closed
                && !c.in_flight()
                && self.core.conn(c.key).is_some_and(|conn| match conn.place {
                    Place::Reading { .. } | Place::Lingering { .. } => true,
                    Place::Warm { .. } => c.sent < c.wants,
                    _ => false,
                })
        });
        let mut choices: Vec<u8> = Vec::new();
        if !procs.is_empty() {
            choices.push(0);
        }
        if talking {
            choices.push(1);
        }
        if !self.unreaped.is_empty() {
            choices.push(2);
        }
        if clients {
            choices.push(3);
        }
        match choices.get(self.rng.usize(..choices.len().max(1))) {
            Some(0) => {
                let p = procs[self.rng.usize(..procs.len())];
                self.step_proc(p);
            }
            Some(1) => self.deliver(),
            Some(2) => self.reap(),
            Some(3) => self.client_step(),
            _ => self.advance(),
        }
    }

    /// Everything that can still happen has happened.
    pub(super) fn quiet(&self) -> bool {
        let busy_proc = self.world.procs.iter().any(|p| {
            (p.alive()
                && (p.life != ProcLife::Waiting || !p.inbox.is_empty() || !p.held.is_empty() || p.released))
                || (!p.outbox.is_empty() && !p.released)
        });
        let busy_client = self.world.clients.iter().any(|c| !c.closed);
        !busy_proc
            && !busy_client
            && self.unreaped.is_empty()
            && self.core.reload().is_none()
            && self.core.spawn_wake().is_none()
    }

    /// No new faults; run until quiet, then the pool must have converged.
    pub(super) fn settle(&mut self) -> Result<(), String> {
        self.chaos = false;
        for p in &mut self.world.procs {
            p.broken = false;
        }
        for _ in 0..5000 {
            if self.quiet() {
                return self.converged();
            }
            self.step()?;
        }
        let procs: Vec<String> = self
            .world
            .procs
            .iter()
            .filter(|p| p.alive() || !p.outbox.is_empty())
            .map(|p| {
                format!(
                    "{}{} g{} {:?} released {}",
                    if p.template { "template " } else { "" },
                    p.pid,
                    p.generation,
                    p.life,
                    p.released
                )
            })
            .collect();
        let clients: Vec<String> = (0..self.world.clients.len())
            .filter(|&i| !self.world.clients[i].closed)
            .map(|i| {
                let c = &self.world.clients[i];
                let place = self.core.conn(c.key).map(|c| c.place);
                format!(
                    "client {i} {} sent {} answered {} own_by {:?} {place:?}",
                    c.key, c.sent, c.answered, c.own_by
                )
            })
            .collect();
        Err(format!(
            "did not settle in 5000 steps: processes {procs:?}, clients {clients:?}, reload {:?}, spawn wake {:?}, templates {:?}, unreaped {}",
            self.core.reload().map(|r| r.generation),
            self.core.spawn_wake(),
            self.core.template(self.core.serving_generation()).map(|t| t.life),
            self.unreaped.len()
        ))
    }

    pub(super) fn converged(&self) -> Result<(), String> {
        let serving = self.core.serving_generation();
        if let Some((_, w)) = self.core.workers().find(|(_, w)| w.outgoing.is_some()) {
            return Err(format!("worker {} is still outgoing ({:?})", w.io.pid, w.outgoing));
        }
        let in_service =
            self.core.workers().filter(|(_, w)| w.generation == serving && w.retiring().is_none()).count();
        if in_service != self.core.target_workers() {
            return Err(format!("{in_service} workers serve, {} wanted", self.core.target_workers()));
        }
        if let Some((_, w)) = self.core.workers().find(|(_, w)| w.generation != serving) {
            return Err(format!("worker {} of generation {} still runs", w.io.pid, w.generation));
        }
        let alive = self.world.procs.iter().filter(|p| p.alive() && !p.template).count();
        if alive != in_service {
            return Err(format!("{alive} worker processes alive, {in_service} known to serve"));
        }
        // Idle workers that accept are free to (unless held): none is left
        // waiting for a let-go that never comes.
        if !self.core.accept_held() {
            for (_, w) in self.core.workers().filter(|(_, w)| w.accepts_own && w.activity == Activity::Idle) {
                let p = &self.world.procs[w.io.proc_index];
                if p.attention != attention::FREE {
                    return Err(format!(
                        "idle worker {} is not free to accept (attention {})",
                        p.pid, p.attention
                    ));
                }
            }
        }
        // With templates: the serving generation's is up, and no other lives.
        let templates: Vec<&super::world::Proc> =
            self.world.procs.iter().filter(|p| p.alive() && p.template).collect();
        if self.core.settings().templates {
            let ready = self.core.template(serving).map(|t| t.life) == Some(crate::core::TemplateLife::Ready);
            if !ready || templates.len() != 1 || templates[0].generation != serving {
                let pids: Vec<(u32, u64)> = templates.iter().map(|p| (p.pid, p.generation)).collect();
                return Err(format!(
                    "serving generation {serving}'s template ready: {ready}; alive: {pids:?}"
                ));
            }
        } else if let Some(t) = templates.iter().find(|t| t.generation != serving) {
            return Err(format!("template {} of generation {} still runs", t.pid, t.generation));
        }
        Ok(())
    }

    pub(super) fn stop(&mut self, how: Stop) -> Result<(), String> {
        note!(self, "stop: {how:?}");
        match how {
            Stop::Graceful => self.core.stop_gracefully(self.world.now),
            Stop::Fast => self.core.stop_fast(self.world.now),
        }
        self.carry_out();
        self.check()?;
        for _ in 0..5000 {
            if self.core.finished(self.world.now) {
                self.carry_out();
                self.check()?;
                return self.check_end(how);
            }
            self.carry_out();
            self.step()?;
        }
        Err("did not stop in 5000 steps".into())
    }

    pub(super) fn check_end(&self, how: Stop) -> Result<(), String> {
        // Templates die with the supervisor (PDEATHSIG); workers must be gone.
        if let Some(p) = self.world.procs.iter().find(|p| p.alive() && !p.template) {
            return Err(format!("worker {} outlived the stop", p.pid));
        }
        let graceful = how == Stop::Graceful && self.core.stopping() != Stopping::Fast;
        if graceful {
            if let Some((i, c)) = self.world.clients.iter().enumerate().find(|(_, c)| c.in_flight()) {
                return Err(format!(
                    "client {i}: {} requests, {} answered, at a graceful stop",
                    c.sent, c.answered
                ));
            }
        }
        Ok(())
    }
}
