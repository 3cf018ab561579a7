//! Test support: start the real `monodon` binary, talk HTTP/1.1 to it over
//! real sockets, and look at its processes and descriptors through /proc.
#![allow(dead_code)]

pub mod lang;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `monodon serve`, stopped (and its workers with it) on drop.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub pid: u32,
    /// Its control socket, where `status` is asked.
    pub control: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
}

/// Raises this process's open-file limit to its hard limit (tests that hold
/// many connections need more than the usual 1024).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub fn monodon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_monodon"))
}

impl Server {
    /// `monodon serve --listen 127.0.0.1:0 ARGS...`, once `workers` workers
    /// are ready.
    pub fn start(args: &[&str], workers: usize) -> Server {
        Server::start_cmd(monodon().arg("serve").args(["--listen", "127.0.0.1:0"]).args(args), workers)
    }

    pub fn start_cmd(cmd: &mut Command, workers: usize) -> Server {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start monodon");
        let pid = child.id();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&logs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("TEST_ECHO_LOGS").is_some() {
                    eprintln!("{line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut server = Server {
            child: Some(child),
            addr: "127.0.0.1:1".parse().unwrap(),
            pid,
            control: PathBuf::new(),
            logs,
        };
        // Where it listens and where its control socket is: told once, at start.
        let line = server.wait_for_log("listening on ", Duration::from_secs(20));
        let addr = line.split("listening on ").nth(1).unwrap().trim();
        server.addr = addr.parse().unwrap_or(server.addr);
        let line = server.wait_for_log("control socket at ", Duration::from_secs(20));
        server.control = PathBuf::from(line.split("control socket at ").nth(1).unwrap().trim());
        // From here on, state comes from the status document.
        server.wait_status(Duration::from_secs(20), &format!("{workers} workers ready"), |s| {
            ready_workers(s, s["generation"].as_u64().unwrap_or(0)) >= workers
        });
        server
    }

    /// `monodon status --json`, asked over the control socket.
    pub fn status(&self) -> io::Result<serde_json::Value> {
        let mut stream = UnixStream::connect(&self.control)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"{\"protocol\":1,\"command\":\"status\"}\n")?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        let mut answer: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(answer["status"].take())
    }

