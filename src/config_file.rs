//! `--config FILE`: the settings of `monodon serve` in TOML, with the same
//! names as the flags (`max-requests-per-child = 100`). Flags given on the
//! command line win. Unknown keys and bad values are errors that name the
//! key (and, for TOML errors, the line). The file is read again on every
//! reload (SIGHUP), so most settings change without a restart.

use std::ffi::OsString;
use std::path::Path;

use serde::Deserialize;

/// A number, or a string with a unit: durations (`30`, `"500ms"`, `"2m"`)
/// and sizes (`65536`, `"64KiB"`, `"1M"`), read by the flag's own parser.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum WithUnit {
    Number(u64),
    Text(String),
}

impl WithUnit {
    fn arg(&self) -> String {
        match self {
            WithUnit::Number(n) => n.to_string(),
            WithUnit::Text(t) => t.clone(),
        }
    }
}

/// Every key a config file may hold: the flags of `monodon serve`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    listen: Option<Vec<String>>,
    workers: Option<u32>,
    app: Option<String>,
    root: Option<String>,
    /// The worker command (what follows `--` on the command line).
    command: Option<Vec<String>>,
    keepalive_timeout: Option<WithUnit>,
    head_timeout: Option<WithUnit>,
    io_timeout: Option<WithUnit>,
    graceful_timeout: Option<WithUnit>,
    timeout: Option<WithUnit>,
    reload_timeout: Option<WithUnit>,
    read_ahead: Option<WithUnit>,
    max_requests_per_child: Option<u64>,
    min_requests_per_child: Option<u64>,
    max_worker_age: Option<WithUnit>,
    max_worker_memory: Option<WithUnit>,
    max_request_line: Option<WithUnit>,
    max_header_line: Option<WithUnit>,
    max_headers: Option<u64>,
    max_head: Option<WithUnit>,
    max_body: Option<WithUnit>,
    buffer_body: Option<WithUnit>,
    max_pipelined: Option<u64>,
    queue: Option<u64>,
    backlog: Option<i64>,
    max_connections: Option<u64>,
    min_body_rate: Option<WithUnit>,
    control: Option<String>,
    metrics: Option<String>,
    chdir: Option<String>,
    proxy_protocol: Option<bool>,
    forwarded_allow_ips: Option<String>,
    health_path: Option<String>,
    worker_accept: Option<bool>,
    warm_connections: Option<u64>,
    spawn: Option<String>,
    access_log: Option<String>,
    access_log_format: Option<String>,
    user: Option<String>,
    group: Option<String>,
    wsgi: Option<String>,
    python: Option<String>,
    post_fork: Option<String>,
    psgi: Option<String>,
    perl: Option<String>,
    include: Option<Vec<String>>,
    rack: Option<String>,
    ruby: Option<String>,
    no_preload: Option<bool>,
    underscore_headers: Option<String>,
}

impl Settings {
    /// The settings as `(flag, values)`, in a fixed order.
    fn flags(&self) -> Vec<(&'static str, Vec<String>)> {
        let mut out: Vec<(&'static str, Vec<String>)> = Vec::new();
        let mut one = |flag: &'static str, v: Option<String>| {
            if let Some(v) = v {
                out.push((flag, vec![v]));
            }
        };
        one("--workers", self.workers.map(|v| v.to_string()));
        one("--app", self.app.clone());
        one("--root", self.root.clone());
        one("--keepalive-timeout", self.keepalive_timeout.as_ref().map(WithUnit::arg));
        one("--head-timeout", self.head_timeout.as_ref().map(WithUnit::arg));
        one("--io-timeout", self.io_timeout.as_ref().map(WithUnit::arg));
        one("--graceful-timeout", self.graceful_timeout.as_ref().map(WithUnit::arg));
        one("--timeout", self.timeout.as_ref().map(WithUnit::arg));
        one("--reload-timeout", self.reload_timeout.as_ref().map(WithUnit::arg));
        one("--read-ahead", self.read_ahead.as_ref().map(WithUnit::arg));
        one("--max-requests-per-child", self.max_requests_per_child.map(|v| v.to_string()));
        one("--min-requests-per-child", self.min_requests_per_child.map(|v| v.to_string()));
        one("--max-worker-age", self.max_worker_age.as_ref().map(WithUnit::arg));
        one("--max-worker-memory", self.max_worker_memory.as_ref().map(WithUnit::arg));
        one("--max-request-line", self.max_request_line.as_ref().map(WithUnit::arg));
        one("--max-header-line", self.max_header_line.as_ref().map(WithUnit::arg));
        one("--max-headers", self.max_headers.map(|v| v.to_string()));
        one("--max-head", self.max_head.as_ref().map(WithUnit::arg));
        one("--max-body", self.max_body.as_ref().map(WithUnit::arg));
        one("--buffer-body", self.buffer_body.as_ref().map(WithUnit::arg));
        one("--max-pipelined", self.max_pipelined.map(|v| v.to_string()));
        one("--queue", self.queue.map(|v| v.to_string()));
        one("--backlog", self.backlog.map(|v| v.to_string()));
        one("--max-connections", self.max_connections.map(|v| v.to_string()));
        one("--min-body-rate", self.min_body_rate.as_ref().map(WithUnit::arg));
        one("--control", self.control.clone());
        one("--metrics", self.metrics.clone());
        one("--chdir", self.chdir.clone());
        one("--proxy-protocol", self.proxy_protocol.map(|b| b.to_string()));
        one("--forwarded-allow-ips", self.forwarded_allow_ips.clone());
        one("--health-path", self.health_path.clone());
        one("--worker-accept", self.worker_accept.map(|b| b.to_string()));
        one("--warm-connections", self.warm_connections.map(|n| n.to_string()));
        one("--spawn", self.spawn.clone());
        one("--access-log", self.access_log.clone());
        one("--access-log-format", self.access_log_format.clone());
        one("--user", self.user.clone());
        one("--group", self.group.clone());
        one("--wsgi", self.wsgi.clone());
        one("--python", self.python.clone());
        one("--post-fork", self.post_fork.clone());
        one("--psgi", self.psgi.clone());
        one("--perl", self.perl.clone());
        one("--rack", self.rack.clone());
        one("--ruby", self.ruby.clone());
        one("--no-preload", self.no_preload.map(|b| b.to_string()));
        one("--underscore-headers", self.underscore_headers.clone());
        if let Some(listen) = &self.listen {
            out.push(("--listen", listen.clone()));
        }
        if let Some(include) = &self.include {
            out.push(("--include", include.clone()));
        }
        out
    }
}

