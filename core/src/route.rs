//! Routes: a listen address maps to one or more upstreams; each client sticks
//! to one upstream by rendezvous hashing, so adding an upstream moves only the
//! clients it wins. A reload builds the [successor](RouteTable::successor) table,
//! which keeps every surviving route's and upstream's id, so live sessions (which
//! hold ids) stay valid; removed ones stay as withdrawn entries.

use core::net::SocketAddr;
use std::collections::HashMap;

use crate::health::HealthPolicy;
use crate::oxtunnel::TunnelKey;
use crate::prefix::IpNet;
use crate::proxy_protocol::ProxyHeader;
use crate::ratelimit::Limit;
use crate::time::Millis;

/// Index of a route in its [`RouteTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteId(pub u16);

/// Index of an upstream in [`RouteTable::upstreams`] (shared by every route that names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamId(pub u16);

/// One route as the table holds it.
#[derive(Debug, Clone)]
pub struct Route {
    pub listen: SocketAddr,
    /// Every upstream whose sessions the route serves.
    pub upstreams: Vec<UpstreamId>,
    /// The ones new sessions may choose: `upstreams` less the draining ones.
    pub accepting: Vec<UpstreamId>,
    /// Removed by a reload: its sessions are refused, nothing finds it.
    pub withdrawn: bool,
    pub health: HealthPolicy,
    pub probe: Option<Probe>,
    /// `proxy_protocol = "v2"`: which client datagrams carry the header.
    pub proxy_header: Option<ProxyHeader>,
    /// Empty means every client is allowed.
    pub allowed_clients: Vec<IpNet>,
    pub per_source: Limit,
    pub per_session: Limit,
    /// Clients reach this route through an OxTunnel hop with this key.
    pub listen_key: Option<TunnelKey>,
    /// The upstreams are relays reached through an OxTunnel hop with this key.
    pub upstream_key: Option<TunnelKey>,
}

/// All routes of one relay, looked up by the destination a client used.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
    upstreams: Vec<SocketAddr>,
    exact: HashMap<SocketAddr, RouteId, ahash::RandomState>,
    /// Routes listening on the unspecified address, keyed by (is_ipv6, port).
    wildcard: HashMap<(bool, u16), RouteId, ahash::RandomState>,
    hasher: ahash::RandomState,
}

/// An active health check: a datagram sent to each upstream of the route every `interval`;
/// an answer containing `expect` within `timeout` is a success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub send: Vec<u8>,
    pub expect: Vec<u8>,
    pub interval: Millis,
    pub timeout: Millis,
}

/// A route as configured: listen address, upstream addresses, allowed client prefixes.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub listen: SocketAddr,
    pub upstreams: Vec<SocketAddr>,
    /// Upstreams (of `upstreams`) that keep their sessions but get no new ones.
    pub draining: Vec<SocketAddr>,
    pub health: HealthPolicy,
    pub probe: Option<Probe>,
    pub proxy_header: Option<ProxyHeader>,
    pub allowed_clients: Vec<IpNet>,
    /// Rate each client address may send to this route.
    pub per_source: Limit,
    /// Rate each session of this route may send.
    pub per_session: Limit,
    /// `encap = "oxtunnel"`: the key file clients' relay shares with us (read by the binary).
    pub listen_key_file: Option<String>,
    pub listen_key: Option<TunnelKey>,
    /// `upstream_encap = "oxtunnel"`: the key file shared with the upstream relays.
    pub upstream_key_file: Option<String>,
    pub upstream_key: Option<TunnelKey>,
}

