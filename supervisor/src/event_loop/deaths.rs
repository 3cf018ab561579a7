//! Workers that exit, die or get stuck: reaping, what their connection is
//! answered, respawn back-off, and the `--timeout` kill.

use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use monodon_proto::access_log::{Entry, RawRequestLine};
use monodon_proto::http::error_response;
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::{ConnState, Retirement, Stopping, Supervisor, WorkerKey, WorkerState};

impl Supervisor {
    pub(super) fn reap_children(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => {
                    let Some(pid) = status.pid() else { continue };
                    match self.workers.iter().find(|(_, w)| w.pid == pid).map(|(k, _)| k) {
                        Some(wkey) => self.on_worker_exit(wkey, status),
                        None => debug!("reaped unknown child {pid}: {status:?}"),
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!("waitpid: {e}");
                    break;
                }
            }
        }
    }

    pub(super) fn on_worker_exit(&mut self, wkey: WorkerKey, status: WaitStatus) {
        // Whatever it said before dying comes first (typically the Done of a
        // worker that retired on purpose): SIGCHLD may overtake the channel.
        self.drain_channel(wkey);
        // A connection sent ahead and never claimed was not started: it is
        // served by another worker, not answered 502.
        self.take_back_ahead(wkey);
        let w = self.workers.remove(wkey);
        self.totals.requests += w.scoreboard.slot().requests.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(ch) = &w.channel {
            let _ = self.poller.delete(ch);
        }
        self.dispatcher.remove_worker(wkey);
        let lived = w.started.elapsed();
        let how = match status {
            WaitStatus::Exited(_, code) => format!("exited with status {code}"),
            WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
            other => format!("{other:?}"),
        };
        if let WorkerState::Busy(ckey) = w.state {
            if let Some(ConnState::InWorker { written_before, .. }) = self.conns.get(ckey).map(|c| c.state) {
                let conn = &self.conns[ckey];
                let wrote = w.scoreboard.slot().wrote_on(conn.id, written_before);
                let (status, why) = if w.killed.is_some() {
                    (504, "the request took longer than the server's timeout")
                } else {
                    (502, "the worker serving this request died")
                };
                let request = w.scoreboard.slot().current_request().unwrap_or_default();
                warn!(
                    "worker {} {how} while serving {request:?} on connection {} from {}{}",
                    w.pid,
                    conn.id,
                    conn.peer,
                    if wrote { "; closing it".to_owned() } else { format!("; answering {status}") }
                );
                if !wrote {
                    let sent = self.send_error(ckey, error_response(status, why));
                    if let Some(log) = &mut self.access_log {
                        let line = RawRequestLine::from_bytes(request.as_bytes());
                        log.write(&Entry {
                            duration: w.busy_since.elapsed(),
                            pid: w.pid.as_raw() as u32,
                            generation: w.generation,
                            ..Entry::refused(&self.conns[ckey].peer, line.parts(), status, sent)
                        });
                    }
                }
                self.conns[ckey].state = ConnState::Reading;
                self.linger(ckey);
            }
        }
        let expected = w.retiring.is_some() || self.stopping != Stopping::No;
        if expected {
            info!("worker {} (generation {}) {how}", w.pid, w.generation);
            return;
        }
        if w.killed.is_none() {
            warn!("worker {} (generation {}) {how} after {:.1?}", w.pid, w.generation, lived);
        }
        if self.reload.as_ref().is_some_and(|r| r.generation == w.generation) {
            let reload = self.reload.take().expect("checked above");
            let when =
                if w.state == WorkerState::Starting { "before it was ready" } else { "during the reload" };
            self.abandon_reload(reload, &format!("worker {} {how} {when}", w.pid));
            return;
        }
        self.totals.respawns += 1;
        let served = w.scoreboard.slot().requests.load(std::sync::atomic::Ordering::Relaxed);
        let delay = if w.killed.is_some() { Duration::ZERO } else { self.backoff.on_death(lived, served) };
        if delay > Duration::ZERO {
            warn!("workers keep dying young ({} in a row); next start in {delay:?}", self.backoff.failures());
        }
        self.next_spawn_at = self.next_spawn_at.max(Instant::now() + delay);
    }

    /// Retires serving workers past their --max-worker-age or whose private
    /// memory passed --max-worker-memory: each finishes its connection, and
    /// its replacement starts at once. Memory is read from smaps_rollup
    /// (the kernel walks the worker's mappings), so only when asked.
    pub(super) fn retire_aged_and_grown(&mut self, now: Instant, read_memory: bool) {
        let memory_limit = self.config.max_worker_memory.filter(|_| read_memory);
        let due: Vec<(WorkerKey, Retirement)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.retiring.is_none() && w.state != WorkerState::Starting && w.killed.is_none())
            .filter(|(_, w)| w.generation == self.serving_generation)
            .filter_map(|(k, w)| {
                if w.age_limit.is_some_and(|limit| now.duration_since(w.started) >= limit) {
                    return Some((k, Retirement::MaxAge));
                }
                let limit = memory_limit?;
                let private_kib = super::status::smaps(w.pid.as_raw())?.0;
                (private_kib.saturating_mul(1024) > limit).then_some((k, Retirement::MaxMemory))
            })
            .collect();
        for (wkey, why) in due {
            info!("worker {} retires ({}); starting its replacement", self.workers[wkey].pid, why.as_str());
            self.retire(wkey, why);
        }
    }

    /// Kills workers busy on one request for longer than `--timeout`
    /// (SIGTERM, then SIGKILL after the grace period).
    pub(super) fn check_stuck_workers(&mut self, now: Instant) {
        let timeout_ms = self.config.timeout.as_millis() as u64;
        let mut killed = Vec::new();
        for (wkey, w) in self.workers.iter_mut() {
            if let Some(at) = w.channel_lost {
                if now.duration_since(at) >= self.config.kill_grace && w.killed.is_none() {
                    warn!("worker {} closed its channel but did not exit; killing it", w.pid);
                    let _ = kill(w.pid, Signal::SIGKILL);
                    w.channel_lost = None;
                }
            }
            match w.killed {
                Some((at, false)) if now.duration_since(at) >= self.config.kill_grace => {
                    warn!("worker {} did not exit after SIGTERM; sending SIGKILL", w.pid);
                    let _ = kill(w.pid, Signal::SIGKILL);
                    w.killed = Some((at, true));
                }
                Some(_) => {}
                None => {
                    let WorkerState::Busy(ckey) = w.state else { continue };
                    // A worker that never even started the request counts from the hand-over.
                    let age = w
                        .scoreboard
                        .slot()
                        .request_age_ms()
                        .unwrap_or_else(|| now.duration_since(w.busy_since).as_millis() as u64);
                    if age <= timeout_ms {
                        continue;
                    }
                    let peer = self.conns.get(ckey).map(|c| c.peer.as_str()).unwrap_or("?");
                    let request =
                        w.scoreboard.slot().current_request().unwrap_or_else(|| "(not started)".into());
                    warn!(
                        "worker {} has been busy for {:.1}s on {request:?} from {peer} (--timeout {:?}); killing it",
                        w.pid,
                        age as f64 / 1000.0,
                        self.config.timeout
                    );
                    let _ = kill(w.pid, Signal::SIGTERM);
                    w.killed = Some((now, false));
                    self.totals.timeouts += 1;
                    killed.push(wkey);
                }
            }
        }
        for wkey in killed {
            self.take_back_ahead(wkey);
        }
    }
}
