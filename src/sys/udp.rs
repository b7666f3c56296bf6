//! Batched UDP I/O with recvmmsg(2)/sendmmsg(2) for the socket backend.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

use oxidize_relay_core::icmp::QueuedError;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Largest datagram a slot holds (a 1500-byte MTU payload fits with room to spare).
pub const SLOT_SIZE: usize = 2048;

/// Received datagrams: payload slots, source addresses and lengths, reused across calls.
#[derive(Debug)]
pub struct RecvBatch {
    buffers: Vec<u8>,
    sources: Vec<libc::sockaddr_storage>,
    lengths: Vec<usize>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    count: usize,
}

// SAFETY: the raw pointers inside iovecs/headers only ever point into this
// struct's own buffers and are rebuilt before each use.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(slots: usize) -> Self {
        RecvBatch {
            buffers: vec![0; slots * SLOT_SIZE],
            // SAFETY: sockaddr_storage is plain data for which all-zero is valid.
            sources: vec![unsafe { zeroed() }; slots],
            lengths: vec![0; slots],
            iovecs: Vec::with_capacity(slots),
            headers: Vec::with_capacity(slots),
            count: 0,
        }
    }

    /// Receives up to a batch of datagrams from `fd` (non-blocking); `Ok(0)` when none wait.
    pub fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        let slots = self.lengths.len();
        self.iovecs.clear();
        self.headers.clear();
        for (slot, source) in self.buffers.chunks_exact_mut(SLOT_SIZE).zip(self.sources.iter_mut()) {
            self.iovecs.push(libc::iovec { iov_base: slot.as_mut_ptr().cast(), iov_len: SLOT_SIZE });
            // SAFETY: msghdr is plain data; all-zero is valid and the fields that matter are set below.
            let mut header: libc::mmsghdr = unsafe { zeroed() };
            header.msg_hdr.msg_name = (source as *mut libc::sockaddr_storage).cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
            self.headers.push(header);
        }
        for (header, iovec) in self.headers.iter_mut().zip(self.iovecs.iter_mut()) {
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
        }
        // MSG_TRUNC: the kernel reports each datagram's real length, so one that did not fit is known.
        let flags = libc::MSG_DONTWAIT | libc::MSG_TRUNC;
        // SAFETY: every header points at a live iovec and sockaddr_storage of this batch, sized as declared.
        let received =
            unsafe { libc::recvmmsg(fd, self.headers.as_mut_ptr(), slots as u32, flags, std::ptr::null_mut()) };
        if received < 0 {
            let error = io::Error::last_os_error();
            self.count = 0;
            return if error.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(error) };
        }
        self.count = received as usize;
        for (length, header) in self.lengths.iter_mut().zip(&self.headers).take(self.count) {
            *length = header.msg_len as usize;
        }
        Ok(self.count)
    }

    /// The whole datagrams of the last `receive`: (source, the whole slot, payload
    /// length). The slot has room after the payload for rewriting it in place.
    /// Datagrams larger than a slot are left out (see [`truncated`](Self::truncated)).
    pub fn datagrams_mut(&mut self) -> impl Iterator<Item = (Option<SocketAddr>, &mut [u8], usize)> {
        self.sources
            .iter()
            .zip(self.buffers.chunks_exact_mut(SLOT_SIZE))
            .zip(&self.lengths)
            .take(self.count)
            .filter(|(_, length)| **length <= SLOT_SIZE)
            .map(|((source, slot), &length)| (socket_addr(source), slot, length))
    }

    /// Datagrams of the last `receive` too large for a slot: the kernel cut them, so they are not relayed.
    pub fn truncated(&self) -> usize {
        self.lengths.iter().take(self.count).filter(|&&length| length > SLOT_SIZE).count()
    }
}

/// Converts a kernel-filled socket address to std's type (IPv4 and IPv6 only).
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in, which it is large and aligned enough for.
            let v4 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((u32::from_be(v4.sin_addr.s_addr).to_be_bytes(), u16::from_be(v4.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let v6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::from((v6.sin6_addr.s6_addr, u16::from_be(v6.sin6_port))))
        }
        _ => None,
    }
}

