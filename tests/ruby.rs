//! `monodon serve --rack`: Ruby Rack apps as workers, against the real
//! binary and a real interpreter (Debian's /usr/bin/ruby where there is
//! one, else ruby on PATH). The test app `tests/ruby/spec.ru` runs under
//! Rack::Lint, so a breach of the Rack SPEC shows as a 500 and a LintError
//! in the log. Each test passes, saying so, where Ruby or a package it
//! needs is missing (not under CI, which installs them).

mod common;

use std::time::Duration;

use common::lang::{checksum, chunked, lines_body, request};
use common::{Scratch, Server};

fn ruby() -> &'static str {
    if std::path::Path::new("/usr/bin/ruby").exists() {
        "/usr/bin/ruby"
    } else {
        "ruby"
    }
}

/// Whether Ruby can `require` each of `libraries` (Debian's `package`).
fn have(libraries: &[&str], package: &str) -> bool {
    if !common::installed(ruby(), "--version", "ruby") {
        return false;
    }
    let script: String = libraries.iter().map(|l| format!("require '{l}';")).collect();
    common::available(std::process::Command::new(ruby()).args(["-e", &script]), package)
}

fn have_rack() -> bool {
    have(&["rack", "rack/lint"], "ruby-rack")
}

fn apps_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ruby").to_owned()
}

/// `monodon serve --rack APP` from `dir`, once `workers` are ready.
fn rack_in(dir: &str, app: &str, args: &[&str], workers: usize) -> Server {
    let workers_arg = workers.to_string();
    let mut all = vec!["--rack", app, "--ruby", ruby(), "--chdir", dir, "--workers", &workers_arg];
    all.extend_from_slice(args);
    Server::start(&all, workers)
}

fn spec(args: &[&str], workers: usize) -> Server {
    rack_in(&apps_dir(), "spec.ru", args, workers)
}

/// Rack::Lint found nothing, and no app code failed unexpectedly.
fn assert_clean_log(server: &Server) {
    let logs = server.logs();
    assert!(!logs.contains("LintError"), "Rack::Lint objected:\n{logs}");
    assert!(!logs.contains("the app failed"), "{logs}");
    assert!(!logs.contains("failed:"), "{logs}");
}

/// What spec.ru's marks file holds for this server, removed after.
struct Marks(std::path::PathBuf);

impl Marks {
    fn of(server: &Server) -> Marks {
        Marks(std::env::temp_dir().join(format!("monodon-rack-marks-{}", server.pid)))
    }
}

