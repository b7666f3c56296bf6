//! Batched UDP I/O with recvmmsg(2)/sendmmsg(2) for the socket backend.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use socket2::SockAddr;

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

    /// Sends everything queued with sendmmsg; returns (datagrams sent, payload bytes sent, datagrams dropped).
    pub fn flush(&mut self, fd: RawFd) -> (usize, usize, usize) {
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
        let mut sent = 0;
        while sent < queued {
            // SAFETY: headers[sent..] point at live iovecs and addresses owned by this batch.
            let result = unsafe { libc::sendmmsg(fd, self.headers[sent..].as_mut_ptr(), (queued - sent) as u32, 0) };
            if result <= 0 {
                // A full socket buffer or an ICMP error from a previous send: drop the rest, counted by the caller.
                break;
            }
            sent += result as usize;
        }
        let bytes = self.lengths[..sent].iter().sum();
        self.destinations.clear();
        self.lengths.clear();
        (sent, bytes, queued - sent)
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
        assert_eq!(out.flush(sender.as_raw_fd()), (5, 510, 0));
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
}
