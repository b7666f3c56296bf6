//! Zero-copy view of an Ethernet/IP/UDP frame: lengths are checked once in
//! [`UdpFrame::new_checked`]; every accessor after that is infallible.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::checksum::{self, ChecksumDelta};
use crate::drop_reason::DropReason;

/// A 48-bit Ethernet address.
pub type MacAddr = [u8; 6];

/// TTL / hop limit written on every relayed packet: the relay terminates and
/// re-originates the flow, as a socket-based proxy would.
pub const RELAY_TTL: u8 = 64;

/// Byte offsets of the fields this crate reads or writes.
pub mod field {
    use core::ops::Range;

    pub const ETH_DST: Range<usize> = 0..6;
    pub const ETH_SRC: Range<usize> = 6..12;
    pub const ETH_TYPE: Range<usize> = 12..14;
    pub const ETH_HEADER_LEN: usize = 14;

    pub const ETHERTYPE_IPV4: u16 = 0x0800;
    pub const ETHERTYPE_IPV6: u16 = 0x86dd;
    pub const ETHERTYPE_VLAN: u16 = 0x8100;
    pub const ETHERTYPE_QINQ: u16 = 0x88a8;

    // Offsets inside the IPv4 header.
    pub const IPV4_VER_IHL: usize = 0;
    pub const IPV4_TOTAL_LEN: Range<usize> = 2..4;
    pub const IPV4_FRAG: Range<usize> = 6..8;
    pub const IPV4_TTL: usize = 8;
    pub const IPV4_PROTO: usize = 9;
    pub const IPV4_CHECKSUM: Range<usize> = 10..12;
    pub const IPV4_SRC: Range<usize> = 12..16;
    pub const IPV4_DST: Range<usize> = 16..20;
    pub const IPV4_HEADER_LEN: usize = 20;
    /// More-fragments flag and fragment offset; DF is allowed.
    pub const IPV4_FRAG_MASK: u16 = 0x3fff;

    // Offsets inside the IPv6 header.
    pub const IPV6_PAYLOAD_LEN: Range<usize> = 4..6;
    pub const IPV6_NEXT_HEADER: usize = 6;
    pub const IPV6_HOP_LIMIT: usize = 7;
    pub const IPV6_SRC: Range<usize> = 8..24;
    pub const IPV6_DST: Range<usize> = 24..40;
    pub const IPV6_HEADER_LEN: usize = 40;

    pub const IPPROTO_UDP: u8 = 17;

    // Offsets inside the UDP header.
    pub const UDP_SRC_PORT: Range<usize> = 0..2;
    pub const UDP_DST_PORT: Range<usize> = 2..4;
    pub const UDP_LEN: Range<usize> = 4..6;
    pub const UDP_CHECKSUM: Range<usize> = 6..8;
    pub const UDP_HEADER_LEN: usize = 8;
}

/// A validated Ethernet (+ optional 802.1Q) / IPv4-or-IPv6 / UDP frame.
#[derive(Debug)]
pub struct UdpFrame<T> {
    buffer: T,
    l3: usize,
    l4: usize,
    /// End of the UDP datagram (the frame may carry Ethernet padding after it).
    end: usize,
    ipv6: bool,
}

/// Where a rewritten frame goes: link-layer and transport endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// Where the headers of a validated frame are, to view the same bytes again
/// (after changing only the payload) without checking them twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    l3: usize,
    l4: usize,
    end: usize,
    ipv6: bool,
}

impl Layout {
    /// Bytes of the IP and UDP headers.
    pub fn headers_len(&self) -> usize {
        self.l4 + field::UDP_HEADER_LEN - self.l3
    }

    /// Where the IP header starts in the frame.
    pub fn network_offset(&self) -> usize {
        self.l3
    }

    pub fn is_ipv6(&self) -> bool {
        self.ipv6
    }
}

