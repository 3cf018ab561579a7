//! The access log: one line per request, in one `write` to a file opened
//! with O_APPEND, so lines from several processes never interleave. Workers
//! log the requests they serve; the supervisor logs those it answers itself
//! (a refused head, a head timeout, a worker that died or timed out), in
//! the same format and file. SIGUSR1 reopens the file, for logrotate.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use log::warn;

/// Line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Apache/nginx "combined", plus the duration in microseconds.
    Combined,
    /// One JSON object per line.
    Json,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "combined" => Some(Format::Combined),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Combined => "combined",
            Format::Json => "json",
        }
    }
}

/// What is logged about one request.
pub struct Entry<'a> {
    pub peer: &'a str,
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub status: u16,
    /// Response bytes written, head included.
    pub bytes: u64,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub duration: Duration,
    pub pid: u32,
    pub generation: u64,
}

impl<'a> Entry<'a> {
    /// A request answered without the app (refused, or its worker lost):
    /// no field of it known but its request line; `pid` and `generation`
    /// are the caller's to set.
    pub fn refused(
        peer: &'a str,
        (method, target, version): (&'a str, &'a str, &'a str),
        status: u16,
        bytes: u64,
    ) -> Entry<'a> {
        Entry {
            peer,
            method,
            target,
            version,
            status,
            bytes,
            referer: None,
            user_agent: None,
            duration: Duration::ZERO,
            pid: 0,
            generation: 0,
        }
    }
}

pub struct AccessLog {
    path: String,
    format: Format,
    file: Option<File>,
    /// Set (by a signal handler) when the file is to be reopened before the
    /// next line.
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// `path` is a file, or `-` for stdout.
    pub fn open(path: &str, format: Format) -> std::io::Result<AccessLog> {
        let mut log = AccessLog { path: path.to_owned(), format, file: None, reopen: Arc::default() };
        log.file = log.open_file()?;
        Ok(log)
    }

    /// The flag that makes the next [`AccessLog::write`] reopen the file,
    /// for a signal handler to set (`signal_hook::flag::register`).
    pub fn reopen_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.reopen)
    }

    /// Reopens the file before the next line (after logrotate moved it).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    fn open_file(&self) -> std::io::Result<Option<File>> {
        if self.path == "-" {
            return Ok(None);
        }
        OpenOptions::new().create(true).append(true).open(&self.path).map(Some)
    }

    pub fn write(&mut self, e: &Entry<'_>) {
        if self.reopen.swap(false, Ordering::Relaxed) {
            match self.open_file() {
                Ok(f) => self.file = f,
                Err(err) => warn!("cannot reopen access log {}: {err}", self.path),
            }
        }
        let line = match self.format {
            Format::Combined => combined(e),
            Format::Json => json(e),
        };
        let result = match &mut self.file {
            Some(f) => f.write_all(line.as_bytes()),
            None => std::io::stdout().lock().write_all(line.as_bytes()),
        };
        if let Err(err) = result {
            warn!("access log {}: {err}", self.path);
        }
    }
}

/// What the access log names as the request of one that was refused before
/// it could be parsed: its first line split into method, target and
/// version, each `-` where missing. At most 1 KiB of it (a line may be
/// refused for its length).
pub struct RawRequestLine {
    line: String,
}

impl RawRequestLine {
    const MAX: usize = 1024;

    pub fn from_bytes(received: &[u8]) -> RawRequestLine {
        let start = received.iter().position(|&c| c != b'\r' && c != b'\n').unwrap_or(received.len());
        let rest = &received[start..];
        let end = rest.iter().position(|&c| c == b'\r' || c == b'\n').unwrap_or(rest.len()).min(Self::MAX);
        RawRequestLine { line: String::from_utf8_lossy(&rest[..end]).into_owned() }
    }

    /// (method, target, version)
    pub fn parts(&self) -> (&str, &str, &str) {
        let mut it = self.line.splitn(3, ' ').filter(|p| !p.is_empty());
        let mut next = || it.next().unwrap_or("-");
        (next(), next(), next())
    }
}

