//! Client connections: where each one is (being read, queued, in a worker,
//! lingering) and when its time there is up.

use std::time::Instant;

use log::debug;

use super::{ConnKey, Core, Named, Peer, Port, Stopping};

/// Where a connection is. Exactly one of these, and the queue and the
/// workers agree (`invariants`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The supervisor reads until a head is complete, or the connection is
    /// idle; `partial`: part of a request is here. Closed (or answered 408,
    /// if partial) at `deadline`.
    Reading { deadline: Instant, partial: bool },
    /// Has a complete request, waits for a worker.
    Queued,
    /// A worker serves it, or will: `ahead`, sent to it while it was busy
    /// with another, until it claims it or the core takes it back.
    InWorker { worker: super::WorkerKey, ahead: bool },
    /// Our last response is out; its input is drained until EOF or `deadline`.
    Lingering { deadline: Instant },
    /// Kept by `worker` between requests in its warm cell `cell`
    /// (`FEATURE_WARM`): the worker serves its next requests itself. Its
    /// keep-alive timeout is looked at again at `deadline`.
    Warm { worker: super::WorkerKey, cell: u8, deadline: Instant },
}

/// A client connection.
pub struct Conn<C> {
    /// The shell's part: the fd, the bytes read, the peer.
    pub io: C,
    /// Unique for the supervisor's life (the scoreboard's claim names it).
    pub id: u64,
    /// Requests served on it.
    pub served: u32,
    pub place: Place,
    /// When its current request was complete, until it is handed over (the
    /// queue wait's start).
    pub ready_at: Option<Instant>,
}

impl<C> Conn<C> {
    /// Between requests of a keep-alive connection, with nothing pending.
    pub fn is_idle(&self) -> bool {
        matches!(self.place, Place::Reading { partial: false, .. }) && self.served > 0
    }
}

impl<C: Peer, W: Named> Core<C, W> {
    /// A new connection: read until its head is complete, for up to the
    /// head timeout.
    pub fn accept(&mut self, io: C, now: Instant) -> ConnKey {
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        self.totals.accepted += 1;
        let deadline = now + self.settings.head_timeout;
        ConnKey(self.conns.insert(Conn {
            io,
            id,
            served: 0,
            place: Place::Reading { deadline, partial: false },
            ready_at: None,
        }))
    }

    /// A connection a worker accepted itself is handed to us (Adopt), after
    /// `served` requests: read on (the shell has put what the worker read
    /// in its buffer), or, `keep` false, close it after its last response.
    pub fn adopt(&mut self, io: C, served: u32, keep: bool, now: Instant) -> ConnKey {
        let key = self.accept(io, now);
        // Counted by the worker that accepted it.
        self.totals.accepted -= 1;
        let conn = &mut self.conns[key.0];
        conn.served = served;
        if served > 0 {
            conn.place = Place::Reading { deadline: now + self.settings.keepalive_timeout, partial: false };
        }
        // A new one is read whatever happens (a stop serves what has
        // arrived); one kept alive after a response closes at a stop, as
        // after a Done.
        let resume = keep && (served == 0 || self.stopping == Stopping::No);
        self.act(if resume {
            super::Action::Resume { conn: key }
        } else {
            super::Action::CloseAfterResponse { conn: key }
        });
        key
    }

    /// Part of a request has arrived on an empty connection: the head timeout runs.
    pub fn head_started(&mut self, key: ConnKey, now: Instant) {
        let head_timeout = self.settings.head_timeout;
        if let Some(c) = self.conns.get_mut(key.0) {
            if let Place::Reading { .. } = c.place {
                c.place = Place::Reading { deadline: now + head_timeout, partial: true };
            }
        }
    }

    /// Nothing pending between requests: the keep-alive timeout runs (at
    /// a stop, one back from a worker that kept it warm closes now).
    pub fn idle(&mut self, key: ConnKey, now: Instant) {
        let keepalive = self.settings.keepalive_timeout;
        if let Some(c) = self.conns.get_mut(key.0) {
            if let Place::Reading { .. } = c.place {
                c.place = Place::Reading { deadline: now + keepalive, partial: false };
                if self.stopping != Stopping::No && c.served > 0 {
                    self.act(super::Action::Close { conn: key });
                }
            }
        }
    }

