//! The template role (`MONODON_ROLE=template`): one process per generation
//! loads the app once (`App::preload`), then forks that generation's
//! workers when the supervisor asks, so that every worker of a generation
//! runs the code loaded when it started, whatever changes on disk, and a
//! replacement costs a fork instead of an exec.
//!
//! Each worker is forked twice: the middle process exits at once, so the
//! worker is re-parented to the supervisor (a child subreaper) and is its
//! child like any other: it is reaped, signalled and timed out as before,
//! and its PDEATHSIG is set once its parent is the supervisor.

use std::io;
use std::os::fd::{AsFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{debug, info};
use monodon_proto::env::{self, WorkerEnv};
use monodon_proto::template::{FromTemplate, ToTemplate};
use monodon_proto::wire::{self, WireError};
use nix::unistd::ForkResult;

use crate::App;

/// What the process does once the template loop returns.
pub(crate) enum Role {
    /// A forked worker: serve as one.
    Worker,
    /// The template's generation is over (its channel closed).
    Done,
}

/// Loads the app, says Ready, and forks workers until the supervisor closes
/// the channel. Returns in each forked worker too (as `Role::Worker`).
pub(crate) fn serve_as_template(app: &mut dyn App) -> io::Result<Role> {
    let settings = WorkerEnv::from_process().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    crate::die_with_supervisor(settings.supervisor_pid)?;
    let mut channel = crate::inherited_fd(env::CHANNEL_FD)?;
    // The scoreboard it was started with is not used, but stays open: the
    // descriptors a Fork brings then land above 4, and placing them on 3
    // and 4 in the worker cannot clobber one another.
    let mut board = crate::inherited_fd(env::SCOREBOARD_FD)?;
    let pid = std::process::id();
    app.preload();
    let mut out = Vec::with_capacity(256);
    FromTemplate::Ready { pid }.encode(&mut out);
    wire::send(channel.as_fd(), &out, None)?;
    info!("template {pid} (generation {}) ready", settings.generation);

    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Some((n, fds)) = wire::recv_fds(channel.as_fd(), &mut buf, 2)? else {
            debug!("template {pid}: channel closed, exiting");
            return Ok(Role::Done);
        };
        let ToTemplate::Fork { env } = ToTemplate::decode(&buf[..n])?;
        let Ok([worker_channel, worker_board]) = <[OwnedFd; 2]>::try_from(fds) else {
            return Err(WireError("Fork without a channel and a scoreboard").into());
        };
        let answer = match fork_worker(settings.supervisor_pid)? {
            Forked::Worker => {
                // Its channel and scoreboard take the places of the
                // template's (fd 3 and 4), which it must not keep.
                nix::unistd::dup2(&worker_channel, &mut channel)?;
                nix::unistd::dup2(&worker_board, &mut board)?;
                // Now the worker's: `serve_forever` adopts fds 3 and 4 anew.
                let _ = (channel.into_raw_fd(), board.into_raw_fd());
                drop((worker_channel, worker_board));
                std::env::remove_var(env::ROLE);
                for (name, value) in env {
                    std::env::set_var(name, value);
                }
                return Ok(Role::Worker);
            }
            Forked::Parent(child) => FromTemplate::Forked { pid: child },
            Forked::Refused(reason) => {
                let msg = FromTemplate::ForkFailed { reason: &reason };
                msg.encode(&mut out);
                wire::send(channel.as_fd(), &out, None)?;
                continue;
            }
        };
        drop((worker_channel, worker_board));
        answer.encode(&mut out);
        wire::send(channel.as_fd(), &out, None)?;
    }
}

enum Forked {
    /// In the new worker.
    Worker,
    /// In the template: the worker's pid.
    Parent(u32),
    /// Nothing was forked, and why.
    Refused(String),
}

/// Forks a worker, re-parented to the supervisor (`supervisor` is its pid).
fn fork_worker(supervisor: u32) -> io::Result<Forked> {
    let threads = thread_count();
    if threads != Some(1) {
        return Ok(Forked::Refused(format!(
            "the template has {} threads (started by the app while it loaded?); a fork copies only \
             one, so it will not fork: run with --spawn exec, or start threads in init_worker",
            threads.map_or("an unknown number of".to_owned(), |n| n.to_string())
        )));
    }
    // The middle process writes the worker's pid here before it exits.
    let (pid_read, pid_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the template is single-threaded (checked above), so the child
    // is a whole copy of it and may run any code.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Child => {
            drop(pid_read);
            // SAFETY: as above: still a single thread.
            match unsafe { nix::unistd::fork() } {
                Ok(ForkResult::Child) => {
                    drop(pid_write);
                    wait_for_adoption(supervisor)?;
                    Ok(Forked::Worker)
                }
                Ok(ForkResult::Parent { child }) => {
                    let _ = nix::unistd::write(&pid_write, &(child.as_raw() as u32).to_le_bytes());
                    // SAFETY: _exit ends the middle process without running
                    // the template's destructors or flushing its buffers,
                    // which belong to the template.
                    unsafe { nix::libc::_exit(0) }
                }
                // SAFETY: as above.
                Err(_) => unsafe { nix::libc::_exit(1) },
            }
        }
        ForkResult::Parent { child: middle } => {
            drop(pid_write);
            let mut pid = [0u8; 4];
            let got = read_exact(&pid_read, &mut pid);
            let _ = nix::sys::wait::waitpid(middle, None);
            Ok(match got {
                Ok(()) => Forked::Parent(u32::from_le_bytes(pid)),
                Err(e) => Forked::Refused(format!("fork failed: {e}")),
            })
        }
    }
}

fn read_exact(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Waits until the middle process has exited and the worker's parent is
/// the supervisor (its PDEATHSIG must be set against the supervisor).
fn wait_for_adoption(supervisor: u32) -> io::Result<()> {
    // The middle process exits right after the fork, so this is short:
    // yield rather than sleep (a sleep costs a timer's slack, ~50 µs, each).
    let deadline = Instant::now() + Duration::from_secs(5);
    while nix::unistd::getppid().as_raw() as u32 != supervisor {
        if Instant::now() > deadline {
            return Err(io::Error::other("not adopted by the supervisor (is it a child subreaper?)"));
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// This process's thread count, from /proc.
fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_with_threads_refuses_to_fork() {
        // The test harness runs threads of its own; one more to be sure.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let helper = std::thread::spawn(move || rx.recv());
        match fork_worker(std::process::id()) {
            Ok(Forked::Refused(why)) => {
                assert!(why.contains("threads") && why.contains("--spawn exec"), "{why}")
            }
            Ok(Forked::Parent(_)) | Ok(Forked::Worker) => panic!("forked with several threads"),
            Err(e) => panic!("{e}"),
        }
        drop(tx);
        let _ = helper.join();
    }
}
