//! Route and neighbour lookups over rtnetlink, and the nudge that makes the
//! kernel resolve a neighbour it does not know yet.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use oxidize_relay_core::wire::MacAddr;

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const GENL_ID_CTRL: u16 = 0x10;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// Neighbour states whose link-layer address can be used.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;
/// Not confirmed lately: the kernel re-probes it only when its own traffic uses it.
const NUD_STALE: u16 = 0x04;

/// A usable neighbour entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbor {
    pub mac: MacAddr,
    /// STALE: the MAC may be outdated (the host may have a new one) until the kernel confirms it.
    pub stale: bool,
}
/// The discard port: a datagram there makes the kernel resolve the neighbour and is ignored by the peer.
const DISCARD_PORT: u16 = 9;

/// The kernel's answer to "how do I reach this address".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub ifindex: u32,
    /// The neighbour to send to: the gateway, or the destination itself when on-link.
    pub next_hop: IpAddr,
    pub preferred_source: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a NETLINK_ROUTE socket failed")]
    Socket(#[source] io::Error),
    #[error("netlink {operation} for {address} failed")]
    Request {
        operation: &'static str,
        address: IpAddr,
        #[source]
        source: io::Error,
    },
    #[error("netlink {operation} for {address} returned a malformed reply")]
    Malformed { operation: &'static str, address: IpAddr },
}

/// A netlink socket for one-shot requests from the control thread.
#[derive(Debug)]
pub struct RouteSocket {
    fd: OwnedFd,
    sequence: u32,
}

/// XDP capabilities a driver advertises (the kernel's `netdev` family, Linux 6.3+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpFeatures(pub u64);

impl XdpFeatures {
    /// Native (driver) XDP.
    pub fn native(self) -> bool {
        self.0 & 1 != 0
    }

    /// AF_XDP zero-copy.
    pub fn zero_copy(self) -> bool {
        self.0 & 8 != 0
    }
}

impl RouteSocket {
    /// A NETLINK_ROUTE socket.
    pub fn open() -> Result<Self, NetlinkError> {
        Self::open_protocol(libc::NETLINK_ROUTE)
    }

    /// What the driver of `ifindex` advertises for XDP, or `None` where the
    /// kernel predates the `netdev` generic netlink family.
    pub fn xdp_features(ifindex: u32) -> Result<Option<XdpFeatures>, NetlinkError> {
        let mut generic = Self::open_protocol(libc::NETLINK_GENERIC)?;
        let unspecified = IpAddr::from([0, 0, 0, 0]);
        // CTRL_CMD_GETFAMILY (3), version 1, with CTRL_ATTR_FAMILY_NAME (2).
        let mut body = vec![3, 1, 0, 0];
        push_attr(&mut body, 2, b"netdev\0");
        let family = match generic.request(GENL_ID_CTRL, &body, "CTRL_CMD_GETFAMILY", unspecified) {
            Ok((_, payload)) => attrs(payload.get(4..).unwrap_or_default())
                .find(|(kind, value)| *kind == 1 && value.len() == 2)
                .map(|(_, value)| u16::from_ne_bytes([value[0], value[1]])),
            Err(NetlinkError::Request { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        let Some(family) = family else { return Ok(None) };
        // NETDEV_CMD_DEV_GET (1) with NETDEV_A_DEV_IFINDEX (1); the answer carries NETDEV_A_DEV_XDP_FEATURES (3).
        let mut body = vec![1, 1, 0, 0];
        push_attr(&mut body, 1, &ifindex.to_ne_bytes());
        let (_, payload) = generic.request(family, &body, "NETDEV_CMD_DEV_GET", unspecified)?;
        Ok(attrs(payload.get(4..).unwrap_or_default())
            .find(|(kind, value)| *kind == 3 && value.len() == 8)
            .map(|(_, value)| XdpFeatures(u64::from_ne_bytes(value.try_into().unwrap_or([0; 8])))))
    }

    fn open_protocol(protocol: libc::c_int) -> Result<Self, NetlinkError> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval { tv_sec: 1, tv_usec: 0 };
        // SAFETY: setting SO_RCVTIMEO with a correctly sized timeval on our own socket.
        let err = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as u32,
            )
        };
        if err != 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        Ok(RouteSocket { fd, sequence: 0 })
    }

    /// `ip route get ADDRESS`.
    pub fn route_to(&mut self, address: IpAddr) -> Result<Route, NetlinkError> {
        let operation = "RTM_GETROUTE";
        let (family, bytes) = family_and_bytes(address);
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags(u32)
        let mut body = vec![family, (bytes.len() * 8) as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        push_attr(&mut body, RTA_DST, &bytes);
        let reply = self.request(RTM_GETROUTE, &body, operation, address)?;
        let malformed = || NetlinkError::Malformed { operation, address };
        let (kind, payload) = reply;
        if kind != RTM_NEWROUTE || payload.len() < 12 {
            return Err(malformed());
        }
        let mut ifindex = None;
        let mut gateway = None;
        let mut preferred_source = None;
        for (kind, value) in attrs(&payload[12..]) {
            match kind {
                RTA_OIF if value.len() == 4 => {
                    ifindex = Some(u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
                }
                RTA_GATEWAY => gateway = ip_from(value),
                RTA_PREFSRC => preferred_source = ip_from(value),
                _ => {}
            }
        }
        Ok(Route { ifindex: ifindex.ok_or_else(malformed)?, next_hop: gateway.unwrap_or(address), preferred_source })
    }

    /// `ip neigh get ADDRESS dev IFINDEX`: the entry when it is usable, `None` otherwise.
    pub fn neighbor(&mut self, ifindex: u32, address: IpAddr) -> Result<Option<Neighbor>, NetlinkError> {
        let operation = "RTM_GETNEIGH";
        let (family, bytes) = family_and_bytes(address);
        // struct ndmsg: family, pad1, pad2(u16), ifindex(i32), state(u16), flags(u8), type(u8)
        let mut body = vec![family, 0, 0, 0];
        body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        body.extend_from_slice(&[0, 0, 0, 0]);
        push_attr(&mut body, NDA_DST, &bytes);
        let (kind, payload) = match self.request(RTM_GETNEIGH, &body, operation, address) {
            Ok(reply) => reply,
            Err(NetlinkError::Request { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(None);
            }
            Err(error) => return Err(error),
        };
        if kind != RTM_NEWNEIGH || payload.len() < 12 {
            return Err(NetlinkError::Malformed { operation, address });
        }
        let state = u16::from_ne_bytes([payload[8], payload[9]]);
        if state & NUD_USABLE == 0 {
            return Ok(None);
        }
        Ok(attrs(&payload[12..]).find(|(kind, value)| *kind == NDA_LLADDR && value.len() == 6).map(|(_, value)| {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(value);
            Neighbor { mac, stale: state & NUD_STALE != 0 }
        }))
    }

    fn request(
        &mut self,
        kind: u16,
        body: &[u8],
        operation: &'static str,
        address: IpAddr,
    ) -> Result<(u16, Vec<u8>), NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut message = Vec::with_capacity(NLMSG_HDR_LEN + body.len());
        message.extend_from_slice(&((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        message.extend_from_slice(&self.sequence.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(body);
        let failed = |source| NetlinkError::Request { operation, address, source };
        // SAFETY: sending our own buffer on our own socket; the kernel is the default destination of a netlink socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
        if sent < 0 {
            return Err(failed(io::Error::last_os_error()));
        }
        let mut buffer = vec![0u8; 16384];
        loop {
            // SAFETY: receiving into a buffer we own, of the length given.
            let received = unsafe { libc::recv(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            if received < 0 {
                return Err(failed(io::Error::last_os_error()));
            }
            let reply = &buffer[..received as usize];
            if reply.len() < NLMSG_HDR_LEN {
                return Err(NetlinkError::Malformed { operation, address });
            }
            let length = (u32::from_ne_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize).min(reply.len());
            let reply_kind = u16::from_ne_bytes([reply[4], reply[5]]);
            let sequence = u32::from_ne_bytes([reply[8], reply[9], reply[10], reply[11]]);
            if sequence != self.sequence || length < NLMSG_HDR_LEN {
                continue; // a late answer to an earlier, timed-out request
            }
            let payload = &reply[NLMSG_HDR_LEN..length];
            if reply_kind == NLMSG_ERROR {
                let code = payload.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                return Err(failed(io::Error::from_raw_os_error(-code)));
            }
            return Ok((reply_kind, payload.to_vec()));
        }
    }
}

/// Makes the kernel start neighbour resolution toward `address` by sending an
/// empty datagram to its discard port through the ordinary stack.
pub fn nudge_neighbor(address: IpAddr) -> io::Result<()> {
    let bind: SocketAddr = match address {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let socket = UdpSocket::bind(bind)?;
    socket.send_to(&[], SocketAddr::new(address, DISCARD_PORT)).map(|_| ())
}

fn family_and_bytes(address: IpAddr) -> (u8, Vec<u8>) {
    match address {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    }
}

fn push_attr(buffer: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let length = 4 + value.len();
    buffer.extend_from_slice(&(length as u16).to_ne_bytes());
    buffer.extend_from_slice(&kind.to_ne_bytes());
    buffer.extend_from_slice(value);
    buffer.resize(buffer.len() + (align4(length) - length), 0);
}

/// Iterates (type, value) over netlink attributes, stopping at the first malformed one.
fn attrs(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let length = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & 0x3fff;
        if length < 4 || length > bytes.len() {
            return None;
        }
        let value = &bytes[4..length];
        bytes = &bytes[align4(length).min(bytes.len())..];
        Some((kind, value))
    })
}

fn ip_from(value: &[u8]) -> Option<IpAddr> {
    match value.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(value).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(value).ok()?)),
        _ => None,
    }
}

fn align4(length: usize) -> usize {
    (length + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding() {
        let mut buffer = Vec::new();
        push_attr(&mut buffer, RTA_DST, &[10, 0, 0, 1]);
        push_attr(&mut buffer, NDA_LLADDR, &[2, 0, 0, 0, 0, 1]);
        push_attr(&mut buffer, RTA_OIF, &7u32.to_ne_bytes());
        assert_eq!(buffer.len() % 4, 0);
        let parsed: Vec<_> = attrs(&buffer).collect();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[1], (NDA_LLADDR, &[2u8, 0, 0, 0, 0, 1][..]));
        assert_eq!(ip_from(parsed[0].1), Some("10.0.0.1".parse().expect("ip")));
    }

    #[test]
    fn truncated_attributes_stop_cleanly() {
        let mut buffer = Vec::new();
        push_attr(&mut buffer, RTA_DST, &[10, 0, 0, 1]);
        buffer.extend_from_slice(&[200, 0, 1, 0]);
        assert_eq!(attrs(&buffer).count(), 1);
    }

    #[test]
    fn loopback_route_is_found() {
        // Needs only a NETLINK_ROUTE socket, which any user may open.
        let mut socket = RouteSocket::open().expect("netlink socket");
        let route = socket.route_to("127.0.0.1".parse().expect("ip")).expect("route to loopback");
        assert!(route.ifindex > 0);
    }
}
