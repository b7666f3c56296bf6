//! Per-worker counters: written by exactly one worker thread, read by the control thread.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::drop_reason::DropReason;

/// A single-writer counter. The owning worker adds with a plain load+store
/// (no locked instruction on the hot path); any thread may read it.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning worker may call this; two writers would lose updates.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Sets a gauge value (owning worker only).
    #[inline]
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Everything one worker counts.
#[derive(Debug, Default)]
pub struct Counters {
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    pub tx_packets: Counter,
    pub tx_bytes: Counter,
    pub drops: [Counter; DropReason::COUNT],
    pub sessions_created: Counter,
    pub sessions_expired: Counter,
    pub sessions_active: Counter,
    /// Sessions the upstream never answered, evicted to make room for a new flow.
    pub sessions_evicted: Counter,
    /// Replies this worker relayed for a session another worker owns (RSS put them on this queue).
    pub replies_cross_queue: Counter,
    /// Client packets this worker relayed through a session another worker owns.
    pub clients_cross_queue: Counter,
    /// Per frame-pool domain (client-facing, upstream-facing; one shared domain in one-arm).
    pub pools: [PoolCounters; POOL_DOMAINS],
    /// How many of `pools` are in use.
    pub pool_domains: Counter,
    /// Wakeup syscalls (sendto/poll) issued by the worker.
    pub wakeups: Counter,
    /// Payload bytes LZ4 saved on tunnel hops this relay sealed.
    pub tunnel_bytes_saved: Counter,
    /// Tunnel keepalives answered.
    pub tunnel_keepalives: Counter,
    /// Worker loop iterations: the control thread pings systemd's watchdog only while these advance.
    pub loops: Counter,
    /// The kernel's own counts for this worker's AF_XDP sockets (`XDP_STATISTICS`), summed over its interfaces.
    pub kernel: [Counter; KernelSocketStat::COUNT],
}

/// What the kernel counts per AF_XDP socket: drops the relay itself never sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSocketStat {
    /// Frames the kernel dropped for this socket (no room, or any other reason).
    RxDropped,
    /// Frames dropped because the RX ring was full: the worker did not keep up.
    RxRingFull,
    /// Times the kernel found the fill ring empty: no frame to receive into.
    RxFillRingEmpty,
    /// Times the kernel found the TX ring empty when woken to send.
    TxRingEmpty,
    /// Descriptors the kernel refused as invalid (RX or TX): a relay bug if ever non-zero.
    InvalidDescriptors,
}

impl KernelSocketStat {
    pub const COUNT: usize = 5;
    pub const ALL: [KernelSocketStat; Self::COUNT] = [
        KernelSocketStat::RxDropped,
        KernelSocketStat::RxRingFull,
        KernelSocketStat::RxFillRingEmpty,
        KernelSocketStat::TxRingEmpty,
        KernelSocketStat::InvalidDescriptors,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            KernelSocketStat::RxDropped => "rx_dropped",
            KernelSocketStat::RxRingFull => "rx_ring_full",
            KernelSocketStat::RxFillRingEmpty => "rx_fill_ring_empty",
            KernelSocketStat::TxRingEmpty => "tx_ring_empty",
            KernelSocketStat::InvalidDescriptors => "invalid_descriptors",
        }
    }
}

/// At most two frame-pool domains: client-facing and upstream-facing.
pub const POOL_DOMAINS: usize = 2;

/// One frame-pool domain's use and movements.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Frames owned by the kernel or in flight (fill, RX, TX rings).
    pub in_use: Counter,
    pub capacity: Counter,
    pub allocs: Counter,
    pub frees: Counter,
    /// Refills that found the domain empty.
    pub failures: Counter,
}

/// The label of pool domain `index` when `count` domains are in use.
pub fn pool_name(index: usize, count: usize) -> &'static str {
    match (count, index) {
        (2, 0) => "client",
        (2, _) => "upstream",
        _ => "shared",
    }
}

impl Counters {
    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].add(1);
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].get()
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().map(Counter::get).sum()
    }
}
