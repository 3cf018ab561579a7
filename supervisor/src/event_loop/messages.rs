//! What workers say on their channels: Ready, Done, Retiring, Skipped,
//! and the channel's end; a worker that breaks the protocol is killed.

use std::io;
use std::os::fd::AsFd;
use std::time::Instant;

use log::{debug, error, info};
use monodon_proto::wire::{self, FromWorker, Received};
use nix::sys::signal::{kill, Signal};

use super::{ConnState, Retirement, Stopping, Supervisor, WorkerKey, WorkerState};

impl Supervisor {
    pub(super) fn on_channel_readable(&mut self, wkey: WorkerKey) {
        // One message per readiness event: a worker rarely has more than one
        // queued, and the channel is level-triggered, so a second message
        // raises the event again; reading on to EAGAIN would cost a recvmsg
        // per request for nothing.
        self.receive_from(wkey);
    }

    /// Handles every message a worker has sent (it is exiting).
    pub(super) fn drain_channel(&mut self, wkey: WorkerKey) {
        while self.receive_from(wkey) {}
    }

    /// Receives and handles one message; false when there was none, or the
    /// channel is gone.
    pub(super) fn receive_from(&mut self, wkey: WorkerKey) -> bool {
        // Taken out so handlers may use `self`; a nested call (a death
        // handled while messages are) finds it empty and makes its own.
        let mut buf = std::mem::take(&mut self.channel_buf);
        let room = self.workers.get(wkey).map_or(0, |w| w.max_message);
        if buf.len() < room {
            buf.resize(room, 0);
        }
        let Some(channel) = self.workers.get(wkey).and_then(|w| w.channel.as_ref()) else {
            self.channel_buf = buf;
            return false;
        };
        let more = match wire::recv(channel.as_fd(), &mut buf) {
            Ok(Received::Message(_, Some(_))) => {
                self.worker_misbehaved(wkey, "sent a descriptor");
                false
            }
            Ok(Received::Message(n, None)) => match FromWorker::decode(&buf[..n]) {
                Ok(msg) => {
                    self.on_worker_message(wkey, msg);
                    true
                }
                Err(e) => {
                    self.worker_misbehaved(wkey, &e.to_string());
                    false
                }
            },
            // The worker is exiting.
            Ok(Received::Closed) => {
                self.channel_gone(wkey);
                false
            }
            // The worker exited with a message from us unread (a connection
            // sent ahead, or any, if it was killed). The kernel reports that
            // once, before what the worker sent: read on to EOF.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                self.worker_misbehaved(wkey, &e.to_string());
                false
            }
        };
        self.channel_buf = buf;
        more
    }

    /// The worker's end of the channel is gone: it is exiting, and SIGCHLD
    /// will tell how; one that lives on anyway is killed in the sweep.
    pub(super) fn channel_gone(&mut self, wkey: WorkerKey) {
        let w = &mut self.workers[wkey];
        if let Some(ch) = w.channel.take() {
            let _ = self.poller.delete(&ch);
            w.channel_lost = Some(Instant::now());
        }
        self.dispatcher.remove_worker(wkey);
    }

    pub(super) fn worker_misbehaved(&mut self, wkey: WorkerKey, what: &str) {
        let w = &mut self.workers[wkey];
        error!("worker {} broke the protocol ({what}); killing it", w.pid);
        if let Some(ch) = w.channel.take() {
            let _ = self.poller.delete(&ch);
        }
        let _ = kill(w.pid, Signal::SIGKILL);
        self.dispatcher.remove_worker(wkey);
    }

    pub(super) fn on_worker_message(&mut self, wkey: WorkerKey, msg: FromWorker<'_>) {
        match msg {
            FromWorker::Ready { pid, features } => {
                let w = &mut self.workers[wkey];
                if w.state != WorkerState::Starting || pid != w.pid.as_raw() as u32 {
                    self.worker_misbehaved(wkey, "unexpected Ready");
                    return;
                }
                w.accepts_ahead = features & wire::FEATURE_AHEAD != 0;
                debug!("worker {pid} ready");
                self.worker_idle(wkey);
            }
            FromWorker::Retiring => {
                let w = &mut self.workers[wkey];
                info!("worker {} reached its {} requests; starting its replacement", w.pid, w.max_requests);
                w.retiring = Some(Retirement::MaxRequests);
                self.count_recycle(Retirement::MaxRequests);
                self.dispatcher.remove_worker(wkey);
                // It exits after this request: it will never read the next one.
                self.take_back_ahead(wkey);
            }
            FromWorker::Skipped { .. } => {
                let w = &mut self.workers[wkey];
                if w.skips_pending == 0 {
                    self.worker_misbehaved(wkey, "Skipped a connection it was not sent ahead");
                    return;
                }
                w.skips_pending -= 1;
            }
            FromWorker::Done { conn_id, served, keep, leftover } => {
                let WorkerState::Busy(ckey) = self.workers[wkey].state else {
                    self.worker_misbehaved(wkey, "Done while not busy");
                    return;
                };
                if self.conns.get(ckey).map(|c| c.id) != Some(conn_id) {
                    self.worker_misbehaved(wkey, "Done for a connection it does not hold");
                    return;
                }
                // The worker first: free now, or on to the connection sent
                // ahead (it claims that one as soon as it has sent this Done,
                // and nothing takes it back any more).
                let w = &mut self.workers[wkey];
                let next = w.ahead.take();
                match next {
                    Some(next) => {
                        w.state = WorkerState::Busy(next);
                        w.busy_since = Instant::now();
                        if let Some(c) = self.conns.get_mut(next) {
                            c.pending.release();
                        }
                    }
                    None => w.state = WorkerState::Idle,
                }
                let conn = &mut self.conns[ckey];
                conn.served = served;
                conn.state = ConnState::Reading;
                if next.is_none() {
                    // Before the connection may queue again: the free worker
                    // takes what waited before it (and nothing sent ahead
                    // elsewhere meanwhile needs taking back).
                    self.worker_idle(wkey);
                }
                // (Checked again: nothing in worker_idle closes connections
                // today, but a panic here would take the supervisor down.)
                if self.conns.contains(ckey) {
                    if keep && self.stopping == Stopping::No {
                        self.resume_reading(ckey, leftover);
                    } else {
                        self.close_after_response(ckey);
                    }
                }
                if next.is_some() {
                    self.send_ahead(wkey);
                }
            }
        }
    }
}
