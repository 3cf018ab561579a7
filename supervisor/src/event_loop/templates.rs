//! Each generation's template (`--spawn template`, the default): one
//! process started from the generation's command, which loads the app and
//! forks that generation's workers on request. Replacements come from the
//! same template, so a generation runs its own code for its whole life
//! whatever happens on disk, and recycling a worker costs a fork.
//!
//! A template that dies is started again from its generation's command,
//! with back-off; meanwhile the generation keeps serving with the workers
//! it has (status says so). Its workers are not its children: the
//! supervisor is a child subreaper, and the template forks twice.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use monodon_proto::env::WorkerEnv;
use monodon_proto::template::FromTemplate;
use monodon_proto::wire;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use polling::{Event, PollMode};

use super::{Supervisor, WorkerIo, TEMPLATE_BASE};
use crate::core::SpawnOrder;
use crate::sched::Backoff;
use crate::spawn::{fork_from_template, spawn_template, WorkerSpec};

/// How long a fork request may take before the template is taken for broken.
const FORK_ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// Where a generation's template is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TemplateState {
    /// Started; its app is loading.
    Starting,
    Ready,
    /// Gone (died, or broken); started again at `retry_at`.
    Down {
        retry_at: Instant,
    },
}

pub(super) struct Template {
    pub pid: Option<Pid>,
    /// The supervisor's end of its channel.
    pub channel: Option<OwnedFd>,
    /// When it closed its end (it should be exiting; killed if it lingers).
    channel_lost: Option<Instant>,
    pub state: TemplateState,
    /// Times it has been started again.
    pub restarts: u32,
    backoff: Backoff,
}

/// The templates, by generation.
#[derive(Default)]
pub(super) struct Templates {
    pub by_generation: BTreeMap<u64, Template>,
    /// Templates let go (their generation is over), until reaped.
    pub leaving: Vec<Pid>,
}

/// What the spawn loop can do with a generation's template now.
pub(super) enum Maker {
    /// Fork from it.
    Ready,
    /// Wait for it (loading, or backing off).
    Wait,
}

impl Supervisor {
    /// Gets a worker of `order` forked from its generation's template, or
    /// says to wait for the template (starting it if it is missing).
    pub(super) fn template_for(&mut self, order: SpawnOrder) -> Result<Maker, String> {
        let now = Instant::now();
        let state = self.templates.by_generation.get(&order.generation).map(|t| t.state);
        match state {
            Some(TemplateState::Ready) => Ok(Maker::Ready),
            Some(TemplateState::Starting) => Ok(Maker::Wait),
            Some(TemplateState::Down { retry_at }) if now < retry_at => Ok(Maker::Wait),
            None | Some(TemplateState::Down { .. }) => {
                self.start_template(order.generation).map(|()| Maker::Wait)
            }
        }
    }

    fn start_template(&mut self, generation: u64) -> Result<(), String> {
        let (code, config) = self.code_of(generation);
        let spec = WorkerSpec { code, env: self.worker_env(generation, 0, config) };
        let started = spawn_template(&spec).map_err(|e| e.to_string());
        let entry = self.templates.by_generation.entry(generation).or_insert_with(|| Template {
            pid: None,
            channel: None,
            channel_lost: None,
            state: TemplateState::Starting,
            restarts: 0,
            backoff: Backoff::default(),
        });
        let s = match started {
            Ok(s) => s,
            Err(e) => {
                let delay = entry.backoff.on_spawn_failure();
                entry.state = TemplateState::Down { retry_at: Instant::now() + delay };
                error!("cannot start the template of generation {generation}: {e}");
                return Err(e);
            }
        };
        if entry.pid.is_some() || entry.restarts > 0 || matches!(entry.state, TemplateState::Down { .. }) {
            entry.restarts += 1;
        }
        info!("started template {} for generation {generation}", s.pid);
        // SAFETY: the channel is deleted from the poller before it is
        // dropped (`drop_template`).
        let added = unsafe {
            self.poller.add_with_mode(
                s.channel.as_raw_fd(),
                Event::readable(TEMPLATE_BASE + generation as usize),
                PollMode::Level,
            )
        };
        if let Err(e) = added {
            let _ = kill(s.pid, Signal::SIGKILL);
            return Err(format!("cannot watch the template's channel: {e}"));
        }
        entry.pid = Some(s.pid);
        entry.channel = Some(s.channel);
        entry.channel_lost = None;
        entry.state = TemplateState::Starting;
        Ok(())
    }

    /// Forks a worker of `order` from its generation's ready template.
    pub(super) fn fork_worker(&mut self, order: SpawnOrder) -> io::Result<WorkerIo> {
        let (_, config) = self.code_of(order.generation);
        let worker_env = self.worker_env(order.generation, order.max_requests, config);
        let max_message = wire::max_message(&config.limits);
        let Some(template) = self.templates.by_generation.get(&order.generation) else {
            return Err(io::Error::other("no template"));
        };
        let Some(channel) = &template.channel else {
            // It closed its channel and lives on: broken.
            self.template_down(order.generation, "it closed its channel");
            return Err(io::Error::other("the template closed its channel"));
        };
        match fork_from_template(channel.as_fd(), &worker_env, FORK_ANSWER_WITHIN) {
            Ok(s) => {
                Ok(WorkerIo { pid: s.pid, channel: Some(s.channel), scoreboard: s.scoreboard, max_message })
            }
            Err(e) => {
                // A template that will not fork (threads) says so and stays;
                // one that does not answer is broken: started again.
                if e.kind() != io::ErrorKind::Other {
                    self.template_down(order.generation, &format!("it failed a fork ({e})"));
                }
                Err(e)
            }
        }
    }

