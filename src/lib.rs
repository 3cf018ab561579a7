//! The `monodon` binary as a library: the CLI, the built-in apps, and
//! [`main_with`] for applications that embed monodon.
//!
//! An application built on the worker crate calls [`main_with`] from its
//! `main`. Started by a supervisor, the same binary runs as a worker;
//! started by hand, it is the monodon CLI (`my-app serve ...`), whose
//! workers are the binary itself.

pub mod apps;
pub mod cli;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use log::error;
pub use monodon_worker::{App, Body, Request, Response, WorkerInfo};

use apps::BuiltIn;
use cli::{Cli, Command, ServeArgs};

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
    }
}
