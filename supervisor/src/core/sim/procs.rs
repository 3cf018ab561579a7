//! Simulated worker processes: started as the core orders, ready or not,
//! reading their channel (claiming what was sent ahead), serving, crashing,
//! exiting, and the shell's part: reading what they said, reaping them.

use std::collections::VecDeque;

use monodon_proto::scoreboard::attention;

use super::world::{Between, Bug, Last, Proc, ProcLife, Said, SimConn, SimWorker, WarmHeld, SIM_WARM_CELLS};
use super::{Deploy, Exit, Sim};
use crate::core::{Make, TemplateLife, WorkerKey};

impl Sim {
    pub(super) fn spawn_missing(&mut self) {
        while let Some(order) = self.core.next_spawn(self.world.now) {
            let now = self.world.now;
            let generation = order.generation;
            let deploy = self.deploys.get(&generation).copied().unwrap_or(Deploy::Good);
            match order.make {
                Make::StartTemplate => {
                    if deploy == Deploy::ExecFails {
                        note!(self, "the template of generation {generation} cannot start");
                        self.core.template_down(generation, "exec failed", now);
                    } else {
                        let p = self.new_proc(generation, WorkerKey(usize::MAX), 0);
                        self.world.procs[p].template = true;
                        self.templates.insert(generation, p);
                        note!(
                            self,
                            "template {} of generation {generation} starts ({deploy:?})",
                            self.world.procs[p].pid
                        );
                        self.core.template_started(generation);
                    }
                    continue;
                }
                Make::Fork => {
                    let template = self.templates.get(&generation).map(|&t| &self.world.procs[t]);
                    match template {
                        Some(t) if !t.ready_told => {
                            let what =
                                format!("a fork ordered from generation {generation}'s template, not ready");
                            return self.world.violate(what);
                        }
                        // Dead but not yet reaped: the fork fails, as the
                        // shell's would (no answer), and it is taken down.
                        Some(t) if !t.alive() => {
                            self.templates.remove(&generation);
                            self.core.template_down(generation, "a fork failed", now);
                            continue;
                        }
                        Some(t) if t.refuses => {
                            note!(self, "template of generation {generation} refuses to fork");
                            self.core.spawn_failed(order, "threads", now);
                            continue;
                        }
                        Some(_) => {}
                        None => {
                            return self.world.violate(format!(
                                "a fork ordered from generation {generation}, which has no template"
                            ))
                        }
                    }
                }
                Make::Exec if deploy == Deploy::ExecFails => {
                    note!(self, "spawn of generation {generation} fails");
                    self.core.spawn_failed(order, "exec failed", now);
                    continue;
                }
                Make::Exec => {}
            }
            let (pid, proc_index) = (self.world.next_pid, self.world.procs.len());
            let key = self.core.spawned(order, SimWorker { proc_index, pid }, now);
            let p = self.new_proc(generation, key, order.max_requests);
            self.world.procs[p].forked = order.make == Make::Fork;
            note!(
                self,
                "spawned worker {pid} as {key} (generation {generation}, {:?}, {deploy:?})",
                order.make
            );
        }
        self.carry_out();
    }

    fn new_proc(&mut self, generation: u64, key: WorkerKey, max_requests: u64) -> usize {
        let pid = self.world.next_pid;
        self.world.next_pid += 1;
        self.world.procs.push(Proc {
            pid,
            key,
            generation,
            life: ProcLife::Starting,
            inbox: VecDeque::new(),
            outbox: VecDeque::new(),
            held: Vec::new(),
            cells: [0; 3],
            ahead_depth: self.ahead_depth,
            // Some channels have room for two messages only, so that a
            // third sent ahead finds them full.
            small_channel: self.rng.bool(),
            served: 0,
            max_requests,
            limit_held: false,
            last_request: false,
            retired: false,
            released: false,
            eof_told: false,
            stuck: false,
            ignores_term: false,
            broken: false,
            memory: 100,
            written: 0,
            conn_id: 0,
            conn_written_base: 0,
            last: None,
            ready_told: false,
            template: false,
            forked: false,
            refuses: false,
            accepts: self.accepting,
            attention: attention::HELD,
            keeps_warm: self.accepting && self.warm,
            warm: [None; SIM_WARM_CELLS],
            warm_cells: [0; SIM_WARM_CELLS],
            warm_done: [self.world.now; SIM_WARM_CELLS],
            between: None,
        });
        self.world.procs.len() - 1
    }

