//! The core promises, checked against the real binary over real sockets:
//! HTTP/1.1 semantics, connections held by the supervisor, worker deaths,
//! descriptor hygiene, the static app.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine;
use common::{eventually, monodon, raise_fd_limit, Client, Server};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E3779B97F4A7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn echo_describes_the_request() {
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let mut c = server.connect();
    c.send(
        b"POST /path?x=1 HTTP/1.1\r\nHost: example\r\nX-Two: a\r\nx-two: b\r\nContent-Length: 5\r\n\r\nhello",
    );
    let r = c.response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert!(r.header("Date").is_some());
    let j = r.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["target"], "/path?x=1");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(
        j["headers"],
        serde_json::json!([["Host", "example"], ["X-Two", "a"], ["x-two", "b"], ["Content-Length", "5"]])
    );
    assert_eq!(j["body_base64"], b64(b"hello"));
    assert_eq!(j["worker"]["pid"], server.children()[0]);
    assert_eq!(j["worker"]["generation"], 1);

    c.send(b"GET /?status=418 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 418);
    c.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
    let head = c.head_response().unwrap();
    assert_eq!(head.status, 200);
    assert!(head.header("Content-Length").unwrap().parse::<usize>().unwrap() > 0);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 200, "HEAD sent no body to trip over");
}

