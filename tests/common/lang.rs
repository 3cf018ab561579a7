//! What every language worker (Python, Perl, Ruby) must show as a monodon
//! worker, one procedure each, run by `tests/python.rs`, `perl.rs` and
//! `ruby.rs` against their own apps.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use super::{eventually, Client, Load, Scratch, Server};

/// One request on a fresh connection, with `extra` header lines and `body`.
pub fn request(server: &Server, method: &str, target: &str, extra: &str, body: &[u8]) -> super::Response {
    let mut c = server.connect();
    c.send(
        format!("{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n").as_bytes(),
    );
    c.send(body);
    if method == "HEAD" {
        c.head_response().expect("a response")
    } else {
        c.response().expect("a response")
    }
}

fn get(server: &Server, target: &str) -> super::Response {
    request(server, "GET", target, "", b"")
}

/// A body of `lines` lines of different lengths, for line-by-line reading.
pub fn lines_body(lines: usize) -> Vec<u8> {
    (0..lines).flat_map(|i| format!("line {i} of the body, {}\n", "x".repeat(i % 50)).into_bytes()).collect()
}

/// The sum of the bytes, as the test apps answer it.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().map(|&b| u64::from(b)).sum::<u64>() & 0xFFFF_FFFF
}

/// `data` in chunked framing, `chunk` bytes a chunk.
pub fn chunked(data: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in data.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// The flags `check_operations` needs the server started with.
pub fn operations_args(access_log: &Path) -> Vec<String> {
    let log = access_log.to_str().expect("a UTF-8 path").to_owned();
    ["--max-requests-per-child", "5", "--timeout", "2", "--access-log", &log].map(str::to_owned).to_vec()
}

/// Recycling by max-requests (the 2xx count exact across recycled
/// workers), the request being served in the status, 504 past `--timeout`
/// with the worker replaced, and the access log's line. `server` runs 2
/// workers with `operations_args(access_log)` and answers `GET /environ`
/// with 200 and `GET /sleep?ms=N` after N ms.
pub fn check_operations(server: &Server, access_log: &Path) {
    let first = server.children();
    for _ in 0..20 {
        assert_eq!(get(server, "/environ").status, 200);
    }
    let status = server.wait_status(Duration::from_secs(20), "recycled by max-requests", |s| {
        s["totals"]["recycled"]["max-requests"].as_u64() >= Some(2)
            && s["totals"]["requests"].as_u64() >= Some(20)
    });
    assert!(first.iter().all(|p| !server.children().contains(p)), "{status}");
    assert_eq!(status["totals"]["worker_responses"]["2xx"], 20, "{status}");
    let addr = server.addr;
    let slow = std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        c.send(b"GET /sleep?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n");
        c.response().map(|r| r.status)
    });
    server.wait_status(Duration::from_secs(10), "the slow request in the status", |s| {
        s["worker_list"].as_array().is_some_and(|l| l.iter().any(|w| w["request"] == "GET /sleep?ms=1500"))
    });
    assert_eq!(slow.join().unwrap().unwrap(), 200);
    assert_eq!(get(server, "/sleep?ms=10000").status, 504);
    server.wait_status(Duration::from_secs(10), "the stuck worker replaced", |s| {
        s["totals"]["timeouts"] == 1 && s["workers"]["idle"] == 2
    });
    let logged = eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(access_log)
            .is_ok_and(|l| l.contains("\"GET /environ HTTP/1.1\" 200 ") && l.starts_with("127.0.0.1 - - ["))
    });
    assert!(logged, "{}", std::fs::read_to_string(access_log).unwrap_or_default());
}