impl<T: AsRef<[u8]>> UdpFrame<T> {
    pub fn layout(&self) -> Layout {
        Layout { l3: self.l3, l4: self.l4, end: self.end, ipv6: self.ipv6 }
    }

    /// A view of `buffer` with a layout [`new_checked`](Self::new_checked) produced for these
    /// same header bytes; `None` if the buffer is now too short for it.
    pub fn with_layout(buffer: T, layout: Layout) -> Option<Self> {
        (buffer.as_ref().len() >= layout.end).then_some(UdpFrame {
            buffer,
            l3: layout.l3,
            l4: layout.l4,
            end: layout.end,
            ipv6: layout.ipv6,
        })
    }

    /// Checks every length and the fields the relay relies on; the only way to build a view.
    pub fn new_checked(buffer: T) -> Result<Self, DropReason> {
        let bytes = buffer.as_ref();
        let (ethertype, l3) = ethertype_and_l3(bytes)?;
        let (ipv6, l4, end) = match ethertype {
            field::ETHERTYPE_IPV4 => check_ipv4(bytes, l3)?,
            field::ETHERTYPE_IPV6 => check_ipv6(bytes, l3)?,
            _ => return Err(DropReason::InvalidEthertype),
        };
        let udp = &bytes[l4..];
        if udp.len() < field::UDP_HEADER_LEN {
            return Err(DropReason::TooShort);
        }
        let udp_len = usize::from(be16(udp, field::UDP_LEN));
        if udp_len < field::UDP_HEADER_LEN || l4 + udp_len != end {
            return Err(DropReason::BadUdpLength);
        }
        if ipv6 && be16(udp, field::UDP_CHECKSUM) == 0 {
            // RFC 8200 8.1: a zero UDP checksum is not allowed over IPv6.
            return Err(DropReason::BadChecksum);
        }
        Ok(UdpFrame { buffer, l3, l4, end, ipv6 })
    }

    pub fn is_ipv6(&self) -> bool {
        self.ipv6
    }

    pub fn src_mac(&self) -> MacAddr {
        mac(&self.bytes()[field::ETH_SRC])
    }

    pub fn dst_mac(&self) -> MacAddr {
        mac(&self.bytes()[field::ETH_DST])
    }

    pub fn src(&self) -> SocketAddr {
        SocketAddr::new(self.src_ip(), be16(self.udp(), field::UDP_SRC_PORT))
    }

