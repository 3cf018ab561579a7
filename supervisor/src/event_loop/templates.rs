//! Templates in the shell: the process and channel of each generation's
//! template (the core keeps its lifecycle: `core::templates`). Starting one
//! from its generation's command, reading its TemplateReady, asking it to
//! fork a worker, noticing that it died, and letting it go.
//!
//! A fork is asked for and answered asynchronously, so the loop never waits
//! for one: the worker is the core's from the request on, without a pid
//! until the template's Forked (or the worker's own Ready) names it. The
//! answers come in the order of the requests (`TemplateIo::pending`).
//!
//! Its workers are not its children: the supervisor is a child subreaper,
//! and the template forks twice.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::poll::{Event, PollMode};
use log::{error, info, warn};
use monodon_proto::template::FromTemplate;
use monodon_proto::wire;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Supervisor, WorkerIo, TEMPLATE_BASE};
use crate::core::{SpawnOrder, WorkerKey};
use crate::spawn::{send_fork, spawn_template, WorkerSpec};

/// How long a fork's answer may take before the template is taken for broken.
const FORK_ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// A generation's template process.
pub(super) struct TemplateIo {
    pub pid: Pid,
    /// The supervisor's end of its channel (`None` once it closed its end).
    channel: Option<OwnedFd>,
    /// When it closed its end (it should be exiting; killed if it lingers).
    channel_lost: Option<Instant>,
    /// The forks asked for and not answered yet, oldest first, with when:
    /// the worker each is for (`None`: that worker has gone meanwhile).
    pending: VecDeque<(Option<WorkerKey>, Instant)>,
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
        let spec = WorkerSpec {
            code,
            env: self.worker_env(generation, 0, config),
            listeners: self.listeners_for(config),
        };
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
        self.templates.by_generation.insert(
            generation,
            TemplateIo { pid: s.pid, channel: Some(s.channel), channel_lost: None, pending: VecDeque::new() },
        );
        self.core.template_started(generation);
        if let Err(e) = added {
            self.template_broken(generation, &format!("cannot watch its channel: {e}"));
        }
    }

    /// Asks its generation's ready template to fork a worker of `order`;
    /// the worker has no pid until the answer comes.
    pub(super) fn fork_worker(&mut self, order: SpawnOrder) -> io::Result<WorkerIo> {
        let board = self.spare_boards.take()?;
        let (_, config) = self.code_of(order.generation);
        let worker_env = self.worker_env(order.generation, order.max_requests, config);
        let max_message = wire::max_message(&config.limits);
        let channel = self.templates.by_generation.get(&order.generation).and_then(|t| t.channel.as_ref());
        let Some(channel) = channel else {
            self.template_broken(order.generation, "its channel is closed");
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the template's channel is closed"));
        };
        match send_fork(channel.as_fd(), &worker_env, board) {
            Ok((ours, scoreboard)) => Ok(WorkerIo {
                pid: None,
                pending_signal: None,
                channel: Some(ours),
                scoreboard,
                max_message,
                parsed: None,
                vault: None,
                adopted_own: 0,
            }),
            Err(e) => {
                self.template_broken(order.generation, &format!("a fork request failed: {e}"));
                Err(io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))
            }
        }
    }

    /// The fork asked for worker `key` waits for its answer.
    pub(super) fn fork_pending(&mut self, generation: u64, key: WorkerKey) {
        if let Some(t) = self.templates.by_generation.get_mut(&generation) {
            t.pending.push_back((Some(key), Instant::now()));
        }
    }

    /// Worker `key` has gone: an answer still due for it names nobody.
    pub(super) fn forget_fork(&mut self, key: WorkerKey) {
        for t in self.templates.by_generation.values_mut() {
            for (k, _) in t.pending.iter_mut().filter(|(k, _)| *k == Some(key)) {
                *k = None;
            }
        }
    }

    /// The template forked the oldest pending worker as `pid`, or would not.
    fn fork_answered(&mut self, generation: u64, answer: Result<Pid, String>) {
        let Some((key, _)) =
            self.templates.by_generation.get_mut(&generation).and_then(|t| t.pending.pop_front())
        else {
            return self.template_broken(generation, "it answered a fork nobody asked for");
        };
        match (key, answer) {
            (Some(key), Ok(pid)) => {
                let Some(w) = self.core.worker_io_mut(key) else { return };
                match w.pid {
                    None => {
                        info!("spawned worker {pid} (forked, generation {generation})");
                        w.named(pid);
                    }
                    Some(known) if known != pid => warn!("template named worker {known} as {pid}"),
                    Some(_) => {}
                }
                // It may have died already, before it was named.
                if let Some(how) = self.unclaimed_exits.remove(&pid) {
                    self.on_worker_exit(key, how);
                }
            }
            (Some(key), Err(reason)) => {
                error!("the template of generation {generation} would not fork: {reason}");
                self.on_worker_exit(key, format!("was not forked ({reason})"));
            }
            // Its worker went away meanwhile (its channel closed): nobody
            // serves through this one.
            (None, Ok(pid)) => {
                if self.unclaimed_exits.remove(&pid).is_none() {
                    let _ = kill(pid, Signal::SIGKILL);
                }
            }
            (None, Err(_)) => {}
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
                Ok(FromTemplate::Forked { pid }) => match i32::try_from(pid) {
                    Ok(raw) if raw > 0 => return self.fork_answered(generation, Ok(Pid::from_raw(raw))),
                    _ => format!("it named an impossible pid {pid}"),
                },
                Ok(FromTemplate::ForkFailed { reason }) => {
                    let reason = reason.to_owned();
                    return self.fork_answered(generation, Err(reason));
                }
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

    /// Kills templates that closed their channel and linger, and takes down
    /// those that leave a fork unanswered.
    pub(super) fn check_templates(&mut self, now: Instant) {
        let grace = self.config.kill_grace;
        let mut silent = Vec::new();
        for (&generation, t) in self.templates.by_generation.iter_mut() {
            if t.channel_lost.is_some_and(|at| now.duration_since(at) >= grace) {
                warn!("template {} closed its channel but did not exit; killing it", t.pid);
                let _ = kill(t.pid, Signal::SIGKILL);
                t.channel_lost = None;
            }
            if t.pending.front().is_some_and(|(_, at)| now.duration_since(*at) >= FORK_ANSWER_WITHIN) {
                silent.push(generation);
            }
        }
        for generation in silent {
            self.template_broken(generation, &format!("no answer to a fork within {FORK_ANSWER_WITHIN:?}"));
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
