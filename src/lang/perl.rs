//! `--psgi`: the Perl worker, `lang/perl/monodon_psgi.pl`.

use std::ffi::OsString;
use std::path::Path;

use super::{common_options, interpreter, run_probe, script_dir, write_worker};
use crate::cli::ServeArgs;

/// The worker's source.
const WORKER: &str = include_str!("../../lang/perl/monodon_psgi.pl");

/// The oldest Perl the worker supports.
const OLDEST: (u32, u32) = (5, 16);

/// The modules the worker needs beyond Perl's core, and the Debian
/// package of each.
const MODULES: [(&str, &str); 2] =
    [("Socket::MsgHdr", "libsocket-msghdr-perl"), ("File::Map", "libfile-map-perl")];

/// The worker command for `--psgi`: the interpreter, its `-I` directories,
/// the worker script and its options.
pub fn worker_command(args: &ServeArgs, psgi: &Path) -> Result<Vec<OsString>, String> {
    let perl = interpreter(args.lang.perl.as_deref(), "--perl", "perl", "--psgi")?;
    check(&perl)?;
    let script = write_worker(&script_dir(), "monodon_psgi", "pl", WORKER)?;
    let mut command: Vec<OsString> = vec![perl.into_os_string()];
    for dir in &args.lang.include {
        command.push(format!("-I{}", dir.display()).into());
    }
    command.extend([script.into_os_string(), "--app".into(), psgi.into()]);
    command.extend(common_options(args));
    Ok(command)
}

/// Perl's version, and the modules the worker loads, each missing one
/// named with its package.
fn check(perl: &Path) -> Result<(), String> {
    super::check_version(
        perl,
        &["-e", "printf '%d %d', $] =~ /^(\\d+)\\.(\\d{3})/"],
        "Perl",
        OLDEST,
        "PSGI",
    )?;
    let missing: Vec<String> = MODULES
        .iter()
        .filter(|(module, _)| run_probe(perl, &[&format!("-M{module}"), "-e", "1"]).is_err())
        .map(|(module, package)| format!("{module} (Debian: {package})"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the PSGI worker needs Perl modules {} is missing: {}",
            perl.display(),
            missing.join(", ")
        ))
    }
}
