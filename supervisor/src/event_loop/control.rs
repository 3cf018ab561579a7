//! The control socket inside the loop: accept (owner or root only), read one
//! JSON request line, act, answer, close. A reload request is answered when
//! the new generation serves or the reload fails.

use std::io;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::poll::{Event, PollMode};
use log::{debug, warn};
use nix::sys::socket::{getsockopt, sockopt};

use super::{Supervisor, Wire, CONTROL_BASE};
use crate::control::{Command, Request, Response, PROTOCOL};
use crate::core::Stopping;

/// The largest request line accepted on the control socket.
const MAX_REQUEST: usize = 64 * 1024;

pub(super) enum ControlState {
    Reading,
    /// A reload request waits for the outcome of this generation.
    AwaitingReload(u64),
    Writing,
}

pub(super) struct ControlConn {
    stream: UnixStream,
    buf: Vec<u8>,
    written: usize,
    state: ControlState,
    /// A peer of another user: its request is read (so closing does not
    /// reset the connection before it sees why), then refused.
    refused: bool,
}

/// The control socket and the identity of its file, so that a supervisor
/// only ever removes its own (a successor may have taken the path over).
pub(super) struct ControlSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    inode: (u64, u64),
}

impl ControlSocket {
    /// Removes the socket file if it is still ours.
    pub fn remove(&self) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the control socket, owner-only, replacing a stale one. A live one
/// is an error, unless `take_over`: a successor started by Server::Starter
/// or systemd on inherited listeners replaces its predecessor's.
pub(super) fn bind_control(path: &Path, take_over: bool) -> io::Result<ControlSocket> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("control socket {} exists and is not a socket", path.display()),
            ));
        }
        if UnixStream::connect(path).is_ok() && !take_over {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("control socket {} is in use: is another monodon running?", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Created owner-only from the start (no window with wider permissions).
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|e| {
        io::Error::new(e.kind(), format!("cannot bind control socket {}: {e}", path.display()))
    })?;
    listener.set_nonblocking(true)?;
    let meta = std::fs::symlink_metadata(path)?;
    use std::os::unix::fs::MetadataExt;
    Ok(ControlSocket { listener, path: path.to_path_buf(), inode: (meta.dev(), meta.ino()) })
}