    /// A generation's deploy, as a process of it meets it: a forked worker
    /// runs what its template loaded.
    pub(super) fn deploy_of(&self, p: usize) -> Deploy {
        let proc_ = &self.world.procs[p];
        if proc_.forked {
            return Deploy::Good;
        }
        self.deploys.get(&proc_.generation).copied().unwrap_or(Deploy::Good)
    }

    pub(super) fn random_proc(&mut self, pred: impl Fn(&Proc) -> bool) -> Option<usize> {
        let some: Vec<usize> = (0..self.world.procs.len()).filter(|&i| pred(&self.world.procs[i])).collect();
        (!some.is_empty()).then(|| some[self.rng.usize(..some.len())])
    }

    pub(super) fn say(&mut self, p: usize, said: Said) {
        self.send_held(p);
        let proc_ = &mut self.world.procs[p];
        // Sent after the supervisor closed its end: lost (EPIPE).
        if !proc_.released {
            proc_.outbox.push_back(said);
        } else if let Said::Adopt { client, .. } = said {
            // Nobody to hand it to: the worker closes it.
            self.world.clients[client].own_by = None;
            note!(self, "worker {} closes client {client}'s connection: released", proc_.pid);
            self.closed(client);
        }
    }

    pub(super) fn proc_step(&mut self) {
        let Some(p) = self.random_proc(Proc::alive) else { return self.advance() };
        self.step_proc(p);
    }

    /// One step of process `p`'s life.
    pub(super) fn step_proc(&mut self, p: usize) {
        let deploy = self.deploy_of(p);
        let template = self.world.procs[p].template;
        match self.world.procs[p].life {
            ProcLife::Starting => match deploy {
                Deploy::DiesStarting => self.exit(p, "died starting"),
                Deploy::NeverReady => {}
                Deploy::Good | Deploy::ExecFails => {
                    self.world.procs[p].life = ProcLife::Waiting;
                    self.say(p, if template { Said::TemplateReady } else { Said::Ready });
                }
            },
            // A template waits for forks; it exits once let go.
            ProcLife::Waiting if template => {
                if self.world.procs[p].released {
                    self.exit(p, "exits: its generation is over");
                }
            }
            ProcLife::Waiting => match self.warm_with_input(p) {
                Some(cell) if self.rng.bool() => self.begin_warm(p, cell),
                _ => self.take_assign(p),
            },
            ProcLife::Serving { .. } => self.serve(p),
            ProcLife::Warm { .. } => self.serve_warm(p),
            ProcLife::Own { .. } => self.serve_own(p),
            ProcLife::Exiting => {
                self.world.procs[p].retired = true;
                self.exit(p, "exits after its last request");
            }
            ProcLife::Exited => {}
        }
    }

    /// The Dones a worker held back go out (in order).
    fn send_held(&mut self, p: usize) {
        let proc_ = &mut self.world.procs[p];
        let held = std::mem::take(&mut proc_.held);
        if !proc_.released {
            proc_.outbox.extend(held);
        }
    }

