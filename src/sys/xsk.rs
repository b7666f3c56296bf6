//! AF_XDP sockets through xsk-rs: one UMEM per worker shared by that worker's
//! sockets on every interface, so a frame received on one interface is sent
//! from another without a copy. Every unsafe ring call lives here.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};

use xsk_rs::config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
pub use xsk_rs::umem::frame::DataMut;
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// Ring sizes are derived from the pool: half a domain's frames, within these bounds.
const MIN_RING: u32 = 64;
const MAX_RING: u32 = 4096;
const SOL_XDP: libc::c_int = 283;
const XDP_OPTIONS: libc::c_int = 8;
const XDP_OPTIONS_ZEROCOPY: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("{0} is not a frame size AF_XDP takes (a power of two, 2048 or 4096)")]
    FrameSize(u32, #[source] xsk_rs::config::FrameSizeError),
    #[error("{0} is not a ring size AF_XDP takes (a power of two)")]
    RingSize(u32, #[source] xsk_rs::config::QueueSizeError),
    #[error("the UMEM's settings do not fit together")]
    UmemConfig(#[source] xsk_rs::config::UmemConfigBuilderError),
    #[error("a UMEM needs at least one frame")]
    NoFrames,
    #[error("creating the UMEM ({frames} frames of {frame_size} bytes) failed; check `ulimit -l` (memlock)")]
    Umem {
        frames: u32,
        frame_size: u32,
        #[source]
        source: xsk_rs::umem::UmemCreateError,
    },
    #[error("`{0}` is not a usable interface name for an AF_XDP socket")]
    InterfaceName(String),
    #[error("creating the AF_XDP socket on {interface} queue {queue} failed")]
    Socket {
        interface: String,
        queue: u32,
        #[source]
        source: xsk_rs::socket::SocketCreateError,
    },
    #[error("the AF_XDP socket on {interface} queue {queue} got no fill/completion rings (queue bound twice?)")]
    MissingRings { interface: String, queue: u32 },
}

/// A UMEM frame userspace holds. Neither `Copy` nor `Clone`: whoever holds the
/// value owns the frame, and giving it to a ring or back to the pool consumes
/// it, so a frame cannot be released twice or touched after the kernel got it.
/// Only this module makes them, from one pool's UMEM and the rings bound to it.
#[derive(Debug)]
pub struct Frame(FrameDesc);

impl Frame {
    /// Bytes of packet data in the frame.
    pub fn len(&self) -> usize {
        self.0.lengths().data()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The kernel's counts for one AF_XDP socket (`XDP_STATISTICS`), in
/// [`KernelSocketStat::ALL`](oxidize_relay_core::counters::KernelSocketStat::ALL) order.
pub type KernelSocketStats = [u64; oxidize_relay_core::counters::KernelSocketStat::COUNT];

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
    /// Entries of every ring of the sockets on this pool.
    ring_size: u32,
    pub hugepages: bool,
}

/// The frames of one domain that userspace holds, and what moved through it.
#[derive(Debug)]
struct Domain {
    free: Vec<Frame>,
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
        let size = FrameSize::new(frame_size).map_err(|e| XskError::FrameSize(frame_size, e))?;
        let domain_count = domains.max(1);
        // Half a domain fits in the fill ring, so both halves of a two-arm pool can be receiving.
        let ring_size = (frames / domain_count as u32 / 2).clamp(MIN_RING, MAX_RING).next_power_of_two();
        let ring = QueueSize::new(ring_size).map_err(|e| XskError::RingSize(ring_size, e))?;
        let config = UmemConfig::builder()
            .frame_size(size)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(XskError::UmemConfig)?;
        let count = NonZeroU32::new(frames).ok_or(XskError::NoFrames)?;
        let create =
            |huge| Umem::new(config, count, huge).map_err(|source| XskError::Umem { frames, frame_size, source });
        let (umem, descs, hugepages) = match hugepages.then(|| create(true)) {
            Some(Ok((umem, descs))) => (umem, descs, true),
            _ => {
                let (umem, descs) = create(false)?;
                (umem, descs, false)
            }
        };
        let frames_per_domain = descs.len() / domain_count;
        let domains = descs
            .chunks(frames_per_domain)
            .take(domain_count)
            .map(|chunk| Domain {
                free: chunk.iter().copied().map(Frame).collect(),
                capacity: chunk.len(),
                stats: PoolStats::default(),
            })
            .collect();
        let domain_bytes = (frames_per_domain * frame_size as usize).max(1);
        Ok(FramePool { umem, domains, domain_bytes, ring_size, hugepages })
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

    /// Entries of each ring of a socket on this pool.
    pub fn ring_size(&self) -> u32 {
        self.ring_size
    }

    /// Takes a free frame of `domain` (for generating traffic), if any.
    pub fn take(&mut self, domain: usize) -> Option<Frame> {
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
    pub fn release(&mut self, frame: Frame) {
        let index = match self.domains.len() {
            1 => 0,
            count => (frame.0.addr() / self.domain_bytes).min(count - 1),
        };
        let domain = &mut self.domains[index];
        domain.stats.frees += 1;
        domain.free.push(frame);
    }

    /// The packet bytes of a held frame, for in-place rewriting.
    #[inline]
    pub fn packet_mut<'a>(&'a self, frame: &'a mut Frame) -> DataMut<'a> {
        // SAFETY: a Frame is only made from this pool's UMEM (Umem::new, or a
        // ring of a socket bound to it) and is neither Copy nor Clone, so the
        // `&mut Frame` is the only handle to these bytes while the borrow lasts.
        unsafe { self.umem.data_mut(&mut frame.0) }
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
    ring_size: u32,
    /// Descriptors staged for a ring operation (rings take plain descriptors); sized once.
    staging: Vec<FrameDesc>,
    /// The pool domain this socket's fill ring draws from.
    domain: usize,
    pub zero_copy: bool,
}

impl QueueSocket {
    /// Binds a socket on `interface`/`queue` to `pool`'s UMEM. The relay's own
    /// XDP program steers traffic, so libxdp's default program is never loaded.
    pub fn bind(pool: &FramePool, interface: &str, queue: u32, domain: usize) -> Result<Self, XskError> {
        let name: Interface = interface.parse().map_err(|_| XskError::InterfaceName(interface.to_owned()))?;
        let ring = QueueSize::new(pool.ring_size).map_err(|e| XskError::RingSize(pool.ring_size, e))?;
        let config = SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(BindFlags::XDP_USE_NEED_WAKEUP)
            .build();
        // SAFETY: INHIBIT_PROG_LOAD is set, as Socket::new requires when a UMEM is shared.
        let (tx, rx, rings) = unsafe { Socket::new(config, &pool.umem, &name, queue) }
            .map_err(|source| XskError::Socket { interface: interface.to_owned(), queue, source })?;
        let (fill, completion) =
            rings.ok_or_else(|| XskError::MissingRings { interface: interface.to_owned(), queue })?;
        let zero_copy = xdp_options(rx.fd().as_raw_fd()).is_ok_and(|o| o & XDP_OPTIONS_ZEROCOPY != 0);
        Ok(QueueSocket {
            rx,
            tx,
            fill,
            completion,
            tx_in_flight: 0,
            ring_size: pool.ring_size,
            staging: Vec::with_capacity(pool.ring_size as usize),
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
        self.staging.clear();
        self.staging.extend(domain.free[start..].iter().map(|frame| frame.0));
        // SAFETY: these frames belong to pool's UMEM (shared by this socket) and are
        // held by userspace; the ones produced become the kernel's, and their Frame
        // tokens are dropped below so userspace no longer holds them.
        let produced = unsafe { self.fill.produce(&self.staging) };
        domain.free.truncate(domain.free.len() - produced);
        domain.stats.allocs += produced as u64;
        produced
    }

    /// Whether the kernel asked to be woken to process the fill ring.
    pub fn fill_needs_wakeup(&self) -> bool {
        self.fill.needs_wakeup()
    }

    /// Receives up to `max` frames into `out`; returns how many.
    #[inline]
    pub fn receive(&mut self, max: usize, out: &mut Vec<Frame>) -> usize {
        self.staging.resize(max.min(self.ring_size as usize), FrameDesc::default());
        // SAFETY: the RX ring only returns frames of the UMEM this socket is bound to,
        // each of which the kernel hands back exactly once.
        let received = unsafe { self.rx.consume(&mut self.staging) };
        out.extend(self.staging[..received].iter().copied().map(Frame));
        received
    }

    /// Moves the longest prefix of `queue` that fits into the TX ring (the rest
    /// stays queued for the next pass: nothing is dropped for want of room);
    /// returns how many frames and bytes left.
    #[inline]
    pub fn transmit(&mut self, queue: &mut Vec<Frame>) -> (usize, usize) {
        // libxdp's reserve is all-or-nothing: ask for no more than the ring has room for.
        let room = self.tx.nb_free(queue.len() as u32) as usize;
        let count = room.min(queue.len());
        if count == 0 {
            return (0, 0);
        }
        self.staging.clear();
        self.staging.extend(queue[..count].iter().map(|frame| frame.0));
        // SAFETY: these frames belong to the shared UMEM and are held by userspace;
        // those produced become the kernel's until completion, and their tokens are dropped.
        let produced = unsafe { self.tx.produce(&self.staging) };
        let bytes = queue.drain(..produced).map(|frame| frame.len()).sum();
        self.tx_in_flight += produced;
        (produced, bytes)
    }

    /// Whether frames wait in the TX ring or for completion.
    pub fn tx_pending(&self) -> bool {
        self.tx_in_flight > 0
    }

    /// Whether the kernel has yet to take frames from the TX ring. In copy mode
    /// one wakeup sends at most 32 frames, so the worker kicks again while this holds;
    /// frames already taken only wait for their completion, which needs no kick.
    pub fn tx_unsent(&mut self) -> bool {
        self.tx_in_flight > 0 && self.tx.nb_free_exact() < self.ring_size
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

    /// Returns every frame whose transmission completed to `pool`; returns how many.
    pub fn reclaim(&mut self, pool: &mut FramePool) -> usize {
        let mut total = 0;
        loop {
            self.staging.resize(self.ring_size as usize, FrameDesc::default());
            // SAFETY: the completion ring only returns frames of this socket's UMEM,
            // each of which the kernel hands back exactly once.
            let done = unsafe { self.completion.consume(&mut self.staging) };
            for desc in &self.staging[..done] {
                pool.release(Frame(*desc));
            }
            self.tx_in_flight -= done;
            total += done;
            if done < self.staging.len() {
                return total;
            }
        }
    }

    /// The kernel's drop and ring counts for this socket since it was bound.
    pub fn kernel_stats(&self) -> io::Result<KernelSocketStats> {
        let stats = self.rx.fd().xdp_statistics()?;
        Ok([
            stats.rx_dropped(),
            stats.rx_ring_full(),
            stats.rx_fill_ring_empty_descs(),
            stats.tx_ring_empty_descs(),
            stats.rx_invalid_descs() + stats.tx_invalid_descs(),
        ])
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

/// The longest frame the kernel can copy into a UMEM frame of `frame_size` bytes: the
/// kernel keeps `XDP_PACKET_HEADROOM` (256 bytes) at the head of each frame.
pub fn max_frame_len(frame_size: u32) -> u32 {
    frame_size.saturating_sub(256)
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
