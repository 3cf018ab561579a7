//! The template role (`MONODON_ROLE=template`): one process per generation
//! loads the app once (`App::preload`), then forks that generation's
//! workers when the supervisor asks, so that every worker of a generation
//! runs the code loaded when it started, whatever changes on disk, and a
//! replacement costs a fork instead of an exec.
//!
//! Each worker is forked with `clone(CLONE_PARENT)`: it is the supervisor's
//! child like any other, reaped, signalled and timed out as before, and it
//! sets its PDEATHSIG against the supervisor as an exec'd worker does.
//! (Templates in other languages fork twice instead; PROTOCOL.md.)

use std::io;
use std::os::fd::{AsFd, IntoRawFd, OwnedFd};

use log::{debug, info};
use monodon_proto::env::{self, WorkerEnv};
use monodon_proto::template::{FromTemplate, ToTemplate};
use monodon_proto::wire::{self, WireError};

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
    // Only the app can start threads, and it has run: checked once.
    let refusal = fork_refusal();
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
        if let Some(reason) = &refusal {
            FromTemplate::ForkFailed { reason }.encode(&mut out);
            wire::send(channel.as_fd(), &out, None)?;
            continue;
        }
        let answer = match fork_worker()? {
            Forked::Worker => {
                // Its channel and scoreboard take the places of the
                // template's (fd 3 and 4), which it must not keep.
                nix::unistd::dup2(&worker_channel, &mut channel)?;
                nix::unistd::dup2(&worker_board, &mut board)?;
                // Now the worker's: `serve_forever` adopts fds 3 and 4 anew.
                let _ = (channel.into_raw_fd(), board.into_raw_fd());
                drop((worker_channel, worker_board));
                std::env::remove_var(env::ROLE);
                // Most are the template's own already (one generation's
                // settings); setting only the others spares the heap.
                for (name, value) in env {
                    if std::env::var_os(&name).is_none_or(|v| v != *value) {
                        std::env::set_var(name, value);
                    }
                }
                // The template's buffers are shared with it: freeing them
                // here would copy their pages (and the heap's) to no end.
                std::mem::forget((buf, out));
                return Ok(Role::Worker);
            }
            Forked::Parent(child) => FromTemplate::Forked { pid: child },
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
}

/// Forks a worker as the supervisor's child (`CLONE_PARENT`), so that it is
/// reaped, signalled and timed out like any other, and can set its
/// PDEATHSIG at once. One process is made, not the two of a double fork.
fn fork_worker() -> io::Result<Forked> {
    let flags = nix::libc::CLONE_PARENT | nix::libc::SIGCHLD;
    // SAFETY: clone without CLONE_VM and without a new stack is fork(2) with
    // another parent: the child runs on its own copy of this memory and
    // stack. The template is single-threaded (checked once the app had
    // loaded; it runs no app code after that), so the copy is whole. Unlike
    // glibc's fork() this runs no atfork handlers, which is sound because no
    // lock can be held (one thread, and no signal handler here takes one),
    // and leaves glibc's cached thread id at the template's: glibc uses it
    // only for pthread_kill/raise on this thread, where tgkill refuses a
    // thread of another process, so nothing can reach the template.
    let ret = unsafe { nix::libc::syscall(nix::libc::SYS_clone, flags, 0, 0, 0, 0) };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Worker),
        pid => Ok(Forked::Parent(pid as u32)),
    }
}

/// Why this template may not fork, if it may not: it has threads (a fork
/// copies only the calling one).
fn fork_refusal() -> Option<String> {
    let threads = thread_count();
    (threads != Some(1)).then(|| {
        format!(
            "the template has {} threads (started by the app while it loaded?); a fork copies only \
             one, so it will not fork: run with --spawn exec, or start threads in init_worker",
            threads.map_or("an unknown number of".to_owned(), |n| n.to_string())
        )
    })
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
        match fork_refusal() {
            Some(why) => assert!(why.contains("threads") && why.contains("--spawn exec"), "{why}"),
            None => panic!("would fork with several threads"),
        }
        drop(tx);
        let _ = helper.join();
    }
}