    /// The worker reads its channel: an Assign (claimed if sent ahead), or EOF.
    /// With nothing sent ahead it is about to wait: its held Dones go first.
    pub(super) fn take_assign(&mut self, p: usize) {
        if self.world.procs[p].cells.iter().all(|&c| c == 0) {
            self.send_held(p);
        }
        let now = self.world.now;
        let proc_ = &mut self.world.procs[p];
        let Some(a) = proc_.inbox.pop_front() else {
            if proc_.released {
                self.exit(p, "exits on EOF");
            }
            return;
        };
        if a.ahead {
            let claimed = match proc_.cells.iter_mut().find(|c| **c == a.id) {
                Some(cell) => {
                    *cell = 0;
                    true
                }
                None => false,
            };
            if !claimed {
                let pid = proc_.pid;
                note!(self, "worker {pid} skips connection {} (taken back)", a.id);
                if self.world.procs[p].released {
                    return self.exit(p, "exits: released while skipping");
                }
                return self.say(p, Said::Skipped);
            }
        }
        let pid = proc_.pid;
        if let Some(other) = self.world.serving.insert(a.id, pid) {
            self.world.violate(format!("connection {} served by workers {other} and {pid} at once", a.id));
        }
        let proc_ = &mut self.world.procs[p];
        proc_.last = Some(Last { id: a.id, finished: false });
        proc_.conn_written_base = proc_.written;
        proc_.conn_id = a.id;
        proc_.life = ProcLife::Serving { conn: a.conn, id: a.id, served: a.served, started: now };
        let last_request =
            proc_.max_requests > 0 && proc_.served + 1 >= proc_.max_requests && !proc_.limit_held;
        proc_.last_request = last_request;
        note!(
            self,
            "worker {pid} begins connection {} {} ({}ahead)",
            a.id,
            a.conn,
            if a.ahead { "" } else { "not " }
        );
        if last_request {
            let generation = self.world.procs[p].generation;
            let degraded = generation == self.core.serving_generation()
                && self
                    .core
                    .template(generation)
                    .is_some_and(|t| matches!(t.life, TemplateLife::Down { .. }));
            if degraded {
                self.world.violate(format!(
                    "worker {pid} retires at its limit while its generation cannot replace it"
                ));
            }
            self.say(p, Said::Retiring);
        }
    }

    /// The worker on its request: finishes it, or crashes, or hangs.
    /// Finished plain, it may serve requests waiting on its warm
    /// connections before it reports it.
    pub(super) fn serve(&mut self, p: usize) {
        let ProcLife::Serving { conn, id, served, .. } = self.world.procs[p].life else { return };
        if self.world.procs[p].stuck {
            return;
        }
        if self.crashed(p) {
            return;
        }
        let Some((client, keep, eager)) = self.respond(p, conn, id) else { return };
        let (pid, last_request) = (self.world.procs[p].pid, self.world.procs[p].last_request);
        note!(self, "worker {pid} done with connection {id} {conn} of client {client} (keep {keep})");
        let began = (self.world.procs[p].conn_id, self.world.procs[p].conn_written_base);
        let finished = Between { conn, id, served: served + 1, client, began };
        if keep && !eager && !last_request && !self.world.draining {
            self.world.procs[p].between = Some(finished);
            return self.next_between(p);
        }
        self.release_ready_warm(p);
        self.report(p, finished, keep, eager);
    }

    /// Between one of the supervisor's connections and its report: the
    /// worker serves another request waiting on a warm connection, or gives
    /// the ones still waiting back and reports.
    fn next_between(&mut self, p: usize) {
        if let Some(finished) = self.world.procs[p].between {
            self.resume_between(p, finished);
        }
        let cells = self.cells_with_input(p);
        if !cells.is_empty() && self.rng.u8(..4) != 0 {
            let cell = cells[self.rng.usize(..cells.len())];
            self.send_held(p);
            return self.begin_warm(p, cell);
        }
        self.release_ready_warm(p);
        if let Some(finished) = self.world.procs[p].between.take() {
            self.report(p, finished, true, false);
        }
    }

    /// After a warm request served in between, the scoreboard names the
    /// connection to report again, its response all out.
    fn resume_between(&mut self, p: usize, finished: Between) {
        let proc_ = &mut self.world.procs[p];
        (proc_.conn_id, proc_.conn_written_base) = finished.began;
        proc_.last = Some(Last { id: finished.id, finished: true });
    }

