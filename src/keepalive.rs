//! Keepalives toward the relays this relay tunnels to: sent from the control
//! thread over ordinary UDP sockets, so they work whatever backend either side runs.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use oxidize_relay_core::oxtunnel::{self, TunnelKey};
use oxidize_relay_core::route::RouteTable;

use crate::metrics;

const INTERVAL: Duration = Duration::from_secs(1);
/// A peer that has not answered for this long is reported lost.
const LOST_AFTER: Duration = Duration::from_secs(3);

#[derive(Debug)]
struct Peer {
    upstream: SocketAddr,
    key: TunnelKey,
    socket: UdpSocket,
    last_sent: Option<Instant>,
    last_answer: Instant,
    up: bool,
}

/// A non-blocking UDP socket of the kernel's, connected to `upstream`: how the control thread
/// talks to upstreams (keepalives, health probes) whichever backend relays.
pub(crate) fn connected_socket(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(any)?;
    socket.connect(upstream)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Keepalive state of every tunnel upstream.
#[derive(Debug)]
pub struct Keepalives {
    peers: Vec<Peer>,
    started: Instant,
}

impl Keepalives {
    /// One peer per upstream of every route with `upstream_encap = "oxtunnel"`.
    pub fn new(routes: &RouteTable) -> std::io::Result<Self> {
        let mut peers = Vec::new();
        let now = Instant::now();
        for (_, route) in routes.live_routes() {
            let Some(key) = &route.upstream_key else { continue };
            for &id in &route.upstreams {
                let upstream = routes.upstream(id);
                let socket = connected_socket(upstream)?;
                peers.push(Peer { upstream, key: key.clone(), socket, last_sent: None, last_answer: now, up: true });
            }
        }
        Ok(Keepalives { peers, started: now })
    }

    /// Sends what is due, reads answers, and logs peers lost or back.
    pub fn tick(&mut self) {
        let now = Instant::now();
        for peer in &mut self.peers {
            let mut buffer = [0u8; 256];
            while let Ok(n) = peer.socket.recv(&mut buffer) {
                let mut empty = [0u8; 0];
                if oxtunnel::open(&peer.key, &buffer[..n], &mut empty).is_ok_and(|o| o.keepalive) {
                    peer.last_answer = now;
                    metrics::tunnel_keepalive("answered", peer.upstream);
                }
            }
            if peer.last_sent.is_none_or(|sent| now.duration_since(sent) >= INTERVAL) {
                let mut packet = [0u8; oxtunnel::OVERHEAD];
                if let Ok(sealed) = oxtunnel::seal(&peer.key, 0, true, &[], &mut packet) {
                    // ECONNREFUSED from a previous send (peer down) is expected; the state says so.
                    let _ = peer.socket.send(&packet[..sealed.len]);
                    metrics::tunnel_keepalive("sent", peer.upstream);
                }
                peer.last_sent = Some(now);
            }
            let silent = now.duration_since(peer.last_answer);
            let up = silent < LOST_AFTER || now.duration_since(self.started) < LOST_AFTER;
            if up != peer.up {
                if up {
                    tracing::info!(upstream = %peer.upstream, "tunnel next hop answers keepalives again");
                } else {
                    tracing::warn!(upstream = %peer.upstream, silent_secs = silent.as_secs(), "tunnel next hop lost: no keepalive answer");
                }
                peer.up = up;
            }
            metrics::tunnel_peer_up(peer.upstream, up);
        }
    }
}