    pub fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.dst_ip(), be16(self.udp(), field::UDP_DST_PORT))
    }

    /// The UDP payload.
    pub fn payload(&self) -> &[u8] {
        &self.bytes()[self.l4 + field::UDP_HEADER_LEN..self.end]
    }

    /// Where the UDP payload starts in the buffer.
    pub fn payload_offset(&self) -> usize {
        self.l4 + field::UDP_HEADER_LEN
    }

    /// Bytes of the frame up to the end of the UDP datagram.
    pub fn len(&self) -> usize {
        self.end
    }

    pub fn is_empty(&self) -> bool {
        self.end == 0
    }

    /// Verifies the IPv4 header checksum and the UDP checksum (a zero UDP
    /// checksum over IPv4 means "none" and passes; a partial one, see
    /// [`udp_checksum_partial`](Self::udp_checksum_partial), cannot be checked and passes).
    pub fn checksums_valid(&self) -> bool {
        let bytes = self.bytes();
        if !self.ipv6 && checksum::checksum(&bytes[self.l3..self.l4]) != 0 {
            return false;
        }
        let udp = &bytes[self.l4..self.end];
        if (!self.ipv6 && be16(udp, field::UDP_CHECKSUM) == 0) || self.udp_checksum_partial() {
            return true;
        }
        checksum::ones_complement_sum(udp, self.pseudo_header_sum()) == 0xffff
    }

    /// Whether the UDP checksum field holds only the folded pseudo-header sum:
    /// what a sender that offloads its checksum (veth, tap, virtio-net with
    /// `tx-checksumming` on) leaves for the device to complete, and what AF_XDP
    /// and generic XDP hand over unchanged. A complete checksum that happens to
    /// equal it (one in 65,536) is recomputed to the same value, so the test is safe.
    pub fn udp_checksum_partial(&self) -> bool {
        let field = be16(self.udp(), field::UDP_CHECKSUM);
        field != 0 && field == checksum::ones_complement_sum(&[], self.pseudo_header_sum())
    }

    fn pseudo_header_sum(&self) -> u32 {
        let bytes = self.bytes();
        let (src, dst) =
            if self.ipv6 { (field::IPV6_SRC, field::IPV6_DST) } else { (field::IPV4_SRC, field::IPV4_DST) };
        let addresses = u32::from(checksum::ones_complement_sum(&bytes[self.l3 + src.start..self.l3 + src.end], 0))
            + u32::from(checksum::ones_complement_sum(&bytes[self.l3 + dst.start..self.l3 + dst.end], 0));
        let udp_len = (self.end - self.l4) as u32;
        addresses + u32::from(field::IPPROTO_UDP) + udp_len
    }

    fn src_ip(&self) -> IpAddr {
        let ip = &self.bytes()[self.l3..];
        if self.ipv6 {
            IpAddr::V6(Ipv6Addr::from(array16(&ip[field::IPV6_SRC])))
        } else {
            IpAddr::V4(Ipv4Addr::from(array4(&ip[field::IPV4_SRC])))
        }
    }

    fn dst_ip(&self) -> IpAddr {
        let ip = &self.bytes()[self.l3..];
        if self.ipv6 {
            IpAddr::V6(Ipv6Addr::from(array16(&ip[field::IPV6_DST])))
        } else {
            IpAddr::V4(Ipv4Addr::from(array4(&ip[field::IPV4_DST])))
        }
    }

    fn udp(&self) -> &[u8] {
        &self.bytes()[self.l4..self.end]
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpFrame<T> {
    /// Declares a new payload length (the payload bytes already written after
    /// [`payload_offset`](Self::payload_offset)): updates the IP and UDP lengths
    /// and the IPv4 header checksum. The UDP checksum must be recomputed with
    /// [`recompute_udp_checksum`](Self::recompute_udp_checksum) once addresses are final.
    /// Returns `false`, changing nothing, when the buffer or the length field cannot hold it.
    pub fn set_payload_len(&mut self, payload_len: usize) -> bool {
        let (l3, l4, ipv6) = (self.l3, self.l4, self.ipv6);
        let end = l4 + field::UDP_HEADER_LEN + payload_len;
        let bytes = self.buffer.as_mut();
        let udp_len = end - l4;
        let ip_len = if ipv6 { udp_len } else { end - l3 };
        if end > bytes.len() || ip_len > usize::from(u16::MAX) {
            return false;
        }
        bytes[l4 + 4..l4 + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        if ipv6 {
            bytes[l3 + 4..l3 + 6].copy_from_slice(&(ip_len as u16).to_be_bytes());
        } else {
            bytes[l3 + 2..l3 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            bytes[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let sum = checksum::checksum(&bytes[l3..l4]);
            bytes[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
        }
        self.end = end;
        true
    }

    /// Computes the UDP checksum from scratch (after the payload changed).
    pub fn recompute_udp_checksum(&mut self) {
        let (l4, end) = (self.l4, self.end);
        let pseudo = self.pseudo_header_sum();
        let bytes = self.buffer.as_mut();
        bytes[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
        let sum = match !checksum::ones_complement_sum(&bytes[l4..end], pseudo) {
            0 => 0xffff,
            sum => sum,
        };
        bytes[l4 + 6..l4 + 8].copy_from_slice(&sum.to_be_bytes());
    }

    /// Rewrites MACs, addresses, ports and TTL in place, updating the IPv4 and
    /// UDP checksums incrementally. Returns `false` (frame untouched) when the
    /// new addresses are not of the frame's family.
    pub fn rewrite(&mut self, to: &Rewrite) -> bool {
        let (l3, l4) = (self.l3, self.l4);
        let ipv6 = self.ipv6;
        let bytes = self.buffer.as_mut();
        let mut addresses = ChecksumDelta::default();
        match (ipv6, to.src.ip(), to.dst.ip()) {
            (false, IpAddr::V4(src), IpAddr::V4(dst)) => {
                replace(&mut addresses, &mut bytes[l3 + 12..l3 + 16], &src.octets());
                replace(&mut addresses, &mut bytes[l3 + 16..l3 + 20], &dst.octets());
                let mut header = addresses;
                let old_ttl_proto = be16(&bytes[l3..], 8..10);
                bytes[l3 + field::IPV4_TTL] = RELAY_TTL;
                header.replace_word(old_ttl_proto, be16(&bytes[l3..], 8..10));
                let old = be16(&bytes[l3..], field::IPV4_CHECKSUM);
                bytes[l3 + 10..l3 + 12].copy_from_slice(&header.apply(old).to_be_bytes());
            }
            (true, IpAddr::V6(src), IpAddr::V6(dst)) => {
                replace(&mut addresses, &mut bytes[l3 + 8..l3 + 24], &src.octets());
                replace(&mut addresses, &mut bytes[l3 + 24..l3 + 40], &dst.octets());
                bytes[l3 + field::IPV6_HOP_LIMIT] = RELAY_TTL;
            }
            _ => return false,
        }
        let mut transport = addresses;
        replace(&mut transport, &mut bytes[l4..l4 + 2], &to.src.port().to_be_bytes());
        replace(&mut transport, &mut bytes[l4 + 2..l4 + 4], &to.dst.port().to_be_bytes());
        let old = be16(&bytes[l4..], field::UDP_CHECKSUM);
        if ipv6 || old != 0 {
            let new = match transport.apply(old) {
                0 => 0xffff,
                sum => sum,
            };
            bytes[l4 + 6..l4 + 8].copy_from_slice(&new.to_be_bytes());
        }
        bytes[field::ETH_DST].copy_from_slice(&to.dst_mac);
        bytes[field::ETH_SRC].copy_from_slice(&to.src_mac);
        true
    }
}

/// True for sources no legitimate peer uses on the open internet or a LAN.
pub fn is_martian(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let first = v4.octets()[0];
            first == 0 || first == 127 || first >= 224
        }
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_loopback() || v6.is_multicast() || v6.to_ipv4_mapped().is_some(),
    }
}

fn ethertype_and_l3(bytes: &[u8]) -> Result<(u16, usize), DropReason> {
    if bytes.len() < field::ETH_HEADER_LEN {
        return Err(DropReason::TooShort);
    }
    // Untagged only: a tag kept through the rewrite would put the upstream-bound frame on the
    // client's VLAN. An operator relaying between VLANs runs the relay on the VLAN interfaces.
    match be16(bytes, field::ETH_TYPE) {
        field::ETHERTYPE_VLAN | field::ETHERTYPE_QINQ => Err(DropReason::VlanTagged),
        ethertype => Ok((ethertype, field::ETH_HEADER_LEN)),
    }
}

/// Returns (is_ipv6, l4 offset, end of datagram).
fn check_ipv4(bytes: &[u8], l3: usize) -> Result<(bool, usize, usize), DropReason> {
    let ip = &bytes[l3..];
    if ip.len() < field::IPV4_HEADER_LEN {
        return Err(DropReason::TooShort);
    }
    let ver_ihl = ip[field::IPV4_VER_IHL];
    if ver_ihl >> 4 != 4 || (ver_ihl & 0x0f) < 5 {
        return Err(DropReason::BadIpHeader);
    }
    if ver_ihl & 0x0f != 5 {
        return Err(DropReason::IpOptions);
    }
    let total = usize::from(be16(ip, field::IPV4_TOTAL_LEN));
    if total < field::IPV4_HEADER_LEN || total > ip.len() {
        return Err(DropReason::BadIpLength);
    }
    if be16(ip, field::IPV4_FRAG) & field::IPV4_FRAG_MASK != 0 {
        return Err(DropReason::Fragment);
    }
    if ip[field::IPV4_PROTO] != field::IPPROTO_UDP {
        return Err(DropReason::NotUdp);
    }
    if ip[field::IPV4_TTL] == 0 {
        return Err(DropReason::TtlExpired);
    }
    if is_martian(IpAddr::V4(Ipv4Addr::from(array4(&ip[field::IPV4_SRC])))) {
        return Err(DropReason::MartianSource);
    }
    Ok((false, l3 + field::IPV4_HEADER_LEN, l3 + total))
}

fn check_ipv6(bytes: &[u8], l3: usize) -> Result<(bool, usize, usize), DropReason> {
    let ip = &bytes[l3..];
    if ip.len() < field::IPV6_HEADER_LEN {
        return Err(DropReason::TooShort);
    }
    if ip[0] >> 4 != 6 {
        return Err(DropReason::BadIpHeader);
    }
    let payload = usize::from(be16(ip, field::IPV6_PAYLOAD_LEN));
    if field::IPV6_HEADER_LEN + payload > ip.len() {
        return Err(DropReason::BadIpLength);
    }
    match ip[field::IPV6_NEXT_HEADER] {
        field::IPPROTO_UDP => {}
        // Fragment header.
        44 => return Err(DropReason::Fragment),
        // Hop-by-hop, routing, destination options, AH, ESP's neighbours, mobility, HIP, shim6.
        0 | 43 | 51 | 60 | 135 | 139 | 140 => return Err(DropReason::Ipv6ExtensionHeader),
        _ => return Err(DropReason::NotUdp),
    }
    if ip[field::IPV6_HOP_LIMIT] == 0 {
        return Err(DropReason::TtlExpired);
    }
    if is_martian(IpAddr::V6(Ipv6Addr::from(array16(&ip[field::IPV6_SRC])))) {
        return Err(DropReason::MartianSource);
    }
    let l4 = l3 + field::IPV6_HEADER_LEN;
    Ok((true, l4, l4 + payload))
}

fn replace(delta: &mut ChecksumDelta, target: &mut [u8], new: &[u8]) {
    delta.replace(target, new);
    target.copy_from_slice(new);
}

fn be16(bytes: &[u8], range: core::ops::Range<usize>) -> u16 {
    u16::from_be_bytes([bytes[range.start], bytes[range.start + 1]])
}

fn mac(bytes: &[u8]) -> MacAddr {
    let mut out = [0; 6];
    out.copy_from_slice(&bytes[..6]);
    out
}

fn array4(bytes: &[u8]) -> [u8; 4] {
    let mut out = [0; 4];
    out.copy_from_slice(&bytes[..4]);
    out
}

fn array16(bytes: &[u8]) -> [u8; 16] {
    let mut out = [0; 16];
    out.copy_from_slice(&bytes[..16]);
    out
}

/// Builds well-formed frames (checksums computed from scratch): the packets of
/// `oxr-loadgen`, which the flood scenarios and the e2e bench run, and test fixtures.
pub mod build {
    use super::*;

    /// An Ethernet/IP/UDP frame from `src` to `dst` with `payload` and correct checksums.
    pub fn udp_frame(src_mac: MacAddr, dst_mac: MacAddr, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(62 + payload.len());
        frame.extend_from_slice(&dst_mac);
        frame.extend_from_slice(&src_mac);
        let udp_len = (field::UDP_HEADER_LEN + payload.len()) as u16;
        let pseudo;
        match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                frame.extend_from_slice(&field::ETHERTYPE_IPV4.to_be_bytes());
                let total = (field::IPV4_HEADER_LEN as u16) + udp_len;
                let mut ip = [0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&total.to_be_bytes());
                ip[6] = 0x40; // DF
                ip[8] = 64;
                ip[9] = field::IPPROTO_UDP;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                let sum = checksum::checksum(&ip);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                frame.extend_from_slice(&ip);
                pseudo = [&s.octets()[..], &d.octets()[..]].concat();
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                frame.extend_from_slice(&field::ETHERTYPE_IPV6.to_be_bytes());
                let mut ip = [0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
                ip[6] = field::IPPROTO_UDP;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                frame.extend_from_slice(&ip);
                pseudo = [&s.octets()[..], &d.octets()[..]].concat();
            }
            _ => panic!("mixed address families"),
        }
        let l4 = frame.len();
        frame.extend_from_slice(&src.port().to_be_bytes());
        frame.extend_from_slice(&dst.port().to_be_bytes());
        frame.extend_from_slice(&udp_len.to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(payload);
        let mut sum_input = pseudo;
        sum_input.extend_from_slice(&[0, field::IPPROTO_UDP]);
        sum_input.extend_from_slice(&udp_len.to_be_bytes());
        sum_input.extend_from_slice(&frame[l4..]);
        let sum = match checksum::checksum(&sum_input) {
            0 => 0xffff,
            s => s,
        };
        frame[l4 + 6..l4 + 8].copy_from_slice(&sum.to_be_bytes());
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::build::udp_frame;
    use super::*;

    const MAC_A: MacAddr = [2, 0, 0, 0, 0, 0xa];
    const MAC_B: MacAddr = [2, 0, 0, 0, 0, 0xb];

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn parses_ipv4_udp() {
        let frame = udp_frame(MAC_A, MAC_B, addr("10.0.0.1:1234"), addr("10.0.0.2:53"), b"hello");
        let view = UdpFrame::new_checked(&frame[..]).expect("valid");
        assert_eq!(view.src(), addr("10.0.0.1:1234"));
        assert_eq!(view.dst(), addr("10.0.0.2:53"));
        assert_eq!(view.src_mac(), MAC_A);
        assert_eq!(view.dst_mac(), MAC_B);
        assert_eq!(view.payload(), b"hello");
        assert!(view.checksums_valid());
    }

    #[test]
    fn parses_ipv6_udp() {
        let frame = udp_frame(MAC_A, MAC_B, addr("[fd00::1]:1234"), addr("[fd00::2]:53"), b"hello6");
        let view = UdpFrame::new_checked(&frame[..]).expect("valid");
        assert!(view.is_ipv6());
        assert_eq!(view.dst(), addr("[fd00::2]:53"));
        assert_eq!(view.payload(), b"hello6");
        assert!(view.checksums_valid());
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut frame = udp_frame(MAC_A, MAC_B, addr("10.0.0.1:1"), addr("10.0.0.2:2"), b"x");
        frame.resize(60, 0);
        let view = UdpFrame::new_checked(&frame[..]).expect("valid");
        assert_eq!(view.payload(), b"x");
        assert!(view.checksums_valid());
    }

    #[test]
    fn vlan_tagged_frames_are_refused_by_name() {
        let plain = udp_frame(MAC_A, MAC_B, addr("10.0.0.1:1"), addr("10.0.0.2:2"), b"v");
        for tag in [[0x81, 0x00, 0x00, 0x07], [0x88, 0xa8, 0x00, 0x07]] {
            let mut tagged = plain[..12].to_vec();
            tagged.extend_from_slice(&tag);
            tagged.extend_from_slice(&plain[12..]);
            assert_eq!(UdpFrame::new_checked(&tagged[..]).err(), Some(DropReason::VlanTagged));
        }
    }

    #[test]
    fn malformed_frames_get_named_reasons() {
        let good = udp_frame(MAC_A, MAC_B, addr("10.0.0.1:1"), addr("10.0.0.2:2"), b"payload");
        type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Mutation, DropReason)> = vec![
            ("truncated ethernet", Box::new(|f| f.truncate(10)), DropReason::TooShort),
            ("truncated ip", Box::new(|f| f.truncate(20)), DropReason::TooShort),
            ("arp", Box::new(|f| f[12..14].copy_from_slice(&[0x08, 0x06])), DropReason::InvalidEthertype),
            ("ipv4 version 5", Box::new(|f| f[14] = 0x55), DropReason::BadIpHeader),
            ("ihl 4", Box::new(|f| f[14] = 0x44), DropReason::BadIpHeader),
            ("ip options", Box::new(|f| f[14] = 0x46), DropReason::IpOptions),
            (
                "total length past frame",
                Box::new(|f| f[16..18].copy_from_slice(&2000u16.to_be_bytes())),
                DropReason::BadIpLength,
            ),
            ("more fragments", Box::new(|f| f[20] = 0x20), DropReason::Fragment),
            ("fragment offset", Box::new(|f| f[21] = 0x01), DropReason::Fragment),
            ("tcp", Box::new(|f| f[23] = 6), DropReason::NotUdp),
            ("ttl zero", Box::new(|f| f[22] = 0), DropReason::TtlExpired),
            ("loopback source", Box::new(|f| f[26] = 127), DropReason::MartianSource),
            ("multicast source", Box::new(|f| f[26] = 224), DropReason::MartianSource),
            ("broadcast source", Box::new(|f| f[26..30].copy_from_slice(&[255; 4])), DropReason::MartianSource),
            ("zero source", Box::new(|f| f[26..30].copy_from_slice(&[0; 4])), DropReason::MartianSource),
            ("udp length 7", Box::new(|f| f[38..40].copy_from_slice(&7u16.to_be_bytes())), DropReason::BadUdpLength),
            (
                "udp length past ip",
                Box::new(|f| f[38..40].copy_from_slice(&100u16.to_be_bytes())),
                DropReason::BadUdpLength,
            ),
        ];
        for (name, mutate, expected) in cases {
            let mut frame = good.clone();
            mutate(&mut frame);
            assert_eq!(UdpFrame::new_checked(&frame[..]).err(), Some(expected), "{name}");
        }
    }

    #[test]
    fn ipv6_extension_headers_and_zero_checksum_are_refused() {
        let good = udp_frame(MAC_A, MAC_B, addr("[fd00::1]:1"), addr("[fd00::2]:2"), b"p");
        let mut hop_by_hop = good.clone();
        hop_by_hop[20] = 0;
        assert_eq!(UdpFrame::new_checked(&hop_by_hop[..]).err(), Some(DropReason::Ipv6ExtensionHeader));
        let mut fragment = good.clone();
        fragment[20] = 44;
        assert_eq!(UdpFrame::new_checked(&fragment[..]).err(), Some(DropReason::Fragment));
        let mut zero_sum = good.clone();
        zero_sum[60..62].copy_from_slice(&[0, 0]);
        assert_eq!(UdpFrame::new_checked(&zero_sum[..]).err(), Some(DropReason::BadChecksum));
        let mut mapped = good;
        mapped[22..38].copy_from_slice(&"::ffff:10.0.0.1".parse::<Ipv6Addr>().expect("v6").octets());
        assert_eq!(UdpFrame::new_checked(&mapped[..]).err(), Some(DropReason::MartianSource));
    }

    #[test]
    fn rewrite_matches_a_frame_built_from_scratch() {
        for (src, dst, new_src, new_dst) in [
            ("10.0.0.1:40000", "10.0.0.2:5000", "10.1.0.1:20001", "10.1.0.2:7"),
            ("192.168.1.1:1", "172.16.0.1:65535", "1.2.3.4:65535", "9.9.9.9:1"),
            ("[fd00::1]:40000", "[fd00::2]:5000", "[fd01::1]:20001", "[fd01::2]:7"),
        ] {
            for payload in [&b""[..], b"a", b"odd-length payload", &[0xff; 1400]] {
                let mut frame = udp_frame(MAC_A, MAC_B, addr(src), addr(dst), payload);
                let to =
                    Rewrite { src_mac: MAC_B, dst_mac: [2, 0, 0, 0, 0, 0xc], src: addr(new_src), dst: addr(new_dst) };
                let mut view = UdpFrame::new_checked(&mut frame[..]).expect("valid");
                assert!(view.rewrite(&to));
                assert!(view.checksums_valid());
                let expected = udp_frame(to.src_mac, to.dst_mac, to.src, to.dst, payload);
                assert_eq!(frame, expected, "{src}->{dst} rewritten to {new_src}->{new_dst}");
            }
        }
    }

    #[test]
    fn rewrite_keeps_a_zero_ipv4_udp_checksum() {
        let mut frame = udp_frame(MAC_A, MAC_B, addr("10.0.0.1:1"), addr("10.0.0.2:2"), b"nocsum");
        frame[40..42].copy_from_slice(&[0, 0]);
        let to = Rewrite { src_mac: MAC_B, dst_mac: MAC_A, src: addr("10.0.0.3:3"), dst: addr("10.0.0.4:4") };
        let mut view = UdpFrame::new_checked(&mut frame[..]).expect("valid");
        assert!(view.rewrite(&to));
        assert_eq!(&frame[40..42], &[0, 0]);
        assert!(UdpFrame::new_checked(&frame[..]).expect("valid").checksums_valid());
    }

    #[test]
    fn rewrite_refuses_a_family_change() {
        let mut frame = udp_frame(MAC_A, MAC_B, addr("10.0.0.1:1"), addr("10.0.0.2:2"), b"x");
        let before = frame.clone();
        let to = Rewrite { src_mac: MAC_B, dst_mac: MAC_A, src: addr("[fd00::1]:1"), dst: addr("[fd00::2]:2") };
        assert!(!UdpFrame::new_checked(&mut frame[..]).expect("valid").rewrite(&to));
        assert_eq!(frame, before);
    }

    #[test]
    fn payload_can_grow_and_shrink_in_a_larger_buffer() {
        for (src, dst) in [("10.0.0.1:1", "10.0.0.2:2"), ("[fd00::1]:1", "[fd00::2]:2")] {
            let original = udp_frame(MAC_A, MAC_B, addr(src), addr(dst), b"short");
            let mut buffer = original.clone();
            buffer.resize(original.len() + 100, 0xee);
            let mut view = UdpFrame::new_checked(&mut buffer[..]).expect("valid");
            let at = view.payload_offset();
            assert!(view.set_payload_len(60));
            let end = view.len();
            buffer[at..at + 60].copy_from_slice(&[7u8; 60]);
            let mut view = UdpFrame::new_checked(&mut buffer[..end]).expect("valid after growing");
            view.recompute_udp_checksum();
            assert_eq!(&buffer[..end], &udp_frame(MAC_A, MAC_B, addr(src), addr(dst), &[7u8; 60])[..]);
            let mut view = UdpFrame::new_checked(&mut buffer[..]).expect("valid");
            assert!(!view.set_payload_len(1000), "no room");
            assert!(view.set_payload_len(2));
            view.recompute_udp_checksum();
            let end = view.len();
            assert_eq!(&buffer[..end], &udp_frame(MAC_A, MAC_B, addr(src), addr(dst), &[7u8; 2])[..]);
        }
    }

    #[test]
    fn corrupted_checksum_is_detected() {
        let mut frame = udp_frame(MAC_A, MAC_B, addr("10.0.0.1:1"), addr("10.0.0.2:2"), b"data");
        let last = frame.len() - 1;
        frame[last] ^= 0x40;
        assert!(!UdpFrame::new_checked(&frame[..]).expect("valid").checksums_valid());
    }
}