    /// The worker reports one of the supervisor's connections it has
    /// finished: kept warm if a cell is free, or a Done (held back while
    /// busy with more).
    fn report(&mut self, p: usize, finished: Between, keep: bool, eager: bool) {
        let Between { conn, id, served, client, .. } = finished;
        let proc_ = &mut self.world.procs[p];
        let (pid, last_request) = (proc_.pid, proc_.last_request);
        let done = Said::Done { id, served, keep };
        let busy = proc_.cells.iter().any(|&c| c != 0);
        // Kept alive with nothing left over: kept warm if a cell is free.
        let free_cell = (0..SIM_WARM_CELLS).find(|&c| proc_.warm[c].is_none() && proc_.warm_cells[c] == 0);
        let plain = keep && !eager && !last_request;
        if let Some(cell) = free_cell.filter(|_| plain && proc_.keeps_warm) {
            proc_.warm_cells[cell] = id;
            proc_.warm_done[cell] = self.world.now;
            proc_.warm[cell] = Some(WarmHeld { conn, id, served });
            note!(self, "worker {pid} keeps connection {id} warm in cell {cell}");
            self.say(p, Said::Warm { id, served, cell: cell as u8 });
        } else if plain && busy && proc_.held.len() < monodon_proto::wire::Dones::MAX {
            note!(self, "worker {pid} holds back its Done for connection {id}");
            self.world.procs[p].held.push(done);
        } else {
            self.say(p, done);
        }
        if keep && eager {
            // Its next request came with this one (it is in the leftover).
            self.world.clients[client].partial = true;
        }
        if last_request {
            self.world.procs[p].life = ProcLife::Exiting;
        }
    }

    /// A warm cell of a worker free to serve it whose client has sent
    /// something (the worker's epoll would say so).
    fn warm_with_input(&mut self, p: usize) -> Option<usize> {
        let cells = self.warm_cells_with_input(p);
        (!cells.is_empty()).then(|| cells[self.rng.usize(..cells.len())])
    }

    /// After one of the supervisor's connections: warm ones with input go
    /// back unread (the cell swapped to 0 unless the supervisor did first).
    fn release_ready_warm(&mut self, p: usize) {
        for cell in 0..SIM_WARM_CELLS {
            let Some(held) = self.world.procs[p].warm[cell] else { continue };
            let input = self.client_of(held.conn).is_some_and(|i| {
                let c = &self.world.clients[i];
                c.in_flight() || c.partial
            });
            if !input || self.rng.u8(..4) == 0 {
                continue;
            }
            let proc_ = &mut self.world.procs[p];
            proc_.warm[cell] = None;
            if proc_.warm_cells[cell] == held.id {
                proc_.warm_cells[cell] = 0;
                note!(self, "worker {} gives warm connection {} back unread", proc_.pid, held.id);
                self.say(p, Said::Cool { id: held.id, served: held.served, keep: true });
            }
        }
    }

    /// Whether worker `p` has a warm connection to serve now.
    pub(super) fn warm_input(&self, p: usize) -> bool {
        !self.warm_cells_with_input(p).is_empty()
    }

    fn warm_cells_with_input(&self, p: usize) -> Vec<usize> {
        let proc_ = &self.world.procs[p];
        let free = proc_.attention == attention::FREE && proc_.inbox.is_empty();
        if !free {
            return Vec::new();
        }
        self.cells_with_input(p)
    }

    /// The warm cells whose clients have sent something.
    fn cells_with_input(&self, p: usize) -> Vec<usize> {
        let proc_ = &self.world.procs[p];
        if !proc_.keeps_warm || proc_.template || proc_.released {
            return Vec::new();
        }
        (0..SIM_WARM_CELLS)
            .filter(|&c| {
                proc_.warm[c].is_some_and(|h| {
                    let client = self.core.conn(h.conn).map(|c| c.io.client);
                    client.is_some_and(|i| self.world.clients[i].in_flight() || self.world.clients[i].partial)
                })
            })
            .collect()
    }