/// Datagrams queued for one socket, sent with one sendmmsg per flush.
#[derive(Debug)]
pub struct SendBatch {
    buffers: Vec<u8>,
    destinations: Vec<Option<SockAddr>>,
    lengths: Vec<usize>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

// SAFETY: as for RecvBatch, pointers are rebuilt from owned buffers before each use.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(slots: usize) -> Self {
        SendBatch {
            buffers: vec![0; slots * SLOT_SIZE],
            destinations: Vec::with_capacity(slots),
            lengths: Vec::with_capacity(slots),
            iovecs: Vec::with_capacity(slots),
            headers: Vec::with_capacity(slots),
        }
    }

    pub fn is_full(&self) -> bool {
        self.lengths.len() * SLOT_SIZE == self.buffers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Queues `payload` (truncated to a slot) for `destination` (`None` on a connected socket).
    pub fn push(&mut self, destination: Option<SocketAddr>, payload: &[u8]) {
        let index = self.lengths.len();
        let length = payload.len().min(SLOT_SIZE);
        self.buffers[index * SLOT_SIZE..index * SLOT_SIZE + length].copy_from_slice(&payload[..length]);
        self.destinations.push(destination.map(SockAddr::from));
        self.lengths.push(length);
    }

    /// Sends everything queued with sendmmsg.
    pub fn flush(&mut self, fd: RawFd) -> Flushed {
        let queued = self.lengths.len();
        self.iovecs.clear();
        self.headers.clear();
        for (index, length) in self.lengths.iter().enumerate() {
            let slot = &mut self.buffers[index * SLOT_SIZE..];
            self.iovecs.push(libc::iovec { iov_base: slot.as_mut_ptr().cast(), iov_len: *length });
        }
        for (iovec, destination) in self.iovecs.iter_mut().zip(&self.destinations) {
            // SAFETY: msghdr is plain data; all-zero is valid.
            let mut header: libc::mmsghdr = unsafe { zeroed() };
            if let Some(address) = destination {
                header.msg_hdr.msg_name = address.as_ptr() as *mut libc::c_void;
                header.msg_hdr.msg_namelen = address.len();
            }
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            self.headers.push(header);
        }
        let (mut next, mut sent, mut bytes, mut oversize) = (0, 0, 0, 0);
        while next < queued {
            // SAFETY: headers[next..] point at live iovecs and addresses owned by this batch.
            let result = unsafe { libc::sendmmsg(fd, self.headers[next..].as_mut_ptr(), (queued - next) as u32, 0) };
            if result > 0 {
                let done = result as usize;
                bytes += self.lengths[next..next + done].iter().sum::<usize>();
                (next, sent) = (next + done, sent + done);
                continue;
            }
            // Larger than the path takes (the socket refuses to fragment): only this one is refused.
            if io::Error::last_os_error().raw_os_error() == Some(libc::EMSGSIZE) {
                (next, oversize) = (next + 1, oversize + 1);
                continue;
            }
            // A full socket buffer or an ICMP error from a previous send: drop the rest, counted by the caller.
            break;
        }
        self.destinations.clear();
        self.lengths.clear();
        Flushed { sent, bytes, oversize, dropped: queued - next }
    }
}

/// What one [`SendBatch::flush`] did with the queued datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub sent: usize,
    /// Payload bytes of the sent datagrams.
    pub bytes: usize,
    /// Refused as larger than the path MTU (EMSGSIZE); the rest of the batch still went.
    pub oversize: usize,
    /// Not sent (a full socket buffer, a pending error).
    pub dropped: usize,
}

/// Where a queued error came from (`sock_extended_err.ee_origin`).
const SO_EE_ORIGIN_LOCAL: u8 = 1;
const SO_EE_ORIGIN_ICMP: u8 = 2;
const SO_EE_ORIGIN_ICMP6: u8 = 3;

