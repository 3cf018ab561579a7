//! Lifecycle promises under load: reloads (HUP) and hot deploys drop
//! nothing, bad deploys change nothing, max-requests recycling costs no
//! request, dying and stuck workers cost only their own request.

mod common;

use std::time::{Duration, Instant};

use common::{alive, cpu_ticks, eventually, monodon, Client, Load, Scratch, Server};

fn assert_no_failures(stats: &common::Stats) {
    assert_eq!(stats.failed, 0, "failed requests: {:?}", stats.errors);
    assert!(stats.ok > 0, "the load ran");
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_monodon")
}

fn wait_generation_serving(server: &Server, generation: u64) {
    server.wait_serving(generation, Duration::from_secs(30));
}

#[test]
fn hup_under_load_drops_nothing_and_replaces_every_worker() {
    let server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let old = server.children();
    let mut before = server.connect();
    before.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(before.response().unwrap().json()["worker"]["generation"], 1);

    let load = Load::start(server.addr, 3, 2, "/?sleep_ms=2");
    load.wait_answered(50, Duration::from_secs(10));
    server.signal(libc::SIGHUP);
    wait_generation_serving(&server, 2);
    let replaced = eventually(Duration::from_secs(20), || {
        let now = server.children();
        now.len() == 2 && now.iter().all(|p| !old.contains(p))
    });
    load.wait_answered(50, Duration::from_secs(10));
    let stats = load.stop();
    assert!(replaced, "old workers {old:?}, now {:?}", server.children());
    assert_no_failures(&stats);
    assert!(stats.generations.contains_key(&2), "the new generation served: {:?}", stats.generations);

    // The connection opened before the reload carries on, served by generation 2.
    before.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let j = before.response().unwrap().json();
    assert_eq!(j["worker"]["generation"], 2);
    assert!(!old.contains(&(j["worker"]["pid"].as_u64().unwrap() as u32)));
}

#[test]
fn a_second_hup_during_a_reload_starts_over_without_orphans() {
    let scratch = Scratch::new("double-hup");
    // Workers take a moment to become ready, so the second HUP lands mid-reload.
    let slow = scratch.script("slow-start", &format!("sleep 0.5\nexec {} worker --app echo", bin()));
    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "2", "--"]).arg(&slow);
    let server = Server::start_cmd(&mut cmd, 2);
    let load = Load::start(server.addr, 2, 1, "/");
    server.signal(libc::SIGHUP);
    server.wait_status(Duration::from_secs(10), "reloading to generation 2", |s| {
        s["reload"]["state"] == "reloading" && s["reload"]["generation"] == 2
    });
    server.signal(libc::SIGHUP);
    wait_generation_serving(&server, 3);
    let settled = eventually(Duration::from_secs(20), || server.children().len() == 2);
    let stats = load.stop();
    assert!(settled, "exactly 2 workers remain: {:?}", server.children());
    assert_no_failures(&stats);
    server.wait_for_log("superseded by a newer reload", Duration::from_secs(10));
    assert_eq!(server.get("/").json()["worker"]["generation"], 3);
}

/// `--chdir current`, where a deploy moves `current` from one release to the
/// next: a generation keeps the release it started in, even for workers
/// that replace recycled ones after the move; a reload brings in the new one.
#[test]
fn a_generation_keeps_the_release_its_directory_named_at_start() {
    let scratch = Scratch::new("chdir");
    for (release, marker) in [("1", "one"), ("2", "two")] {
        let dir = scratch.0.join("releases").join(release);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("marker.txt"), marker).unwrap();
    }
    let current = scratch.point("current", &scratch.0.join("releases/1"));
    let args = ["--app", "static", "--root", ".", "--workers", "1", "--max-requests-per-child", "1"];
    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(args).arg("--chdir").arg(&current);
    let server = Server::start_cmd(&mut cmd, 1);
    assert_eq!(server.get("/marker.txt").body, b"one");

    scratch.point("current", &scratch.0.join("releases/2"));
    for _ in 0..5 {
        // Each served by a new worker (one request each), started after the move.
        assert_eq!(server.get("/marker.txt").body, b"one", "generation 1 stays in releases/1");
    }
    server.signal(libc::SIGHUP);
    wait_generation_serving(&server, 2);
    assert_eq!(server.get("/marker.txt").body, b"two");
}

