//! `--wsgi`, `--psgi`, `--rack`: apps in Python, Perl and Ruby as workers.
//! Each worker is one file of its language under `lang/`, carried inside
//! this binary and written out once per content (its name holds its hash)
//! to a directory only we can write, from which each generation's
//! interpreter runs it. They speak PROTOCOL.md's minimal profile.

mod perl;
mod python;
mod ruby;

use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::cli::ServeArgs;

/// The worker command for the language app the flags name, if any.
pub fn worker_command(args: &ServeArgs) -> Option<Result<Vec<OsString>, String>> {
    let lang = &args.lang;
    if let Some(app) = &lang.wsgi {
        return Some(python::worker_command(args, app));
    }
    if let Some(app) = &lang.psgi {
        return Some(perl::worker_command(args, app));
    }
    if let Some(app) = &lang.rack {
        return Some(ruby::worker_command(args, app));
    }
    None
}

/// The options every language worker takes, after its app.
fn common_options(args: &ServeArgs) -> Vec<OsString> {
    let mut options: Vec<OsString> =
        vec!["--underscore-headers".into(), args.lang.underscore_headers.clone().into()];
    if args.lang.no_preload {
        options.push("--no-preload".into());
    }
    options
}

/// The interpreter `given` (by `flag`), else `default` on PATH.
fn interpreter(given: Option<&Path>, flag: &str, default: &str, app_flag: &str) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return find_program(path).ok_or_else(|| format!("{flag} {}: no such program", path.display()));
    }
    find_program(Path::new(default))
        .ok_or_else(|| format!("{app_flag} needs {default}: none on PATH (pass {flag} PATH)"))
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

/// What `program args` prints, or an error naming the program and what it
/// said on stderr.
fn run_probe(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program probe`, which prints its version as `major minor`, and
/// checks it is at least `oldest`; errors name the program and what the
/// `worker` needs.
fn check_version(
    program: &Path,
    probe: &[&str],
    language: &str,
    oldest: (u32, u32),
    worker: &str,
) -> Result<(), String> {
    let printed = run_probe(program, probe)
        .map_err(|e| format!("{} did not run as {language}: {e}", program.display()))?;
    match major_minor(&printed) {
        Some(version) if version >= oldest => Ok(()),
        Some((major, minor)) => Err(format!(
            "{} is {language} {major}.{minor}; the {worker} worker needs {}.{} or later",
            program.display(),
            oldest.0,
            oldest.1
        )),
        None => Err(format!("{} did not run as {language}: it printed {printed:?}", program.display())),
    }
}

/// The first two numbers of a version printed as `major minor`.
fn major_minor(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split_whitespace().map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// `$RUNTIME_DIRECTORY` under systemd, else a directory of ours in the
/// temporary directory.
fn script_dir() -> PathBuf {
    match std::env::var_os("RUNTIME_DIRECTORY") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("monodon-{}", nix::unistd::geteuid())),
    }
}

/// Writes a worker's `source` into `dir` (made if missing) as
/// `stem-HASH.ext` unless it is there already; its path. The directory must
/// be ours and writable by nobody else, since whoever can write it can run
/// code as the workers.
fn write_worker(dir: &Path, stem: &str, ext: &str, source: &str) -> Result<PathBuf, String> {
    let fail = |e: std::io::Error| format!("writing the worker {stem} into {}: {e}", dir.display());
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(fail)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is not a directory that only this user can write; the worker {stem} is not put there",
            dir.display()
        ));
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut hasher);
    let path = dir.join(format!("{stem}-{:016x}.{ext}", hasher.finish()));
    if std::fs::read_to_string(&path).is_ok_and(|text| text == source) {
        return Ok(path);
    }
    // Written whole under another name, then renamed: a worker starting
    // meanwhile never reads half of it.
    let partial = dir.join(format!(".{stem}-{}.partial", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&partial)
        .map_err(fail)?;
    file.write_all(source.as_bytes()).map_err(fail)?;
    drop(file);
    std::fs::rename(&partial, &path).map_err(fail)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_written_once_and_only_into_a_directory_of_ours() {
        let dir = std::env::temp_dir().join(format!("monodon-lang-test-{}", std::process::id()));
        let path = write_worker(&dir, "w", "txt", "print 1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "print 1\n");
        assert_eq!(
            write_worker(&dir, "w", "txt", "print 1\n").unwrap(),
            path,
            "the same file the second time"
        );
        assert_ne!(write_worker(&dir, "w", "txt", "print 2\n").unwrap(), path, "new content, a new name");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = write_worker(&dir, "w", "txt", "print 1\n").unwrap_err();
        assert!(e.contains("only this user can write"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_interpreter_is_named() {
        let e = interpreter(Some(Path::new("/nonexistent/perl9")), "--perl", "perl", "--psgi").unwrap_err();
        assert_eq!(e, "--perl /nonexistent/perl9: no such program");
    }

    #[test]
    fn versions_are_read_as_two_numbers() {
        assert_eq!(major_minor("3 11\n"), Some((3, 11)));
        assert_eq!(major_minor("5"), None);
        assert_eq!(major_minor("x y"), None);
    }
}