    /// The template of `generation` said something on its channel.
    pub(super) fn on_template_readable(&mut self, generation: u64) {
        let Some(t) = self.templates.by_generation.get_mut(&generation) else { return };
        let Some(channel) = &t.channel else { return };
        let mut buf = [0u8; 4096];
        let what = match wire::recv_fds(channel.as_fd(), &mut buf, 0) {
            Ok(Some((n, _))) => match FromTemplate::decode(&buf[..n]) {
                Ok(FromTemplate::Ready { .. }) if t.state == TemplateState::Starting => {
                    t.state = TemplateState::Ready;
                    t.backoff = Backoff::default();
                    info!("template {} of generation {generation} ready", t.pid.map_or(0, Pid::as_raw));
                    return;
                }
                Ok(other) => format!("it sent {other:?} unasked"),
                Err(e) => e.to_string(),
            },
            Ok(None) => {
                // It is exiting: how it ended (its reaping) says why, and
                // then it is started again.
                if let Some(ch) = t.channel.take() {
                    let _ = self.poller.delete(&ch);
                }
                t.channel_lost = Some(Instant::now());
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => e.to_string(),
        };
        self.template_down(generation, &what);
    }

    /// The template of `generation` is gone or broken: killed if need be,
    /// and started again later; its workers keep serving. One of a reload
    /// that never got ready abandons that reload.
    pub(super) fn template_down(&mut self, generation: u64, why: &str) {
        let Some(t) = self.templates.by_generation.get_mut(&generation) else { return };
        let was_ready = t.state == TemplateState::Ready;
        if let Some(ch) = t.channel.take() {
            let _ = self.poller.delete(&ch);
        }
        if let Some(pid) = t.pid.take() {
            let _ = kill(pid, Signal::SIGKILL);
            self.templates.leaving.push(pid);
        }
        let delay = t.backoff.on_spawn_failure();
        t.state = TemplateState::Down { retry_at: Instant::now() + delay };
        warn!("the template of generation {generation} is gone ({why}); its workers keep serving; next start in {delay:?}");
        if !was_ready {
            self.core.generation_failed(generation, &format!("its template failed: {why}"), Instant::now());
        }
    }

    /// A reaped child that was a template.
    pub(super) fn template_exited(&mut self, pid: Pid, how: &str) -> bool {
        if let Some(i) = self.templates.leaving.iter().position(|p| *p == pid) {
            self.templates.leaving.swap_remove(i);
            return true;
        }
        let found = self.templates.by_generation.iter().find(|(_, t)| t.pid == Some(pid)).map(|(g, _)| *g);
        let Some(generation) = found else { return false };
        if let Some(t) = self.templates.by_generation.get_mut(&generation) {
            // Reaped already: nothing to kill.
            t.pid = None;
        }
        self.template_down(generation, &format!("it {how}"));
        true
    }

    /// Kills templates that closed their channel and linger.
    pub(super) fn check_templates(&mut self, now: Instant) {
        let grace = self.config.kill_grace;
        for t in self.templates.by_generation.values_mut() {
            if let (Some(pid), Some(at)) = (t.pid, t.channel_lost) {
                if now.duration_since(at) >= grace {
                    warn!("template {pid} closed its channel but did not exit; killing it");
                    let _ = kill(pid, Signal::SIGKILL);
                    t.channel_lost = None;
                }
            }
        }
    }

    /// Lets go of the templates of generations that no longer serve or start.
    pub(super) fn retire_templates(&mut self) {
        let serving = self.core.serving_generation();
        let reloading = self.core.reload().map(|r| r.generation);
        let stopping = self.core.stopping() != crate::core::Stopping::No;
        let over: Vec<u64> = self
            .templates
            .by_generation
            .keys()
            .copied()
            .filter(|&g| stopping || (g != serving && Some(g) != reloading))
            .collect();
        for generation in over {
            if let Some(t) = self.templates.by_generation.remove(&generation) {
                if let Some(ch) = &t.channel {
                    let _ = self.poller.delete(ch);
                }
                if let Some(pid) = t.pid {
                    // Its channel closing tells it to exit; one still loading
                    // may not be listening yet.
                    if t.state != TemplateState::Ready {
                        let _ = kill(pid, Signal::SIGTERM);
                    }
                    self.templates.leaving.push(pid);
                }
            }
        }
    }

    /// When to wake for a missing worker of the serving generation, due at
    /// `due`: not while its template loads (its Ready wakes the loop), and
    /// not before a template that died may be started again.
    pub(super) fn template_wake(&self, due: Instant) -> Option<Instant> {
        let serving = self.core.serving_generation();
        if self.config.spawn != crate::config::SpawnMode::Template {
            return Some(due);
        }
        match self.templates.by_generation.get(&serving).map(|t| t.state) {
            Some(TemplateState::Starting) => None,
            Some(TemplateState::Down { retry_at }) => Some(due.max(retry_at)),
            Some(TemplateState::Ready) | None => Some(due),
        }
    }

    /// The environment a worker (or the template) of `generation` starts with.
    pub(super) fn worker_env(&self, generation: u64, max_requests: u64, config: &crate::Config) -> WorkerEnv {
        WorkerEnv {
            supervisor_pid: std::process::id(),
            generation,
            limits: config.limits,
            io_timeout: config.io_timeout,
            max_requests,
            access_log: config.access_log.clone(),
            access_log_format: config.access_log_format,
            read_ahead: config.read_ahead,
            min_body_rate: config.min_body_rate,
        }
    }
}
