//! `monodon serve --psgi`: Perl apps as workers, against the real binary and
//! Debian's perl. Plack's own server test suite runs against it, and the
//! test apps in `tests/perl/` are wrapped in Plack's Lint, so a breach of
//! the PSGI spec shows as a 500 and the reason in the log.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use common::lang::{checksum, chunked, request};
use common::{eventually, Scratch, Server};

fn apps_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/perl").to_owned()
}

/// Whether perl has what the worker and the test apps load; CI installs
/// the packages.
fn have_perl() -> bool {
    common::available(
        std::process::Command::new("perl").args(["-MSocket::MsgHdr", "-MFile::Map", "-MPlack", "-e", "1"]),
        "libsocket-msghdr-perl libfile-map-perl libplack-perl",
    )
}

/// `monodon serve --psgi FILE` from `dir`, once `workers` are ready.
fn psgi_in(dir: &str, app: &str, args: &[&str], workers: usize) -> Server {
    let workers_arg = workers.to_string();
    let mut all = vec!["--psgi", app, "--chdir", dir, "--workers", &workers_arg];
    all.extend_from_slice(args);
    Server::start(&all, workers)
}

fn spec(args: &[&str], workers: usize) -> Server {
    psgi_in(&apps_dir(), "spec.psgi", args, workers)
}

/// Plack's Lint found nothing.
fn assert_clean_log(server: &Server) {
    let logs = server.logs();
    assert!(!logs.contains("Lint"), "Plack::Middleware::Lint objected:\n{logs}");
    assert!(!logs.contains("the app failed"), "{logs}");
}

/// Plack::Test::Suite, the suite every PSGI server is held to, run the way
/// Plack runs it against servers it cannot load itself: `tests/perl/suite.t`
/// execs monodon on the suite's port. All 36 cases must pass (none is
/// skipped: the suite skips only for CGI).
#[test]
fn plack_test_suite_passes_against_monodon() {
    if !have_perl() {
        return;
    }
    // Once with each way of receiving from the supervisor: the raw
    // recvmsg(2) of x86_64 and aarch64, and Socket::MsgHdr's.
    for msghdr in ["0", "1"] {
        run_plack_suite(msghdr);
    }
}

fn run_plack_suite(msghdr: &str) {
    let out = std::process::Command::new("perl")
        .arg(format!("{}/suite.t", apps_dir()))
        .env("MONODON", env!("CARGO_BIN_EXE_monodon"))
        .env("MONODON_PSGI_MSGHDR", msghdr)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let tap = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the suite failed:\n{tap}\n{log}");
    assert!(!tap.contains("not ok"), "{tap}");
    let cases = tap.lines().filter(|l| l.starts_with("# ")).count();
    assert_eq!(cases, 36, "every case of the suite ran:\n{tap}");
    let passed = tap.lines().filter(|l| l.starts_with("ok ")).count();
    let plan = tap.lines().find_map(|l| l.strip_prefix("1..")).and_then(|n| n.trim().parse::<usize>().ok());
    assert_eq!(plan, Some(passed), "every assertion passed:\n{tap}");
    assert!(!tap.contains("# skip"), "{tap}");
}

/// The env as Plack's servers build it: CGI keys from the supervisor's
/// parse, combined fields, the forwarded client, and the PSGI keys.
#[test]
fn the_env_follows_psgi() {
    if !have_perl() {
        return;
    }
    let server = spec(&[], 1);
    let doc = request(
        &server,
        "GET",
        "/environ?a=1&b=%20",
        "X-Multi: one\r\nX-Multi: two\r\nCookie: a=1\r\nCookie: b=2\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n",
        b"",
    )
    .json();
    let cgi = &doc["cgi"];
    assert_eq!(cgi["REQUEST_METHOD"], "GET");
    assert_eq!(cgi["PATH_INFO"], "/environ");
    assert_eq!(cgi["QUERY_STRING"], "a=1&b=%20");
    assert_eq!(cgi["REQUEST_URI"], "/environ?a=1&b=%20");
    assert_eq!(cgi["SCRIPT_NAME"], "");
    assert_eq!(cgi["SERVER_PROTOCOL"], "HTTP/1.1");
    assert_eq!(cgi["SERVER_NAME"], "127.0.0.1");
    assert_eq!(cgi["SERVER_PORT"], server.addr.port().to_string());
    assert_eq!(cgi["HTTP_X_MULTI"], "one, two");
    assert_eq!(cgi["HTTP_COOKIE"], "a=1; b=2");
    // A loopback peer is trusted by default: its forwarded fields count.
    assert_eq!(cgi["REMOTE_ADDR"], "203.0.113.9");
    assert_eq!(cgi["psgi.url_scheme"], "https");
    assert_eq!(cgi["psgi.multiprocess"], 1);
    assert_eq!(cgi["psgi.streaming"], 1);
    assert_eq!(cgi["psgix.harakiri"], 1);
    assert_eq!(doc["version"], serde_json::json!([1, 1]));
    assert_eq!(doc["buffered"], 1, "a body the supervisor had whole is seekable");
    // psgi.errors goes to the log, which comes through a reader thread.
    server.wait_for_log("env seen for /environ", Duration::from_secs(10));
    assert_clean_log(&server);
}

