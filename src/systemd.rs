//! systemd's notification protocol (sd_notify) through the `sd-notify` crate:
//! readiness, status, reloading, stopping and watchdog pings. Every call is a
//! no-op when systemd did not start the relay; a failed send is logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;

/// The relay's messages to systemd.
#[derive(Debug)]
pub struct Notifier {
    watchdog: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Self {
        Notifier { watchdog: sd_notify::watchdog_enabled() }
    }

    /// How often to ping the watchdog (half its timeout), when systemd asked for pings.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    pub fn ready(&self, status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        send(&[NotifyState::Watchdog]);
    }

    /// A reload starts; `ready` ends it (as `Type=notify-reload` expects).
    pub fn reloading(&self) {
        match sd_notify::NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(error) => tracing::debug!(%error, "reading CLOCK_MONOTONIC for sd_notify failed"),
        }
    }

    pub fn stopping(&self) {
        send(&[NotifyState::Stopping]);
    }
}

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "sd_notify failed");
    }
}
