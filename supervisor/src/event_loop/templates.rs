//! Templates in the shell: the process and channel of each generation's
//! template (the core keeps its lifecycle: `core::templates`). Starting one
//! from its generation's command, reading its TemplateReady, asking it to
//! fork a worker, noticing that it died, and letting it go.
//!
//! Its workers are not its children: the supervisor is a child subreaper,
//! and the template forks twice.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{info, warn};
use monodon_proto::template::FromTemplate;
use monodon_proto::wire;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use polling::{Event, PollMode};

use super::{Supervisor, WorkerIo, TEMPLATE_BASE};
use crate::core::SpawnOrder;
use crate::spawn::{fork_from_template, spawn_template, WorkerSpec};

/// How long a fork request may take before the template is taken for broken.
const FORK_ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// A generation's template process.
pub(super) struct TemplateIo {
    pub pid: Pid,
    /// The supervisor's end of its channel (`None` once it closed its end).
    channel: Option<OwnedFd>,
    /// When it closed its end (it should be exiting; killed if it lingers).
    channel_lost: Option<Instant>,
}

/// The template processes, by generation.
#[derive(Default)]
pub(super) struct Templates {
    pub by_generation: BTreeMap<u64, TemplateIo>,
    /// Templates let go or killed, until reaped.
    leaving: Vec<Pid>,
}

impl Supervisor {
    /// Starts the template of `generation` from its command (a `StartTemplate` order).
    pub(super) fn start_template(&mut self, generation: u64) {
        let now = Instant::now();
        let (code, config) = self.code_of(generation);
        let spec = WorkerSpec { code, env: self.worker_env(generation, 0, config) };
        let s = match spawn_template(&spec) {
            Ok(s) => s,
            Err(e) => return self.core.template_down(generation, &format!("cannot start it: {e}"), now),
        };
        info!("started template {} for generation {generation}", s.pid);
        // SAFETY: the channel is deleted from the poller before it is
        // dropped (`drop_template`, `on_template_readable`).
        let added = unsafe {
            self.poller.add_with_mode(
                s.channel.as_raw_fd(),
                Event::readable(TEMPLATE_BASE + generation as usize),
                PollMode::Level,
            )
        };
        self.templates
            .by_generation
            .insert(generation, TemplateIo { pid: s.pid, channel: Some(s.channel), channel_lost: None });
        self.core.template_started(generation);
        if let Err(e) = added {
            self.template_broken(generation, &format!("cannot watch its channel: {e}"));
        }
    }

    /// Forks a worker of `order` from its generation's ready template.
    pub(super) fn fork_worker(&mut self, order: SpawnOrder) -> io::Result<WorkerIo> {
        let (_, config) = self.code_of(order.generation);
        let worker_env = self.worker_env(order.generation, order.max_requests, config);
        let max_message = wire::max_message(&config.limits);
        let channel = self.templates.by_generation.get(&order.generation).and_then(|t| t.channel.as_ref());
        let Some(channel) = channel else {
            self.template_broken(order.generation, "its channel is closed");
            return Err(io::Error::other("the template's channel is closed"));
        };
        match fork_from_template(channel.as_fd(), &worker_env, FORK_ANSWER_WITHIN) {
            Ok(s) => {
                Ok(WorkerIo { pid: s.pid, channel: Some(s.channel), scoreboard: s.scoreboard, max_message })
            }
            Err(e) => {
                // One that will not fork (threads) says so and stays; one
                // that does not answer is broken: started again.
                if e.kind() != io::ErrorKind::Other {
                    self.template_broken(order.generation, &format!("a fork failed: {e}"));
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
                Ok(FromTemplate::Ready { .. }) => {
                    info!("template {} of generation {generation} ready", t.pid);
                    self.core.template_ready(generation);
                    return;
                }
                Ok(other) => format!("it sent {other:?} unasked"),
                Err(e) => e.to_string(),
            },
            Ok(None) => {
                // It is exiting: its reaping says how, and the core hears
                // of it then.
                if let Some(ch) = t.channel.take() {
                    let _ = self.poller.delete(&ch);
                }
                t.channel_lost = Some(Instant::now());
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => e.to_string(),
        };
        self.template_broken(generation, &what);
    }

    /// The template broke the protocol or stopped answering: it is killed,
    /// and the core told.
    fn template_broken(&mut self, generation: u64, why: &str) {
        self.drop_template(generation, Signal::SIGKILL);
        self.core.template_down(generation, why, Instant::now());
    }

    /// Closes a template's channel, signals it, and waits for its exit.
    pub(super) fn drop_template(&mut self, generation: u64, signal: Signal) {
        if let Some(t) = self.templates.by_generation.remove(&generation) {
            if let Some(ch) = &t.channel {
                let _ = self.poller.delete(ch);
            }
            let _ = kill(t.pid, signal);
            self.templates.leaving.push(t.pid);
        }
    }

    /// A reaped child that was a template: true if it was one.
    pub(super) fn template_exited(&mut self, pid: Pid, how: &str) -> bool {
        if let Some(i) = self.templates.leaving.iter().position(|p| *p == pid) {
            self.templates.leaving.swap_remove(i);
            return true;
        }
        let found = self.templates.by_generation.iter().find(|(_, t)| t.pid == pid).map(|(g, _)| *g);
        let Some(generation) = found else { return false };
        if let Some(t) = self.templates.by_generation.remove(&generation) {
            if let Some(ch) = &t.channel {
                let _ = self.poller.delete(ch);
            }
        }
        self.core.template_down(generation, &format!("it {how}"), Instant::now());
        true
    }

    /// Kills templates that closed their channel and linger.
    pub(super) fn check_templates(&mut self, now: Instant) {
        let grace = self.config.kill_grace;
        for t in self.templates.by_generation.values_mut() {
            if t.channel_lost.is_some_and(|at| now.duration_since(at) >= grace) {
                warn!("template {} closed its channel but did not exit; killing it", t.pid);
                let _ = kill(t.pid, Signal::SIGKILL);
                t.channel_lost = None;
            }
        }
    }

    /// Lets every template go (the supervisor is exiting).
    pub(super) fn drop_all_templates(&mut self) {
        let all: Vec<u64> = self.templates.by_generation.keys().copied().collect();
        for generation in all {
            self.drop_template(generation, Signal::SIGTERM);
        }
    }
}
