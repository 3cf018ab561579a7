//! `--forwarded-allow-ips`: a trusted peer's `Forwarded` / `X-Forwarded-*`
//! fields name the client and scheme the app and the access log see; an
//! untrusted peer's never do. Against the real binary, with the echo app.

mod common;

use std::time::Duration;

use common::{eventually, monodon, Scratch, Server};

/// What the app was told of a request sent on a new connection.
fn seen(server: &Server, preamble: &[u8], fields: &str) -> (String, String) {
    let mut c = server.connect();
    c.send(preamble);
    c.send(format!("GET /who HTTP/1.1\r\nHost: x\r\n{fields}\r\n").as_bytes());
    let doc = c.response().unwrap().json();
    (
        doc["peer"].as_str().unwrap_or_default().to_owned(),
        doc["scheme"].as_str().unwrap_or_default().to_owned(),
    )
}

fn own_peer(c: &common::Client) -> String {
    c.stream().local_addr().unwrap().to_string()
}

#[test]
fn this_hosts_proxy_is_trusted_by_default_and_its_client_logged() {
    let scratch = Scratch::new("forwarded-default");
    let log = scratch.0.join("access.log");
    let server =
        Server::start(&["--app", "echo", "--workers", "1", "--access-log", log.to_str().unwrap()], 1);
    let fields = "X-Forwarded-For: 6.6.6.6, 198.51.100.9\r\nX-Forwarded-Proto: https\r\n";
    // The leftmost entry is the client's own word, past an untrusted hop.
    assert_eq!(seen(&server, b"", fields), ("198.51.100.9:0".into(), "https".into()));
    let standard = "Forwarded: for=\"[2001:db8::5]:4711\";proto=https\r\n";
    assert_eq!(seen(&server, b"", standard), ("[2001:db8::5]:4711".into(), "https".into()));
    // Without the fields: the connection's own peer, plain http.
    let mut c = server.connect();
    c.send(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n");
    let doc = c.response().unwrap().json();
    assert_eq!((doc["peer"].as_str(), doc["scheme"].as_str()), (Some(own_peer(&c).as_str()), Some("http")));
    let logged = eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().any(|l| l.starts_with("198.51.100.9 - - [")))
    });
    assert!(logged, "the access log names the forwarded client");
}

#[test]
fn an_untrusted_peer_cannot_pose_as_another_client() {
    let server =
        Server::start(&["--app", "echo", "--workers", "1", "--forwarded-allow-ips", "10.0.0.0/8"], 1);
    let mut c = server.connect();
    c.send(b"GET /who HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.9\r\nX-Forwarded-Proto: https\r\n");
    c.send(b"Forwarded: for=198.51.100.10;proto=https\r\n\r\n");
    let doc = c.response().unwrap().json();
    assert_eq!(doc["peer"].as_str(), Some(own_peer(&c).as_str()));
    assert_eq!(doc["scheme"], "http");
    // The fields still reach the app as fields.
    let names: Vec<&str> = doc["headers"].as_array().unwrap().iter().filter_map(|h| h[0].as_str()).collect();
    assert!(names.contains(&"X-Forwarded-For") && names.contains(&"Forwarded"), "{names:?}");

    let none = Server::start(&["--app", "echo", "--workers", "1", "--forwarded-allow-ips", "none"], 1);
    let (peer, scheme) = seen(&none, b"", "X-Forwarded-For: 198.51.100.9\r\nX-Forwarded-Proto: https\r\n");
    assert!(peer.starts_with("127.0.0.1:") && scheme == "http", "{peer} {scheme}");
}

/// Behind a balancer speaking the PROXY protocol, the client it names is the
/// peer that must be trusted for its forwarding fields to count.
#[test]
fn with_the_proxy_protocol_the_named_client_is_the_peer_judged() {
    let server = Server::start(
        &["--app", "echo", "--workers", "1", "--proxy-protocol", "--forwarded-allow-ips", "10.0.0.0/8"],
        1,
    );
    let fields = "X-Forwarded-For: 6.6.6.6, 198.51.100.9\r\n";
    let trusted = b"PROXY TCP4 10.1.2.3 127.0.0.1 4000 80\r\n";
    assert_eq!(seen(&server, trusted, fields).0, "198.51.100.9:0");
    let untrusted = b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 80\r\n";
    assert_eq!(seen(&server, untrusted, fields).0, "192.0.2.1:4000");
}

#[test]
fn a_bad_list_is_refused_naming_the_item() {
    let out = monodon()
        .args(["serve", "--app", "hello", "--forwarded-allow-ips", "127.0.0.1,localhost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--forwarded-allow-ips") && stderr.contains("\"localhost\" is not an IP address"),
        "{stderr}"
    );
}

/// Without `--proxy-protocol`, a PROXY header is just a malformed request
/// line: refused with 400, never read as the client's address.
#[test]
fn a_proxy_header_is_never_taken_on_a_listener_without_the_flag() {
    let server = Server::start(&["--app", "echo", "--workers", "1"], 1);
    let mut c = server.connect();
    c.send(b"PROXY TCP4 198.51.100.9 127.0.0.1 4000 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(c.is_closed());
    let status = server.wait_status(Duration::from_secs(10), "the refusal counted", |s| {
        s["totals"]["supervisor_responses"]["4xx"] == 1
    });
    assert_eq!(status["totals"]["requests"], 0, "the app saw nothing: {status}");
}
