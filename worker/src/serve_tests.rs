//! HTTP on one connection, run over bytes in memory: pipelining and its
//! limit, `100 Continue`, HEAD, bodies the app leaves unread, read-ahead,
//! and what is handed back to the supervisor.

use std::time::Duration;

use monodon_proto::http::Limits;
use monodon_proto::scoreboard::Scoreboard;

use crate::serve::{serve_connection, Budget, Outcome};
use crate::stream::Input;
use crate::test_support::{app, context, replies, MemConn};

struct Run {
    outcome: Outcome,
    out: Vec<u8>,
    last_request_announced: bool,
}

/// Serves `initial` (what the supervisor passed) and then `later` reads.
fn serve(initial: &[u8], later: &[&[u8]], limits: Limits, read_ahead: Duration, budget: Option<u64>) -> Run {
    let board = Scoreboard::create().expect("a scoreboard");
    let ctx = context(board.slot(), &limits, read_ahead);
    let conn = MemConn::sent(later);
    let mut input = Input::new(conn, initial);
    let mut announced = false;
    let mut on_last = || announced = true;
    let mut budget = Budget { remaining: budget, on_last: &mut on_last };
    let mut app = app;
    let outcome = serve_connection(&mut app, &mut input, 0, &ctx, &mut budget);
    Run { outcome, out: input.stream.out, last_request_announced: announced }
}

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
}

#[test]
fn pipelined_requests_are_answered_in_order_and_the_rest_handed_back() {
    let mut initial = [get("/1"), get("/2"), get("/3")].concat();
    initial.extend_from_slice(b"GET /4 HTTP/1.1\r\nHo");
    let run = serve(&initial, &[], Limits::default(), Duration::ZERO, None);
    let bodies: Vec<Vec<u8>> = replies(&run.out, false).into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, [b"GET /1".to_vec(), b"GET /2".to_vec(), b"GET /3".to_vec()]);
    assert_eq!(
        run.outcome,
        Outcome { keep: true, served: 3, leftover: b"GET /4 HTTP/1.1\r\nHo".to_vec(), retiring: false }
    );
}

#[test]
fn more_pipelined_requests_than_allowed_get_429_and_a_close() {
    let limits = Limits { max_pipelined: 1, ..Limits::default() };
    let run =
        serve(&[get("/1"), get("/2"), get("/3"), get("/4")].concat(), &[], limits, Duration::ZERO, None);
    let statuses: Vec<u16> = replies(&run.out, false).iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 429], "one request may wait behind the one being answered");
    assert!(!run.outcome.keep);
    // A client that waits for each response is never counted as pipelining.
    let run = serve(&get("/1"), &[&get("/2"), &get("/3")], limits, Duration::from_millis(1), None);
    let statuses: Vec<u16> = replies(&run.out, false).iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200]);
}

#[test]
fn expect_100_continue_is_sent_when_the_app_reads_the_body() {
    let head = b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
    let run = serve(head, &[b"hello"], Limits::default(), Duration::ZERO, None);
    let r = replies(&run.out, false);
    assert_eq!((r[0].status, r[1].status), (100, 200));
    assert_eq!(r[1].body, b"read 5");
    assert!(run.outcome.keep);
}

#[test]
fn expect_100_continue_unread_is_never_sent_and_the_connection_closes() {
    let head = b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n";
    let run = serve(head, &[b"hello"], Limits::default(), Duration::ZERO, None);
    let r = replies(&run.out, false);
    assert_eq!(r.len(), 1, "no 100 Continue: {r:?}");
    assert_eq!(r[0].status, 200);
    assert!(r[0].head.contains("Connection: close"), "{}", r[0].head);
    assert!(!run.outcome.keep, "the client may still send the body it was not asked for");
}

#[test]
fn head_responses_have_no_body() {
    let run = serve(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n", &[], Limits::default(), Duration::ZERO, None);
    let text = String::from_utf8_lossy(&run.out).into_owned();
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.contains("Content-Length: 7\r\n"), "the length GET would have: {text}");
    assert!(text.ends_with("\r\n\r\n"), "no body after the head: {text:?}");
    assert!(run.outcome.keep);
}

#[test]
fn a_body_the_app_leaves_unread_is_drained_and_the_next_request_served() {
    let post = b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789";
    let chunked =
        b"POST /ignore HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let run =
        serve(&[&post[..], chunked, &get("/next")].concat(), &[], Limits::default(), Duration::ZERO, None);
    let bodies: Vec<Vec<u8>> = replies(&run.out, false).into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, [b"POST /ignore".to_vec(), b"POST /ignore".to_vec(), b"GET /next".to_vec()]);
    assert!(run.outcome.keep);
}

#[test]
fn a_bad_body_is_refused_and_the_connection_closed() {
    let bad = b"POST /read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
    let run = serve(&[&bad[..], &get("/never")].concat(), &[], Limits::default(), Duration::ZERO, None);
    let r = replies(&run.out, false);
    assert_eq!(r.iter().map(|r| r.status).collect::<Vec<_>>(), [400]);
    assert!(!run.outcome.keep);
}

#[test]
fn read_ahead_serves_the_next_request_when_it_comes_in_time() {
    let run = serve(&get("/1"), &[&get("/2")], Limits::default(), Duration::from_millis(1), None);
    assert_eq!(replies(&run.out, false).len(), 2);
    assert_eq!(run.outcome.served, 2);
    // Without read-ahead the connection goes back after the first.
    let run = serve(&get("/1"), &[&get("/2")], Limits::default(), Duration::ZERO, None);
    assert_eq!(replies(&run.out, false).len(), 1);
    assert_eq!(run.outcome, Outcome { keep: true, served: 1, leftover: Vec::new(), retiring: false });
}

#[test]
fn the_last_request_of_the_budget_is_announced_and_the_rest_handed_back() {
    let run =
        serve(&[get("/1"), get("/2"), get("/3")].concat(), &[], Limits::default(), Duration::ZERO, Some(2));
    assert_eq!(replies(&run.out, false).len(), 2);
    assert!(run.last_request_announced, "the supervisor hears of it as the last request starts");
    assert_eq!(run.outcome, Outcome { keep: true, served: 2, leftover: get("/3"), retiring: true });
}

#[test]
fn a_bad_head_after_good_ones_is_refused_after_their_responses() {
    let run = serve(
        &[get("/1"), b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec()].concat(),
        &[],
        Limits::default(),
        Duration::ZERO,
        None,
    );
    let statuses: Vec<u16> = replies(&run.out, false).iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 400]);
    assert_eq!(run.outcome.served, 1);
    assert!(!run.outcome.keep);
}
