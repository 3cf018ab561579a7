//! Starting worker processes: posix_spawn of the worker command as it is on
//! disk now, with its channel on fd 3 and its scoreboard on fd 4 (an exec'd
//! worker, or a generation's template), and asking a template to fork one
//! (`send_fork`). Nothing runs between fork and exec but the
//! kernel's and libc's own file actions, so this module needs no `unsafe`
//! pre-exec code.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use monodon_proto::env::{self, WorkerEnv};
use monodon_proto::http::Limits;
use monodon_proto::scoreboard::Scoreboard;
use monodon_proto::template::ToTemplate;
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

/// What a generation runs: its worker command and directory, resolved
/// through symlinks when the generation starts, so that every worker of it
/// runs the same release whatever a deploy moves meanwhile (Capistrano's
/// `current -> releases/N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub command: Vec<OsString>,
    pub dir: Option<PathBuf>,
    /// The program file as it was when resolved (none for a bare name,
    /// found on PATH at exec).
    pub program: Option<FileIdentity>,
}

/// Which file a path named, and which version of it: a deploy that
/// replaces the file (rename) changes the inode, one that rewrites it in
/// place changes the modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub inode: u64,
    pub mtime_secs: i64,
    pub mtime_nanos: i64,
}

impl FileIdentity {
    pub fn of(path: &Path) -> Option<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileIdentity { inode: m.ino(), mtime_secs: m.mtime(), mtime_nanos: m.mtime_nsec() })
    }
}

impl Code {
    /// Resolves `command` (a program with a `/` in it; a bare name is left
    /// to the PATH lookup at exec) and `chdir` as they are on disk now. A
    /// relative program is taken from the directory.
    pub fn resolve(command: &[OsString], chdir: Option<&Path>) -> io::Result<Code> {
        let dir = match chdir {
            None => None,
            Some(d) => Some(
                d.canonicalize()
                    .map_err(|e| io::Error::new(e.kind(), format!("--chdir {}: {e}", d.display())))?,
            ),
        };
        let mut command = command.to_vec();
        if let Some(program) = command.first_mut() {
            let path = Path::new(program.as_os_str());
            if path.components().count() > 1 {
                let full = match &dir {
                    Some(d) if path.is_relative() => d.join(path),
                    _ => path.to_path_buf(),
                };
                if let Ok(real) = full.canonicalize() {
                    *program = real.into_os_string();
                }
            }
        }
        let program =
            command.first().map(Path::new).filter(|p| p.components().count() > 1).and_then(FileIdentity::of);
        Ok(Code { command, dir, program })
    }
}

/// A worker to start: its generation's code, and what its environment tells it.
pub struct WorkerSpec<'a> {
    pub code: &'a Code,
    pub env: WorkerEnv,
    /// The listeners a worker that accepts takes connections from: placed
    /// on fds 5, 6, ... (`env.listeners` of them).
    pub listeners: Vec<BorrowedFd<'a>>,
}

/// Kernel bookkeeping per message beyond its payload (the sk_buff and the
/// rounding of its data), generously.
const MESSAGE_OVERHEAD: usize = 4096;

/// A channel cannot carry the largest message these limits allow.
#[derive(Debug)]
pub enum ChannelError {
    Io(io::Error),
    TooSmall { needed: usize, granted: usize },
}

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelError::Io(e) => write!(f, "cannot make a worker channel: {e}"),
            ChannelError::TooSmall { needed, granted } => write!(
                f,
                "a worker channel must carry messages of {needed} bytes (2 x --max-head + --buffer-body + 64 KiB), \
                 but the kernel grants its sockets {granted} bytes of buffer (net.core.wmem_max = {}): \
                 lower --buffer-body or --max-head, or raise net.core.wmem_max and net.core.rmem_max",
                std::fs::read_to_string("/proc/sys/net/core/wmem_max").unwrap_or_default().trim()
            ),
        }
    }
}

/// A new channel (a SEQPACKET socketpair, close-on-exec) whose both ends
/// can send the largest message `limits` allow, checked by reading the
/// buffer sizes back: Linux caps what an unprivileged process asks for at
/// net.core.wmem_max, and a message larger than the sender's SO_SNDBUF
/// fails with EMSGSIZE. One message that fits is enough for two in flight
/// (an Assign and one sent ahead), since a send waits for room only once
/// the buffer is already full. A second sent ahead may find it full when
/// the heads are large: it then stays queued (`SendError::Full`).
pub fn channel(limits: &Limits) -> Result<(OwnedFd, OwnedFd), ChannelError> {
    let (ours, theirs) =
        socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| ChannelError::Io(e.into()))?;
    let needed = wire::max_message(limits) + MESSAGE_OVERHEAD;
    let room = wire::max_message(limits) * 3;
    for fd in [&ours, &theirs] {
        let _ = socket::setsockopt(fd, sockopt::SndBuf, &room);
        let _ = socket::setsockopt(fd, sockopt::RcvBuf, &room);
        let granted = socket::getsockopt(fd, sockopt::SndBuf).map_err(|e| ChannelError::Io(e.into()))?;
        if granted < needed {
            return Err(ChannelError::TooSmall { needed, granted });
        }
    }
    Ok((ours, theirs))
}

