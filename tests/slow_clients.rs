//! Slow and idle clients, made by `slowhttptest` against 127.0.0.1 (bounded
//! in connections and time): while the attack runs, ordinary requests are
//! still served, and the attack's connections are closed by monodon's
//! timeouts rather than by the attacker giving up.
//!
//! Needs `slowhttptest` (Debian package); without it the tests say so and
//! pass, unless `CI` is set, where .ci/run installs it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;

fn slowhttptest() -> Option<Command> {
    let found = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("slowhttptest")).find(|p| p.is_file()));
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI installs slowhttptest");
        eprintln!("skipped: slowhttptest is not installed");
    }
    found.map(Command::new)
}

/// Ordinary requests on fresh connections for `during`: (served, failed,
/// slowest). Latency is reported, never asserted (the machine is shared).
fn ordinary_traffic(server: &Server, during: Duration) -> (u32, u32, Duration) {
    let end = Instant::now() + during;
    let (mut ok, mut failed, mut slowest) = (0, 0, Duration::ZERO);
    while Instant::now() < end {
        let started = Instant::now();
        let mut c = server.connect();
        c.send(b"GET /ordinary HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        match c.response() {
            Ok(r) if r.status == 200 => ok += 1,
            _ => failed += 1,
        }
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    (ok, failed, slowest)
}

/// Runs slowhttptest with `args` against a fresh server (head timeout 3 s)
/// while ordinary traffic flows; its report, once it has ended by itself.
fn run_attack(args: &[&str]) -> Option<String> {
    let mut cmd = slowhttptest()?;
    let server = Server::start(&["--app", "echo", "--workers", "2", "--head-timeout", "3s"], 2);
    cmd.args(args).arg("-u").arg(format!("http://{}/", server.addr));
    let attack = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("start slowhttptest");
    // Let the attack build up before measuring.
    assert!(common::eventually(Duration::from_secs(10), || server.fd_count() > 100), "the attack connected");
    let (ok, failed, slowest) = ordinary_traffic(&server, Duration::from_secs(6));
    let out = attack.wait_with_output().expect("slowhttptest ends by itself");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("ordinary requests during the attack: {ok} served, {failed} failed, slowest {slowest:?}");
    assert_eq!(failed, 0, "ordinary requests failed during the attack");
    assert!(ok > 50, "ordinary requests kept flowing: {ok}");
    assert!(text.contains("No open connections left"), "monodon closed the attack's connections:\n{text}");
    Some(text)
}

#[test]
fn slowloris_heads_hold_no_worker_and_time_out() {
    // 1,000 connections sending a header line every 5 s, for at most 20 s.
    let Some(report) =
        run_attack(&["-H", "-c", "1000", "-r", "500", "-i", "5", "-x", "10", "-p", "2", "-l", "20"])
    else {
        return;
    };
    assert!(!report.contains("service available:\u{1b}[1;32m   \u{1b}[1;31mNO"), "{report}");
}

#[test]
fn slow_bodies_hold_no_worker_and_time_out() {
    // 200 POSTs announcing 8 KiB bodies sent 10 bytes every 2 s, for at most 20 s.
    run_attack(&["-B", "-c", "200", "-r", "100", "-i", "2", "-x", "10", "-s", "8192", "-p", "2", "-l", "20"]);
}
