//! How ready connections reach workers when every worker is busy: the next
//! one is sent ahead to a busy worker, a worker that comes free takes it
//! back rather than let it wait behind a long request, and a worker's death
//! never loses it.

mod common;

use std::time::Duration;

use common::{eventually, monodon, Client, Server};

/// Supervisor debug logs say when a connection is sent ahead or taken back.
/// Workers do not accept here: what is dispatched is what the supervisor
/// holds, and with workers accepting, new connections would not be its.
fn start() -> Server {
    start_with(2)
}

fn start_with(workers: usize) -> Server {
    let n = workers.to_string();
    let server = Server::start_cmd(
        monodon().env("RUST_LOG", "info,monodon_supervisor=debug").arg("serve").args([
            "--listen",
            "127.0.0.1:0",
            "--app",
            "echo",
            "--workers",
            &n,
            "--worker-accept",
            "false",
        ]),
        workers,
    );
    server
}

/// Waits until `n` workers are inside the echo app's `sleep_ms`.
fn wait_sleeping(server: &Server, n: usize) {
    let sleeping = || {
        server
            .children()
            .iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
            })
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || sleeping() >= n),
        "{n} workers never got their slow requests"
    );
}

fn get(server: &Server, target: &str) -> Client {
    let mut c = server.connect();
    c.send(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    c
}

/// The worker the status shows a connection sent ahead to.
fn sent_ahead_to(server: &Server) -> u32 {
    let s = server.wait_status(Duration::from_secs(10), "a connection sent ahead", |s| {
        s["worker_list"].as_array().is_some_and(|l| l.iter().any(|w| w["ahead"].as_u64() > Some(0)))
    });
    let workers = s["worker_list"].as_array().cloned().unwrap_or_default();
    let ahead = workers.iter().find(|w| w["ahead"].as_u64() > Some(0)).expect("a worker with one ahead");
    ahead["pid"].as_u64().and_then(|p| u32::try_from(p).ok()).expect("its pid")
}

#[test]
fn a_connection_sent_ahead_is_taken_back_by_the_worker_that_comes_free_first() {
    let server = start();
    let mut short = get(&server, "/?sleep_ms=400");
    wait_sleeping(&server, 1);
    let mut long = get(&server, "/?sleep_ms=4000");
    wait_sleeping(&server, 2);
    // Both busy: it goes ahead to the worker whose request started last.
    let mut quick = get(&server, "/quick");
    let long_worker = sent_ahead_to(&server);

    let short = short.response().unwrap().json();
    let quick = quick.response().unwrap();
    assert_eq!(quick.status, 200);
    let quick = quick.json();
    assert_eq!(
        quick["worker"]["pid"], short["worker"]["pid"],
        "served by the worker that came free, not after the 4 s request"
    );
    assert_ne!(quick["worker"]["pid"].as_u64(), Some(long_worker as u64));
    // Taken back from the long worker: nothing is ahead of it any more.
    server.wait_status(Duration::from_secs(10), "the connection taken back", |s| {
        s["worker_list"].as_array().is_some_and(|l| l.iter().all(|w| w["ahead"] == 0))
    });

    // The long worker finishes, skips the connection it no longer owns, and
    // keeps serving with nothing left over.
    let long = long.response().unwrap().json();
    assert_eq!(long["worker"]["pid"].as_u64(), Some(long_worker as u64));
    for i in 0..20 {
        assert_eq!(server.get(&format!("/after/{i}")).status, 200);
    }
    let sockets = || {
        std::fs::read_dir(format!("/proc/{long_worker}/fd"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(5), || sockets() == 1),
        "worker {long_worker} holds {} sockets",
        sockets()
    );
    assert!(!server.logs().contains("broke the protocol"), "{}", server.logs());
}

#[test]
fn a_connection_sent_ahead_to_a_worker_that_dies_is_served_by_another() {
    let server = start();
    let mut first = get(&server, "/?sleep_ms=3000");
    wait_sleeping(&server, 1);
    let mut second = get(&server, "/?sleep_ms=3000");
    wait_sleeping(&server, 2);
    let mut quick = get(&server, "/quick");
    let doomed = sent_ahead_to(&server);
    // SAFETY: killing one of the supervisor's workers, on purpose.
    unsafe { libc::kill(doomed as i32, libc::SIGKILL) };

    let quick = quick.response().unwrap();
    assert_eq!(quick.status, 200, "it never started, so it is not lost: {}", quick.text());
    assert_ne!(quick.json()["worker"]["pid"].as_u64(), Some(doomed as u64));
    // The request the dead worker was serving gets its 502; the other is fine.
    let statuses = [first.response().unwrap().status, second.response().unwrap().status];
    let mut sorted = statuses;
    sorted.sort();
    assert_eq!(sorted, [200, 502], "{statuses:?}");
    assert!(!server.logs().contains("broke the protocol"), "{}", server.logs());
}

#[test]
fn a_worker_that_dies_on_a_connection_sent_ahead_answers_502_if_it_wrote_nothing() {
    let server = start_with(1);
    let mut first = get(&server, "/?sleep_ms=300");
    wait_sleeping(&server, 1);
    let mut second = get(&server, "/?sleep_ms=5000");
    let worker = sent_ahead_to(&server);
    // The first response goes out, then the worker starts the second one.
    assert_eq!(first.response().unwrap().status, 200);
    wait_sleeping(&server, 1);
    // SAFETY: killing the supervisor's worker, on purpose.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };
    // Bytes went out for the first connection, none for this one: a 502,
    // not a silent close.
    let r = second.response().expect("an answer, not a cut connection");
    assert_eq!(r.status, 502, "{}", r.text());
}

/// Waits until the status shows `n` connections sent ahead to `worker`.
fn wait_ahead(server: &Server, worker: u32, n: usize) {
    server.wait_status(Duration::from_secs(10), &format!("{n} sent ahead to worker {worker}"), |s| {
        s["worker_list"].as_array().is_some_and(|l| l.iter().any(|w| w["pid"] == worker && w["ahead"] == n))
    });
}

/// The one worker of `server` busy on `slow` (a target that sleeps), with
/// `first` and then `second` sent ahead to it: the three connections and
/// the worker's pid.
fn busy_with_two_ahead(
    server: &Server,
    slow: &str,
    first: &str,
    second: &str,
) -> (Client, Client, Client, u32) {
    let slow = get(server, slow);
    wait_sleeping(server, 1);
    let worker = server.children()[0];
    let first = get(server, first);
    wait_ahead(server, worker, 1);
    let second = get(server, second);
    wait_ahead(server, worker, 2);
    (slow, first, second, worker)
}

#[test]
fn two_connections_wait_ahead_of_one_busy_worker_and_are_served_in_order() {
    let server = start_with(1);
    let (mut slow_conn, mut first_conn, mut second_conn, worker) =
        busy_with_two_ahead(&server, "/?sleep_ms=500", "/first", "/second");

    let slow = slow_conn.response().unwrap().json();
    let (first, second) = (first_conn.response().unwrap().json(), second_conn.response().unwrap().json());
    assert_eq!(first["worker"]["pid"].as_u64(), Some(worker as u64));
    assert_eq!(second["worker"]["pid"].as_u64(), Some(worker as u64));
    let served = |doc: &serde_json::Value| doc["worker"]["requests"].as_u64().expect("a request count");
    assert_eq!(
        [served(&first), served(&second)],
        [served(&slow) + 1, served(&slow) + 2],
        "served right after the slow one, in the order they came"
    );
    // The worker held back its Dones for the first two while the next
    // waited ahead of it, and sent them together: each connection is kept
    // alive all the same.
    for (name, c) in [("slow", &mut slow_conn), ("first", &mut first_conn), ("second", &mut second_conn)] {
        c.send(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = c.response().unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    assert!(!server.logs().contains("broke the protocol"), "{}", server.logs());
}

#[test]
fn a_worker_that_dies_holding_back_dones_costs_only_the_request_it_was_on() {
    let server = start_with(1);
    let (mut slow, mut quick, mut doomed, worker) =
        busy_with_two_ahead(&server, "/?sleep_ms=400", "/quick", "/?sleep_ms=5000");
    // It finishes the slow one and the quick one, holding back both Dones
    // while a connection still waits ahead of it, and starts the last.
    assert_eq!(slow.response().unwrap().status, 200);
    assert_eq!(quick.response().unwrap().status, 200);
    wait_sleeping(&server, 1);
    // SAFETY: killing the supervisor's worker, on purpose.
    unsafe { libc::kill(worker as i32, libc::SIGKILL) };

    let r = doomed.response().expect("an answer, not a cut connection");
    assert_eq!(r.status, 502, "the one it was on: {}", r.text());
    // Their Dones died with the worker, but its claims of the ones after
    // them say they were finished and kept alive: no 502 follows their
    // responses, and they serve on (with the worker started in its place).
    for (name, c) in [("slow", &mut slow), ("quick", &mut quick)] {
        c.send(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = c.response().expect("the connection serves on");
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_ne!(r.json()["worker"]["pid"].as_u64(), Some(worker as u64), "{name}");
    }
    assert!(!server.logs().contains("broke the protocol"), "{}", server.logs());
}

#[test]
fn two_connections_waiting_ahead_of_a_worker_that_dies_are_served_by_its_successor() {
    let server = start_with(1);
    let (mut slow, mut first, mut second, doomed) =
        busy_with_two_ahead(&server, "/?sleep_ms=5000", "/first", "/second");
    // SAFETY: killing the supervisor's worker, on purpose.
    unsafe { libc::kill(doomed as i32, libc::SIGKILL) };

    let r = slow.response().expect("an answer, not a cut connection");
    assert_eq!(r.status, 502, "the request it was on: {}", r.text());
    // Neither was started: both go to the worker started in its place.
    for (name, c) in [("first", &mut first), ("second", &mut second)] {
        let r = c.response().unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_ne!(r.json()["worker"]["pid"].as_u64(), Some(doomed as u64), "{name}");
    }
    assert!(!server.logs().contains("broke the protocol"), "{}", server.logs());
}
