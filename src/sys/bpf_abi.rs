//! Rust mirrors of the map layouts in `bpf/structs.h` and `bpf/consts.h`.

use std::net::{IpAddr, SocketAddr};

const ADDR_FAMILY_IPV4: u8 = 4;
const ADDR_FAMILY_IPV6: u8 = 6;

/// `struct endpoint_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointKey {
    pub family: u8,
    pub pad: u8,
    /// Network byte order.
    pub port_be: u16,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<EndpointKey>() == 20);

/// `struct addr_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddrKey {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<AddrKey>() == 20);

/// `struct relay_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayConfig {
    pub nat_port_first: u16,
    pub nat_port_last: u16,
    /// Per CPU; 0 turns the new-flow budget off.
    pub new_flows_per_second: u32,
    /// Longest frame an AF_XDP frame holds; 0: no limit.
    pub max_frame_len: u32,
    pub pad: u32,
}

/// `struct flow_key`: a client flow with a live session.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub family: u8,
    pub pad: u8,
    /// Network byte order.
    pub src_port_be: u16,
    /// Network byte order.
    pub dst_port_be: u16,
    pub pad2: u16,
    pub src_addr: [u8; 16],
}
const _: () = assert!(size_of::<FlowKey>() == 24);

impl FlowKey {
    pub fn new(client: SocketAddr, listen_port: u16) -> Self {
        let AddrKey { family, addr, .. } = AddrKey::new(client.ip());
        FlowKey {
            family,
            pad: 0,
            src_port_be: client.port().to_be(),
            dst_port_be: listen_port.to_be(),
            pad2: 0,
            src_addr: addr,
        }
    }
}
const _: () = assert!(size_of::<RelayConfig>() == 16);

impl EndpointKey {
    pub fn new(endpoint: SocketAddr) -> Self {
        let AddrKey { family, addr, .. } = AddrKey::new(endpoint.ip());
        EndpointKey { family, pad: 0, port_be: endpoint.port().to_be(), addr }
    }
}

impl AddrKey {
    pub fn new(ip: IpAddr) -> Self {
        let mut addr = [0u8; 16];
        let family = match ip {
            IpAddr::V4(v4) => {
                addr[..4].copy_from_slice(&v4.octets());
                ADDR_FAMILY_IPV4
            }
            IpAddr::V6(v6) => {
                addr.copy_from_slice(&v6.octets());
                ADDR_FAMILY_IPV6
            }
        };
        AddrKey { family, pad: [0; 3], addr }
    }
}

/// `enum xdp_counter`: the program's verdict counters, in map-index order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum XdpCounter {
    PassNotIp,
    PassNotUdp,
    PassOtherPort,
    PassUnparsed,
    RedirectListen,
    RedirectNat,
    PassNoSocket,
    DropBadUdpLength,
    DropIpOptions,
    DropFragment,
    DropNewFlowBudget,
    DropIpv6Extension,
    DropTooBig,
    RedirectIcmp,
}

impl XdpCounter {
    pub const ALL: [XdpCounter; 14] = [
        XdpCounter::PassNotIp,
        XdpCounter::PassNotUdp,
        XdpCounter::PassOtherPort,
        XdpCounter::PassUnparsed,
        XdpCounter::RedirectListen,
        XdpCounter::RedirectNat,
        XdpCounter::PassNoSocket,
        XdpCounter::DropBadUdpLength,
        XdpCounter::DropIpOptions,
        XdpCounter::DropFragment,
        XdpCounter::DropNewFlowBudget,
        XdpCounter::DropIpv6Extension,
        XdpCounter::DropTooBig,
        XdpCounter::RedirectIcmp,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            XdpCounter::PassNotIp => "pass_not_ip",
            XdpCounter::PassNotUdp => "pass_not_udp",
            XdpCounter::PassOtherPort => "pass_other_port",
            XdpCounter::PassUnparsed => "pass_unparsed",
            XdpCounter::RedirectListen => "redirect_listen",
            XdpCounter::RedirectNat => "redirect_nat",
            XdpCounter::PassNoSocket => "pass_no_socket",
            XdpCounter::DropBadUdpLength => "drop_bad_udp_length",
            XdpCounter::DropIpOptions => "drop_ip_options",
            XdpCounter::DropFragment => "drop_fragment",
            XdpCounter::DropNewFlowBudget => "drop_new_flow_budget",
            XdpCounter::DropIpv6Extension => "drop_ipv6_extension",
            XdpCounter::DropTooBig => "drop_too_big",
            XdpCounter::RedirectIcmp => "redirect_icmp",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_cover_the_c_enum_in_order() {
        // XDP_CNT_MAX in consts.h.
        let header = include_str!("../../bpf/consts.h");
        let names: Vec<&str> = header
            .lines()
            .filter_map(|l| l.trim().strip_prefix("XDP_CNT_"))
            .map(|l| l.split([' ', ',', '=']).next().unwrap_or_default())
            .filter(|n| *n != "MAX")
            .collect();
        assert_eq!(names.len(), XdpCounter::ALL.len());
        for (index, (c_name, counter)) in names.iter().zip(XdpCounter::ALL).enumerate() {
            assert_eq!(counter as usize, index);
            assert_eq!(c_name.to_ascii_lowercase(), counter.name());
        }
    }

    #[test]
    fn endpoint_key_layout() {
        let key = EndpointKey::new("10.0.0.1:5000".parse().expect("addr"));
        assert_eq!(key.family, 4);
        assert_eq!(key.port_be.to_ne_bytes(), 5000u16.to_be_bytes());
        assert_eq!(&key.addr[..4], &[10, 0, 0, 1]);
        assert_eq!(&key.addr[4..], &[0; 12]);
    }
}
