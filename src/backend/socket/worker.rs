//! The socket backend: the same relay core over ordinary UDP sockets, for
//! hosts where AF_XDP cannot run. One mio event loop per worker; listen
//! sockets shared between workers with SO_REUSEPORT (the kernel keeps a
//! client on one worker); one connected socket per NAT session toward its
//! upstream; datagrams moved in batches with recvmmsg/sendmmsg.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use mio::net::UdpSocket as MioUdpSocket;
use mio::{Events, Interest, Poll, Token};
use oxidize_relay_core::config::WaitMode;
use oxidize_relay_core::counters::Counters;
use oxidize_relay_core::icmp;
use oxidize_relay_core::relay::{Datagram, Destination, Upstreamward};
use oxidize_relay_core::route::UpstreamId;
use oxidize_relay_core::session::Session;
use oxidize_relay_core::wire::field::{self, ETH_HEADER_LEN};
use oxidize_relay_core::{DropReason, IfaceId, Relay, Verdict};
use socket2::{Domain, Protocol, Socket, Type};

use crate::backend::worker_core::{EXPIRY_BUDGET, IDLE_POLL, WorkerCore};
use crate::sys::udp::{self, Queued, RawSender, RecvBatch, SendBatch};

/// Batches read from one socket before the others get their turn (fairness between
/// a flooded listen socket and the session sockets carrying replies).
const DRAIN_BATCHES: usize = 4;
/// Tokens below this are listen sockets; session sockets use `SESSION_TOKEN_BASE + nat_port`.
const SESSION_TOKEN_BASE: usize = 1 << 20;
/// How often a worker closes the NAT sockets it opened for other workers' sessions that ended.
const FOREIGN_SWEEP_MS: u64 = 1000;
/// Queued ICMP errors taken from one session socket per wakeup (the core rate-limits what is sent on).
const ICMP_ERRORS_PER_DRAIN: usize = 64;
/// Ethernet + IP + UDP header bytes, so byte counters compare with the AF_XDP backend's frame bytes.
const IPV4_FRAME_OVERHEAD: u64 = 14 + 20 + 8;
const IPV6_FRAME_OVERHEAD: u64 = 14 + 40 + 8;

#[derive(Debug, thiserror::Error)]
#[error("binding the {what} socket on {address} failed")]
pub struct SocketSetupError {
    what: &'static str,
    address: SocketAddr,
    #[source]
    source: io::Error,
}

struct Listener {
    address: SocketAddr,
    socket: MioUdpSocket,
    replies: SendBatch,
}

struct SessionSocket {
    socket: MioUdpSocket,
    listener: usize,
    upstream: UpstreamId,
    outgoing: SendBatch,
}

/// One socket-backend worker.
pub struct SocketWorker {
    pub(crate) core: WorkerCore,
    poll: Poll,
    listeners: Vec<Listener>,
    sessions: HashMap<u16, SessionSocket>,
    /// Sends the ICMP errors upstreams return about relayed datagrams on to their clients;
    /// `None` without CAP_NET_RAW at setup (the errors then end at the NAT socket).
    icmp_out: Option<RawSender>,
}

impl std::fmt::Debug for SocketWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketWorker").field("id", &self.core.id).field("sessions", &self.sessions.len()).finish()
    }
}

impl SocketWorker {
    /// Binds this worker's share (SO_REUSEPORT) of every listen address.
    pub fn new(core: WorkerCore) -> Result<Self, SocketSetupError> {
        let poll = Poll::new().map_err(|source| SocketSetupError {
            what: "mio poll",
            address: ([0, 0, 0, 0], 0).into(),
            source,
        })?;
        let mut listeners = Vec::new();
        let listen_addresses: Vec<SocketAddr> = core.relay.routes().routes().iter().map(|r| r.listen).collect();
        for (index, address) in listen_addresses.into_iter().enumerate() {
            let mut socket = udp_socket(address, None, true).map_err(|source| SocketSetupError {
                what: "listen",
                address,
                source,
            })?;
            poll.registry()
                .register(&mut socket, Token(index), Interest::READABLE)
                .map_err(|source| SocketSetupError { what: "listen", address, source })?;
            listeners.push(Listener { address, socket, replies: SendBatch::new(core.batch_size) });
        }
        let icmp_out = match RawSender::open() {
            Ok(sender) => Some(sender),
            Err(error) => {
                tracing::warn!(worker = core.id, %error, "no raw socket (CAP_NET_RAW): ICMP errors from upstreams are not relayed to clients");
                None
            }
        };
        Ok(SocketWorker { core, poll, listeners, sessions: HashMap::new(), icmp_out })
    }

