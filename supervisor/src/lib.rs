//! The monodon supervisor: everything the parent process does.
//!
//! - [`config`]: what to listen on, what to run, limits and timeouts.
//! - `listener`: binding and accepting.
//! - `event_loop`: the one-thread `polling` loop that holds every client
//!   connection and drives the workers.
//! - `sched`: the pure scheduling state machines the loop drives.
//! - `spawn`: posix_spawn of a worker with its channel and scoreboard.
//! - [`control`]: the control protocol and the status document.
//! - `notify`: systemd's notification protocol.
//! - [`privileges`]: `--user` / `--group`.

pub mod config;
pub mod control;
mod event_loop;
mod listener;
mod notify;
pub mod privileges;
pub mod sched;
mod spawn;

pub use config::{Config, ListenAddr};
pub use event_loop::Supervisor;

/// Binds, starts the workers and serves until stopped.
pub fn run(config: Config) -> std::io::Result<()> {
    Supervisor::new(config)?.run()
}