impl RouteSpec {
    /// A route with no access list and no rate limits.
    pub fn new(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> Self {
        RouteSpec {
            listen,
            upstreams,
            draining: Vec::new(),
            health: HealthPolicy::default(),
            probe: None,
            proxy_header: None,
            allowed_clients: Vec::new(),
            per_source: Limit::default(),
            per_session: Limit::default(),
            listen_key_file: None,
            listen_key: None,
            upstream_key_file: None,
            upstream_key: None,
        }
    }
}

impl RouteTable {
    /// Builds the table. Duplicate upstream addresses across routes share one [`UpstreamId`].
    /// Callers validate specs first (see `config`); a later duplicate listen address wins.
    pub fn new(specs: &[RouteSpec]) -> Self {
        // Fixed seeds: upstream choice must agree across workers and restarts.
        let hasher = ahash::RandomState::with_seeds(0x6f78, 0x6964, 0x6972, 0x6c79);
        let empty = RouteTable {
            routes: Vec::new(),
            upstreams: Vec::new(),
            exact: HashMap::with_hasher(hasher.clone()),
            wildcard: HashMap::with_hasher(hasher.clone()),
            hasher,
        };
        empty.successor(specs)
    }

    /// The table of a reloaded config: a route keeps its id when its listen
    /// address stays, an upstream keeps its id when its address stays; new ones
    /// get new ids; routes no longer configured are kept as withdrawn.
    pub fn successor(&self, specs: &[RouteSpec]) -> Self {
        let mut table = RouteTable {
            routes: self.routes.iter().map(|r| Route { withdrawn: true, ..r.clone() }).collect(),
            upstreams: self.upstreams.clone(),
            exact: HashMap::with_hasher(self.hasher.clone()),
            wildcard: HashMap::with_hasher(self.hasher.clone()),
            hasher: self.hasher.clone(),
        };
        for spec in specs {
            let upstreams: Vec<UpstreamId> = spec.upstreams.iter().map(|u| table.intern_upstream(*u)).collect();
            let accepting = spec
                .upstreams
                .iter()
                .zip(&upstreams)
                .filter(|(address, _)| !spec.draining.contains(address))
                .map(|(_, id)| *id)
                .collect();
            let route = Route {
                listen: spec.listen,
                upstreams,
                accepting,
                withdrawn: false,
                health: spec.health,
                probe: spec.probe.clone(),
                proxy_header: spec.proxy_header,
                allowed_clients: spec.allowed_clients.clone(),
                per_source: spec.per_source,
                per_session: spec.per_session,
                listen_key: spec.listen_key.clone(),
                upstream_key: spec.upstream_key.clone(),
            };
            let id = match table.routes.iter().position(|r| r.listen == spec.listen) {
                Some(index) => {
                    table.routes[index] = route;
                    RouteId(index as u16)
                }
                None => {
                    table.routes.push(route);
                    RouteId(table.routes.len() as u16 - 1)
                }
            };
            if spec.listen.ip().is_unspecified() {
                table.wildcard.insert((spec.listen.is_ipv6(), spec.listen.port()), id);
            } else {
                table.exact.insert(spec.listen, id);
            }
        }
        table
    }

    /// Whether a session of `route` on `upstream` is still served: neither was removed.
    #[inline]
    pub fn serves(&self, route: RouteId, upstream: UpstreamId) -> bool {
        let route = self.route(route);
        !route.withdrawn && route.upstreams.contains(&upstream)
    }

