//! `monodon top`: a live view of a running supervisor, refreshed from its
//! control socket. [`screen`] draws one frame from a status document (pure,
//! unit-tested); [`run`] is the terminal around it (crossterm: raw mode, the
//! alternate screen, keys).

use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::{cursor, execute, queue, style, terminal};
use monodon_supervisor::control::{Command, Response, Status, WorkerStatus};

use crate::ctl::{duration, size_kib};

/// What the worker table is ordered by (`s` steps through them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// Generation, then pid: the order of `monodon status`.
    Pid,
    Requests,
    Age,
    Memory,
    /// Busy first, then starting, retiring, idle.
    State,
}

impl SortKey {
    fn next(self) -> SortKey {
        match self {
            SortKey::Pid => SortKey::Requests,
            SortKey::Requests => SortKey::Age,
            SortKey::Age => SortKey::Memory,
            SortKey::Memory => SortKey::State,
            SortKey::State => SortKey::Pid,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SortKey::Pid => "pid",
            SortKey::Requests => "requests",
            SortKey::Age => "age",
            SortKey::Memory => "memory",
            SortKey::State => "state",
        }
    }
}

/// How the user has set up the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub sort: SortKey,
    pub reverse: bool,
}

impl Default for View {
    fn default() -> Self {
        View { sort: SortKey::Pid, reverse: false }
    }
}

/// What a key does.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Quit,
    Refresh,
    Changed,
    Nothing,
}

impl View {
    fn on_key(&mut self, key: KeyEvent) -> Key {
        if key.kind == KeyEventKind::Release {
            return Key::Nothing;
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => Key::Quit,
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
            KeyCode::Char('s') => {
                self.sort = self.sort.next();
                Key::Changed
            }
            KeyCode::Char('r') => {
                self.reverse = !self.reverse;
                Key::Changed
            }
            KeyCode::Char(' ') => Key::Refresh,
            _ => Key::Nothing,
        }
    }

    /// The workers in this view's order.
    fn order<'a>(&self, workers: &'a [WorkerStatus]) -> Vec<&'a WorkerStatus> {
        let mut list: Vec<&WorkerStatus> = workers.iter().collect();
        let state_rank = |w: &WorkerStatus| match w.state.as_str() {
            "busy" => 0,
            "starting" => 1,
            "retiring" => 2,
            _ => 3,
        };
        match self.sort {
            SortKey::Pid => list.sort_by_key(|w| (w.generation, w.pid)),
            SortKey::Requests => list.sort_by_key(|w| (std::cmp::Reverse(w.requests), w.pid)),
            SortKey::Age => list.sort_by(|a, b| b.age_secs.total_cmp(&a.age_secs).then(a.pid.cmp(&b.pid))),
            SortKey::Memory => list.sort_by_key(|w| (std::cmp::Reverse(w.private_kib), w.pid)),
            SortKey::State => list.sort_by_key(|w| (state_rank(w), w.pid)),
        }
        if self.reverse {
            list.reverse();
        }
        list
    }
}

