//! A reload's part in the shell: the configuration re-read and the code
//! resolved for the new generation, and that configuration adopted when
//! the generation serves (the core decides when).

use std::time::Instant;

use log::{error, info, warn};

use super::setup::open_access_log;
use super::{ReloadCode, Supervisor};
use crate::config::Config;
use crate::core::Settings;
use crate::spawn::Code;

impl Supervisor {
    /// Starts a new generation (after re-reading the config file, if there
    /// is one); the generation started, or why none was.
    pub(super) fn begin_reload(&mut self) -> Result<u64, String> {
        if self.core.stopping() != crate::core::Stopping::No {
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
                error!("{message}; generation {} keeps serving", self.core.serving_generation());
                self.core.reload_refused(message.clone(), Instant::now());
                return Err(message);
            }
        };
        // A changed `workers` is the new size; otherwise the current target
        // (TTIN/TTOU and `monodon scale` may have moved it) carries over.
        let workers =
            if fresh.workers != self.config.workers { fresh.workers } else { self.core.target_workers() };
        let generation = self.core.begin_reload(Settings::from(&fresh), workers, Instant::now())?;
        info!(
            "reload: starting generation {generation} ({workers} workers) from {:?}{}",
            code.command,
            code.dir.as_ref().map(|d| format!(" in {}", d.display())).unwrap_or_default()
        );
        self.reload_code = Some(ReloadCode { generation, code, config: fresh });
        Ok(generation)
    }

    /// Fresh settings for the next generation, less what only a new
    /// supervisor can change (listeners, control socket, metrics): those are kept,
    /// and the log says so.
    fn settle_config(&self, mut fresh: Config) -> Config {
        let old = &self.config;
        for (what, changed) in [
            ("listen", fresh.listen != old.listen),
            ("backlog", fresh.backlog != old.backlog),
            ("control", fresh.control != old.control),
            ("metrics", fresh.metrics != old.metrics),
        ] {
            if changed {
                warn!("config: a change of `{what}` takes effect only when the supervisor restarts; keeping the old value");
            }
        }
        fresh.listen = old.listen.clone();
        fresh.backlog = old.backlog;
        fresh.control = old.control.clone();
        fresh.metrics = old.metrics.clone();
        fresh
    }

    /// A reload ended: on success its code and configuration become the
    /// supervisor's; either way, the control clients waiting are answered.
    pub(super) fn reload_finished(&mut self, generation: u64, outcome: Result<String, String>) {
        let ours = self.reload_code.as_ref().is_some_and(|r| r.generation == generation);
        if ours {
            if let Some(reload) = self.reload_code.take().filter(|_| outcome.is_ok()) {
                self.serving_code = reload.code;
                self.adopt_config(reload.config);
            }
        }
        self.answer_reload_waiters(generation, outcome);
    }

    /// The new generation serves: its configuration becomes the supervisor's
    /// (the core has adopted its settings already).
    fn adopt_config(&mut self, fresh: Config) {
        let old = &self.config;
        if (&fresh.access_log, &fresh.access_log_format) != (&old.access_log, &old.access_log_format) {
            match open_access_log(&fresh) {
                Ok(log) => self.access_log = log,
                Err(e) => warn!("config: {e}; the supervisor keeps logging where it did"),
            }
        }
        self.config = fresh;
    }
}