    /// The worker takes its attention and claims warm cell `cell`: it
    /// serves the request there, or hands a head still coming back (Cool);
    /// one the supervisor took back it lets go of.
    fn begin_warm(&mut self, p: usize, cell: usize) {
        let now = self.world.now;
        let proc_ = &mut self.world.procs[p];
        let Some(held) = proc_.warm[cell] else { return };
        let pid = proc_.pid;
        // Between two of the supervisor's connections its attention stays
        // the supervisor's.
        if proc_.between.is_none() {
            proc_.attention = attention::OWN;
        }
        if proc_.warm_cells[cell] != held.id {
            note!(self, "worker {pid} finds warm connection {} taken back", held.id);
            self.world.procs[p].warm[cell] = None;
            return self.end_turn(p);
        }
        proc_.warm_cells[cell] = held.id | monodon_proto::scoreboard::WARM_CLAIMED;
        let Some(client) = self.client_of(held.conn) else {
            return self.world.violate(format!("worker {pid} keeps connection {} warm, closed", held.id));
        };
        if !self.world.clients[client].in_flight() {
            note!(self, "worker {pid} hands warm connection {} back: its head is still coming", held.id);
            let proc_ = &mut self.world.procs[p];
            proc_.warm_cells[cell] = 0;
            proc_.warm[cell] = None;
            self.say(p, Said::Cool { id: held.id, served: held.served, keep: true });
            return self.end_turn(p);
        }
        if let Some(other) = self.world.serving.insert(held.id, pid) {
            self.world.violate(format!("connection {} served by workers {other} and {pid} at once", held.id));
        }
        let proc_ = &mut self.world.procs[p];
        proc_.warm[cell] = None;
        proc_.conn_written_base = proc_.written;
        proc_.conn_id = held.id;
        proc_.last = Some(Last { id: held.id, finished: false });
        proc_.life = ProcLife::Warm { cell, conn: held.conn, id: held.id, served: held.served, started: now };
        let last = proc_.max_requests > 0 && proc_.served + 1 >= proc_.max_requests && !proc_.limit_held;
        proc_.last_request = last;
        note!(self, "worker {pid} serves warm connection {} itself", held.id);
        if last {
            self.say(p, Said::Retiring);
        }
    }

    /// The worker on a warm connection's request: finishes it (or crashes,
    /// or hangs), then keeps it warm, or gives it back (Cool) when it
    /// closes or its next request came with this one.
    fn serve_warm(&mut self, p: usize) {
        let ProcLife::Warm { cell, conn, id, served, .. } = self.world.procs[p].life else { return };
        if self.world.procs[p].stuck || self.crashed(p) {
            return;
        }
        let Some((client, keep, eager)) = self.respond(p, conn, id) else { return };
        let (pid, last_request) = (self.world.procs[p].pid, self.world.procs[p].last_request);
        note!(self, "worker {pid} done with warm connection {id} of client {client} (keep {keep})");
        let proc_ = &mut self.world.procs[p];
        if keep && !eager {
            proc_.warm_cells[cell] = id;
            proc_.warm_done[cell] = self.world.now;
            proc_.warm[cell] = Some(WarmHeld { conn, id, served: served + 1 });
        } else {
            proc_.warm_cells[cell] = 0;
            self.say(p, Said::Cool { id, served: served + 1, keep });
            let c = &mut self.world.clients[client];
            if keep {
                c.partial = true;
            } else {
                // Its response said the connection closes: it sends no more.
                c.wants = c.sent;
            }
        }
        if last_request {
            // Its attention stays its own (or the supervisor's) until it has
            // exited; one of the supervisor's finished before is reported.
            if let Some(finished) = self.world.procs[p].between.take() {
                self.resume_between(p, finished);
                self.release_ready_warm(p);
                self.report(p, finished, true, false);
            }
            self.world.procs[p].life = ProcLife::Exiting;
            return;
        }
        self.end_turn(p);
    }

    /// Done with a warm connection's turn: on to the next between two of
    /// the supervisor's connections, or its attention let go.
    fn end_turn(&mut self, p: usize) {
        if self.world.procs[p].between.is_some() {
            self.next_between(p);
        } else {
            self.end_own(p);
        }
    }

    /// Done with a connection of its own: its attention is free again, or
    /// the supervisor's if it asked (Free).
    fn end_own(&mut self, p: usize) {
        let proc_ = &mut self.world.procs[p];
        let watched = proc_.attention == attention::WATCHED;
        proc_.attention = if watched { attention::HELD } else { attention::FREE };
        if watched {
            self.say(p, Said::Free);
        }
    }

