//! Scheduling decisions, as plain state machines the event loop drives:
//! which idle worker gets the next ready connection, the bounded FIFO of
//! connections waiting for one, and the back-off between respawns.

use std::collections::VecDeque;
use std::time::Duration;

/// Matches connections that have a complete request with idle workers.
///
/// Idle workers are used last-in first-out: the most recently active
/// worker is warm, and a surplus of workers stays asleep. Waiting
/// connections are served first-in first-out.
#[derive(Debug)]
pub struct Dispatcher<W, C> {
    idle: Vec<W>,
    queue: VecDeque<C>,
    capacity: usize,
}

impl<W: PartialEq + Copy, C: PartialEq + Copy> Dispatcher<W, C> {
    pub fn new(capacity: usize) -> Self {
        Dispatcher { idle: Vec::new(), queue: VecDeque::new(), capacity }
    }

    /// A connection is ready: the worker to hand it to now, or `None` if it
    /// was queued.
    pub fn conn_ready(&mut self, conn: C) -> Option<W> {
        self.idle_worker_or_queue(conn, false)
    }

    /// Puts a connection back at the head of the queue (a hand-over failed).
    pub fn requeue_front(&mut self, conn: C) {
        self.queue.push_front(conn);
    }

    /// A connection that was waiting already is ready again (taken back
    /// from a worker): the idle worker to hand it to, or it goes back to
    /// the head of the queue.
    pub fn conn_back(&mut self, conn: C) -> Option<W> {
        self.idle_worker_or_queue(conn, true)
    }

    fn idle_worker_or_queue(&mut self, conn: C, at_front: bool) -> Option<W> {
        let worker = self.idle.pop();
        if worker.is_none() {
            if at_front {
                self.queue.push_front(conn);
            } else {
                self.queue.push_back(conn);
            }
        }
        worker
    }

    /// The connection that has waited longest, to send ahead to a busy
    /// worker (only ever called with no idle worker).
    pub fn take_next(&mut self) -> Option<C> {
        self.queue.pop_front()
    }

    /// A worker is idle: the connection it should take now, if one waits.
    pub fn worker_idle(&mut self, worker: W) -> Option<C> {
        match self.queue.pop_front() {
            Some(c) => Some(c),
            None => {
                if !self.idle.contains(&worker) {
                    self.idle.push(worker);
                }
                None
            }
        }
    }

    /// A worker is gone or leaving; it must not be handed anything.
    pub fn remove_worker(&mut self, worker: W) {
        self.idle.retain(|w| *w != worker);
    }

    /// A queued connection went away.
    pub fn remove_conn(&mut self, conn: C) {
        self.queue.retain(|c| *c != conn);
    }

    /// When full, the supervisor stops accepting so the kernel's backlog
    /// absorbs the burst.
    pub fn is_full(&self) -> bool {
        self.queue.len() >= self.capacity
    }

    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn idle_workers(&self) -> usize {
        self.idle.len()
    }

    /// The idle workers, for invariant checks.
    pub fn idle(&self) -> &[W] {
        &self.idle
    }

    /// The waiting connections in order, for invariant checks.
    pub fn waiting(&self) -> impl Iterator<Item = &C> {
        self.queue.iter()
    }
}

/// Exponential back-off for respawning workers that keep dying young.
#[derive(Debug, Clone)]
pub struct Backoff {
    failures: u32,
    base: Duration,
    cap: Duration,
    /// A worker that lived at least this long resets the back-off.
    healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            failures: 0,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            healthy_after: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// A worker died unexpectedly after `lived`, having completed `served`
    /// requests: how long to wait before starting its replacement. It died
    /// young if it served nothing, or lived less than `healthy_after`
    /// without getting far (one that served requests for a while was
    /// killed, not broken).
    pub fn on_death(&mut self, lived: Duration, served: u64) -> Duration {
        if lived >= self.healthy_after || (served > 0 && lived >= self.healthy_after / 5) {
            self.failures = 0;
            return Duration::ZERO;
        }
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32 << (self.failures - 1).min(16);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A worker could not even be started.
    pub fn on_spawn_failure(&mut self) -> Duration {
        self.on_death(Duration::ZERO, 0)
    }

    /// Consecutive quick deaths so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_conns_go_to_idle_workers_else_wait_in_order() {
        let mut d: Dispatcher<u32, u32> = Dispatcher::new(2);
        assert_eq!(d.conn_ready(10), None);
        assert_eq!(d.conn_ready(11), None);
        assert!(d.is_full());
        assert_eq!(d.worker_idle(1), Some(10));
        assert_eq!(d.worker_idle(1), Some(11));
        assert_eq!(d.worker_idle(1), None);
        assert_eq!(d.idle_workers(), 1);
        assert_eq!(d.conn_ready(12), Some(1));
        assert_eq!(d.queued(), 0);
    }

    #[test]
    fn most_recently_idle_worker_goes_first() {
        let mut d: Dispatcher<u32, u32> = Dispatcher::new(8);
        d.worker_idle(1);
        d.worker_idle(2);
        assert_eq!(d.conn_ready(10), Some(2));
        assert_eq!(d.conn_ready(11), Some(1));
    }

    #[test]
    fn removed_workers_and_conns_are_skipped() {
        let mut d: Dispatcher<u32, u32> = Dispatcher::new(8);
        d.worker_idle(1);
        d.worker_idle(1);
        d.remove_worker(1);
        assert_eq!(d.conn_ready(10), None);
        d.conn_ready(11);
        d.remove_conn(10);
        d.requeue_front(12);
        assert_eq!(d.worker_idle(2), Some(12));
        assert_eq!(d.worker_idle(2), Some(11));
    }

    #[test]
    fn connections_taken_back_go_first() {
        let mut d: Dispatcher<u32, u32> = Dispatcher::new(8);
        d.conn_ready(10);
        d.conn_ready(11);
        assert_eq!(d.take_next(), Some(10));
        assert_eq!(d.conn_back(10), None);
        assert_eq!(d.worker_idle(1), Some(10));
        assert_eq!(d.worker_idle(1), Some(11));
        assert_eq!(d.worker_idle(1), None);
        assert_eq!(d.conn_back(12), Some(1), "an idle worker takes it at once");
        assert_eq!(d.take_next(), None);
    }

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(10);
        let delays: Vec<_> = (0..10).map(|_| b.on_death(quick, 0)).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(10));
        assert_eq!(b.on_death(Duration::from_secs(60), 0), Duration::ZERO);
        assert_eq!(b.failures(), 0);
        // Served requests for a couple of seconds, then died: killed, not broken.
        assert_eq!(b.on_death(Duration::from_secs(2), 40), Duration::ZERO);
        // Died at its first request: broken.
        assert!(b.on_death(Duration::from_secs(2), 0) > Duration::ZERO);
    }
}
