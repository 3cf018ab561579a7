//! Generations: reloads (HUP, `monodon reload`) with the configuration
//! they re-read, their success or abandonment, and scaling.

use std::time::Instant;

use log::{error, info, warn};
use nix::sys::signal::{kill, Signal};

use super::setup::open_access_log;
use super::{Reload, Retirement, Stopping, Supervisor, WorkerKey, WorkerState};
use crate::config::Config;
use crate::spawn::Code;

impl Supervisor {
    /// Starts a new generation (after re-reading the config file, if there
    /// is one); the generation started, or why none was.
    pub(super) fn begin_reload(&mut self) -> Result<u64, String> {
        if self.stopping != Stopping::No {
            return Err("the supervisor is stopping".into());
        }
        let read = match self.config.source.clone() {
            None => Ok(self.config.clone()),
            Some(source) => (source.0)(),
        };
        let checked = read.and_then(|fresh| {
            crate::spawn::channel(&fresh.limits).map_err(|e| e.to_string())?;
            let code =
                Code::resolve(&fresh.worker_command, fresh.chdir.as_deref()).map_err(|e| e.to_string())?;
            Ok((fresh, code))
        });
        let (fresh, code) = match checked {
            Ok((fresh, code)) => (self.settle_config(fresh), code),
            Err(e) => {
                let message = format!("reload refused: {e}");
                error!("{message}; generation {} keeps serving", self.serving_generation);
                self.totals.failed_reloads += 1;
                self.last_reload_failure = Some((message.clone(), Instant::now()));
                return Err(message);
            }
        };
        if let Some(r) = self.reload.take() {
            self.abandon_reload(r, "superseded by a newer reload");
        }
        // A changed `workers` is the new size; otherwise the current target
        // (TTIN/TTOU and `monodon scale` may have moved it) carries over.
        let workers = if fresh.workers != self.config.workers { fresh.workers } else { self.target_workers };
        self.generation += 1;
        self.totals.reloads += 1;
        self.notifier.reloading();
        let now = Instant::now();
        info!(
            "reload: starting generation {} ({workers} workers) from {:?}{}",
            self.generation,
            code.command,
            code.dir.as_ref().map(|d| format!(" in {}", d.display())).unwrap_or_default()
        );
        self.reload = Some(Reload {
            generation: self.generation,
            code,
            started: now,
            deadline: now + fresh.reload_timeout,
            config: fresh,
            workers,
        });
        Ok(self.generation)
    }

    /// Fresh settings for the next generation, less what only a new
    /// supervisor can change (listeners, control socket): those are kept,
    /// and the log says so.
    fn settle_config(&self, mut fresh: Config) -> Config {
        let old = &self.config;
        for (what, changed) in [
            ("listen", fresh.listen != old.listen),
            ("backlog", fresh.backlog != old.backlog),
            ("control", fresh.control != old.control),
        ] {
            if changed {
                warn!("config: a change of `{what}` takes effect only when the supervisor restarts; keeping the old value");
            }
        }
        fresh.listen = old.listen.clone();
        fresh.backlog = old.backlog;
        fresh.control = old.control.clone();
        fresh
    }

    /// The new generation serves: its configuration becomes the supervisor's.
    fn adopt_config(&mut self, fresh: Config, workers: usize) {
        let old = &self.config;
        if workers != self.target_workers {
            info!("config: workers {} -> {workers}", self.target_workers);
        }
        self.target_workers = workers;
        self.dispatcher.set_capacity(fresh.queue_capacity);
        if (&fresh.access_log, &fresh.access_log_format) != (&old.access_log, &old.access_log_format) {
            match open_access_log(&fresh) {
                Ok(log) => self.access_log = log,
                Err(e) => warn!("config: {e}; the supervisor keeps logging where it did"),
            }
        }
        self.config = fresh;
    }

    /// Stops a reload's workers; the serving generation carries on.
    /// The caller has taken `reload` out of `self.reload`.
    pub(super) fn abandon_reload(&mut self, reload: Reload, reason: &str) {
        error!(
            "reload to generation {} failed: {reason}; generation {} keeps serving",
            reload.generation, self.serving_generation
        );
        let doomed: Vec<WorkerKey> =
            self.workers.iter().filter(|(_, w)| w.generation == reload.generation).map(|(k, _)| k).collect();
        for wkey in doomed {
            self.retire(wkey, Retirement::ReloadFailed);
            let _ = kill(self.workers[wkey].pid, Signal::SIGTERM);
        }
        let message = format!("reload to generation {} failed: {reason}", reload.generation);
        self.totals.failed_reloads += 1;
        self.last_reload_failure = Some((message.clone(), Instant::now()));
        self.reload_finished(reload.generation, Err(message));
        if self.stopping == Stopping::No {
            let line = self.status_line();
            self.notifier.ready(line);
        }
    }

    /// Switches dispatch to the new generation once all of it is ready.
    pub(super) fn maybe_finish_reload(&mut self) {
        let Some(reload) = self.reload.as_ref() else { return };
        let ready: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                w.generation == reload.generation && w.retiring.is_none() && w.state == WorkerState::Idle
            })
            .map(|(k, _)| k)
            .collect();
        if ready.len() < reload.workers {
            return;
        }
        let Some(reload) = self.reload.take() else { return };
        let old = self.serving_generation;
        self.serving_generation = reload.generation;
        self.serving_code = reload.code.clone();
        self.adopt_config(reload.config, reload.workers);
        let outgoing: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation != reload.generation && w.retiring.is_none())
            .map(|(k, _)| k)
            .collect();
        let retired = outgoing.len();
        for wkey in outgoing {
            self.retire(wkey, Retirement::Reloaded);
        }
        for wkey in ready {
            self.worker_idle(wkey);
        }
        let message = format!(
            "generation {} serving after {:.1?}; retiring {retired} workers of generation {old}",
            reload.generation,
            reload.started.elapsed()
        );
        info!("reload: {message}");
        self.reload_finished(reload.generation, Ok(message));
        let line = self.status_line();
        self.notifier.ready(line);
    }

    /// SIGTTIN / SIGTTOU: one worker more or less.
    pub(super) fn scale(&mut self, delta: i32) {
        if self.stopping != Stopping::No {
            return;
        }
        if delta < 0 && self.target_workers <= 1 {
            warn!("SIGTTOU ignored: already down to one worker");
            return;
        }
        let target = if delta > 0 { self.target_workers + 1 } else { self.target_workers - 1 };
        self.set_target_workers(target.min(4096));
    }

    /// Sets the number of workers per generation; surplus workers retire,
    /// idle ones first.
    pub(super) fn set_target_workers(&mut self, target: usize) {
        let serving = self.serving_generation;
        self.target_workers = target;
        // The operator's word holds for a generation on its way in too.
        if let Some(r) = &mut self.reload {
            r.workers = target;
        }
        let mut candidates: Vec<(u8, WorkerKey)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == serving && w.retiring.is_none())
            .map(|(k, w)| {
                let rank = match w.state {
                    WorkerState::Idle => 0,
                    WorkerState::Starting => 1,
                    WorkerState::Busy(_) => 2,
                };
                (rank, k)
            })
            .collect();
        candidates.sort();
        let surplus = candidates.len().saturating_sub(target);
        for &(_, wkey) in candidates.iter().take(surplus) {
            self.retire(wkey, Retirement::ScaledDown);
        }
        info!("scaled to {target} workers");
    }
}
