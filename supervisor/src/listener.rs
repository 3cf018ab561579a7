//! Listening sockets: binding them (TCP over IPv4/IPv6, unix) with the
//! options a front-line server wants, and accepting from them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
    UnixAddr,
};

use crate::config::ListenAddr;

/// A bound, listening, non-blocking socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    /// The address as bound (with the real port if port 0 was asked for).
    pub addr: ListenAddr,
    /// Bound by us (so ours to unlink), not inherited.
    owned: bool,
}

impl Listener {
    pub fn bind(addr: &ListenAddr, backlog: i32) -> io::Result<Listener> {
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        let backlog = Backlog::new(backlog.min(Backlog::MAXCONN.into())).map_err(io::Error::from)?;
        match addr {
            ListenAddr::Tcp(sa) => {
                let family = if sa.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
                let fd = socket::socket(family, SockType::Stream, flags, None)?;
                socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
                if sa.is_ipv6() {
                    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
                }
                socket::setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
                let bound = match sa {
                    std::net::SocketAddr::V4(v4) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(*v4)),
                    std::net::SocketAddr::V6(v6) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(*v6)),
                };
                bound.map_err(|e| {
                    io::Error::new(io::Error::from(e).kind(), format!("cannot bind {addr}: {e}"))
                })?;
                // Wake us only once the client has sent something: connections
                // that never send cost nothing here.
                set_defer_accept(fd.as_fd(), 1)?;
                socket::listen(&fd, backlog)?;
                let local: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
                let real = local.to_string().parse().map(ListenAddr::Tcp).unwrap_or_else(|_| addr.clone());
                Ok(Listener { fd, addr: real, owned: true })
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let fd = socket::socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
                let ua = UnixAddr::new(path.as_path())?;
                socket::bind(fd.as_raw_fd(), &ua).map_err(|e| {
                    io::Error::new(io::Error::from(e).kind(), format!("cannot bind {addr}: {e}"))
                })?;
                socket::listen(&fd, backlog)?;
                Ok(Listener { fd, addr: addr.clone(), owned: true })
            }
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Shuts the socket down for every process that holds it (workers that
    /// accept have copies): it stops listening, and connections waiting in
    /// its backlog are reset, as a close by the only holder would.
    pub fn stop_listening(&self) {
        if let Err(e) = socket::shutdown(self.fd.as_raw_fd(), socket::Shutdown::Read) {
            log::debug!("shutdown of listener {}: {e}", self.addr);
        }
    }

    /// Accepts one connection: `Ok(None)` when none is pending.
    /// The connection is non-blocking and close-on-exec; TCP gets NODELAY.
    pub fn accept(&self) -> io::Result<Option<(OwnedFd, String)>> {
        // TCP_NODELAY is inherited from the listener (Linux copies it on accept).
        monodon_proto::net::accept(self.fd.as_fd())
    }

    /// Adopts a listening socket inherited from systemd (socket activation)
    /// or Server::Starter; `what` names its origin in errors.
    pub fn inherit(raw: RawFd, what: &str) -> io::Result<Listener> {
        let bad =
            |why: String| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} (fd {raw}): {why}"));
        let borrowed = nix::fcntl::fcntl(
            // SAFETY: only borrowed for this call, to check the fd is open.
            unsafe { BorrowedFd::borrow_raw(raw) },
            nix::fcntl::FcntlArg::F_GETFD,
        );
        borrowed.map_err(|e| bad(format!("not an open descriptor: {e}")))?;
        // SAFETY: the fd was handed to this process to own (checked open above).
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if !socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
            return Err(bad("not a listening socket".into()));
        }
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        let local: SockaddrStorage = socket::getsockname(fd.as_raw_fd())?;
        let (addr, is_tcp) = match local.as_unix_addr() {
            Some(u) => (
                ListenAddr::Unix(u.path().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("(unnamed)"))),
                false,
            ),
            None => {
                let sa: std::net::SocketAddr =
                    local.to_string().parse().map_err(|_| bad(format!("unsupported address {local}")))?;
                (ListenAddr::Tcp(sa), true)
            }
        };
        if is_tcp {
            let _ = socket::setsockopt(&fd, sockopt::TcpNoDelay, &true);
        }
        Ok(Listener { fd, addr, owned: false })
    }

    /// Handed down by systemd or Server::Starter rather than bound here.
    pub fn is_inherited(&self) -> bool {
        !self.owned
    }

    /// Removes the socket file of a unix listener we bound (on a final stop).
    pub fn unlink(&self) {
        if !self.owned {
            return;
        }
        if let ListenAddr::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// TCP_DEFER_ACCEPT (nix has no option type for it).
fn set_defer_accept(fd: BorrowedFd<'_>, seconds: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a valid pointer to a c_int of the stated size for the
    // duration of the call, on a descriptor we own.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A socket file left by a server that is gone is removed; one that still
/// answers, or anything that is not a socket, is an error.
fn remove_stale_socket(path: &PathBuf) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// Listeners handed down by systemd (`LISTEN_FDS`, `LISTEN_PID`,
/// `LISTEN_FDNAMES`) or by Server::Starter (`SERVER_STARTER_PORT`), if any.
pub fn inherited() -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for (fd, name) in sd_notify::listen_fds_with_names()? {
        let l = Listener::inherit(fd, &format!("systemd socket {name:?}"))?;
        out.push(l);
    }
    if !out.is_empty() {
        return Ok(out);
    }
    if let Ok(spec) = std::env::var("SERVER_STARTER_PORT") {
        // "127.0.0.1:8080=3;/tmp/app.sock=4"
        for part in spec.split(';').filter(|p| !p.is_empty()) {
            let fd = part.rsplit_once('=').and_then(|(_, fd)| fd.parse::<RawFd>().ok()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("SERVER_STARTER_PORT: bad entry {part:?}"),
                )
            })?;
            out.push(Listener::inherit(fd, &format!("SERVER_STARTER_PORT {part:?}"))?);
        }
    }
    Ok(out)
}

/// A connected socket's own address, as the protocol writes addresses:
/// `ip:port`, `[v6]:port`, or `unix` (also when it cannot be read).
pub fn local_address(fd: BorrowedFd<'_>) -> String {
    match socket::getsockname::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(a) if a.as_unix_addr().is_none() => a.to_string(),
        _ => "unix".to_owned(),
    }
}
