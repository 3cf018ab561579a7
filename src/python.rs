//! `--wsgi`: Python apps as workers. The worker is `lang/python/monodon_wsgi.py`,
//! carried inside this binary and written out once per content (its name
//! holds its hash) to a directory only we can write, from which each
//! generation's interpreter runs it.

use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::cli::ServeArgs;

/// The worker's source.
const WORKER: &str = include_str!("../lang/python/monodon_wsgi.py");

/// The oldest Python the worker supports.
const OLDEST: (u32, u32) = (3, 8);

/// The worker command for `--wsgi`: the interpreter, the worker script and
/// its options.
pub fn worker_command(args: &ServeArgs, wsgi: &str) -> Result<Vec<OsString>, String> {
    let python = interpreter(args.python.python.as_deref())?;
    check_version(&python)?;
    let script = write_worker(&script_dir())?;
    let mut command: Vec<OsString> =
        vec![python.into_os_string(), script.into_os_string(), "--app".into(), wsgi.into()];
    command.extend(["--underscore-headers".into(), args.python.underscore_headers.clone().into()]);
    if let Some(hook) = &args.python.post_fork {
        command.extend(["--post-fork".into(), hook.into()]);
    }
    if args.python.no_preload {
        command.push("--no-preload".into());
    }
    Ok(command)
}

/// `--python`, else the active virtualenv's, else `python3` on PATH.
fn interpreter(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return find_program(path).ok_or_else(|| format!("--python {}: no such program", path.display()));
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        let python = Path::new(&venv).join("bin/python");
        if python.is_file() {
            return Ok(python);
        }
    }
    find_program(Path::new("python3"))
        .ok_or_else(|| "--wsgi needs Python 3: no python3 on PATH (pass --python PATH)".to_owned())
}

/// A path as given if it has a slash, else looked up on PATH.
fn find_program(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn check_version(python: &Path) -> Result<(), String> {
    let out = std::process::Command::new(python)
        .args(["-c", "import sys; print('%d %d' % sys.version_info[:2])"])
        .output()
        .map_err(|e| format!("--python {}: {e}", python.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace().map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) >= OLDEST => Ok(()),
        (Some(major), Some(minor)) => Err(format!(
            "{} is Python {major}.{minor}; the WSGI worker needs {}.{} or later",
            python.display(),
            OLDEST.0,
            OLDEST.1
        )),
        _ => Err(format!(
            "{} did not run as Python: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// `$RUNTIME_DIRECTORY` under systemd, else a directory of ours in the
/// temporary directory.
fn script_dir() -> PathBuf {
    match std::env::var_os("RUNTIME_DIRECTORY") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("monodon-{}", nix::unistd::geteuid())),
    }
}

/// Writes the worker into `dir` (made if missing) unless it is there
/// already; its path. The directory must be ours and writable by nobody
/// else, since whoever can write it can run code as the workers.
fn write_worker(dir: &Path) -> Result<PathBuf, String> {
    let fail = |e: std::io::Error| format!("writing the Python worker into {}: {e}", dir.display());
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(fail)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is not a directory that only this user can write; the Python worker is not put there",
            dir.display()
        ));
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    WORKER.hash(&mut hasher);
    let path = dir.join(format!("monodon_wsgi-{:016x}.py", hasher.finish()));
    if std::fs::read_to_string(&path).is_ok_and(|text| text == WORKER) {
        return Ok(path);
    }
    // Written whole under another name, then renamed: a worker starting
    // meanwhile never reads half of it.
    let partial = dir.join(format!(".monodon_wsgi-{}.partial", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&partial)
        .map_err(fail)?;
    file.write_all(WORKER.as_bytes()).map_err(fail)?;
    drop(file);
    std::fs::rename(&partial, &path).map_err(fail)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_is_written_once_and_only_into_a_directory_of_ours() {
        let dir = std::env::temp_dir().join(format!("monodon-python-test-{}", std::process::id()));
        let path = write_worker(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), WORKER);
        assert_eq!(write_worker(&dir).unwrap(), path, "the same file the second time");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = write_worker(&dir).unwrap_err();
        assert!(e.contains("only this user can write"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_interpreter_is_named() {
        let e = interpreter(Some(Path::new("/nonexistent/python9"))).unwrap_err();
        assert_eq!(e, "--python /nonexistent/python9: no such program");
    }
}