/// One frame, `width` columns by `height` rows at most: the supervisor's
/// state (or why it cannot be read), the workers, the keys.
pub fn screen(status: Result<&Status, &str>, view: &View, width: usize, height: usize) -> Vec<String> {
    let mut lines = Vec::new();
    match status {
        Err(e) => lines.push(format!("monodon top: {e}")),
        Ok(s) => {
            lines.push(format!(
                "monodon {}  pid {}  up {}  generation {}  {:.0} req/s  {} requests",
                s.version,
                s.pid,
                duration(s.uptime_secs),
                s.generation,
                s.requests_per_sec,
                s.totals.requests
            ));
            let c = &s.connections;
            lines.push(format!(
                "connections {}: {} idle, {} reading, {} queued, {} in workers, {} warm, {} closing",
                c.total, c.idle, c.reading_head, c.queued, c.in_workers, c.warm, c.lingering
            ));
            let w = &s.workers;
            lines.push(format!(
                "workers {} (target {}): {} busy, {} idle, {} starting, {} retiring   reload: {}",
                w.total, w.target, w.busy, w.idle, w.starting, w.retiring, s.reload.state
            ));
            let classes: Vec<String> = s
                .totals
                .worker_responses
                .iter()
                .map(|(class, n)| {
                    let own = s.totals.supervisor_responses.get(class).copied().unwrap_or(0);
                    format!("{class} {}", n + own)
                })
                .collect();
            lines.push(format!("responses: {}", classes.join("  ")));
            lines.push(String::new());
            let arrow = if view.reverse { "^" } else { "v" };
            lines.push(format!(
                "{:>8} {:>4} {:<9} {:>8} {:>8} {:>8} {:>8} {:>7}  REQUEST   (sorted by {} {arrow})",
                "PID",
                "GEN",
                "STATE",
                "REQS",
                "AGE",
                "PRIVATE",
                "SHARED",
                "FOR",
                view.sort.name()
            ));
            // Room for the keys line at the bottom.
            let rows = height.saturating_sub(lines.len() + 1);
            let ordered = view.order(&s.worker_list);
            let shown = ordered.len().min(rows);
            for wk in &ordered[..shown] {
                let request = match (&wk.request, wk.response_started) {
                    (Some(r), Some(true)) => format!("{r} (responding)"),
                    (Some(r), _) => r.clone(),
                    (None, _) => "-".into(),
                };
                lines.push(format!(
                    "{:>8} {:>4} {:<9} {:>8} {:>8} {:>8} {:>8} {:>7}  {}",
                    wk.pid,
                    wk.generation,
                    wk.state,
                    wk.requests,
                    duration(wk.age_secs),
                    size_kib(wk.private_kib),
                    size_kib(wk.shared_kib),
                    wk.request_secs.map(duration).unwrap_or_else(|| "-".into()),
                    request
                ));
            }
            if shown < ordered.len() {
                if let Some(last) = lines.last_mut() {
                    *last = format!(
                        "... {} more workers (a taller terminal shows them)",
                        ordered.len() - shown + 1
                    );
                }
            }
        }
    }
    lines.truncate(height.saturating_sub(1));
    lines.push("q quit   s sort   r reverse   space refresh".into());
    for line in &mut lines {
        if let Some((cut, _)) = line.char_indices().nth(width) {
            line.truncate(cut);
        }
    }
    lines
}

/// Restores the terminal however `run` ends.
struct RawTerminal;

