//! Keeps every upstream's next hop current from the kernel's routing and
//! neighbour tables (or the config's static neighbours), on the control thread.

use std::net::{IpAddr, SocketAddr};

use oxidize_relay_core::config::StaticNeighbor;
use oxidize_relay_core::route::UpstreamId;
use oxidize_relay_core::{IfaceId, NextHop, NoHop};

use std::sync::Arc;

use crate::sys::iface::IfaceInfo;
use crate::sys::netlink::{self, NetlinkError, RouteSocket};

/// Why an upstream has no next hop right now (logged when it changes).
#[derive(Debug, Clone)]
enum Unreachable {
    NoRoute(Arc<NetlinkError>),
    ForeignInterface(u32),
    NoSourceAddress,
    NeighborPending(IpAddr),
}

/// Equal when the reason is the same: a route lookup failing again with another errno is no news.
impl PartialEq for Unreachable {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Unreachable::NoRoute(_), Unreachable::NoRoute(_))
            | (Unreachable::NoSourceAddress, Unreachable::NoSourceAddress) => true,
            (Unreachable::ForeignInterface(a), Unreachable::ForeignInterface(b)) => a == b,
            (Unreachable::NeighborPending(a), Unreachable::NeighborPending(b)) => a == b,
            _ => false,
        }
    }
}

impl Unreachable {
    /// What the workers count packets for this upstream as.
    fn no_hop(&self) -> NoHop {
        match self {
            Unreachable::NeighborPending(_) => NoHop::NeighborUnresolved,
            Unreachable::NoRoute(_) | Unreachable::ForeignInterface(_) | Unreachable::NoSourceAddress => NoHop::NoRoute,
        }
    }
}

/// Resolves the upstreams' next hops and reports changes.
#[derive(Debug)]
pub struct NextHopResolver {
    socket: RouteSocket,
    /// AF_XDP writes Ethernet headers itself and needs the neighbour's MAC;
    /// the socket backend lets the kernel route and needs only the source address.
    link_layer: bool,
    interfaces: Vec<IfaceInfo>,
    statics: Vec<StaticNeighbor>,
    upstreams: Vec<SocketAddr>,
    current: Vec<Result<NextHop, Unreachable>>,
    /// Each upstream's neighbour as the kernel last confirmed it, kept while the kernel re-resolves it.
    last_confirmed: Vec<Option<Confirmed>>,
}

/// A neighbour the kernel once resolved, and whether it has stopped answering since.
#[derive(Debug, Clone, Copy)]
struct Confirmed {
    neighbor: IpAddr,
    hop: NextHop,
    unanswered: bool,
}

impl NextHopResolver {
    /// A resolver for the AF_XDP backend (`interfaces` are the ones it serves),
    /// or, with `interfaces` empty, a routing-only one for the socket backend.
    pub fn new(
        socket: RouteSocket,
        interfaces: Vec<IfaceInfo>,
        statics: Vec<StaticNeighbor>,
        upstreams: Vec<SocketAddr>,
    ) -> Self {
        let current = upstreams.iter().map(|u| Err(Unreachable::NeighborPending(u.ip()))).collect();
        let last_confirmed = vec![None; upstreams.len()];
        NextHopResolver {
            socket,
            link_layer: !interfaces.is_empty(),
            interfaces,
            statics,
            upstreams,
            current,
            last_confirmed,
        }
    }

    /// A reload's upstream list: the old ones keep their ids (and state), new ones start unresolved.
    pub fn set_upstreams(&mut self, upstreams: &[SocketAddr]) {
        for &upstream in &upstreams[self.upstreams.len().min(upstreams.len())..] {
            self.current.push(Err(Unreachable::NeighborPending(upstream.ip())));
            self.last_confirmed.push(None);
        }
        self.upstreams = upstreams.to_vec();
    }

