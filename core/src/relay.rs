//! The hot path: one frame in, one decision out. No syscalls, no clock reads,
//! no allocation after construction.

use core::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::counters::Counters;
use crate::drop_reason::DropReason;
use crate::route::{self, RouteTable, UpstreamId};
use crate::session::{AdmitError, FlowKey, IfaceId, Session, SessionTable};
use crate::time::Millis;
use crate::wire::{MacAddr, Rewrite, UdpFrame};

/// What to do with a frame after [`Relay::handle`] rewrote it.
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

/// Per-worker relay settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// MAC address of each of the worker's interfaces, indexed by [`IfaceId`].
    pub iface_macs: Vec<MacAddr>,
    /// This worker's NAT port range, inclusive.
    pub nat_ports: (u16, u16),
    pub max_sessions: usize,
    pub idle_timeout: Millis,
    pub verify_checksums: bool,
}

/// One worker's relay state: routes, its session shard and next hops.
#[derive(Debug)]
pub struct Relay {
    routes: Arc<RouteTable>,
    sessions: SessionTable,
    next_hops: Vec<Option<NextHop>>,
    /// Upstreams whose next hop was missing when a packet needed it; the
    /// worker drains this to ask the control thread for resolution.
    unresolved: Vec<bool>,
    iface_macs: Vec<MacAddr>,
    verify_checksums: bool,
    counters: Arc<Counters>,
}

impl Relay {
    pub fn new(routes: Arc<RouteTable>, settings: RelaySettings, counters: Arc<Counters>) -> Self {
        let upstreams = routes.upstreams().len();
        Relay {
            sessions: SessionTable::new(settings.nat_ports, settings.max_sessions, settings.idle_timeout),
            next_hops: vec![None; upstreams],
            unresolved: vec![false; upstreams],
            routes,
            iface_macs: settings.iface_macs,
            verify_checksums: settings.verify_checksums,
            counters,
        }
    }

    /// Parses, validates and rewrites `frame` in place. On `Drop` the reason is already counted.
    #[inline]
    pub fn handle(&mut self, now: Millis, ingress: IfaceId, frame: &mut [u8]) -> Verdict {
        let verdict = match UdpFrame::new_checked(frame) {
            Ok(mut packet) => self.relay(now, ingress, &mut packet),
            Err(reason) => Verdict::Drop(reason),
        };
        if let Verdict::Drop(reason) = verdict {
            self.counters.count_drop(reason);
        }
        verdict
    }

