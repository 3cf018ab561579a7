//! `--rack`: the Ruby worker, `lang/ruby/monodon_rack.rb`.

use std::ffi::OsString;
use std::path::Path;

use super::{common_options, interpreter, script_dir, write_worker};
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
    let probe = ["-e", "print RUBY_VERSION.split('.').first(2).join(' ')"];
    super::check_version(ruby, &probe, "Ruby", OLDEST, "Rack")
}
