//! AF_XDP sockets through xsk-rs: one UMEM per worker shared by that worker's
//! sockets on every interface, so a frame received on one interface is sent
//! from another without a copy. Every unsafe ring call lives here.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};

use xsk_rs::config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
pub use xsk_rs::umem::frame::DataMut;
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// Ring sizes: twice the largest burst keeps producers from stalling on consumers.
const RING_SIZE: u32 = 2048;
const SOL_XDP: libc::c_int = 283;
const XDP_OPTIONS: libc::c_int = 8;
const XDP_OPTIONS_ZEROCOPY: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("invalid UMEM geometry: {0}")]
    Geometry(String),
    #[error("creating the UMEM ({frames} frames of {frame_size} bytes) failed; check `ulimit -l` (memlock)")]
    Umem {
        frames: u32,
        frame_size: u32,
        #[source]
        source: io::Error,
    },
    #[error("creating the AF_XDP socket on {interface} queue {queue} failed")]
    Socket {
        interface: String,
        queue: u32,
        #[source]
        source: io::Error,
    },
    #[error("the AF_XDP socket on {interface} queue {queue} got no fill/completion rings (queue bound twice?)")]
    MissingRings { interface: String, queue: u32 },
}

/// A worker's frames: one UMEM split into security domains (client-facing and
/// upstream-facing in a two-arm relay). Each socket refills from its own domain
/// and every frame returns to the domain it belongs to by address, so a flood on
/// one side can hold at most that side's frames.
#[derive(Debug)]
pub struct FramePool {
    umem: Umem,
    domains: Vec<Domain>,
    /// Bytes of UMEM per domain: a frame's address divided by this is its domain.
    domain_bytes: usize,
    pub hugepages: bool,
}

/// The frames of one domain that userspace holds, and what moved through it.
#[derive(Debug)]
struct Domain {
    free: Vec<FrameDesc>,
    capacity: usize,
    stats: PoolStats,
}

/// Frame movements of one domain since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Frames handed to the kernel's fill ring or taken for sending.
    pub allocs: u64,
    /// Frames returned (dropped, or transmitted and completed).
    pub frees: u64,
    /// Times a refill found no free frame for room in the fill ring.
    pub failures: u64,
}

impl FramePool {
    /// Maps `frames` frames of `frame_size` bytes, on 2 MiB hugepages when asked
    /// and available, otherwise on normal pages (the caller logs which), split
    /// evenly into `domains` domains.
    pub fn new(frames: u32, frame_size: u32, hugepages: bool, domains: usize) -> Result<Self, XskError> {
        let geometry = |e: &dyn std::fmt::Display| XskError::Geometry(e.to_string());
        let size = FrameSize::new(frame_size).map_err(|e| geometry(&e))?;
        let ring = QueueSize::new(RING_SIZE).map_err(|e| geometry(&e))?;
        let config = UmemConfig::builder()
            .frame_size(size)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| geometry(&e))?;
        let count = NonZeroU32::new(frames).ok_or_else(|| XskError::Geometry("zero frames".into()))?;
        let create = |huge| {
            Umem::new(config, count, huge).map_err(|e| XskError::Umem {
                frames,
                frame_size,
                source: io::Error::other(e.to_string()),
            })
        };
        let (umem, descs, hugepages) = match hugepages.then(|| create(true)) {
            Some(Ok((umem, descs))) => (umem, descs, true),
            _ => {
                let (umem, descs) = create(false)?;
                (umem, descs, false)
            }
        };
        let domain_count = domains.max(1);
        let frames_per_domain = descs.len() / domain_count;
        let domains = descs
            .chunks(frames_per_domain)
            .take(domain_count)
            .map(|chunk| Domain { free: chunk.to_vec(), capacity: chunk.len(), stats: PoolStats::default() })
            .collect();
        let domain_bytes = (frames_per_domain * frame_size as usize).max(1);
        Ok(FramePool { umem, domains, domain_bytes, hugepages })
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Frames of `domain` owned by the kernel or in flight.
    pub fn in_use(&self, domain: usize) -> usize {
        self.domains.get(domain).map_or(0, |d| d.capacity - d.free.len())
    }

    pub fn capacity(&self, domain: usize) -> usize {
        self.domains.get(domain).map_or(0, |d| d.capacity)
    }

    pub fn stats(&self, domain: usize) -> PoolStats {
        self.domains.get(domain).map_or_else(PoolStats::default, |d| d.stats)
    }

    /// Takes a free frame of `domain` (for generating traffic), if any.
    pub fn take(&mut self, domain: usize) -> Option<FrameDesc> {
        let domain = self.domains.get_mut(domain)?;
        let frame = domain.free.pop();
        match frame {
            Some(_) => domain.stats.allocs += 1,
            None => domain.stats.failures += 1,
        }
        frame
    }

    /// Returns a frame to the domain its address belongs to.
    #[inline]
    pub fn release(&mut self, desc: FrameDesc) {
        let index = match self.domains.len() {
            1 => 0,
            count => (desc.addr() / self.domain_bytes).min(count - 1),
        };
        let domain = &mut self.domains[index];
        domain.stats.frees += 1;
        domain.free.push(desc);
    }

    /// The packet bytes of a received frame, for in-place rewriting.
    #[inline]
    pub fn packet_mut<'a>(&'a self, desc: &'a mut FrameDesc) -> DataMut<'a> {
        // SAFETY: every FrameDesc the worker holds came from this pool's UMEM
        // (Umem::new or a ring of a socket on it), and the worker holds each
        // descriptor exactly once, so no other reference to this frame exists.
        unsafe { self.umem.data_mut(desc) }
    }
}