    /// Polls the status until `cond` holds (`what` says what for, should it
    /// not within `within`); the status that satisfied it.
    pub fn wait_status(
        &self,
        within: Duration,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let status = self.status();
            if let Ok(s) = &status {
                if cond(s) {
                    return s.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "not {what} within {within:?}: {status:?}\nlogs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until generation `generation` serves, with no reload under way.
    pub fn wait_serving(&self, generation: u64, within: Duration) -> serde_json::Value {
        self.wait_status(within, &format!("generation {generation} serving"), |s| {
            s["generation"] == generation && s["reload"]["state"] == "idle"
        })
    }

    /// Waits until a reload has failed (`last_failure` set), and returns why.
    pub fn wait_reload_failed(&self, within: Duration) -> String {
        let s = self.wait_status(within, "a failed reload", |s| {
            s["reload"]["state"] == "idle" && s["reload"]["last_failure"].is_string()
        });
        s["reload"]["last_failure"].as_str().unwrap_or_default().to_owned()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn count_logs(&self, needle: &str) -> usize {
        self.logs.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.logs.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no log line with {needle:?}; logs:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pids of the supervisor's worker processes (its children, less the
    /// generations' templates).
    pub fn children(&self) -> Vec<u32> {
        let templates = self.templates();
        children_of(self.pid).into_iter().filter(|p| !templates.contains(p)).collect()
    }

    /// Pids of the generations' template processes, from the status.
    pub fn templates(&self) -> Vec<u32> {
        let Ok(s) = self.status() else { return Vec::new() };
        let generations = s["generations"].as_array().cloned().unwrap_or_default();
        generations.iter().filter_map(|g| g["template"]["pid"].as_u64()).map(|p| p as u32).collect()
    }

    /// Number of open descriptors of the supervisor.
    /// The supervisor's descriptors, less the scoreboard pages it holds
    /// (one per worker and template, and up to `SPARE_BOARDS` kept from
    /// reaped workers for the next ones): `fd_count_is_settled` checks those.
    pub fn fd_count(&self) -> usize {
        self.fd_targets().iter().filter(|t| !t.contains(SCOREBOARD)).count()
    }

    /// The scoreboard pages it holds.
    pub fn scoreboard_fds(&self) -> usize {
        self.fd_targets().iter().filter(|t| t.contains(SCOREBOARD)).count()
    }

    /// Back to `baseline` descriptors, with no more scoreboards than its
    /// children and the spares account for.
    pub fn fd_count_is_settled(&self, baseline: usize) -> bool {
        let children = children_of(self.pid).len();
        self.fd_count() <= baseline && self.scoreboard_fds() <= children + SPARE_BOARDS
    }

    fn fd_targets(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid)) else { return Vec::new() };
        dir.flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|t| t.to_string_lossy().into_owned())
            .collect()
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// One request on a fresh connection.
    pub fn get(&self, target: &str) -> Response {
        let mut c = self.connect();
        c.send(format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes());
        c.response().expect("response")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to a process we started.
        unsafe { libc::kill(self.pid as i32, sig) };
    }

    /// Waits for the supervisor to exit; its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let workers = self.children();
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        for pid in workers {
            // SAFETY: these were our supervisor's workers; never leave one behind.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Workers of `generation` that have said Ready and are not retiring.
pub fn ready_workers(status: &serde_json::Value, generation: u64) -> usize {
    let workers = status["worker_list"].as_array().map(Vec::as_slice).unwrap_or_default();
    workers
        .iter()
        .filter(|w| w["generation"] == generation && matches!(w["state"].as_str(), Some("idle" | "busy")))
        .count()
}

/// What a scoreboard memfd is called in /proc/PID/fd.
const SCOREBOARD: &str = "memfd:monodon-scoreboard";
/// The most scoreboards of reaped workers the supervisor keeps
/// (`spawn::SpareBoards`).
const SPARE_BOARDS: usize = 16;

pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces): state ppid ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        if state == "Z" {
            continue;
        }
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out.sort();
    out
}

/// Polls `cond` until it is true or `within` has passed.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client connection.
pub struct Client {
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream.set_nodelay(true).unwrap();
        Client { reader: BufReader::new(stream) }
    }

    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).expect("send");
    }

    /// Reads one response to a request that is not HEAD.
    pub fn response(&mut self) -> io::Result<Response> {
        read_response(&mut self.reader, false)
    }

    pub fn head_response(&mut self) -> io::Result<Response> {
        read_response(&mut self.reader, true)
    }

    /// True if the server has closed the connection (EOF on the next read).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0) | Err(_))
    }
}

pub fn read_response(r: &mut impl BufRead, head_only: bool) -> io::Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (n, v) =
            h.split_once(':').ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad header"))?;
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let mut resp = Response { status, headers, body: Vec::new() };
    if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(resp);
    }
    if let Some(len) = resp.header("Content-Length") {
        let len: usize = len.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad length"))?;
        resp.body.resize(len, 0);
        r.read_exact(&mut resp.body)?;
    } else if resp.header("Transfer-Encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk"))?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            resp.body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

/// What a background load saw.
#[derive(Debug, Default)]
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub errors: Vec<String>,
    /// Responses per worker pid (echo app only).
    pub pids: std::collections::BTreeMap<u64, u64>,
    /// Responses per worker generation (echo app only).
    pub generations: std::collections::BTreeMap<u64, u64>,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.errors.extend(other.errors.into_iter().take(10));
        for (k, v) in other.pids {
            *self.pids.entry(k).or_default() += v;
        }
        for (k, v) in other.generations {
            *self.generations.entry(k).or_default() += v;
        }
    }

    fn record(&mut self, result: io::Result<Response>) {
        match result {
            Ok(r) if r.status == 200 => {
                self.ok += 1;
                if r.header("Content-Type") == Some("application/json") {
                    let j = r.json();
                    *self.pids.entry(j["worker"]["pid"].as_u64().unwrap_or(0)).or_default() += 1;
                    *self.generations.entry(j["worker"]["generation"].as_u64().unwrap_or(0)).or_default() +=
                        1;
                }
            }
            Ok(r) => self.fail(format!("status {}: {}", r.status, r.text())),
            Err(e) => self.fail(e.to_string()),
        }
    }

    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.errors.len() < 10 {
            self.errors.push(what);
        }
    }
}

