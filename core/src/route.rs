//! Routes: a listen address maps to one or more upstreams; each client sticks
//! to one upstream by rendezvous hashing, so adding an upstream moves only the
//! clients it wins.

use core::net::SocketAddr;
use std::collections::HashMap;

use crate::oxtunnel::TunnelKey;
use crate::prefix::IpNet;
use crate::ratelimit::Limit;

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
    pub upstreams: Vec<UpstreamId>,
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

/// A route as configured: listen address, upstream addresses, allowed client prefixes.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub listen: SocketAddr,
    pub upstreams: Vec<SocketAddr>,
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
        let mut table = RouteTable {
            routes: Vec::with_capacity(specs.len()),
            upstreams: Vec::new(),
            exact: HashMap::with_hasher(hasher.clone()),
            wildcard: HashMap::with_hasher(hasher.clone()),
            hasher,
        };
        for spec in specs {
            let upstreams = spec.upstreams.iter().map(|u| table.intern_upstream(*u)).collect();
            let id = RouteId(table.routes.len() as u16);
            table.routes.push(Route {
                listen: spec.listen,
                upstreams,
                allowed_clients: spec.allowed_clients.clone(),
                per_source: spec.per_source,
                per_session: spec.per_session,
                listen_key: spec.listen_key.clone(),
                upstream_key: spec.upstream_key.clone(),
            });
            if spec.listen.ip().is_unspecified() {
                table.wildcard.insert((spec.listen.is_ipv6(), spec.listen.port()), id);
            } else {
                table.exact.insert(spec.listen, id);
            }
        }
        table
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

    /// Rendezvous (highest random weight) choice of upstream for `client`.
    #[inline]
    pub fn choose_upstream(&self, route: RouteId, client: SocketAddr) -> UpstreamId {
        let candidates = &self.route(route).upstreams;
        let mut best = candidates[0];
        let mut best_weight = 0u64;
        for &candidate in candidates {
            let weight = self.hasher.hash_one((client.ip(), candidate.0));
            if weight >= best_weight {
                best = candidate;
                best_weight = weight;
            }
        }
        best
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
            let choice = three.choose_upstream(RouteId(0), client);
            assert_eq!(choice, three.choose_upstream(RouteId(0), client), "sticky");
            per_upstream[usize::from(choice.0)] += 1;
            let after = four.choose_upstream(RouteId(0), client);
            if after != choice {
                assert_eq!(after, UpstreamId(3), "a client only ever moves to the new upstream");
                moved += 1;
            }
        }
        assert!(per_upstream.iter().all(|&n| n > 800), "spread: {per_upstream:?}");
        assert!((500..1000).contains(&moved), "about a quarter move: {moved}");
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
