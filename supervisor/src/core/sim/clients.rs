//! Simulated clients: connecting, sending heads whole or in parts,
//! aborting, closing, and what they were answered.

use monodon_proto::scoreboard::attention;

use super::world::ProcLife;
use super::{Client, Sim, SimConn, Stopping};
use crate::core::{ConnKey, Place};

impl Sim {
    pub(super) fn new_client(&mut self) {
        if !self.chaos || self.core.stopping() != Stopping::No || self.open_clients() >= 12 {
            return self.advance();
        }
        let index = self.world.clients.len();
        // The supervisor listens only while no worker is free to accept (and
        // a free worker may win the race for a connection even so).
        let acceptor = self.random_proc(|p| {
            p.accepts
                && !p.template
                && p.alive()
                && p.life == ProcLife::Waiting
                && !p.released
                && p.inbox.is_empty()
        });
        let by_worker = match acceptor {
            Some(_) if self.core.workers_accept() => true,
            Some(p) => self.world.procs[p].attention == attention::FREE && self.rng.u8(..4) == 0,
            None if self.core.workers_accept() => return self.advance(),
            None => false,
        };
        let key = if by_worker {
            ConnKey(usize::MAX)
        } else {
            self.core.accept(SimConn { client: index, written_before: 0 }, self.world.now)
        };
        let wants = self.rng.u32(1..=8);
        let eager = self.rng.u8(..4) == 0;
        self.world.clients.push(Client {
            key,
            wants,
            sent: 0,
            answered: 0,
            partial: false,
            own_by: None,
            eager,
            closed: false,
            errors: vec![],
        });
        if let (true, Some(p)) = (by_worker, acceptor) {
            let head = self.rng.u8(..4) != 0;
            self.accept_own(p, index, head);
            return self.carry_out();
        }
        note!(self, "client {index} connects as {key} (wants {wants}, eager {eager})");
        match self.rng.u8(..3) {
            0 => self.send_request(index),
            1 => {
                self.world.clients[index].partial = true;
                self.core.head_started(key, self.world.now);
            }
            _ => {}
        }
        self.carry_out();
    }

    pub(super) fn open_clients(&self) -> usize {
        self.world.clients.iter().filter(|c| !c.closed).count()
    }

    /// The client's next head is complete.
    pub(super) fn send_request(&mut self, index: usize) {
        let c = &mut self.world.clients[index];
        c.sent += 1;
        c.partial = false;
        let (key, sent, now) = (c.key, c.sent, self.world.now);
        note!(self, "client {index} ({key}) request {sent} complete");
        self.core.head_started(key, now);
        self.core.request_ready(key, &mut self.world, now);
    }

    pub(super) fn client_step(&mut self) {
        let open: Vec<usize> = (0..self.world.clients.len())
            .filter(|&i| !self.world.clients[i].closed && self.world.clients[i].own_by.is_none())
            .collect();
        if open.is_empty() {
            return self.advance();
        }
        let index = open[self.rng.usize(..open.len())];
        let c = &self.world.clients[index];
        let Some(place) = self.core.conn(c.key).map(|c| c.place) else {
            self.world.violate(format!("client {index}'s connection is gone from the core but not closed"));
            return;
        };
        let key = c.key;
        match place {
            Place::Lingering { .. } => self.close_client(index, "closes after our FIN"),
            Place::Reading { .. } if c.in_flight() => {
                self.world.violate(format!(
                    "client {index} waits for a response its connection is not in a worker for"
                ));
            }
            Place::Reading { .. } => {
                let abort = self.chaos && self.rng.u8(..8) == 0;
                if abort && c.partial {
                    note!(self, "client {index} aborts mid-head (400, linger)");
                    self.world.clients[index].errors.push(400);
                    self.core.lingering(key, self.world.now);
                } else if abort || c.sent == c.wants {
                    self.close_client(index, "closes");
                } else if c.partial || self.rng.bool() {
                    self.send_request(index);
                } else {
                    self.world.clients[index].partial = true;
                    self.core.head_started(key, self.world.now);
                }
            }
            // Its next request goes into the socket, for the worker that keeps it.
            Place::Warm { .. } if !c.in_flight() && c.sent < c.wants => {
                let c = &mut self.world.clients[index];
                if c.partial || self.rng.bool() {
                    c.sent += 1;
                    c.partial = false;
                    note!(self, "client {index} ({key}) request {} complete, on a warm connection", c.sent);
                } else {
                    c.partial = true;
                    note!(self, "client {index} ({key}) starts a request on a warm connection");
                }
            }
            Place::Queued | Place::InWorker { .. } | Place::Warm { .. } => {}
        }
        self.carry_out();
    }

    pub(super) fn close_client(&mut self, index: usize, why: &str) {
        let key = self.world.clients[index].key;
        note!(self, "client {index} {why}");
        if self.core.remove_conn(key).is_none() {
            self.world.violate(format!("client {index}'s connection was already gone"));
        }
        self.closed(index);
    }

    /// The client's connection is closed; a request it still waited for is lost.
    pub(super) fn closed(&mut self, index: usize) {
        let c = &mut self.world.clients[index];
        c.closed = true;
        if c.in_flight() {
            let what = format!("client {index} closed with request {} unanswered", c.answered + 1);
            self.world.violate(what);
        }
    }

    pub(super) fn client_of(&self, conn: ConnKey) -> Option<usize> {
        self.core.conn(conn).map(|c| c.io.client)
    }
}