#[test]
fn a_thousand_requests_on_one_keep_alive_connection() {
    // With the default --max-requests-per-child 1000 (drawn from 800..=1000)
    // a worker recycles under this very connection.
    let server = Server::start(&["--app", "hello", "--workers", "2"], 2);
    let mut c = server.connect();
    for i in 0..1000 {
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = c.response().unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello\n"[..]), "request {i}");
        assert_eq!(r.header("Connection"), None, "HTTP/1.1 keep-alive needs no Connection header");
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let mut c = server.connect();
    c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: x\r\n\r\n");
    for (target, body) in [("/1", ""), ("/2", "abc"), ("/3", "")] {
        let j = c.response().unwrap().json();
        assert_eq!(j["target"], target);
        assert_eq!(j["body_base64"], b64(body.as_bytes()));
    }
}

#[test]
fn one_mebibyte_uploads_arrive_intact() {
    let server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let data = pseudo_random(1 << 20);
    let mut c = server.connect();
    c.send(format!("PUT /len HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", data.len()).as_bytes());
    c.send(&data);
    let j = c.response().unwrap().json();
    assert_eq!(j["body_base64"], b64(&data));

    c.send(b"PUT /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
    for chunk in data.chunks(100_000) {
        c.send(format!("{:x};ext=1\r\n", chunk.len()).as_bytes());
        c.send(chunk);
        c.send(b"\r\n");
    }
    c.send(b"0\r\nX-Trailer: yes\r\n\r\n");
    let j = c.response().unwrap().json();
    assert_eq!(j["target"], "/chunked");
    assert_eq!(j["body_base64"], b64(&data));
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let mut c = server.connect();
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
    let interim = c.response().unwrap();
    assert_eq!(interim.status, 100);
    c.send(b"body");
    let r = c.response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_base64"], b64(b"body"));
}

#[test]
fn http_1_0_closes_unless_keep_alive_is_asked() {
    let server = Server::start(&["--app", "hello", "--workers", "1"], 1);
    let mut c = server.connect();
    c.send(b"GET / HTTP/1.0\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(c.is_closed());

    let mut c = server.connect();
    for _ in 0..3 {
        c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        let r = c.response().unwrap();
        assert_eq!(r.header("Connection"), Some("keep-alive"));
    }
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(c.response().unwrap().header("Connection"), Some("close"));
    assert!(c.is_closed());
}

#[test]
fn streamed_error_and_limit_statuses() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--max-body", "10"], 1);
    let cases: [(&[u8], u16); 5] = [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n", 413),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
            413,
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: y\r\n z\r\n\r\n", 400),
        (b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ];
    for (raw, status) in cases {
        let mut c = server.connect();
        c.send(raw);
        let r = c.response().unwrap();
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(raw));
        assert_eq!(r.header("Connection"), Some("close"));
        assert!(c.is_closed(), "closed after {status}");
    }
    let mut c = server.connect();
    c.send(format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(5000)).as_bytes());
    assert_eq!(c.response().unwrap().status, 414);
    let mut c = server.connect();
    c.send(format!("GET / HTTP/1.1\r\nHost: x\r\nBig: {}\r\n\r\n", "a".repeat(9000)).as_bytes());
    assert_eq!(c.response().unwrap().status, 431);
}

#[test]
fn idle_keep_alive_connections_live_in_the_supervisor() {
    raise_fd_limit();
    // No recycling: the test counts processes.
    let server = Server::start(&["--app", "hello", "--workers", "2", "--max-requests-per-child", "0"], 2);
    let workers = server.children();
    assert_eq!(workers.len(), 2);
    let mut idle: Vec<Client> = (0..1000)
        .map(|_| {
            let mut c = server.connect();
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(c.response().unwrap().status, 200);
            c
        })
        .collect();
    // Every one of them is held by the supervisor, idle.
    server
        .wait_status(Duration::from_secs(10), "1000 idle connections", |s| s["connections"]["idle"] == 1000);
    assert_eq!(server.children(), workers, "still 1 + 2 processes, the same workers");
    assert!(server.fd_count() >= 1000, "the supervisor holds the idle connections");
    // A new client is served while all of them stay open.
    assert_eq!(server.get("/").status, 200);
    for (i, c) in idle.iter_mut().enumerate() {
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(c.response().map(|r| r.status).ok(), Some(200), "idle connection {i} still works");
    }
}

#[test]
fn clients_stalled_mid_head_hold_no_worker() {
    let server = Server::start(&["--app", "hello", "--workers", "2"], 2);
    let stalled: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    for _ in 0..20 {
        assert_eq!(server.get("/").status, 200);
    }
    drop(stalled);
}

#[test]
fn a_slow_head_gets_408_after_the_head_timeout() {
    let server = Server::start(&["--app", "hello", "--workers", "1", "--head-timeout", "1s"], 1);
    let mut c = server.connect();
    c.send(b"GET / HTTP/1.1\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.status, 408);
    assert!(c.is_closed());
}

#[test]
fn no_descriptor_leaks_after_thousands_of_connections() {
    let server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    assert_eq!(server.get("/warm-up").status, 200);
    let baseline = server.fd_count();
    for i in 0..3000 {
        let mut c = server.connect();
        match i % 5 {
            0 => {
                c.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                assert_eq!(c.response().unwrap().status, 200);
            }
            1 => {
                c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
                assert_eq!(c.response().unwrap().status, 200);
                assert_eq!(c.response().unwrap().status, 200);
            }
            2 => {
                c.send(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n");
                assert_eq!(c.response().unwrap().status, 400);
            }
            3 => c.send(b"GET / HTT"),
            _ => {
                c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial");
            }
        }
    }
    let settled = eventually(Duration::from_secs(20), || server.fd_count_is_settled(baseline));
    assert!(settled, "supervisor fds: baseline {baseline}, now {}", server.fd_count());
}

#[test]
fn a_worker_killed_mid_request_costs_only_that_request() {
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let victim = server.children()[0];
    let mut c = server.connect();
    c.send(b"GET /?sleep_ms=30000 HTTP/1.1\r\nHost: x\r\n\r\n");
    // Wait until the worker is inside the app (sleeping in the echo app).
    let busy = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("/proc/{victim}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
    });
    assert!(busy, "worker {victim} never started the request");
    // SAFETY: killing the worker process the test just identified.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    match c.response() {
        Ok(r) => assert_eq!(r.status, 502),
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "client hung instead of failing"),
    }
    let replaced = eventually(Duration::from_secs(10), || {
        let now = server.children();
        now.len() == 1 && now[0] != victim
    });
    assert!(replaced, "a new worker replaced {victim}");
    let r = server.get("/after");
    assert_eq!(r.status, 200);
    assert_ne!(r.json()["worker"]["pid"], victim);
    server.wait_for_log("answering 502", Duration::from_secs(10));
}

