//! Blocking I/O on a client connection whose descriptor is non-blocking.
//!
//! The supervisor's copy and the worker's copy of a connection share one
//! open file description, and with it the `O_NONBLOCK` flag. The supervisor
//! needs it set, so the worker keeps it and waits with poll(2) instead: that
//! also gives every read and write a timeout.
//!
//! HTTP on a connection ([`crate::serve`]) needs only [`Connection`], so the
//! unit tests run it over bytes in memory.

use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use monodon_proto::scoreboard::Slot;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, MsgFlags};

/// What HTTP on one connection needs of it: blocking reads and writes
/// (each with its own timeout), a short wait for more input, a read that
/// does not wait, and a way to send a file.
pub trait Connection: Read + Write {
    /// Waits up to `window` for the client to send something; false if it
    /// did not (or the wait failed).
    fn readable_within(&self, window: Duration) -> bool;

    /// Reads what the client has sent without waiting: `Ok(0)` at EOF or
    /// when nothing is there.
    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Copies `len` bytes of `file` from `offset`.
    fn send_file(&mut self, file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 64 * 1024];
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let want = usize::try_from(end - at).unwrap_or(usize::MAX).min(buf.len());
            let n = file.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while sending"));
            }
            self.write_all(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

/// A client socket with blocking semantics and a per-operation timeout.
/// Every byte written is counted on the worker's scoreboard.
pub struct Stream<'s> {
    fd: OwnedFd,
    timeout: Duration,
    slot: &'s Slot,
    /// Listeners this worker accepts from: a connection waiting on one
    /// ends a read-ahead, as one waiting in the supervisor does.
    rivals: &'s [RawFd],
}

impl<'s> Stream<'s> {
    pub fn new(fd: OwnedFd, timeout: Duration, slot: &'s Slot) -> Self {
        Stream { fd, timeout, slot, rivals: &[] }
    }

    /// Its descriptor back, for a connection the worker keeps warm.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The same, for a worker that accepts from `listeners`.
    pub fn with_rivals(self, listeners: &'s [RawFd]) -> Self {
        Stream { rivals: listeners, ..self }
    }

    fn wait(&self, flags: PollFlags) -> io::Result<()> {
        let ms = u16::try_from(self.timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), flags)];
        loop {
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::TimedOut, "client I/O timed out")),
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl std::os::fd::AsFd for Stream<'_> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Connection for Stream<'_> {
    fn readable_within(&self, window: Duration) -> bool {
        let ts = nix::sys::time::TimeSpec::from_duration(window);
        if self.rivals.is_empty() {
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            return matches!(nix::poll::ppoll(&mut fds, Some(ts), None), Ok(n) if n > 0);
        }
        let mut fds = vec![PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        // SAFETY: the listeners stay open for the worker's life (the
        // accepter never closes them), so each number names its listener.
        fds.extend(
            self.rivals.iter().map(|&l| PollFd::new(unsafe { BorrowedFd::borrow_raw(l) }, PollFlags::POLLIN)),
        );
        if !matches!(nix::poll::ppoll(&mut fds, Some(ts), None), Ok(n) if n > 0) {
            return false;
        }
        let ready = |f: &PollFd| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        // A new client waits: this one goes back rather than keep the worker.
        ready(&fds[0]) && !fds[1..].iter().any(ready)
    }

    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match nix::unistd::read(self.fd.as_fd(), buf) {
            Ok(n) => Ok(n),
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// With sendfile(2): the bytes never pass through the worker.
    fn send_file(&mut self, file: &std::fs::File, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        while offset < end {
            let mut off = offset as i64;
            let chunk = usize::try_from(end - offset).unwrap_or(usize::MAX).min(1 << 30);
            match nix::sys::sendfile::sendfile(self.fd.as_fd(), file, Some(&mut off), chunk) {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while sending"))
                }
                Ok(n) => {
                    offset += n as u64;
                    self.slot.add_written(n);
                }
                Err(Errno::EAGAIN) => self.wait(PollFlags::POLLOUT)?,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl Read for Stream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(self.fd.as_fd(), buf) {
                Ok(n) => return Ok(n),
                Err(Errno::EAGAIN) => self.wait(PollFlags::POLLIN)?,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Write for Stream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match send(std::os::fd::AsRawFd::as_raw_fd(&self.fd), buf, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => {
                    self.slot.add_written(n);
                    return Ok(n);
                }
                Err(Errno::EAGAIN) => self.wait(PollFlags::POLLOUT)?,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection's input side: the bytes the supervisor passed along, then
/// whatever is read from the connection.
pub struct Input<C> {
    pub stream: C,
    buf: Vec<u8>,
    pos: usize,
}

const READ_CHUNK: usize = 16 * 1024;

impl<C: Connection> Input<C> {
    pub fn new(stream: C, initial: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(initial.len().max(READ_CHUNK));
        buf.extend_from_slice(initial);
        Input { stream, buf, pos: 0 }
    }

    /// The same, starting from `buf` (the bytes already read, and their
    /// allocation, reused).
    pub fn with_buffer(stream: C, buf: Vec<u8>) -> Self {
        Input { stream, buf, pos: 0 }
    }

    /// The connection, once its bytes are all consumed.
    pub fn into_stream(self) -> C {
        self.stream
    }

    /// The connection, and the buffer to reuse.
    pub fn into_parts(self) -> (C, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// Bytes read from the client and not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }
}

impl<C: Connection> Read for Input<C> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() && out.len() >= READ_CHUNK {
            return self.stream.read(out);
        }
        let n = self.fill_buf()?.read(out)?;
        self.consume(n);
        Ok(n)
    }
}

impl<C: Connection> Input<C> {
    /// Appends what the client has sent, without waiting: `Ok(0)` at EOF or
    /// when nothing is there.
    pub fn read_available(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let n = match self.stream.read_now(&mut self.buf[start..]) {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(start);
                return Err(e);
            }
        };
        self.buf.truncate(start + n);
        Ok(n)
    }
}

impl<C: Connection> BufRead for Input<C> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            self.buf.resize(READ_CHUNK, 0);
            let n = self.stream.read(&mut self.buf);
            self.buf.truncate(*n.as_ref().unwrap_or(&0));
            n?;
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.buf.len());
    }
}
