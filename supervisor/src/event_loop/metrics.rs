//! The metrics endpoint inside the loop (`--metrics`): accept, read one
//! request head, answer `GET /metrics` with the exposition of a fresh
//! status snapshot (or 404/405/400), close. Never blocks the loop: every
//! socket is non-blocking, a scraper has `SCRAPE_TIMEOUT` to send its head
//! and take the answer, and at most `MAX_SCRAPES` are served at once.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::poll::{Event, PollMode};
use log::debug;
use monodon_proto::http::{self, Limits};
use slab::Slab;

use super::{Supervisor, METRICS_BASE, METRICS_KEY};
use crate::listener::Listener;
use crate::metrics;

/// The largest request head read from a scraper.
const MAX_HEAD: usize = 8 * 1024;
/// Scrapers served at once; more are closed as they come.
const MAX_SCRAPES: usize = 16;
/// How long a scraper has to send its head and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// The metrics listener and the scrapes in progress.
pub(super) struct MetricsEndpoint {
    listener: Listener,
    scrapes: Slab<Scrape>,
}

struct Scrape {
    fd: OwnedFd,
    /// The head as it arrives, then the answer.
    buf: Vec<u8>,
    answering: bool,
    written: usize,
    deadline: Instant,
}

/// Binds the `--metrics` address and watches it.
pub(super) fn bind_metrics(
    addr: &crate::config::ListenAddr,
    poller: &crate::poll::Poller,
) -> io::Result<MetricsEndpoint> {
    let listener = Listener::bind(addr, 64)?;
    // SAFETY: the listener lives as long as the supervisor, which deletes
    // nothing of it from the poller before dropping it.
    unsafe {
        poller.add_with_mode(listener.fd().as_raw_fd(), Event::readable(METRICS_KEY), PollMode::Level)?
    };
    Ok(MetricsEndpoint { listener, scrapes: Slab::new() })
}

impl MetricsEndpoint {
    /// Where it listens (the real port if port 0 was asked for).
    pub(super) fn addr(&self) -> String {
        self.listener.addr.to_string()
    }

    /// Removes its socket file (a unix address) as the supervisor stops.
    pub(super) fn unlink(&self) {
        self.listener.unlink();
    }
}

/// What a scraper's head asks for: the answer's status line, and whether
/// the metrics go with it (not for HEAD). `None`: the head is not all here.
/// Parsed by the same code as every client's head.
fn answer_for(head: &[u8]) -> Option<(&'static str, bool)> {
    match http::parse_head(head, &Limits::default()) {
        Ok(None) => None,
        Err(rejection) if rejection.status == 431 => Some(("431 Request Header Fields Too Large", false)),
        Err(_) => Some(("400 Bad Request", false)),
        Ok(Some(head)) => {
            let path = head.target.split('?').next().unwrap_or_default();
            Some(match (head.method, path) {
                ("GET", "/metrics") => ("200 OK", true),
                ("HEAD", "/metrics") => ("200 OK", false),
                (_, "/metrics") => ("405 Method Not Allowed", false),
                _ => ("404 Not Found", false),
            })
        }
    }
}

impl Supervisor {
    pub(super) fn on_metrics_listener_readable(&mut self) {
        let Some(endpoint) = self.metrics.as_mut() else { return };
        loop {
            let fd = match endpoint.listener.accept() {
                Ok(Some((fd, _))) => fd,
                Ok(None) => return,
                Err(e) => {
                    debug!("metrics accept: {e}");
                    return;
                }
            };
            if endpoint.scrapes.len() >= MAX_SCRAPES {
                debug!("metrics: {MAX_SCRAPES} scrapes in progress; closing another");
                continue;
            }
            let entry = endpoint.scrapes.vacant_entry();
            let key = entry.key();
            // SAFETY: deleted from the poller in `close_scrape` before the fd drops.
            let added = unsafe {
                self.poller.add_with_mode(
                    fd.as_raw_fd(),
                    Event::readable(METRICS_BASE + key),
                    PollMode::Oneshot,
                )
            };
            if added.is_ok() {
                let deadline = Instant::now() + SCRAPE_TIMEOUT;
                entry.insert(Scrape { fd, buf: Vec::new(), answering: false, written: 0, deadline });
            }
        }
    }

