//! The `monodon` binary as a library: the CLI, the built-in apps, and
//! [`main_with`] for applications that embed monodon.
//!
//! An application built on the worker crate calls [`main_with`] from its
//! `main`. Started by a supervisor, the same binary runs as a worker;
//! started by hand, it is the monodon CLI (`my-app serve ...`), whose
//! workers are the binary itself.

pub mod apps;
pub mod byte_size;
pub mod cli;
mod config_file;
pub mod ctl;
mod lang;
mod top;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use log::error;
pub use monodon_worker::{App, Body, Request, Response, WorkerInfo};

use apps::BuiltIn;
use cli::{Cli, Command, ScaleTo, ServeArgs};
use monodon_supervisor::control::Command as Ctl;

/// Logs to stderr; `RUST_LOG` picks the level (default `info`).
fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env).try_init();
}

/// This executable's path, resolved once at start-up, so that workers are
/// started from the file on disk (a new deploy) and not from `/proc/self/exe`
/// (which keeps naming the old binary).
fn own_path() -> std::io::Result<OsString> {
    Ok(std::env::current_exe()?.into_os_string())
}

/// How a binary builds its default worker command from the serve settings.
type DefaultCommand = fn(&ServeArgs, &OsString) -> Vec<OsString>;

/// The `monodon` binary's workers: itself, in the `worker` role, with the app flags.
fn builtin_worker_command(args: &ServeArgs, exe: &OsString) -> Vec<OsString> {
    vec![
        exe.clone(),
        "worker".into(),
        "--app".into(),
        args.app.app.as_str().into(),
        "--root".into(),
        args.app.root.clone().into_os_string(),
    ]
}

/// An embedding app's workers: the binary itself (the worker role is told by
/// the environment).
fn embedded_worker_command(_: &ServeArgs, exe: &OsString) -> Vec<OsString> {
    vec![exe.clone()]
}

/// The serve settings: the command line, merged with `--config` if given.
fn serve_args(argv: &[OsString]) -> Result<ServeArgs, String> {
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    let Command::Serve(args) = cli.command else { return Err("not a serve command".into()) };
    let Some(path) = args.config.clone() else { return Ok(*args) };
    let at = argv.iter().position(|a| a == "serve").ok_or("no serve subcommand")?;
    let mut merged: Vec<OsString> = argv[..=at].to_vec();
    merged.extend(config_file::merge(&path, &argv[at + 1..])?);
    match Cli::try_parse_from(&merged) {
        Ok(Cli { command: Command::Serve(args) }) => Ok(*args),
        Ok(_) => Err("not a serve command".into()),
        Err(e) => {
            Err(format!("in --config {}: {}", path.display(), e.to_string().trim_start_matches("error: ")))
        }
    }
}

/// The supervisor's configuration from `argv`, checked.
fn load_config(
    argv: &[OsString],
    exe: &OsString,
    default: DefaultCommand,
) -> Result<monodon_supervisor::Config, String> {
    let args = serve_args(argv)?;
    args.validate()?;
    let (command, language) = match lang::worker_command(&args) {
        Some(command) => (command?, true),
        None => (default(&args, exe), false),
    };
    let mut config = args.to_config(command);
    // The Python, Perl and Ruby workers keep to the minimal profile: the
    // supervisor accepts for them, and they are given no listeners.
    config.worker_accept &= !language;
    Ok(config)
}

fn serve(default: DefaultCommand) -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let exe = match own_path() {
        Ok(p) => p,
        Err(e) => {
            error!("cannot find this executable's path: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = match load_config(&argv, &exe, default) {
        Ok(c) => c,
        Err(e) => {
            use clap::CommandFactory;
            Cli::command().error(clap::error::ErrorKind::ValueValidation, e).exit();
        }
    };
    // A reload reads the config file again, with the same command line.
    let has_file = serve_args(&argv).is_ok_and(|a| a.config.is_some());
    if has_file {
        let source = move || load_config(&argv, &exe, default);
        config.source = Some(monodon_supervisor::config::ConfigSource(std::sync::Arc::new(source)));
    }
    match monodon_supervisor::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `main` of the `monodon` binary, with the built-in apps.
pub fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(_) => serve(builtin_worker_command),
        Command::Status { .. }
        | Command::Top { .. }
        | Command::Reload { .. }
        | Command::Stop { .. }
        | Command::Scale { .. } => control_command(cli.command),
        Command::Worker(args) => {
            if !monodon_worker::is_worker() {
                eprintln!("error: `monodon worker` is started by `monodon serve`, not by hand");
                return ExitCode::from(2);
            }
            match BuiltIn::new(args.app.app, args.app.root) {
                Ok(app) => monodon_worker::run(app),
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `main` for an application that embeds monodon: a worker when started by
/// a supervisor, the monodon CLI otherwise (its workers are this binary).
/// `make_app` runs only in workers, before they report ready.
pub fn main_with<A: App, F: FnOnce() -> A>(make_app: F) -> ExitCode {
    init_logging();
    if monodon_worker::is_worker() {
        return monodon_worker::run(make_app());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(_) => serve(embedded_worker_command),
        Command::Worker(_) => {
            eprintln!("error: the worker role is started by `serve`, not by hand");
            ExitCode::from(2)
        }
        other => control_command(other),
    }
}

/// `status`, `reload`, `stop`, `scale`: talk to a running supervisor.
fn control_command(command: Command) -> ExitCode {
    use std::time::Duration;
    match command {
        Command::Status { json, target } => {
            match ctl::call(&target.path(), Ctl::Status, Duration::from_secs(10)) {
                Ok(monodon_supervisor::control::Response { ok: true, status: Some(status), .. }) => {
                    if json {
                        ctl::print(&(serde_json::to_string_pretty(&status).unwrap_or_default() + "\n"));
                    } else {
                        ctl::print(&ctl::render(&status));
                    }
                    ExitCode::SUCCESS
                }
                other => ctl::report(other),
            }
        }
        Command::Top { interval, target } => match top::run(&target.path(), interval) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Reload { target } => {
            // A reload takes at most the supervisor's --reload-timeout; allow for a long one.
            ctl::report(ctl::call(&target.path(), Ctl::Reload, Duration::from_secs(3600)))
        }
        Command::Stop { fast, target } => {
            let path = target.path();
            let code = ctl::report(ctl::call(&path, Ctl::Stop { fast }, Duration::from_secs(10)));
            if code != ExitCode::SUCCESS {
                return code;
            }
            if ctl::wait_gone(&path, Duration::from_secs(3600)) {
                ctl::print("stopped\n");
                ExitCode::SUCCESS
            } else {
                eprintln!("error: the supervisor is still running");
                ExitCode::FAILURE
            }
        }
        Command::Scale { workers, target } => {
            let command = match workers {
                ScaleTo::Absolute(n) => Ctl::Scale { workers: Some(n), delta: None },
                ScaleTo::Relative(d) => Ctl::Scale { workers: None, delta: Some(d) },
            };
            ctl::report(ctl::call(&target.path(), command, Duration::from_secs(10)))
        }
        Command::Serve(_) | Command::Worker(_) => unreachable!("handled by main"),
    }
}
