//! Telling systemd what the supervisor is doing (`Type=notify`): READY,
//! RELOADING (with MONOTONIC_USEC), STOPPING, a current STATUS= line, and
//! watchdog pings from the loop itself, so a wedged loop is noticed.
//! Everything is a no-op without `NOTIFY_SOCKET`.

use std::time::{Duration, Instant};

use log::debug;
use sd_notify::NotifyState;

/// How often STATUS= is refreshed (when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(1);

pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
    next_ping: Instant,
    next_status: Instant,
    last_status: String,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` (they are then removed from
    /// the environment the workers get, see `spawn`).
    pub fn from_env() -> Notifier {
        let now = Instant::now();
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            next_ping: now,
            next_status: now,
            last_status: String::new(),
        }
    }

    /// Whether a service manager listens at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(states) {
                debug!("sd_notify: {e}");
            }
        }
    }

    pub fn ready(&mut self, status: String) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.last_status = status;
    }

    pub fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status("reloading")]),
            Err(_) => self.send(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
        }
    }

    pub fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// The earliest time `tick` has something to do.
    pub fn next_wake(&self) -> Option<Instant> {
        self.watchdog.map(|_| self.next_ping)
    }

    /// Whether `tick` would refresh STATUS= now.
    pub fn status_due(&self, now: Instant) -> bool {
        self.enabled && now >= self.next_status
    }

    /// Called from the loop: pings the watchdog (at half its interval) and
    /// refreshes STATUS= with `status` (given when `status_due`) if it changed.
    pub fn tick(&mut self, now: Instant, status: Option<String>) {
        if !self.enabled {
            return;
        }
        if let Some(interval) = self.watchdog {
            if now >= self.next_ping {
                self.send(&[NotifyState::Watchdog]);
                self.next_ping = now + interval / 2;
            }
        }
        if let Some(line) = status.filter(|_| now >= self.next_status) {
            self.next_status = now + STATUS_EVERY;
            if line != self.last_status {
                self.send(&[NotifyState::Status(&line)]);
                self.last_status = line;
            }
        }
    }
}
