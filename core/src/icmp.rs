//! The ICMP errors the relay itself sends: "fragmentation needed" (ICMPv4 type 3, code 4)
//! and "packet too big" (ICMPv6 type 2), for a datagram that would leave larger than its
//! egress interface's MTU. The error is written over the received frame, quoting its IP and
//! UDP headers as they arrived, so the sender's stack matches it to its socket and learns
//! the path MTU instead of losing datagrams silently.

use core::net::IpAddr;

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
    let (ethertype, ip_len) = if layout.is_ipv6() { (field::ETHERTYPE_IPV6, 40) } else { (field::ETHERTYPE_IPV4, 20) };
    buffer[field::ETH_TYPE].copy_from_slice(&ethertype.to_be_bytes());
    let icmp_len = 8 + quote_len;
    let end = field::ETH_HEADER_LEN + ip_len + icmp_len;
    let (ip, icmp) = buffer.get_mut(field::ETH_HEADER_LEN..end)?.split_at_mut(ip_len);
    icmp[8..].copy_from_slice(quote);
    match from {
        IpAddr::V4(from) if !layout.is_ipv6() => {
            let sender: [u8; 4] = quote[12..16].try_into().ok()?;
            ip.fill(0);
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((ip_len + icmp_len) as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = IPPROTO_ICMP;
            ip[12..16].copy_from_slice(&from.octets());
            ip[16..20].copy_from_slice(&sender);
            let sum = checksum::checksum(ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            icmp[..8].copy_from_slice(&[ICMPV4_DEST_UNREACHABLE, ICMPV4_FRAGMENTATION_NEEDED, 0, 0, 0, 0, 0, 0]);
            icmp[6..8].copy_from_slice(&mtu.max(MIN_MTU_V4).to_be_bytes());
            let sum = checksum::checksum(icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        IpAddr::V6(from) if layout.is_ipv6() => {
            let sender: [u8; 16] = quote[8..24].try_into().ok()?;
            ip.fill(0);
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
            ip[6] = IPPROTO_ICMPV6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&from.octets());
            ip[24..40].copy_from_slice(&sender);
            icmp[..8].copy_from_slice(&[ICMPV6_PACKET_TOO_BIG, 0, 0, 0, 0, 0, 0, 0]);
            icmp[4..8].copy_from_slice(&u32::from(mtu.max(MIN_MTU_V6)).to_be_bytes());
            // ICMPv6 covers a pseudo-header: source, destination, length, next header.
            let mut pseudo = [0u8; 40];
            pseudo[..16].copy_from_slice(&from.octets());
            pseudo[16..32].copy_from_slice(&sender);
            pseudo[32..36].copy_from_slice(&(icmp_len as u32).to_be_bytes());
            pseudo[39] = IPPROTO_ICMPV6;
            let sum = !checksum::ones_complement_sum(icmp, u32::from(checksum::ones_complement_sum(&pseudo, 0)));
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        _ => return None,
    }
    Some(end)
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
