//! A snapshot of the supervisor's state for `monodon status`, read from its
//! own tables and the workers' scoreboards (no worker is asked anything).

use std::time::Instant;

use super::Supervisor;
use crate::config::SpawnMode;
use crate::control::{
    ConnectionCounts, GenerationStatus, ReloadStatus, StartTimes, Status, TemplateStatus, WorkerCounts,
    WorkerStatus,
};
use crate::core::{Activity, Place, Stopping, TemplateLife};
use crate::spawn::{Code, FileIdentity};

impl Supervisor {
    /// The whole status document, memory per worker included.
    pub(super) fn status(&self) -> Status {
        self.snapshot(true)
    }

    /// `detail`: read each worker's smaps_rollup (the kernel walks its
    /// mappings) and stat each generation's program: not for the periodic
    /// STATUS= line, which shows neither.
    fn snapshot(&self, detail: bool) -> Status {
        let now = Instant::now();
        let mut connections = ConnectionCounts { total: self.core.conn_count(), ..Default::default() };
        for (_, c) in self.core.conns() {
            match c.place {
                Place::Reading { .. } if c.io.pending.is_empty() => connections.idle += 1,
                Place::Reading { .. } => connections.reading_head += 1,
                Place::Queued => connections.queued += 1,
                Place::InWorker { .. } => connections.in_workers += 1,
                Place::Warm { .. } => connections.warm += 1,
                Place::Lingering { .. } => connections.lingering += 1,
            }
        }
        let mut workers = WorkerCounts {
            target: self.core.target_workers(),
            total: self.core.worker_count(),
            ..Default::default()
        };
        let mut worker_list = Vec::with_capacity(self.core.worker_count());
        let mut live_requests = 0;
        let mut live_accepted = 0;
        let mut responses = self.departed_responses;
        for (_, w) in self.core.workers() {
            let slot = w.io.scoreboard.slot();
            let requests = slot.requests.load(std::sync::atomic::Ordering::Relaxed);
            live_requests += requests;
            live_accepted += slot.accepted();
            responses.merge(&slot.responses());
            // A worker on a connection it accepted itself is idle to the
            // core until it is asked for; its scoreboard says.
            let own = matches!(w.activity, Activity::Own { .. })
                || (w.activity == Activity::Idle && slot.request_age_ms().is_some());
            let state = match (w.retiring(), w.activity) {
                (Some(_), _) => "retiring",
                (None, Activity::Starting) => "starting",
                (None, Activity::Idle) if !own => "idle",
                (None, _) => "busy",
            };
            if own {
                // Its connection is in the worker, not in our table.
                connections.in_workers += 1;
                connections.total += 1;
            }
            match state {
                "retiring" => workers.retiring += 1,
                "starting" => workers.starting += 1,
                "idle" => workers.idle += 1,
                _ => workers.busy += 1,
            }
            let (request, request_secs, response_started) = match w.current() {
                Some(ckey) => {
                    let started = self
                        .core
                        .conn(ckey)
                        .filter(|c| matches!(c.place, Place::InWorker { .. }))
                        .map(|c| slot.wrote_on(c.id, c.io.written_before));
                    let secs = slot.request_age_ms().map(|ms| ms as f64 / 1000.0);
                    let request = slot.current_request().unwrap_or_else(|| "(not started yet)".to_owned());
                    (Some(request), secs, started)
                }
                None if own => {
                    let secs = slot.request_age_ms().map(|ms| ms as f64 / 1000.0);
                    let base = slot.conn_written_base.load(std::sync::atomic::Ordering::Relaxed);
                    (slot.current_request(), secs, Some(slot.written() != base))
                }
                None => (None, None, None),
            };
            let pid = w.io.pid.map_or(0, |p| p.as_raw());
            let mem = if detail && pid > 0 { smaps(pid) } else { None };
            worker_list.push(WorkerStatus {
                pid: pid as u32,
                generation: w.generation,
                state: state.to_owned(),
                requests,
                age_secs: now.duration_since(w.started).as_secs_f64(),
                rss_kib: if pid > 0 { rss_kib(pid) } else { None },
                retiring_because: w.retiring().map(|r| r.as_str().to_owned()),
                private_kib: mem.map(|m| m.0),
                shared_kib: mem.map(|m| m.1),
                request,
                request_secs,
                response_started,
                ahead: w.ahead().len(),
                warm: w.warm.len(),
            });
        }
        worker_list.sort_by_key(|w| (w.generation, w.pid));
        let mut totals = self.core.totals().clone();
        totals.requests += live_requests;
        totals.accepted_by_workers += live_accepted;
        totals.accepted += totals.accepted_by_workers;
        totals.worker_responses = crate::control::by_class(&responses.by_class);
        totals.supervisor_responses = crate::control::by_class(&self.own_responses.by_class);
        totals.request_duration = (&responses.durations).into();
        totals.queue_wait = self.core.queue_wait().into();
        let reload_started = self.core.reload().map(|r| r.started);
        let last_failure = self.core.last_reload_failure();
        let reload = ReloadStatus {
            state: if self.core.stopping() != Stopping::No {
                "stopping"
            } else if self.core.reload().is_some() {
                "reloading"
            } else {
                "idle"
            }
            .to_owned(),
            generation: self.core.reload().map(|r| r.generation),
            for_secs: reload_started.map(|at| now.duration_since(at).as_secs_f64()),
            last_failure: last_failure.map(|(why, _)| why.clone()),
            last_failure_ago_secs: last_failure.map(|(_, at)| now.duration_since(*at).as_secs_f64()),
        };
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: now.duration_since(self.started).as_secs_f64(),
            generation: self.core.serving_generation(),
            listeners: self.listeners.iter().map(|l| l.addr.to_string()).collect(),
            control: self.control.as_ref().map(|c| c.path.display().to_string()).unwrap_or_default(),
            metrics: self.metrics.as_ref().map(|m| m.addr()),
            reload,
            connections,
            workers,
            totals,
            requests_per_sec: self.requests_per_sec,
            generations: if detail {
                std::iter::once((self.core.serving_generation(), true, &self.serving_code, &self.config))
                    .chain(self.reload_code.iter().map(|r| (r.generation, false, &r.code, &r.config)))
                    .map(|(generation, serving, code, config)| {
                        let mut g = generation_status(generation, serving, code);
                        g.spawn = match config.spawn {
                            SpawnMode::Template => "template",
                            SpawnMode::Exec => "exec",
                        }
                        .to_owned();
                        g.template = self.core.template(generation).map(|t| TemplateStatus {
                            pid: self
                                .templates
                                .by_generation
                                .get(&generation)
                                .map(|io| io.pid.as_raw() as u32),
                            state: match t.life {
                                TemplateLife::Starting => "starting",
                                TemplateLife::Ready => "ready",
                                TemplateLife::Down { .. } => "down",
                            }
                            .to_owned(),
                            restarts: t.restarts,
                        });
                        g.limits_held = self.core.limits_held(generation);
                        g
                    })
                    .collect()
            } else {
                Vec::new()
            },
            worker_start: start_times(self.core.start_times()),
            worker_list,
        }
    }

    /// Requests completed, by live and departed workers.
    pub(super) fn total_requests(&self) -> u64 {
        let live: u64 = self.core.workers().map(|(_, w)| w.io.requests()).sum();
        self.core.totals().requests + live
    }

    /// A one-line summary for systemd's `STATUS=`.
    pub(super) fn status_line(&self) -> String {
        let s = self.snapshot(false);
        format!(
            "generation {}: {}/{} workers busy, {} connections ({} idle, {} queued), {:.0} req/s, {} requests",
            s.generation,
            s.workers.busy,
            s.workers.total,
            s.connections.total,
            s.connections.idle,
            s.connections.queued,
            s.requests_per_sec,
            s.totals.requests
        )
    }
}

