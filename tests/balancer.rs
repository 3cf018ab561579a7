//! Behind a load balancer: HAProxy (Debian's package) in front of two
//! monodon instances on 127.0.0.1, PROXY v2 to both, health checks on
//! `--health-path`, configured by `examples/haproxy.cfg`. A rolling reload of both under a bounded load, then one
//! stopped with SIGTERM: not one request fails.
//!
//! Needs `haproxy`; without it the test says so and passes, unless `CI` is
//! set, where .ci/run installs it.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{eventually, Client, Load, Scratch, Server};

/// HAProxy in the foreground with `config`, killed on drop.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn backend() -> Server {
    Server::start(&["--app", "echo", "--workers", "2", "--proxy-protocol", "--health-path", "/healthz"], 2)
}

#[test]
fn a_rolling_reload_and_a_stop_behind_haproxy_fail_no_request() {
    if !common::installed("haproxy", "-v", "haproxy") {
        return;
    }
    let scratch = Scratch::new("balancer");
    let (a, mut b) = (backend(), backend());
    let front = free_port();
    // The example config as shipped, with its addresses replaced.
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/haproxy.cfg")).unwrap();
    let config = example
        .replace("bind 127.0.0.1:8080", &format!("bind 127.0.0.1:{front}"))
        .replace("10.0.0.11:8080", &a.addr.to_string())
        .replace("10.0.0.12:8080", &b.addr.to_string());
    assert!(config.contains(&format!("server app2 {}", b.addr)), "the example names two servers");
    let path = scratch.0.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let check = Command::new("haproxy").args(["-c", "-q", "-f"]).arg(&path).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let _haproxy = Haproxy(
        Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let front: std::net::SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    // Both backends in rotation once their health checks pass.
    let (a_pids, b_pids) = (a.children(), b.children());
    let both = eventually(Duration::from_secs(10), || {
        let mut served_by = Vec::new();
        for _ in 0..10 {
            if std::net::TcpStream::connect(front).is_err() {
                return false;
            }
            let mut c = Client::connect(front);
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            match c.response() {
                Ok(r) if r.status == 200 => {
                    served_by.push(r.json()["worker"]["pid"].as_u64().unwrap_or(0) as u32)
                }
                _ => return false,
            }
        }
        served_by.iter().any(|p| a_pids.contains(p)) && served_by.iter().any(|p| b_pids.contains(p))
    });
    assert!(both, "haproxy sends to both backends");

    let load = Load::start(front, 3, 1, "/");
    load.wait_answered(200, Duration::from_secs(30));
    // Rolling reload: one, then the other.
    a.signal(libc::SIGHUP);
    a.wait_serving(2, Duration::from_secs(20));
    load.wait_answered(200, Duration::from_secs(30));
    b.signal(libc::SIGHUP);
    b.wait_serving(2, Duration::from_secs(20));
    load.wait_answered(200, Duration::from_secs(30));
    // One stops: the balancer drains it out, the other serves everything.
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(30)).is_some(), "b stopped");
    load.wait_answered(200, Duration::from_secs(30));
    let stats = load.stop();
    eprintln!("through haproxy: {} answered, {} failed", stats.ok, stats.failed);
    assert_eq!(stats.failed, 0, "{:?}", stats.errors);
    assert!(stats.ok >= 800, "{stats:?}");
}