/// A chdir in the child before the exec (glibc's
/// posix_spawn_file_actions_addchdir_np; nix has no wrapper for it).
fn add_chdir(actions: &mut PosixSpawnFileActions, dir: &Path) -> io::Result<()> {
    let dir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "--chdir contains a NUL byte"))?;
    let raw = (actions as *mut PosixSpawnFileActions).cast::<libc::posix_spawn_file_actions_t>();
    // SAFETY: PosixSpawnFileActions is #[repr(transparent)] over an
    // initialised posix_spawn_file_actions_t, which we borrow mutably for
    // this call; glibc copies the path.
    let rc = unsafe { libc::posix_spawn_file_actions_addchdir_np(raw, dir.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Starts a worker from the command on disk.
pub fn spawn_worker(spec: &WorkerSpec<'_>, scoreboard: Scoreboard) -> io::Result<Spawned> {
    spawn_process(spec, scoreboard, &[])
}

/// Starts a generation's template from the command on disk: a worker
/// process in the template role (`MONODON_ROLE=template`), which loads the
/// app and forks workers when asked.
pub fn spawn_template(spec: &WorkerSpec<'_>) -> io::Result<Spawned> {
    spawn_process(spec, Scoreboard::create()?, &[(env::ROLE, "template")])
}

/// Scoreboard pages of reaped workers, zeroed, for the next workers: a
/// recycle then costs no memfd, mapping or first-touch page fault.
#[derive(Default)]
pub struct SpareBoards(Vec<Scoreboard>);

impl SpareBoards {
    /// More than a burst of recycling needs; the rest are unmapped.
    const KEEP: usize = 16;

    pub fn take(&mut self) -> io::Result<Scoreboard> {
        self.0.pop().map_or_else(Scoreboard::create, Ok)
    }

    /// Keeps the page of a worker that has been reaped: no process maps it
    /// any more (what a worker forks does not inherit it: MADV_DONTFORK).
    pub fn give(&mut self, board: Scoreboard) {
        if self.0.len() < Self::KEEP {
            board.reset();
            self.0.push(board);
        }
    }
}

/// Asks a ready template to fork a worker with `env`: the worker's channel
/// and scoreboard are made here, as for an exec'd one, and sent along. The
/// answer (Forked, with the worker's pid, or ForkFailed) comes later on the
/// template's channel, in the order of the requests.
pub fn send_fork(
    template: BorrowedFd<'_>,
    worker_env: &WorkerEnv,
    scoreboard: Scoreboard,
) -> io::Result<(OwnedFd, Scoreboard)> {
    let (ours, theirs) = channel(&worker_env.limits).map_err(|e| io::Error::other(e.to_string()))?;
    nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
    let vars = worker_env.to_vars().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let mut msg = Vec::with_capacity(512);
    ToTemplate::Fork { env: vars }.encode(&mut msg);
    wire::send_fds(template, &msg, &[theirs.as_fd(), scoreboard.fd().as_fd()])?;
    Ok((ours, scoreboard))
}

fn spawn_process(
    spec: &WorkerSpec<'_>,
    scoreboard: Scoreboard,
    extra_env: &[(&str, &str)],
) -> io::Result<Spawned> {
    let (program, _) = spec
        .code
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty worker command"))?;
    let (ours, theirs) = channel(&spec.env.limits).map_err(|e| io::Error::other(e.to_string()))?;
    nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;

    // Copies above 4, close-on-exec, so that placing them on 3 and 4 in the
    // child cannot clobber one another and the dup2 clears close-on-exec.
    let channel_high = nix::fcntl::fcntl(&theirs, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    let board_high = nix::fcntl::fcntl(scoreboard.fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: F_DUPFD_CLOEXEC just created these descriptors for us alone.
    let (channel_high, board_high) =
        unsafe { (OwnedFd::from_raw_fd(channel_high), OwnedFd::from_raw_fd(board_high)) };
    // The listeners likewise, above every fd they are placed on.
    let above = 10.max(env::FIRST_LISTENER + spec.listeners.len() as i32);
    let listeners_high = spec
        .listeners
        .iter()
        .map(|l| {
            let raw = nix::fcntl::fcntl(l, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(above))?;
            // SAFETY: F_DUPFD_CLOEXEC just created this descriptor for us alone.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        })
        .collect::<io::Result<Vec<OwnedFd>>>()?;
    let mut actions = PosixSpawnFileActions::init()?;
    actions.add_open(0, "/dev/null", OFlag::O_RDONLY, Mode::empty())?;
    actions.add_dup2(channel_high.as_raw_fd(), 3)?;
    actions.add_dup2(board_high.as_raw_fd(), 4)?;
    for (i, l) in listeners_high.iter().enumerate() {
        actions.add_dup2(l.as_raw_fd(), env::FIRST_LISTENER + i as i32)?;
    }
    if let Some(dir) = &spec.code.dir {
        add_chdir(&mut actions, dir)?;
    }
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
    let argv: Vec<CString> =
        spec.code.command.iter().map(|a| c(a)).collect::<Result<_, _>>().map_err(bad_arg)?;
    let settings = spec.env.to_vars();
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !NOT_FOR_WORKERS.iter().any(|n| k == n) && !settings.iter().any(|(n, _)| k == n))
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    envp.retain(|kv| !extra_env.iter().any(|(k, _)| kv.as_bytes().starts_with(format!("{k}=").as_bytes())));
    envp.extend(settings.iter().filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok()));
    envp.extend(extra_env.iter().filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok()));

    // posix_spawn (vfork-style): no copy of the supervisor's page tables or
    // descriptor table, whatever it holds. PATH is searched as by a shell.
    let pid = posix_spawnp(&argv[0], &actions, &attr, &argv, &envp).map_err(|e| {
        io::Error::new(io::Error::from(e).kind(), format!("cannot start worker {program:?}: {e}"))
    })?;
    drop((channel_high, board_high, theirs, listeners_high));
    Ok(Spawned { pid, channel: ours, scoreboard })
}