impl Supervisor {
    pub(super) fn on_control_listener_readable(&mut self) {
        let Some(control) = self.control.as_ref() else { return };
        let listener = &control.listener;
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!("control accept: {e}");
                    return;
                }
            };
            let me = nix::unistd::geteuid().as_raw();
            let uid = getsockopt(&stream, sockopt::PeerCredentials).map(|c| c.uid()).ok();
            let refused = uid != Some(me) && uid != Some(0);
            if refused {
                warn!("control socket: refused a client with uid {uid:?}");
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let entry = self.control_conns.vacant_entry();
            let key = entry.key();
            // SAFETY: deleted from the poller in `close_control` before the stream drops.
            let added = unsafe {
                self.poller.add_with_mode(
                    stream.as_raw_fd(),
                    Event::readable(CONTROL_BASE + key),
                    PollMode::Oneshot,
                )
            };
            if added.is_ok() {
                entry.insert(ControlConn {
                    stream,
                    buf: Vec::new(),
                    written: 0,
                    state: ControlState::Reading,
                    refused,
                });
            }
        }
    }

    pub(super) fn on_control_event(&mut self, key: usize) {
        let Some(conn) = self.control_conns.get_mut(key) else { return };
        match conn.state {
            ControlState::Reading => {}
            ControlState::Writing => return self.write_control(key),
            ControlState::AwaitingReload(_) => return,
        }
        let mut chunk = [0u8; 4096];
        match (&conn.stream).read(&mut chunk) {
            Ok(0) => return self.close_control(key),
            Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return self.close_control(key),
        }
        let Some(end) = conn.buf.iter().position(|&b| b == b'\n') else {
            if conn.buf.len() > MAX_REQUEST {
                return self.answer_control(key, Response::error("request too large"));
            }
            let _ = self.poller.modify_with_mode(
                &conn.stream,
                Event::readable(CONTROL_BASE + key),
                PollMode::Oneshot,
            );
            return;
        };
        if conn.refused {
            return self.answer_control(key, Response::error("permission denied: not the supervisor's user"));
        }
        let line = conn.buf[..end].to_vec();
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => return self.answer_control(key, Response::error(format!("bad request: {e}"))),
        };
        if request.protocol != PROTOCOL {
            return self.answer_control(
                key,
                Response::error(format!(
                    "protocol version mismatch: this supervisor speaks {PROTOCOL}, the client {}",
                    request.protocol
                )),
            );
        }
        self.run_control_command(key, request.command);
    }

    fn run_control_command(&mut self, key: usize, command: Command) {
        match command {
            Command::Status => {
                let status = self.status();
                self.answer_control(key, Response::status(status));
            }
            Command::Reload => {
                if self.core.stopping() != Stopping::No {
                    return self.answer_control(key, Response::error("the supervisor is stopping"));
                }
                match self.begin_reload() {
                    Ok(generation) => {
                        self.control_conns[key].state = ControlState::AwaitingReload(generation)
                    }
                    Err(e) => self.answer_control(key, Response::error(e)),
                }
            }
            Command::Stop { fast } => {
                self.answer_control(
                    key,
                    Response::ok(if fast { "stopping now" } else { "stopping gracefully" }),
                );
                if fast {
                    self.begin_fast_stop();
                } else {
                    self.begin_graceful_stop();
                }
            }
            Command::Scale { workers, delta } => {
                let target = match (workers, delta) {
                    (Some(n), None) => n as i64,
                    (None, Some(d)) => self.core.target_workers() as i64 + d,
                    _ => return self.answer_control(key, Response::error("scale needs workers or delta")),
                };
                if !(1..=4096).contains(&target) {
                    return self.answer_control(
                        key,
                        Response::error(format!("cannot scale to {target} workers (1 to 4096)")),
                    );
                }
                if self.core.stopping() != Stopping::No {
                    return self.answer_control(key, Response::error("the supervisor is stopping"));
                }
                self.core.set_target_workers(
                    target as usize,
                    &mut Wire { msg: &mut self.msg },
                    Instant::now(),
                );
                self.answer_control(key, Response::ok(format!("scaled to {target} workers")));
            }
        }
    }

    /// Answers the reload requests waiting for `generation`.
    pub(super) fn answer_reload_waiters(&mut self, generation: u64, outcome: Result<String, String>) {
        let waiting: Vec<usize> = self
            .control_conns
            .iter()
            .filter(|(_, c)| matches!(c.state, ControlState::AwaitingReload(g) if g == generation))
            .map(|(k, _)| k)
            .collect();
        for key in waiting {
            let response = match &outcome {
                Ok(m) => Response::ok(m.clone()),
                Err(e) => Response::error(e.clone()),
            };
            self.answer_control(key, response);
        }
    }

    fn answer_control(&mut self, key: usize, response: Response) {
        let Some(conn) = self.control_conns.get_mut(key) else { return };
        let mut out = serde_json::to_vec(&response).unwrap_or_default();
        out.push(b'\n');
        conn.buf = out;
        conn.written = 0;
        conn.state = ControlState::Writing;
        self.write_control(key);
    }

    fn write_control(&mut self, key: usize) {
        let Some(conn) = self.control_conns.get_mut(key) else { return };
        while conn.written < conn.buf.len() {
            match (&conn.stream).write(&conn.buf[conn.written..]) {
                Ok(0) => return self.close_control(key),
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = self.poller.modify_with_mode(
                        &conn.stream,
                        Event::writable(CONTROL_BASE + key),
                        PollMode::Oneshot,
                    );
                    return;
                }
                Err(_) => return self.close_control(key),
            }
        }
        self.close_control(key);
    }

    fn close_control(&mut self, key: usize) {
        if let Some(conn) = self.control_conns.try_remove(key) {
            let _ = self.poller.delete(&conn.stream);
        }
    }
}