impl Drop for Marks {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn the_env_follows_the_rack_spec() {
    if !have_rack() {
        return;
    }
    let server = spec(&[], 1);
    let mut c = server.connect();
    let local = c.stream().local_addr().unwrap();
    c.send(b"GET /caf%C3%A9/a%2Fb?x=1%202&y HTTP/1.1\r\nHost: test\r\nX-Custom: a\r\nX-Custom: b\r\n");
    c.send(b"Cookie: a=1\r\nCookie: b=2\r\nContent-Type: text/plain\r\n\r\n");
    let doc = c.response().unwrap().json();
    let cgi = &doc["cgi"];
    assert_eq!(cgi["REQUEST_METHOD"], "GET");
    assert_eq!(cgi["SCRIPT_NAME"], "");
    // As sent, as every Rack server gives them: Rack decodes.
    assert_eq!(cgi["PATH_INFO"], "/caf%C3%A9/a%2Fb");
    assert_eq!(cgi["QUERY_STRING"], "x=1%202&y");
    assert_eq!(doc["params"], serde_json::json!({"x": "1 2", "y": null}));
    assert_eq!(cgi["REQUEST_URI"], "/caf%C3%A9/a%2Fb?x=1%202&y");
    assert_eq!(cgi["SERVER_NAME"], "127.0.0.1");
    assert_eq!(cgi["SERVER_PORT"], server.addr.port().to_string());
    assert_eq!(cgi["SERVER_PROTOCOL"], "HTTP/1.1");
    assert_eq!(cgi["HTTP_VERSION"], "HTTP/1.1");
    assert_eq!(cgi["SERVER_SOFTWARE"], "monodon");
    assert_eq!(cgi["REMOTE_ADDR"], "127.0.0.1");
    assert_eq!(cgi["REMOTE_PORT"], local.port().to_string());
    assert_eq!(cgi["HTTP_X_CUSTOM"], "a, b");
    assert_eq!(cgi["HTTP_COOKIE"], "a=1; b=2");
    assert_eq!(cgi["HTTP_HOST"], "test");
    assert_eq!(cgi["CONTENT_TYPE"], "text/plain");
    assert!(cgi.get("HTTP_CONTENT_TYPE").is_none() && cgi.get("CONTENT_LENGTH").is_none(), "{cgi}");
    let rack = &doc["rack"];
    assert_eq!(rack["version"], serde_json::json!([1, 3]));
    assert_eq!(rack["url_scheme"], "http");
    assert_eq!((rack["multithread"].as_bool(), rack["multiprocess"].as_bool()), (Some(false), Some(true)));
    assert_eq!(rack["run_once"].as_bool(), Some(false));
    assert_eq!((rack["hijack?"].as_bool(), rack["hijack_present"].as_bool()), (Some(false), Some(false)));
    assert_eq!((rack["after_reply"].as_str(), rack["retire"].as_bool()), (Some("Array"), Some(true)));
    // An absolute-form target: the path is what follows the authority.
    let doc = request(&server, "GET", "http://example.com/abs/path?q=1", "", b"").json();
    assert_eq!(
        (doc["cgi"]["PATH_INFO"].as_str(), doc["cgi"]["QUERY_STRING"].as_str()),
        (Some("/abs/path"), Some("q=1"))
    );
    // A trusted proxy's word for the client and scheme (this host is trusted by default).
    let proxied = request(
        &server,
        "GET",
        "/environ",
        "X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-Proto: https\r\n",
        b"",
    );
    let doc = proxied.json();
    assert_eq!(
        (doc["cgi"]["REMOTE_ADDR"].as_str(), doc["rack"]["url_scheme"].as_str()),
        (Some("198.51.100.7"), Some("https"))
    );
    // The template loaded the app; the worker was forked from it.
    assert_ne!(doc["pid"], doc["imported_in"]);