    pub fn run(mut self) -> Relay {
        let mut events = Events::with_capacity(1024);
        let mut batch = RecvBatch::new(self.core.batch_size);
        let idle_timeout = match self.core.wait {
            WaitMode::Event => Some(IDLE_POLL),
            WaitMode::BusyPoll => Some(Duration::ZERO),
        };
        // Sockets that still had datagrams when their drain budget ran out. Readiness is
        // edge-triggered, so they are revisited without waiting for another edge.
        let mut backlog: Vec<Token> = Vec::with_capacity(64);
        let mut tokens: Vec<Token> = Vec::with_capacity(1024);
        let mut errored: Vec<u16> = Vec::with_capacity(64);
        let mut foreign_sweep_at = 0;
        while self.core.running() {
            let timeout = if backlog.is_empty() { idle_timeout } else { Some(Duration::ZERO) };
            self.core.apply_updates();
            if let Err(error) = self.poll.poll(&mut events, timeout) {
                if error.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(worker = self.core.id, %error, "poll failed");
                }
                continue;
            }
            self.core.counters.wakeups.add(1);
            tokens.clear();
            tokens.append(&mut backlog);
            errored.clear();
            for event in events.iter() {
                if !tokens.contains(&event.token()) {
                    tokens.push(event.token());
                }
                // Something on a session socket's error queue: an ICMP error, or a datagram
                // refused as larger than the path (which fails no receive).
                if event.is_error() && event.token().0 >= SESSION_TOKEN_BASE {
                    errored.push((event.token().0 - SESSION_TOKEN_BASE) as u16);
                }
            }
            for &port in &errored {
                self.relay_icmp_errors(port);
            }
            for &token in &tokens {
                let source = if token.0 < SESSION_TOKEN_BASE {
                    Source::Listener(token.0)
                } else {
                    Source::Session((token.0 - SESSION_TOKEN_BASE) as u16)
                };
                let more = self.drain(source, &mut batch);
                if more {
                    backlog.push(token);
                }
            }
            self.flush();
            let now = self.core.now();
            let mut expired = Vec::new();
            self.core.relay.expire(now, EXPIRY_BUDGET, |s: &Session| expired.push(s.nat_port));
            for port in expired {
                self.close_session_socket(port);
            }
            if now >= foreign_sweep_at {
                self.close_foreign_sockets();
                foreign_sweep_at = now + FOREIGN_SWEEP_MS;
            }
            // No XDP program here, so no flow registry to keep.
            self.core.relay.take_admitted().for_each(drop);
            self.core.report_unresolved();
        }
        // Its sessions go to the control thread, which hands them to the next relay process.
        self.core.relay
    }

    /// Reads batches from one socket, at most [`DRAIN_BATCHES`] of them, and relays each.
    /// Returns whether datagrams may remain after that budget.
    fn drain(&mut self, source: Source, batch: &mut RecvBatch) -> bool {
        for _ in 0..DRAIN_BATCHES {
            let fd = match source {
                Source::Listener(index) => self.listeners[index].socket.as_raw_fd(),
                Source::Session(port) => match self.sessions.get(&port) {
                    Some(session) => session.socket.as_raw_fd(),
                    None => return false,
                },
            };
            let received = match receive_whole(&self.core.counters, batch, fd) {
                Ok(0) => return false,
                Ok(n) => n,
                // An ICMP error about a datagram the session sent fails one receive: read on. The
                // error itself is on the socket's error queue, relayed when poll reports it (EPOLLERR).
                Err(_) if matches!(source, Source::Session(_)) => continue,
                Err(error) => {
                    tracing::debug!(worker = self.core.id, %error, "recvmmsg failed");
                    return false;
                }
            };
            match source {
                Source::Listener(index) => self.relay_clients(index, batch),
                Source::Session(port) => self.relay_replies(port, batch),
            }
            if received < self.core.batch_size {
                return false;
            }
        }
        true
    }

    /// The ICMP errors queued on a session socket (the upstream's port is closed, a router
    /// found no route or a smaller MTU): each is rebuilt as it arrived and translated by the
    /// core, which finds its session and client and applies the ICMP rate, then sent on raw.
    fn relay_icmp_errors(&mut self, nat_port: u16) {
        let Some(session) = self.sessions.get(&nat_port) else { return };
        let fd = session.socket.as_raw_fd();
        let (Ok(nat), Ok(upstream)) = (session.socket.local_addr(), session.socket.peer_addr()) else { return };
        let mut payload = [0u8; udp::SLOT_SIZE];
        for _ in 0..ICMP_ERRORS_PER_DRAIN {
            let (error, payload_len) = match udp::take_queued_error(fd, &mut payload) {
                Ok(Queued::Icmp { error, payload_len }) => (error, payload_len),
                // Refused here as larger than the path: answered as a router on the path would.
                Ok(Queued::TooBig { mtu, payload_len }) => {
                    let (kind, code) = if nat.is_ipv6() { (2, 0) } else { (3, 4) };
                    (icmp::QueuedError { kind, code, info: mtu, from: nat.ip() }, payload_len)
                }
                Ok(Queued::Other) => continue,
                Ok(Queued::Empty) => return,
                Err(error) => {
                    tracing::debug!(worker = self.core.id, %error, "reading a NAT socket's error queue failed");
                    return;
                }
            };
            // The socket backend's one interface, with the placeholder MAC its relay core was given.
            let Some(mut frame) = icmp::rebuild_frame(&error, [0; 6], nat, upstream, &payload[..payload_len]) else {
                continue;
            };
            let now = self.core.now();
            let len = frame.len();
            let (verdict, len) = self.core.relay.relay_frame(now, IfaceId(0), &mut frame, len);
            if verdict != Verdict::Forward(IfaceId(0)) {
                continue;
            }
            let packet = &frame[ETH_HEADER_LEN..len];
            let client = match nat {
                SocketAddr::V4(_) => IpAddr::from(<[u8; 4]>::try_from(&packet[field::IPV4_DST]).unwrap_or_default()),
                SocketAddr::V6(_) => IpAddr::from(<[u8; 16]>::try_from(&packet[field::IPV6_DST]).unwrap_or_default()),
            };
            if let Some(Err(error)) = self.icmp_out.as_ref().map(|out| out.send(packet, client)) {
                tracing::debug!(worker = self.core.id, %error, %client, "sending a translated ICMP error failed");
            }
        }
    }

    /// Client datagrams: find or create the session, queue the payload on its socket.
    fn relay_clients(&mut self, index: usize, batch: &mut RecvBatch) {
        let listen = self.listeners[index].address;
        let now = self.core.now();
        for (source, slot, len) in batch.datagrams_mut() {
            let Some(client) = source else { continue };
            let wire_bytes = self.count_rx(client, len);
            let datagram = Datagram { from: client, to: listen, ingress: IfaceId(0), from_mac: [0; 6], wire_bytes };
            let Ok((destination, len)) = self.core.relay.relay_payload(now, &datagram, slot, len) else { continue };
            let payload = &slot[..len];
            match destination {
                Destination::Upstream(session) => {
                    let counters = self.core.counters.clone();
                    let Some(socket) = self.session_socket(&session, index) else { continue };
                    if socket.outgoing.is_full() {
                        send_queued(&counters, &mut socket.outgoing, &socket.socket);
                    }
                    socket.outgoing.push(None, payload);
                }
                Destination::Sender => self.queue_reply(index, client, payload),
                // A listen address is never a NAT address: no reply arrives here.
                Destination::Client(_) => {}
            }
        }
    }

    /// Upstream replies on a session socket: queue them to the client on the listen socket.
    fn relay_replies(&mut self, nat_port: u16, batch: &mut RecvBatch) {
        let Some(session) = self.sessions.get(&nat_port) else { return };
        let Ok(local) = session.socket.local_addr() else { return };
        let listener = session.listener;
        let now = self.core.now();
        for (source, slot, len) in batch.datagrams_mut() {
            let Some(from) = source else { continue };
            let wire_bytes = self.count_rx(from, len);
            let datagram = Datagram { from, to: local, ingress: IfaceId(0), from_mac: [0; 6], wire_bytes };
            // A NAT port's socket receives only replies (the port tells the relay the direction).
            let Ok((Destination::Client(back), len)) = self.core.relay.relay_payload(now, &datagram, slot, len) else {
                continue;
            };
            self.queue_reply(listener, back.client, &slot[..len]);
        }
    }

    /// Closes the NAT sockets this worker opened for other workers' sessions that have ended
    /// (their owner closes its own at expiry; this worker would never hear of it).
    fn close_foreign_sockets(&mut self) {
        let relay = &self.core.relay;
        let ended: Vec<u16> = self
            .sessions
            .iter()
            .filter(|(port, socket)| !relay.owns_port(**port) && !relay.nat_port_serves(**port, socket.upstream))
            .map(|(port, _)| *port)
            .collect();
        for port in ended {
            self.close_session_socket(port);
        }
    }

    /// Closes this worker's socket on `port`, if it has one.
    fn close_session_socket(&mut self, port: u16) {
        if let Some(mut session) = self.sessions.remove(&port) {
            let _ = self.poll.registry().deregister(&mut session.socket);
        }
    }

    /// Queues a datagram to a client on a listen socket, sending the batch first when it is full.
    fn queue_reply(&mut self, listener: usize, client: SocketAddr, payload: &[u8]) {
        let Listener { socket, replies, .. } = &mut self.listeners[listener];
        if replies.is_full() {
            send_queued(&self.core.counters, replies, socket);
        }
        replies.push(Some(client), payload);
    }

    fn session_socket(&mut self, session: &Upstreamward, listener: usize) -> Option<&mut SessionSocket> {
        // A session moved off a failed upstream keeps its port but needs a socket connected to the new one.
        if self.sessions.get(&session.nat_port).is_some_and(|s| s.upstream != session.upstream) {
            self.close_session_socket(session.nat_port);
        }
        if !self.sessions.contains_key(&session.nat_port) {
            let local = SocketAddr::new(session.nat_ip, session.nat_port);
            let upstream = self.core.relay.routes().upstream(session.upstream);
            // SO_REUSEPORT: a session's client may reach several workers (a flow the kernel put on
            // another worker's listen socket, a session taken over from a previous process), and each
            // needs the NAT port to send from; replies reach one of them and any worker relays them.
            let mut socket = match udp_socket(local, Some(upstream), true) {
                Ok(socket) => socket,
                Err(error) => {
                    tracing::warn!(worker = self.core.id, %local, %error, "cannot bind the NAT port for a new session");
                    self.core.counters.count_drop(DropReason::NatPortsExhausted);
                    return None;
                }
            };
            if let Err(error) = udp::report_path_errors(socket.as_raw_fd(), local.is_ipv6()) {
                tracing::debug!(worker = self.core.id, %local, %error, "IP_RECVERR/PMTUDISC_DO refused: path errors of this session are not relayed");
            }
            let token = Token(SESSION_TOKEN_BASE + usize::from(session.nat_port));
            if self.poll.registry().register(&mut socket, token, Interest::READABLE).is_err() {
                return None;
            }
            self.sessions.insert(
                session.nat_port,
                SessionSocket {
                    socket,
                    listener,
                    upstream: session.upstream,
                    outgoing: SendBatch::new(self.core.batch_size),
                },
            );
        }
        self.sessions.get_mut(&session.nat_port)
    }

    fn flush(&mut self) {
        for session in self.sessions.values_mut() {
            send_queued(&self.core.counters, &mut session.outgoing, &session.socket);
        }
        for listener in &mut self.listeners {
            send_queued(&self.core.counters, &mut listener.replies, &listener.socket);
        }
    }

    /// Counts a received datagram; returns its size as a frame on the wire.
    fn count_rx(&self, peer: SocketAddr, payload: usize) -> u64 {
        let overhead = if peer.is_ipv4() { IPV4_FRAME_OVERHEAD } else { IPV6_FRAME_OVERHEAD };
        let bytes = payload as u64 + overhead;
        self.core.counters.rx_packets.add(1);
        self.core.counters.rx_bytes.add(bytes);
        bytes
    }
}