/// --max-worker-age recycles workers by age under load, replacement first:
/// every original worker is replaced and no request fails.
#[test]
fn workers_past_their_age_are_recycled_without_a_failed_request() {
    let args = ["--app", "echo", "--workers", "2", "--max-requests-per-child", "0", "--max-worker-age", "1s"];
    let server = Server::start(&args, 2);
    let first = server.children();
    let load = Load::start(server.addr, 2, 1, "/?sleep_ms=1");
    let s = server.wait_status(Duration::from_secs(20), "4 workers recycled for age", |s| {
        s["totals"]["recycled"]["max-worker-age"].as_u64() >= Some(4)
    });
    let stats = load.stop();
    assert_no_failures(&stats);
    assert!(server.children().iter().all(|p| !first.contains(p)), "{first:?} -> {:?}", server.children());
    assert_eq!(s["totals"]["respawns"], 0, "recycling is not a death");
}

/// --max-worker-memory retires a worker whose private memory passed the
/// limit (1 KiB: every worker does), and status says why.
#[test]
fn workers_past_their_memory_limit_are_recycled() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--max-worker-memory", "1KiB"], 1);
    server.wait_status(Duration::from_secs(20), "2 workers recycled for memory", |s| {
        s["totals"]["recycled"]["max-worker-memory"].as_u64() >= Some(2)
    });
    assert_eq!(server.get("/").status, 200, "still served meanwhile");
    // A busy worker finishes its request, retiring, and says why.
    let mut slow = server.connect();
    slow.send(b"GET /?sleep_ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n");
    server.wait_status(Duration::from_secs(10), "a busy worker retiring for memory", |s| {
        s["worker_list"].as_array().is_some_and(|l| {
            l.iter().any(|w| w["request"].is_string() && w["retiring_because"] == "max-worker-memory")
        })
    });
    assert_eq!(slow.response().unwrap().status, 200, "its request completes");
}

#[test]
fn hot_deploy_runs_the_new_code_from_disk() {
    let scratch = Scratch::new("deploy");
    let v1 = scratch.script("v1", &format!("exec {} worker --app hello", bin()));
    let v2 = scratch.script("v2", &format!("exec {} worker --app echo", bin()));
    let current = scratch.point("current", &v1);
    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "2", "--"]).arg(&current);
    let server = Server::start_cmd(&mut cmd, 2);
    assert_eq!(server.get("/").body, b"hello\n");

    let load = Load::start(server.addr, 2, 2, "/");
    scratch.point("current", &v2);
    server.signal(libc::SIGHUP);
    wait_generation_serving(&server, 2);
    let stats = load.stop();
    assert_no_failures(&stats);
    let r = server.get("/deployed");
    assert_eq!(r.json()["target"], "/deployed", "the echo app (v2) answers now");
    assert_eq!(r.json()["worker"]["generation"], 2);
}

