//! Accepting a connection and naming its peer, the same way in the
//! supervisor and in a worker that accepts: `1.2.3.4:5678`, `[::1]:5678`,
//! or `unix`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::libc;
use nix::sys::socket::{self, AddressFamily, SockaddrLike, SockaddrStorage};

/// Accepts one connection from `listener`, non-blocking and close-on-exec,
/// with its peer: `Ok(None)` when none is pending. (accept4 with the
/// address saves a getpeername per connection; nix's accept4 does not
/// return it.)
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<Option<(OwnedFd, String)>> {
    let mut storage = std::mem::MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: storage and len describe a writable sockaddr_storage that
    // outlives the call, as accept4 requires.
    let raw = unsafe { libc::accept4(listener.as_raw_fd(), storage.as_mut_ptr().cast(), &mut len, flags) };
    if raw < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
    }
    // SAFETY: accept4 just returned this descriptor; we are its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: accept4 wrote a valid address of `len` bytes into storage.
    let addr = unsafe { SockaddrStorage::from_raw(storage.as_ptr().cast(), Some(len)) };
    Ok(Some((fd, name(addr))))
}

/// The peer of a connection accepted elsewhere (one a worker hands over).
pub fn peer_of(fd: BorrowedFd<'_>) -> String {
    name(socket::getpeername::<SockaddrStorage>(fd.as_raw_fd()).ok())
}

fn name(addr: Option<SockaddrStorage>) -> String {
    match addr {
        Some(a) if a.family() == Some(AddressFamily::Unix) => "unix".to_owned(),
        Some(a) => a.to_string(),
        None => "unknown".to_owned(),
    }
}