    // HTTP/1.0: keep-alive when asked for and the length is known...
    let mut c = server.connect();
    c.send(b"GET /environ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!(r.header("connection"), Some("keep-alive"));
    assert_eq!(r.json()["cgi"]["SERVER_PROTOCOL"], "HTTP/1.0");
    // ...and a body of unknown length ends with the connection.
    c.send(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = c.response().unwrap();
    assert_eq!((r.header("transfer-encoding"), r.header("connection")), (None, Some("close")));
    assert_eq!(r.text(), "part 0\npart 1\npart 2\npart 3\npart 4\n");

    // A 204, with the next request pipelined behind it.
    let mut c = server.connect();
    c.send(
        b"GET /status?code=204 HTTP/1.1\r\nHost: x\r\n\r\nGET /environ?after=204 HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let r = c.response().unwrap();
    assert_eq!((r.status, r.header("content-length"), r.header("transfer-encoding")), (204, None, None));
    let r = c.response().unwrap();
    assert_eq!(r.json()["cgi"]["QUERY_STRING"], "after=204");

    // HEAD: the head a GET would have, without its body.
    let head = request(&server, "HEAD", "/environ", "", b"");
    assert_eq!((head.status, head.header("content-type")), (200, Some("application/json")));
    let mut c = server.connect();
    c.send(b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /status?code=201 HTTP/1.1\r\nHost: x\r\n\r\n");
    let r = c.head_response().unwrap();
    assert_eq!((r.status, r.header("transfer-encoding")), (200, None));
    assert_eq!(c.response().unwrap().text(), "status 201\n", "no body bytes were left after the HEAD");

    // A Rack 2 header value with newlines is one field per line.
    let r = request(&server, "GET", "/multi", "", b"");
    let cookies: Vec<&str> = r
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert!(r.header("date").is_some_and(|d| d.ends_with(" GMT")), "{:?}", r.headers);
    server.wait_for_log("environ seen for /environ", Duration::from_secs(5));
    assert_clean_log(&server);
}

#[test]
fn bodies_stream_through_rack_input_in_every_reading_style() {
    if !have_rack() {
        return;
    }
    let server = spec(&[], 2);
    let small = lines_body(40);
    let large = lines_body(20_000); // past --buffer-body: the worker reads it from the socket
    assert!(large.len() > 64 * 1024 * 4);
    for how in ["read", "read-small", "buffer", "gets", "each", "rewind"] {
        for (what, body) in [("small", &small), ("large", &large)] {
            let target = format!("/body?how={how}");
            let by_length =
                request(&server, "POST", &target, &format!("Content-Length: {}\r\n", body.len()), body);
            let chunked_body = chunked(body, 7000);
            let by_chunks =
                request(&server, "POST", &target, "Transfer-Encoding: chunked\r\n", &chunked_body);
            for (framing, r) in [("length", by_length), ("chunked", by_chunks)] {
                assert_eq!(r.status, 200, "{how} {what} {framing}: {}", r.text());
                let doc = r.json();
                assert_eq!(doc["length"].as_u64(), Some(body.len() as u64), "{how} {what} {framing}");
                assert_eq!(doc["sum"].as_u64(), Some(checksum(body)), "{how} {what} {framing}");
                assert_eq!(
                    doc["lines"].as_u64(),
                    Some(body.iter().filter(|&&b| b == b'\n').count() as u64),
                    "{how} {what} {framing}"
                );
                if how == "rewind" {
                    assert_eq!((doc["first"].as_u64(), doc["same"].as_bool()), (Some(100), Some(true)));
                }
            }
        }
    }
    // A body larger than the worker keeps in memory (spooled to a file) reads back whole.
    let huge: Vec<u8> = (0..3_000_000u32).map(|i| (i * 13 % 256) as u8).collect();
    let r =
        request(&server, "POST", "/body?how=rewind", &format!("Content-Length: {}\r\n", huge.len()), &huge);
    assert_eq!(
        (r.json()["length"].as_u64(), r.json()["sum"].as_u64()),
        (Some(3_000_000), Some(checksum(&huge)))
    );
    // Expect: 100-continue: the worker says so before reading the body.
    let mut c = server.connect();
    c.send(
        format!(
            "POST /body HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            large.len()
        )
        .as_bytes(),
    );
    let interim = c.response().unwrap();
    assert_eq!(interim.status, 100);
    c.send(&large);
    assert_eq!(c.response().unwrap().json()["length"].as_u64(), Some(large.len() as u64));
    // A body the app leaves unread is skipped, and the connection carries on.
    let mut c = server.connect();
    c.send(
        format!("POST /environ HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", large.len()).as_bytes(),
    );
    c.send(&large);
    assert_eq!(c.response().unwrap().status, 200);
    c.send(b"GET /status?code=202 HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 202);
    // A chunked body that breaks its framing is refused, not handed to the app.
    let mut bad = b"10\r\nshort\r\nzz\r\n".to_vec();
    bad.extend(std::iter::repeat_n(b'x', 100_000));
    let r = request(&server, "POST", "/body", "Transfer-Encoding: chunked\r\n", &bad);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_clean_log(&server);
}

#[test]
fn responses_stream_send_files_and_close_their_bodies() {
    if !have_rack() {
        return;
    }
    let server = spec(&[], 1);
    let marks = Marks::of(&server);
    let r = server.get("/stream?n=50");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text().lines().count(), 50);
    // A body with to_path goes out with sendfile, its length known.
    let r = server.get("/raw/file?size=300000");
    assert_eq!(r.header("content-length"), Some("300000"));
    let expected: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert!(r.body == expected, "the file's bytes");
    let head = request(&server, "HEAD", "/raw/file?size=1234", "", b"");
    assert_eq!(head.header("content-length"), Some("1234"));
    // Rack 3's streaming body: called with the stream.
    let r = server.get("/raw/call");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text(), "streamed 0\nstreamed 1\nstreamed 2\n");
    // close is called on every body, and rack.after_reply runs after the response.
    assert_eq!(server.get("/closing").text(), "a\nb\n");
    assert_eq!(server.get("/after").status, 200);
    let doc = server.get("/marks").json();
    assert_eq!(
        (doc["closed"].as_u64(), doc["after"].as_u64(), doc["file closed"].as_u64()),
        (Some(1), Some(1), Some(2)),
        "{doc}"
    );
    assert!(marks.0.exists());
    assert_clean_log(&server);
}

#[test]
fn an_app_that_fails_answers_500_and_the_worker_serves_on() {
    if !have_rack() {
        return;
    }
    let server = spec(&[], 1);
    let pid = server.get("/raw/pid").text();
    let r = server.get("/raw/fail");
    assert_eq!(r.status, 500);
    let line = server.wait_for_log("this app fails on purpose (RuntimeError)", Duration::from_secs(5));
    assert!(line.contains("spec.ru"), "the backtrace names the app: {line}");
    // Hijacking is refused, clearly: a 500, and why in the log.
    assert_eq!(server.get("/raw/hijack").status, 500);
    server.wait_for_log("monodon does not support hijacking", Duration::from_secs(5));
    assert_eq!(server.get("/raw/pid").text(), pid, "the same worker serves on");
    assert_eq!(server.get("/environ").status, 200);
    assert_eq!(server.status().unwrap()["totals"]["respawns"], 0);
}

#[test]
fn underscore_header_names_never_frame_and_are_dropped_refused_or_allowed() {
    if !have_rack() {
        return;
    }
    let drop = spec(&[], 1);
    // Transfer_Encoding is not Transfer-Encoding: the body is its 5 bytes.
    let r = request(&drop, "POST", "/body", "Transfer_Encoding: chunked\r\nContent-Length: 5\r\n", b"hello");
    assert_eq!(r.json()["length"], 5, "{}", r.text());
    let seen = |s: &Server, fields: &str| request(s, "GET", "/environ", fields, b"").json()["cgi"].clone();
    assert!(seen(&drop, "X_Auth: evil\r\n").get("HTTP_X_AUTH").is_none(), "dropped");
    assert_eq!(seen(&drop, "X_Auth: evil\r\nX-Auth: good\r\n")["HTTP_X_AUTH"], "good");
    let env = seen(&drop, "Transfer_Encoding: chunked\r\n");
    assert!(env.get("HTTP_TRANSFER_ENCODING").is_none(), "{env}");

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
    assert_eq!(seen(&allow, "X-Auth: good\r\nX_Auth: evil\r\n")["HTTP_X_AUTH"], "good");
    for server in [&drop, &refuse, &allow] {
        assert_clean_log(server);
    }
}

#[test]
fn workers_are_reseeded_run_after_fork_and_retire_when_asked() {
    if !have_rack() {
        return;
    }
    let server = spec(&[], 2);
    // Two at once: one on each worker.
    let mut draws = std::collections::BTreeMap::new();
    for doc in common::lang::draw_on_two_workers(&server) {
        let pid = doc["pid"].as_u64().unwrap();
        assert_eq!(
            doc["after_fork"],
            serde_json::json!([pid]),
            "Monodon.after_fork ran in this worker, once"
        );
        draws.insert(pid, doc["random"].as_f64().unwrap());
    }
    assert_eq!(draws.len(), 2, "both workers answered: {draws:?}");
    let values: Vec<f64> = draws.values().copied().collect();
    assert_ne!(values[0], values[1], "each forked worker has its own random state");

    // monodon.retire: the worker leaves after its response, as planned (no respawn counted).
    let pid = request(&server, "GET", "/retire", "", b"").json()["pid"].as_u64().unwrap() as u32;
    let status = server.wait_status(Duration::from_secs(10), "the retired worker replaced", |s| {
        s["worker_list"]
            .as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|w| w["pid"] != pid && w["state"] == "idle"))
    });
    assert_eq!(status["totals"]["respawns"], 0, "{status}");
    assert_clean_log(&server);
}

#[test]
fn without_preload_each_worker_loads_the_app() {
    if !have_rack() {
        return;
    }
    let server = spec(&["--no-preload"], 1);
    let doc = request(&server, "GET", "/environ", "", b"").json();
    assert_eq!(doc["pid"], doc["imported_in"]);
}

#[test]
fn recycling_timeouts_status_and_the_access_log_work_as_for_any_worker() {
    if !have_rack() {
        return;
    }
    let scratch = Scratch::new("ruby-ops");
    let log = scratch.0.join("access.log");
    let args = common::lang::operations_args(&log);
    let server = spec(&args.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    common::lang::check_operations(&server, &log);
}

/// A hot deploy with edited code: served under load without a failed
/// request; a config.ru broken in place never reaches the running
/// generation (its template keeps the code it loaded, and recycling forks
/// from it); a reload that cannot load it is abandoned.
#[test]
fn hup_serves_new_code_and_a_broken_config_ru_never_takes_the_service_down() {
    if !common::installed(ruby(), "--version", "ruby") {
        return;
    }
    let version = |v: &str| {
        format!(
            "BODY = \"{v}\\n\".freeze\nrun ->(env) {{ [200, {{ \"content-type\" => \"text/plain\", \
             \"content-length\" => BODY.bytesize.to_s }}, [BODY]] }}\n"
        )
    };
    common::lang::check_hot_deploy(
        &Scratch::new("ruby-deploy"),
        "config.ru",
        version,
        "run ->(env) {\n",
        |dir| rack_in(dir, "config.ru", &["--max-requests-per-child", "20"], 2),
        "SyntaxError",
    );
}

/// A config.ru that cannot be loaded never serves: its template's error
/// and backtrace are in the log, and the supervisor starts it again with
/// back-off, so a fix on disk is picked up. A bad --ruby is named.
#[test]
fn a_config_ru_that_cannot_be_loaded_is_retried_with_its_error_in_the_log() {
    if !common::installed(ruby(), "--version", "ruby") {
        return;
    }
    let scratch = Scratch::new("ruby-load");
    let dir = scratch.0.to_str().unwrap().to_owned();
    std::fs::write(scratch.0.join("config.ru"), "require_relative 'later'\nrun Later\n").unwrap();
    let mut cmd = common::monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--rack", "config.ru", "--ruby", ruby()]).args([
        "--chdir",
        &dir,
        "--workers",
        "1",
    ]);
    let server = Server::start_cmd(&mut cmd, 0);
    server.wait_for_log("cannot load such file", Duration::from_secs(10));
    server.wait_for_log("next start in", Duration::from_secs(10));
    std::fs::write(
        scratch.0.join("later.rb"),
        "Later = ->(env) { [200, { 'content-type' => 'text/plain' }, [\"fixed\\n\"]] }\n",
    )
    .unwrap();
    server.wait_status(Duration::from_secs(30), "a worker ready once the file exists", |s| {
        common::ready_workers(s, 1) == 1
    });
    assert_eq!(server.get("/").text(), "fixed\n");
    let e = common::monodon()
        .args(["serve", "--rack", "config.ru", "--ruby", "/nonexistent/ruby"])
        .output()
        .unwrap();
    assert_eq!(e.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&e.stderr).contains("--ruby /nonexistent/ruby: no such program"));
}

