//! The supervisor's wait for readiness: epoll, one system call per wait.
//!
//! The shell used `polling` 3.11, whose `wait` re-arms a timerfd and its own
//! notifier on every call (timerfd_settime, two epoll_ctl, an eventfd read:
//! four system calls besides epoll_wait). The supervisor needs neither: its
//! deadlines are milliseconds apart (it rounds up, so it never wakes early),
//! and signals reach it through signal-hook's self-pipe, a source like any
//! other. This is the part of `polling`'s interface the shell uses, over
//! nix's `Epoll`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

/// Interest in a source, named by `key`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub key: usize,
    pub readable: bool,
    pub writable: bool,
}

impl Event {
    pub fn readable(key: usize) -> Event {
        Event { key, readable: true, writable: false }
    }

    pub fn writable(key: usize) -> Event {
        Event { key, readable: false, writable: true }
    }

    /// Registered, but nothing wanted for now.
    pub fn none(key: usize) -> Event {
        Event { key, readable: false, writable: false }
    }

    fn flags(self, mode: PollMode) -> EpollFlags {
        let mut flags = EpollFlags::empty();
        if self.readable {
            flags |= EpollFlags::EPOLLIN | EpollFlags::EPOLLPRI;
        }
        if self.writable {
            flags |= EpollFlags::EPOLLOUT;
        }
        match mode {
            PollMode::Oneshot => flags | EpollFlags::EPOLLONESHOT,
            PollMode::Level => flags,
            PollMode::Edge => flags | EpollFlags::EPOLLET,
        }
    }
}

/// How a source reports: once until modified again, while ready, or on
/// each change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    Oneshot,
    Level,
    Edge,
}

/// What a wait found.
pub struct Events {
    list: Vec<EpollEvent>,
    len: usize,
}

impl Events {
    /// Room for this many events per wait; more are reported by the next.
    const CAPACITY: usize = 1024;

    pub fn new() -> Events {
        Events { list: vec![EpollEvent::empty(); Self::CAPACITY], len: 0 }
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The keys of the sources that are ready (errors and hang-ups count).
    pub fn keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.list[..self.len].iter().map(|e| e.data() as usize)
    }
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

pub struct Poller {
    epoll: Epoll,
}

impl Poller {
    pub fn new() -> io::Result<Poller> {
        Ok(Poller { epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)? })
    }

    /// Watches `fd`.
    ///
    /// # Safety
    /// `fd` must be deleted from the poller before it is closed: epoll
    /// watches the open file, and a closed fd still registered leaves an
    /// entry nothing can remove.
    pub unsafe fn add_with_mode(&self, fd: impl AsRawFd, ev: Event, mode: PollMode) -> io::Result<()> {
        // SAFETY: only borrowed for this call; the caller keeps it open.
        let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        Ok(self.epoll.add(fd, EpollEvent::new(ev.flags(mode), ev.key as u64))?)
    }

    pub fn modify_with_mode(&self, fd: impl AsFd, ev: Event, mode: PollMode) -> io::Result<()> {
        let mut event = EpollEvent::new(ev.flags(mode), ev.key as u64);
        Ok(self.epoll.modify(fd, &mut event)?)
    }

    pub fn delete(&self, fd: impl AsFd) -> io::Result<()> {
        Ok(self.epoll.delete(fd)?)
    }

    /// Waits until a source is ready or `timeout` has passed (rounded up to
    /// the millisecond); `None`: no timeout.
    pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<usize> {
        let timeout = match timeout {
            None => EpollTimeout::NONE,
            Some(t) => {
                let ms = t.as_nanos().div_ceil(1_000_000);
                EpollTimeout::try_from(ms.min(i32::MAX as u128)).unwrap_or(EpollTimeout::MAX)
            }
        };
        events.len = match self.epoll.wait(&mut events.list, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        Ok(events.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn readiness_is_reported_by_key_in_each_mode() {
        let poller = Poller::new().unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut events = Events::new();
        // SAFETY: b is deleted below, before it is dropped.
        unsafe { poller.add_with_mode(b.as_raw_fd(), Event::readable(7), PollMode::Level).unwrap() };
        assert_eq!(poller.wait(&mut events, Some(Duration::ZERO)).unwrap(), 0, "nothing yet");
        a.write_all(b"x").unwrap();
        poller.wait(&mut events, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(events.keys().collect::<Vec<_>>(), [7]);
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.keys().count(), 1, "level: still ready");
        poller.modify_with_mode(&b, Event::readable(8), PollMode::Edge).unwrap();
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.keys().collect::<Vec<_>>(), [8], "edge: reported once after the change");
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.keys().count(), 0, "edge: not again without new input");
        poller.modify_with_mode(&b, Event::none(8), PollMode::Level).unwrap();
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.keys().count(), 0, "no interest: nothing");
        poller.modify_with_mode(&b, Event::readable(9), PollMode::Oneshot).unwrap();
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.keys().collect::<Vec<_>>(), [9]);
        poller.wait(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.keys().count(), 0, "oneshot: once until modified");
        poller.delete(&b).unwrap();
    }
}