    /// The route whose listen address matches `dst` exactly, else a wildcard on its port.
    #[inline]
    pub fn lookup(&self, dst: SocketAddr) -> Option<RouteId> {
        self.exact.get(&dst).or_else(|| self.wildcard.get(&(dst.is_ipv6(), dst.port()))).copied()
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[usize::from(id.0)]
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    pub fn upstream(&self, id: UpstreamId) -> SocketAddr {
        self.upstreams[usize::from(id.0)]
    }

    /// Rendezvous (highest random weight) choice among the route's accepting upstreams
    /// for `client`, among the `healthy` ones while any is (so when one fails only its
    /// clients move); `None` when every upstream drains. Weights hash the upstream's
    /// address, so the choice holds whatever order the config lists them in.
    #[inline]
    pub fn choose_upstream(
        &self,
        route: RouteId,
        client: SocketAddr,
        healthy: impl Fn(UpstreamId) -> bool,
    ) -> Option<UpstreamId> {
        let weight = |candidate: &&UpstreamId| self.hasher.hash_one((client.ip(), self.upstream(**candidate)));
        let accepting = &self.route(route).accepting;
        accepting
            .iter()
            .filter(|&&id| healthy(id))
            .max_by_key(weight)
            .or_else(|| accepting.iter().max_by_key(weight))
            .copied()
    }

    /// Live routes (not withdrawn) with their ids.
    pub fn live_routes(&self) -> impl Iterator<Item = (RouteId, &Route)> {
        self.routes.iter().enumerate().filter(|(_, r)| !r.withdrawn).map(|(i, r)| (RouteId(i as u16), r))
    }

    /// The id of an upstream address, if the table has it.
    pub fn upstream_id(&self, address: SocketAddr) -> Option<UpstreamId> {
        self.upstreams.iter().position(|u| *u == address).map(|i| UpstreamId(i as u16))
    }

    fn intern_upstream(&mut self, upstream: SocketAddr) -> UpstreamId {
        let index = match self.upstreams.iter().position(|u| *u == upstream) {
            Some(index) => index,
            None => {
                self.upstreams.push(upstream);
                self.upstreams.len() - 1
            }
        };
        UpstreamId(index as u16)
    }
}

/// Whether `client` may use `route` under its allow list.
pub fn client_allowed(route: &Route, client: SocketAddr) -> bool {
    route.allowed_clients.is_empty() || route.allowed_clients.iter().any(|p| p.contains(&client.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn spec(listen: &str, upstreams: &[&str]) -> RouteSpec {
        RouteSpec::new(addr(listen), upstreams.iter().map(|u| addr(u)).collect())
    }

    #[test]
    fn exact_beats_wildcard_and_families_stay_apart() {
        let table = RouteTable::new(&[
            spec("0.0.0.0:5000", &["10.1.0.2:7"]),
            spec("10.0.0.1:5000", &["10.1.0.3:7"]),
            spec("[::]:5000", &["[fd01::2]:7"]),
        ]);
        assert_eq!(table.lookup(addr("10.0.0.1:5000")), Some(RouteId(1)));
        assert_eq!(table.lookup(addr("10.0.0.9:5000")), Some(RouteId(0)));
        assert_eq!(table.lookup(addr("[fd00::1]:5000")), Some(RouteId(2)));
        assert_eq!(table.lookup(addr("10.0.0.1:5001")), None);
    }

    #[test]
    fn shared_upstreams_are_interned() {
        let table =
            RouteTable::new(&[spec("10.0.0.1:1", &["10.1.0.2:7"]), spec("10.0.0.1:2", &["10.1.0.2:7", "10.1.0.3:7"])]);
        assert_eq!(table.upstreams().len(), 2);
        assert_eq!(table.route(RouteId(0)).upstreams[0], table.route(RouteId(1)).upstreams[0]);
    }

    #[test]
    fn choice_is_sticky_spread_and_stable_when_an_upstream_is_added() {
        let three = RouteTable::new(&[spec("10.0.0.1:1", &["10.1.0.2:7", "10.1.0.3:7", "10.1.0.4:7"])]);
        let four = RouteTable::new(&[spec("10.0.0.1:1", &["10.1.0.2:7", "10.1.0.3:7", "10.1.0.4:7", "10.1.0.5:7"])]);
        let mut per_upstream = [0usize; 3];
        let mut moved = 0;
        for i in 0..3000u32 {
            let client = SocketAddr::new(core::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 4000);
            let choice = three.choose_upstream(RouteId(0), client, |_| true).expect("an upstream");
            assert_eq!(Some(choice), three.choose_upstream(RouteId(0), client, |_| true), "sticky");
            per_upstream[usize::from(choice.0)] += 1;
            let after = four.choose_upstream(RouteId(0), client, |_| true).expect("an upstream");
            if after != choice {
                assert_eq!(after, UpstreamId(3), "a client only ever moves to the new upstream");
                moved += 1;
            }
        }
        assert!(per_upstream.iter().all(|&n| n > 800), "spread: {per_upstream:?}");
        assert!((500..1000).contains(&moved), "about a quarter move: {moved}");
    }

    #[test]
    fn a_reload_keeps_ids_withdraws_what_went_and_drains_without_moving_sessions() {
        let before =
            RouteTable::new(&[spec("10.0.0.1:1", &["10.1.0.2:7", "10.1.0.3:7"]), spec("10.0.0.1:2", &["10.1.0.4:7"])]);
        // Reordered, one route gone, one upstream added, one draining.
        let mut kept = spec("10.0.0.1:1", &["10.1.0.5:7", "10.1.0.3:7", "10.1.0.2:7"]);
        kept.draining = vec![addr("10.1.0.2:7")];
        let after = before.successor(&[spec("10.0.0.1:3", &["10.1.0.2:7"]), kept]);
        assert_eq!(after.lookup(addr("10.0.0.1:1")), Some(RouteId(0)), "a surviving route keeps its id");
        assert_eq!(after.lookup(addr("10.0.0.1:2")), None, "a removed route is not found");
        assert_eq!(after.lookup(addr("10.0.0.1:3")), Some(RouteId(2)), "a new route gets a new id");
        for (address, id) in [("10.1.0.2:7", 0), ("10.1.0.3:7", 1), ("10.1.0.4:7", 2), ("10.1.0.5:7", 3)] {
            assert_eq!(after.upstream(UpstreamId(id)), addr(address), "upstream ids never move");
        }
        assert!(after.serves(RouteId(0), UpstreamId(0)), "a draining upstream keeps its sessions");
        assert!(!after.serves(RouteId(1), UpstreamId(2)), "the removed route's sessions are withdrawn");
        for i in 0..200u32 {
            let client = SocketAddr::new(core::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 4000);
            assert_ne!(
                after.choose_upstream(RouteId(0), client, |_| true),
                Some(UpstreamId(0)),
                "draining gets no new sessions"
            );
            let old = before.choose_upstream(RouteId(0), client, |_| true).expect("an upstream");
            let new = after.choose_upstream(RouteId(0), client, |_| true).expect("an upstream");
            assert!(old == new || old == UpstreamId(0) || new == UpstreamId(3), "only drained or won clients move");
        }
        let mut all_draining = spec("10.0.0.1:1", &["10.1.0.2:7"]);
        all_draining.draining = vec![addr("10.1.0.2:7")];
        assert_eq!(RouteTable::new(&[all_draining]).choose_upstream(RouteId(0), addr("10.0.0.9:1"), |_| true), None);
    }

    #[test]
    fn a_failed_upstream_moves_only_its_own_clients() {
        let table = RouteTable::new(&[spec("10.0.0.1:1", &["10.1.0.2:7", "10.1.0.3:7", "10.1.0.4:7"])]);
        for i in 0..1000u32 {
            let client = SocketAddr::new(core::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 4000);
            let before = table.choose_upstream(RouteId(0), client, |_| true);
            let after = table.choose_upstream(RouteId(0), client, |id| id != UpstreamId(1));
            assert_ne!(after, Some(UpstreamId(1)), "nobody is sent to the failed upstream");
            if before != Some(UpstreamId(1)) {
                assert_eq!(before, after, "clients of healthy upstreams stay");
            }
        }
        let client = addr("10.0.0.9:1");
        assert!(table.choose_upstream(RouteId(0), client, |_| false).is_some(), "all down: still somewhere to try");
    }

    #[test]
    fn allow_list() {
        let mut route = RouteTable::new(&[spec("10.0.0.1:1", &["10.1.0.2:7"])]).route(RouteId(0)).clone();
        assert!(client_allowed(&route, addr("203.0.113.1:5")));
        route.allowed_clients = vec![crate::prefix::parse_prefix("10.9.0.0/16").expect("prefix")];
        assert!(client_allowed(&route, addr("10.9.3.3:5")));
        assert!(!client_allowed(&route, addr("10.8.3.3:5")));
    }
}
