//! Descriptor and memory hygiene under abuse: thousands of connections of
//! every kind (keep-alive, close, aborted mid-head and mid-body, reset
//! mid-response) with reloads and worker kills mixed in. Afterwards the
//! supervisor is back to its baseline descriptors, its memory has not
//! grown with the traffic, and each worker holds only what it should.

mod common;

use std::io::Write;
use std::net::TcpStream;
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

#[test]
fn no_leaks_after_mixed_abuse_reloads_and_kills() {
    let server = Server::start(&["--app", "echo", "--workers", "2", "--head-timeout", "2s"], 2);
    for _ in 0..200 {
        assert_eq!(server.get("/warm").status, 200);
    }
    let fd_baseline = server.fd_count();
    let rss_baseline = rss_kib(server.pid);
    for i in 0..6000u32 {
        if i % 1500 == 750 {
            server.signal(libc::SIGHUP);
        }
        if i % 2000 == 1000 {
            if let Some(w) = server.children().first() {
                // SAFETY: killing one of the supervisor's workers, on purpose.
                unsafe { libc::kill(*w as i32, libc::SIGKILL) };
            }
        }
        let Ok(mut s) = TcpStream::connect(server.addr) else { continue };
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
    }
    // Timeouts (head: 2 s, linger: 2 s) close what the clients left open.
    let settled = eventually(Duration::from_secs(20), || server.fd_count() <= fd_baseline);
    assert!(
        settled,
        "supervisor fds: baseline {fd_baseline}, now {} ({:?})",
        server.fd_count(),
        fd_kinds(server.pid)
    );
    assert_eq!(server.get("/after").status, 200);
    let rss = rss_kib(server.pid);
    eprintln!("supervisor RSS: {rss_baseline} KiB before, {rss} KiB after 6,000 abusive connections");
    assert!(rss < rss_baseline + 8 * 1024, "RSS grew from {rss_baseline} KiB to {rss} KiB");
    // An idle worker holds stdin/out/err, its channel and its scoreboard: nothing else.
    assert!(eventually(Duration::from_secs(10), || server.children().len() == 2));
    for w in server.children() {
        let kinds = fd_kinds(w);
        let sockets = kinds.iter().filter(|k| k.as_str() == "socket").count();
        assert!(
            eventually(Duration::from_secs(5), || fd_kinds(w)
                .iter()
                .filter(|k| k.as_str() == "socket")
                .count()
                == 1),
            "worker {w} holds only its channel socket: {kinds:?} ({sockets} sockets)"
        );
        assert!(fd_kinds(w).len() <= 6, "worker {w}: {:?}", fd_kinds(w));
    }
}