/// Bodies read through psgi.input in pieces: small ones the supervisor
/// had whole, large ones streamed from the connection (Content-Length and
/// chunked, which the worker decodes), and `Expect: 100-continue`, which
/// the worker answers when the app first reads.
#[test]
fn bodies_stream_through_psgi_input_chunked_or_not_with_100_continue() {
    if !have_perl() {
        return;
    }
    let server = spec(&["--buffer-body", "64K"], 1);
    let small: Vec<u8> = (0..5_000u32).map(|i| (i % 251) as u8).collect();
    let large: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    for (body, piece) in [(&small, 1000), (&large, 8192), (&large, 100_000)] {
        let r = request(
            &server,
            "POST",
            &format!("/body?piece={piece}"),
            &format!("Content-Length: {}\r\n", body.len()),
            body,
        );
        let doc = r.json();
        assert_eq!(doc["length"], body.len(), "{doc}");
        assert_eq!(doc["sum"], checksum(body), "{doc}");
        let framed = chunked(body, 7_777);
        let doc = request(
            &server,
            "POST",
            &format!("/body?piece={piece}"),
            "Transfer-Encoding: chunked\r\n",
            &framed,
        )
        .json();
        assert_eq!(doc["length"], body.len(), "chunked: {doc}");
        assert_eq!(doc["sum"], checksum(body), "chunked: {doc}");
        assert_eq!(doc["buffered"], u64::from(body.len() < 65536), "{doc}");
    }
    // 100-continue: the body follows only once the worker asks for it.
    let mut c = server.connect();
    c.send(
        format!(
            "POST /body HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            large.len()
        )
        .as_bytes(),
    );
    c.stream().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(c.stream().try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    reader.read_line(&mut line).unwrap();
    c.send(&large);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
    assert!(rest.contains(&format!("\"length\":{}", large.len())), "{rest}");
    // A broken chunked body streamed to the worker: 400, and the app's read fails.
    let mut bad = chunked(&large[..200_000], 50_000);
    bad.truncate(bad.len() - 5);
    bad.extend_from_slice(b"zz\r\n\r\n");
    let r = request(&server, "POST", "/body", "Transfer-Encoding: chunked\r\n", &bad);
    assert_eq!(r.status, 400, "{}", r.text());
}

/// Requests that frame their bodies two ways, or ambiguously, are refused
/// by the supervisor (400) and never reach the app; the app's env never
/// frames anything.
#[test]
fn smuggling_attempts_are_refused_before_the_app() {
    if !have_perl() {
        return;
    }
    let server = spec(&[], 1);
    for extra in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
    ] {
        let r =
            request(&server, "POST", "/body", extra, b"0\r\n\r\nGET /environ HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.status, 400, "{extra:?}: {}", r.text());
    }
    let status = server.status().unwrap();
    assert_eq!(
        status["totals"]["worker_responses"]["4xx"], 0,
        "no refused request reached a worker: {status}"
    );
    assert_eq!(status["totals"]["requests"], 0, "{status}");
}

#[test]
fn underscore_header_names_never_frame_and_are_dropped_refused_or_allowed() {
    if !have_perl() {
        return;
    }
    let drop = spec(&[], 1);
    let r = request(&drop, "POST", "/body", "Transfer_Encoding: chunked\r\nContent-Length: 5\r\n", b"hello");
    assert_eq!(r.json()["length"], 5, "{}", r.text());
    let seen = |s: &Server, fields: &str| request(s, "GET", "/environ", fields, b"").json()["cgi"].clone();
    assert!(seen(&drop, "X_Auth: evil\r\n").get("HTTP_X_AUTH").is_none(), "dropped");
    assert_eq!(seen(&drop, "X_Auth: evil\r\nX-Auth: good\r\n")["HTTP_X_AUTH"], "good");

    let refuse = spec(&["--underscore-headers", "refuse"], 1);
    assert_eq!(request(&refuse, "GET", "/environ", "X_Auth: evil\r\n", b"").status, 400);
    assert_eq!(request(&refuse, "GET", "/environ", "X-Auth: good\r\n", b"").status, 200);

    let allow = spec(&["--underscore-headers", "allow"], 1);
    assert_eq!(seen(&allow, "X_Auth: evil\r\n")["HTTP_X_AUTH"], "evil");
    assert_eq!(
        seen(&allow, "X_Auth: evil\r\nX-Auth: good\r\n")["HTTP_X_AUTH"],
        "good",
        "a dash name is never replaced"
    );
}

/// Each forked worker calls srand; psgix.harakiri retires a worker after
/// its response (no respawn counted, as Starlet and Monoceros do);
/// psgix.cleanup handlers run after the response.
#[test]
fn workers_are_reseeded_and_harakiri_and_cleanup_handlers_work() {
    if !have_perl() {
        return;
    }
    let server = spec(&[], 2);
    let mut draws = std::collections::BTreeMap::new();
    for doc in common::lang::draw_on_two_workers(&server) {
        draws.insert(doc["pid"].as_u64().unwrap(), doc["random"].as_f64().unwrap());
    }
    assert_eq!(draws.len(), 2, "both workers answered: {draws:?}");
    let values: Vec<f64> = draws.values().copied().collect();
    assert_ne!(values[0], values[1], "each forked worker has its own random state");

    let doc = request(&server, "GET", "/harakiri", "", b"").json();
    assert_eq!(doc["harakiri"], 1);
    let pid = doc["pid"].as_u64().unwrap();
    let status = server.wait_status(Duration::from_secs(10), "the retired worker replaced", |s| {
        s["worker_list"]
            .as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|w| w["pid"] != pid && w["state"] == "idle"))
    });
    assert_eq!(status["totals"]["respawns"], 0, "{status}");

    let scratch = Scratch::new("psgi-cleanup");
    let marker = scratch.0.join("cleaned");
    let doc = request(&server, "GET", &format!("/cleanup?file={}", marker.display()), "", b"").json();
    assert_eq!(doc["cleanup"], 1);
    assert!(eventually(Duration::from_secs(5), || marker.exists()), "the cleanup handler ran");
    assert_clean_log(&server);
}