#[test]
fn static_files_ranges_head_and_no_escape() {
    let dir = std::env::temp_dir().join(format!("monodon-static-{}", std::process::id()));
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("file.txt"), b"0123456789").unwrap();
    std::fs::write(root.join("sub/index.html"), b"<p>index</p>").unwrap();
    std::fs::write(dir.join("secret"), b"secret").unwrap();
    let _ = std::os::unix::fs::symlink(dir.join("secret"), root.join("escape"));
    let server = Server::start(&["--app", "static", "--root", root.to_str().unwrap(), "--workers", "1"], 1);

    let r = server.get("/file.txt");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"0123456789"[..]));
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
    let last_modified = r.header("Last-Modified").unwrap().to_owned();

    let mut c = server.connect();
    let mut ask = |req: String| {
        c.send(req.as_bytes());
        c.response().unwrap()
    };
    let r = ask("GET /file.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=2-4\r\n\r\n".into());
    assert_eq!((r.status, r.body.as_slice()), (206, &b"234"[..]));
    assert_eq!(r.header("Content-Range"), Some("bytes 2-4/10"));
    let r = ask("GET /file.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=-3\r\n\r\n".into());
    assert_eq!((r.status, r.body.as_slice()), (206, &b"789"[..]));
    let r = ask("GET /file.txt HTTP/1.1\r\nHost: x\r\nRange: bytes=50-\r\n\r\n".into());
    assert_eq!(r.status, 416);
    assert_eq!(r.header("Content-Range"), Some("bytes */10"));
    let r = ask(format!("GET /file.txt HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: {last_modified}\r\n\r\n"));
    assert_eq!(r.status, 304);
    let r = ask("GET /sub/ HTTP/1.1\r\nHost: x\r\n\r\n".into());
    assert_eq!((r.status, r.body.as_slice()), (200, &b"<p>index</p>"[..]));
    assert_eq!(r.header("Content-Type"), Some("text/html"));
    let r = ask("GET /sub HTTP/1.1\r\nHost: x\r\n\r\n".into());
    assert_eq!((r.status, r.header("Location")), (301, Some("/sub/")));
    let r = ask("GET /missing HTTP/1.1\r\nHost: x\r\n\r\n".into());
    assert_eq!(r.status, 404);
    let r = ask("DELETE /file.txt HTTP/1.1\r\nHost: x\r\n\r\n".into());
    assert_eq!(r.status, 405);

    c.send(b"HEAD /file.txt HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.head_response().unwrap();
    assert_eq!((r.status, r.header("Content-Length")), (200, Some("10")));
    c.send(b"GET /file.txt HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response().unwrap().body, b"0123456789", "HEAD sent no body");

    for attack in
        ["/../secret", "/%2e%2e/secret", "/sub/..%2f..%2fsecret", "/escape", "/sub/%2e%2e/%2e%2e/secret"]
    {
        let r = server.get(attack);
        assert!(matches!(r.status, 403 | 404), "{attack} gave {}", r.status);
        assert!(!r.text().contains("secret"), "{attack} leaked the file");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn listens_on_ipv6_and_unix_sockets() {
    let sock = std::env::temp_dir().join(format!("monodon-test-{}.sock", std::process::id()));
    let mut cmd = monodon();
    cmd.args(["serve", "--app", "hello", "-w", "1", "--listen", "[::1]:0", "--listen"])
        .arg(format!("unix:{}", sock.display()));
    let server = Server::start_cmd(&mut cmd, 1);
    assert!(server.addr.is_ipv6());
    assert_eq!(server.get("/").status, 200);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    drop(server);
    assert!(eventually(Duration::from_secs(5), || !sock.exists()), "socket file removed on stop");
}

#[test]
fn sigterm_stops_cleanly_and_leaves_no_worker() {
    let mut server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let workers = server.children();
    let mut slow = server.connect();
    slow.send(b"GET /?sleep_ms=500 HTTP/1.1\r\nHost: x\r\n\r\n");
    common::wait_until_a_worker_sleeps(&server);
    server.signal(libc::SIGTERM);
    let r = slow.response().unwrap();
    assert_eq!(r.status, 200, "the request in flight completes");
    let status = server.wait_exit(Duration::from_secs(10)).expect("supervisor exits");
    assert!(status.success(), "{status:?}");
    for pid in workers {
        assert!(eventually(Duration::from_secs(5), || {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        }));
    }
}

#[test]
fn bad_command_lines_are_clear_errors() {
    for (args, needle) in [
        (&["serve", "--workers", "zero"][..], "--workers"),
        (&["serve", "--listen", "nowhere"], "--listen"),
        (&["serve", "--app", "nope"], "--app"),
        (&["serve", "--keepalive-timeout", "soon"], "--keepalive-timeout"),
        (&["serve", "--no-such-flag"], "--no-such-flag"),
        (&["serve", "--chdir", "/nonexistent/release"], "--chdir /nonexistent/release: not a directory"),
    ] {
        let out = monodon().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = monodon().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--max-body"));
}

#[test]
fn max_connections_closes_the_longest_idle_first_then_waits() {
    let server = Server::start(
        &["--app", "echo", "--workers", "2", "--max-connections", "20", "--head-timeout", "2s"],
        2,
    );
    let mut idle: Vec<Client> = (0..20)
        .map(|_| {
            let mut c = server.connect();
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(c.response().unwrap().status, 200);
            c
        })
        .collect();
    // A 21st client gets in: the longest-idle connection made room.
    let r = server.get("/newcomer");
    assert_eq!(r.status, 200);
    assert!(idle[0].is_closed(), "the oldest idle connection was closed");
    idle[19].send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(idle[19].response().unwrap().status, 200, "a recent one was kept");
    drop(idle);

    // With every slot taken by clients mid-head, a newcomer waits in the
    // backlog until the head timeout frees a slot, and is then served.
    assert!(eventually(Duration::from_secs(5), || server.fd_count() < 20));
    let stalled: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    let r = server.get("/patient");
    assert_eq!(r.status, 200);
    server.wait_for_log("none idle: not accepting", Duration::from_secs(10));
    drop(stalled);
}

#[test]
fn a_full_queue_pauses_accepting_and_loses_nothing() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--queue", "2"], 1);
    let clients: Vec<_> = (0..10)
        .map(|i| {
            let addr = server.addr;
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                c.send(
                    format!("GET /{i}?sleep_ms=50 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
                c.response().map(|r| r.status).ok()
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        assert_eq!(c.join().unwrap(), Some(200), "client {i}: waiting in the backlog, then served");
    }
}

#[test]
fn out_of_descriptors_the_supervisor_backs_off_and_recovers() {
    // 64 descriptors, and no --max-connections below that: accept will hit EMFILE.
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=64:64", "--"]).arg(env!("CARGO_BIN_EXE_monodon")).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--app",
        "echo",
        "--workers",
        "1",
        "--max-connections",
        "1000",
    ]);
    let server = Server::start_cmd(&mut cmd, 1);
    let supervisor = server.pid; // prlimit execs monodon: same process
    let held: Vec<Client> = (0..70)
        .filter_map(|_| {
            let mut c = server.connect();
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            c.stream().set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            c.response().ok().map(|_| c)
        })
        .collect();
    assert!(held.len() < 70, "some clients wait: the supervisor ran out of descriptors");
    server.wait_for_log("pausing accepts for 100 ms", Duration::from_secs(5));
    // Not a busy loop while it is out of descriptors.
    let before = common::cpu_ticks(supervisor);
    std::thread::sleep(Duration::from_secs(2));
    assert!(common::cpu_ticks(supervisor) - before < 100, "under a second of CPU in 2 s");
    drop(held);
    assert_eq!(server.get("/recovered").status, 200);
}

#[test]
fn a_worker_killed_half_way_through_a_response_closes_the_connection() {
    let scratch = common::Scratch::new("half-response");
    std::fs::write(scratch.0.join("big.bin"), vec![7u8; 32 << 20]).unwrap();
    let server =
        Server::start(&["--app", "static", "--root", scratch.0.to_str().unwrap(), "--workers", "1"], 1);
    let control = server.wait_for_log("control socket at ", Duration::from_secs(5));
    let control = control.split("control socket at ").nth(1).unwrap().trim().to_owned();
    let worker = server.children()[0];

    let mut c = server.connect();
    c.send(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut head = [0u8; 4096];
    let n = c.reader.get_mut().read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    // The client stops reading; the worker is stuck mid-response (the head
    // arrived, and the body cannot all fit in the socket buffers).
    let busy = eventually(Duration::from_secs(10), || {
        let out = monodon().args(["status", "--json", "--control", &control]).output().unwrap();
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        s["worker_list"][0]["state"] == "busy"
    });
    assert!(busy, "the worker is sending the body");
    // SAFETY: killing the worker process, on purpose.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    // The client gets the end of the connection (short of the promised 32 MiB), not a hang.
    let mut total = n;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match c.reader.get_mut().read(&mut buf) {
            Ok(0) => break,
            Ok(k) => total += k,
            Err(e) => panic!("the connection hung or failed oddly: {e}"),
        }
    }
    assert!(total < 32 << 20, "cut short: {total} bytes");
    server.wait_for_log("; closing it", Duration::from_secs(5));
    assert!(eventually(Duration::from_secs(10), || server.children().iter().any(|p| *p != worker)));
    assert_eq!(server.get("/big.bin").body.len(), 32 << 20, "the replacement serves it whole");
}