    pub(super) fn on_scrape_event(&mut self, key: usize) {
        let Some(scrape) = self.metrics.as_mut().and_then(|m| m.scrapes.get_mut(key)) else { return };
        if scrape.answering {
            return self.write_scrape(key);
        }
        let mut chunk = [0u8; 2048];
        match nix::unistd::read(&scrape.fd, &mut chunk) {
            Ok(0) => return self.close_scrape(key),
            Ok(n) => scrape.buf.extend_from_slice(&chunk[..n]),
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(_) => return self.close_scrape(key),
        }
        let answer = match answer_for(&scrape.buf) {
            Some(answer) => answer,
            None if scrape.buf.len() > MAX_HEAD => ("431 Request Header Fields Too Large", false),
            None => {
                let _ = self.poller.modify_with_mode(
                    &scrape.fd,
                    Event::readable(METRICS_BASE + key),
                    PollMode::Oneshot,
                );
                return;
            }
        };
        let (status, metrics_wanted) = answer;
        let ok = status.starts_with("200");
        let (body, content_type) = if ok {
            (metrics::render(&self.status()), metrics::CONTENT_TYPE)
        } else {
            (format!("{status}\n"), "text/plain; charset=utf-8")
        };
        let with_body = metrics_wanted || !ok;
        let mut out = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if with_body {
            out.extend_from_slice(body.as_bytes());
        }
        let Some(scrape) = self.metrics.as_mut().and_then(|m| m.scrapes.get_mut(key)) else { return };
        scrape.buf = out;
        scrape.answering = true;
        self.write_scrape(key);
    }

    fn write_scrape(&mut self, key: usize) {
        let Some(scrape) = self.metrics.as_mut().and_then(|m| m.scrapes.get_mut(key)) else { return };
        while scrape.written < scrape.buf.len() {
            match nix::unistd::write(&scrape.fd, &scrape.buf[scrape.written..]) {
                Ok(0) => break,
                Ok(n) => scrape.written += n,
                Err(nix::errno::Errno::EAGAIN) => {
                    let _ = self.poller.modify_with_mode(
                        &scrape.fd,
                        Event::writable(METRICS_BASE + key),
                        PollMode::Oneshot,
                    );
                    return;
                }
                Err(_) => break,
            }
        }
        self.close_scrape(key);
    }

    fn close_scrape(&mut self, key: usize) {
        if let Some(scrape) = self.metrics.as_mut().and_then(|m| m.scrapes.try_remove(key)) {
            let _ = self.poller.delete(&scrape.fd);
        }
    }

    /// Closes the scrapes that ran out of time (a scraper that sends
    /// nothing, or never reads, holds nothing for long).
    pub(super) fn expire_scrapes(&mut self, now: Instant) {
        let Some(endpoint) = self.metrics.as_ref() else { return };
        let late: Vec<usize> =
            endpoint.scrapes.iter().filter(|(_, s)| now >= s.deadline).map(|(k, _)| k).collect();
        for key in late {
            debug!("metrics: a scrape timed out");
            self.close_scrape(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::answer_for;

    #[test]
    fn only_get_and_head_of_metrics_are_answered_with_metrics() {
        assert_eq!(answer_for(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(("200 OK", true)));
        assert_eq!(answer_for(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Some(("200 OK", true)));
        assert_eq!(answer_for(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(("200 OK", false)));
        assert_eq!(
            answer_for(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
            Some(("405 Method Not Allowed", false))
        );
        assert_eq!(answer_for(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Some(("404 Not Found", false)));
        assert_eq!(answer_for(b"GET /metrics HTTP/1.1\r\nHost"), None);
        assert_eq!(answer_for(b"\x00\x01 nonsense\r\n\r\n"), Some(("400 Bad Request", false)));
        assert_eq!(answer_for(b"GET /metrics HTTP/1.1\r\n\r\n"), Some(("400 Bad Request", false)), "no Host");
    }
}