fn bad_deploy(name: &str, broken: &str, extra: &[&str]) {
    let scratch = Scratch::new(name);
    let good = scratch.script("good", &format!("exec {} worker --app echo", bin()));
    let bad = scratch.script("bad", broken);
    let current = scratch.point("current", &good);
    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "2"]).args(extra).arg("--").arg(&current);
    let server = Server::start_cmd(&mut cmd, 2);
    let old = server.children();

    let load = Load::start(server.addr, 2, 2, "/");
    scratch.point("current", &bad);
    server.signal(libc::SIGHUP);
    let failure = server.wait_reload_failed(Duration::from_secs(30));
    let stats = load.stop();
    assert_no_failures(&stats);
    // The new generation's processes are gone (its template, and any worker
    // it got to fork); old ones may have recycled meanwhile (max-requests),
    // from generation 1's template.
    let logs = server.logs();
    let workers = logs
        .lines()
        .filter(|l| l.contains("(generation 2,"))
        .filter_map(|l| l.split("spawned worker ").nth(1)?.split(' ').next()?.parse().ok());
    let templates = logs
        .lines()
        .filter(|l| l.contains("for generation 2"))
        .filter_map(|l| l.split("started template ").nth(1)?.split(' ').next()?.parse().ok());
    let doomed: Vec<u32> = workers.chain(templates).collect();
    assert!(!doomed.is_empty(), "generation 2 was started");
    for pid in &doomed {
        assert!(eventually(Duration::from_secs(10), || !alive(*pid)), "generation 2 worker {pid} stopped");
    }
    assert!(eventually(Duration::from_secs(10), || server.children().len() == old.len()));
    assert_eq!(
        stats.generations.keys().copied().collect::<Vec<_>>(),
        vec![1],
        "generation 1 served throughout"
    );
    assert_eq!(server.get("/").json()["worker"]["generation"], 1);
    eprintln!("{name}: {failure}");
}

#[test]
fn bad_deploy_that_exits_keeps_the_old_generation() {
    bad_deploy("deploy-exit", "echo 'cannot load config' >&2; exit 1", &[]);
}

#[test]
fn bad_deploy_that_crashes_keeps_the_old_generation() {
    bad_deploy("deploy-crash", "kill -SEGV $$", &[]);
}

#[test]
fn bad_deploy_that_never_gets_ready_keeps_the_old_generation() {
    bad_deploy("deploy-hang", "exec sleep 600", &["--reload-timeout", "2s"]);
}

#[test]
fn bad_deploy_that_cannot_exec_keeps_the_old_generation() {
    let scratch = Scratch::new("deploy-missing");
    let good = scratch.script("good", &format!("exec {} worker --app echo", bin()));
    let current = scratch.point("current", &good);
    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "2", "--"]).arg(&current);
    let server = Server::start_cmd(&mut cmd, 2);
    let load = Load::start(server.addr, 2, 1, "/");
    scratch.point("current", &scratch.0.join("does-not-exist"));
    server.signal(libc::SIGHUP);
    server.wait_reload_failed(Duration::from_secs(30));
    let stats = load.stop();
    assert_no_failures(&stats);
    assert_eq!(server.get("/").json()["worker"]["generation"], 1);
}

#[test]
fn max_requests_per_child_1_under_load_drops_nothing() {
    let server = Server::start(&["--app", "echo", "--workers", "2", "--max-requests-per-child", "1"], 2);
    let load = Load::start(server.addr, 2, 2, "/");
    // 200 workers come and go, one request each.
    load.wait_answered(200, Duration::from_secs(30));
    let stats = load.stop();
    assert_no_failures(&stats);
    assert!(stats.ok >= 100, "{} requests", stats.ok);
    let repeated: Vec<_> = stats.pids.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "a worker served more than one request: {repeated:?}");
}

#[test]
fn max_requests_are_drawn_per_worker_within_bounds() {
    let server = Server::start(
        &[
            "--app",
            "echo",
            "--workers",
            "2",
            "--min-requests-per-child",
            "50",
            "--max-requests-per-child",
            "100",
        ],
        2,
    );
    let mut stats = common::Stats::default();
    let mut c = server.connect();
    let mut counts = std::collections::BTreeMap::<u64, u64>::new();
    for _ in 0..900 {
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = c.response().unwrap();
        assert_eq!(r.status, 200);
        *counts.entry(r.json()["worker"]["pid"].as_u64().unwrap()).or_default() += 1;
        stats.ok += 1;
    }
    let live: Vec<u64> = server.children().iter().map(|p| *p as u64).collect();
    let finished: Vec<u64> = counts.iter().filter(|(p, _)| !live.contains(p)).map(|(_, n)| *n).collect();
    assert!(finished.len() >= 6, "workers recycled: {counts:?}");
    assert!(finished.iter().all(|n| (50..=100).contains(n)), "counts within [50, 100]: {finished:?}");
    let first = finished[0];
    assert!(finished.iter().any(|n| *n != first), "limits differ between workers: {finished:?}");
}