/// A bounded background load: keep-alive and one-request-per-connection
/// clients in threads, until stopped (or 120 s at most).
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Responses received so far, all threads together.
    answered: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Stats>>,
}

impl Load {
    pub fn start(addr: SocketAddr, keep_alive: usize, one_shot: usize, target: &str) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut threads = Vec::new();
        for i in 0..keep_alive + one_shot {
            let stop = Arc::clone(&stop);
            let answered = Arc::clone(&answered);
            let target = target.to_owned();
            let persistent = i < keep_alive;
            threads.push(std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut stats = Stats::default();
                let mut conn: Option<Client> = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                    let c = conn.get_or_insert_with(|| Client::connect(addr));
                    let close = if persistent { "" } else { "Connection: close\r\n" };
                    let req = format!("GET {target} HTTP/1.1\r\nHost: load\r\n{close}\r\n");
                    let result = c.reader.get_mut().write_all(req.as_bytes()).and_then(|_| c.response());
                    let broken = result
                        .as_ref()
                        .map_or(true, |r| r.header("Connection").is_some_and(|v| v == "close"));
                    if result.is_ok() {
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    stats.record(result);
                    if broken || !persistent {
                        conn = None;
                    }
                }
                stats
            }));
        }
        Load { stop, answered, threads }
    }

    /// Waits until the load has had `n` more responses than now: it runs,
    /// and what comes next happens under it.
    pub fn wait_answered(&self, n: u64, within: Duration) {
        let counter = || self.answered.load(std::sync::atomic::Ordering::Relaxed);
        let target = counter() + n;
        assert!(
            eventually(within, || counter() >= target),
            "the load got {} of {target} responses",
            counter()
        );
    }

    pub fn stop(self) -> Stats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = Stats::default();
        for t in self.threads {
            total.merge(t.join().expect("load thread"));
        }
        total
    }
}

/// Total CPU time (user + system) of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ppid(1) ... utime(11) stime(12).
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Whether `program` runs (`program version_arg` succeeds); see [`available`].
pub fn installed(program: &str, version_arg: &str, package: &str) -> bool {
    available(Command::new(program).arg(version_arg), package)
}

/// Whether `check` succeeds, i.e. what a test needs is there. A test that
/// needs it passes without it, saying so, except under CI (`CI` set), whose
/// .ci/run installs `package`.
pub fn available(check: &mut Command, package: &str) -> bool {
    let found = check.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "CI installs {package}");
        eprintln!("skipped: {package} is not installed");
    }
    found
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')).unwrap_or(true))
        .unwrap_or(false)
}

/// A scratch directory (for worker scripts, logs, sockets), removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("monodon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// An executable shell script.
    pub fn script(&self, name: &str, body: &str) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(
            &path,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
        )
        .unwrap();
        path
    }

    /// Points the symlink `link` at `target` atomically, as a deploy does.
    pub fn point(&self, link: &str, target: &std::path::Path) -> std::path::PathBuf {
        let link = self.0.join(link);
        let tmp = self.0.join(format!("{}.tmp", link.display()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        link
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until one of the server's workers is inside the echo app's
/// `sleep_ms` (blocked in nanosleep): a request is in flight.
pub fn wait_until_a_worker_sleeps(server: &Server) {
    let sleeping = eventually(Duration::from_secs(10), || {
        server.children().iter().any(|p| {
            std::fs::read_to_string(format!("/proc/{p}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
        })
    });
    assert!(sleeping, "no worker started the slow request");
}