    /// Re-resolves every upstream; returns those whose next hop changed.
    pub fn refresh(&mut self) -> Vec<(UpstreamId, Result<NextHop, NoHop>)> {
        let mut changes = Vec::new();
        for index in 0..self.upstreams.len() {
            let upstream = self.upstreams[index];
            let resolved = self.resolve(index, upstream.ip());
            if resolved == self.current[index] {
                continue;
            }
            match &resolved {
                Ok(hop) if !self.link_layer => {
                    tracing::info!(%upstream, source = %hop.src_ip, "upstream route resolved")
                }
                Ok(hop) => {
                    tracing::info!(%upstream, iface = %self.interfaces[usize::from(hop.iface.0)].name, source = %hop.src_ip, mac = %format_mac(&hop.dst_mac), "upstream next hop resolved")
                }
                Err(Unreachable::NeighborPending(ip)) => {
                    tracing::warn!(%upstream, neighbor = %ip, "neighbour not resolved yet; resolution requested, packets for it are counted as neighbor_unresolved")
                }
                Err(Unreachable::NoRoute(error)) => {
                    tracing::warn!(%upstream, error = &**error as &dyn std::error::Error, "no route to upstream")
                }
                Err(Unreachable::ForeignInterface(ifindex)) => {
                    tracing::warn!(%upstream, ifindex, "upstream is routed through an interface the relay does not serve")
                }
                Err(Unreachable::NoSourceAddress) => {
                    tracing::warn!(%upstream, "route to upstream has no preferred source address")
                }
            }
            crate::metrics::neighbor_resolution(if resolved.is_ok() { "resolved" } else { "pending" });
            let hop = resolved.as_ref().copied().map_err(Unreachable::no_hop);
            self.current[index] = resolved;
            changes.push((UpstreamId(index as u16), hop));
        }
        changes
    }

    /// Whether every upstream currently has a next hop.
    pub fn all_resolved(&self) -> bool {
        self.current.iter().all(Result::is_ok)
    }

    fn resolve(&mut self, index: usize, upstream: IpAddr) -> Result<NextHop, Unreachable> {
        let route = self.socket.route_to(upstream).map_err(|e| Unreachable::NoRoute(Arc::new(e)))?;
        if !self.link_layer {
            let src_ip = route.preferred_source.ok_or(Unreachable::NoSourceAddress)?;
            return Ok(NextHop { iface: IfaceId(0), src_ip, dst_mac: [0; 6] });
        }
        let iface = self
            .interfaces
            .iter()
            .position(|i| i.index == route.ifindex)
            .ok_or(Unreachable::ForeignInterface(route.ifindex))?;
        let src_ip = route.preferred_source.ok_or(Unreachable::NoSourceAddress)?;
        let hop = |dst_mac| NextHop { iface: IfaceId(iface as u8), src_ip, dst_mac };
        if let Some(pinned) = self.statics.iter().find(|s| s.ip == route.next_hop) {
            return Ok(hop(pinned.mac));
        }
        match self.socket.neighbor(route.ifindex, route.next_hop) {
            Ok(Some(neighbor)) => {
                // The relay's traffic bypasses the kernel, which therefore never re-probes a STALE
                // entry: a host that came back with a new MAC would be black-holed for good. Kernel
                // traffic toward it starts the kernel's confirmation (DELAY, PROBE); a MAC that no
                // longer answers fails and is then resolved afresh.
                if neighbor.stale {
                    nudge(route.next_hop);
                }
                if self.last_confirmed[index].is_some_and(|c| c.unanswered) {
                    tracing::info!(neighbor = %route.next_hop, mac = %format_mac(&neighbor.mac), "neighbour confirmed again");
                }
                let hop = hop(neighbor.mac);
                self.last_confirmed[index] = Some(Confirmed { neighbor: route.next_hop, hop, unanswered: false });
                Ok(hop)
            }
            Ok(None) | Err(_) => {
                nudge(route.next_hop);
                self.last_known(index, route.next_hop, iface, src_ip)
            }
        }
    }

    /// The kernel has no usable entry for `neighbor`. A neighbour that stops answering ARP/ND is far
    /// more often still there than gone (a flood on the link can starve the probes for seconds): keep
    /// sending to the MAC it last had, on the same route, while the kernel re-resolves it; a new MAC
    /// replaces it as soon as the kernel learns one. A neighbour never resolved stays pending.
    fn last_known(
        &mut self,
        index: usize,
        neighbor: IpAddr,
        iface: usize,
        src_ip: IpAddr,
    ) -> Result<NextHop, Unreachable> {
        let Some(known) = self.last_confirmed[index]
            .as_mut()
            .filter(|c| c.neighbor == neighbor && usize::from(c.hop.iface.0) == iface && c.hop.src_ip == src_ip)
        else {
            return Err(Unreachable::NeighborPending(neighbor));
        };
        if !known.unanswered {
            known.unanswered = true;
            tracing::warn!(%neighbor, mac = %format_mac(&known.hop.dst_mac), "neighbour no longer confirmed by the kernel; still sending to its last MAC while it re-resolves");
        }
        Ok(known.hop)
    }
}

/// Sends kernel traffic toward `neighbor`, so the kernel resolves or re-confirms it.
fn nudge(neighbor: IpAddr) {
    if let Err(error) = netlink::nudge_neighbor(neighbor) {
        tracing::debug!(%neighbor, %error, "neighbour resolution nudge failed");
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
