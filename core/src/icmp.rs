//! The ICMP errors the relay itself sends: "fragmentation needed" (ICMPv4 type 3, code 4)
//! and "packet too big" (ICMPv6 type 2), for a datagram that would leave larger than its
//! egress interface's MTU. The error is written over the received frame, quoting its IP and
//! UDP headers as they arrived, so the sender's stack matches it to its socket and learns
//! the path MTU instead of losing datagrams silently.

use core::net::{IpAddr, SocketAddr};

use crate::checksum;
use crate::wire::{Layout, MacAddr, field};

const ICMPV4_DEST_UNREACHABLE: u8 = 3;
const ICMPV4_FRAGMENTATION_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// The smallest MTU each family must carry (RFC 791, RFC 8200): never advertise less.
const MIN_MTU_V4: u16 = 68;
const MIN_MTU_V6: u16 = 1280;

/// Rewrites the frame in `buffer` (received, headers not yet rewritten, with `layout`) into a
/// too-big error to its sender from `from`, advertising `mtu`; returns the new frame length.
pub fn too_big_in_place(
    buffer: &mut [u8],
    layout: Layout,
    src_mac: MacAddr,
    dst_mac: MacAddr,
    from: IpAddr,
    mtu: u16,
) -> Option<usize> {
    let l3 = layout.network_offset();
    let mut quote = [0u8; 48];
    let quote_len = layout.headers_len();
    quote.get_mut(..quote_len)?.copy_from_slice(buffer.get(l3..l3 + quote_len)?);
    let quote = &quote[..quote_len];
    buffer.get_mut(..field::ETH_HEADER_LEN)?;
    buffer[field::ETH_DST].copy_from_slice(&dst_mac);
    buffer[field::ETH_SRC].copy_from_slice(&src_mac);
    let ipv6 = layout.is_ipv6();
    let (ethertype, ip_len) = network_header(ipv6);
    buffer[field::ETH_TYPE].copy_from_slice(&ethertype.to_be_bytes());
    let icmp_len = 8 + quote_len;
    let end = field::ETH_HEADER_LEN + ip_len + icmp_len;
    let (ip, icmp) = buffer.get_mut(field::ETH_HEADER_LEN..end)?.split_at_mut(ip_len);
    icmp[8..].copy_from_slice(quote);
    // Back to whoever sent the quoted datagram.
    let sender = if ipv6 {
        IpAddr::from(<[u8; 16]>::try_from(&quote[8..24]).ok()?)
    } else {
        IpAddr::from(<[u8; 4]>::try_from(&quote[12..16]).ok()?)
    };
    write_ip_header(ip, from, sender, icmp_len)?;
    if ipv6 {
        icmp[..8].copy_from_slice(&[ICMPV6_PACKET_TOO_BIG, 0, 0, 0, 0, 0, 0, 0]);
        icmp[4..8].copy_from_slice(&u32::from(mtu.max(MIN_MTU_V6)).to_be_bytes());
        let sum = icmpv6_checksum(ip_bytes(from), ip_bytes(sender), icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    } else {
        icmp[..8].copy_from_slice(&[ICMPV4_DEST_UNREACHABLE, ICMPV4_FRAGMENTATION_NEEDED, 0, 0, 0, 0, 0, 0]);
        icmp[6..8].copy_from_slice(&mtu.max(MIN_MTU_V4).to_be_bytes());
        let sum = checksum::checksum(icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    Some(end)
}

/// The ethertype and IP header length of an ICMP error of either family (no options, no extensions).
fn network_header(ipv6: bool) -> (u16, usize) {
    if ipv6 { (field::ETHERTYPE_IPV6, 40) } else { (field::ETHERTYPE_IPV4, 20) }
}

/// Writes into `ip` (as long as [`network_header`] says) the header of an ICMP message of
/// `message_len` bytes from `from` to `to`, IPv4 with its checksum; `None` when the families
/// differ from each other or from `ip`'s length.
fn write_ip_header(ip: &mut [u8], from: IpAddr, to: IpAddr, message_len: usize) -> Option<()> {
    ip.fill(0);
    match (from, to, ip.len()) {
        (IpAddr::V4(from), IpAddr::V4(to), 20) => {
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + message_len) as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = IPPROTO_ICMP;
            ip[12..16].copy_from_slice(&from.octets());
            ip[16..20].copy_from_slice(&to.octets());
            let sum = checksum::checksum(ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        (IpAddr::V6(from), IpAddr::V6(to), 40) => {
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(message_len as u16).to_be_bytes());
            ip[6] = IPPROTO_ICMPV6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&from.octets());
            ip[24..40].copy_from_slice(&to.octets());
        }
        _ => return None,
    }
    Some(())
}

/// The most of a datagram an ICMP error quotes (RFC 1812 4.3.2.3: the error within 576
/// bytes; RFC 4443 2.4: within the IPv6 minimum MTU), less the headers around it.
const MAX_QUOTED_PAYLOAD_V4: usize = 576 - 20 - 8 - 20 - 8;
const MAX_QUOTED_PAYLOAD_V6: usize = 1280 - 40 - 8 - 40 - 8;

/// What a connected socket's error queue keeps of an ICMP error about one of its datagrams:
/// the message's type, code and info (the MTU of a too-big error), and who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedError {
    pub kind: u8,
    pub code: u8,
    pub info: u32,
    pub from: IpAddr,
}

/// The frame `error` arrived in (to `dst_mac`), about the datagram `nat` sent to `upstream`
/// carrying `payload` (as much as the error quoted): the socket backend's kernel took the
/// error off the wire, and this puts it back together so it goes through the same
/// [`IcmpError`] translation as on the AF_XDP backend. The ICMP checksum is left to that
/// translation, which rewrites every checksum. `None` for mixed address families. Allocates: errors are rare and rate limited.
pub fn rebuild_frame(
    error: &QueuedError,
    dst_mac: MacAddr,
    nat: SocketAddr,
    upstream: SocketAddr,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let ipv6 = nat.is_ipv6();
    if upstream.is_ipv6() != ipv6 || error.from.is_ipv6() != ipv6 {
        return None;
    }
    let quoted_len = payload.len().min(if ipv6 { MAX_QUOTED_PAYLOAD_V6 } else { MAX_QUOTED_PAYLOAD_V4 });
    let datagram = crate::wire::build::udp_frame([0; 6], [0; 6], nat, upstream, &payload[..quoted_len]);
    let quoted = &datagram[field::ETH_HEADER_LEN..];
    let rest = match (ipv6, error.kind, error.code) {
        (false, ICMPV4_DEST_UNREACHABLE, ICMPV4_FRAGMENTATION_NEEDED) => (error.info & 0xffff).to_be_bytes(),
        (true, ICMPV6_PACKET_TOO_BIG, _) => error.info.to_be_bytes(),
        _ => [0; 4],
    };
    let message_len = 8 + quoted.len();
    let (ethertype, ip_len) = network_header(ipv6);
    let mut ip = [0u8; 40];
    write_ip_header(&mut ip[..ip_len], error.from, nat.ip(), message_len)?;
    let mut frame = Vec::with_capacity(field::ETH_HEADER_LEN + ip_len + message_len);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(&ip[..ip_len]);
    frame.extend_from_slice(&[error.kind, error.code, 0, 0]);
    frame.extend_from_slice(&rest);
    frame.extend_from_slice(quoted);
    Some(frame)
}

#[cfg(test)]
mod tests {
    use core::net::SocketAddr;

    use super::*;
    use crate::wire::UdpFrame;
    use crate::wire::build::udp_frame;

    const SENDER_MAC: MacAddr = [2, 0, 0, 0, 0, 1];
    const RELAY_MAC: MacAddr = [2, 0, 0, 0, 0, 2];

    fn error_for(src: &str, dst: &str, mtu: u16) -> (Vec<u8>, Vec<u8>) {
        let (src, dst): (SocketAddr, SocketAddr) = (src.parse().expect("src"), dst.parse().expect("dst"));
        let original = udp_frame(SENDER_MAC, RELAY_MAC, src, dst, &[7u8; 1400]);
        let mut frame = original.clone();
        let layout = UdpFrame::new_checked(&frame[..]).expect("valid").layout();
        let len = too_big_in_place(&mut frame, layout, RELAY_MAC, SENDER_MAC, dst.ip(), mtu).expect("written");
        frame.truncate(len);
        (original, frame)
    }

    #[test]
    fn a_rebuilt_error_parses_as_one_about_the_nat_endpoints_datagram() {
        let nat: SocketAddr = "10.2.0.1:20007".parse().expect("nat");
        let upstream: SocketAddr = "10.2.0.2:7000".parse().expect("upstream");
        let refused = QueuedError { kind: 3, code: 3, info: 0, from: "10.2.0.2".parse().expect("ip") };
        let frame = rebuild_frame(&refused, RELAY_MAC, nat, upstream, &[9; 2000]).expect("built");
        let parsed = IcmpError::parse(&frame).expect("an ICMP error about UDP");
        assert_eq!((parsed.quoted_src, parsed.quoted_dst, parsed.dst_mac), (nat, upstream, RELAY_MAC));
        assert_eq!(frame.len(), 576 + 14, "quoted within 576 bytes, as a router would");
        assert_eq!(&frame[26..30], &[10, 2, 0, 2], "from the host that sent it");

        let nat6: SocketAddr = "[fd00:2::1]:20007".parse().expect("nat");
        let upstream6: SocketAddr = "[fd00:2::2]:7000".parse().expect("upstream");
        let too_big = QueuedError { kind: 2, code: 0, info: 1400, from: "fd00:2::9".parse().expect("ip") };
        let frame = rebuild_frame(&too_big, RELAY_MAC, nat6, upstream6, &[9; 100]).expect("built");
        let parsed = IcmpError::parse(&frame).expect("an ICMPv6 error about UDP");
        assert_eq!((parsed.quoted_src, parsed.quoted_dst), (nat6, upstream6));
        assert_eq!(u32::from_be_bytes(frame[58..62].try_into().expect("4")), 1400, "the MTU where ICMPv6 keeps it");
        assert_eq!(rebuild_frame(&too_big, RELAY_MAC, nat, upstream, &[]), None, "families must agree");
    }

    #[test]
    fn fragmentation_needed_quotes_the_datagram_and_checks_out() {
        let (original, error) = error_for("10.0.0.2:40000", "10.0.0.1:5000", 1372);
        assert_eq!(error.len(), 14 + 20 + 8 + 28);
        assert_eq!(&error[0..12], &[SENDER_MAC, RELAY_MAC].concat()[..]);
        assert_eq!(checksum::checksum(&error[14..34]), 0, "IPv4 header checksum");
        assert_eq!(&error[26..30], &[10, 0, 0, 1], "from the address the sender used");
        assert_eq!(&error[30..34], &[10, 0, 0, 2], "to the sender");
        assert_eq!(&error[34..36], &[3, 4]);
        assert_eq!(u16::from_be_bytes([error[40], error[41]]), 1372);
        assert_eq!(checksum::checksum(&error[34..]), 0, "ICMP checksum");
        assert_eq!(&error[42..], &original[14..42], "the sender's IP and UDP headers, as they arrived");
    }

    #[test]
    fn packet_too_big_carries_the_pseudo_header_checksum_and_the_v6_minimum() {
        let (original, error) = error_for("[fd00::2]:40000", "[fd00::1]:5000", 1000);
        assert_eq!(error.len(), 14 + 40 + 8 + 48);
        assert_eq!(error[54], 2);
        assert_eq!(u32::from_be_bytes(error[58..62].try_into().expect("4")), 1280, "never below the IPv6 minimum");
        let mut pseudo = error[22..54].to_vec();
        pseudo.extend_from_slice(&(56u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        let sum = checksum::ones_complement_sum(&error[54..], u32::from(checksum::ones_complement_sum(&pseudo, 0)));
        assert_eq!(sum, 0xffff, "ICMPv6 checksum over the pseudo-header");
        assert_eq!(&error[62..], &original[14..62]);
    }
}

/// An ICMP error about a UDP datagram, checked once: outer IP (no options or extension
/// headers), an error type, and the quoted IP and UDP headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    ipv6: bool,
    /// Where the ICMP message starts and ends in the frame.
    icmp: usize,
    end: usize,
    /// The quoted datagram's addresses: it left from `quoted_src` (a NAT endpoint) to `quoted_dst`.
    pub quoted_src: SocketAddr,
    pub quoted_dst: SocketAddr,
    pub dst_mac: MacAddr,
}

/// Where it goes back: the client as it sent, from the address it sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub client: SocketAddr,
    pub listen: SocketAddr,
    /// Subtracted from a too-big error's MTU: what the relay adds to the client's datagrams.
    pub overhead: u16,
}

impl IcmpError {
    /// `None` for anything but an untagged frame carrying an ICMP error about UDP.
    pub fn parse(frame: &[u8]) -> Option<Self> {
        let l3 = field::ETH_HEADER_LEN;
        let ethertype = u16::from_be_bytes(frame.get(field::ETH_TYPE)?.try_into().ok()?);
        let (ipv6, icmp, end) = match ethertype {
            field::ETHERTYPE_IPV4 => {
                let ip = frame.get(l3..l3 + 20)?;
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                if ip[0] != 0x45 || ip[9] != IPPROTO_ICMP || total < 20 {
                    return None;
                }
                (false, l3 + 20, l3 + total)
            }
            field::ETHERTYPE_IPV6 => {
                let ip = frame.get(l3..l3 + 40)?;
                let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
                if ip[0] >> 4 != 6 || ip[6] != IPPROTO_ICMPV6 {
                    return None;
                }
                (true, l3 + 40, l3 + 40 + payload)
            }
            _ => return None,
        };
        let message = frame.get(icmp..end)?;
        let error = if ipv6 { matches!(message.first()?, 1..=3) } else { matches!(message.first()?, 3 | 11) };
        let quoted = message.get(8..)?;
        let quotes_udp =
            if ipv6 { quoted.get(6) == Some(&17) } else { quoted.first() == Some(&0x45) && quoted.get(9) == Some(&17) };
        if !error || !quotes_udp {
            return None;
        }
        let (quoted_ip, udp) =
            if ipv6 { (quoted.get(..40)?, quoted.get(40..48)?) } else { (quoted.get(..20)?, quoted.get(20..28)?) };
        let port = |at: usize| u16::from_be_bytes([udp[at], udp[at + 1]]);
        let (src, dst) = if ipv6 {
            let src: [u8; 16] = quoted_ip[8..24].try_into().ok()?;
            let dst: [u8; 16] = quoted_ip[24..40].try_into().ok()?;
            (IpAddr::from(src), IpAddr::from(dst))
        } else {
            let src: [u8; 4] = quoted_ip[12..16].try_into().ok()?;
            let dst: [u8; 4] = quoted_ip[16..20].try_into().ok()?;
            (IpAddr::from(src), IpAddr::from(dst))
        };
        Some(IcmpError {
            ipv6,
            icmp,
            end,
            quoted_src: SocketAddr::new(src, port(0)),
            quoted_dst: SocketAddr::new(dst, port(2)),
            dst_mac: frame.get(field::ETH_DST)?.try_into().ok()?,
        })
    }

    /// Rewrites the error in place for the client: outer addresses, the quoted datagram's
    /// addresses and ports (as the client sent it), a too-big MTU less the relay's overhead,
    /// and every checksum. Returns the frame's length.
    pub fn translate(&self, frame: &mut [u8], to: &Translation) -> Option<usize> {
        let l3 = field::ETH_HEADER_LEN;
        frame.get_mut(..self.end)?;
        frame[field::ETH_DST].copy_from_slice(&to.dst_mac);
        frame[field::ETH_SRC].copy_from_slice(&to.src_mac);
        let (ip, message) = frame[l3..self.end].split_at_mut(self.icmp - l3);
        let (src_ip, dst_ip) = (to.listen.ip(), to.client.ip());
        match (src_ip, dst_ip) {
            (IpAddr::V4(src), IpAddr::V4(dst)) if !self.ipv6 => {
                ip[8] = 64;
                ip[12..16].copy_from_slice(&src.octets());
                ip[16..20].copy_from_slice(&dst.octets());
                ip[10..12].fill(0);
                let sum = checksum::checksum(ip);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) if self.ipv6 => {
                ip[7] = 64;
                ip[8..24].copy_from_slice(&src.octets());
                ip[24..40].copy_from_slice(&dst.octets());
            }
            _ => return None,
        }
        // The quoted datagram becomes the one the client sent: client -> listen address.
        let (quoted_ip_len, udp_at) = if self.ipv6 { (40, 8 + 40) } else { (20, 8 + 20) };
        let mut delta = checksum::ChecksumDelta::default();
        {
            let quoted = &mut message[8..8 + quoted_ip_len];
            let (src_range, dst_range) = if self.ipv6 { (8..24, 24..40) } else { (12..16, 16..20) };
            let (client, listen) = (ip_bytes(to.client.ip()), ip_bytes(to.listen.ip()));
            let (client, listen) = (&client[..src_range.len()], &listen[..dst_range.len()]);
            delta.replace(&quoted[src_range.clone()], client);
            delta.replace(&quoted[dst_range.clone()], listen);
            quoted[src_range].copy_from_slice(client);
            quoted[dst_range].copy_from_slice(listen);
            if !self.ipv6 {
                quoted[10..12].fill(0);
                let sum = checksum::checksum(&quoted[..20]);
                quoted[10..12].copy_from_slice(&sum.to_be_bytes());
            }
        }
        let udp = &mut message[udp_at..udp_at + 8];
        for (range, port) in [(0..2, to.client.port()), (2..4, to.listen.port())] {
            delta.replace(&udp[range.clone()], &port.to_be_bytes());
            udp[range].copy_from_slice(&port.to_be_bytes());
        }
        let quoted_sum = u16::from_be_bytes([udp[6], udp[7]]);
        if quoted_sum != 0 {
            udp[6..8].copy_from_slice(&delta.apply(quoted_sum).to_be_bytes());
        }
        // A too-big error: the client's datagrams carry the relay's overhead on the next hop.
        if !self.ipv6 && message[0] == ICMPV4_DEST_UNREACHABLE && message[1] == ICMPV4_FRAGMENTATION_NEEDED {
            let mtu = u16::from_be_bytes([message[6], message[7]]).saturating_sub(to.overhead).max(MIN_MTU_V4);
            message[6..8].copy_from_slice(&mtu.to_be_bytes());
        } else if self.ipv6 && message[0] == ICMPV6_PACKET_TOO_BIG {
            let mtu = u32::from_be_bytes(message[4..8].try_into().ok()?);
            let mtu = mtu.saturating_sub(u32::from(to.overhead)).max(u32::from(MIN_MTU_V6));
            message[4..8].copy_from_slice(&mtu.to_be_bytes());
        }
        message[2..4].fill(0);
        let sum = if self.ipv6 {
            icmpv6_checksum(ip_bytes(src_ip), ip_bytes(dst_ip), message)
        } else {
            checksum::checksum(message)
        };
        message[2..4].copy_from_slice(&sum.to_be_bytes());
        Some(self.end)
    }
}

/// The ICMPv6 checksum of `message` (its checksum field zero): it covers a pseudo-header of
/// source, destination, length and next header (RFC 8200 8.1).
fn icmpv6_checksum(source: [u8; 16], destination: [u8; 16], message: &[u8]) -> u16 {
    let mut pseudo = [0u8; 40];
    pseudo[..16].copy_from_slice(&source);
    pseudo[16..32].copy_from_slice(&destination);
    pseudo[32..36].copy_from_slice(&(message.len() as u32).to_be_bytes());
    pseudo[39] = IPPROTO_ICMPV6;
    !checksum::ones_complement_sum(message, u32::from(checksum::ones_complement_sum(&pseudo, 0)))
}

/// An address's bytes (IPv4 in the first four).
fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}
