//! The template's channel (PROTOCOL.md, "Templates"): a generation's
//! template process has initialised its app and forks that generation's
//! workers when the supervisor asks.
//!
//! The supervisor sends `Fork` with two descriptors, the new worker's
//! channel and scoreboard, and the worker's environment; the template forks
//! twice (the middle process exits at once, so the worker is re-parented to
//! the supervisor, a child subreaper) and answers `Forked` with the
//! worker's pid, or `ForkFailed` saying why it would not.

use crate::wire::{Cursor, WireError, VERSION};

const TEMPLATE_READY: u8 = 16;
const FORK: u8 = 17;
const FORKED: u8 = 18;
const FORK_FAILED: u8 = 19;

/// Supervisor → template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToTemplate {
    /// Fork a worker with these environment variables set (its channel and
    /// scoreboard ride along, in that order).
    Fork { env: Vec<(String, String)> },
}

/// Template → supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromTemplate<'a> {
    /// The app is loaded (`preload` has run); ready to fork.
    Ready { pid: u32 },
    /// A worker is running, with this pid, a child of the supervisor.
    Forked { pid: u32 },
    /// No worker was forked, and why (for the log).
    ForkFailed { reason: &'a str },
}

impl ToTemplate {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        let ToTemplate::Fork { env } = self;
        out.extend_from_slice(&[VERSION, FORK]);
        out.extend_from_slice(&(env.len() as u16).to_le_bytes());
        for (name, value) in env {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        }
    }

    pub fn decode(msg: &[u8]) -> Result<ToTemplate, WireError> {
        let mut r = Cursor::new(msg)?;
        if r.kind != FORK {
            return Err(WireError("unknown message kind"));
        }
        let utf8 = |b: &[u8]| {
            std::str::from_utf8(b).map(str::to_owned).map_err(|_| WireError("environment is not UTF-8"))
        };
        let count = r.u16()?;
        let mut env = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let n = r.u16()? as usize;
            let name = utf8(r.bytes(n)?)?;
            let n = r.u32()? as usize;
            let value = utf8(r.bytes(n)?)?;
            env.push((name, value));
        }
        Ok(ToTemplate::Fork { env })
    }
}

impl FromTemplate<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        match self {
            FromTemplate::Ready { pid } => {
                out.extend_from_slice(&[VERSION, TEMPLATE_READY]);
                out.extend_from_slice(&pid.to_le_bytes());
            }
            FromTemplate::Forked { pid } => {
                out.extend_from_slice(&[VERSION, FORKED]);
                out.extend_from_slice(&pid.to_le_bytes());
            }
            FromTemplate::ForkFailed { reason } => {
                out.extend_from_slice(&[VERSION, FORK_FAILED]);
                out.extend_from_slice(reason.as_bytes());
            }
        }
    }

    pub fn decode(msg: &[u8]) -> Result<FromTemplate<'_>, WireError> {
        let mut r = Cursor::new(msg)?;
        match r.kind {
            TEMPLATE_READY => Ok(FromTemplate::Ready { pid: r.u32()? }),
            FORKED => Ok(FromTemplate::Forked { pid: r.u32()? }),
            FORK_FAILED => {
                let reason = std::str::from_utf8(r.rest()).map_err(|_| WireError("reason is not UTF-8"))?;
                Ok(FromTemplate::ForkFailed { reason })
            }
            _ => Err(WireError("unknown message kind")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_messages_round_trip() {
        let mut buf = Vec::new();
        let fork = ToTemplate::Fork {
            env: vec![("MONODON_MAX_REQUESTS".into(), "812".into()), ("A".into(), "".into())],
        };
        fork.encode(&mut buf);
        assert_eq!(ToTemplate::decode(&buf), Ok(fork));
        for msg in [
            FromTemplate::Ready { pid: 7 },
            FromTemplate::Forked { pid: 9 },
            FromTemplate::ForkFailed { reason: "3 threads" },
        ] {
            msg.encode(&mut buf);
            assert_eq!(FromTemplate::decode(&buf), Ok(msg));
        }
    }

    #[test]
    fn a_truncated_fork_is_refused() {
        let mut buf = Vec::new();
        ToTemplate::Fork { env: vec![("NAME".into(), "value".into())] }.encode(&mut buf);
        for cut in 2..buf.len() {
            assert!(ToTemplate::decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }
}
