//! `monodon top` in a real terminal: tmux runs it, `capture-pane` reads the
//! screen back, `send-keys` presses its keys.
//!
//! Needs `tmux`; without it the test says so and passes, unless `CI` is
//! set, where .ci/run installs it.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{eventually, Server};

/// A detached tmux session on a private server socket, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").args(["-L", &self.socket]).args(args).stdin(Stdio::null()).output().unwrap()
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }

    /// Polls the screen until `cond` holds; the last screen either way.
    fn wait_screen(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let ok = eventually(Duration::from_secs(15), || {
            last = self.screen();
            cond(&last)
        });
        assert!(ok, "{what}; the screen:\n{last}");
        last
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The pids in the worker table, top to bottom.
fn table_pids(screen: &str, candidates: &[u32]) -> Vec<u32> {
    screen
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|p| candidates.contains(p))
        .collect()
}

#[test]
fn top_shows_workers_live_and_answers_its_keys() {
    if !common::installed("tmux", "-V", "tmux") {
        return;
    }
    let server = Server::start(&["--app", "echo", "--workers", "3"], 3);
    let pids = server.children();
    // One worker busy with a request the view must name.
    let addr = server.addr;
    let slow = std::thread::spawn(move || {
        let mut c = common::Client::connect(addr);
        c.send(b"GET /?sleep_ms=4000 HTTP/1.1\r\nHost: x\r\n\r\n");
        c.response().map(|r| r.status)
    });
    let tmux = Tmux { socket: format!("monodon-top-{}", std::process::id()) };
    let command = format!(
        "{} top --interval 200ms --control {}",
        env!("CARGO_BIN_EXE_monodon"),
        server.control.display()
    );
    let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "150", "-y", "30", &command]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));

    let screen = tmux.wait_screen("every worker listed, one busy on the slow request", |s| {
        table_pids(s, &pids).len() == 3
            && s.lines().any(|l| l.contains("busy") && l.contains("GET /?sleep_ms=4000"))
    });
    assert!(screen.contains(&format!("pid {}", server.pid)), "{screen}");
    assert!(screen.contains("workers 3 (target 3)"), "{screen}");
    assert!(screen.contains("sorted by pid"), "{screen}");
    let mut by_pid = pids.clone();
    by_pid.sort();
    assert_eq!(table_pids(&screen, &pids), by_pid);

    // s: by requests; s s s: by state, which puts the busy worker first.
    tmux.run(&["send-keys", "-t", "top", "s"]);
    tmux.wait_screen("sorted by requests", |s| s.contains("sorted by requests"));
    tmux.run(&["send-keys", "-t", "top", "s", "s", "s"]);
    let screen = tmux.wait_screen("sorted by state", |s| s.contains("sorted by state"));
    let first = screen.lines().find(|l| table_pids(l, &pids).len() == 1).unwrap_or_default();
    assert!(first.contains("busy"), "the busy worker first:\n{screen}");

    // Live: the slow request ends, and the busy count goes back to 0.
    assert_eq!(slow.join().unwrap().unwrap(), 200);
    tmux.wait_screen("no worker busy", |s| s.contains(": 0 busy"));

    tmux.run(&["send-keys", "-t", "top", "q"]);
    assert!(eventually(Duration::from_secs(10), || !tmux.alive()), "q quits top");
}

#[test]
fn top_without_a_terminal_or_a_supervisor_says_why() {
    let out = common::monodon().args(["top", "--control", "/nonexistent/monodon.sock"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("monodon top needs a terminal"), "{stderr}");
}
