//! `--wsgi`: the Python worker, `lang/python/monodon_wsgi.py`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{common_options, script_dir, write_worker};
use crate::cli::ServeArgs;

/// The worker's source.
const WORKER: &str = include_str!("../../lang/python/monodon_wsgi.py");

/// The oldest Python the worker supports.
const OLDEST: (u32, u32) = (3, 8);

/// The worker command for `--wsgi`: the interpreter, the worker script and
/// its options.
pub fn worker_command(args: &ServeArgs, wsgi: &str) -> Result<Vec<OsString>, String> {
    let python = interpreter(args.lang.python.as_deref())?;
    check_version(&python)?;
    let script = write_worker(&script_dir(), "monodon_wsgi", "py", WORKER)?;
    let mut command: Vec<OsString> =
        vec![python.into_os_string(), script.into_os_string(), "--app".into(), wsgi.into()];
    command.extend(common_options(args));
    if let Some(hook) = &args.lang.post_fork {
        command.extend(["--post-fork".into(), hook.into()]);
    }
    Ok(command)
}

/// `--python`, else the active virtualenv's, else `python3` on PATH.
fn interpreter(given: Option<&Path>) -> Result<PathBuf, String> {
    if given.is_none() {
        if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
            let python = Path::new(&venv).join("bin/python");
            if python.is_file() {
                return Ok(python);
            }
        }
    }
    super::interpreter(given, "--python", "python3", "--wsgi")
}

fn check_version(python: &Path) -> Result<(), String> {
    let probe = ["-c", "import sys; print('%d %d' % sys.version_info[:2])"];
    super::check_version(python, &probe, "Python", OLDEST, "WSGI")
}