/// Makes `fd` report what the path does to its datagrams, as the AF_XDP backend's MTU check
/// and ICMP steering do: the kernel queues ICMP errors about them with their details
/// (IP_RECVERR), and sends them with DF, never fragmented here (PMTUDISC_DO): a datagram
/// larger than the path MTU is refused with EMSGSIZE and reported on the queue with that MTU.
pub fn report_path_errors(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let options = if ipv6 {
        [
            (libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1),
            (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER, libc::IPV6_PMTUDISC_DO),
        ]
    } else {
        [(libc::IPPROTO_IP, libc::IP_RECVERR, 1), (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO)]
    };
    for (level, name, value) in options {
        let value: libc::c_int = value;
        // SAFETY: an int option, passed with its size.
        let result = unsafe {
            libc::setsockopt(fd, level, name, (&raw const value).cast(), size_of::<libc::c_int>() as libc::socklen_t)
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One entry of a socket's error queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// The queue is empty.
    Empty,
    /// An ICMP error, its quoted payload's first `payload_len` bytes copied out.
    Icmp { error: QueuedError, payload_len: usize },
    /// A datagram this host refused to send as larger than the path MTU `mtu` (EMSGSIZE).
    TooBig { mtu: u32, payload_len: usize },
    /// Anything else: taken off the queue, nothing to relay.
    Other,
}

/// Takes the oldest entry of `fd`'s error queue (see [`report_path_errors`]), its quoted payload into `payload`.
pub fn take_queued_error(fd: RawFd, payload: &mut [u8]) -> io::Result<Queued> {
    // Room for a cmsghdr, a sock_extended_err and the offender's sockaddr_in6, aligned.
    let mut control = [0u64; 16];
    let mut iovec = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    // SAFETY: msghdr is plain data; all-zero is valid and the fields that matter are set below.
    let mut message: libc::msghdr = unsafe { zeroed() };
    message.msg_iov = &mut iovec;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of::<[u64; 16]>();
    // SAFETY: the iovec and control buffer are live for the call and sized as declared.
    let received = unsafe { libc::recvmsg(fd, &mut message, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if received < 0 {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::WouldBlock { Ok(Queued::Empty) } else { Err(error) };
    }
    let payload_len = (received as usize).min(payload.len());
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_FIRSTHDR/NXTHDR stay within it.
    let mut header = unsafe { libc::CMSG_FIRSTHDR(&message) };
    while !header.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR points at a whole cmsghdr in `control`.
        let (level, kind) = unsafe { ((*header).cmsg_level, (*header).cmsg_type) };
        if (level, kind) == (libc::SOL_IP, libc::IP_RECVERR) || (level, kind) == (libc::SOL_IPV6, libc::IPV6_RECVERR) {
            // SAFETY: an IP(V6)_RECVERR cmsg carries a sock_extended_err followed by the offender's
            // address (SO_EE_OFFENDER); both are read unaligned, as cmsg data need not be aligned for them.
            let (extended, offender) = unsafe {
                let data = libc::CMSG_DATA(header);
                let extended = std::ptr::read_unaligned(data.cast::<libc::sock_extended_err>());
                let offender_at = data.add(size_of::<libc::sock_extended_err>());
                (extended, offender_address(offender_at))
            };
            if extended.ee_origin == SO_EE_ORIGIN_LOCAL && extended.ee_errno == libc::EMSGSIZE as u32 {
                return Ok(Queued::TooBig { mtu: extended.ee_info, payload_len });
            }
            if !matches!(extended.ee_origin, SO_EE_ORIGIN_ICMP | SO_EE_ORIGIN_ICMP6) {
                return Ok(Queued::Other);
            }
            let Some(from) = offender else { return Ok(Queued::Other) };
            let error = QueuedError { kind: extended.ee_type, code: extended.ee_code, info: extended.ee_info, from };
            return Ok(Queued::Icmp { error, payload_len });
        }
        // SAFETY: `header` is a valid cmsghdr of `message`.
        header = unsafe { libc::CMSG_NXTHDR(&message, header) };
    }
    Ok(Queued::Other)
}

/// The address at `at` (a sockaddr_in or sockaddr_in6, by its family).
///
/// # Safety
/// `at` must point at a sockaddr the kernel wrote, with room for a sockaddr_in6.
unsafe fn offender_address(at: *const u8) -> Option<IpAddr> {
    // SAFETY: the caller guarantees a sockaddr at `at`; every read is unaligned and within a sockaddr_in6.
    unsafe {
        match i32::from(std::ptr::read_unaligned(at.cast::<libc::sa_family_t>())) {
            libc::AF_INET => {
                let v4 = std::ptr::read_unaligned(at.cast::<libc::sockaddr_in>());
                Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
            }
            libc::AF_INET6 => {
                let v6 = std::ptr::read_unaligned(at.cast::<libc::sockaddr_in6>());
                Some(IpAddr::from(v6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

/// Raw sockets that send whole IP packets (IPPROTO_RAW: the header is the caller's, and the
/// socket receives nothing), opened during setup while CAP_NET_RAW is held.
#[derive(Debug)]
pub struct RawSender {
    v4: Option<Socket>,
    v6: Option<Socket>,
}

impl RawSender {
    /// Either family may be missing (no CAP_NET_RAW, no IPv6): its sends then fail.
    pub fn open() -> io::Result<Self> {
        let open = |domain| {
            let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
            socket.set_nonblocking(true)?;
            Ok::<_, io::Error>(socket)
        };
        let v4 = open(Domain::IPV4);
        let v6 = open(Domain::IPV6).ok();
        Ok(RawSender { v4: Some(v4?), v6 })
    }

    /// Sends the IP packet `packet` (headers included) to `to`.
    pub fn send(&self, packet: &[u8], to: IpAddr) -> io::Result<()> {
        let socket = match to {
            IpAddr::V4(_) => self.v4.as_ref(),
            IpAddr::V6(_) => self.v6.as_ref(),
        };
        let socket = socket.ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
        socket.send_to(packet, &SockAddr::from(SocketAddr::new(to, 0))).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn batches_round_trip_over_loopback() {
        let receiver = UdpSocket::bind("127.0.0.1:0").expect("bind");
        receiver.set_nonblocking(true).expect("nonblocking");
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut out = SendBatch::new(8);
        for i in 0..5u8 {
            out.push(Some(receiver.local_addr().expect("addr")), &vec![i; 100 + usize::from(i)]);
        }
        assert_eq!(out.flush(sender.as_raw_fd()), Flushed { sent: 5, bytes: 510, oversize: 0, dropped: 0 });
        let mut batch = RecvBatch::new(8);
        let mut got = Vec::new();
        while got.len() < 5 {
            batch.receive(receiver.as_raw_fd()).expect("recvmmsg");
            got.extend(batch.datagrams_mut().map(|(from, slot, len)| (from, slot[..len].to_vec())));
        }
        for (i, (from, data)) in got.iter().enumerate() {
            assert_eq!(*from, Some(sender.local_addr().expect("addr")));
            assert_eq!(data, &vec![i as u8; 100 + i]);
        }
        assert_eq!(batch.receive(receiver.as_raw_fd()).expect("empty"), 0);
    }

    #[test]
    fn a_closed_port_queues_the_kernels_port_unreachable_with_the_payload() {
        // The loopback kernel answers a datagram to a closed port with ICMP port unreachable.
        let closed = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let target = closed.local_addr().expect("addr");
        drop(closed);
        let sender = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sender.connect(target).expect("connect");
        report_path_errors(sender.as_raw_fd(), false).expect("IP_RECVERR");
        sender.send(b"hello").expect("send");
        let mut payload = [0u8; 64];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let queued = loop {
            match take_queued_error(sender.as_raw_fd(), &mut payload).expect("recvmsg") {
                Queued::Empty if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                other => break other,
            }
        };
        let expected = QueuedError { kind: 3, code: 3, info: 0, from: "127.0.0.1".parse().expect("ip") };
        assert_eq!(queued, Queued::Icmp { error: expected, payload_len: 5 });
        assert_eq!(&payload[..5], b"hello");
        assert_eq!(take_queued_error(sender.as_raw_fd(), &mut payload).expect("recvmsg"), Queued::Empty);
    }
}