#[test]
fn without_preload_each_worker_loads_the_app() {
    if !have_perl() {
        return;
    }
    let preloaded = spec(&[], 1);
    let doc = request(&preloaded, "GET", "/environ", "", b"").json();
    assert_ne!(doc["pid"], doc["loaded_in"], "loaded once, in the template");
    let server = spec(&["--no-preload"], 1);
    let doc = request(&server, "GET", "/environ", "", b"").json();
    assert_eq!(doc["pid"], doc["loaded_in"]);
}

#[test]
fn recycling_timeouts_status_streaming_and_the_access_log_work_as_for_any_worker() {
    if !have_perl() {
        return;
    }
    let scratch = Scratch::new("psgi-ops");
    let log = scratch.0.join("access.log");
    let args = common::lang::operations_args(&log);
    let server = spec(&args.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    common::lang::check_operations(&server, &log);
    // A streamed response goes out chunked and whole.
    let r = request(&server, "GET", "/stream", "", b"");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text().lines().count(), 100);
    assert!(r.text().ends_with("row 100\n"));
    assert_clean_log(&server);
}

/// A hot deploy with edited code: served under load without a failed
/// request; a broken file in place never reaches the running generation
/// (its template keeps the code it loaded, and recycling forks from it); a
/// reload that cannot load the app is abandoned.
#[test]
fn hup_serves_new_code_and_a_broken_file_never_takes_the_service_down() {
    if !have_perl() {
        return;
    }
    common::lang::check_hot_deploy(
        &Scratch::new("psgi-deploy"),
        "app.psgi",
        |v| format!("sub {{ [200, ['Content-Type' => 'text/plain'], [\"{v}\\n\"]] }};\n"),
        "sub { [200, [], [\n",
        |dir| psgi_in(dir, "app.psgi", &["--max-requests-per-child", "20"], 2),
        "loading app.psgi: syntax error",
    );
}