/// An AF_XDP socket bound to one (interface, queue), with its own rings on the shared UMEM.
#[derive(Debug)]
pub struct QueueSocket {
    rx: RxQueue,
    tx: TxQueue,
    fill: FillQueue,
    completion: CompQueue,
    /// Frames handed to the TX ring and not yet completed.
    tx_in_flight: usize,
    /// The pool domain this socket's fill ring draws from.
    domain: usize,
    pub zero_copy: bool,
}

impl QueueSocket {
    /// Binds a socket on `interface`/`queue` to `pool`'s UMEM. The relay's own
    /// XDP program steers traffic, so libxdp's default program is never loaded.
    pub fn bind(pool: &FramePool, interface: &str, queue: u32, domain: usize) -> Result<Self, XskError> {
        let failed = |source| XskError::Socket { interface: interface.to_owned(), queue, source };
        let name: Interface = interface.parse().map_err(|_| failed(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let ring = QueueSize::new(RING_SIZE).map_err(|e| XskError::Geometry(e.to_string()))?;
        let config = SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(BindFlags::XDP_USE_NEED_WAKEUP)
            .build();
        // SAFETY: INHIBIT_PROG_LOAD is set, as Socket::new requires when a UMEM is shared.
        let (tx, rx, rings) = unsafe { Socket::new(config, &pool.umem, &name, queue) }
            .map_err(|e| failed(io::Error::other(e.to_string())))?;
        let (fill, completion) =
            rings.ok_or_else(|| XskError::MissingRings { interface: interface.to_owned(), queue })?;
        let zero_copy = xdp_options(rx.fd().as_raw_fd()).is_ok_and(|o| o & XDP_OPTIONS_ZEROCOPY != 0);
        Ok(QueueSocket {
            rx,
            tx,
            fill,
            completion,
            tx_in_flight: 0,
            domain: domain.min(pool.domain_count() - 1),
            zero_copy,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// Hands free frames of this socket's domain to the kernel for receiving; returns how many.
    pub fn refill(&mut self, pool: &mut FramePool, max: usize) -> usize {
        let room = (self.fill.nb_free(max as u32) as usize).min(max);
        let domain = &mut pool.domains[self.domain];
        let wanted = room.min(domain.free.len());
        if wanted < room {
            domain.stats.failures += 1;
        }
        if wanted == 0 {
            return 0;
        }
        let start = domain.free.len() - wanted;
        // SAFETY: these descriptors belong to pool's UMEM (shared by this socket) and
        // are owned by userspace; the ones produced become the kernel's.
        let produced = unsafe { self.fill.produce(&domain.free[start..]) };
        domain.free.truncate(domain.free.len() - produced);
        domain.stats.allocs += produced as u64;
        produced
    }

    /// Whether the kernel asked to be woken to process the fill ring.
    pub fn fill_needs_wakeup(&self) -> bool {
        self.fill.needs_wakeup()
    }

    /// Receives up to `descs.len()` frames.
    #[inline]
    pub fn receive(&mut self, descs: &mut [FrameDesc]) -> usize {
        // SAFETY: the RX ring only returns frames of the UMEM this socket is bound to.
        unsafe { self.rx.consume(descs) }
    }

    /// Queues frames for transmission; returns how many the TX ring took (a prefix).
    #[inline]
    pub fn transmit(&mut self, descs: &[FrameDesc]) -> usize {
        // SAFETY: these frames belong to the shared UMEM and are owned by
        // userspace; those produced become the kernel's until completion.
        let produced = unsafe { self.tx.produce(descs) };
        self.tx_in_flight += produced;
        produced
    }

    /// Whether frames wait in the TX ring or for completion.
    pub fn tx_pending(&self) -> bool {
        self.tx_in_flight > 0
    }

    /// Whether the kernel has yet to take frames from the TX ring. In copy mode
    /// one wakeup sends at most 32 frames, so the worker kicks again while this holds;
    /// frames already taken only wait for their completion, which needs no kick.
    pub fn tx_unsent(&mut self) -> bool {
        self.tx_in_flight > 0 && self.tx.nb_free_exact() < RING_SIZE
    }

    /// Kicks the kernel to send if it asked for it; returns whether a syscall was made.
    #[inline]
    pub fn wake_tx_if_needed(&mut self) -> bool {
        if !self.tx.needs_wakeup() {
            return false;
        }
        // EAGAIN/EBUSY/ENOBUFS mean "try again next batch": nothing is lost, the frames stay queued.
        let _ = self.tx.wakeup();
        true
    }

    /// Returns frames whose transmission completed to `pool`; returns how many.
    pub fn reclaim(&mut self, pool: &mut FramePool, scratch: &mut [FrameDesc]) -> usize {
        // SAFETY: the completion ring only returns frames of this socket's UMEM.
        let done = unsafe { self.completion.consume(scratch) };
        for desc in &scratch[..done] {
            pool.release(*desc);
        }
        self.tx_in_flight -= done;
        done
    }
}

/// Sleeps until one of `fds` is readable or `timeout_ms` passes.
pub fn wait_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<()> {
    let mut polls: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: polls is a live array of pollfd of the length passed.
    let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, timeout_ms) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(())
}

fn xdp_options(fd: RawFd) -> io::Result<u32> {
    let mut options = 0u32;
    let mut length = size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `length` bytes into `options`.
    let err = unsafe { libc::getsockopt(fd, SOL_XDP, XDP_OPTIONS, (&raw mut options).cast(), &mut length) };
    if err != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(options)
}

/// Whether this process may open an AF_XDP socket (kernel support and CAP_NET_RAW).
pub fn af_xdp_socket_available() -> io::Result<()> {
    // SAFETY: plain socket(2); the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened by us and is not used again.
    unsafe { libc::close(fd) };
    Ok(())
}