    /// A connection being read has a complete request: it goes to an idle
    /// worker, or waits (and may be sent ahead to a busy one).
    pub fn request_ready(&mut self, key: ConnKey, port: &mut impl Port<C, W>, now: Instant) {
        let Some(conn) = self.conns.get_mut(key.0) else { return };
        debug_assert!(matches!(conn.place, Place::Reading { .. }), "ready from {:?}", conn.place);
        conn.place = Place::Queued;
        conn.ready_at = Some(now);
        match self.dispatcher.conn_ready(key) {
            Some(worker) => self.hand_over(worker, key, port, now),
            None => self.send_ahead_to_a_busy_worker(port, now),
        }
    }

    /// The shell has sent our FIN (after an error response, or a close with
    /// input pending): its input is drained until EOF or the linger timeout.
    pub fn lingering(&mut self, key: ConnKey, now: Instant) {
        let deadline = now + self.settings.linger_timeout;
        if let Some(c) = self.conns.get_mut(key.0) {
            debug_assert!(!matches!(c.place, Place::InWorker { .. } | Place::Queued), "linger {:?}", c.place);
            c.place = Place::Lingering { deadline };
        }
    }

    /// The connection is closed (the shell closes its fd): its part comes back.
    pub fn remove_conn(&mut self, key: ConnKey) -> Option<C> {
        let conn = self.conns.try_remove(key.0)?;
        match conn.place {
            Place::Queued => self.dispatcher.remove_conn(key),
            Place::InWorker { worker, .. } => {
                // Only connections being read or lingering are closed; were
                // one closed in a worker's hands, the worker must let go too.
                debug!("connection {} closed while worker {worker} has it", conn.id);
                debug_assert!(false, "closed a connection a worker holds");
            }
            Place::Warm { worker, .. } => {
                debug!("connection {} closed while worker {worker} keeps it warm", conn.id);
                debug_assert!(false, "closed a warm connection not taken back");
            }
            Place::Reading { .. } | Place::Lingering { .. } => {}
        }
        Some(conn.io)
    }

    /// Up to `n` idle keep-alive connections, longest idle first (to close
    /// at `--max-connections`).
    pub fn longest_idle(&self, n: usize) -> Vec<ConnKey> {
        let mut idle: Vec<(Instant, ConnKey)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_idle())
            .filter_map(|(k, c)| match c.place {
                Place::Reading { deadline, .. } => Some((deadline, ConnKey(k))),
                _ => None,
            })
            .collect();
        let n = n.min(idle.len());
        if n > 0 && n < idle.len() {
            idle.select_nth_unstable(n);
        }
        idle.truncate(n);
        idle.into_iter().map(|(_, k)| k).collect()
    }

    /// Requests not yet handed to a worker: queued, or being read (a
    /// connection that has not sent its first request counts).
    pub fn requests_pending(&self) -> bool {
        self.dispatcher.queued() > 0
            || self.conns.iter().any(|(_, c)| matches!(c.place, Place::Reading { .. }) && !c.is_idle())
    }

    /// Closes or answers the connections whose time is up.
    pub(super) fn expire_conns(&mut self, now: Instant) {
        let expired: Vec<(ConnKey, bool)> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c.place {
                Place::Reading { deadline, partial } if deadline <= now => Some((ConnKey(k), partial)),
                Place::Lingering { deadline } if deadline <= now => Some((ConnKey(k), false)),
                _ => None,
            })
            .collect();
        for (conn, partial) in expired {
            self.act(if partial {
                super::Action::HeadTimedOut { conn }
            } else {
                super::Action::Close { conn }
            });
        }
    }

    /// At a graceful stop, idle keep-alive connections close now.
    pub(super) fn close_idle_conns(&mut self) {
        debug_assert!(self.stopping != Stopping::No);
        let idle: Vec<ConnKey> =
            self.conns.iter().filter(|(_, c)| c.is_idle()).map(|(k, _)| ConnKey(k)).collect();
        for conn in idle {
            self.act(super::Action::Close { conn });
        }
    }
}