    /// Worker `p`'s whole response to the request on connection `conn`
    /// (`id`): the client, whether it stays open, whether the client's next
    /// request came with this one. The worker waits for more after it.
    fn respond(&mut self, p: usize, conn: crate::core::ConnKey, id: u64) -> Option<(usize, bool, bool)> {
        let Some(client) = self.client_of(conn) else {
            self.world.violate(format!("worker serves connection {id}, which the core has closed"));
            return None;
        };
        let c = &mut self.world.clients[client];
        c.answered += 1;
        let (sent, answered, wants_more, eager) = (c.sent, c.answered, c.sent < c.wants, c.eager);
        if answered > sent {
            self.world.violate(format!("client {client} got response {answered} for {sent} requests"));
        }
        self.world.serving.remove(&id);
        let draining = self.world.draining;
        let proc_ = &mut self.world.procs[p];
        proc_.served += 1;
        proc_.memory += 30;
        proc_.written += 10;
        proc_.last = Some(Last { id, finished: true });
        proc_.life = ProcLife::Waiting;
        let keep = wants_more && !draining && !proc_.last_request;
        Some((client, keep, eager))
    }

    /// A worker that accepts takes a new client itself (`head`: its whole
    /// request came with it), or, the supervisor having its attention,
    /// hands it over at once.
    pub(super) fn accept_own(&mut self, p: usize, client: usize, head: bool) {
        let now = self.world.now;
        let proc_ = &mut self.world.procs[p];
        if proc_.attention != attention::FREE {
            note!(self, "worker {} accepts client {client} for the supervisor", proc_.pid);
            self.world.clients[client].own_by = Some(p);
            self.world.clients[client].partial = !head;
            if head {
                self.world.clients[client].sent = 1;
            }
            return self.say(p, Said::Adopt { client, id: 0, served: 0, keep: true });
        }
        proc_.attention = attention::OWN;
        self.world.next_own_id += 1;
        let id = (1 << 63) | self.world.next_own_id;
        proc_.conn_written_base = proc_.written;
        proc_.conn_id = id;
        proc_.last = Some(Last { id, finished: false });
        let deposited = proc_.written;
        proc_.life = ProcLife::Own { client, id, started: now, partial: !head, deposited };
        let pid = proc_.pid;
        let c = &mut self.world.clients[client];
        c.own_by = Some(p);
        c.partial = !head;
        if head {
            c.sent = 1;
            if let Some(other) = self.world.serving.insert(id, pid) {
                self.world.violate(format!("connection {id} served by workers {other} and {pid} at once"));
            }
            let proc_ = &mut self.world.procs[p];
            let last = proc_.max_requests > 0 && proc_.served + 1 >= proc_.max_requests && !proc_.limit_held;
            proc_.last_request = last;
            if last {
                self.say(p, Said::Retiring);
            }
        }
        note!(self, "worker {pid} accepts client {client} itself as connection {id} (head complete: {head})");
    }

    /// The worker on a connection of its own: hands over a partial head,
    /// or serves the request (or crashes, or hangs), then hands it over if
    /// it is kept alive; then its attention is free again, or the
    /// supervisor's if it asked (Free).
    fn serve_own(&mut self, p: usize) {
        let ProcLife::Own { client, id, partial, .. } = self.world.procs[p].life else { return };
        if !self.world.procs[p].inbox.is_empty() {
            let pid = self.world.procs[p].pid;
            return self.world.violate(format!("an Assign for worker {pid}, on a connection of its own"));
        }
        if partial {
            self.say(p, Said::Adopt { client, id, served: 0, keep: true });
        } else {
            if self.world.procs[p].stuck {
                return;
            }
            if self.crashed(p) {
                return;
            }
            let c = &mut self.world.clients[client];
            c.answered += 1;
            let wants_more = c.sent < c.wants;
            self.world.serving.remove(&id);
            let draining = self.world.draining;
            let proc_ = &mut self.world.procs[p];
            proc_.served += 1;
            proc_.written += 10;
            proc_.last = Some(Last { id, finished: true });
            let keep = wants_more && !draining && !proc_.last_request;
            note!(self, "worker {} done with client {client} itself (keep {keep})", proc_.pid);
            if keep {
                self.say(p, Said::Adopt { client, id, served: 1, keep: true });
            } else {
                self.world.clients[client].own_by = None;
                self.closed(client);
            }
        }
        let proc_ = &mut self.world.procs[p];
        if proc_.last_request {
            // Its attention stays its own until it has exited.
            if self.world.bug == Bug::EarlyRelease {
                proc_.attention = attention::FREE;
            }
            proc_.life = ProcLife::Exiting;
            return;
        }
        proc_.life = ProcLife::Waiting;
        let watched = proc_.attention == attention::WATCHED;
        proc_.attention = if watched { attention::HELD } else { attention::FREE };
        if watched {
            self.say(p, Said::Free);
        }
    }

