//! Starting a worker process: fork+exec of the worker command as it is on
//! disk now, with its channel on fd 3 and its scoreboard on fd 4.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use monodon_proto::env;
use monodon_proto::http::Limits;
use monodon_proto::scoreboard::Scoreboard;
use monodon_proto::wire;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

/// A worker process just started, and the supervisor's ends of its links.
pub struct Spawned {
    pub pid: Pid,
    /// The supervisor's end of the channel (non-blocking).
    pub channel: OwnedFd,
    pub scoreboard: Scoreboard,
}

/// What every worker of one supervisor gets.
pub struct WorkerSpec<'a> {
    pub command: &'a [OsString],
    pub generation: u64,
    pub limits: &'a Limits,
    pub io_timeout: Duration,
    /// Requests after which this worker retires (0: never).
    pub max_requests: u64,
    pub access_log: Option<&'a str>,
    pub access_log_format: &'a str,
    pub read_ahead: Duration,
    pub min_body_rate: u64,
}

pub fn spawn_worker(spec: &WorkerSpec<'_>) -> io::Result<Spawned> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty worker command"))?;
    let (ours, theirs) =
        socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    // Whole messages must fit in the socket buffers: see wire::max_message.
    let room = wire::max_message(spec.limits) * 2;
    for fd in [&ours, &theirs] {
        let _ = socket::setsockopt(fd, sockopt::SndBuf, &room);
        let _ = socket::setsockopt(fd, sockopt::RcvBuf, &room);
    }
    nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
    let scoreboard = Scoreboard::create()?;

    let channel_fd = theirs.as_raw_fd();
    let scoreboard_fd = scoreboard.fd().as_raw_fd();
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        // What systemd and Server::Starter told the supervisor is not for workers.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("SERVER_STARTER_PORT")
        .env(env::CHANNEL_FD, "3")
        .env(env::SCOREBOARD_FD, "4")
        .env(env::GENERATION, spec.generation.to_string())
        .env(env::LIMITS, spec.limits.to_env())
        .env(env::IO_TIMEOUT, spec.io_timeout.as_secs().max(1).to_string())
        .env(env::MAX_REQUESTS, spec.max_requests.to_string())
        .env(env::ACCESS_LOG, spec.access_log.unwrap_or(""))
        .env(env::ACCESS_LOG_FORMAT, spec.access_log_format)
        .env(env::READ_AHEAD_US, spec.read_ahead.as_micros().to_string())
        .env(env::MIN_BODY_RATE, spec.min_body_rate.to_string());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (fcntl, dup2, prctl, getppid, _exit) on
    // descriptors that exist in the child; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Move both descriptors above 4 first, so placing one on 3 or 4
            // cannot clobber the other; dup'd copies have CLOEXEC clear.
            let chan = libc::fcntl(channel_fd, libc::F_DUPFD, 10);
            let board = libc::fcntl(scoreboard_fd, libc::F_DUPFD, 10);
            if chan < 0 || board < 0 || libc::dup2(chan, 3) < 0 || libc::dup2(board, 4) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(chan);
            libc::close(board);
            // No worker outlives its supervisor.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) < 0
                || libc::getppid() != parent
            {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start worker {:?}: {e}", program)))?;
    let pid = Pid::from_raw(child.id() as i32);
    // We reap the child ourselves (waitpid on SIGCHLD); std's handle is not needed.
    drop(child);
    drop(theirs);
    Ok(Spawned { pid, channel: ours, scoreboard })
}
