//! Descriptor and memory hygiene under abuse: 100,000 connections of
//! every kind (keep-alive, close, aborted mid-head and mid-body, reset
//! mid-response) with reloads and worker kills mixed in. Afterwards the
//! supervisor is back to its baseline descriptors, its memory has not
//! grown with the traffic, and each worker holds only what it should.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{eventually, Server};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The kinds of descriptor a process holds: ("socket", 3), ("anon_inode:[eventpoll]", 1)...
fn fd_kinds(pid: u32) -> Vec<String> {
    let mut kinds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| {
                    let t = t.to_string_lossy().into_owned();
                    t.split(":[").next().unwrap_or(&t).to_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    kinds.sort();
    kinds
}

/// As many as the hardening issue asks for: each kind of abuse below, over
/// and over, while the server reloads ten times and loses eight workers.
const CONNECTIONS: u32 = 100_000;
/// Client threads making them, for a run of seconds rather than a minute.
const CLIENT_THREADS: u32 = 4;

#[test]
fn no_leaks_after_mixed_abuse_reloads_and_kills() {
    let server = Server::start(&["--app", "echo", "--workers", "2", "--head-timeout", "2s"], 2);
    for _ in 0..200 {
        assert_eq!(server.get("/warm").status, 200);
    }
    let fd_baseline = server.fd_count();
    let rss_baseline = rss_kib(server.pid);
    let started = std::time::Instant::now();
    let done = AtomicU32::new(0);
    let refused = AtomicU32::new(0);
    // Fail, with the logs, rather than hang if the server stops serving.
    let deadline = started + Duration::from_secs(240);
    std::thread::scope(|scope| {
        for t in 0..CLIENT_THREADS {
            let (done, refused, addr) = (&done, &refused, server.addr);
            scope.spawn(move || {
                for i in (t..CONNECTIONS).step_by(CLIENT_THREADS as usize) {
                    if std::time::Instant::now() > deadline {
                        return;
                    }
                    if !abuse(addr, i) {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        // Reloads and worker kills, spread over the run.
        let (mut next_reload, mut next_kill) = (5_000, 6_000);
        while done.load(Ordering::Relaxed) < CONNECTIONS && std::time::Instant::now() <= deadline {
            let so_far = done.load(Ordering::Relaxed);
            if so_far >= next_reload {
                server.signal(libc::SIGHUP);
                next_reload += 10_000;
            }
            if so_far >= next_kill {
                if let Some(w) = server.children().first() {
                    // SAFETY: killing one of the supervisor's workers, on purpose.
                    unsafe { libc::kill(*w as i32, libc::SIGKILL) };
                }
                next_kill += 12_500;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let refused = refused.into_inner();
    let done = done.into_inner();
    assert_eq!(
        done,
        CONNECTIONS,
        "only {done} connections in {:?}; logs:\n{}",
        started.elapsed(),
        server.logs()
    );
    // Timeouts (head: 2 s, linger: 2 s) close what the clients left open.
    let settled = eventually(Duration::from_secs(20), || server.fd_count_is_settled(fd_baseline));
    assert!(
        settled,
        "supervisor fds: baseline {fd_baseline}, now {} ({:?})",
        server.fd_count(),
        fd_kinds(server.pid)
    );
    assert_eq!(server.get("/after").status, 200);
    let rss = rss_kib(server.pid);
    eprintln!(
        "{CONNECTIONS} connections in {:.1?} ({refused} refused); supervisor RSS {rss_baseline} KiB before, {rss} KiB after",
        started.elapsed()
    );
    assert!(refused < CONNECTIONS / 100, "{refused} of {CONNECTIONS} connections refused");
    assert!(rss < rss_baseline + 8 * 1024, "RSS grew from {rss_baseline} KiB to {rss} KiB");
    // An idle worker holds stdin/out/err, its channel and its scoreboard,
    // and, as it accepts, the listener, its vault's two ends and its epoll:
    // no client connection.
    assert!(eventually(Duration::from_secs(10), || server.children().len() == 2));
    for w in server.children() {
        let kinds = fd_kinds(w);
        let sockets = kinds.iter().filter(|k| k.as_str() == "socket").count();
        assert!(
            eventually(Duration::from_secs(5), || fd_kinds(w)
                .iter()
                .filter(|k| k.as_str() == "socket")
                .count()
                == 4),
            "worker {w} holds only its channel, listener and vault sockets: {kinds:?} ({sockets} sockets)"
        );
        assert!(fd_kinds(w).len() <= 10, "worker {w}: {:?}", fd_kinds(w));
    }
}

/// One connection of kind `i % 6`; false if it could not even connect.
fn abuse(addr: std::net::SocketAddr, i: u32) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = match i % 6 {
        0 => s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        1 => s.write_all(b"GET /ka HTTP/1.1\r\nHost: x\r\n\r\n"),
        2 => s.write_all(b"GET /half-a-head HTTP/1.1\r\nHo"),
        3 => s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nonly the start"),
        4 => s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"),
        _ => {
            // Reset mid-response: SO_LINGER 0 turns close() into an RST.
            let r = s.write_all(b"GET /?sleep_ms=5 HTTP/1.1\r\nHost: x\r\n\r\n");
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: a valid linger struct for this socket's own fd.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            r
        }
    };
    if i % 6 < 2 {
        let mut buf = [0u8; 512];
        let _ = std::io::Read::read(&mut s, &mut buf);
    }
    true
}
