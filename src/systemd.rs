//! systemd notification protocol (sd_notify): readiness, status and watchdog
//! pings over $NOTIFY_SOCKET. A no-op when not started by systemd.

use std::env;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to systemd's notification socket, if there is one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let socket = env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let address = match path.strip_prefix('@') {
                Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()).ok()?,
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, address))
        });
        let watchdog = env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse().ok()).map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// How often to ping the watchdog (half its timeout), when systemd asked for pings.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, message: &str) {
        if let Some((socket, address)) = &self.socket
            && let Err(error) = socket.send_to_addr(message.as_bytes(), address)
        {
            tracing::debug!(%error, "sd_notify failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_notify_socket() {
        let path = env::temp_dir().join(format!("oxr-notify-{}", std::process::id()));
        let listener = UnixDatagram::bind(&path).expect("bind notify socket");
        let notifier = Notifier {
            socket: Some((UnixDatagram::unbound().expect("socket"), SocketAddr::from_pathname(&path).expect("path"))),
            watchdog: Some(Duration::from_secs(10)),
        };
        notifier.ready("RX 0 bps");
        let mut buffer = [0u8; 256];
        let n = listener.recv(&mut buffer).expect("receive");
        assert_eq!(&buffer[..n], b"READY=1\nSTATUS=RX 0 bps");
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(5)));
        let _ = std::fs::remove_file(path);
    }
}