    /// In chaos, now and then the worker crashes on its request, before or
    /// after writing part of its response.
    fn crashed(&mut self, p: usize) -> bool {
        // More often on a warm connection served between two of the
        // supervisor's: a narrow window, where what the core deduces at the
        // exit is most intricate.
        let odds = if self.world.procs[p].between.is_some() { 5 } else { 20 };
        if !self.chaos || self.rng.u8(..odds) != 0 {
            return false;
        }
        let wrote = self.rng.bool();
        if wrote {
            self.world.procs[p].written += 1;
        }
        self.exit(p, if wrote { "crashes mid-response" } else { "crashes before responding" });
        true
    }

    pub(super) fn exit(&mut self, p: usize, how: &str) {
        let proc_ = &mut self.world.procs[p];
        if let ProcLife::Serving { id, .. } | ProcLife::Own { id, .. } | ProcLife::Warm { id, .. } =
            proc_.life
        {
            self.world.serving.remove(&id);
        }
        // What it kept warm dies with it; the supervisor has its own copies.
        proc_.warm = [None; SIM_WARM_CELLS];
        proc_.between = None;
        // What was in its vault stays there for the supervisor. (A head
        // still coming was never put there: that connection is lost with
        // the worker, its request never complete.)
        match proc_.life {
            ProcLife::Own { client, id, deposited, partial: false, .. } => {
                self.vaults.insert(p, (client, id, deposited));
            }
            ProcLife::Own { client, partial: true, .. } => {
                self.world.clients[client].own_by = None;
                self.closed(client);
            }
            _ => {}
        }
        let proc_ = &mut self.world.procs[p];
        proc_.life = ProcLife::Exited;
        proc_.inbox.clear();
        let pid = proc_.pid;
        self.unreaped.push(p);
        note!(self, "worker {pid} {how}");
    }

    /// The shell reads one message from a worker's channel.
    pub(super) fn deliver(&mut self) {
        let Some(p) = self.random_proc(|p| !p.outbox.is_empty() && !p.released) else {
            return self.advance();
        };
        self.deliver_from(p);
        self.carry_out();
    }

    pub(super) fn deliver_from(&mut self, p: usize) {
        let Some(said) = self.world.procs[p].outbox.pop_front() else { return };
        let (key, pid) = (self.world.procs[p].key, self.world.procs[p].pid);
        let now = self.world.now;
        note!(self, "worker {pid} says {said:?}");
        let outcome = match said {
            Said::TemplateReady => {
                self.world.procs[p].ready_told = true;
                self.core.template_ready(self.world.procs[p].generation);
                Ok(())
            }
            Said::Ready => {
                self.world.procs[p].ready_told = true;
                let accepts = self.world.procs[p].accepts;
                let depth = self.world.procs[p].ahead_depth;
                let warm = self.world.procs[p].keeps_warm;
                self.core.worker_ready(key, depth, accepts, warm, &mut self.world, now)
            }
            Said::Free => self.core.worker_free(key, &mut self.world, now),
            Said::Adopt { client, served, keep, .. } => {
                let conn = SimConn { client, written_before: 0 };
                let ckey = self.core.adopt(conn, served, keep, now);
                let c = &mut self.world.clients[client];
                c.key = ckey;
                c.own_by = None;
                Ok(())
            }
            Said::Retiring => {
                self.core.worker_retiring(key, &mut self.world, now);
                Ok(())
            }
            Said::Skipped => self.core.worker_skipped(key),
            Said::Done { id, served, keep } => {
                self.core.worker_done(key, id, served, keep, &mut self.world, now).map(|_| ())
            }
            Said::Warm { id, served, cell } => {
                self.core.worker_warm(key, id, served, cell, &mut self.world, now).map(|_| ())
            }
            Said::Cool { id, served, keep } => self.core.worker_cool(key, id, served, keep, now).map(|_| ()),
        };
        if let Err(m) = outcome {
            self.world.violate(format!("the core found worker {pid}'s {said:?} misbehaving: {}", m.0));
        }
    }