#[test]
fn kill_9_of_a_busy_worker_costs_at_most_its_own_request() {
    let server = Server::start(&["--app", "echo", "--workers", "2", "--max-requests-per-child", "0"], 2);
    let load = Load::start(server.addr, 3, 1, "/?sleep_ms=20");
    load.wait_answered(10, Duration::from_secs(10));
    let victim = server.children()[0];
    // SAFETY: killing one of the supervisor's workers, on purpose.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let replaced = eventually(Duration::from_secs(10), || {
        let now = server.children();
        now.len() == 2 && !now.contains(&victim)
    });
    load.wait_answered(10, Duration::from_secs(10));
    let stats = load.stop();
    assert!(replaced, "a replacement appeared");
    assert!(stats.failed <= 1, "only the in-flight request may fail: {:?}", stats.errors);
    for e in &stats.errors {
        assert!(e.contains("502") || e.contains("closed"), "a 502 or a closed connection, not {e}");
    }
    assert!(stats.ok > 20);
}

#[test]
fn a_worker_that_always_crashes_is_respawned_with_growing_delays() {
    let scratch = Scratch::new("crash-loop");
    let crash = scratch.script("crash", "exit 3");
    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "2", "--"]).arg(&crash);
    let server = Server::start_cmd(&mut cmd, 0);
    let start_ticks = cpu_ticks(server.pid);
    let started = Instant::now();
    let grew = eventually(Duration::from_secs(15), || server.count_logs("next start in") >= 7);
    let cpu = cpu_ticks(server.pid) - start_ticks;
    let elapsed = started.elapsed();
    assert!(grew, "back-off logged:\n{}", server.logs());
    let delays: Vec<f64> = server
        .logs()
        .lines()
        .filter_map(|l| l.split("next start in ").nth(1))
        .map(|d| {
            let d = d.trim();
            if let Some(ms) = d.strip_suffix("ms") {
                ms.parse::<f64>().unwrap() / 1000.0
            } else {
                d.trim_end_matches('s').parse::<f64>().unwrap()
            }
        })
        .collect();
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "delays never shrink: {delays:?}");
    assert!(delays.last().unwrap() > &(delays[0] * 4.0), "delays grow: {delays:?}");
    // Not a fork loop: the supervisor used well under half a core meanwhile.
    let ticks_per_sec = 100.0;
    assert!((cpu as f64 / ticks_per_sec) < elapsed.as_secs_f64() / 2.0, "cpu {cpu} ticks in {elapsed:?}");
    // And it still answers to signals.
    let mut server = server;
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
}

