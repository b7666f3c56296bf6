//! PROXY protocol version 2 (HAProxy's specification, binary form) for UDP: the header a
//! route with `proxy_protocol = "v2"` puts before a client's datagram, so the upstream
//! learns the client's address and port (and the address it sent to) through the NAT.

use core::net::{IpAddr, SocketAddr};

use crate::drop_reason::DropReason;

/// Every v2 header starts with these 12 bytes.
pub const SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
/// Version 2, command PROXY.
const VERSION_COMMAND: u8 = 0x21;
/// Address family (high nibble) and transport (low nibble): INET or INET6, DGRAM.
const UDP_OVER_IPV4: u8 = 0x12;
const UDP_OVER_IPV6: u8 = 0x22;

/// Which datagrams of a session carry the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// Every datagram: the usual choice for UDP, where any datagram may be the first the upstream sees.
    EveryDatagram,
    /// Only the session's first datagram (upstreams that keep per-flow state).
    FirstDatagram,
}

/// The header's length for a client of `client`'s family.
pub fn header_len(client: SocketAddr) -> usize {
    16 + if client.is_ipv4() { 12 } else { 36 }
}

/// Writes the header for a datagram from `client` to `destination` at the start of `out`;
/// returns its length, or `None` when `out` is too short or the families differ.
pub fn write_header(out: &mut [u8], client: SocketAddr, destination: SocketAddr) -> Option<usize> {
    let len = header_len(client);
    let out = out.get_mut(..len)?;
    out[..12].copy_from_slice(&SIGNATURE);
    out[12] = VERSION_COMMAND;
    let ports = [client.port(), destination.port()];
    match (client.ip(), destination.ip()) {
        (IpAddr::V4(source), IpAddr::V4(target)) => {
            put_addresses(&mut out[13..], UDP_OVER_IPV4, &source.octets(), &target.octets(), ports);
        }
        (IpAddr::V6(source), IpAddr::V6(target)) => {
            put_addresses(&mut out[13..], UDP_OVER_IPV6, &source.octets(), &target.octets(), ports);
        }
        _ => return None,
    }
    Some(len)
}

/// The family byte, the address block's length, then source and destination addresses and ports.
fn put_addresses(out: &mut [u8], family: u8, source: &[u8], target: &[u8], ports: [u16; 2]) {
    let n = source.len();
    out[0] = family;
    out[1..3].copy_from_slice(&((2 * n + 4) as u16).to_be_bytes());
    let addresses = &mut out[3..];
    addresses[..n].copy_from_slice(source);
    addresses[n..2 * n].copy_from_slice(target);
    addresses[2 * n..2 * n + 2].copy_from_slice(&ports[0].to_be_bytes());
    addresses[2 * n + 2..2 * n + 4].copy_from_slice(&ports[1].to_be_bytes());
}

/// Moves the `len` bytes of `payload` up and writes the header before them; returns the new
/// length. A payload with no room after it for the header is dropped, never cut.
pub fn prepend(
    payload: &mut [u8],
    len: usize,
    client: SocketAddr,
    destination: SocketAddr,
) -> Result<usize, DropReason> {
    let header = header_len(client);
    if len + header > payload.len() {
        return Err(DropReason::ProxyHeaderNoRoom);
    }
    payload.copy_within(..len, header);
    write_header(payload, client, destination).ok_or(DropReason::ProxyHeaderNoRoom)?;
    Ok(len + header)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn ipv4_header_bytes_match_the_specification() {
        let mut out = [0u8; 64];
        assert_eq!(write_header(&mut out, addr("192.0.2.1:40000"), addr("198.51.100.7:5000")), Some(28));
        let expected: [u8; 28] = [
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
            0x21, 0x12, 0x00, 0x0C, // v2 PROXY, UDP over IPv4, 12 address bytes
            192, 0, 2, 1, 198, 51, 100, 7, // source, destination
            0x9C, 0x40, 0x13, 0x88, // ports 40000, 5000
        ];
        assert_eq!(out[..28], expected);
    }

    #[test]
    fn ipv6_header_and_prepend_in_place() {
        let mut payload = [0u8; 100];
        payload[..5].copy_from_slice(b"hello");
        let len = prepend(&mut payload, 5, addr("[2001:db8::1]:1234"), addr("[2001:db8::2]:53")).expect("room");
        assert_eq!(len, 52 + 5);
        assert_eq!(payload[12..16], [0x21, 0x22, 0x00, 0x24]);
        let source: core::net::Ipv6Addr = "2001:db8::1".parse().expect("v6");
        assert_eq!(payload[16..32], source.octets());
        assert_eq!(payload[48..52], [0x04, 0xD2, 0x00, 0x35]);
        assert_eq!(&payload[52..57], b"hello");
        assert_eq!(prepend(&mut [0u8; 40], 5, addr("[::1]:1"), addr("[::1]:2")), Err(DropReason::ProxyHeaderNoRoom));
    }
}
