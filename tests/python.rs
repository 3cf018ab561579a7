//! `monodon serve --wsgi`: Python apps as workers, against the real binary
//! and a real interpreter (Debian's /usr/bin/python3 where there is one,
//! else python3 on PATH). The test apps in `tests/python/` run under
//! wsgiref's validator, so a breach of PEP 3333 shows as a 500 and an
//! AssertionError in the log.

mod common;

use std::time::Duration;

use common::lang::{checksum, chunked, lines_body, request};
use common::{Scratch, Server};

fn python() -> &'static str {
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn apps_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python").to_owned()
}

/// `monodon serve --wsgi APP` from `dir`, once `workers` are ready.
fn wsgi_in(dir: &str, app: &str, args: &[&str], workers: usize) -> Server {
    let workers_arg = workers.to_string();
    let mut all = vec!["--wsgi", app, "--python", python(), "--chdir", dir, "--workers", &workers_arg];
    all.extend_from_slice(args);
    Server::start(&all, workers)
}

fn spec(args: &[&str], workers: usize) -> Server {
    wsgi_in(&apps_dir(), "spec_app:application", args, workers)
}

/// The validator found nothing, and no app code failed unexpectedly.
fn assert_clean_log(server: &Server) {
    let logs = server.logs();
    assert!(!logs.contains("AssertionError"), "wsgiref's validator objected:\n{logs}");
    assert!(!logs.contains("Exception ignored"), "{logs}");
}

#[test]
fn the_environ_follows_pep_3333() {
    let server = spec(&[], 1);
    let mut c = server.connect();
    let local = c.stream().local_addr().unwrap();
    c.send(b"GET /caf%C3%A9/a%2Fb?x=1%202&y HTTP/1.1\r\nHost: test\r\nX-Custom: a\r\nX-Custom: b\r\n");
    c.send(b"Cookie: a=1\r\nCookie: b=2\r\n\r\n");
    let doc = c.response().unwrap().json();
    let cgi = &doc["cgi"];
    assert_eq!(cgi["REQUEST_METHOD"], "GET");
    assert_eq!(cgi["SCRIPT_NAME"], "");
    // Percent-decoded, each byte one latin-1 character (PEP 3333's "bytes as str").
    assert_eq!(cgi["PATH_INFO"], "/caf\u{c3}\u{a9}/a/b");
    assert_eq!(cgi["QUERY_STRING"], "x=1%202&y");
    assert_eq!(cgi["SERVER_NAME"], "127.0.0.1");
    assert_eq!(cgi["SERVER_PORT"], server.addr.port().to_string());
    assert_eq!(cgi["SERVER_PROTOCOL"], "HTTP/1.1");
    assert_eq!(cgi["REMOTE_ADDR"], "127.0.0.1");
    assert_eq!(cgi["REMOTE_PORT"], local.port().to_string());
    assert_eq!(cgi["HTTP_X_CUSTOM"], "a, b");
    assert_eq!(cgi["HTTP_COOKIE"], "a=1; b=2");
    assert_eq!(cgi["HTTP_HOST"], "test");
    assert!(cgi.get("CONTENT_LENGTH").is_none() && cgi.get("HTTP_CONTENT_LENGTH").is_none(), "{cgi}");
    let wsgi = &doc["wsgi"];
    assert_eq!(wsgi["version"], serde_json::json!([1, 0]));
    assert_eq!(wsgi["url_scheme"], "http");
    assert_eq!((wsgi["multiprocess"].as_bool(), wsgi["multithread"].as_bool()), (Some(true), Some(false)));
    assert_eq!((wsgi["run_once"].as_bool(), wsgi["has_file_wrapper"].as_bool()), (Some(false), Some(true)));
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
        (doc["cgi"]["REMOTE_ADDR"].as_str(), doc["wsgi"]["url_scheme"].as_str()),
        (Some("198.51.100.7"), Some("https"))
    );
    // The template imported the app; the worker was forked from it.
    assert_ne!(doc["pid"], doc["imported_in"]);
    server.wait_for_log("environ seen for /environ", Duration::from_secs(5));
    assert_clean_log(&server);
}

#[test]
fn bodies_stream_through_wsgi_input_in_every_reading_style() {
    let server = spec(&[], 2);
    let small = lines_body(40);
    let large = lines_body(20_000); // past --buffer-body: the worker reads it from the socket
    assert!(large.len() > 64 * 1024 * 4);
    for how in ["read", "read-small", "readline", "readlines", "iter"] {
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
                if how != "read" && how != "read-small" {
                    assert_eq!(
                        doc["lines"].as_u64(),
                        Some(body.iter().filter(|&&b| b == b'\n').count() as u64)
                    );
                }
            }
        }
    }
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
    // A chunked body that breaks its framing is refused, not handed to the app.
    let mut bad = b"10\r\nshort\r\nzz\r\n".to_vec();
    bad.extend(std::iter::repeat_n(b'x', 100_000));
    let r = request(&server, "POST", "/body?how=read-small", "Transfer-Encoding: chunked\r\n", &bad);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_clean_log(&server);
}

