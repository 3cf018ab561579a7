//! `static`: serves the files under a root directory.
//!
//! GET and HEAD; Content-Type by extension; Last-Modified and
//! If-Modified-Since; one byte range; `index.html` for directories. A path
//! can never leave the root: `..` segments, encoded slashes and NULs are
//! refused, and the resolved path (symlinks followed) must still be inside
//! the root.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use monodon_worker::{App, Request, Response};
use percent_encoding::percent_decode_str;

pub struct StaticFiles {
    root: PathBuf,
}

impl StaticFiles {
    pub fn new(root: PathBuf) -> std::io::Result<StaticFiles> {
        let root = root
            .canonicalize()
            .map_err(|e| std::io::Error::new(e.kind(), format!("--root {}: {e}", root.display())))?;
        Ok(StaticFiles { root })
    }

    /// Maps a request path to a file system path under the root.
    fn resolve(&self, request_path: &str) -> Result<PathBuf, u16> {
        let mut path = self.root.clone();
        for raw in request_path.split('/') {
            let lower = raw.to_ascii_lowercase();
            if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
                return Err(403);
            }
            let segment = percent_decode_str(raw).decode_utf8().map_err(|_| 404u16)?;
            match segment.as_ref() {
                "" | "." => {}
                ".." => return Err(403),
                s if s.contains(['\\', '\0']) => return Err(403),
                s => path.push(s),
            }
        }
        Ok(path)
    }
}

impl App for StaticFiles {
    fn call(&mut self, req: &mut Request<'_>) -> Response {
        if req.method != "GET" && req.method != "HEAD" {
            return Response::text(405, "only GET and HEAD are allowed here\n").header("Allow", "GET, HEAD");
        }
        if !req.target.starts_with('/') {
            return Response::text(400, "expected a path\n");
        }
        let path = match self.resolve(req.path()) {
            Ok(p) => p,
            Err(status) => return Response::text(status, "not allowed\n"),
        };
        let Ok(real) = path.canonicalize() else {
            return Response::text(404, "not found\n");
        };
        if !real.starts_with(&self.root) {
            return Response::text(403, "not allowed\n");
        }
        let file_path = if real.is_dir() {
            if !req.path().ends_with('/') {
                let mut location = format!("{}/", req.path());
                if let Some(q) = req.query() {
                    location = format!("{location}?{q}");
                }
                return Response::text(301, "moved\n").header("Location", location);
            }
            real.join("index.html")
        } else {
            real
        };
        serve_file(req, &file_path)
    }
}

fn serve_file(req: &Request<'_>, path: &Path) -> Response {
    let Ok(file) = File::open(path) else {
        return Response::text(404, "not found\n");
    };
    let Ok(meta) = file.metadata() else {
        return Response::text(404, "not found\n");
    };
    if !meta.is_file() {
        return Response::text(404, "not found\n");
    }
    let len = meta.len();
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let modified = meta.modified().ok().map(truncate_to_seconds);
    let mut response =
        Response::new(200).header("Content-Type", mime.essence_str()).header("Accept-Ranges", "bytes");
    if let Some(m) = modified {
        response = response.header("Last-Modified", httpdate::fmt_http_date(m));
        let since = req.header_str("If-Modified-Since").and_then(|s| httpdate::parse_http_date(s).ok());
        if since.is_some_and(|since| m <= since) {
            response.status = 304;
            return response;
        }
    }
    match req.header_str("Range").map(|r| parse_range(r, len)) {
        None | Some(RangeRequest::Ignore) => response.file(file, 0, len),
        Some(RangeRequest::Unsatisfiable) => {
            Response::text(416, "range not satisfiable\n").header("Content-Range", format!("bytes */{len}"))
        }
        Some(RangeRequest::Range(start, end)) => {
            response.status = 206;
            response.header("Content-Range", format!("bytes {start}-{end}/{len}")).file(
                file,
                start,
                end - start + 1,
            )
        }
    }
}

fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

#[derive(Debug, PartialEq, Eq)]
enum RangeRequest {
    /// Serve the whole file (no usable single range).
    Ignore,
    Unsatisfiable,
    /// Inclusive byte positions.
    Range(u64, u64),
}

/// Parses a single `bytes=` range against a file of `len` bytes
/// (RFC 9110 §14.1.2). Several ranges are answered with the whole file.
fn parse_range(header: &str, len: u64) -> RangeRequest {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeRequest::Ignore;
    };
    if spec.contains(',') {
        return RangeRequest::Ignore;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Ignore;
    };
    let num = |s: &str| {
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse::<u64>().ok()
        } else {
            None
        }
    };
    match (first, last) {
        ("", suffix) => match num(suffix) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(n) if len > 0 => RangeRequest::Range(len.saturating_sub(n), len - 1),
            Some(_) => RangeRequest::Unsatisfiable,
            None => RangeRequest::Ignore,
        },
        (start, end) => {
            let Some(start) = num(start) else {
                return RangeRequest::Ignore;
            };
            let end = if end.is_empty() { Some(u64::MAX) } else { num(end) };
            match end {
                None => RangeRequest::Ignore,
                Some(end) if end < start => RangeRequest::Ignore,
                Some(_) if start >= len => RangeRequest::Unsatisfiable,
                Some(end) => RangeRequest::Range(start, end.min(len - 1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-4", 10), Range(0, 4));
        assert_eq!(parse_range("bytes=5-", 10), Range(5, 9));
        assert_eq!(parse_range("bytes=-3", 10), Range(7, 9));
        assert_eq!(parse_range("bytes=-30", 10), Range(0, 9));
        assert_eq!(parse_range("bytes=8-100", 10), Range(8, 9));
        assert_eq!(parse_range("bytes=10-", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), Ignore);
        assert_eq!(parse_range("bytes=4-2", 10), Ignore);
        assert_eq!(parse_range("items=0-1", 10), Ignore);
        assert_eq!(parse_range("bytes=+1-2", 10), Ignore);
    }

    #[test]
    fn paths_stay_under_the_root() {
        let dir = std::env::temp_dir();
        let s = StaticFiles::new(dir.clone()).unwrap();
        let root = dir.canonicalize().unwrap();
        assert_eq!(s.resolve("/a/./b"), Ok(root.join("a/b")));
        assert_eq!(s.resolve("/a%20b"), Ok(root.join("a b")));
        assert_eq!(s.resolve("/../etc/passwd"), Err(403));
        assert_eq!(s.resolve("/a/%2e%2e/%2e%2e/etc"), Err(403));
        assert_eq!(s.resolve("/a%2fb"), Err(403));
        assert_eq!(s.resolve("/a%00b"), Err(403));
        assert_eq!(s.resolve("/a%5c..%5cb"), Err(403));
    }
}