    /// Installs or clears the next hop of `upstream`.
    pub fn set_next_hop(&mut self, upstream: UpstreamId, hop: Option<NextHop>) {
        if let Some(slot) = self.next_hops.get_mut(usize::from(upstream.0)) {
            *slot = hop;
        }
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
    pub fn expire(&mut self, now: Millis, budget: usize, on_expired: impl FnMut(&Session)) {
        let expired = self.sessions.expire(now, budget, on_expired);
        if expired > 0 {
            self.counters.sessions_expired.add(expired as u64);
            self.counters.sessions_active.set(self.sessions.len() as u64);
        }
    }

    /// The session of a client datagram to `listen`, created on first sight.
    /// Drops are counted. Used directly by the socket backend.
    pub fn client_session(
        &mut self,
        now: Millis,
        ingress: IfaceId,
        client: SocketAddr,
        listen: SocketAddr,
        client_mac: MacAddr,
    ) -> Result<Session, DropReason> {
        let result = self.find_or_admit(now, ingress, FlowKey { client, listen }, client_mac);
        self.count_error(result)
    }

    /// The session a datagram from `from` to NAT address `to` answers. Drops are counted.
    pub fn reply_session(&mut self, now: Millis, from: SocketAddr, to: SocketAddr) -> Result<Session, DropReason> {
        let result = self.find_reply(now, from, to);
        self.count_error(result)
    }

    /// Whether `port` is one of this relay's NAT ports.
    pub fn is_nat_port(&self, port: u16) -> bool {
        self.sessions.owns_port(port)
    }

    /// The current next hop toward `upstream`, if resolved.
    pub fn next_hop(&self, upstream: UpstreamId) -> Option<NextHop> {
        self.next_hops.get(usize::from(upstream.0)).copied().flatten()
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    fn count_error(&self, result: Result<Session, DropReason>) -> Result<Session, DropReason> {
        if let Err(reason) = result {
            self.counters.count_drop(reason);
        }
        result
    }

    fn relay(&mut self, now: Millis, ingress: IfaceId, packet: &mut UdpFrame<&mut [u8]>) -> Verdict {
        if self.verify_checksums && !packet.checksums_valid() {
            return Verdict::Drop(DropReason::BadChecksum);
        }
        let (src, dst) = (packet.src(), packet.dst());
        // Config keeps listen ports out of the NAT range, so the port alone tells the direction.
        if self.sessions.owns_port(dst.port()) {
            let session = match self.find_reply(now, src, dst) {
                Ok(session) => session,
                Err(reason) => return Verdict::Drop(reason),
            };
            let to = Rewrite {
                src_mac: self.iface_macs[usize::from(session.client_iface.0)],
                dst_mac: session.client_mac,
                src: session.flow.listen,
                dst: session.flow.client,
            };
            return forward_rewritten(packet, &to, session.client_iface);
        }
        let session = match self.find_or_admit(now, ingress, FlowKey { client: src, listen: dst }, packet.src_mac()) {
            Ok(session) => session,
            Err(reason) => return Verdict::Drop(reason),
        };
        let Some(hop) = self.resolved_hop(session.upstream) else {
            return Verdict::Drop(DropReason::NeighborUnresolved);
        };
        let to = Rewrite {
            src_mac: self.iface_macs[usize::from(hop.iface.0)],
            dst_mac: hop.dst_mac,
            src: SocketAddr::new(session.nat_ip, session.nat_port),
            dst: self.routes.upstream(session.upstream),
        };
        forward_rewritten(packet, &to, hop.iface)
    }

    fn find_reply(&mut self, now: Millis, from: SocketAddr, to: SocketAddr) -> Result<Session, DropReason> {
        let session = self.sessions.by_port_mut(to.port()).ok_or(DropReason::NoSession)?;
        if session.nat_ip != to.ip() || self.routes.upstream(session.upstream) != from {
            return Err(DropReason::UnexpectedReplySource);
        }
        session.last_seen = now;
        Ok(*session)
    }

    fn find_or_admit(
        &mut self,
        now: Millis,
        ingress: IfaceId,
        flow: FlowKey,
        client_mac: MacAddr,
    ) -> Result<Session, DropReason> {
        if let Some(session) = self.sessions.touch_flow(&flow, now) {
            return Ok(*session);
        }
        let route_id = self.routes.lookup(flow.listen).ok_or(DropReason::NoRoute)?;
        if !route::client_allowed(self.routes.route(route_id), flow.client) {
            return Err(DropReason::ClientNotAllowed);
        }
        let upstream = self.routes.choose_upstream(route_id, flow.client);
        // The NAT address must be known before the session exists: it is what the upstream replies to.
        let hop = self.resolved_hop(upstream).ok_or(DropReason::NeighborUnresolved)?;
        let template = Session {
            flow,
            route: route_id,
            upstream,
            nat_ip: hop.src_ip,
            nat_port: 0,
            client_iface: ingress,
            client_mac,
            last_seen: now,
        };
        let session = *self.sessions.admit(template).map_err(|e| match e {
            AdmitError::TableFull => DropReason::SessionTableFull,
            AdmitError::PortsExhausted => DropReason::NatPortsExhausted,
        })?;
        self.counters.sessions_created.add(1);
        self.counters.sessions_active.set(self.sessions.len() as u64);
        Ok(session)
    }

    /// The next hop of `upstream`; when missing, flags it for the control thread.
    fn resolved_hop(&mut self, upstream: UpstreamId) -> Option<NextHop> {
        let hop = self.next_hops[usize::from(upstream.0)];
        if hop.is_none() {
            self.unresolved[usize::from(upstream.0)] = true;
        }
        hop
    }
}

fn forward_rewritten(packet: &mut UdpFrame<&mut [u8]>, to: &Rewrite, iface: IfaceId) -> Verdict {
    if packet.rewrite(to) {
        Verdict::Forward(iface)
    } else {
        // Config validation keeps listen and upstream families equal; this guards the invariant.
        Verdict::Drop(DropReason::NoRoute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::RouteSpec;
    use crate::wire::build::udp_frame;

    const CLIENT_MAC: MacAddr = [2, 0, 0, 0, 0, 0xc1];
    const RELAY_CLIENT_SIDE: MacAddr = [2, 0, 0, 0, 0, 0xa1];
    const RELAY_UPSTREAM_SIDE: MacAddr = [2, 0, 0, 0, 0, 0xa2];
    const UPSTREAM_MAC: MacAddr = [2, 0, 0, 0, 0, 0xd1];

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn two_arm_relay(listen: &str, upstream: &str, nat_ip: &str) -> (Relay, Arc<Counters>) {
        let routes = Arc::new(RouteTable::new(&[RouteSpec {
            listen: addr(listen),
            upstreams: vec![addr(upstream)],
            allowed_clients: vec![],
        }]));
        let counters = Arc::new(Counters::default());
        let settings = RelaySettings {
            iface_macs: vec![RELAY_CLIENT_SIDE, RELAY_UPSTREAM_SIDE],
            nat_ports: (20000, 20999),
            max_sessions: 1000,
            idle_timeout: 30_000,
            verify_checksums: true,
        };
        let mut relay = Relay::new(routes, settings, counters.clone());
        relay.set_next_hop(
            UpstreamId(0),
            Some(NextHop { iface: IfaceId(1), src_ip: nat_ip.parse().expect("ip"), dst_mac: UPSTREAM_MAC }),
        );
        (relay, counters)
    }

    #[test]
    fn round_trip_ipv4_two_arm() {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let mut request =
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), b"ping");
        assert_eq!(relay.handle(1, IfaceId(0), &mut request), Verdict::Forward(IfaceId(1)));
        let expected =
            udp_frame(RELAY_UPSTREAM_SIDE, UPSTREAM_MAC, addr("10.1.0.1:20000"), addr("10.1.0.2:7000"), b"ping");
        assert_eq!(request, expected);

        let mut reply =
            udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), addr("10.1.0.1:20000"), b"pong");
        assert_eq!(relay.handle(2, IfaceId(1), &mut reply), Verdict::Forward(IfaceId(0)));
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
        assert_eq!(relay.handle(1, IfaceId(0), &mut request), Verdict::Forward(IfaceId(1)));
        let mut reply =
            udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("[fd01::2]:7000"), addr("[fd01::1]:20000"), b"pong6");
        assert_eq!(relay.handle(2, IfaceId(1), &mut reply), Verdict::Forward(IfaceId(0)));
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
            assert_eq!(relay.handle(1, IfaceId(0), &mut request), Verdict::Forward(IfaceId(1)));
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
            assert_eq!(relay.handle(2, IfaceId(1), &mut reply), Verdict::Forward(IfaceId(0)));
            assert_eq!(UdpFrame::new_checked(&reply[..]).expect("valid").dst().port(), client_port);
        }
        assert_eq!(relay.session_count(), 500);
    }

    #[test]
    fn replies_are_refused_from_strangers_and_after_expiry() {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let mut request = udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), b"x");
        relay.handle(0, IfaceId(0), &mut request);

        let mut stranger =
            udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.66:7000"), addr("10.1.0.1:20000"), b"evil");
        assert_eq!(relay.handle(1, IfaceId(1), &mut stranger), Verdict::Drop(DropReason::UnexpectedReplySource));
        let mut unknown_port =
            udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), addr("10.1.0.1:20001"), b"?");
        assert_eq!(relay.handle(1, IfaceId(1), &mut unknown_port), Verdict::Drop(DropReason::NoSession));

        relay.expire(30_000, usize::MAX, |_| {});
        assert_eq!(relay.session_count(), 0);
        let mut late =
            udp_frame(UPSTREAM_MAC, RELAY_UPSTREAM_SIDE, addr("10.1.0.2:7000"), addr("10.1.0.1:20000"), b"late");
        assert_eq!(relay.handle(30_001, IfaceId(1), &mut late), Verdict::Drop(DropReason::NoSession));
        assert_eq!(counters.sessions_expired.get(), 1);
        assert_eq!(counters.dropped(DropReason::NoSession), 2);
        assert_eq!(counters.dropped(DropReason::UnexpectedReplySource), 1);
    }

    #[test]
    fn unresolved_neighbour_is_counted_and_reported_once() {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        relay.set_next_hop(UpstreamId(0), None);
        for _ in 0..3 {
            let mut request =
                udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), b"x");
            assert_eq!(relay.handle(0, IfaceId(0), &mut request), Verdict::Drop(DropReason::NeighborUnresolved));
        }
        assert_eq!(relay.take_unresolved().collect::<Vec<_>>(), vec![UpstreamId(0)]);
        assert_eq!(relay.take_unresolved().count(), 0);
        assert_eq!(counters.dropped(DropReason::NeighborUnresolved), 3);
    }

    #[test]
    fn bad_checksum_and_unrouted_traffic_are_dropped_by_reason() {
        let (mut relay, counters) = two_arm_relay("10.0.0.1:5000", "10.1.0.2:7000", "10.1.0.1");
        let mut corrupt =
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), b"abcd");
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert_eq!(relay.handle(0, IfaceId(0), &mut corrupt), Verdict::Drop(DropReason::BadChecksum));
        let mut other_port =
            udp_frame(CLIENT_MAC, RELAY_CLIENT_SIDE, addr("10.0.0.2:40000"), addr("10.0.0.1:5001"), b"abcd");
        assert_eq!(relay.handle(0, IfaceId(0), &mut other_port), Verdict::Drop(DropReason::NoRoute));
        let mut runt = vec![0u8; 10];
        assert_eq!(relay.handle(0, IfaceId(0), &mut runt), Verdict::Drop(DropReason::TooShort));
        assert_eq!(counters.total_drops(), 3);
    }
}
