//! The shell's invariants, beside the core's: after every event the loop
//! handles (in debug builds, so in every integration test), both are
//! checked, and a violation stops the supervisor with what broke, instead
//! of a connection lost or served twice somewhere later.

use super::Supervisor;
use crate::core::{Channel, Place, Stopping};

impl Supervisor {
    /// Panics (debug builds only) if an invariant does not hold.
    pub(super) fn debug_check_invariants(&self) {
        if cfg!(debug_assertions) {
            if let Err(broken) = self.core.check_invariants().and_then(|()| self.check_shell()) {
                panic!("supervisor invariant broken: {broken}");
            }
        }
    }

    /// What the shell holds agrees with what the core decided.
    fn check_shell(&self) -> Result<(), String> {
        if self.core.stopping() != Stopping::No && self.accepting {
            return Err("accepting while stopping".into());
        }
        for (wkey, w) in self.core.workers() {
            // The core's open channel is one the shell can send on.
            if w.channel == Channel::Open && w.io.channel.is_none() {
                return Err(format!("worker {wkey}'s channel is open for the core, closed for the shell"));
            }
            if w.channel == Channel::Closed && w.io.channel.is_some() {
                return Err(format!("worker {wkey}'s channel is closed for the core, open for the shell"));
            }
        }
        // A warm connection's requests are its worker's to see: the poller
        // must not wake the supervisor for them, and its close must reach
        // the client past the worker's copy.
        for (ckey, c) in self.core.conns() {
            if matches!(c.place, Place::Warm { .. }) && (c.io.watched || !c.io.was_warm) {
                return Err(format!("warm connection {ckey} is watched, or not marked warm"));
            }
        }
        if let Some(r) = &self.reload_code {
            if self.core.reload().map(|c| c.generation) != Some(r.generation) {
                return Err(format!(
                    "the code of generation {} is kept for a reload not in progress",
                    r.generation
                ));
            }
        }
        Ok(())
    }
}