/// Routes, a form POST, a large multipart upload and a streamed response
/// through Sinatra (Debian's ruby-sinatra).
#[test]
fn a_sinatra_app_answers_through_monodon() {
    if !have(&["sinatra/base"], "ruby-sinatra") {
        return;
    }
    let server = rack_in(&apps_dir(), "sinatra.ru", &[], 2);
    assert_eq!(server.get("/").text(), "sinatra index\n");
    assert_eq!(server.get("/hello/monodon").text(), "hello monodon\n");
    let form = b"name=caf%C3%A9&item[]=a&item[]=b";
    let r = request(
        &server,
        "POST",
        "/form",
        &format!("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n", form.len()),
        form,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!({"name": "café", "items": ["a", "b"]}));
    let file: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let boundary = "monodon-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let r = request(
        &server,
        "POST",
        "/upload",
        &format!(
            "Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n",
            body.len()
        ),
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["filename"], "big.bin");
    assert_eq!(
        (doc["length"].as_u64(), doc["sum"].as_u64()),
        (Some(file.len() as u64), Some(checksum(&file)))
    );
    // The upload's temporary file goes with its request (rack.tempfiles).
    let spooled = || {
        let workers: Vec<String> = server.children().iter().map(|p| format!("-{p}-")).collect();
        let dir = std::env::temp_dir();
        std::fs::read_dir(&dir).into_iter().flatten().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("RackMultipart") && workers.iter().any(|w| name.contains(w.as_str()))
        })
    };
    assert!(common::eventually(Duration::from_secs(10), || !spooled()), "the upload's file is left behind");
    let r = server.get("/stream");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text().lines().count(), 100);
    assert!(r.text().ends_with("row 99\n"));
    assert_clean_log(&server);
}