#[test]
fn responses_are_framed_for_every_kind_of_body() {
    let server = spec(&[], 1);
    let mut c = server.connect();
    // Several on one keep-alive connection.
    for target in ["/write", "/stream?n=50", "/file?size=300000", "/closing"] {
        c.send(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let r = c.response().unwrap();
        assert_eq!(r.status, 200, "{target}");
        match target {
            "/write" => {
                assert_eq!(r.text(), "written through write()\n");
                assert_eq!(r.header("transfer-encoding"), Some("chunked"));
            }
            "/stream?n=50" => {
                assert_eq!(r.text().lines().count(), 50);
                assert_eq!(r.header("transfer-encoding"), Some("chunked"));
            }
            "/file?size=300000" => {
                // The validator wraps the file: it arrives as iterated blocks.
                assert_eq!(r.body.len(), 300000);
                assert!(r.body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "the file's bytes");
            }
            _ => assert_eq!(r.text(), "a\nb\n"),
        }
    }
    // Unwrapped, wsgi.file_wrapper goes out with sendfile, its length known.
    let plain = wsgi_in(&apps_dir(), "spec_app:routes", &[], 1);
    let r = request(&plain, "GET", "/file?size=300000", "", b"");
    assert_eq!(r.header("content-length"), Some("300000"));
    assert!(r.body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "the file's bytes");
    // HEAD: the length a GET would have, no body.
    let head = request(&plain, "HEAD", "/file?size=1234", "", b"");
    assert_eq!((head.status, head.header("content-length")), (200, Some("1234")));
    let head = request(&server, "HEAD", "/write", "", b"");
    assert!(head.status == 200 && head.body.is_empty());
    // HTTP/1.0 has no chunked encoding: the body ends with the connection.
    let mut old = server.connect();
    old.send(b"GET /stream?n=3 HTTP/1.0\r\n\r\n");
    let r = old.response().unwrap();
    assert_eq!((r.text().as_str(), r.header("connection")), ("part 0\npart 1\npart 2\n", Some("close")));
    // close() was called on the response it had.
    assert!(request(&server, "GET", "/closed", "", b"").json()["closed"].as_u64() >= Some(1));
    // Any status the app gives; none with a body where HTTP allows none.
    let r = request(&server, "GET", "/status?code=418", "", b"");
    assert_eq!((r.status, r.text().as_str()), (418, "status 418\n"));
    // A 204 whose app gave a body anyway (the validator would refuse it)
    // goes out without one: the pipelined request behind it, which waited
    // in the first one's leftover, reads cleanly.
    let mut c = plain.connect();
    c.send(b"GET /status?code=204 HTTP/1.1\r\nHost: x\r\n\r\nGET /write HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.response().unwrap().status, 204);
    assert_eq!(c.response().unwrap().text(), "written through write()\n");
    assert_clean_log(&server);
}

#[test]
fn an_app_that_fails_gets_a_500_and_its_worker_serves_on() {
    let server = spec(&[], 1);
    let pid = server.children()[0];
    let r = request(&server, "GET", "/fail", "", b"");
    assert_eq!(r.status, 500);
    server.wait_for_log("this app fails on purpose", Duration::from_secs(5));
    // start_response again with exc_info, before any body went out.
    let r = request(&server, "GET", "/exc_info", "", b"");
    assert_eq!((r.status, r.text().as_str()), (500, "recovered with exc_info\n"));
    assert_eq!(request(&server, "GET", "/environ", "", b"").json()["pid"], pid);
    assert_eq!(server.children(), [pid], "the same worker serves on");
}

#[test]
fn underscore_header_names_never_frame_and_are_dropped_refused_or_allowed() {
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
}

#[test]
fn workers_are_reseeded_run_the_post_fork_hook_and_retire_when_asked() {
    let server = spec(&["--post-fork", "spec_app:post_fork"], 2);
    // Two at once: one on each worker.
    let mut draws = std::collections::BTreeMap::new();
    for doc in common::lang::draw_on_two_workers(&server) {
        let pid = doc["pid"].as_u64().unwrap();
        assert_eq!(doc["post_fork"], serde_json::json!([pid]), "the hook ran in this worker, once");
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
}

#[test]
fn without_preload_each_worker_imports_the_app() {
    let server = spec(&["--no-preload"], 1);
    let doc = request(&server, "GET", "/environ", "", b"").json();
    assert_eq!(doc["pid"], doc["imported_in"]);
}

#[test]
fn recycling_timeouts_status_and_the_access_log_work_as_for_any_worker() {
    let scratch = Scratch::new("python-ops");
    let log = scratch.0.join("access.log");
    let args = common::lang::operations_args(&log);
    let server = spec(&args.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    common::lang::check_operations(&server, &log);
}

/// A hot deploy with edited code: served under load without a failed
/// request; a broken file in place never reaches the running generation
/// (its template keeps the code it imported, and recycling forks from it);
/// a reload that cannot import is abandoned.
#[test]
fn hup_serves_new_code_and_a_broken_file_never_takes_the_service_down() {
    let version = |v: &str| {
        format!(
            "def application(environ, start_response):\n    body = b'{v}\\n'\n    \
             start_response('200 OK', [('Content-Type', 'text/plain'), ('Content-Length', str(len(body)))])\n    \
             return [body]\n"
        )
    };
    common::lang::check_hot_deploy(
        &Scratch::new("python-deploy"),
        "deployed.py",
        version,
        "def application(:\n",
        |dir| wsgi_in(dir, "deployed", &["--max-requests-per-child", "20"], 2),
        "SyntaxError",
    );
}

/// An app that cannot be imported never serves: its template's traceback
/// is in the log, and the supervisor starts it again with back-off (as for
/// any worker command that fails), so a fix on disk is picked up.
#[test]
fn an_app_that_cannot_be_imported_is_retried_with_its_error_in_the_log() {
    let scratch = Scratch::new("python-import");
    let dir = scratch.0.to_str().unwrap().to_owned();
    let mut cmd = common::monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--wsgi", "later:application", "--python", python()])
        .args(["--chdir", &dir, "--workers", "1"]);
    let server = Server::start_cmd(&mut cmd, 0);
    server.wait_for_log("ModuleNotFoundError: No module named 'later'", Duration::from_secs(10));
    server.wait_for_log("next start in", Duration::from_secs(10));
    std::fs::write(
        scratch.0.join("later.py"),
        "def application(environ, start_response):\n    start_response('200 OK', [])\n    return [b'fixed\\n']\n",
    )
    .unwrap();
    server.wait_status(Duration::from_secs(30), "a worker ready once the module exists", |s| {
        common::ready_workers(s, 1) == 1
    });
    assert_eq!(server.get("/").text(), "fixed\n");
    let e = common::monodon()
        .args(["serve", "--wsgi", "x:app", "--python", "/nonexistent/python"])
        .output()
        .unwrap();
    assert_eq!(e.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&e.stderr).contains("--python /nonexistent/python: no such program"));
}

/// Whether Debian's interpreter has `module`; CI installs the packages.
fn have_module(module: &str, package: &str) -> bool {
    common::available(std::process::Command::new(python()).args(["-c", &format!("import {module}")]), package)
}

/// Routes, a form POST, a large multipart upload and a streamed response
/// through a real framework.
fn exercise_framework(server: &Server, name: &str) {
    assert_eq!(server.get("/").text(), format!("{name} index\n"));
    assert_eq!(server.get("/hello/monodon").text(), "hello monodon\n");
    let form = b"name=caf%C3%A9&item=a&item=b";
    let r = request(
        server,
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
        server,
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
    let r = server.get("/stream");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text().lines().count(), 100);
    assert!(r.text().ends_with("row 99\n"));
}

#[test]
fn a_flask_app_answers_through_monodon() {
    if !have_module("flask", "python3-flask") {
        return;
    }
    let server = wsgi_in(&apps_dir(), "flask_app:app", &[], 2);
    exercise_framework(&server, "flask");
}

#[test]
fn a_django_project_answers_through_monodon() {
    if !have_module("django", "python3-django") {
        return;
    }
    let server = wsgi_in(&apps_dir(), "django_app", &[], 2);
    exercise_framework(&server, "django");
}

/// Without --python, an active virtualenv's interpreter is the one run.
#[test]
fn an_active_virtualenv_is_used_without_being_named() {
    let scratch = Scratch::new("python-venv");
    let bin = scratch.0.join("venv/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = std::fs::canonicalize(which_python()).unwrap();
    std::os::unix::fs::symlink(&real, bin.join("python")).unwrap();
    let mut cmd = common::monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--wsgi", "spec_app:application", "--chdir", &apps_dir()])
        .args(["--workers", "1"])
        .env("VIRTUAL_ENV", scratch.0.join("venv"));
    let server = Server::start_cmd(&mut cmd, 1);
    assert_eq!(server.get("/environ").status, 200);
    // The generation's command, resolved through symlinks, is the venv's python.
    let status = server.status().unwrap();
    let command = status["generations"][0]["command"][0].as_str().unwrap_or_default().to_owned();
    assert_eq!(std::path::Path::new(&command), real, "{status}");
    let logs = server.logs();
    assert!(
        logs.contains(&format!("{}", bin.join("python").display())),
        "the venv's python is started: {logs}"
    );
}

/// The interpreter the other tests name, as a path.
fn which_python() -> std::path::PathBuf {
    let name = python();
    if name.contains('/') {
        return name.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).expect("python3 on PATH")
}

/// SERVER_NAME and SERVER_PORT come from the connection's own address on
/// IPv6 and unix listeners too (from Host on a unix socket, which has none).
#[test]
fn the_server_address_is_right_on_ipv6_and_unix_listeners() {
    let scratch = Scratch::new("python-listeners");
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
}

/// A body trickled below --min-body-rate is cut off with 408 once the 10 s
/// grace has passed, so a slow sender cannot hold a Python worker.
#[test]
fn a_body_trickled_below_the_minimum_rate_is_cut_off() {
    let server = spec(&["--min-body-rate", "4KiB"], 1);
    common::lang::check_trickled_body_is_cut_off(&server, "/body?how=read-small");
}
