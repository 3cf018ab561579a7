//! `--metrics`: the supervisor answers `GET /metrics` itself, in the
//! Prometheus text format, checked with Prometheus's own parser
//! (`prometheus_client` from Debian's python3-prometheus-client; without it
//! the parse is skipped and said so, unless `CI` is set, where .ci/run
//! installs it). Scrapers that stall cost the supervisor nothing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, Client, Server};

fn metrics_addr(server: &Server) -> SocketAddr {
    let status = server.status().unwrap();
    status["metrics"].as_str().expect("status names the metrics address").parse().unwrap()
}

fn scrape(addr: SocketAddr, request: &str) -> common::Response {
    let mut c = Client::connect(addr);
    c.send(request.as_bytes());
    c.response().expect("an answer")
}

/// The samples of an exposition as Prometheus's parser reads them:
/// (name, labels, value); `None` if the parser is not installed.
fn parse_with_prometheus(text: &str) -> Option<Vec<(String, serde_json::Value, f64)>> {
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = [[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]\n\
        print(json.dumps(out))";
    // Debian's interpreter, where Debian's package is (a python3 earlier
    // on PATH, e.g. pyenv's, does not see it).
    let python =
        if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let have = Command::new(python).args(["-c", "import prometheus_client"]).status();
    if !have.is_ok_and(|s| s.success()) {
        assert!(std::env::var_os("CI").is_none(), "CI installs python3-prometheus-client");
        eprintln!("skipped the parse: python3-prometheus-client is not installed");
        return None;
    }
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser refused it: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    let samples: Vec<(String, serde_json::Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    Some(samples)
}

#[test]
fn metrics_are_answered_by_the_supervisor_and_parse() {
    let server = Server::start(&["--app", "echo", "--workers", "2", "--metrics", "127.0.0.1:0"], 2);
    for _ in 0..20 {
        assert_eq!(server.get("/").status, 200);
    }
    // A worker counts a request once it is done, just after its response.
    server.wait_status(Duration::from_secs(10), "20 requests counted", |s| {
        s["workers"]["busy"] == 0 && s["totals"]["requests"].as_u64() >= Some(20)
    });
    let addr = metrics_addr(&server);
    let r = scrape(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/plain; version=0.0.4")), "{r:?}");
    let text = String::from_utf8(r.body).unwrap();
    let pids = server.children();
    if let Some(samples) = parse_with_prometheus(&text) {
        let value = |name: &str| samples.iter().find(|(n, _, _)| n == name).map(|s| s.2);
        assert!(value("monodon_requests_total").is_some_and(|v| v >= 20.0), "{text}");
        assert_eq!(value("monodon_workers_target"), Some(2.0), "{text}");
        for pid in &pids {
            let has_memory = samples.iter().any(|(n, labels, v)| {
                n == "monodon_worker_private_memory_bytes"
                    && labels["pid"].as_str().and_then(|p| p.parse().ok()) == Some(*pid)
                    && *v > 0.0
            });
            assert!(has_memory, "worker {pid}'s private memory: {text}");
        }
    } else {
        assert!(text.contains("\nmonodon_requests_total "), "{text}");
    }
    // Only GET (and HEAD) of /metrics.
    assert_eq!(scrape(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").status, 404);
    assert_eq!(scrape(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").status, 405);
    assert_eq!(scrape(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nBad header\r\n\r\n").status, 400);
    // Nothing of it went to a worker.
    let status = server.status().unwrap();
    assert_eq!(status["totals"]["requests"].as_u64(), Some(20), "{status}");
}

#[test]
fn stalled_scrapers_cost_the_supervisor_nothing_and_are_closed() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--metrics", "127.0.0.1:0"], 1);
    let addr = metrics_addr(&server);
    // More than are served at once: half a head, or nothing at all.
    let mut stalled: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /metr").unwrap();
            }
            s
        })
        .collect();
    // Clients are served meanwhile.
    for _ in 0..10 {
        assert_eq!(server.get("/").status, 200);
    }
    // The scrape timeout closes every one of them.
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        // EOF or a reset; a read timing out means it was kept.
        let closed = match s.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "a stalled scraper was answered or kept");
    }
    // And a scraper that asks properly is answered again.
    assert!(eventually(Duration::from_secs(10), || {
        let mut c = Client::connect(addr);
        c.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        c.response().is_ok_and(|r| r.status == 200)
    }));
}

/// Every answer is counted once, by class and by who sent it, and every
/// request the workers served has its duration, also across workers that
/// were recycled (their scoreboards' counts outlive them).
#[test]
fn responses_by_class_and_request_durations_count_every_answer() {
    let server = Server::start(
        // The queue wait is counted at hand-overs: with workers accepting,
        // a request served by the worker that accepted it has none.
        &[
            "--app",
            "echo",
            "--workers",
            "2",
            "--metrics",
            "127.0.0.1:0",
            "--max-requests-per-child",
            "4",
            "--worker-accept",
            "false",
        ],
        2,
    );
    let first = server.children();
    for _ in 0..20 {
        assert_eq!(server.get("/").status, 200);
    }
    for _ in 0..3 {
        assert_eq!(server.get("/?status=404").status, 404);
    }
    assert_eq!(server.get("/?sleep_ms=60").status, 200);
    // Refused by the supervisor: a header line without a colon.
    for _ in 0..2 {
        let mut c = server.connect();
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n");
        assert_eq!(c.response().unwrap().status, 400);
    }
    let status = server.wait_status(Duration::from_secs(20), "24 requests counted", |s| {
        s["workers"]["busy"] == 0 && s["totals"]["requests"].as_u64() >= Some(24)
    });
    assert!(first.iter().all(|p| !server.children().contains(p)), "the first workers were recycled");
    let totals = &status["totals"];
    assert_eq!(totals["worker_responses"]["2xx"], 21, "{totals}");
    assert_eq!(totals["worker_responses"]["4xx"], 3, "{totals}");
    assert_eq!(totals["worker_responses"]["5xx"], 0, "{totals}");
    assert_eq!(totals["supervisor_responses"]["4xx"], 2, "{totals}");
    let took = &totals["request_duration"];
    assert_eq!(took["count"], 24, "{took}");
    let le = took["le_secs"].as_array().unwrap();
    let at_50ms = le.iter().position(|b| b.as_f64() == Some(0.05)).expect("a 50 ms bound");
    let cumulative = took["cumulative"].as_array().unwrap();
    assert_eq!(cumulative.len(), le.len() + 1, "one per bound, then +Inf: {took}");
    assert_eq!(cumulative[le.len() - 1], 24, "all within 10 s: {took}");
    assert!(cumulative[at_50ms].as_u64() < Some(24), "the 60 ms request is above 50 ms: {took}");
    assert!(took["sum_secs"].as_f64() >= Some(0.06), "{took}");
    assert!(totals["queue_wait"]["count"].as_u64() >= Some(24), "every hand-over waited some time: {totals}");
    assert!(totals["handed_over"].as_u64() >= Some(24), "each request handed over: {totals}");
    assert_eq!(totals["accepted_by_workers"], 0, "{totals}");

    let r = scrape(metrics_addr(&server), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let text = String::from_utf8(r.body).unwrap();
    let Some(samples) = parse_with_prometheus(&text) else {
        assert!(text.contains("monodon_request_duration_seconds_count 24\n"), "{text}");
        return;
    };
    let value = |name: &str, labels: &[(&str, &str)]| {
        samples.iter().find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[k] == *v)).map(|s| s.2)
    };
    let responses = "monodon_responses_total";
    assert_eq!(value(responses, &[("class", "2xx"), ("answered_by", "worker")]), Some(21.0), "{text}");
    assert_eq!(value(responses, &[("class", "4xx"), ("answered_by", "supervisor")]), Some(2.0), "{text}");
    assert_eq!(value("monodon_request_duration_seconds_count", &[]), Some(24.0), "{text}");
    assert_eq!(value("monodon_request_duration_seconds_bucket", &[("le", "+Inf")]), Some(24.0), "{text}");
    assert!(value("monodon_queue_wait_seconds_count", &[]) >= Some(24.0), "{text}");
    assert!(value("monodon_handed_over_total", &[]) >= Some(24.0), "{text}");
    assert_eq!(value("monodon_accepted_by_workers_total", &[]), Some(0.0), "{text}");
}