#[test]
fn a_request_past_the_timeout_gets_504_and_a_new_worker() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--timeout", "1s"], 1);
    let victim = server.children()[0];
    let started = Instant::now();
    let r = server.get("/slow?sleep_ms=20000");
    assert_eq!(r.status, 504);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered when the timeout expired, not after the sleep"
    );
    let line = server.wait_for_log("killing it", Duration::from_secs(5));
    assert!(line.contains("GET /slow?sleep_ms=20000") && line.contains(&victim.to_string()), "{line}");
    assert!(eventually(Duration::from_secs(10), || {
        let now = server.children();
        now.len() == 1 && now[0] != victim
    }));
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_with_connection_close() {
    let mut server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let workers = server.children();
    let mut slow = server.connect();
    slow.send(b"GET /?sleep_ms=800 HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut idle = server.connect();
    idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(idle.response().unwrap().status, 200);
    common::wait_until_a_worker_sleeps(&server);
    server.signal(libc::SIGTERM);
    let r = slow.response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(idle.is_closed(), "idle keep-alive connections are closed");
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits within the graceful timeout");
    assert!(status.success());
    for pid in workers {
        assert!(eventually(Duration::from_secs(5), || !alive(pid)), "worker {pid} is gone");
    }
}

/// Found by the core's simulation: the only worker reaches its last request
/// after the stop began, so it retires; what still waits is served by a
/// replacement, not dropped when the last worker exits.
#[test]
fn a_graceful_stop_serves_what_waits_after_the_last_worker_retires() {
    let mut server = Server::start(
        &[
            "--app",
            "echo",
            "--workers",
            "1",
            "--max-requests-per-child",
            "2",
            "--min-requests-per-child",
            "2",
        ],
        1,
    );
    let mut slow = server.connect();
    slow.send(b"GET /?sleep_ms=800 HTTP/1.1\r\nHost: x\r\n\r\n");
    common::wait_until_a_worker_sleeps(&server);
    // Its last request (sent ahead or queued), and one more that only a
    // replacement can serve.
    let mut waiting: Vec<_> = (0..2).map(|_| server.connect()).collect();
    for c in &mut waiting {
        c.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    server.wait_status(Duration::from_secs(10), "both waiting for the worker", |s| {
        s["connections"]["queued"].as_u64().unwrap_or(0)
            + s["connections"]["in_workers"].as_u64().unwrap_or(0)
            == 3
    });
    server.signal(libc::SIGTERM);
    assert_eq!(slow.response().unwrap().status, 200);
    for (i, c) in waiting.iter_mut().enumerate() {
        let r = c.response().unwrap_or_else(|e| panic!("request {i} waiting at the stop was dropped: {e}"));
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.header("Connection"), Some("close"));
    }
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits once all is served");
    assert!(status.success());
}

#[test]
fn graceful_timeout_bounds_a_stop() {
    let mut server = Server::start(&["--app", "echo", "--workers", "1", "--graceful-timeout", "1s"], 1);
    let mut slow = server.connect();
    slow.send(b"GET /?sleep_ms=30000 HTTP/1.1\r\nHost: x\r\n\r\n");
    common::wait_until_a_worker_sleeps(&server);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("exits after the graceful timeout");
    assert!(status.success());
    server.wait_for_log("graceful stop timed out", Duration::from_secs(10));
}

#[test]
fn no_worker_outlives_a_killed_supervisor() {
    let mut server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let workers = server.children();
    let mut busy = server.connect();
    busy.send(b"GET /?sleep_ms=500 HTTP/1.1\r\nHost: x\r\n\r\n");
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(5)).expect("killed");
    for pid in workers {
        assert!(
            eventually(Duration::from_secs(5), || !alive(pid)),
            "worker {pid} exited with its supervisor"
        );
    }
    drop(busy);
}

#[test]
fn ttin_and_ttou_change_the_worker_count() {
    let server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    server.signal(libc::SIGTTIN);
    assert!(eventually(Duration::from_secs(10), || server.children().len() == 3), "{:?}", server.children());
    // Signals of one kind that arrive together count once, so one at a time.
    server.signal(libc::SIGTTOU);
    assert!(eventually(Duration::from_secs(10), || server.children().len() == 2), "{:?}", server.children());
    server.signal(libc::SIGTTOU);
    assert!(eventually(Duration::from_secs(10), || server.children().len() == 1), "{:?}", server.children());
    let mut c = Client::connect(server.addr);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 200);
}

#[test]
fn a_frozen_worker_that_never_takes_its_request_is_replaced() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--timeout", "1s"], 1);
    let frozen = server.children()[0];
    // SAFETY: stopping the worker the test just found, to play a wedged one.
    unsafe { libc::kill(frozen as i32, libc::SIGSTOP) };
    let r = server.get("/never-read");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(eventually(Duration::from_secs(10), || !server.children().contains(&frozen)));
    assert_eq!(server.get("/").status, 200);
}

#[test]
fn a_worker_that_closes_its_channel_and_lingers_is_killed() {
    let scratch = Scratch::new("channel-closer");
    let closer = scratch.script("closer", "exec 3>&-\nexec sleep 600");
    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "1", "--"]).arg(&closer);
    let server = Server::start_cmd(&mut cmd, 0);
    server.wait_for_log("closed its channel but did not exit; killing it", Duration::from_secs(15));
    assert!(eventually(Duration::from_secs(10), || server.children().len() <= 1), "no pile of stray workers");
}