    /// SIGCHLD: what the worker said is read first, then its exit handled.
    pub(super) fn reap(&mut self) {
        if self.unreaped.is_empty() {
            return self.advance();
        }
        let p = self.unreaped.swap_remove(self.rng.usize(..self.unreaped.len()));
        while !self.world.procs[p].released && !self.world.procs[p].outbox.is_empty() {
            self.deliver_from(p);
        }
        let (key, pid) = (self.world.procs[p].key, self.world.procs[p].pid);
        if self.world.procs[p].template {
            let generation = self.world.procs[p].generation;
            note!(self, "template {pid} reaped");
            if self.templates.get(&generation) == Some(&p) {
                self.templates.remove(&generation);
                self.core.template_down(generation, "it exited", self.world.now);
            }
            return self.carry_out();
        }
        note!(self, "worker {pid} reaped");
        let now = self.world.now;
        if let Some((client, id, deposited)) = self.vaults.remove(&p) {
            let conn = SimConn { client, written_before: deposited };
            match self.core.vaulted(key, conn, id, now) {
                Some(ckey) => {
                    let c = &mut self.world.clients[client];
                    c.key = ckey;
                    c.own_by = None;
                    note!(self, "its vault holds client {client}'s connection {id}, now {ckey}");
                }
                None => return self.world.violate(format!("the core refused worker {pid}'s vault")),
            }
        }
        let Some(exit) = self.core.worker_exited(key, "exited", &mut self.world, now) else {
            return self.world.violate(format!("the core did not know worker {pid}"));
        };
        self.on_exit(p, exit);
        self.carry_out();
    }

    pub(super) fn on_exit(&mut self, p: usize, exit: Exit<SimWorker>) {
        let Some((conn, answer)) = exit.conn else { return };
        if self.world.procs[p].retired {
            // It said Retiring before its last request: nothing more was
            // to reach it, and a client must not pay for its planned exit.
            let pid = self.world.procs[p].pid;
            self.world
                .violate(format!("worker {pid} retired with connection {conn} handed to it ({answer:?})"));
        }
        let Some(client) = self.client_of(conn) else {
            return self
                .world
                .violate(format!("the exit of worker {} names a closed connection", exit.io.pid));
        };
        let finished = self.world.procs[p].last.is_some_and(|l| l.finished);
        let c = &mut self.world.clients[client];
        match answer {
            Some(status) => {
                c.errors.push(status);
                c.answered += 1;
            }
            // A close mid-response is its answer; a full one was counted.
            None if !finished => c.answered += 1,
            None => {}
        };
        let (sent, answered) = (c.sent, c.answered);
        if answered > sent {
            self.world.violate(format!("client {client} answered {answered} times for {sent} requests"));
        }
    }

    /// The worker's end of the channel closed (it exited): EOF.
    pub(super) fn eof(&mut self) {
        let Some(p) = self.random_proc(|p| !p.alive() && p.outbox.is_empty() && !p.released && !p.eof_told)
        else {
            return self.advance();
        };
        if !self.unreaped.contains(&p) {
            return;
        }
        self.world.procs[p].eof_told = true;
        self.core.channel_closed(self.world.procs[p].key, self.world.now);
    }
}