/// A hot deploy of the app in `scratch`'s file `app`: v1, then v2 by a
/// new file renamed over it and a HUP, served under load without a failed
/// request; then the file broken in place (`broken`), which never reaches
/// the running generation (its template keeps the code it loaded, and
/// recycling forks from it); then a HUP that cannot load it, abandoned
/// while v2 serves on, with `failure_logged` in the log. `version(v)` is
/// the app's source answering `v\n`; `start(dir)` serves `app` from `dir`
/// with 2 workers and `--max-requests-per-child 20`.
pub fn check_hot_deploy(
    scratch: &Scratch,
    app: &str,
    version: impl Fn(&str) -> String,
    broken: &str,
    start: impl FnOnce(&str) -> Server,
    failure_logged: &str,
) {
    let file = scratch.0.join(app);
    let replace = |text: &str| {
        let tmp = scratch.0.join(format!("{app}.new"));
        std::fs::File::create(&tmp).unwrap().write_all(text.as_bytes()).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        // Python's bytecode cache, which would otherwise outlive the source.
        let _ = std::fs::remove_dir_all(scratch.0.join("__pycache__"));
    };
    replace(&version("v1"));
    let server = start(scratch.0.to_str().expect("a UTF-8 path"));
    assert_eq!(server.get("/").text(), "v1\n");
    let load = Load::start(server.addr, 2, 1, "/");
    load.wait_answered(100, Duration::from_secs(30));
    replace(&version("v2"));
    server.signal(libc::SIGHUP);
    server.wait_serving(2, Duration::from_secs(30));
    load.wait_answered(100, Duration::from_secs(30));
    assert_eq!(server.get("/").text(), "v2\n");
    // Broken in place: the running generation recycles on its own code.
    std::fs::write(&file, broken).unwrap();
    let recycled = |s: &serde_json::Value| s["totals"]["recycled"]["max-requests"].as_u64().unwrap_or(0);
    let recycled_before = recycled(&server.status().unwrap());
    load.wait_answered(200, Duration::from_secs(30));
    let status = server.status().unwrap();
    assert!(recycled(&status) >= recycled_before + 2, "{status}");
    assert_eq!(server.get("/").text(), "v2\n");
    // A reload that cannot load the app is abandoned; v2 serves on.
    server.signal(libc::SIGHUP);
    let why = server.wait_reload_failed(Duration::from_secs(30));
    assert!(!why.is_empty());
    load.wait_answered(100, Duration::from_secs(30));
    assert_eq!(server.get("/").text(), "v2\n");
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert!(server.logs().contains(failure_logged), "the failed load is in the log");
}

/// Two `GET /random?ms=500` at once, so that each of two workers answers
/// one: their JSON documents (the worker's `pid`, its `random` draw, and
/// whatever else the app adds).
pub fn draw_on_two_workers(server: &Server) -> Vec<serde_json::Value> {
    let addr = server.addr;
    let draw = move || {
        let mut c = Client::connect(addr);
        c.send(b"GET /random?ms=500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        c.response().unwrap().json()
    };
    let (a, b) = (std::thread::spawn(draw), std::thread::spawn(draw));
    vec![a.join().unwrap(), b.join().unwrap()]
}

/// `GET /environ` over an IPv6 listener and over the unix socket at
/// `unix_path` (with `Host: app.example:8443`): the IPv6 listener's port,
/// and the `cgi` object of each answer. `server` listens on `[::1]:0` and
/// `unix:UNIX_PATH`.
pub fn environ_on_ipv6_and_unix(
    server: &Server,
    unix_path: &Path,
) -> (u16, serde_json::Value, serde_json::Value) {
    let status = server.status().unwrap();
    let v6 = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .find(|l| l.starts_with('['));
    let v6: std::net::SocketAddr = v6.expect("an IPv6 listener").parse().unwrap();
    let mut c = Client::connect(v6);
    c.send(b"GET /environ HTTP/1.1\r\nHost: x\r\n\r\n");
    let over_v6 = c.response().unwrap().json()["cgi"].clone();
    let mut stream = std::os::unix::net::UnixStream::connect(unix_path).unwrap();
    stream
        .write_all(b"GET /environ HTTP/1.1\r\nHost: app.example:8443\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = super::read_response(&mut std::io::BufReader::new(stream), false).unwrap();
    (v6.port(), over_v6, r.json()["cgi"].clone())
}

/// A body trickled below `--min-body-rate` (the server runs with 4KiB and
/// one worker) to `target`, which streams it: 408 once the 10 s grace has
/// passed, so a slow sender cannot hold a worker. The trickle is paced at
/// 100 bytes every 100 ms (1 KB/s); its answer is watched for between
/// steps.
pub fn check_trickled_body_is_cut_off(server: &Server, target: &str) {
    let mut c = server.connect();
    // Larger than --buffer-body: the worker streams it.
    c.send(format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n").as_bytes());
    let started = std::time::Instant::now();
    let mut refused = None;
    while started.elapsed() < Duration::from_secs(30) {
        if c.stream().try_clone().and_then(|mut s| s.write_all(&[b'y'; 100])).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        c.stream().set_nonblocking(true).unwrap();
        let mut peek = [0u8; 1];
        let answered = c.stream().peek(&mut peek).is_ok_and(|n| n > 0);
        c.stream().set_nonblocking(false).unwrap();
        if answered {
            refused = Some(c.response().unwrap());
            break;
        }
    }
    let r = refused.expect("an answer within 30 s");
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(started.elapsed() >= Duration::from_secs(9), "not before the grace period");
}
