//! A seeded simulation of one connection crossing between the supervisor's
//! framing and a worker, run on the real code of both sides.
//!
//! The supervisor and a worker must agree on where every request ends, or a
//! client could smuggle one request inside another. Each schedule makes a
//! client script from its seed (GETs, bodies by Content-Length or chunked,
//! bodies the app leaves unread, malformed requests, a final
//! `Connection: close`), cuts the bytes at random points, and plays them:
//! the supervisor's `PendingRequest` reads pieces until a request is ready,
//! hands its bytes to `serve_connection` with a random number of the next
//! pieces already sent, takes the leftover back, and so on until the
//! connection closes or the client is done. Whatever the cuts and the
//! hand-over points, the client must get one response per request, in
//! order, each the app's answer to that request, and after a malformed
//! request one refusal and nothing more.
//!
//! `cargo test` runs 10,000 schedules; `MONODON_SIM_SCHEDULES=N` runs N;
//! `MONODON_SIM_SEED=S` replays one. A failure names its seed.

use std::collections::VecDeque;
use std::time::Duration;

use monodon_proto::http::{Limits, PendingRequest};
use monodon_proto::scoreboard::Scoreboard;

use crate::serve::{serve_connection, Budget};
use crate::stream::Input;
use crate::test_support::{app, context, replies, MemConn};

/// What the client sends, and what it must get back for it.
struct Step {
    bytes: Vec<u8>,
    /// The body of the app's answer, or `None` for a request that must be
    /// refused (any 4xx/5xx) with the connection closed after it.
    answer: Option<Vec<u8>>,
    /// The request asks to close the connection after its answer.
    closes: bool,
}

const MALFORMED: &[&str] = &[
    "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 3\r\n\r\nabc",
    "GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    "POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
    "CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n",
    "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
    "GET /bad HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
];