/// Without the rack library, config.ru is loaded by the worker's own
/// builder: use, map, run and warmup.
#[test]
fn a_config_ru_loads_without_the_rack_library() {
    if !common::installed(ruby(), "--version", "ruby") {
        return;
    }
    let scratch = Scratch::new("ruby-norack");
    // A ruby that cannot require "rack", as where ruby-rack is not installed.
    let wrapper = scratch.script("ruby", &format!("exec {} -I {}/norack \"$@\"", ruby(), apps_dir()));
    let mut cmd = common::monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--rack", "builder.ru", "--ruby"]).arg(&wrapper).args([
        "--chdir",
        &apps_dir(),
        "--workers",
        "1",
    ]);
    let server = Server::start_cmd(&mut cmd, 1);
    assert_eq!(server.get("/some/where").text(), "root /some/where no rack warmed=1!\n");
    assert_eq!(server.get("/api/v1/items").text(), "api /api /v1/items!\n");
    assert_eq!(server.get("/api").text(), "api /api !\n");
    assert_eq!(server.get("/apiary").text(), "root /apiary no rack warmed=1!\n");
}

/// SERVER_NAME and SERVER_PORT come from the connection's own address on
/// IPv6 and unix listeners too (from Host on a unix socket, which has none).
#[test]
fn the_server_address_is_right_on_ipv6_and_unix_listeners() {
    if !have_rack() {
        return;
    }
    let scratch = Scratch::new("ruby-listeners");
    let path = scratch.0.join("app.sock");
    let unix = format!("unix:{}", path.display());
    let server = spec(&["--listen", "[::1]:0", "--listen", &unix], 1);
    let (v6_port, over_v6, cgi) = common::lang::environ_on_ipv6_and_unix(&server, &path);
    // An authority, as Rack::Lint wants it: in brackets.
    assert_eq!(
        (over_v6["SERVER_NAME"].as_str(), over_v6["REMOTE_ADDR"].as_str()),
        (Some("[::1]"), Some("::1"))
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
/// grace has passed, so a slow sender cannot hold a Ruby worker.
#[test]
fn a_body_trickled_below_the_minimum_rate_is_cut_off() {
    if !have_rack() {
        return;
    }
    let server = spec(&["--min-body-rate", "4KiB"], 1);
    common::lang::check_trickled_body_is_cut_off(&server, "/body?how=read-small");
}

/// A fork copies only the thread that calls it: a template whose app
/// started threads refuses to fork (ForkFailed), and says why.
#[test]
fn a_template_with_threads_refuses_to_fork() {
    if !common::installed(ruby(), "--version", "ruby") {
        return;
    }
    let scratch = Scratch::new("ruby-threads");
    let dir = scratch.0.to_str().unwrap().to_owned();
    std::fs::write(
        scratch.0.join("config.ru"),
        "Thread.new { sleep }\nrun ->(env) { [200, {}, [\"never\\n\"]] }\n",
    )
    .unwrap();
    let mut cmd = common::monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--rack", "config.ru", "--ruby", ruby()]).args([
        "--chdir",
        &dir,
        "--workers",
        "1",
    ]);
    let server = Server::start_cmd(&mut cmd, 0);
    server.wait_for_log(
        "would not fork: the app started threads in the template; a fork copies only one",
        Duration::from_secs(20),
    );
    assert_eq!(common::ready_workers(&server.status().unwrap(), 1), 0);
}
