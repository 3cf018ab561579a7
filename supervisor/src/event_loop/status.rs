//! A snapshot of the supervisor's state for `monodon status`, read from its
//! own tables and the workers' scoreboards (no worker is asked anything).

use std::time::Instant;

use super::{ConnState, Stopping, Supervisor, WorkerState};
use crate::control::{ConnectionCounts, GenerationStatus, ReloadStatus, Status, WorkerCounts, WorkerStatus};
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
        let mut connections = ConnectionCounts { total: self.conns.len(), ..Default::default() };
        for (_, c) in &self.conns {
            match c.state {
                ConnState::Reading if c.pending.is_empty() => connections.idle += 1,
                ConnState::Reading => connections.reading_head += 1,
                ConnState::Queued => connections.queued += 1,
                ConnState::InWorker { .. } => connections.in_workers += 1,
                ConnState::Lingering => connections.lingering += 1,
            }
        }
        let mut workers =
            WorkerCounts { target: self.target_workers, total: self.workers.len(), ..Default::default() };
        let mut worker_list = Vec::with_capacity(self.workers.len());
        let mut live_requests = 0;
        for (_, w) in &self.workers {
            let slot = w.scoreboard.slot();
            let requests = slot.requests.load(std::sync::atomic::Ordering::Relaxed);
            live_requests += requests;
            let state = match (w.retiring, w.state) {
                (Some(_), _) => "retiring",
                (None, WorkerState::Starting) => "starting",
                (None, WorkerState::Idle) => "idle",
                (None, WorkerState::Busy(_)) => "busy",
            };
            match state {
                "retiring" => workers.retiring += 1,
                "starting" => workers.starting += 1,
                "idle" => workers.idle += 1,
                _ => workers.busy += 1,
            }
            let (request, request_secs, response_started) = match w.state {
                WorkerState::Busy(ckey) => {
                    let started = match self.conns.get(ckey).map(|c| c.state) {
                        Some(ConnState::InWorker { written_before, .. }) => {
                            self.conns.get(ckey).map(|c| slot.wrote_on(c.id, written_before))
                        }
                        _ => None,
                    };
                    let secs = slot.request_age_ms().map(|ms| ms as f64 / 1000.0);
                    let request = slot.current_request().unwrap_or_else(|| "(not started yet)".to_owned());
                    (Some(request), secs, started)
                }
                _ => (None, None, None),
            };
            let mem = if detail { smaps(w.pid.as_raw()) } else { None };
            worker_list.push(WorkerStatus {
                pid: w.pid.as_raw() as u32,
                generation: w.generation,
                state: state.to_owned(),
                requests,
                age_secs: now.duration_since(w.started).as_secs_f64(),
                rss_kib: rss_kib(w.pid.as_raw()),
                retiring_because: w.retiring.map(|r| r.as_str().to_owned()),
                private_kib: mem.map(|m| m.0),
                shared_kib: mem.map(|m| m.1),
                request,
                request_secs,
                response_started,
            });
        }
        worker_list.sort_by_key(|w| (w.generation, w.pid));
        let mut totals = self.totals.clone();
        totals.requests += live_requests;
        let reload = ReloadStatus {
            state: if self.stopping != Stopping::No {
                "stopping"
            } else if self.reload.is_some() {
                "reloading"
            } else {
                "idle"
            }
            .to_owned(),
            generation: self.reload.as_ref().map(|r| r.generation),
            for_secs: self.reload.as_ref().map(|r| now.duration_since(r.started).as_secs_f64()),
            last_failure: self.last_reload_failure.as_ref().map(|(why, _)| why.clone()),
            last_failure_ago_secs: self
                .last_reload_failure
                .as_ref()
                .map(|(_, at)| now.duration_since(*at).as_secs_f64()),
        };
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            uptime_secs: now.duration_since(self.started).as_secs_f64(),
            generation: self.serving_generation,
            listeners: self.listeners.iter().map(|l| l.addr.to_string()).collect(),
            control: self.control.as_ref().map(|c| c.path.display().to_string()).unwrap_or_default(),
            reload,
            connections,
            workers,
            totals,
            requests_per_sec: self.requests_per_sec,
            generations: if detail {
                std::iter::once(generation_status(self.serving_generation, true, &self.serving_code))
                    .chain(self.reload.iter().map(|r| generation_status(r.generation, false, &r.code)))
                    .collect()
            } else {
                Vec::new()
            },
            worker_list,
        }
    }

    /// Requests completed, by live and departed workers.
    pub(super) fn total_requests(&self) -> u64 {
        let live: u64 = self
            .workers
            .iter()
            .map(|(_, w)| w.scoreboard.slot().requests.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        self.totals.requests + live
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