/// An app that cannot be loaded never serves: its template's error is in
/// the log and the supervisor starts it again with back-off, so a fix on
/// disk is picked up. `-I` adds to @INC. A missing interpreter or module
/// is a CLI error naming it (and the module's Debian package).
#[test]
fn load_errors_include_dirs_and_missing_modules_are_reported() {
    if !have_perl() {
        return;
    }
    let scratch = Scratch::new("psgi-load");
    let dir = scratch.0.to_str().unwrap().to_owned();
    std::fs::create_dir_all(scratch.0.join("lib")).unwrap();
    std::fs::write(scratch.0.join("app.psgi"), "use Greeting; sub { [200, [], [Greeting::hello()]] };\n")
        .unwrap();
    let mut cmd = common::monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--psgi", "app.psgi", "-I", "lib"]).args([
        "--chdir",
        &dir,
        "--workers",
        "1",
    ]);
    let server = Server::start_cmd(&mut cmd, 0);
    server.wait_for_log("Can't locate Greeting.pm in @INC", Duration::from_secs(10));
    server.wait_for_log("next start in", Duration::from_secs(10));
    std::fs::write(scratch.0.join("lib/Greeting.pm"), "package Greeting; sub hello { \"fixed\\n\" } 1;\n")
        .unwrap();
    server.wait_status(Duration::from_secs(30), "a worker ready once the module exists", |s| {
        common::ready_workers(s, 1) == 1
    });
    assert_eq!(server.get("/").text(), "fixed\n");

    let e = common::monodon()
        .args(["serve", "--psgi", "x.psgi", "--perl", "/nonexistent/perl"])
        .output()
        .unwrap();
    assert_eq!(e.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&e.stderr).contains("--perl /nonexistent/perl: no such program"));
    // A perl whose File::Map cannot load.
    std::fs::create_dir_all(scratch.0.join("broken/File")).unwrap();
    std::fs::write(scratch.0.join("broken/File/Map.pm"), "die 'not here';\n").unwrap();
    let perl = scratch.script("perl", &format!("PERL5LIB={dir}/broken exec perl \"$@\""));
    let e = common::monodon()
        .args(["serve", "--psgi", "x.psgi", "--perl", perl.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(e.status.code(), Some(2));
    let said = String::from_utf8_lossy(&e.stderr);
    assert!(said.contains("missing: File::Map (Debian: libfile-map-perl)"), "{said}");
}

/// SERVER_NAME and SERVER_PORT come from the connection's own address on
/// IPv6 and unix listeners too (from Host on a unix socket, which has none).
#[test]
fn the_server_address_is_right_on_ipv6_and_unix_listeners() {
    if !have_perl() {
        return;
    }
    let scratch = Scratch::new("psgi-listeners");
    let path = scratch.0.join("app.sock");
    let unix = format!("unix:{}", path.display());
    let server = spec(&["--listen", "[::1]:0", "--listen", &unix], 1);
    let (v6_port, over_v6, cgi) = common::lang::environ_on_ipv6_and_unix(&server, &path);
    assert_eq!(
        (over_v6["SERVER_NAME"].as_str(), over_v6["REMOTE_ADDR"].as_str()),
        (Some("::1"), Some("::1"))
    );
    assert_eq!(over_v6["SERVER_PORT"], v6_port.to_string());
    assert_eq!(
        (cgi["SERVER_NAME"].as_str(), cgi["SERVER_PORT"].as_str()),
        (Some("app.example"), Some("8443"))
    );
    assert_eq!(cgi["REMOTE_ADDR"], "");
    assert_clean_log(&server);
}

/// A body trickled below --min-body-rate is cut off with 408 once the 10 s
/// grace has passed, so a slow sender cannot hold a Perl worker.
#[test]
fn a_body_trickled_below_the_minimum_rate_is_cut_off() {
    if !have_perl() {
        return;
    }
    let server = spec(&["--min-body-rate", "4KiB"], 1);
    common::lang::check_trickled_body_is_cut_off(&server, "/body?piece=1000");
}
