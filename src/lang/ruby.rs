//! `--rack`: the Ruby worker, `lang/ruby/monodon_rack.rb`.

use std::ffi::OsString;
use std::path::Path;

use super::{common_options, interpreter, major_minor, run_probe, script_dir, write_worker};
use crate::cli::ServeArgs;

/// The worker's source.
const WORKER: &str = include_str!("../../lang/ruby/monodon_rack.rb");

/// The oldest Ruby the worker supports.
const OLDEST: (u32, u32) = (3, 1);

/// The worker command for `--rack`: the interpreter, the worker script and
/// its options.
pub fn worker_command(args: &ServeArgs, rackup: &Path) -> Result<Vec<OsString>, String> {
    let ruby = interpreter(args.lang.ruby.as_deref(), "--ruby", "ruby", "--rack")?;
    check_version(&ruby)?;
    let script = write_worker(&script_dir(), "monodon_rack", "rb", WORKER)?;
    let mut command: Vec<OsString> =
        vec![ruby.into_os_string(), script.into_os_string(), "--app".into(), rackup.into()];
    command.extend(common_options(args));
    Ok(command)
}

fn check_version(ruby: &Path) -> Result<(), String> {
    let printed = run_probe(ruby, &["-e", "print RUBY_VERSION.split('.').first(2).join(' ')"])
        .map_err(|e| format!("{} did not run as Ruby: {e}", ruby.display()))?;
    match major_minor(&printed) {
        Some(version) if version >= OLDEST => Ok(()),
        Some((major, minor)) => Err(format!(
            "{} is Ruby {major}.{minor}; the Rack worker needs {}.{} or later",
            ruby.display(),
            OLDEST.0,
            OLDEST.1
        )),
        None => Err(format!("{} did not run as Ruby: it printed {printed:?}", ruby.display())),
    }
}
