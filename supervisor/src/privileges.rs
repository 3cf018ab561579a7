//! `--user` / `--group`: the supervisor binds its sockets with the
//! privileges it was started with, then becomes the given user for good;
//! its workers inherit that.

use std::io;
use std::path::Path;

use log::info;
use nix::unistd::{Gid, Group, Uid, User};

/// A user (and group) to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: Uid,
    pub gid: Gid,
    pub name: String,
}

impl RunAs {
    /// Resolves `--user NAME|UID` and `--group NAME|GID` (default: the user's
    /// primary group). Errors name the flag and value.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<RunAs, String> {
        let found = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(user),
        }
        .map_err(|e| format!("--user {user}: {e}"))?;
        let (uid, primary, name) = match (found, user.parse::<u32>()) {
            (Some(u), _) => (u.uid, Some(u.gid), u.name),
            (None, Ok(uid)) => (Uid::from_raw(uid), None, user.to_owned()),
            (None, Err(_)) => return Err(format!("--user {user}: no such user")),
        };
        let gid = match group {
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => Gid::from_raw(gid),
                Err(_) => {
                    Group::from_name(g)
                        .map_err(|e| format!("--group {g}: {e}"))?
                        .ok_or_else(|| format!("--group {g}: no such group"))?
                        .gid
                }
            },
            None => primary.ok_or_else(|| format!("--user {user} has no passwd entry: give --group too"))?,
        };
        Ok(RunAs { uid, gid, name })
    }

    /// Hands `paths` (the control socket, the access log) to the user, then
    /// drops to it.
    pub fn drop_to(&self, paths: &[&Path]) -> io::Result<()> {
        if Uid::effective() == self.uid {
            return Ok(());
        }
        for path in paths {
            nix::unistd::chown(*path, Some(self.uid), Some(self.gid)).map_err(|e| {
                io::Error::new(io::Error::from(e).kind(), format!("chown {}: {e}", path.display()))
            })?;
        }
        nix::unistd::setgroups(&[self.gid])?;
        nix::unistd::setgid(self.gid)?;
        nix::unistd::setuid(self.uid)?;
        info!("running as user {} (uid {}, gid {})", self.name, self.uid, self.gid);
        Ok(())
    }
}
