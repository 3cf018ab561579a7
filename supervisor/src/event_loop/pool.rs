//! The workers: how many are wanted, starting them, and taking them out
//! of service (release, retire).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

use log::{error, info, warn};
use monodon_proto::env::WorkerEnv;
use monodon_proto::wire;
use nix::sys::signal::{kill, Signal};
use polling::{Event, PollMode};

use super::{Retirement, Stopping, Supervisor, Worker, WorkerKey, WorkerState, WORKER_BASE};
use crate::spawn::{spawn_worker, WorkerSpec};

impl Supervisor {
    /// Workers wanted in `generation`: the serving one's target, or the
    /// size a reload's generation needs.
    pub(super) fn wanted_workers(&self, generation: u64) -> usize {
        match &self.reload {
            _ if self.stopping != Stopping::No => 0,
            Some(r) if r.generation == generation => r.workers,
            _ => self.target_workers,
        }
    }

    /// Workers of `generation` that take new connections (or will, once ready).
    pub(super) fn active_workers(&self, generation: u64) -> usize {
        self.workers.iter().filter(|(_, w)| w.generation == generation && w.retiring.is_none()).count()
    }

    pub(super) fn spawn_missing_workers(&mut self) {
        let serving = self.serving_generation;
        while self.active_workers(serving) < self.wanted_workers(serving)
            && Instant::now() >= self.next_spawn_at
        {
            if self.spawn(serving).is_err() {
                let delay = self.backoff.on_spawn_failure();
                warn!("next worker start in {delay:?}");
                self.next_spawn_at = Instant::now() + delay;
            }
        }
        while let Some(generation) = self.reload.as_ref().map(|r| r.generation) {
            if self.active_workers(generation) >= self.wanted_workers(generation) {
                break;
            }
            if let Err(e) = self.spawn(generation) {
                if let Some(reload) = self.reload.take() {
                    self.abandon_reload(reload, &e.to_string());
                }
            }
        }
    }

    /// Starts a worker of `generation` (the serving one or the one a reload
    /// is starting), with that generation's command and configuration.
    pub(super) fn spawn(&mut self, generation: u64) -> io::Result<WorkerKey> {
        let (code, config) = match &self.reload {
            Some(r) if r.generation == generation => (&r.code, &r.config),
            _ => (&self.serving_code, &self.config),
        };
        let max_message = wire::max_message(&config.limits);
        // Drawn from [80%, 100%] of the limit, so workers started together
        // do not all leave together.
        let age_limit = config.max_worker_age.map(|max| max.mul_f64(0.8 + 0.2 * self.rng.f64()));
        let max_requests = match (config.min_requests, config.max_requests) {
            (_, 0) => 0,
            (min, max) => self.rng.u64(min.clamp(1, max)..=max),
        };
        let spec = WorkerSpec {
            code,
            env: WorkerEnv {
                supervisor_pid: std::process::id(),
                generation,
                limits: config.limits,
                io_timeout: config.io_timeout,
                max_requests,
                access_log: config.access_log.clone(),
                access_log_format: config.access_log_format,
                read_ahead: config.read_ahead,
                min_body_rate: config.min_body_rate,
            },
        };
        let s = spawn_worker(&spec).inspect_err(|e| error!("{e}"))?;
        let entry = self.workers.vacant_entry();
        let key = entry.key();
        // SAFETY: the channel is deleted from the poller before it is
        // dropped (`release`, `on_worker_exit`).
        let added = unsafe {
            self.poller.add_with_mode(
                s.channel.as_raw_fd(),
                Event::readable(WORKER_BASE + key),
                PollMode::Level,
            )
        };
        if let Err(e) = added {
            error!("cannot watch worker {} channel: {e}", s.pid);
            let _ = kill(s.pid, Signal::SIGKILL);
        }
        info!("spawned worker {} (generation {generation}, max requests {max_requests})", s.pid);
        s.scoreboard.slot().set_others_waiting(self.others_waiting);
        entry.insert(Worker {
            pid: s.pid,
            channel: Some(s.channel),
            scoreboard: s.scoreboard,
            state: WorkerState::Starting,
            generation,
            started: Instant::now(),
            retiring: None,
            age_limit,
            max_requests,
            max_message,
            killed: None,
            busy_since: Instant::now(),
            channel_lost: None,
            accepts_ahead: false,
            ahead: None,
            skips_pending: 0,
        });
        Ok(key)
    }

    /// Counts a worker leaving for one of the recycling limits.
    pub(super) fn count_recycle(&mut self, why: Retirement) {
        if matches!(why, Retirement::MaxRequests | Retirement::MaxAge | Retirement::MaxMemory) {
            *self.totals.recycled.entry(why.as_str().to_owned()).or_default() += 1;
        }
    }

    /// Closes a worker's channel: it exits when it next waits for work.
    pub(super) fn release(&mut self, wkey: WorkerKey) {
        // Nothing may be handed to it any more.
        self.dispatcher.remove_worker(wkey);
        let w = &mut self.workers[wkey];
        if let Some(ch) = w.channel.take() {
            let _ = self.poller.delete(&ch);
        }
        if w.state == WorkerState::Starting {
            // Its app may be stuck initialising: it has nothing to finish.
            let _ = kill(w.pid, Signal::SIGTERM);
        }
    }

    /// Takes a worker out of service; it exits after its current connection.
    pub(super) fn retire(&mut self, wkey: WorkerKey, why: Retirement) {
        self.count_recycle(why);
        self.take_back_ahead(wkey);
        let w = &mut self.workers[wkey];
        w.retiring = Some(why);
        self.dispatcher.remove_worker(wkey);
        if !matches!(w.state, WorkerState::Busy(_)) {
            self.release(wkey);
        }
    }
}
