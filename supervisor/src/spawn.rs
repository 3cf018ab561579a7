//! Starting a worker process: posix_spawn of the worker command as it is on
//! disk now, with its channel on fd 3 and its scoreboard on fd 4. Nothing
//! runs between fork and exec but the kernel's and libc's own file actions,
//! so this module needs no `unsafe` pre-exec code.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::time::Duration;

use monodon_proto::env;
use monodon_proto::http::Limits;
use monodon_proto::scoreboard::Scoreboard;
use monodon_proto::wire;
use nix::fcntl::OFlag;
use nix::spawn::{posix_spawnp, PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::Pid;

/// What systemd and Server::Starter told the supervisor is not for workers.
const NOT_FOR_WORKERS: [&str; 7] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "SERVER_STARTER_PORT",
];

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
    let (program, _) = spec
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty worker command"))?;
    let (ours, theirs) =
        socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    // Whole messages must fit in the socket buffers (see wire::max_message):
    // the supervisor has at most two in a worker's channel (one sent ahead).
    let room = wire::max_message(spec.limits) * 3;
    for fd in [&ours, &theirs] {
        let _ = socket::setsockopt(fd, sockopt::SndBuf, &room);
        let _ = socket::setsockopt(fd, sockopt::RcvBuf, &room);
    }
    nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
    let scoreboard = Scoreboard::create()?;

    // Copies above 4, close-on-exec, so that placing them on 3 and 4 in the
    // child cannot clobber one another and the dup2 clears close-on-exec.
    let channel_high = nix::fcntl::fcntl(&theirs, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    let board_high = nix::fcntl::fcntl(scoreboard.fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: F_DUPFD_CLOEXEC just created these descriptors for us alone.
    let (channel_high, board_high) =
        unsafe { (OwnedFd::from_raw_fd(channel_high), OwnedFd::from_raw_fd(board_high)) };
    let mut actions = PosixSpawnFileActions::init()?;
    actions.add_open(0, "/dev/null", OFlag::O_RDONLY, Mode::empty())?;
    actions.add_dup2(channel_high.as_raw_fd(), 3)?;
    actions.add_dup2(board_high.as_raw_fd(), 4)?;
    // Workers start with default signal handling and an empty mask (Rust
    // ignores SIGPIPE in the supervisor; a worker in another language expects
    // the default).
    let mut attr = PosixSpawnAttr::init()?;
    let mut defaults = SigSet::empty();
    defaults.add(Signal::SIGPIPE);
    attr.set_sigdefault(&defaults)?;
    attr.set_sigmask(&SigSet::empty())?;
    attr.set_flags(PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK)?;

    let c = |s: &std::ffi::OsStr| CString::new(s.as_bytes());
    let bad_arg = |_| io::Error::new(io::ErrorKind::InvalidInput, "a worker argument contains a NUL byte");
    let argv: Vec<CString> = spec.command.iter().map(|a| c(a)).collect::<Result<_, _>>().map_err(bad_arg)?;
    let settings = [
        (env::CHANNEL_FD, "3".to_owned()),
        (env::SCOREBOARD_FD, "4".to_owned()),
        (env::SUPERVISOR_PID, std::process::id().to_string()),
        (env::GENERATION, spec.generation.to_string()),
        (env::LIMITS, spec.limits.to_env()),
        (env::IO_TIMEOUT, spec.io_timeout.as_secs().max(1).to_string()),
        (env::MAX_REQUESTS, spec.max_requests.to_string()),
        (env::ACCESS_LOG, spec.access_log.unwrap_or("").to_owned()),
        (env::ACCESS_LOG_FORMAT, spec.access_log_format.to_owned()),
        (env::READ_AHEAD_US, spec.read_ahead.as_micros().to_string()),
        (env::MIN_BODY_RATE, spec.min_body_rate.to_string()),
    ];
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !NOT_FOR_WORKERS.iter().any(|n| k == n) && !settings.iter().any(|(n, _)| k == n))
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    envp.extend(settings.iter().filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok()));

    // posix_spawn (vfork-style): no copy of the supervisor's page tables or
    // descriptor table, whatever it holds. PATH is searched as by a shell.
    let pid = posix_spawnp(&argv[0], &actions, &attr, &argv, &envp).map_err(|e| {
        io::Error::new(io::Error::from(e).kind(), format!("cannot start worker {program:?}: {e}"))
    })?;
    drop((channel_high, board_high, theirs));
    Ok(Spawned { pid, channel: ours, scoreboard })
}
