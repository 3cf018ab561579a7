//! The monodon supervisor: everything the parent process does.
//!
//! - [`config`]: what to listen on, what to run, limits and timeouts.
//! - `listener`: binding and accepting.
//! - `core`: the supervisor's decisions as a state machine over plain data
//!   (events in, actions out, time passed in), and its seeded simulation.
//! - `event_loop`: the shell around the core: the one-thread epoll loop
//!   that holds every socket, turns what the kernel says into the core's
//!   events and carries out its actions.
//! - `poll`: the loop's wait (epoll, one system call per wait).
//! - `sched`: the dispatcher's queue and the respawn back-off, used by the core.
//! - `spawn`: posix_spawn of a worker with its channel and scoreboard.
//! - [`control`]: the control protocol and the status document.
//! - `notify`: systemd's notification protocol.
//! - [`privileges`]: `--user` / `--group`.

pub mod config;
pub mod control;
mod core;
mod event_loop;
mod listener;
pub mod metrics;
mod notify;
mod poll;
pub mod privileges;
pub mod sched;
mod spawn;

pub use config::{Config, ListenAddr};
pub use event_loop::Supervisor;

/// Binds, starts the workers and serves until stopped.
pub fn run(config: Config) -> std::io::Result<()> {
    Supervisor::new(config)?.run()
}
