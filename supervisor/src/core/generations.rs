//! Generations: a reload starting the next one, its switch to serving or
//! its abandonment, and the number of workers per generation.

use std::time::Instant;

use log::{error, info, warn};

use super::{
    Action, Activity, Core, Named, Notice, Peer, Port, Retirement, Settings, Signal, Stopping, WorkerKey,
};

/// A reload in progress: generation `generation` is starting.
#[derive(Debug, Clone)]
pub struct Reload {
    pub generation: u64,
    /// The settings it starts with: they become the core's when it serves,
    /// and are dropped if the reload fails, so a bad or abandoned reload
    /// changes nothing.
    pub settings: Settings,
    /// How many workers it needs before it serves.
    pub workers: usize,
    pub started: Instant,
    pub deadline: Instant,
}

impl<C: Peer, W: Named> Core<C, W> {
    /// Starts generation n+1 with `settings` and `workers` workers (a
    /// reload in progress is superseded); its number.
    pub fn begin_reload(&mut self, settings: Settings, workers: usize, now: Instant) -> Result<u64, String> {
        if self.stopping != Stopping::No {
            return Err("the supervisor is stopping".into());
        }
        if self.reload.is_some() {
            self.abandon_reload("superseded by a newer reload", now);
        }
        self.newest += 1;
        self.totals.reloads += 1;
        self.act(Action::Notify(Notice::Reloading));
        self.reload = Some(Reload {
            generation: self.newest,
            deadline: now + settings.reload_timeout,
            settings,
            workers,
            started: now,
        });
        Ok(self.newest)
    }

    /// A reload was refused before it started (bad config, missing program).
    pub fn reload_refused(&mut self, message: String, now: Instant) {
        self.totals.failed_reloads += 1;
        self.last_reload_failure = Some((message, now));
    }

    /// Stops the reload's workers; the serving generation carries on.
    pub(super) fn abandon_reload(&mut self, reason: &str, now: Instant) {
        let Some(reload) = self.reload.take() else { return };
        error!(
            "reload to generation {} failed: {reason}; generation {} keeps serving",
            reload.generation, self.serving
        );
        let doomed: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == reload.generation)
            .map(|(k, _)| WorkerKey(k))
            .collect();
        for wkey in doomed {
            // None of them serves, so none has a connection to take back.
            self.leave_service(wkey, Retirement::ReloadFailed);
            self.act(Action::Signal { worker: wkey, signal: Signal::Term });
        }
        let message = format!("reload to generation {} failed: {reason}", reload.generation);
        self.totals.failed_reloads += 1;
        self.last_reload_failure = Some((message.clone(), now));
        self.act(Action::ReloadFinished { generation: reload.generation, outcome: Err(message) });
        self.release_templates();
        if self.stopping == Stopping::No {
            self.act(Action::Notify(Notice::Ready));
        }
    }

    /// Switches dispatch to the new generation once all of it is ready.
    pub(super) fn maybe_finish_reload(&mut self, port: &mut impl Port<C, W>, now: Instant) {
        let Some(reload) = self.reload.as_ref() else { return };
        let ready: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                w.generation == reload.generation && w.reachable() && w.activity == Activity::Idle
            })
            .map(|(k, _)| WorkerKey(k))
            .collect();
        if ready.len() < reload.workers {
            return;
        }
        let Some(reload) = self.reload.take() else { return };
        let old = self.serving;
        self.serving = reload.generation;
        if reload.workers != self.target {
            info!("config: workers {} -> {}", self.target, reload.workers);
        }
        self.target = reload.workers;
        self.dispatcher.set_capacity(reload.settings.queue_capacity);
        self.settings = reload.settings;
        let outgoing: Vec<WorkerKey> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation != reload.generation && w.retiring().is_none())
            .map(|(k, _)| WorkerKey(k))
            .collect();
        let retired = outgoing.len();
        for wkey in outgoing {
            self.retire(wkey, Retirement::Reloaded, port, now);
        }
        for wkey in ready {
            self.worker_idle(wkey, port, now);
        }
        let message = format!(
            "generation {} serving after {:.1?}; retiring {retired} workers of generation {old}",
            reload.generation,
            now.saturating_duration_since(reload.started)
        );
        info!("reload: {message}");
        self.act(Action::ReloadFinished { generation: reload.generation, outcome: Ok(message) });
        self.release_templates();
        self.act(Action::Notify(Notice::Ready));
    }

    /// SIGTTIN / SIGTTOU: one worker more or less.
    pub fn scale(&mut self, delta: i32, port: &mut impl Port<C, W>, now: Instant) {
        if self.stopping != Stopping::No {
            return;
        }
        if delta < 0 && self.target <= 1 {
            warn!("SIGTTOU ignored: already down to one worker");
            return;
        }
        let target = if delta > 0 { self.target + 1 } else { self.target - 1 };
        self.set_target_workers(target.min(4096), port, now);
    }

    /// Sets the number of workers per generation; surplus workers retire,
    /// idle ones first, in the serving generation and in one a reload is
    /// starting alike.
    pub fn set_target_workers(&mut self, target: usize, port: &mut impl Port<C, W>, now: Instant) {
        self.target = target;
        // The operator's word holds for a generation on its way in too.
        if let Some(r) = &mut self.reload {
            r.workers = target;
        }
        let generations = [Some(self.serving), self.reload.as_ref().map(|r| r.generation)];
        for generation in generations.into_iter().flatten() {
            let mut candidates: Vec<(u8, WorkerKey)> = self
                .workers
                .iter()
                .filter(|(_, w)| w.generation == generation && w.retiring().is_none())
                .map(|(k, w)| {
                    // Outgoing workers first: they are leaving anyway.
                    let rank = match w.activity {
                        _ if w.outgoing.is_some() => 0,
                        Activity::Idle => 1,
                        Activity::Starting => 2,
                        Activity::Busy { .. } | Activity::Own { .. } => 3,
                    };
                    (rank, WorkerKey(k))
                })
                .collect();
            candidates.sort();
            let surplus = candidates.len().saturating_sub(target);
            for &(_, wkey) in candidates.iter().take(surplus) {
                self.retire(wkey, Retirement::ScaledDown, port, now);
            }
        }
        info!("scaled to {target} workers");
    }
}