/// Sends a socket's queued datagrams in one sendmmsg and counts the outcome.
/// A socket a worker reads: a listen socket (by index) or a session's socket (by NAT port).
#[derive(Debug, Clone, Copy)]
enum Source {
    Listener(usize),
    Session(u16),
}

/// Receives a batch; datagrams too large for a slot are counted and never relayed cut short.
fn receive_whole(counters: &Counters, batch: &mut RecvBatch, fd: RawFd) -> io::Result<usize> {
    let received = batch.receive(fd)?;
    let truncated = batch.truncated();
    if truncated > 0 {
        counters.drops[DropReason::DatagramTooLarge as usize].add(truncated as u64);
    }
    Ok(received)
}

fn send_queued(counters: &Counters, batch: &mut SendBatch, socket: &MioUdpSocket) {
    if batch.is_empty() {
        return;
    }
    let overhead = match socket.local_addr() {
        Ok(local) if local.is_ipv6() => IPV6_FRAME_OVERHEAD,
        _ => IPV4_FRAME_OVERHEAD,
    };
    let flushed = batch.flush(socket.as_raw_fd());
    counters.tx_packets.add(flushed.sent as u64);
    counters.tx_bytes.add(flushed.bytes as u64 + flushed.sent as u64 * overhead);
    for _ in 0..flushed.dropped {
        counters.count_drop(DropReason::TxRingFull);
    }
    // Each is also on the socket's error queue, from where its sender gets a too-big error.
    for _ in 0..flushed.oversize {
        counters.count_drop(DropReason::MtuExceeded);
    }
}

/// A non-blocking UDP socket bound to `local`, connected to `peer` when given.
fn udp_socket(local: SocketAddr, peer: Option<SocketAddr>, reuse_port: bool) -> io::Result<MioUdpSocket> {
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    if local.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_port(reuse_port)?;
    socket.set_recv_buffer_size(4 << 20)?;
    socket.set_send_buffer_size(4 << 20)?;
    socket.bind(&local.into())?;
    if let Some(peer) = peer {
        socket.connect(&peer.into())?;
    }
    socket.set_nonblocking(true)?;
    Ok(MioUdpSocket::from_std(UdpSocket::from(socket)))
}
