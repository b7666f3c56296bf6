//! Why a packet was not forwarded: one small `Copy` value per outcome, each a counter.

/// Every way the relay can decline a packet. The discriminant indexes the
/// per-worker drop counters, so the hot path never formats or allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// The frame ends before the header it claims to carry.
    TooShort,
    /// Not IPv4 or IPv6.
    InvalidEthertype,
    /// An 802.1Q or 802.1ad (QinQ) tagged frame: the relay serves untagged interfaces (run it on
    /// the VLAN interface, e.g. `eth0.100`, to relay a VLAN's traffic).
    VlanTagged,
    /// IPv4 version/IHL or IPv6 version field is wrong.
    BadIpHeader,
    /// IPv4 total length or IPv6 payload length disagrees with the frame.
    BadIpLength,
    /// IPv4 options are present; the relay does not forward them.
    IpOptions,
    /// An IPv6 extension header precedes UDP; the relay does not walk them.
    Ipv6ExtensionHeader,
    /// A fragment: the relay does not reassemble.
    Fragment,
    /// Not UDP.
    NotUdp,
    /// UDP length field is below 8 or beyond the IP payload.
    BadUdpLength,
    /// UDP or IPv4 header checksum is wrong (only checked when configured).
    BadChecksum,
    /// Source address is unspecified, broadcast, multicast, loopback or otherwise martian.
    MartianSource,
    /// TTL or hop limit is zero.
    TtlExpired,
    /// The destination MAC is not the receiving interface's: broadcast, multicast, or a
    /// frame a bridge flooded toward every port.
    ForeignDestinationMac,
    /// A client packet whose source is one of the relay's own addresses (listen or NAT).
    OwnSourceAddress,
    /// No route listens on the destination address and port.
    NoRoute,
    /// A packet to a NAT port that has no live session.
    NoSession,
    /// A packet to a NAT port from someone other than that session's upstream.
    UnexpectedReplySource,
    /// The session table is at capacity; existing sessions are unaffected.
    SessionTableFull,
    /// Every NAT port is in use.
    NatPortsExhausted,
    /// Two workers created the same new flow's session at one instant and both
    /// withdrew (the flow's next packet creates it).
    SessionContended,
    /// The session's route, or its upstream, was removed from the config by a reload.
    RouteWithdrawn,
    /// A new session while the relay drains (existing sessions are served).
    Draining,
    /// A new session on a route whose every upstream is draining.
    NoUpstreamAccepting,
    /// The upstream's next-hop MAC is not resolved yet (resolution was requested).
    NeighborUnresolved,
    /// The client address is not in the route's allowed prefixes.
    ClientNotAllowed,
    /// The relay-wide (per worker share) rate limit refused it.
    RateLimitedGlobal,
    /// The source address exceeded its route's per-source rate.
    RateLimitedSource,
    /// The session exceeded its route's per-session rate.
    RateLimitedSession,
    /// The source already holds its maximum number of sessions.
    SourceSessionLimit,
    /// An OxTunnel packet that is truncated or not of the format.
    TunnelMalformed,
    /// An OxTunnel packet whose authentication tag does not match (wrong key or altered).
    TunnelAuthFailed,
    /// An OxTunnel body that does not decompress within the frame.
    TunnelDecompress,
    /// The egress TX ring or the frame pool had no room.
    TxRingFull,
    /// A datagram larger than the relay's receive buffer: dropped whole, never truncated.
    DatagramTooLarge,
    /// No room in the frame (or receive slot) for the route's PROXY protocol header.
    ProxyHeaderNoRoom,
    /// It would leave larger than the egress interface's MTU (a smaller MTU there, or a header
    /// the relay adds): the sender is told with an ICMP too-big error, rate limited.
    MtuExceeded,
    /// An ICMP error about a datagram no live session sent (or not from that session's upstream path).
    IcmpNoSession,
    /// An ICMP error beyond the worker's ICMP rate.
    IcmpRateLimited,
}

