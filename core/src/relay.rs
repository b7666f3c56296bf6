//! The hot path: one frame in, one decision out. No syscalls, no clock reads,
//! no allocation after construction.
//!
//! [`Relay::relay_frame`] serves the AF_XDP backend (whole Ethernet frames);
//! [`Relay::relay_payload`] serves the socket backend (the kernel parsed the
//! headers) and is the second half of `relay_frame`, so both run the same steps.

use core::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::admission::Admission;
use crate::counters::Counters;
use crate::directory::{Binding, NatDirectory};
use crate::drop_reason::DropReason;
use crate::health::UpstreamActivity;
use crate::icmp;
use crate::oxtunnel::{self, TunnelKey};
use crate::proxy_protocol::{self, ProxyHeader};
use crate::ratelimit::{Limit, TokenPair};
use crate::route::{self, RouteTable, UpstreamId};
use crate::seed::Seeds;
use crate::session::{AdmitError, FlowKey, IfaceId, Session, SessionTable, Slot, Timeouts};
use crate::time::Millis;
use crate::tunnel_steps::{Opened, TunnelSteps};
use crate::wire::{Layout, MacAddr, Rewrite, UdpFrame};

/// Admissions remembered between two drains by the worker (more than a burst's worth).
const ADMITTED_BACKLOG: usize = 1024;
/// ICMP errors one worker sends at most (as Linux's default `icmp_ratelimit` paces them).
const ICMP_LIMIT: Limit = Limit { packets_per_second: Some(1000), bytes_per_second: None };

/// One received datagram's facts; its payload is passed beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    pub from: SocketAddr,
    /// A listen address (from a client) or a NAT address (from an upstream).
    pub to: SocketAddr,
    pub ingress: IfaceId,
    pub from_mac: MacAddr,
    /// Its size on the wire, for byte rate limits.
    pub wire_bytes: u64,
}

/// Where a client datagram goes: the session's upstream, from its NAT address.
/// Small on purpose: it is returned for every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstreamward {
    pub upstream: UpstreamId,
    pub nat_ip: IpAddr,
    pub nat_port: u16,
}

/// Where an upstream datagram goes: back to the client, from the address it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clientward {
    pub client: SocketAddr,
    pub listen: SocketAddr,
    pub iface: IfaceId,
    pub mac: MacAddr,
}

/// Where a relayed payload goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A client's datagram, to its session's upstream.
    Upstream(Upstreamward),
    /// An upstream's reply, to the session's client.
    Client(Clientward),
    /// A tunnel keepalive: the sealed answer goes back to the relay that sent it, from the address it asked.
    Sender,
}

/// What to do with a frame after [`Relay::relay_frame`] rewrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the (rewritten) frame out of this interface.
    Forward(IfaceId),
    /// Return the frame to the pool and count the reason.
    Drop(DropReason),
}

/// How to reach an upstream: resolved by the control thread from the kernel's
/// routing and neighbour tables (or a static override).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub iface: IfaceId,
    /// Source address the relay uses toward the upstream.
    pub src_ip: IpAddr,
    pub dst_mac: MacAddr,
}

/// Why an upstream has no next hop: each is its own drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoHop {
    /// The kernel has no route to it (or only through an interface the relay does not serve).
    NoRoute,
    /// Routed, but the neighbour's MAC is not known yet (resolution was requested).
    NeighborUnresolved,
}

impl NoHop {
    pub fn drop_reason(self) -> DropReason {
        match self {
            NoHop::NoRoute => DropReason::NoRoute,
            NoHop::NeighborUnresolved => DropReason::NeighborUnresolved,
        }
    }
}

/// The settings a reload changes besides the routes (this worker's share of them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReloadedLimits {
    pub global_limit: Limit,
    pub max_sessions_per_source: usize,
    pub verify_checksums: bool,
}

/// A session as one relay process hands it to the next (a restart or an upgrade):
/// addresses rather than ids, since the successor's config may number them otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedOver {
    pub client: SocketAddr,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub nat: SocketAddr,
    pub client_iface: IfaceId,
    pub client_mac: MacAddr,
    pub peer_flow: u32,
    /// How long neither side had sent when it was handed over.
    pub idle: Millis,
    pub established: bool,
}

/// Why a handed-over session was not taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeOverRefused {
    RouteGone,
    UpstreamGone,
    InterfaceGone,
    /// It would have expired by now.
    Expired,
    /// Its NAT port is not this worker's or is taken.
    PortTaken,
}

/// Per-worker relay settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// MAC address of each of the worker's interfaces, indexed by [`IfaceId`].
    pub iface_macs: Vec<MacAddr>,
    /// IP MTU of each of the worker's interfaces, indexed by [`IfaceId`].
    pub iface_mtus: Vec<u16>,
    /// Every worker's sessions, readable by all; this worker publishes its own there.
    pub directory: Arc<NatDirectory>,
    /// This worker's share of the directory's NAT ports, inclusive.
    pub nat_ports: (u16, u16),
    /// From the OS: keys this worker's hashes and its NAT port choice.
    pub seed: u64,
    pub max_sessions: usize,
    pub timeouts: Timeouts,
    pub verify_checksums: bool,
    /// This worker's share of the relay-wide client-traffic limit.
    pub global_limit: Limit,
    /// Sessions one client address may hold at once.
    pub max_sessions_per_source: usize,
    /// Slots of the fixed-size per-source rate table.
    pub source_table_entries: usize,
    /// Every worker's record of when each upstream was sent to and answered (passive health).
    pub activity: Arc<UpstreamActivity>,
}

impl RelaySettings {
    /// Settings with no rate limits and no per-source session cap.
    /// A single worker owning all of `nat_ports`; `seed` as from the OS.
    pub fn unlimited(
        iface_macs: Vec<MacAddr>,
        nat_ports: (u16, u16),
        max_sessions: usize,
        idle_timeout: Millis,
        seed: u64,
    ) -> Self {
        RelaySettings {
            iface_mtus: vec![1500; iface_macs.len()],
            iface_macs,
            directory: Arc::new(NatDirectory::new(nat_ports, seed)),
            nat_ports,
            seed,
            max_sessions,
            timeouts: Timeouts { idle: idle_timeout, unreplied: idle_timeout },
            verify_checksums: false,
            global_limit: Limit::default(),
            max_sessions_per_source: usize::MAX,
            source_table_entries: 2,
            activity: Arc::default(),
        }
    }
}

/// One worker's relay state: routes, its session shard, admission, tunnel steps and next hops.
#[derive(Debug)]
pub struct Relay {
    routes: Arc<RouteTable>,
    sessions: SessionTable,
    directory: Arc<NatDirectory>,
    admission: Admission,
    next_hops: Vec<Result<NextHop, NoHop>>,
    /// The control thread's verdicts, by upstream: new sessions go to healthy ones only.
    healthy: Vec<bool>,
    activity: Arc<UpstreamActivity>,
    /// Upstreams whose next hop was missing when a packet needed it; the
    /// worker drains this to ask the control thread for resolution.
    unresolved: Vec<bool>,
    iface_macs: Vec<MacAddr>,
    iface_mtus: Vec<u16>,
    /// ICMP errors this worker may still send (they answer packets, so a flood must not multiply).
    icmp_tokens: TokenPair,
    verify_checksums: bool,
    /// Flows admitted since the worker last drained them (it registers them with XDP).
    admitted: Vec<FlowKey>,
    /// Whether any route has a tunnel side (otherwise the tunnel steps are skipped).
    tunnels: bool,
    /// Whether any route sends PROXY protocol headers (otherwise that step is skipped).
    proxying: bool,
    tunnel: TunnelSteps,
    /// False while the relay drains: existing sessions are served, no new ones opened.
    accepting_sessions: bool,
    idle_timeout: Millis,
    counters: Arc<Counters>,
}

impl Relay {
    pub fn new(routes: Arc<RouteTable>, settings: RelaySettings, counters: Arc<Counters>) -> Self {
        let (tunnels, proxying) = route_features(&routes);
        let upstreams = routes.upstreams().len();
        let mut seeds = Seeds::new(settings.seed);
        let session_seeds = Seeds::new(seeds.next_u64());
        Relay {
            sessions: SessionTable::new(
                settings.directory.clone(),
                settings.nat_ports,
                settings.max_sessions,
                settings.timeouts,
                session_seeds,
            ),
            admission: Admission::new(
                settings.global_limit,
                settings.source_table_entries,
                settings.max_sessions_per_source,
                settings.max_sessions,
                &mut seeds,
            ),
            directory: settings.directory,
            next_hops: vec![Err(NoHop::NeighborUnresolved); upstreams],
            healthy: vec![true; upstreams],
            activity: settings.activity,
            unresolved: vec![false; upstreams],
            routes,
            iface_macs: settings.iface_macs,
            iface_mtus: settings.iface_mtus,
            icmp_tokens: TokenPair::full(&ICMP_LIMIT, 0),
            verify_checksums: settings.verify_checksums,
            admitted: Vec::with_capacity(ADMITTED_BACKLOG),
            tunnels,
            proxying,
            tunnel: TunnelSteps::default(),
            accepting_sessions: true,
            idle_timeout: settings.timeouts.idle,
            counters,
        }
    }

    /// Parses, validates and rewrites in place the frame of `len` bytes at the
    /// start of `buffer`, which may have room after it for a tunnel header.
    /// Returns the verdict and the frame's new length; on `Drop` the reason is already counted.
    #[inline]
    pub fn relay_frame(&mut self, now: Millis, ingress: IfaceId, buffer: &mut [u8], len: usize) -> (Verdict, usize) {
        match self.frame_steps(now, ingress, buffer, len) {
            Ok(forward) => forward,
            Err(reason) => {
                self.counters.count_drop(reason);
                (Verdict::Drop(reason), len)
            }
        }
    }