/// The median and 99th percentile of worker start times.
fn start_times(times: impl Iterator<Item = std::time::Duration>) -> StartTimes {
    let mut ms: Vec<f64> = times.map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms.get(((ms.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    StartTimes { samples: ms.len(), p50_ms: at(0.5), p99_ms: at(0.99) }
}

/// What a generation runs, as the status shows it.
fn generation_status(generation: u64, serving: bool, code: &Code) -> GenerationStatus {
    let program = code.command.first().map(std::path::Path::new);
    let now = program.and_then(FileIdentity::of);
    GenerationStatus {
        generation,
        serving,
        command: code.command.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
        dir: code.dir.as_ref().map(|d| d.display().to_string()),
        program_inode: code.program.map(|p| p.inode),
        program_mtime_secs: code.program.map(|p| p.mtime_secs),
        program_changed: code.program.is_some() && now != code.program,
        spawn: String::new(),
        template: None,
        limits_held: false,
    }
}

/// (private, shared) memory of a process in KiB, from smaps_rollup.
pub(super) fn smaps(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let (mut private, mut shared) = (0, 0);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(kib)) = (words.next(), words.next().and_then(|v| v.parse::<u64>().ok())) else {
            continue;
        };
        match name {
            "Private_Clean:" | "Private_Dirty:" => private += kib,
            "Shared_Clean:" | "Shared_Dirty:" => shared += kib,
            _ => {}
        }
    }
    Some((private, shared))
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    Some(pages * page / 1024)
}
