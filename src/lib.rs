//! The `monodon` binary as a library: the CLI, the built-in apps, and
//! [`main_with`] for applications that embed monodon.
//!
//! An application built on the worker crate calls [`main_with`] from its
//! `main`. Started by a supervisor, the same binary runs as a worker;
//! started by hand, it is the monodon CLI (`my-app serve ...`), whose
//! workers are the binary itself.

pub mod apps;
pub mod cli;
pub mod ctl;

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

fn serve(args: &ServeArgs, default_command: Vec<OsString>) -> ExitCode {
    if let Err(e) = args.validate() {
        use clap::CommandFactory;
        Cli::command().error(clap::error::ErrorKind::ArgumentConflict, e).exit();
    }
    let config = args.to_config(default_command);
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
        Command::Serve(args) => {
            let exe = match own_path() {
                Ok(p) => p,
                Err(e) => {
                    error!("cannot find this executable's path: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let default = vec![
                exe,
                "worker".into(),
                "--app".into(),
                args.app.app.as_str().into(),
                "--root".into(),
                args.app.root.clone().into_os_string(),
            ];
            serve(&args, default)
        }
        Command::Status { .. } | Command::Reload { .. } | Command::Stop { .. } | Command::Scale { .. } => {
            control_command(cli.command)
        }
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
        Command::Serve(args) => match own_path() {
            Ok(exe) => serve(&args, vec![exe]),
            Err(e) => {
                error!("cannot find this executable's path: {e}");
                ExitCode::FAILURE
            }
        },
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
