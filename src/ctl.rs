//! The control CLI: `monodon status|reload|stop|scale`, a client of the
//! supervisor's control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use monodon_supervisor::control::{self, Command, Request, Response, Status};

/// Sends one request and reads the answer. Errors are worded for the operator.
pub fn call(path: &Path, command: Command, timeout: Duration) -> Result<Response, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "no monodon supervisor at {} ({e}); is it running? pass --control PATH or the --listen it serves",
            path.display()
        ),
        std::io::ErrorKind::PermissionDenied => {
            format!("permission denied on {}: run as the supervisor's user or root", path.display())
        }
        _ => format!("cannot connect to {}: {e}", path.display()),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut line =
        serde_json::to_vec(&Request { protocol: control::PROTOCOL, command }).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| format!("sending to {}: {e}", path.display()))?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(|e| format!("waiting for the supervisor: {e}"))?;
    if answer.is_empty() {
        return Err("the supervisor closed the connection without answering".into());
    }
    let response: Response = serde_json::from_str(&answer)
        .map_err(|e| format!("unexpected answer from the supervisor ({e}): {}", answer.trim()))?;
    if response.protocol != control::PROTOCOL {
        return Err(format!(
            "protocol version mismatch: the supervisor speaks {}, this monodon {}",
            response.protocol,
            control::PROTOCOL
        ));
    }
    Ok(response)
}

/// Prints the outcome of a simple command; the exit status follows it.
pub fn report(result: Result<Response, String>) -> ExitCode {
    match result {
        Ok(Response { ok: true, message, .. }) => {
            if let Some(m) = message {
                print(&format!("{m}\n"));
            }
            ExitCode::SUCCESS
        }
        Ok(Response { error, .. }) => {
            eprintln!("error: {}", error.unwrap_or_else(|| "failed".into()));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

/// Waits until nothing answers on the control socket any more.
pub fn wait_gone(path: &PathBuf, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if UnixStream::connect(path).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `1h02m`, `5m02s`, `12.3s`.
pub(crate) fn duration(secs: f64) -> String {
    let s = secs as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{secs:.1}s")
    }
}

pub(crate) fn size_kib(kib: Option<u64>) -> String {
    match kib {
        None => "-".into(),
        Some(k) if k >= 1024 * 1024 => format!("{:.1}G", k as f64 / 1024.0 / 1024.0),
        Some(k) if k >= 1024 => format!("{:.1}M", k as f64 / 1024.0),
        Some(k) => format!("{k}K"),
    }
}

/// The human form of `monodon status`.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let push = |out: &mut String, line: String| {
        out.push_str(&line);
        out.push('\n');
    };
    push(
        &mut out,
        format!(
            "monodon {}  pid {}  up {}  generation {}  listening on {}",
            s.version,
            s.pid,
            duration(s.uptime_secs),
            s.generation,
            s.listeners.join(", ")
        ),
    );
    let mut reload = s.reload.state.clone();
    if let (Some(g), Some(t)) = (s.reload.generation, s.reload.for_secs) {
        reload = format!("{reload} (generation {g}, for {})", duration(t));
    }
    if let (Some(why), Some(ago)) = (&s.reload.last_failure, s.reload.last_failure_ago_secs) {
        reload = format!("{reload}; last failure {} ago: {why}", duration(ago));
    }
    push(&mut out, format!("reload: {reload}"));
    for g in &s.generations {
        let dir = g.dir.as_deref().map(|d| format!(" in {d}")).unwrap_or_default();
        let changed = match (g.program_changed, g.template.is_some()) {
            (false, _) => "",
            (true, true) => " (CHANGED on disk since it started; its template keeps the code it loaded)",
            (true, false) => " (CHANGED on disk since it started: new workers run the new file)",
        };
        let role = if g.serving { "serving" } else { "starting" };
        let template = match &g.template {
            Some(t) => {
                let pid = t.pid.map(|p| format!(" {p}")).unwrap_or_default();
                let restarts =
                    if t.restarts > 0 { format!(", restarted {} times", t.restarts) } else { String::new() };
                let degraded =
                    if t.state == "down" { "; DEGRADED: no new workers until it is back" } else { "" };
                format!("\n  template{pid} ({}{restarts}){degraded}", t.state)
            }
            None if g.spawn == "exec" => "\n  every worker exec'd (--spawn exec)".to_owned(),
            None => String::new(),
        };
        let held = if g.limits_held {
            "\n  no worker can be made: its workers serve on past their max-requests"
        } else {
            ""
        };
        push(
            &mut out,
            format!(
                "generation {} ({role}): {}{dir}{changed}{template}{held}",
                g.generation,
                g.command.join(" ")
            ),
        );
    }
    let c = &s.connections;
    push(
        &mut out,
        format!(
            "connections: {} total, {} idle, {} reading head, {} queued, {} in workers, {} warm, {} closing",
            c.total, c.idle, c.reading_head, c.queued, c.in_workers, c.warm, c.lingering
        ),
    );
    let w = &s.workers;
    push(
        &mut out,
        format!(
            "workers: {} (target {}): {} busy, {} idle, {} starting, {} retiring",
            w.total, w.target, w.busy, w.idle, w.starting, w.retiring
        ),
    );
    let t = &s.totals;
    push(
        &mut out,
        format!(
            "totals: {} accepted, {} requests ({:.0}/s now), {} reloads ({} failed), {} respawns, {} timeouts",
            t.accepted,
            t.requests,
            s.requests_per_sec,
            t.reloads,
            t.failed_reloads,
            t.respawns,
            t.timeouts
        ),
    );
    push(&mut out, String::new());
    push(
        &mut out,
        format!(
            "{:>8} {:>4} {:<9} {:>8} {:>8} {:>7} {:>7} {:>7}  REQUEST",
            "PID", "GEN", "STATE", "REQS", "AGE", "RSS", "PRIVATE", "FOR"
        ),
    );
    for wk in &s.worker_list {
        let request = match (&wk.request, wk.response_started) {
            (Some(r), Some(true)) => format!("{r} (responding)"),
            (Some(r), _) => r.clone(),
            (None, _) => "-".into(),
        };
        push(
            &mut out,
            format!(
                "{:>8} {:>4} {:<9} {:>8} {:>8} {:>7} {:>7} {:>7}  {}",
                wk.pid,
                wk.generation,
                wk.state,
                wk.requests,
                duration(wk.age_secs),
                size_kib(wk.rss_kib),
                size_kib(wk.private_kib),
                wk.request_secs.map(duration).unwrap_or_else(|| "-".into()),
                request
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(duration(3.21), "3.2s");
        assert_eq!(duration(302.0), "5m02s");
        assert_eq!(duration(3720.0), "1h02m");
        assert_eq!(size_kib(Some(3200)), "3.1M");
        assert_eq!(size_kib(None), "-");
    }

    #[test]
    fn the_table_has_a_row_per_worker() {
        let mut s = Status::default();
        s.worker_list.push(control::WorkerStatus {
            pid: 42,
            state: "busy".into(),
            request: Some("GET /x".into()),
            ..Default::default()
        });
        let text = render(&s);
        assert!(
            text.lines().any(|l| l.contains("42") && l.contains("busy") && l.contains("GET /x")),
            "{text}"
        );
    }
}