    /// [`relay_frame`](Self::relay_frame) of a whole frame with no room after it
    /// (tunnel hops that need room are dropped).
    #[cfg(any(test, feature = "test-support"))]
    pub fn relay_whole_frame(&mut self, now: Millis, ingress: IfaceId, frame: &mut [u8]) -> Verdict {
        let len = frame.len();
        self.relay_frame(now, ingress, frame, len).0
    }

    /// The relay steps of one datagram whose headers were already parsed: the
    /// session (created on a client's first datagram), limits and tunnel steps.
    /// `payload` holds `len` bytes and may have room after them; returns where
    /// it goes and its new length. Drops are counted.
    #[inline]
    pub fn relay_payload(
        &mut self,
        now: Millis,
        datagram: &Datagram,
        payload: &mut [u8],
        len: usize,
    ) -> Result<(Destination, usize), DropReason> {
        let result = self.payload_steps(now, datagram, payload, len);
        if let Err(reason) = result {
            self.counters.count_drop(reason);
        }
        result
    }

    /// Applies a reloaded config: `routes` is the [successor](RouteTable::successor) of the
    /// current table (ids kept), so every live session stays valid unless its route or
    /// upstream was removed. New upstreams start without a next hop.
    pub fn reconfigure(&mut self, routes: Arc<RouteTable>, limits: &ReloadedLimits) {
        let upstreams = routes.upstreams().len();
        self.next_hops.resize(upstreams, Err(NoHop::NeighborUnresolved));
        self.healthy.resize(upstreams, true);
        self.unresolved.resize(upstreams, false);
        (self.tunnels, self.proxying) = route_features(&routes);
        self.routes = routes;
        self.verify_checksums = limits.verify_checksums;
        self.admission.set_limits(limits.global_limit, limits.max_sessions_per_source);
    }

    /// The control thread's verdict on `upstream`: a down one gets no new sessions, and its
    /// sessions move to a healthy upstream of their route at their next client packet.
    pub fn set_upstream_health(&mut self, upstream: UpstreamId, up: bool) {
        if let Some(slot) = self.healthy.get_mut(usize::from(upstream.0)) {
            *slot = up;
        }
    }

    /// The MTU of interface `iface` now: datagrams that would leave it larger are answered with too-big.
    pub fn set_mtu(&mut self, iface: IfaceId, mtu: u16) {
        if let Some(slot) = self.iface_mtus.get_mut(usize::from(iface.0)) {
            *slot = mtu;
        }
    }

    /// Stops (false) or resumes (true) opening new sessions; existing ones are always served.
    pub fn set_accepting_sessions(&mut self, accepting: bool) {
        self.accepting_sessions = accepting;
    }

    /// This worker's live sessions as a successor process needs them, idle times relative to `now`.
    pub fn hand_over(&self, now: Millis) -> Vec<HandedOver> {
        self.sessions
            .live()
            .map(|(session, established, last)| HandedOver {
                client: session.flow.client,
                listen: session.flow.listen,
                upstream: self.routes.upstream(session.upstream),
                nat: SocketAddr::new(session.nat_ip, session.nat_port),
                client_iface: session.client_iface,
                client_mac: session.client_mac,
                peer_flow: session.peer_flow,
                idle: now.saturating_sub(last),
                established,
            })
            .collect()
    }

    /// Whether any worker's live session on `nat_port` goes to `upstream`.
    pub fn nat_port_serves(&self, nat_port: u16, upstream: UpstreamId) -> bool {
        self.directory.binding(nat_port).is_some_and(|binding| binding.upstream == upstream)
    }

    /// Whether this worker owns `nat_port` (so it is the one to take over its session).
    pub fn owns_port(&self, nat_port: u16) -> bool {
        self.sessions.owns_port(nat_port)
    }

    /// Takes over a session a previous relay process handed over, if this config
    /// still serves it; `since` is how long ago it was handed over.
    pub fn take_over(&mut self, now: Millis, since: Millis, saved: &HandedOver) -> Result<(), TakeOverRefused> {
        let route = self.routes.lookup(saved.listen).ok_or(TakeOverRefused::RouteGone)?;
        let upstream = self.routes.upstream_id(saved.upstream).ok_or(TakeOverRefused::UpstreamGone)?;
        if !self.routes.serves(route, upstream) {
            return Err(TakeOverRefused::UpstreamGone);
        }
        if saved.idle.saturating_add(since) >= self.idle_timeout {
            return Err(TakeOverRefused::Expired);
        }
        if usize::from(saved.client_iface.0) >= self.iface_macs.len() {
            return Err(TakeOverRefused::InterfaceGone);
        }
        let per_session = self.routes.route(route).per_session;
        let session = Session {
            flow: FlowKey { client: saved.client, listen: saved.listen },
            route,
            upstream,
            nat_ip: saved.nat.ip(),
            nat_port: saved.nat.port(),
            client_iface: saved.client_iface,
            client_mac: saved.client_mac,
            last_seen: now,
            created: now,
            tokens: TokenPair::full(&per_session, now),
            peer_flow: saved.peer_flow,
        };
        self.sessions.restore(session, saved.established).map_err(|_| TakeOverRefused::PortTaken)?;
        self.admission.opened(saved.client.ip());
        if self.admitted.len() < ADMITTED_BACKLOG {
            self.admitted.push(session.flow);
        }
        self.counters.sessions_active.set(self.sessions.len() as u64);
        Ok(())
    }

    /// Installs or clears the next hop of `upstream`.
    pub fn set_next_hop(&mut self, upstream: UpstreamId, hop: Result<NextHop, NoHop>) {
        if let Some(slot) = self.next_hops.get_mut(usize::from(upstream.0)) {
            *slot = hop;
        }
    }

