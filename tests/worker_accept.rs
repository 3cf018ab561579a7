//! Workers that accept (`--worker-accept`, the default for the Rust
//! runtime): a free worker takes a new connection itself and serves it when
//! its request came whole, without the supervisor; everything else (a head
//! still coming, a keep-alive client between requests, connections while
//! every worker is busy) is the supervisor's, and a worker that dies or is
//! timed out on a connection of its own is answered for like one handed
//! over. The counts come from the status: `totals.accepted` counts every
//! connection, `totals.accepted_by_workers` those workers accepted.

mod common;

use std::time::Duration;

use common::{eventually, wait_until_a_worker_sleeps, Server};

/// Connections accepted by the supervisor itself, and by workers.
fn accepted(server: &Server) -> (u64, u64) {
    let s = server.status().expect("status");
    let all = s["totals"]["accepted"].as_u64().expect("totals.accepted");
    let by_workers = s["totals"]["accepted_by_workers"].as_u64().expect("totals.accepted_by_workers");
    (all - by_workers, by_workers)
}

fn close_request(server: &Server, target: &str) -> common::Response {
    let mut c = server.connect();
    c.send(format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes());
    c.response().expect("a response")
}

#[test]
fn requests_on_new_connections_are_served_by_workers_alone() {
    let server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let before = accepted(&server);
    for i in 0..40 {
        let r = close_request(&server, &format!("/close/{i}"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(accepted(&server), (before.0, before.1 + 40), "workers accepted them all");
    let s = server.wait_status(Duration::from_secs(5), "the 40 requests counted", |s| {
        s["totals"]["requests"].as_u64() >= Some(40)
    });
    assert_eq!(s["totals"]["worker_responses"]["2xx"], 40);
}

#[test]
fn without_worker_accept_the_supervisor_accepts_every_connection() {
    let server = Server::start(&["--app", "echo", "--workers", "2", "--worker-accept", "false"], 2);
    let before = accepted(&server);
    for i in 0..10 {
        assert_eq!(close_request(&server, &format!("/{i}")).status, 200);
    }
    assert_eq!(accepted(&server), (before.0 + 10, 0));
}

#[test]
fn a_keep_alive_connection_a_worker_accepted_goes_to_the_supervisor_between_requests() {
    // Kept by nobody but the supervisor (tests/warm.rs: workers keeping them).
    let server = Server::start(&["--app", "echo", "--workers", "1", "--warm-connections", "0"], 1);
    let mut c = server.connect();
    for i in 0..3 {
        c.send(format!("GET /ka/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let r = c.response().expect("a response");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["target"], format!("/ka/{i}"), "{}", r.text());
        // Between requests the supervisor holds it, idle; the worker is free.
        server.wait_status(Duration::from_secs(5), "the connection held idle", |s| {
            s["connections"]["idle"] == 1 && s["workers"]["idle"] == 1
        });
    }
    assert_eq!(accepted(&server), (0, 1), "accepted by the worker, handed over after its first request");
}

/// A client that sends part of its head reaches a worker through its
/// accept; the worker hands it to the supervisor at once, and serves the
/// next client while the first is still typing.
#[test]
fn a_slow_client_a_worker_accepted_does_not_hold_it() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--head-timeout", "20s"], 1);
    let mut slow = server.connect();
    slow.send(b"GET /slow HTTP/1.1\r\n");
    server.wait_status(Duration::from_secs(5), "the slow head held by the supervisor", |s| {
        s["connections"]["reading_head"] == 1
    });
    assert_eq!(accepted(&server), (0, 1), "accepted by the worker, handed to the supervisor");
    // The only worker is free for others meanwhile.
    for i in 0..3 {
        assert_eq!(close_request(&server, &format!("/quick/{i}")).status, 200);
    }
    slow.send(b"Host: x\r\n\r\n");
    let r = slow.response().expect("the slow client's response");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["target"], "/slow");
}

/// A bad request a worker accepted is the supervisor's to refuse: it never
/// reaches the app, and the worker counts no response.
#[test]
fn a_bad_request_a_worker_accepted_is_refused_by_the_supervisor() {
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let mut c = server.connect();
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 400);
    let s = server.status().unwrap();
    assert_eq!(s["totals"]["supervisor_responses"]["4xx"], 1, "{s}");
    assert_eq!(s["totals"]["worker_responses"]["4xx"], 0, "{s}");
}

#[test]
fn a_worker_killed_on_a_connection_of_its_own_answers_502() {
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let worker = server.children()[0];
    let mut c = server.connect();
    c.send(b"GET /own?sleep_ms=30000 HTTP/1.1\r\nHost: x\r\n\r\n");
    wait_until_a_worker_sleeps(&server);
    assert_eq!(accepted(&server), (0, 1), "the worker accepted it itself");
    // SAFETY: killing the supervisor's worker, on purpose.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    let r = c.response().expect("a 502, not a cut connection");
    assert_eq!(r.status, 502, "{}", r.text());
    server.wait_for_log("answering 502", Duration::from_secs(5));
    assert!(eventually(Duration::from_secs(10), || server.children().len() == 1), "replaced");
    assert_eq!(close_request(&server, "/after").status, 200);
}

#[test]
fn a_worker_stuck_on_a_connection_of_its_own_is_timed_out_with_504() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--timeout", "1s"], 1);
    let mut c = server.connect();
    c.send(b"GET /stuck?sleep_ms=20000 HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.response().expect("a 504");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(accepted(&server).0, 0, "the worker had accepted it itself");
    let s =
        server.wait_status(Duration::from_secs(10), "the timeout counted", |s| s["totals"]["timeouts"] == 1);
    assert_eq!(s["totals"]["supervisor_responses"]["5xx"], 1);
}

/// With its only worker on a long request of its own, the supervisor
/// notices (the worker's scoreboard) and accepts and holds what comes, so
/// a health check is answered and the queue is seen.
#[test]
fn with_every_worker_busy_on_its_own_the_supervisor_accepts_again() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--health-path", "/healthz"], 1);
    let mut long = server.connect();
    long.send(b"GET /long?sleep_ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n");
    wait_until_a_worker_sleeps(&server);
    server.wait_status(Duration::from_secs(5), "the worker seen busy", |s| s["workers"]["busy"] == 1);
    let health = server.get("/healthz");
    assert_eq!(health.status, 200, "answered while the only worker is busy");
    let mut queued = server.connect();
    queued.send(b"GET /queued HTTP/1.1\r\nHost: x\r\n\r\n");
    server.wait_status(Duration::from_secs(5), "the request queued", |s| s["connections"]["queued"] == 1);
    assert_eq!(long.response().unwrap().status, 200);
    let r = queued.response().unwrap();
    assert_eq!((r.status, r.json()["target"].as_str()), (200, Some("/queued")));
}