impl DropReason {
    /// Number of variants, for sizing counter arrays.
    pub const COUNT: usize = DropReason::IcmpRateLimited as usize + 1;

    /// All reasons in discriminant order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::TooShort,
        DropReason::InvalidEthertype,
        DropReason::VlanTagged,
        DropReason::BadIpHeader,
        DropReason::BadIpLength,
        DropReason::IpOptions,
        DropReason::Ipv6ExtensionHeader,
        DropReason::Fragment,
        DropReason::NotUdp,
        DropReason::BadUdpLength,
        DropReason::BadChecksum,
        DropReason::MartianSource,
        DropReason::TtlExpired,
        DropReason::ForeignDestinationMac,
        DropReason::OwnSourceAddress,
        DropReason::NoRoute,
        DropReason::NoSession,
        DropReason::UnexpectedReplySource,
        DropReason::SessionTableFull,
        DropReason::NatPortsExhausted,
        DropReason::SessionContended,
        DropReason::RouteWithdrawn,
        DropReason::Draining,
        DropReason::NoUpstreamAccepting,
        DropReason::NeighborUnresolved,
        DropReason::ClientNotAllowed,
        DropReason::RateLimitedGlobal,
        DropReason::RateLimitedSource,
        DropReason::RateLimitedSession,
        DropReason::SourceSessionLimit,
        DropReason::TunnelMalformed,
        DropReason::TunnelAuthFailed,
        DropReason::TunnelDecompress,
        DropReason::TxRingFull,
        DropReason::DatagramTooLarge,
        DropReason::ProxyHeaderNoRoom,
        DropReason::MtuExceeded,
        DropReason::IcmpNoSession,
        DropReason::IcmpRateLimited,
    ];

    /// Stable snake_case name used in logs, JSON stats and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::TooShort => "too_short",
            DropReason::InvalidEthertype => "invalid_ethertype",
            DropReason::VlanTagged => "vlan_tagged",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::BadIpLength => "bad_ip_length",
            DropReason::IpOptions => "ip_options",
            DropReason::Ipv6ExtensionHeader => "ipv6_extension_header",
            DropReason::Fragment => "fragment",
            DropReason::NotUdp => "not_udp",
            DropReason::BadUdpLength => "bad_udp_length",
            DropReason::BadChecksum => "bad_checksum",
            DropReason::MartianSource => "martian_source",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::ForeignDestinationMac => "foreign_destination_mac",
            DropReason::OwnSourceAddress => "own_source_address",
            DropReason::NoRoute => "no_route",
            DropReason::NoSession => "no_session",
            DropReason::UnexpectedReplySource => "unexpected_reply_source",
            DropReason::SessionTableFull => "session_table_full",
            DropReason::NatPortsExhausted => "nat_ports_exhausted",
            DropReason::SessionContended => "session_contended",
            DropReason::RouteWithdrawn => "route_withdrawn",
            DropReason::Draining => "draining",
            DropReason::NoUpstreamAccepting => "no_upstream_accepting",
            DropReason::NeighborUnresolved => "neighbor_unresolved",
            DropReason::ClientNotAllowed => "client_not_allowed",
            DropReason::RateLimitedGlobal => "rate_limited_global",
            DropReason::RateLimitedSource => "rate_limited_source",
            DropReason::RateLimitedSession => "rate_limited_session",
            DropReason::SourceSessionLimit => "source_session_limit",
            DropReason::TunnelMalformed => "tunnel_malformed",
            DropReason::TunnelAuthFailed => "tunnel_auth_failed",
            DropReason::TunnelDecompress => "tunnel_decompress",
            DropReason::TxRingFull => "tx_ring_full",
            DropReason::DatagramTooLarge => "datagram_too_large",
            DropReason::ProxyHeaderNoRoom => "proxy_header_no_room",
            DropReason::MtuExceeded => "mtu_exceeded",
            DropReason::IcmpNoSession => "icmp_no_session",
            DropReason::IcmpRateLimited => "icmp_rate_limited",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_discriminant_order_and_names_are_unique() {
        for (index, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, index);
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }
}