/// Short forms of the flags that have one.
fn short_of(flag: &str) -> Option<&'static str> {
    match flag {
        "--listen" => Some("-l"),
        "--workers" => Some("-w"),
        "--include" => Some("-I"),
        _ => None,
    }
}

/// Whether `args` (the command line after `serve`, before `--`) sets `flag`.
fn given(args: &[OsString], flag: &str) -> bool {
    let short = short_of(flag);
    args.iter().map(|a| a.to_string_lossy()).take_while(|a| a != "--").any(|a| {
        a == flag
            || a.starts_with(&format!("{flag}="))
            || short.is_some_and(|s| a == s || a.starts_with(s) && a.len() > 2)
    })
}

/// Reads `path` and returns the arguments of `serve`: the file's settings
/// first, then `cli` (the command line after `serve`), a flag given on the
/// command line replacing the file's.
pub fn merge(path: &Path, cli: &[OsString]) -> Result<Vec<OsString>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
    let settings: Settings =
        toml::from_str(&text).map_err(|e| format!("--config {}: {e}", path.display()))?;
    let mut args: Vec<OsString> = Vec::new();
    for (flag, values) in settings.flags() {
        if given(cli, flag) {
            continue;
        }
        for v in values {
            args.push(flag.into());
            args.push(v.into());
        }
    }
    args.extend(cli.iter().cloned());
    if let Some(command) = settings.command {
        if !cli.iter().any(|a| a == "--") && !command.is_empty() {
            args.push("--".into());
            args.extend(command.into_iter().map(OsString::from));
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn file(text: &str) -> tempfile_path::TempFile {
        tempfile_path::TempFile::new(text)
    }

    /// A file that removes itself (no extra crate for one test helper).
    mod tempfile_path {
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn new(text: &str) -> TempFile {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "monodon-config-{}-{}.toml",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&p, text).unwrap();
                TempFile(p)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn file_settings_become_flags_and_the_command_line_wins() {
        let f = file("workers = 3\nlisten = [\"127.0.0.1:9000\", \"unix:/tmp/a\"]\ntimeout = \"5s\"\ncommand = [\"/bin/app\", \"-x\"]\n");
        let args = merge(&f.0, &os(&["-w", "5"])).unwrap();
        assert_eq!(
            args,
            os(&[
                "--timeout",
                "5s",
                "--listen",
                "127.0.0.1:9000",
                "--listen",
                "unix:/tmp/a",
                "-w",
                "5",
                "--",
                "/bin/app",
                "-x"
            ])
        );
        let args = merge(&f.0, &os(&["--listen=[::1]:1", "--", "/other"])).unwrap();
        assert_eq!(args, os(&["--workers", "3", "--timeout", "5s", "--listen=[::1]:1", "--", "/other"]));
    }

    #[test]
    fn a_perl_app_with_its_include_dirs_comes_from_the_file() {
        let f = file("psgi = \"app.psgi\"\ninclude = [\"lib\", \"local/lib/perl5\"]\nno-preload = true\n");
        let args = merge(&f.0, &[]).unwrap();
        let want = [
            "--psgi",
            "app.psgi",
            "--no-preload",
            "true",
            "--include",
            "lib",
            "--include",
            "local/lib/perl5",
        ];
        assert_eq!(args, os(&want));
        assert_eq!(
            merge(&f.0, &os(&["-I", "other"])).unwrap()[4..],
            os(&["-I", "other"])[..],
            "-I on the command line wins"
        );
    }

    #[test]
    fn sizes_and_durations_take_numbers_or_units() {
        let f = file("buffer-body = \"1M\"\nmax-body = 2048\nmin-body-rate = \"1KiB\"\nhead-timeout = 5\n");
        let args = merge(&f.0, &[]).unwrap();
        assert_eq!(
            args,
            os(&[
                "--head-timeout",
                "5",
                "--max-body",
                "2048",
                "--buffer-body",
                "1M",
                "--min-body-rate",
                "1KiB"
            ])
        );
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let f = file("workers = 2\n\nmax-requests = 5\n");
        let e = merge(&f.0, &[]).unwrap_err();
        assert!(e.contains("max-requests") && e.contains("line 3"), "{e}");
        let f = file("workers = \"many\"\n");
        let e = merge(&f.0, &[]).unwrap_err();
        assert!(e.contains("workers") || e.contains("line 1"), "{e}");
    }
}