impl RawTerminal {
    fn enter() -> io::Result<RawTerminal> {
        terminal::enable_raw_mode()?;
        let guard = RawTerminal;
        execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(guard)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = execute!(io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

fn draw(lines: &[String]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    for (row, line) in lines.iter().enumerate() {
        let row = u16::try_from(row).unwrap_or(u16::MAX);
        queue!(
            out,
            cursor::MoveTo(0, row),
            style::Print(line),
            terminal::Clear(terminal::ClearType::UntilNewLine)
        )?;
    }
    queue!(out, terminal::Clear(terminal::ClearType::FromCursorDown))?;
    out.flush()
}

/// Fetches the status over `control`, for one frame.
fn fetch(control: &Path) -> Result<Status, String> {
    match crate::ctl::call(control, Command::Status, Duration::from_secs(5))? {
        Response { ok: true, status: Some(status), .. } => Ok(status),
        Response { error, .. } => Err(error.unwrap_or_else(|| "the supervisor sent no status".into())),
    }
}

/// The live view until the user quits; refreshed every `interval`, on a key,
/// and when the terminal is resized.
pub fn run(control: &Path, interval: Duration) -> io::Result<()> {
    use std::io::IsTerminal;
    if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
        return Err(io::Error::other("monodon top needs a terminal; `monodon status --json` is for scripts"));
    }
    // Each refresh costs the supervisor a status (and a smaps read per worker).
    let interval = interval.max(Duration::from_millis(100));
    let _terminal = RawTerminal::enter()?;
    let mut view = View::default();
    let mut status = fetch(control);
    let mut next_fetch = Instant::now() + interval;
    loop {
        let (width, height) = terminal::size()?;
        draw(&screen(status.as_ref().map_err(String::as_str), &view, width.into(), height.into()))?;
        let now = Instant::now();
        let refresh = if event::poll(next_fetch.saturating_duration_since(now))? {
            match event::read()? {
                Event::Key(key) => match view.on_key(key) {
                    Key::Quit => return Ok(()),
                    Key::Refresh => true,
                    Key::Changed | Key::Nothing => false,
                },
                _ => false,
            }
        } else {
            true
        };
        if refresh || Instant::now() >= next_fetch {
            status = fetch(control);
            next_fetch = Instant::now() + interval;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(pid: u32, state: &str, requests: u64, private_kib: u64) -> WorkerStatus {
        WorkerStatus {
            pid,
            generation: 1,
            state: state.into(),
            requests,
            age_secs: f64::from(pid),
            private_kib: Some(private_kib),
            ..Default::default()
        }
    }

    fn sample() -> Status {
        let mut s = Status { pid: 77, generation: 1, ..Default::default() };
        s.worker_list =
            vec![worker(10, "idle", 5, 900), worker(11, "busy", 50, 300), worker(12, "idle", 9, 2000)];
        s.worker_list[1].request = Some("GET /slow".into());
        s.workers.total = 3;
        s
    }

    fn pids(lines: &[String]) -> Vec<u32> {
        lines.iter().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect()
    }

    #[test]
    fn a_frame_shows_the_supervisor_and_each_worker() {
        let lines = screen(Ok(&sample()), &View::default(), 120, 40);
        assert!(lines[0].contains("pid 77") && lines[0].contains("generation 1"), "{lines:?}");
        assert_eq!(pids(&lines), [10, 11, 12]);
        assert!(lines.iter().any(|l| l.contains("busy") && l.ends_with("GET /slow")), "{lines:?}");
        assert!(lines.last().unwrap().starts_with("q quit"));
        let gone = screen(Err("no monodon supervisor at /x"), &View::default(), 120, 40);
        assert_eq!(gone[0], "monodon top: no monodon supervisor at /x");
    }

    #[test]
    fn keys_sort_and_reverse_the_workers() {
        let s = sample();
        let mut view = View::default();
        let press = |view: &mut View, c| view.on_key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE));
        assert_eq!(press(&mut view, 's'), Key::Changed);
        assert_eq!(pids(&screen(Ok(&s), &view, 120, 40)), [11, 12, 10], "by requests");
        press(&mut view, 's');
        assert_eq!(pids(&screen(Ok(&s), &view, 120, 40)), [12, 11, 10], "by age");
        press(&mut view, 's');
        assert_eq!(pids(&screen(Ok(&s), &view, 120, 40)), [12, 10, 11], "by memory");
        press(&mut view, 'r');
        assert_eq!(pids(&screen(Ok(&s), &view, 120, 40)), [11, 10, 12], "reversed");
        press(&mut view, 's');
        press(&mut view, 'r');
        assert_eq!(pids(&screen(Ok(&s), &view, 120, 40))[0], 11, "busy first");
        assert_eq!(press(&mut view, 'q'), Key::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(view.on_key(ctrl_c), Key::Quit);
    }

    #[test]
    fn a_small_terminal_gets_a_cut_frame() {
        let lines = screen(Ok(&sample()), &View::default(), 30, 9);
        assert!(lines.len() <= 9, "{lines:?}");
        assert!(lines.iter().all(|l| l.chars().count() <= 30), "{lines:?}");
        assert!(lines.iter().any(|l| l.starts_with("... 2 more workers")), "{lines:?}");
        assert!(lines.last().unwrap().starts_with("q quit"));
    }
}