/// `127.0.0.1 - - [23/Nov/2026:13:55:36 +0000] "GET / HTTP/1.1" 200 123 "-" "curl/8" 1234`
fn combined(e: &Entry<'_>) -> String {
    let host = e.peer.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(e.peer);
    fn quote(s: Option<&str>) -> Cow<'_, str> {
        s.map(escape).unwrap_or(Cow::Borrowed("-"))
    }
    format!(
        "{host} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" {}\n",
        clf_time(SystemTime::now()),
        escape(e.method),
        escape(e.target),
        e.version,
        e.status,
        e.bytes,
        quote(e.referer),
        quote(e.user_agent),
        e.duration.as_micros()
    )
}

fn json(e: &Entry<'_>) -> String {
    let doc = serde_json::json!({
        "time": httpdate::fmt_http_date(SystemTime::now()),
        "peer": e.peer,
        "method": e.method,
        "target": e.target,
        "version": e.version,
        "status": e.status,
        "bytes": e.bytes,
        "referer": e.referer,
        "user_agent": e.user_agent,
        "duration_us": e.duration.as_micros() as u64,
        "pid": e.pid,
        "generation": e.generation,
    });
    format!("{doc}\n")
}

/// Quotes and control characters escaped, so a line stays one line.
fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Common Log Format time, in UTC: `23/Nov/2026:13:55:36 +0000`, taken
/// apart from the HTTP-date httpdate formats (`Mon, 23 Nov 2026 13:55:36 GMT`).
fn clf_time(t: SystemTime) -> String {
    let http = httpdate::fmt_http_date(t);
    let parts: Vec<&str> = http.split(' ').collect();
    match parts.as_slice() {
        [_, day, month, year, time, _] => format!("{day}/{month}/{year}:{time} +0000"),
        _ => http,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            peer: "127.0.0.1:5000",
            method: "GET",
            target: "/a\"b",
            version: "HTTP/1.1",
            status: 200,
            bytes: 42,
            referer: None,
            user_agent: Some("curl/8"),
            duration: Duration::from_micros(1500),
            pid: 7,
            generation: 2,
        }
    }

    #[test]
    fn combined_lines() {
        let line = combined(&entry());
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        assert!(line.ends_with("] \"GET /a\\\"b HTTP/1.1\" 200 42 \"-\" \"curl/8\" 1500\n"), "{line}");
    }

    #[test]
    fn json_lines() {
        let v: serde_json::Value = serde_json::from_str(&json(&entry())).unwrap();
        assert_eq!(v["target"], "/a\"b");
        assert_eq!(v["generation"], 2);
        assert_eq!(v["referer"], serde_json::Value::Null);
    }

    #[test]
    fn raw_request_lines() {
        let parts = |raw: &[u8]| {
            let line = RawRequestLine::from_bytes(raw);
            let (m, t, v) = line.parts();
            (m.to_owned(), t.to_owned(), v.to_owned())
        };
        let own = |m: &str, t: &str, v: &str| (m.to_owned(), t.to_owned(), v.to_owned());
        assert_eq!(parts(b"\r\nGET /x HTTP/1.1\r\nHost: a\r\n"), own("GET", "/x", "HTTP/1.1"));
        assert_eq!(parts(b"GET /partial"), own("GET", "/partial", "-"));
        assert_eq!(parts(b""), own("-", "-", "-"));
        assert_eq!(parts(b"\x16\x03\x01\x00"), own("\u{16}\u{3}\u{1}\u{0}", "-", "-"));
        let long = [b"GET /".as_slice(), &[b'a'; 5000]].concat();
        assert_eq!(RawRequestLine::from_bytes(&long).parts().1.len(), 1020);
    }

    #[test]
    fn clf_time_shape() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784111777);
        assert_eq!(clf_time(t), "06/Nov/1994:08:49:37 +0000");
    }
}