    /// Flows admitted since the last call.
    pub fn take_admitted(&mut self) -> std::vec::Drain<'_, FlowKey> {
        self.admitted.drain(..)
    }

    /// Upstreams a packet needed but could not reach since the last call.
    pub fn take_unresolved(&mut self) -> impl Iterator<Item = UpstreamId> + '_ {
        self.unresolved
            .iter_mut()
            .enumerate()
            .filter_map(|(index, flag)| core::mem::take(flag).then_some(UpstreamId(index as u16)))
    }

    /// Expires idle sessions, examining at most `budget` slots; `on_expired`
    /// sees each one removed (the socket backend closes its socket).
    pub fn expire(&mut self, now: Millis, budget: usize, mut on_expired: impl FnMut(&Session)) {
        let mut evicted = 0;
        for session in self.sessions.take_retired() {
            self.admission.closed(session.flow.client.ip());
            on_expired(&session);
            evicted += 1;
        }
        if evicted > 0 {
            self.counters.sessions_evicted.add(evicted);
            self.counters.sessions_active.set(self.sessions.len() as u64);
        }
        let admission = &mut self.admission;
        let expired = self.sessions.expire(now, budget, |session| {
            admission.closed(session.flow.client.ip());
            on_expired(session);
        });
        if expired > 0 {
            self.counters.sessions_expired.add(expired as u64);
            self.counters.sessions_active.set(self.sessions.len() as u64);
        }
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Parse and check the frame, relay its payload, rewrite the headers.
    fn frame_steps(
        &mut self,
        now: Millis,
        ingress: IfaceId,
        buffer: &mut [u8],
        len: usize,
    ) -> Result<(Verdict, usize), DropReason> {
        // Validate against the received length only: bytes after it are stale.
        let received = len.min(buffer.len());
        let packet = match UdpFrame::new_checked(&mut buffer[..received]) {
            Ok(packet) => packet,
            // XDP hands over ICMP only when it is an error quoting a datagram from a NAT endpoint.
            Err(DropReason::NotUdp) => return self.icmp_steps(now, ingress, &mut buffer[..received]),
            Err(reason) => return Err(reason),
        };
        // A sender that offloaded its checksum (veth, tap, virtio) leaves only the
        // pseudo-header sum in the field: that cannot be verified, and must be completed on the way out.
        let partial = packet.udp_checksum_partial();
        if self.verify_checksums && !packet.checksums_valid() {
            return Err(DropReason::BadChecksum);
        }
        if self.iface_macs.get(usize::from(ingress.0)) != Some(&packet.dst_mac()) {
            return Err(DropReason::ForeignDestinationMac);
        }
        let (at, payload_len, layout) = (packet.payload_offset(), packet.payload().len(), packet.layout());
        let datagram = Datagram {
            from: packet.src(),
            to: packet.dst(),
            ingress,
            from_mac: packet.src_mac(),
            wire_bytes: (at + payload_len) as u64,
        };
        let (destination, new_len) = self.payload_steps(now, &datagram, &mut buffer[at..], payload_len)?;
        let (to, egress) = match destination {
            Destination::Upstream(out) => {
                let hop = self.resolved_hop(out.upstream).map_err(NoHop::drop_reason)?;
                let to = Rewrite {
                    src_mac: self.iface_macs[usize::from(hop.iface.0)],
                    dst_mac: hop.dst_mac,
                    src: SocketAddr::new(out.nat_ip, out.nat_port),
                    dst: self.routes.upstream(out.upstream),
                };
                (to, hop.iface)
            }
            Destination::Client(back) => {
                let to = Rewrite {
                    src_mac: self.iface_macs[usize::from(back.iface.0)],
                    dst_mac: back.mac,
                    src: back.listen,
                    dst: back.client,
                };
                (to, back.iface)
            }
            Destination::Sender => {
                let to = Rewrite {
                    src_mac: self.iface_macs[usize::from(ingress.0)],
                    dst_mac: datagram.from_mac,
                    src: datagram.to,
                    dst: datagram.from,
                };
                (to, ingress)
            }
        };
        let mtu = self.iface_mtus.get(usize::from(egress.0)).copied().map_or(usize::MAX, usize::from);
        if layout.headers_len() + new_len > mtu {
            return self.too_big(
                now,
                buffer,
                layout,
                &datagram,
                mtu.saturating_sub(new_len.saturating_sub(payload_len)),
            );
        }
        rewrite_headers(buffer, layout, payload_len, new_len, partial, &to, egress)
    }

    /// An ICMP error an upstream or a router sent about a datagram the relay sent from a NAT
    /// endpoint: translated back to the session's client (as if about the datagram the client
    /// sent, from the address it sent to), within the worker's ICMP rate.
    #[cold]
    fn icmp_steps(&mut self, now: Millis, ingress: IfaceId, frame: &mut [u8]) -> Result<(Verdict, usize), DropReason> {
        let error = icmp::IcmpError::parse(frame).ok_or(DropReason::NotUdp)?;
        if self.iface_macs.get(usize::from(ingress.0)) != Some(&error.dst_mac) {
            return Err(DropReason::ForeignDestinationMac);
        }
        let nat = error.quoted_src;
        let binding = self.directory.binding(nat.port()).ok_or(DropReason::IcmpNoSession)?;
        if binding.nat_ip != nat.ip() || self.routes.upstream(binding.upstream) != error.quoted_dst {
            return Err(DropReason::IcmpNoSession);
        }
        if !self.icmp_tokens.allow(&ICMP_LIMIT, now, 0) {
            return Err(DropReason::IcmpRateLimited);
        }
        let route = self.routes.route(binding.route);
        let proxy = route.proxy_header.map_or(0, |_| proxy_protocol::header_len(binding.flow.client));
        let tunnel = route.upstream_key.as_ref().map_or(0, |_| oxtunnel::OVERHEAD);
        let to = icmp::Translation {
            src_mac: self.iface_macs[usize::from(binding.client_iface.0)],
            dst_mac: binding.client_mac,
            client: binding.flow.client,
            listen: binding.flow.listen,
            overhead: (proxy + tunnel) as u16,
        };
        let len = error.translate(frame, &to).ok_or(DropReason::NotUdp)?;
        self.counters.icmp_errors_relayed.add(1);
        Ok((Verdict::Forward(binding.client_iface), len))
    }

    /// A datagram that would leave larger than its egress MTU: counted as `mtu_exceeded`, and the
    /// frame becomes an ICMP too-big error back to its sender advertising `usable` (the egress MTU
    /// less what the relay adds), within the worker's ICMP rate.
    #[cold]
    fn too_big(
        &mut self,
        now: Millis,
        buffer: &mut [u8],
        layout: Layout,
        datagram: &Datagram,
        usable: usize,
    ) -> Result<(Verdict, usize), DropReason> {
        if !self.icmp_tokens.allow(&ICMP_LIMIT, now, 0) {
            return Err(DropReason::MtuExceeded);
        }
        let src_mac = self.iface_macs[usize::from(datagram.ingress.0)];
        let mtu = u16::try_from(usable).unwrap_or(u16::MAX);
        let len = icmp::too_big_in_place(buffer, layout, src_mac, datagram.from_mac, datagram.to.ip(), mtu)
            .ok_or(DropReason::MtuExceeded)?;
        self.counters.count_drop(DropReason::MtuExceeded);
        self.counters.icmp_too_big_sent.add(1);
        Ok((Verdict::Forward(datagram.ingress), len))
    }

    #[inline]
    fn payload_steps(
        &mut self,
        now: Millis,
        datagram: &Datagram,
        payload: &mut [u8],
        len: usize,
    ) -> Result<(Destination, usize), DropReason> {
        // Config keeps listen ports out of the NAT range, so the port alone tells the direction.
        if self.directory.covers(datagram.to.port()) {
            self.reply_steps(now, datagram, payload, len)
        } else {
            self.client_steps(now, datagram, payload, len)
        }
    }

    /// A client's datagram: open the listen side's tunnel (answering keepalives),
    /// the session and its limits, then seal for the upstream's tunnel.
    #[inline]
    fn client_steps(
        &mut self,
        now: Millis,
        datagram: &Datagram,
        payload: &mut [u8],
        len: usize,
    ) -> Result<(Destination, usize), DropReason> {
        if !self.tunnels {
            let (out, route, opened) = self.client_session(now, datagram, 0)?;
            let len = self.with_proxy_header(route, opened, datagram, payload, len)?;
            return Ok((Destination::Upstream(out), len));
        }
        let route = self.routes.lookup(datagram.to).ok_or(DropReason::NoRoute)?;
        let (listen_key, upstream_key) = self.tunnel_keys(route);
        let opened = self.tunnel.open(listen_key.as_ref(), &payload[..len])?;
        if let (Opened::Keepalive { flow_id }, Some(key)) = (opened, &listen_key) {
            self.counters.tunnel_keepalives.add(1);
            return Ok((Destination::Sender, TunnelSteps::answer_keepalive(key, flow_id, payload)?));
        }
        let (out, route, fresh) = self.client_session(now, datagram, opened.flow_id())?;
        let flow_id = u32::from(out.nat_port);
        let new_len = self.tunnel.pass_on(upstream_key.as_ref(), flow_id, opened, payload, len, &self.counters)?;
        // Config keeps PROXY headers off routes to tunnel hops: this adds to the plain payload.
        let new_len = self.with_proxy_header(route, fresh, datagram, payload, new_len)?;
        Ok((Destination::Upstream(out), new_len))
    }

    /// Puts the route's PROXY v2 header before the payload, on every datagram or on the
    /// session's first (`opened`: this datagram opened it). One flag check for routes without.
    #[inline]
    fn with_proxy_header(
        &self,
        route: route::RouteId,
        opened: bool,
        datagram: &Datagram,
        payload: &mut [u8],
        len: usize,
    ) -> Result<usize, DropReason> {
        if !self.proxying {
            return Ok(len);
        }
        match self.routes.route(route).proxy_header {
            Some(ProxyHeader::EveryDatagram) => proxy_protocol::prepend(payload, len, datagram.from, datagram.to),
            Some(ProxyHeader::FirstDatagram) if opened => {
                proxy_protocol::prepend(payload, len, datagram.from, datagram.to)
            }
            _ => Ok(len),
        }
    }

    /// An upstream's datagram: its session, then open the upstream's tunnel and seal for the client's.
    #[inline]
    fn reply_steps(
        &mut self,
        now: Millis,
        datagram: &Datagram,
        payload: &mut [u8],
        len: usize,
    ) -> Result<(Destination, usize), DropReason> {
        let (back, route, peer_flow) = self.session_of_reply(now, datagram.from, datagram.to)?;
        if !self.tunnels {
            return Ok((Destination::Client(back), len));
        }
        let (listen_key, upstream_key) = self.tunnel_keys(route);
        let opened = self.tunnel.open(upstream_key.as_ref(), &payload[..len])?;
        let new_len = self.tunnel.pass_on(listen_key.as_ref(), peer_flow, opened, payload, len, &self.counters)?;
        Ok((Destination::Client(back), new_len))
    }

    /// The keys of a route's client side and upstream side (copied: the steps that use them borrow the relay).
    fn tunnel_keys(&self, route: route::RouteId) -> (Option<TunnelKey>, Option<TunnelKey>) {
        let route = self.routes.route(route);
        (route.listen_key.clone(), route.upstream_key.clone())
    }

    /// The session a reply answers: where it goes back to, its route and the peer's flow id.
    #[inline]
    fn session_of_reply(
        &mut self,
        now: Millis,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Result<(Clientward, route::RouteId, u32), DropReason> {
        // Whichever worker's queue the reply landed on, the directory has its session.
        let binding = self.directory.binding(to.port()).ok_or(DropReason::NoSession)?;
        if binding.nat_ip != to.ip() || self.routes.upstream(binding.upstream) != from {
            return Err(DropReason::UnexpectedReplySource);
        }
        if !self.routes.serves(binding.route, binding.upstream) {
            return Err(DropReason::RouteWithdrawn);
        }
        self.directory.answered(to.port(), now);
        self.activity.answered(binding.upstream, now);
        if !self.sessions.owns_port(to.port()) {
            self.counters.replies_cross_queue.add(1);
        }
        let back = Clientward {
            client: binding.flow.client,
            listen: binding.flow.listen,
            iface: binding.client_iface,
            mac: binding.client_mac,
        };
        Ok((back, binding.route, binding.peer_flow))
    }

    /// A client datagram's session and limits: the global limit, then per-source,
    /// then the session (this worker's, another worker's, or opened now), then
    /// per-session. Cheapest refusal first, so a flood costs little.
    #[inline]
    /// Returns where it goes, its route and whether this datagram opened the session.
    fn client_session(
        &mut self,
        now: Millis,
        datagram: &Datagram,
        peer_flow: u32,
    ) -> Result<(Upstreamward, route::RouteId, bool), DropReason> {
        self.admission.allow_global(now, datagram.wire_bytes)?;
        let flow = FlowKey { client: datagram.from, listen: datagram.to };
        // An established flow knows its route; only a new one needs the route lookup.
        let existing = self.sessions.find(&flow);
        let elsewhere = if existing.is_none() { self.directory.find(&flow) } else { None };
        let (route_id, upstream) = match (existing.and_then(|slot| self.sessions.get(slot)), elsewhere) {
            (Some(session), _) => (session.route, Some(session.upstream)),
            (None, Some((_, binding))) => (binding.route, Some(binding.upstream)),
            (None, None) => (self.routes.lookup(flow.listen).ok_or(DropReason::NoRoute)?, None),
        };
        if let Some(upstream) = upstream
            && !self.routes.serves(route_id, upstream)
        {
            return Err(DropReason::RouteWithdrawn);
        }
        let route = self.routes.route(route_id);
        let per_session = route.per_session;
        self.admission.allow_source(route_id, &route.per_source, flow.client.ip(), now, datagram.wire_bytes)?;
        if let Some((port, binding)) = elsewhere {
            return Ok((self.relay_for_owner(now, port, &binding), route_id, false));
        }
        let (slot, opened) = match existing {
            Some(slot) => (slot, false),
            None => match self.open_session(now, datagram, flow, route_id, peer_flow)? {
                Opening::Here(slot) => (slot, true),
                Opening::Elsewhere(port, binding) => {
                    return Ok((self.relay_for_owner(now, port, &binding), route_id, false));
                }
            },
        };
        if upstream.is_some_and(|u| !self.healthy[usize::from(u.0)]) {
            self.move_off_failed_upstream(now, slot, route_id, flow.client);
        }
        let session = self.sessions.refresh(slot, now).ok_or(DropReason::NoSession)?;
        self.directory.client_sent(session.nat_port);
        self.activity.sent(session.upstream, now);
        if !per_session.is_unlimited() && !session.tokens.allow(&per_session, now, datagram.wire_bytes) {
            return Err(DropReason::RateLimitedSession);
        }
        Ok((
            Upstreamward { upstream: session.upstream, nat_ip: session.nat_ip, nat_port: session.nat_port },
            route_id,
            opened,
        ))
    }

    /// Re-points this worker's session in `slot` to the healthy upstream its client would be
    /// given now, on the same NAT port; stays put when none is healthy or reachable.
    fn move_off_failed_upstream(&mut self, now: Millis, slot: Slot, route: route::RouteId, client: SocketAddr) {
        let Some(target) = self.choose_upstream(route, client) else { return };
        if !self.healthy[usize::from(target.0)] {
            return;
        }
        let Ok(hop) = self.resolved_hop(target) else { return };
        if self.sessions.repoint(slot, target, hop.src_ip, now).is_some() {
            self.counters.sessions_moved.add(1);
        }
    }

    /// A client packet of a session another worker owns (the NIC's RSS moved the
    /// flow to this queue): relay it through that session, keeping it alive. The
    /// per-session limit is the owner's; this worker applies the global and per-source ones.
    fn relay_for_owner(&self, now: Millis, port: u16, binding: &Binding) -> Upstreamward {
        self.directory.client_sent(port);
        self.directory.touch(port, now);
        self.activity.sent(binding.upstream, now);
        self.counters.clients_cross_queue.add(1);
        Upstreamward { upstream: binding.upstream, nat_ip: binding.nat_ip, nat_port: port }
    }

    /// Opens the session of a new flow: access list, per-source cap, upstream choice, NAT port.
    fn open_session(
        &mut self,
        now: Millis,
        datagram: &Datagram,
        flow: FlowKey,
        route_id: route::RouteId,
        peer_flow: u32,
    ) -> Result<Opening, DropReason> {
        if !self.accepting_sessions {
            return Err(DropReason::Draining);
        }
        let route = self.routes.route(route_id);
        if self.is_own_address(flow.client.ip()) {
            return Err(DropReason::OwnSourceAddress);
        }
        if !route::client_allowed(route, flow.client) {
            return Err(DropReason::ClientNotAllowed);
        }
        let per_session = route.per_session;
        self.admission.may_open(flow.client.ip())?;
        let upstream = self.choose_upstream(route_id, flow.client).ok_or(DropReason::NoUpstreamAccepting)?;
        // The NAT address must be known before the session exists: it is what the upstream replies to.
        let hop = self.resolved_hop(upstream).map_err(NoHop::drop_reason)?;
        let template = Session {
            flow,
            route: route_id,
            upstream,
            nat_ip: hop.src_ip,
            nat_port: 0,
            client_iface: datagram.ingress,
            client_mac: datagram.from_mac,
            last_seen: now,
            created: now,
            tokens: TokenPair::full(&per_session, now),
            peer_flow,
        };
        let slot = match self.sessions.admit_slot(template) {
            Ok(slot) => slot,
            Err(AdmitError::TableFull) => return Err(DropReason::SessionTableFull),
            Err(AdmitError::PortsExhausted) => return Err(DropReason::NatPortsExhausted),
            // Another worker created this flow's session at this very moment: use that one.
            Err(AdmitError::Contended(port)) => {
                return match self.directory.binding(port).filter(|b| b.flow == flow) {
                    Some(binding) => Ok(Opening::Elsewhere(port, binding)),
                    None => Err(DropReason::SessionContended),
                };
            }
        };
        self.admission.opened(flow.client.ip());
        // Bounded so the hot path never allocates; a flow past it only meets the XDP new-flow budget.
        if self.admitted.len() < ADMITTED_BACKLOG {
            self.admitted.push(flow);
        }
        self.counters.sessions_created.add(1);
        self.counters.sessions_active.set(self.sessions.len() as u64);
        Ok(Opening::Here(slot))
    }

    /// The upstream `client` gets on `route` now: among the healthy accepting ones while any is.
    fn choose_upstream(&self, route: route::RouteId, client: SocketAddr) -> Option<UpstreamId> {
        self.routes.choose_upstream(route, client, |id| self.healthy[usize::from(id.0)])
    }

    /// Whether `ip` is one of the relay's own: a listen address or a NAT source address.
    fn is_own_address(&self, ip: IpAddr) -> bool {
        self.routes.routes().iter().any(|r| r.listen.ip() == ip)
            || self.next_hops.iter().flatten().any(|hop| hop.src_ip == ip)
    }

    /// The next hop of `upstream`; when missing, flags it for the control thread.
    fn resolved_hop(&mut self, upstream: UpstreamId) -> Result<NextHop, NoHop> {
        let hop = self.next_hops[usize::from(upstream.0)];
        if hop.is_err() {
            self.unresolved[usize::from(upstream.0)] = true;
        }
        hop
    }
}

/// Whether any route has a tunnel side, and whether any sends PROXY headers: the steps the
/// hot path skips with one flag check when no route uses them.
fn route_features(routes: &RouteTable) -> (bool, bool) {
    let all = routes.routes();
    (
        all.iter().any(|r| r.listen_key.is_some() || r.upstream_key.is_some()),
        all.iter().any(|r| r.proxy_header.is_some()),
    )
}

/// Where a new flow's session ended up.
enum Opening {
    Here(Slot),
    Elsewhere(u16, Binding),
}

/// Rewrites addresses (and, when the payload changed length, the lengths and
/// the UDP checksum) of the frame in `buffer`; returns the verdict and its length.
#[inline]
fn rewrite_headers(
    buffer: &mut [u8],
    layout: Layout,
    old_payload: usize,
    new_payload: usize,
    partial_checksum: bool,
    to: &Rewrite,
    egress: IfaceId,
) -> Result<(Verdict, usize), DropReason> {
    // The steps changed at most the payload, so the checked layout still holds.
    let mut packet = UdpFrame::with_layout(&mut buffer[..], layout).ok_or(DropReason::TooShort)?;
    if new_payload == old_payload {
        // Config validation keeps listen and upstream families equal; this guards the invariant.
        if !packet.rewrite(to) {
            return Err(DropReason::NoRoute);
        }
        // An incremental update of a partial sum would still be partial: the receiver would reject it.
        if partial_checksum {
            packet.recompute_udp_checksum();
        }
        return Ok((Verdict::Forward(egress), packet.len()));
    }
    if !packet.set_payload_len(new_payload) || !packet.rewrite(to) {
        return Err(DropReason::TunnelMalformed);
    }
    packet.recompute_udp_checksum();
    Ok((Verdict::Forward(egress), packet.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Limit;
    use crate::route::RouteSpec;
    use crate::session::Timeouts;
    use crate::wire::build::udp_frame;

    const CLIENT_MAC: MacAddr = [2, 0, 0, 0, 0, 0xc1];
    const RELAY_CLIENT_SIDE: MacAddr = [2, 0, 0, 0, 0, 0xa1];
    const RELAY_UPSTREAM_SIDE: MacAddr = [2, 0, 0, 0, 0, 0xa2];
    const UPSTREAM_MAC: MacAddr = [2, 0, 0, 0, 0, 0xd1];

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn two_arm_relay(listen: &str, upstream: &str, nat_ip: &str) -> (Relay, Arc<Counters>) {
        relay_with(RouteSpec::new(addr(listen), vec![addr(upstream)]), nat_ip, |_| {})
    }

    fn relay_with(spec: RouteSpec, nat_ip: &str, tune: impl FnOnce(&mut RelaySettings)) -> (Relay, Arc<Counters>) {
        let routes = Arc::new(RouteTable::new(&[spec]));
        let counters = Arc::new(Counters::default());
        let mut settings = RelaySettings {
            verify_checksums: true,
            ..RelaySettings::unlimited(vec![RELAY_CLIENT_SIDE, RELAY_UPSTREAM_SIDE], (20000, 20999), 1000, 30_000, 7)
        };
        tune(&mut settings);
        let mut relay = Relay::new(routes, settings, counters.clone());
        relay.set_next_hop(
            UpstreamId(0),
            Ok(NextHop { iface: IfaceId(1), src_ip: nat_ip.parse().expect("ip"), dst_mac: UPSTREAM_MAC }),
        );
        (relay, counters)
    }

    /// The NAT address a forwarded frame leaves from.
    fn source_of(frame: &[u8]) -> SocketAddr {
        UdpFrame::new_checked(frame).expect("valid").src()
    }

    /// A relay split into two workers over one directory, as `run` builds them.
    fn two_workers() -> [(Relay, Arc<Counters>); 2] {
        let routes = Arc::new(RouteTable::new(&[RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:7000")])]));
        let directory = Arc::new(NatDirectory::new((20000, 20199), 5));
        [(20000, 20099), (20100, 20199)].map(|nat_ports| {
            let counters = Arc::new(Counters::default());
            let settings = RelaySettings {
                directory: directory.clone(),
                nat_ports,
                ..RelaySettings::unlimited(vec![RELAY_CLIENT_SIDE, RELAY_UPSTREAM_SIDE], nat_ports, 100, 30_000, 7)
            };
            let mut relay = Relay::new(routes.clone(), settings, counters.clone());
            let hop = NextHop { iface: IfaceId(1), src_ip: "10.1.0.1".parse().expect("ip"), dst_mac: UPSTREAM_MAC };
            relay.set_next_hop(UpstreamId(0), Ok(hop));
            (relay, counters)
        })
    }

    #[test]
    fn a_reply_on_another_workers_queue_reaches_the_client() {
        let [(mut first, first_counters), (mut second, second_counters)] = two_workers();
        let mut request = client_frame(40000);
        assert_eq!(first.relay_whole_frame(1, IfaceId(0), &mut request), Verdict::Forward(IfaceId(1)));
        let nat = source_of(&request);
        let mut reply = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), nat, b"pong");
        assert_eq!(second.relay_whole_frame(2, IfaceId(1), &mut reply), Verdict::Forward(IfaceId(0)));
        let expected = udp_frame(RELAY_CLIENT_SIDE, CLIENT_MAC, addr("10.0.0.1:5000"), addr("10.0.0.2:40000"), b"pong");
        assert_eq!(reply, expected);
        assert_eq!(second_counters.replies_cross_queue.get(), 1);
        assert_eq!(first_counters.replies_cross_queue.get(), 0);
        assert_eq!(second_counters.total_drops() + first_counters.total_drops(), 0);

        // The reply kept the session alive though its owner saw nothing since.
        first.expire(30_001, usize::MAX, |_| {});
        assert_eq!(first.session_count(), 1);
        first.expire(30_002, usize::MAX, |_| {});
        assert_eq!(first.session_count(), 0);
        let mut late = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), nat, b"late");
        assert_eq!(second.relay_whole_frame(30_003, IfaceId(1), &mut late), Verdict::Drop(DropReason::NoSession));
    }

    #[test]
    fn a_client_flow_moved_to_another_queue_keeps_its_session() {
        let [(mut first, first_counters), (mut second, second_counters)] = two_workers();
        let mut request = client_frame(40000);
        first.relay_whole_frame(1, IfaceId(0), &mut request);
        let nat = source_of(&request);
        let mut moved = client_frame(40000);
        assert_eq!(second.relay_whole_frame(2, IfaceId(0), &mut moved), Verdict::Forward(IfaceId(1)));
        assert_eq!(source_of(&moved), nat, "the same NAT port: no second session");
        assert_eq!((second.session_count(), second_counters.clients_cross_queue.get()), (0, 1));
        assert_eq!(second_counters.sessions_created.get(), 0);

        // Answered, then client traffic on the other queue 2 s on: established where it was
        // created, so a flood of new flows through the owner's full table cannot evict it.
        let mut reply = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), nat, b"r");
        assert_eq!(second.relay_whole_frame(3, IfaceId(1), &mut reply), Verdict::Forward(IfaceId(0)));
        second.relay_whole_frame(2_500, IfaceId(0), &mut client_frame(40000));
        for port in 1000..1200 {
            first.relay_whole_frame(2_600, IfaceId(0), &mut client_frame(port));
        }
        first.expire(2_600, 0, |_| {});
        assert!(first_counters.sessions_evicted.get() >= 100, "the owner's table churned");
        let mut again = client_frame(40000);
        assert_eq!(second.relay_whole_frame(2_700, IfaceId(0), &mut again), Verdict::Forward(IfaceId(1)));
        assert_eq!(source_of(&again), nat, "still the same session after the owner's table churned");
    }

    /// A client request through `relay` at `now`; returns the NAT address it left from.
    fn request(relay: &mut Relay, now: Millis, port: u16) -> SocketAddr {
        let mut frame = client_frame(port);
        assert_eq!(relay.relay_whole_frame(now, IfaceId(0), &mut frame), Verdict::Forward(IfaceId(1)));
        source_of(&frame)
    }

    /// The upstream `from` answers `nat` at `now`.
    fn answer(relay: &mut Relay, now: Millis, from: &str, nat: SocketAddr) -> Verdict {
        relay.relay_whole_frame(
            now,
            IfaceId(1),
            &mut udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr(from), nat, b"r"),
        )
    }

    #[test]
    fn a_reload_keeps_live_sessions_and_withdraws_removed_ones() {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let nat = request(&mut relay, 1, 40000);
        let routes = relay.routes().clone();
        let limits =
            ReloadedLimits { global_limit: Limit::default(), max_sessions_per_source: 1, verify_checksums: true };

        // The upstream becomes draining and another is added: the session stays where it is.
        let mut spec = RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.9:7000"), addr("10.1.0.2:7000")]);
        spec.draining = vec![addr("10.1.0.2:7000")];
        relay.reconfigure(Arc::new(routes.successor(&[spec])), &limits);
        assert_eq!(relay.next_hops.len(), 2, "the new upstream has a next-hop slot");
        relay.set_next_hop(UpstreamId(1), relay.next_hops[0]);
        assert_eq!(request(&mut relay, 2, 40000), nat, "same NAT port after the reload");
        assert_eq!(answer(&mut relay, 3, "10.1.0.2:7000", nat), Verdict::Forward(IfaceId(0)));
        let mut fresh = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.4:1"), addr("10.0.0.1:5000"), b"x");
        assert_eq!(relay.relay_whole_frame(4, IfaceId(0), &mut fresh), Verdict::Forward(IfaceId(1)));
        let to = UdpFrame::new_checked(&fresh[..]).expect("valid").dst();
        assert_eq!(to, addr("10.1.0.9:7000"), "a new session avoids the draining upstream");
        let mut capped = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.3:1"), addr("10.0.0.1:5000"), b"x");
        relay.relay_whole_frame(4, IfaceId(0), &mut capped);
        let mut second = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.3:2"), addr("10.0.0.1:5000"), b"x");
        assert_eq!(
            relay.relay_whole_frame(4, IfaceId(0), &mut second),
            Verdict::Drop(DropReason::SourceSessionLimit),
            "reloaded limits apply"
        );

        // The route is removed: its sessions are refused both ways, and counted.
        relay.reconfigure(Arc::new(relay.routes().successor(&[])), &limits);
        assert_eq!(
            relay.relay_whole_frame(5, IfaceId(0), &mut client_frame(40000)),
            Verdict::Drop(DropReason::RouteWithdrawn)
        );
        assert_eq!(answer(&mut relay, 5, "10.1.0.2:7000", nat), Verdict::Drop(DropReason::RouteWithdrawn));
        assert_eq!(counters.dropped(DropReason::RouteWithdrawn), 2);
    }

    #[test]
    fn sessions_of_a_failed_upstream_move_on_their_next_packet_and_keep_their_nat_port() {
        let spec = RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:7000"), addr("10.1.0.3:7000")]);
        let (mut relay, counters) = relay_with(spec, "10.1.0.1", |_| {});
        relay.set_next_hop(UpstreamId(1), relay.next_hops[0]);
        let upstream_of = |frame: &[u8]| UdpFrame::new_checked(frame).expect("valid").dst();
        // Find a client the first upstream serves.
        let from = |host: u8| {
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr(&format!("10.0.0.{host}:4000")), addr("10.0.0.1:5000"), b"x")
        };
        let (host, nat) = (2..100)
            .find_map(|host| {
                let mut frame = from(host);
                relay.relay_whole_frame(1, IfaceId(0), &mut frame);
                (upstream_of(&frame) == addr("10.1.0.2:7000")).then(|| (host, source_of(&frame)))
            })
            .expect("rendezvous gives the first upstream some clients");
        relay.set_upstream_health(UpstreamId(0), false);
        let mut moved = from(host);
        assert_eq!(relay.relay_whole_frame(2, IfaceId(0), &mut moved), Verdict::Forward(IfaceId(1)));
        assert_eq!(upstream_of(&moved), addr("10.1.0.3:7000"), "moved to the healthy upstream");
        assert_eq!(source_of(&moved), nat, "on the same NAT port");
        assert_eq!(counters.sessions_moved.get(), 1);
        assert_eq!(answer(&mut relay, 3, "10.1.0.3:7000", nat), Verdict::Forward(IfaceId(0)), "its answers come back");
        assert_eq!(answer(&mut relay, 3, "10.1.0.2:7000", nat), Verdict::Drop(DropReason::UnexpectedReplySource));
        for host in 100..150 {
            let mut fresh = from(host);
            relay.relay_whole_frame(4, IfaceId(0), &mut fresh);
            assert_eq!(upstream_of(&fresh), addr("10.1.0.3:7000"), "new sessions avoid the failed upstream");
        }
        assert_eq!(relay.activity.times(UpstreamId(1)), (4, 3), "sends and answers are recorded per upstream");
    }

    #[test]
    fn a_proxy_v2_header_is_put_before_the_payload_in_the_frame() {
        for (mode, headers) in [(ProxyHeader::EveryDatagram, [true, true]), (ProxyHeader::FirstDatagram, [true, false])]
        {
            let mut spec = RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:7000")]);
            spec.proxy_header = Some(mode);
            let (mut relay, counters) = relay_with(spec, "10.1.0.1", |_| {});
            for header in headers {
                let request = client_frame(40000);
                let mut buffer = request.clone();
                buffer.resize(2048, 0);
                let (verdict, len) = relay.relay_frame(1, IfaceId(0), &mut buffer, request.len());
                assert_eq!(verdict, Verdict::Forward(IfaceId(1)));
                let out = UdpFrame::new_checked(&buffer[..len]).expect("valid");
                assert!(out.checksums_valid(), "lengths and checksum follow the longer payload");
                let mut expected = vec![0u8; 64];
                let header_len =
                    proxy_protocol::write_header(&mut expected, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"))
                        .expect("header");
                expected.truncate(if header { header_len } else { 0 });
                expected.extend_from_slice(b"x");
                assert_eq!(out.payload(), &expected[..], "{mode:?}");
            }
            let mut full = client_frame(40001);
            assert_eq!(
                relay.relay_whole_frame(2, IfaceId(0), &mut full),
                Verdict::Drop(DropReason::ProxyHeaderNoRoom),
                "no room after the frame: dropped, never cut"
            );
            assert_eq!(counters.dropped(DropReason::ProxyHeaderNoRoom), 1);
        }
    }

    #[test]
    fn a_datagram_too_big_for_the_egress_mtu_becomes_an_icmp_error_to_its_sender() {
        let mut spec = RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:7000")]);
        spec.proxy_header = Some(ProxyHeader::EveryDatagram);
        let (mut relay, counters) = relay_with(spec, "10.1.0.1", |settings| settings.iface_mtus = vec![1500, 1400]);
        let big = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), &[1; 1380]);
        let mut buffer = big.clone();
        buffer.resize(2048, 0);
        let (verdict, len) = relay.relay_frame(1, IfaceId(0), &mut buffer, big.len());
        assert_eq!(verdict, Verdict::Forward(IfaceId(0)), "back out of the interface it came in on");
        assert_eq!(&buffer[0..12], &[CLIENT_MAC, RELAY_CLIENT_SIDE].concat()[..]);
        assert_eq!(&buffer[34..36], &[3, 4], "ICMP fragmentation needed");
        assert_eq!(u16::from_be_bytes([buffer[40], buffer[41]]), 1400 - 28, "the egress MTU less the PROXY header");
        assert_eq!(&buffer[42..len], &big[14..42], "quoting the datagram as the client sent it");
        assert_eq!((counters.dropped(DropReason::MtuExceeded), counters.icmp_too_big_sent.get()), (1, 1));
        let small = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), &[1; 1300]);
        let mut buffer = small.clone();
        buffer.resize(2048, 0);
        assert_eq!(
            relay.relay_frame(2, IfaceId(0), &mut buffer, small.len()).0,
            Verdict::Forward(IfaceId(1)),
            "what fits is relayed"
        );
        // The operator lowers the upstream side's MTU while the relay runs.
        relay.set_mtu(IfaceId(1), 1300);
        let mut buffer = small.clone();
        buffer.resize(2048, 0);
        let (verdict, _) = relay.relay_frame(3, IfaceId(0), &mut buffer, small.len());
        assert_eq!(verdict, Verdict::Forward(IfaceId(0)), "now too big: an error back to the client");
        assert_eq!(u16::from_be_bytes([buffer[40], buffer[41]]), 1300 - 28, "advertising the new MTU");
    }

    /// An ICMPv4 error of `kind` (type, code) from `from` quoting the IP and UDP headers of `sent`.
    fn icmp_about(sent: &[u8], from: [u8; 4], kind: [u8; 2]) -> Vec<u8> {
        let quote = &sent[14..];
        let mut frame = [RELAY_UPSTREAM_SIDE, UPSTREAM_MAC].concat();
        frame.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
        ip[2..4].copy_from_slice(&((20 + 8 + quote.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&from);
        ip.extend_from_slice(&sent[26..30]);
        let sum = crate::checksum::checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut message = vec![kind[0], kind[1], 0, 0, 0, 0, 0, 0];
        message.extend_from_slice(quote);
        let sum = crate::checksum::checksum(&message);
        message[2..4].copy_from_slice(&sum.to_be_bytes());
        [frame, ip, message].concat()
    }

    /// Relays a client datagram, then the port unreachable `error_about(sent datagram)` makes of it,
    /// and checks the error reached the client as about the datagram it sent; returns the relay
    /// and the datagram as it left toward the upstream.
    fn port_unreachable_reaches_the_client(error_about: impl Fn(&[u8]) -> Vec<u8>) -> (Relay, Vec<u8>) {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let original = client_frame(40000);
        let mut sent = original.clone();
        relay.relay_whole_frame(1, IfaceId(0), &mut sent);
        let mut error = error_about(&sent);
        assert_eq!(relay.relay_whole_frame(2, IfaceId(1), &mut error), Verdict::Forward(IfaceId(0)));
        assert_eq!(&error[0..12], &[CLIENT_MAC, RELAY_CLIENT_SIDE].concat()[..]);
        assert_eq!((&error[26..30], &error[30..34]), (&[10, 0, 0, 1][..], &[10, 0, 0, 2][..]), "listen -> client");
        assert_eq!(crate::checksum::checksum(&error[14..34]), 0, "outer IPv4 checksum");
        assert_eq!(crate::checksum::checksum(&error[34..]), 0, "ICMP checksum");
        assert_eq!(&error[34..36], &[3, 3], "still port unreachable");
        assert_eq!(&error[42..70], &original[14..42], "quoting the datagram exactly as the client sent it");
        assert_eq!(counters.icmp_errors_relayed.get(), 1);
        (relay, sent)
    }

    #[test]
    fn an_icmp_error_about_a_relayed_datagram_goes_back_to_its_client_translated() {
        let (mut relay, sent) = port_unreachable_reaches_the_client(|sent| icmp_about(sent, [10, 1, 0, 2], [3, 3]));
        let mut stranger = icmp_about(&sent, [10, 1, 0, 2], [3, 3]);
        stranger[14 + 28 + 20] ^= 0x55; // another NAT port
        let inner_ip = 14 + 28;
        stranger[inner_ip + 20..inner_ip + 22].copy_from_slice(&29_999u16.to_be_bytes());
        assert_eq!(relay.relay_whole_frame(3, IfaceId(1), &mut stranger), Verdict::Drop(DropReason::IcmpNoSession));
        let mut echo_request = icmp_about(&sent, [10, 1, 0, 2], [8, 0]);
        assert_eq!(relay.relay_whole_frame(3, IfaceId(1), &mut echo_request), Verdict::Drop(DropReason::NotUdp));
    }

    #[test]
    fn an_error_rebuilt_from_a_sockets_error_queue_is_translated_like_one_off_the_wire() {
        let refused = icmp::QueuedError { kind: 3, code: 3, info: 0, from: "10.1.0.2".parse().expect("ip") };
        port_unreachable_reaches_the_client(|sent| {
            icmp::rebuild_frame(&refused, RELAY_UPSTREAM_SIDE, source_of(sent), addr("10.1.0.2:7000"), &sent[42..])
                .expect("rebuilt")
        });
    }

    #[test]
    fn a_draining_relay_serves_its_sessions_and_opens_none() {
        let (mut relay, _) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let nat = request(&mut relay, 1, 40000);
        relay.set_accepting_sessions(false);
        assert_eq!(request(&mut relay, 2, 40000), nat);
        assert_eq!(answer(&mut relay, 3, "10.1.0.2:7000", nat), Verdict::Forward(IfaceId(0)));
        assert_eq!(
            relay.relay_whole_frame(4, IfaceId(0), &mut client_frame(40001)),
            Verdict::Drop(DropReason::Draining)
        );
        relay.set_accepting_sessions(true);
        request(&mut relay, 5, 40001);
    }

    #[test]
    fn a_successor_takes_over_sessions_on_their_nat_ports() {
        let (mut old, _) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let ports: Vec<u16> = (40000..40010).collect();
        let nats: Vec<SocketAddr> = ports.iter().map(|&p| request(&mut old, 1, p)).collect();
        for nat in &nats[..5] {
            answer(&mut old, 2, "10.1.0.2:7000", *nat);
        }
        let handed = old.hand_over(10_000);
        assert_eq!(handed.len(), 10);
        assert!(handed.iter().all(|h| h.idle >= 9_998), "idle times are carried over");

        let (mut new, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        for saved in &handed {
            assert_eq!(new.take_over(0, 1_000, saved), Ok(()));
        }
        assert_eq!(counters.sessions_active.get(), 10);
        for (port, nat) in ports.iter().zip(&nats) {
            assert_eq!(
                answer(&mut new, 1, "10.1.0.2:7000", *nat),
                Verdict::Forward(IfaceId(0)),
                "replies reach the client"
            );
            assert_eq!(request(&mut new, 2, *port), *nat, "the client keeps its NAT port");
        }
        let too_old = HandedOver { idle: 29_500, ..handed[0] };
        let (mut late, _) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        assert_eq!(late.take_over(0, 1_000, &too_old), Err(TakeOverRefused::Expired));
        let (mut moved, _) = two_arm_relay("10.0.0.1:5000", "10.1.0.3:7000", "10.1.0.1");
        assert_eq!(moved.take_over(0, 0, &handed[0]), Err(TakeOverRefused::UpstreamGone));
    }

    #[test]
    fn partial_checksums_from_offloading_senders_leave_complete() {
        for (client, listen, upstream, nat_ip) in [
            ("10.0.0.2:40000", "10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1"),
            ("[fd00::2]:40000", "[fd00::1]:5000", "[fd01::2]:7000", "fd01::1"),
        ] {
            let (mut relay, counters) = two_arm_relay(listen, upstream, nat_ip);
            let mut request = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr(client), addr(listen), b"offloaded");
            make_partial(&mut request);
            assert!(UdpFrame::new_checked(&request[..]).expect("valid").udp_checksum_partial());
            assert_eq!(relay.relay_whole_frame(1, IfaceId(0), &mut request), Verdict::Forward(IfaceId(1)));
            let nat = source_of(&request);
            let expected = udp_frame(RELAY_UPSTREAM_SIDE, UPSTREAM_MAC, nat, addr(upstream), b"offloaded");
            assert_eq!(request, expected, "a complete checksum, though verification was on");

            let mut reply = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr(upstream), nat, b"back");
            make_partial(&mut reply);
            assert_eq!(relay.relay_whole_frame(2, IfaceId(1), &mut reply), Verdict::Forward(IfaceId(0)));
            assert_eq!(reply, udp_frame(RELAY_CLIENT_SIDE, CLIENT_MAC, addr(listen), addr(client), b"back"));
            assert_eq!(counters.total_drops(), 0);
        }
    }

    /// What a checksum-offloading sender puts on the wire: the folded pseudo-header sum only.
    fn make_partial(frame: &mut [u8]) {
        let view = UdpFrame::new_checked(&*frame).expect("valid");
        let (src, dst, payload) = (view.src(), view.dst(), view.payload().len());
        let at = view.payload_offset() - 8;
        let words = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let mut pseudo = words(src.ip());
        pseudo.extend(words(dst.ip()));
        let sum = crate::checksum::ones_complement_sum(&pseudo, 17 + 8 + payload as u32);
        frame[at + 6..at + 8].copy_from_slice(&sum.to_be_bytes());
    }

    #[test]
    fn round_trip_ipv4_two_arm() {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let mut request =
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), b"ping");
        assert_eq!(relay.relay_whole_frame(1, IfaceId(0), &mut request), Verdict::Forward(IfaceId(1)));
        let nat = source_of(&request);
        assert!((20000..=20999).contains(&nat.port()) && nat.ip() == addr("10.1.0.1:0").ip());
        let expected = udp_frame(RELAY_UPSTREAM_SIDE, UPSTREAM_MAC, nat, addr("10.1.0.2:7000"), b"ping");
        assert_eq!(request, expected);

        let mut reply = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), nat, b"pong");
        assert_eq!(relay.relay_whole_frame(2, IfaceId(1), &mut reply), Verdict::Forward(IfaceId(0)));
        let expected = udp_frame(RELAY_CLIENT_SIDE, CLIENT_MAC, addr("10.0.0.1:5000"), addr("10.0.0.2:40000"), b"pong");
        assert_eq!(reply, expected);
        assert_eq!(counters.sessions_created.get(), 1);
        assert_eq!(counters.total_drops(), 0);
    }

    #[test]
    fn round_trip_ipv6_wildcard_listen() {
        let (mut relay, _) = two_arm_relay("[::]:5000", "[fd01::2]:7000", "fd01::1");
        let mut request =
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("[fd00::2]:40000"), addr("[fd00::1]:5000"), b"ping6");
        assert_eq!(relay.relay_whole_frame(1, IfaceId(0), &mut request), Verdict::Forward(IfaceId(1)));
        let mut reply =
            udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("[fd01::2]:7000"), source_of(&request), b"pong6");
        assert_eq!(relay.relay_whole_frame(2, IfaceId(1), &mut reply), Verdict::Forward(IfaceId(0)));
        let expected =
            udp_frame(RELAY_CLIENT_SIDE, CLIENT_MAC, addr("[fd00::1]:5000"), addr("[fd00::2]:40000"), b"pong6");
        assert_eq!(reply, expected, "the reply comes from the exact address the client used");
    }

    #[test]
    fn many_clients_each_get_their_own_replies() {
        let (mut relay, _) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let mut nat_port_of = Vec::new();
        for port in 1000..1500u16 {
            let mut request = udp_frame(
                CLIENT_MAC,
                RELAY_CLIENT_SIDE,
                SocketAddr::new("10.0.0.2".parse().expect("ip"), port),
                addr("10.0.0.1:5000"),
                &port.to_be_bytes(),
            );
            assert_eq!(relay.relay_whole_frame(1, IfaceId(0), &mut request), Verdict::Forward(IfaceId(1)));
            let view = UdpFrame::new_checked(&request[..]).expect("valid");
            nat_port_of.push((port, view.src().port()));
        }
        for (client_port, nat_port) in nat_port_of.into_iter().rev() {
            let mut reply = udp_frame(
                UPSTREAM_MAC,
                RELAY_UPSTREAM_SIDE,
                addr("10.1.0.2:7000"),
                SocketAddr::new("10.1.0.1".parse().expect("ip"), nat_port),
                b"r",
            );
            assert_eq!(relay.relay_whole_frame(2, IfaceId(1), &mut reply), Verdict::Forward(IfaceId(0)));
            assert_eq!(UdpFrame::new_checked(&reply[..]).expect("valid").dst().port(), client_port);
        }
        assert_eq!(relay.session_count(), 500);
    }

    #[test]
    fn replies_are_refused_from_strangers_and_after_expiry() {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let mut request = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), b"x");
        relay.relay_whole_frame(0, IfaceId(0), &mut request);
        let nat = source_of(&request);

        let mut stranger = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.66:7000"), nat, b"evil");
        assert_eq!(
            relay.relay_whole_frame(1, IfaceId(1), &mut stranger),
            Verdict::Drop(DropReason::UnexpectedReplySource)
        );
        let other_port = SocketAddr::new(nat.ip(), if nat.port() == 20000 { 20001 } else { 20000 });
        let mut unknown_port = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), other_port, b"?");
        assert_eq!(relay.relay_whole_frame(1, IfaceId(1), &mut unknown_port), Verdict::Drop(DropReason::NoSession));

        relay.expire(30_000, usize::MAX, |_| {});
        assert_eq!(relay.session_count(), 0);
        let mut late = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), nat, b"late");
        assert_eq!(relay.relay_whole_frame(30_001, IfaceId(1), &mut late), Verdict::Drop(DropReason::NoSession));
        assert_eq!(counters.sessions_expired.get(), 1);
        assert_eq!(counters.dropped(DropReason::NoSession), 2);
        assert_eq!(counters.dropped(DropReason::UnexpectedReplySource), 1);
    }

    #[test]
    fn an_upstream_without_a_next_hop_is_counted_by_why_and_reported_once() {
        for (why, reason, other) in [
            (NoHop::NeighborUnresolved, DropReason::NeighborUnresolved, DropReason::NoRoute),
            (NoHop::NoRoute, DropReason::NoRoute, DropReason::NeighborUnresolved),
        ] {
            let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
            relay.set_next_hop(UpstreamId(0), Err(why));
            for _ in 0..3 {
                let mut request =
                    udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), b"x");
                assert_eq!(relay.relay_whole_frame(0, IfaceId(0), &mut request), Verdict::Drop(reason));
            }
            assert_eq!(relay.take_unresolved().collect::<Vec<_>>(), vec![UpstreamId(0)]);
            assert_eq!(relay.take_unresolved().count(), 0);
            assert_eq!(counters.dropped(reason), 3);
            assert_eq!(counters.dropped(other), 0);
        }
    }

    #[test]
    fn an_established_client_keeps_its_session_through_a_flood_of_new_flows() {
        let spec = RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:7000")]);
        let (mut relay, counters) = relay_with(spec, "10.1.0.1", |s| {
            s.nat_ports = (20000, 20099);
            s.directory = Arc::new(NatDirectory::new((20000, 20099), 9));
            s.timeouts = Timeouts { idle: 120_000, unreplied: 30_000 };
        });
        let exchange = |relay: &mut Relay, now: Millis, client: SocketAddr| {
            let mut request = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, client, addr("10.0.0.1:5000"), b"q");
            relay.relay_whole_frame(now, IfaceId(0), &mut request);
            let nat = source_of(&request);
            let mut reply = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), nat, b"r");
            (nat, relay.relay_whole_frame(now, IfaceId(1), &mut reply))
        };
        let settled = addr("10.0.0.2:41000");
        let (nat, _) = exchange(&mut relay, 0, settled);
        exchange(&mut relay, 2_300, settled);
        // 5,000 spoofed flows that the upstream answers once each (an echo answers anything).
        for i in 0..5_000u32 {
            let spoofed = SocketAddr::new(IpAddr::from((0x0a80_0000 + i % 100).to_be_bytes()), 1024 + (i / 100) as u16);
            exchange(&mut relay, 2_400 + u64::from(i / 10), spoofed);
            relay.expire(2_400 + u64::from(i / 10), 4, |_| {});
        }
        assert!(counters.sessions_evicted.get() > 4_000, "{}", counters.sessions_evicted.get());
        let (again, verdict) = exchange(&mut relay, 3_000, settled);
        assert_eq!((again, verdict), (nat, Verdict::Forward(IfaceId(0))), "same NAT port, reply delivered");
    }

    #[test]
    fn frames_not_for_this_interface_or_from_the_relay_itself_create_no_session() {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        for dst_mac in [[0xff; 6], [0x01, 0x00, 0x5e, 0, 0, 1], [2, 0, 0, 0, 0, 0x77], RELAY_UPSTREAM_SIDE] {
            let mut flooded = udp_frame(CLIENT_MAC, dst_mac, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), b"x");
            assert_eq!(
                relay.relay_whole_frame(0, IfaceId(0), &mut flooded),
                Verdict::Drop(DropReason::ForeignDestinationMac)
            );
        }
        for own in ["10.0.0.1:6000", "10.1.0.1:6000"] {
            let mut spoofed = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr(own), addr("10.0.0.1:5000"), b"x");
            assert_eq!(
                relay.relay_whole_frame(0, IfaceId(0), &mut spoofed),
                Verdict::Drop(DropReason::OwnSourceAddress)
            );
        }
        assert_eq!(counters.sessions_created.get(), 0);
        assert_eq!(counters.dropped(DropReason::ForeignDestinationMac), 4);
        assert_eq!(counters.dropped(DropReason::OwnSourceAddress), 2);
    }

    #[test]
    fn bad_checksum_and_unrouted_traffic_are_dropped_by_reason() {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let mut corrupt =
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), b"abcd");
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert_eq!(relay.relay_whole_frame(0, IfaceId(0), &mut corrupt), Verdict::Drop(DropReason::BadChecksum));
        let mut other_port =
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5001"), b"abcd");
        assert_eq!(relay.relay_whole_frame(0, IfaceId(0), &mut other_port), Verdict::Drop(DropReason::NoRoute));
        let mut runt = vec![0u8; 10];
        assert_eq!(relay.relay_whole_frame(0, IfaceId(0), &mut runt), Verdict::Drop(DropReason::TooShort));
        assert_eq!(counters.total_drops(), 3);
    }

    fn client_frame(port: u16) -> Vec<u8> {
        udp_frame(
            CLIENT_MAC,
            RELAY_CLIENT_SIDE,
            SocketAddr::new("10.0.0.2".parse().expect("ip"), port),
            addr("10.0.0.1:5000"),
            b"x",
        )
    }

    #[test]
    fn per_session_limit_drops_excess_without_touching_other_sessions() {
        let spec = RouteSpec {
            per_session: Limit { packets_per_second: Some(50), bytes_per_second: None },
            ..RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:7000")])
        };
        let (mut relay, counters) = relay_with(spec, "10.1.0.1", |_| {});
        let forwarded = (0..100)
            .filter(|_| matches!(relay.relay_whole_frame(0, IfaceId(0), &mut client_frame(1000)), Verdict::Forward(_)))
            .count();
        assert_eq!(forwarded, 10, "a 200 ms burst at 50 pps");
        assert_eq!(counters.dropped(DropReason::RateLimitedSession), 90);
        assert!(
            matches!(relay.relay_whole_frame(0, IfaceId(0), &mut client_frame(1001)), Verdict::Forward(_)),
            "another session is unaffected"
        );
        assert!(
            matches!(relay.relay_whole_frame(100, IfaceId(0), &mut client_frame(1000)), Verdict::Forward(_)),
            "tokens come back with time"
        );
    }

    #[test]
    fn per_source_limit_covers_all_ports_of_a_source() {
        let spec = RouteSpec {
            per_source: Limit { packets_per_second: Some(50), bytes_per_second: None },
            ..RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:7000")])
        };
        let (mut relay, counters) = relay_with(spec, "10.1.0.1", |_| {});
        let forwarded = (0..100u16)
            .filter(|p| {
                matches!(relay.relay_whole_frame(0, IfaceId(0), &mut client_frame(2000 + p)), Verdict::Forward(_))
            })
            .count();
        assert_eq!(forwarded, 10);
        assert_eq!(counters.dropped(DropReason::RateLimitedSource), 90);
        assert_eq!(relay.session_count(), 10, "refused packets create no sessions");
    }

    #[test]
    fn global_limit_and_source_session_cap() {
        let spec = RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:7000")]);
        let (mut relay, counters) = relay_with(spec, "10.1.0.1", |s| {
            s.global_limit = Limit { packets_per_second: Some(100), bytes_per_second: None };
            s.max_sessions_per_source = 3;
        });
        let verdicts: Vec<_> =
            (0..30u16).map(|p| relay.relay_whole_frame(0, IfaceId(0), &mut client_frame(3000 + p))).collect();
        assert_eq!(verdicts.iter().filter(|v| matches!(v, Verdict::Forward(_))).count(), 3);
        assert_eq!(counters.dropped(DropReason::SourceSessionLimit), 17, "the 20-packet global burst, less 3 sessions");
        assert_eq!(counters.dropped(DropReason::RateLimitedGlobal), 10);
        relay.expire(60_000, usize::MAX, |_| {});
        assert!(
            matches!(relay.relay_whole_frame(60_000, IfaceId(0), &mut client_frame(4000)), Verdict::Forward(_)),
            "expiry frees the source's quota"
        );
    }

    #[test]
    fn a_full_size_datagram_that_an_oxtunnel_header_would_push_past_the_mtu_is_refused_with_icmp() {
        use crate::oxtunnel::TunnelKey;
        let spec = RouteSpec {
            upstream_key: Some(TunnelKey::from_bytes([9; 32])),
            ..RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:6000")])
        };
        let (mut edge, counters) = relay_with(spec, "10.1.0.1", |_| {});
        // Incompressible, 1472 bytes: a full 1500-byte IPv4 packet before the tunnel header.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let payload: Vec<u8> = (0..1472)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        let request = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), &payload);
        let mut buffer = request.clone();
        buffer.resize(2048, 0);
        let (verdict, _) = edge.relay_frame(1, IfaceId(0), &mut buffer, request.len());
        assert_eq!(verdict, Verdict::Forward(IfaceId(0)), "an ICMP error back to the client, not a lost datagram");
        assert_eq!(&buffer[34..36], &[3, 4]);
        let mtu = u16::from_be_bytes([buffer[40], buffer[41]]);
        assert!((1500 - 64..1500).contains(&mtu), "the MTU less the tunnel's overhead: {mtu}");
        assert_eq!(counters.dropped(DropReason::MtuExceeded), 1);
    }

    #[test]
    fn a_chain_of_two_relays_over_an_oxtunnel_hop() {
        use crate::oxtunnel::{self, TunnelKey};
        let key = TunnelKey::from_bytes([9; 32]);
        let edge_spec = RouteSpec {
            upstream_key: Some(key.clone()),
            ..RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:6000")])
        };
        let exit_spec = RouteSpec {
            listen_key: Some(key.clone()),
            ..RouteSpec::new(addr("10.1.0.2:6000"), vec![addr("10.2.0.2:7000")])
        };
        let (mut edge, edge_counters) = relay_with(edge_spec, "10.1.0.1", |_| {});
        let (mut exit, _) = relay_with(exit_spec, "10.2.0.1", |_| {});
        let payload = b"compress me ".repeat(40);
        let request = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), &payload);
        let mut buffer = request.clone();
        buffer.resize(2048, 0);
        let (verdict, len) = edge.relay_frame(1, IfaceId(0), &mut buffer, request.len());
        assert_eq!(verdict, Verdict::Forward(IfaceId(1)));
        assert!(len < request.len(), "the hop carries less: {len} < {}", request.len());
        assert!(UdpFrame::new_checked(&buffer[..len]).expect("valid").checksums_valid());
        assert!(edge_counters.tunnel_bytes_saved.get() > 0);

        // On the hop's link the exit relay's client side is the next hop.
        buffer[..6].copy_from_slice(&RELAY_CLIENT_SIDE);
        let (verdict, len) = exit.relay_frame(2, IfaceId(0), &mut buffer, len);
        assert_eq!(verdict, Verdict::Forward(IfaceId(1)));
        let plain = UdpFrame::new_checked(&buffer[..len]).expect("valid");
        assert_eq!(plain.payload(), &payload[..], "the exit relay forwards the original payload");
        assert_eq!(plain.dst(), addr("10.2.0.2:7000"));
        assert!(plain.checksums_valid());
        let exit_nat = plain.src();

        let reply = udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.2.0.2:7000"), exit_nat, b"pong");
        let mut buffer = reply.clone();
        buffer.resize(2048, 0);
        let (verdict, len) = exit.relay_frame(3, IfaceId(1), &mut buffer, reply.len());
        assert_eq!(verdict, Verdict::Forward(IfaceId(0)));
        assert_eq!(len, reply.len() + oxtunnel::OVERHEAD, "too short to compress: sealed plain");
        // The sealed reply reaches the edge relay's NAT port.
        buffer[..6].copy_from_slice(&RELAY_UPSTREAM_SIDE);
        let (verdict, len) = edge.relay_frame(4, IfaceId(1), &mut buffer, len);
        assert_eq!(verdict, Verdict::Forward(IfaceId(0)));
        let back = UdpFrame::new_checked(&buffer[..len]).expect("valid");
        assert_eq!((back.payload(), back.dst()), (&b"pong"[..], addr("10.0.0.2:40000")));
        assert!(back.checksums_valid());
    }

    #[test]
    fn a_tunnel_with_the_wrong_key_or_no_room_is_dropped_by_reason() {
        use crate::oxtunnel::TunnelKey;
        let exit_spec = RouteSpec {
            listen_key: Some(TunnelKey::from_bytes([1; 32])),
            ..RouteSpec::new(addr("10.1.0.2:6000"), vec![addr("10.2.0.2:7000")])
        };
        let (mut exit, counters) = relay_with(exit_spec, "10.2.0.1", |_| {});
        let mut forged =
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.1.0.1:20000"), addr("10.1.0.2:6000"), &[0x4f; 64]);
        assert_eq!(exit.relay_whole_frame(0, IfaceId(0), &mut forged), Verdict::Drop(DropReason::TunnelMalformed));
        let edge_spec = RouteSpec {
            upstream_key: Some(TunnelKey::from_bytes([2; 32])),
            ..RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:6000")])
        };
        let (mut edge, _) = relay_with(edge_spec, "10.1.0.1", |_| {});
        let mut sealed = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:1"), addr("10.0.0.1:5000"), &[7; 100]);
        let original = sealed.len();
        sealed.resize(2048, 0);
        let (_, len) = edge.relay_frame(0, IfaceId(0), &mut sealed, original);
        sealed[..6].copy_from_slice(&RELAY_CLIENT_SIDE);
        assert_eq!(exit.relay_frame(0, IfaceId(0), &mut sealed, len).0, Verdict::Drop(DropReason::TunnelAuthFailed));
        assert_eq!(counters.dropped(DropReason::TunnelAuthFailed), 1);
        let mut no_room =
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:2"), addr("10.0.0.1:5000"), &[7; 100]);
        assert_eq!(
            edge.relay_whole_frame(0, IfaceId(0), &mut no_room),
            Verdict::Drop(DropReason::TunnelMalformed),
            "no room to grow"
        );
    }
}