fn step(rng: &mut fastrand::Rng, i: usize, last: bool) -> Step {
    let closes = last && rng.bool();
    let close = if closes { "Connection: close\r\n" } else { "" };
    let body: Vec<u8> = (0..rng.usize(0..200)).map(|_| rng.alphanumeric() as u8).collect();
    match rng.u8(0..10) {
        0..=3 => Step {
            bytes: format!("GET /{i} HTTP/1.1\r\nHost: x\r\n{close}\r\n").into_bytes(),
            answer: Some(format!("GET /{i}").into_bytes()),
            closes,
        },
        4..=5 => {
            let head = format!(
                "POST /read?{i} HTTP/1.1\r\nHost: x\r\n{close}Content-Length: {}\r\n\r\n",
                body.len()
            );
            Step {
                bytes: [head.as_bytes(), &body].concat(),
                answer: Some(format!("read {}", body.len()).into_bytes()),
                closes,
            }
        }
        6..=7 => {
            let mut bytes =
                format!("POST /read?{i} HTTP/1.1\r\nHost: x\r\n{close}Transfer-Encoding: chunked\r\n\r\n")
                    .into_bytes();
            let mut rest = &body[..];
            while !rest.is_empty() {
                let n = rng.usize(1..=rest.len());
                let ext = if rng.u8(0..4) == 0 { ";x=1" } else { "" };
                bytes.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
                bytes.extend_from_slice(&rest[..n]);
                bytes.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            bytes.extend_from_slice(if rng.bool() { b"0\r\n\r\n" } else { b"0\r\nX-Sum: 1\r\n\r\n" });
            Step { bytes, answer: Some(format!("read {}", body.len()).into_bytes()), closes }
        }
        8 => {
            let head = format!(
                "POST /ignore?{i} HTTP/1.1\r\nHost: x\r\n{close}Content-Length: {}\r\n\r\n",
                body.len()
            );
            Step {
                bytes: [head.as_bytes(), &body].concat(),
                answer: Some(format!("POST /ignore?{i}").into_bytes()),
                closes,
            }
        }
        _ => Step {
            bytes: MALFORMED[rng.usize(..MALFORMED.len())].as_bytes().to_vec(),
            answer: None,
            closes: false,
        },
    }
}

/// Plays schedule `seed`; what went wrong, if anything.
fn play(seed: u64, board: &Scoreboard) -> Result<(), String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let n = rng.usize(1..12);
    let steps: Vec<Step> = (0..n).map(|i| step(&mut rng, i, i + 1 == n)).collect();
    let all: Vec<u8> = steps.iter().flat_map(|s| s.bytes.iter().copied()).collect();
    // The cuts: where the network happens to split the client's bytes.
    let mut cuts: Vec<usize> = (0..rng.usize(0..40)).map(|_| rng.usize(0..=all.len())).collect();
    cuts.push(all.len());
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces: VecDeque<Vec<u8>> = VecDeque::new();
    let mut from = 0;
    for to in cuts {
        if to > from {
            pieces.push_back(all[from..to].to_vec());
            from = to;
        }
    }

    let limits = Limits::default();
    let read_ahead = if rng.bool() { Duration::from_micros(1) } else { Duration::ZERO };
    let ctx = context(board.slot(), &limits, read_ahead);
    let mut app = app;
    let mut pending = PendingRequest::default();
    let mut out = Vec::new();
    let mut served = 0;
    let mut closed = false;
    loop {
        match pending.check(&limits) {
            Err(rejection) => {
                out.extend_from_slice(&rejection.response());
                closed = true;
                break;
            }
            Ok(false) => match pieces.pop_front() {
                Some(piece) => pending.extend(&piece),
                None => break,
            },
            Ok(true) => {
                // The hand-over: a random number of the next pieces have
                // already arrived and are the worker's to read.
                let arrived = rng.usize(0..=pieces.len());
                let conn = MemConn {
                    arrived: pieces.drain(..arrived).collect(),
                    future: std::mem::take(&mut pieces),
                    out: Vec::new(),
                };
                let mut input = Input::new(conn, pending.bytes());
                let mut on_last = || {};
                let mut budget = Budget { remaining: None, on_last: &mut on_last };
                let outcome = serve_connection(&mut app, &mut input, served, &ctx, &mut budget);
                served = outcome.served;
                out.extend_from_slice(&input.stream.out);
                // What the worker did not read is still in the socket, in order.
                pieces = input.stream.arrived;
                pieces.extend(input.stream.future);
                if !outcome.keep {
                    closed = true;
                    break;
                }
                pending.reset_to(&outcome.leftover);
            }
        }
    }

    // What the client must have got.
    let got = replies(&out, false);
    let mut expected: Vec<Option<&[u8]>> = Vec::new();
    let mut ends_closed = false;
    for s in &steps {
        expected.push(s.answer.as_deref());
        if s.answer.is_none() || s.closes {
            ends_closed = true;
            break;
        }
    }
    let describe = || {
        let script: Vec<String> =
            steps.iter().map(|s| String::from_utf8_lossy(&s.bytes).into_owned()).collect();
        let answers: Vec<(u16, String)> =
            got.iter().map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned())).collect();
        format!("script {script:?}\ngot {answers:?}")
    };
    if got.len() != expected.len() {
        return Err(format!("{} responses for {} requests\n{}", got.len(), expected.len(), describe()));
    }
    for (i, (reply, want)) in got.iter().zip(&expected).enumerate() {
        match want {
            Some(body) if reply.status == 200 && reply.body == *body => {}
            None if reply.status >= 400 => {}
            _ => return Err(format!("response {i} is {} {:?}\n{}", reply.status, reply.body, describe())),
        }
    }
    if ends_closed != closed {
        return Err(format!(
            "the connection {} closed\n{}",
            if closed { "was" } else { "was not" },
            describe()
        ));
    }
    let all_answered = pending.is_empty() && pieces.is_empty();
    if !ends_closed && !all_answered {
        return Err(format!("bytes left unanswered: {:?}\n{}", pending.bytes(), describe()));
    }
    Ok(())
}

#[test]
fn supervisor_and_worker_agree_on_every_request_boundary() {
    let board = Scoreboard::create().expect("a scoreboard");
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match var("MONODON_SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..var("MONODON_SIM_SCHEDULES").unwrap_or(10_000)).collect(),
    };
    for &seed in &seeds {
        if let Err(e) = play(seed, &board) {
            panic!("schedule failed; replay with MONODON_SIM_SEED={seed}\n{e}");
        }
    }
    eprintln!("{} schedules played", seeds.len());
}
