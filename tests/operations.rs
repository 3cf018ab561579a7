//! Operating a running supervisor: `monodon status` (table and JSON),
//! `reload`, `stop`, `scale` through the control socket, and its access rules.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{eventually, monodon, Server};

fn control_path(server: &Server) -> PathBuf {
    server.control.clone()
}

fn ctl(path: &PathBuf, args: &[&str]) -> std::process::Output {
    monodon().args(args).arg("--control").arg(path).output().unwrap()
}

fn status_json(path: &PathBuf) -> serde_json::Value {
    let out = ctl(path, &["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn status_shows_what_the_server_is_doing() {
    let server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let path = control_path(&server);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "owner-only control socket");

    // 5 requests, then 3 idle keep-alive connections and one busy worker.
    for _ in 0..5 {
        assert_eq!(server.get("/").status, 200);
    }
    let idle: Vec<_> = (0..3)
        .map(|_| {
            let mut c = server.connect();
            c.send(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(c.response().unwrap().status, 200);
            c
        })
        .collect();
    let mut busy = server.connect();
    busy.send(b"GET /busy?sleep_ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n");
    let path2 = path.clone();
    // Busy for long enough that its row shows how long.
    assert!(eventually(Duration::from_secs(5), || {
        let s = status_json(&path2);
        s["workers"]["busy"] == 1
            && s["worker_list"].as_array().unwrap().iter().any(|w| w["request_secs"].as_f64() >= Some(0.3))
    }));

    let s = status_json(&path);
    assert_eq!(s["pid"], server.pid);
    assert_eq!(s["generation"], 1);
    assert_eq!(s["listeners"][0], server.addr.to_string());
    assert_eq!(s["workers"]["total"], 2);
    assert_eq!(s["workers"]["idle"], 1);
    assert_eq!(s["connections"]["idle"], 3);
    assert_eq!(s["connections"]["in_workers"], 1);
    assert_eq!(s["totals"]["requests"], 8);
    assert_eq!(s["totals"]["accepted"], 9);
    let mut pids: Vec<u64> =
        s["worker_list"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    pids.sort();
    assert_eq!(pids, server.children().iter().map(|p| *p as u64).collect::<Vec<_>>());
    let busy_row = s["worker_list"].as_array().unwrap().iter().find(|w| w["state"] == "busy").unwrap();
    assert_eq!(busy_row["request"], "GET /busy?sleep_ms=3000");
    assert!(busy_row["request_secs"].as_f64().unwrap() >= 0.3);
    assert_eq!(busy_row["response_started"], false);
    let served: u64 =
        s["worker_list"].as_array().unwrap().iter().map(|w| w["requests"].as_u64().unwrap()).sum();
    assert_eq!(served, 8);

    let table = ctl(&path, &["status"]);
    assert!(table.status.success());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains(&format!("pid {}", server.pid)), "{text}");
    assert!(text.contains("3 idle"), "{text}");
    let busy_line = text.lines().find(|l| l.contains("busy ")).unwrap_or_else(|| panic!("{text}"));
    assert!(busy_line.contains("GET /busy?sleep_ms=3000"), "{text}");
    assert_eq!(busy.response().unwrap().status, 200);
    drop(idle);
}

#[test]
fn reload_scale_and_stop_through_the_cli() {
    let mut server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let path = control_path(&server);

    let out = ctl(&path, &["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("generation 2 serving"));
    assert_eq!(server.get("/").json()["worker"]["generation"], 2);
    assert_eq!(status_json(&path)["totals"]["reloads"], 1);

    let out = ctl(&path, &["scale", "4"]);
    assert!(out.status.success());
    assert!(eventually(Duration::from_secs(10), || server.children().len() == 4));
    let out = ctl(&path, &["scale", "-3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(eventually(Duration::from_secs(10), || server.children().len() == 1));
    let out = ctl(&path, &["scale", "-5"]);
    assert_eq!(out.status.code(), Some(1), "cannot go below one worker");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot scale to"));
    let out = ctl(&path, &["scale", "lots"]);
    assert_eq!(out.status.code(), Some(2));

    let out = ctl(&path, &["stop"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped"));
    assert!(server.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
    assert!(!path.exists(), "control socket removed");
    let out = ctl(&path, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no monodon supervisor"));
}

#[test]
fn a_failed_reload_fails_the_reload_command() {
    let scratch = common::Scratch::new("ctl-reload");
    let dir = scratch.0.clone();
    let good = dir.join("good");
    std::fs::write(&good, format!("#!/bin/sh\nexec {} worker --app echo\n", env!("CARGO_BIN_EXE_monodon")))
        .unwrap();
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o755)).unwrap();
    let current = dir.join("current");
    let _ = std::fs::remove_file(&current);
    std::os::unix::fs::symlink(&good, &current).unwrap();
    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "1", "--"]).arg(&current);
    let server = Server::start_cmd(&mut cmd, 1);
    let path = control_path(&server);
    let bad = dir.join("bad");
    std::fs::write(&bad, "#!/bin/sh\nexit 7\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_file(&current).unwrap();
    std::os::unix::fs::symlink(&bad, &current).unwrap();
    let out = ctl(&path, &["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reload to generation 2 failed") && err.contains("status 7"), "{err}");
    let s = status_json(&path);
    assert_eq!(s["generation"], 1);
    assert_eq!(s["totals"]["failed_reloads"], 1);
    assert!(s["reload"]["last_failure"].as_str().unwrap().contains("status 7"));
    drop(server);
}

#[test]
fn the_control_socket_refuses_other_users() {
    if !nix_is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let path = control_path(&server);
    // The file mode keeps other users out...
    let out = monodon().args(["status", "--control"]).arg(&path).uid(65534).gid(65534).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"), "{out:?}");
    // ...and so does the peer check, should the mode be loosened.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = monodon().args(["status", "--control"]).arg(&path).uid(65534).gid(65534).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the supervisor's user"), "{out:?}");
    server.wait_for_log("refused a client with uid Some(65534)", Duration::from_secs(10));
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn systemd_notifications_are_exact() {
    use std::os::unix::net::UnixDatagram;
    use std::sync::{Arc, Mutex};
    let scratch = common::Scratch::new("notify");
    let dir = scratch.0.clone();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&messages);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_reader = Arc::clone(&stop);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop_reader.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = sock.recv(&mut buf) {
                sink.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });
    let seen = |pred: &dyn Fn(&str) -> bool| messages.lock().unwrap().iter().any(|m| pred(m));

    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--app", "echo", "--workers", "2"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000");
    let mut server = Server::start_cmd(&mut cmd, 2);
    assert!(eventually(Duration::from_secs(10), || seen(&|m| m.lines().any(|l| l == "READY=1"))));
    assert!(
        seen(&|m| m.contains("READY=1") && m.contains("STATUS=generation 1:")),
        "{:?}",
        messages.lock().unwrap()
    );
    assert!(
        eventually(Duration::from_secs(5), || seen(&|m| m.lines().any(|l| l == "WATCHDOG=1"))),
        "watchdog pings"
    );

    server.signal(libc::SIGHUP);
    let reloading = |m: &str| {
        m.lines().any(|l| l == "RELOADING=1")
            && m.lines().any(|l| l.strip_prefix("MONOTONIC_USEC=").is_some_and(|v| v.parse::<u64>().is_ok()))
    };
    assert!(eventually(Duration::from_secs(10), || seen(&reloading)), "{:?}", messages.lock().unwrap());
    assert!(eventually(Duration::from_secs(10), || {
        let all = messages.lock().unwrap();
        let at = all.iter().position(|m| reloading(m));
        at.is_some_and(|i| all[i..].iter().any(|m| m.contains("READY=1") && m.contains("generation 2")))
    }));
    server.get("/");
    assert!(eventually(Duration::from_secs(5), || seen(
        &|m| m.starts_with("STATUS=generation 2:") && m.contains("requests")
    )));

    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
    assert!(seen(&|m| m.lines().any(|l| l == "STOPPING=1")));
    assert!(!server.logs().contains("NOTIFY_SOCKET"), "workers do not inherit NOTIFY_SOCKET");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
}

#[test]
fn server_starter_hands_over_without_failed_requests() {
    let Ok(start_server) = which("start_server") else {
        assert!(std::env::var_os("CI").is_none(), "CI installs start_server (libserver-starter-perl)");
        eprintln!("skipped: start_server is not installed");
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let scratch = common::Scratch::new("starter");
    let dir = scratch.0.clone();
    let mut child = std::process::Command::new(start_server)
        .arg(format!("--port=127.0.0.1:{port}"))
        .arg(format!("--pid-file={}", dir.join("pid").display()))
        .arg("--interval=1")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_monodon"))
        .args(["serve", "--app", "echo", "--workers", "2", "--graceful-timeout", "5s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let starter = child.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let serving = || {
        let mut c = std::net::TcpStream::connect(addr).ok()?;
        std::io::Write::write_all(&mut c, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut c, &mut out).ok()?;
        Some(out.starts_with("HTTP/1.1 200"))
    };
    assert!(eventually(Duration::from_secs(20), || serving() == Some(true)), "serves behind start_server");
    let first = common::children_of(starter);
    assert_eq!(first.len(), 1, "one supervisor under start_server");

    let load = common::Load::start(addr, 0, 3, "/");
    load.wait_answered(30, Duration::from_secs(10));
    // SAFETY: signalling the start_server process this test started.
    unsafe { libc::kill(starter as i32, libc::SIGHUP) };
    let handed_over = eventually(Duration::from_secs(30), || {
        let now = common::children_of(starter);
        now.len() == 1 && now[0] != first[0]
    });
    load.wait_answered(30, Duration::from_secs(10));
    let stats = load.stop();
    // SAFETY: as above.
    unsafe { libc::kill(starter as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(handed_over, "a new supervisor replaced {}", first[0]);
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert!(stats.generations.len() == 1 && stats.ok > 10, "{stats:?}");
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(program)).find(|p| p.is_file()))
        .ok_or(())
}

#[test]
fn access_log_lines_and_reopen_on_usr1() {
    let scratch = common::Scratch::new("access");
    let dir = scratch.0.clone();
    let log = dir.join("access.log");
    let server = Server::start(
        &[
            "--app",
            "echo",
            "--workers",
            "2",
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-format",
            "json",
        ],
        2,
    );
    let lines = |path: &PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let mut c = server.connect();
    c.send(b"GET /one HTTP/1.1\r\nHost: x\r\nUser-Agent: test-agent\r\nReferer: http://ref/\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 200);
    c.send(b"POST /two?status=201 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(c.response().unwrap().status, 201);
    c.send(b"GET /three HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 400);
    assert!(eventually(Duration::from_secs(5), || lines(&log).len() == 3), "{:?}", lines(&log));
    let l = lines(&log);
    assert_eq!(
        (l[0]["method"].as_str(), l[0]["target"].as_str(), l[0]["status"].as_u64()),
        (Some("GET"), Some("/one"), Some(200))
    );
    assert_eq!(l[0]["user_agent"], "test-agent");
    assert_eq!(l[0]["referer"], "http://ref/");
    assert!(l[0]["bytes"].as_u64().unwrap() > 100);
    assert_eq!((l[1]["method"].as_str(), l[1]["status"].as_u64()), (Some("POST"), Some(201)));
    assert_eq!(l[1]["generation"], 1);
    // The malformed third request never reached the app; whoever refused it
    // (the supervisor, or the worker reading ahead on the connection)
    // logged it in the same format.
    assert_eq!(
        (l[2]["method"].as_str(), l[2]["target"].as_str(), l[2]["status"].as_u64()),
        (Some("GET"), Some("/three"), Some(400))
    );

    // logrotate: move the file away, USR1, and the next lines go to a new file.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    server.signal(libc::SIGUSR1);
    // No state says the logs were reopened; the supervisor's line is the
    // moment it told every worker.
    server.wait_for_log("reopen their access log", Duration::from_secs(5));
    assert!(eventually(Duration::from_secs(5), || {
        server.get("/after-rotate");
        lines(&log).iter().any(|l| l["target"] == "/after-rotate")
    }));
    assert_eq!(lines(&rotated).len(), 3, "the old file got nothing new");
    // The supervisor reopened too: its own lines go to the new file.
    let mut c = server.connect();
    c.send(b"GET /bad-after-rotate HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 400);
    assert!(eventually(Duration::from_secs(5), || lines(&log)
        .iter()
        .any(|l| l["target"] == "/bad-after-rotate")));
    assert_eq!(lines(&rotated).len(), 3);
    drop(server);
}

/// What the supervisor answers itself is logged like what workers serve:
/// a head refused (431, 501), a head that never ended (408), a worker lost
/// mid-request (502), and what a worker refuses before the app (429).
#[test]
fn answers_without_the_app_are_logged_too() {
    let scratch = common::Scratch::new("access-refused");
    let log = scratch.0.join("access.log");
    let log_arg = log.to_str().unwrap();
    let args = [
        "--app",
        "echo",
        "--workers",
        "1",
        "--access-log",
        log_arg,
        "--head-timeout",
        "1",
        "--max-pipelined",
        "0",
    ];
    let server = Server::start(&args, 1);
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    let logged =
        |needle: &str| eventually(Duration::from_secs(10), || lines().lines().any(|l| l.contains(needle)));

    let mut c = server.connect();
    c.send(format!("GET /big HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(9000)).as_bytes());
    assert_eq!(c.response().unwrap().status, 431);
    assert!(logged("\"GET /big HTTP/1.1\" 431 "), "{}", lines());

    let mut c = server.connect();
    c.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 501);
    assert!(logged("\"CONNECT example.com:443 HTTP/1.1\" 501 "), "{}", lines());

    let mut c = server.connect();
    c.send(b"GET /slow-head HTTP/1.1\r\nHost: x\r\n");
    assert_eq!(c.response().unwrap().status, 408);
    assert!(logged("\"GET /slow-head HTTP/1.1\" 408 "), "{}", lines());

    let mut c = server.connect();
    c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 200);
    assert_eq!(c.response().unwrap().status, 429);
    assert!(logged("\"GET /b HTTP/1.1\" 429 "), "{}", lines());

    let worker = server.children()[0];
    let mut c = server.connect();
    c.send(b"GET /dies?sleep_ms=10000 HTTP/1.1\r\nHost: x\r\n\r\n");
    common::wait_until_a_worker_sleeps(&server);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    assert_eq!(c.response().unwrap().status, 502);
    assert!(logged("\"GET /dies?sleep_ms=10000 -\" 502 "), "{}", lines());
}

#[test]
fn combined_access_log_format() {
    let scratch = common::Scratch::new("combined");
    let dir = scratch.0.clone();
    let log = dir.join("access.log");
    let server =
        Server::start(&["--app", "hello", "--workers", "1", "--access-log", log.to_str().unwrap()], 1);
    server.get("/x?y=1");
    assert!(eventually(Duration::from_secs(5), || std::fs::read_to_string(&log)
        .is_ok_and(|s| s.lines().count() == 1)));
    let line = std::fs::read_to_string(&log).unwrap();
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.contains("] \"GET /x?y=1 HTTP/1.1\" 200 "), "{line}");
    drop(server);
    let out = monodon().args(["serve", "--access-log", "/nonexistent-dir/x.log"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--access-log /nonexistent-dir/x.log"));
}

#[test]
fn config_file_settings_flags_win_and_reload_rereads_it() {
    let scratch = common::Scratch::new("config-test");
    let dir = scratch.0.clone();
    let file = dir.join("monodon.toml");
    std::fs::write(&file, "app = \"echo\"\nworkers = 3\nmax-requests-per-child = 0\ntimeout = \"7s\"\n")
        .unwrap();
    // --workers on the command line wins over the file's 3.
    let server = Server::start(&["--config", file.to_str().unwrap(), "--workers", "2"], 2);
    let path = control_path(&server);
    assert_eq!(server.get("/").json()["worker"]["generation"], 1, "the file's app = echo");
    assert_eq!(server.children().len(), 2);

    // A reload reads the file again: bad content refuses the reload.
    std::fs::write(&file, "app = \"echo\"\n\nmax-requests = 3\n").unwrap();
    let out = ctl(&path, &["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max-requests") && err.contains("line 3"), "{err}");
    assert_eq!(server.get("/").json()["worker"]["generation"], 1, "still serving");

    // Good content: the new generation runs with it (the app changes to hello).
    std::fs::write(&file, "app = \"hello\"\nbacklog = 16\n").unwrap();
    let out = ctl(&path, &["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.get("/").body, b"hello\n");
    server.wait_for_log(
        "a change of `backlog` takes effect only when the supervisor restarts",
        Duration::from_secs(10),
    );
    drop(server);

    std::fs::write(&file, "workers = 2\nlisten-on = \"x\"\n").unwrap();
    let out = monodon().args(["serve", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen-on") && err.contains("line 2"), "{err}");
    std::fs::write(&file, "workers = 0\n").unwrap();
    let out = monodon().args(["serve", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--workers"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Limits whose largest message cannot cross a worker channel (Linux caps
/// socket buffers at net.core.wmem_max) are refused at start and on reload,
/// with the numbers and the way out, instead of a worker killed as broken
/// at the first large request.
#[test]
fn limits_too_large_for_a_worker_channel_are_refused_up_front() {
    let wmem_max: usize =
        std::fs::read_to_string("/proc/sys/net/core/wmem_max").unwrap().trim().parse().unwrap();
    // 16 MiB of body buffering needs 16.2 MiB messages; the kernel grants 2 x wmem_max.
    if 2 * wmem_max > 17 << 20 {
        eprintln!("skipped: net.core.wmem_max = {wmem_max} allows even 16 MiB messages");
        return;
    }
    let out = monodon().args(["serve", "--listen", "127.0.0.1:0", "--buffer-body", "16M"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a worker channel must carry messages of") && err.contains("net.core.wmem_max"),
        "{err}"
    );

    let scratch = common::Scratch::new("channel-room");
    let file = scratch.0.join("monodon.toml");
    std::fs::write(&file, "app = \"echo\"\n").unwrap();
    let server = Server::start(&["--config", file.to_str().unwrap(), "--workers", "1"], 1);
    std::fs::write(&file, "app = \"echo\"\nbuffer-body = \"16MiB\"\n").unwrap();
    let out = ctl(&control_path(&server), &["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("net.core.wmem_max"));
    assert_eq!(server.get("/").json()["worker"]["generation"], 1, "still serving");
}

/// A generation keeps the configuration it started with: a reload that
/// fails changes nothing (here: a larger --buffer-body, which would have
/// sent the old workers messages past their buffers), and one that
/// succeeds brings its settings in with its workers.
#[test]
fn a_failed_reload_leaves_the_serving_generation_its_configuration() {
    let scratch = common::Scratch::new("generation-config");
    let file = scratch.0.join("monodon.toml");
    std::fs::write(&file, "app = \"echo\"\nworkers = 1\nbuffer-body = \"64KiB\"\n").unwrap();
    let server = Server::start(&["--config", file.to_str().unwrap()], 1);
    let path = control_path(&server);
    let post = |len: usize| {
        let mut c = server.connect();
        let head = format!("POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
        c.send(&[head.as_bytes(), &vec![b'a'; len]].concat());
        let r = c.response().unwrap();
        (r.status, r.json()["worker"]["generation"].as_u64())
    };
    assert_eq!(post(1 << 20), (200, Some(1)));

    std::fs::write(
        &file,
        "app = \"echo\"\nworkers = 1\nbuffer-body = \"2MiB\"\ncommand = [\"/nonexistent/worker\"]\n",
    )
    .unwrap();
    let out = ctl(&path, &["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(post(1 << 20), (200, Some(1)), "generation 1 still streams large bodies itself");
    assert_eq!(server.status().unwrap()["workers"]["total"], 1);

    std::fs::write(&file, "app = \"echo\"\nworkers = 1\nbuffer-body = \"2MiB\"\n").unwrap();
    let out = ctl(&path, &["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(post(1 << 20), (200, Some(3)), "generation 3, with the larger buffering");
}

/// Status names each generation's code (the program resolved, and whether
/// the file on disk has changed since the generation started) and each
/// worker's private memory.
#[test]
fn status_shows_each_generations_code_and_workers_private_memory() {
    let scratch = common::Scratch::new("code-identity");
    let exe = env!("CARGO_BIN_EXE_monodon");
    let script = scratch.script("app", &format!("exec {exe} worker --app echo"));
    let link = scratch.point("current", &script);
    let mut cmd = monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "1", "--"]).arg(&link);
    let server = Server::start_cmd(&mut cmd, 1);
    let path = control_path(&server);
    let s = status_json(&path);
    let g = &s["generations"][0];
    assert_eq!((g["generation"].as_u64(), g["serving"].as_bool()), (Some(1), Some(true)));
    assert_eq!(
        g["command"][0],
        script.canonicalize().unwrap().to_str().unwrap(),
        "resolved through the symlink"
    );
    assert_eq!(g["program_changed"], false);
    assert!(s["worker_list"][0]["private_kib"].as_u64().unwrap() > 0, "{}", s["worker_list"]);
    assert!(s["worker_list"][0]["shared_kib"].as_u64().is_some());

    // A deploy rewrites the file in place: the status says so.
    std::fs::write(&script, format!("#!/bin/sh\n# v2\nexec {exe} worker --app echo\n")).unwrap();
    assert_eq!(status_json(&path)["generations"][0]["program_changed"], true);
    let text = String::from_utf8_lossy(&ctl(&path, &["status"]).stdout).into_owned();
    assert!(text.contains("generation 1 (serving): ") && text.contains("CHANGED on disk"), "{text}");
    assert!(text.contains("PRIVATE"), "{text}");

    // The reload starts from the file as it is now.
    assert!(ctl(&path, &["reload"]).status.success());
    let g = &status_json(&path)["generations"][0];
    assert_eq!((g["generation"].as_u64(), g["program_changed"].as_bool()), (Some(2), Some(false)));
}

/// Byte sizes take the units `--help` prints, in flags and the file alike.
#[test]
fn sizes_take_units_in_flags_and_the_config_file() {
    let scratch = common::Scratch::new("size-units");
    let file = scratch.0.join("monodon.toml");
    std::fs::write(&file, "app = \"echo\"\nmax-body = \"2KiB\"\n").unwrap();
    let server =
        Server::start(&["--config", file.to_str().unwrap(), "--workers", "1", "--buffer-body", "1M"], 1);
    let post = |len: usize| {
        let mut c = server.connect();
        let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
        c.send(&[head.as_bytes(), &vec![b'a'; len]].concat());
        c.response().unwrap().status
    };
    assert_eq!(post(2048), 200);
    assert_eq!(post(2049), 413, "max-body = \"2KiB\" is 2048 bytes");
    drop(server);

    let out = monodon().args(["serve", "--buffer-body", "lots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--buffer-body") && err.contains("\"lots\" is not a size"), "{err}");
    let out = monodon().args(["serve", "--max-head", "2M"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("2MiB is outside 1KiB..=1MiB"));
}

#[test]
fn user_and_group_drop_privileges_after_binding() {
    if !nix_is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let scratch = common::Scratch::new("user");
    let dir = scratch.0.clone();
    let log = dir.join("access.log");
    let server = Server::start(
        &[
            "--app",
            "echo",
            "--workers",
            "2",
            "--user",
            "65534",
            "--group",
            "65534",
            "--access-log",
            log.to_str().unwrap(),
        ],
        2,
    );
    let uid_of = |pid: u32| -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .map(|l| l.split_whitespace().nth(2).unwrap_or("").to_owned())
    };
    assert_eq!(uid_of(server.pid).as_deref(), Some("65534"), "the supervisor dropped to the user");
    for w in server.children() {
        assert_eq!(uid_of(w).as_deref(), Some("65534"), "worker {w}");
    }
    assert_eq!(server.get("/").status, 200);
    assert!(eventually(Duration::from_secs(5), || std::fs::read_to_string(&log).is_ok_and(|s| !s.is_empty())));
    // Root may still use the control socket.
    let path = control_path(&server);
    assert_eq!(status_json(&path)["workers"]["total"], 2);
    drop(server);
    let out = monodon().args(["serve", "--user", "no-such-user-here"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--user no-such-user-here: no such user"));
}

#[test]
fn malformed_control_requests_get_errors_not_crashes() {
    use std::io::{BufRead, BufReader, Write};
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let path = control_path(&server);
    let ask = |bytes: &[u8]| -> String {
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut line = String::new();
        let _ = BufReader::new(s).read_line(&mut line);
        line
    };
    for (bytes, needle) in [
        (&b"not json\n"[..], "bad request"),
        (b"{\"protocol\":1,\"command\":\"explode\"}\n", "bad request"),
        (b"{\"protocol\":99,\"command\":\"status\"}\n", "protocol version mismatch"),
        (b"{\"protocol\":1,\"command\":\"scale\"}\n", "scale needs"),
        (b"\xff\xfe\x00garbage\n", "bad request"),
    ] {
        let answer = ask(bytes);
        assert!(
            answer.contains("\"ok\":false") && answer.contains(needle),
            "{:?} -> {answer}",
            String::from_utf8_lossy(bytes)
        );
    }
    let huge = vec![b'x'; 70 * 1024];
    assert!(ask(&huge).contains("request too large"));
    assert_eq!(status_json(&path)["workers"]["total"], 1, "the supervisor is fine");
}

#[test]
fn status_names_the_request_being_served_not_the_first_of_the_connection() {
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let path = control_path(&server);
    let mut c = server.connect();
    // Pipelined: the worker serves both in one pass.
    c.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second?sleep_ms=2000 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 200);
    let path2 = path.clone();
    let shown = eventually(Duration::from_secs(5), || {
        status_json(&path2)["worker_list"][0]["request"] == "GET /second?sleep_ms=2000"
    });
    assert!(shown, "{}", status_json(&path)["worker_list"]);
    assert_eq!(c.response().unwrap().status, 200);
    assert!(status_json(&path)["requests_per_sec"].as_f64().is_some());
}

#[test]
fn a_health_path_is_answered_by_the_supervisor_not_the_app() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--health-path", "/healthz"], 1);
    let r = server.get("/healthz");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"serving\n"[..]), "{r:?}");
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(server.get("/healthz?from=haproxy").status, 200);
    let mut c = server.connect();
    c.send(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = c.head_response().unwrap();
    assert_eq!(head.status, 200);
    assert!(c.is_closed(), "a health check closes its connection");
    // Other paths, and other methods on it, are the app's.
    let app = server.get("/healthz/deeper");
    assert!(String::from_utf8_lossy(&app.body).contains("/healthz/deeper"), "{app:?}");
    let mut c = server.connect();
    c.send(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert!(String::from_utf8_lossy(&c.response().unwrap().body).contains("POST"));
    // The app's two requests are counted once their workers are done; the
    // health checks, answered before them, never are.
    let status = server.wait_status(Duration::from_secs(10), "the app's requests counted", |s| {
        s["workers"]["busy"] == 0 && s["totals"]["requests"].as_u64() >= Some(2)
    });
    assert_eq!(status["totals"]["requests"].as_u64(), Some(2), "only the app's requests: {status}");
}

#[test]
fn a_health_path_must_be_a_path() {
    let out = monodon().args(["serve", "--app", "hello", "--health-path", "healthz"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--health-path \"healthz\": must start with /"));
}
