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

/// One counter per [`DropReason`], indexed by its discriminant.
#[derive(Debug)]
pub struct DropCounters([Counter; DropReason::COUNT]);

impl Default for DropCounters {
    fn default() -> Self {
        DropCounters(core::array::from_fn(|_| Counter::default()))
    }
}

impl core::ops::Deref for DropCounters {
    type Target = [Counter; DropReason::COUNT];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Everything one worker counts. The exported ones are described in [`SCALARS`],
/// [`DROPS`] and [`KERNEL`] (and the pools); `loops` and `pool_domains` are internal.
#[derive(Debug, Default)]
pub struct Counters {
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    pub tx_packets: Counter,
    pub tx_bytes: Counter,
    pub drops: DropCounters,
    pub sessions_created: Counter,
    pub sessions_expired: Counter,
    pub sessions_active: Counter,
    /// Sessions the upstream never answered, evicted to make room for a new flow.
    pub sessions_evicted: Counter,
    /// ICMP errors about relayed datagrams, translated and sent on to the session's client.
    pub icmp_errors_relayed: Counter,
    /// ICMP too-big errors the relay sent for datagrams past their egress MTU (each also a drop).
    pub icmp_too_big_sent: Counter,
    /// Sessions moved from an upstream marked down to a healthy one (same NAT port).
    pub sessions_moved: Counter,
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

/// How a counter is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only grows: a Prometheus counter (`_total`).
    Total,
    /// Goes up and down: a Prometheus gauge.
    Gauge,
}

/// One per-worker counter, described once: the stats file, the Prometheus export and the
/// `stats` tables are all derived from these descriptions.
#[derive(Debug, Clone, Copy)]
pub struct Described {
    /// Key in the stats file's JSON (summed over workers).
    pub key: &'static str,
    /// Prometheus metric name (labelled `worker`).
    pub metric: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// Where a worker keeps it.
    pub read: fn(&Counters) -> &Counter,
}

/// A family of counters with one label (drop reasons, kernel events), described once.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub key: &'static str,
    pub metric: &'static str,
    pub help: &'static str,
    /// The label that tells the family's members apart.
    pub label: &'static str,
}

pub const RX_PACKETS: Described = Described {
    key: "rx_packets",
    metric: "oxidize_relay_rx_packets_total",
    help: "Frames the worker received.",
    kind: Kind::Total,
    read: |c| &c.rx_packets,
};
pub const RX_BYTES: Described = Described {
    key: "rx_bytes",
    metric: "oxidize_relay_rx_bytes_total",
    help: "Bytes of the frames the worker received.",
    kind: Kind::Total,
    read: |c| &c.rx_bytes,
};
pub const TX_PACKETS: Described = Described {
    key: "tx_packets",
    metric: "oxidize_relay_tx_packets_total",
    help: "Frames the worker sent.",
    kind: Kind::Total,
    read: |c| &c.tx_packets,
};
pub const TX_BYTES: Described = Described {
    key: "tx_bytes",
    metric: "oxidize_relay_tx_bytes_total",
    help: "Bytes of the frames the worker sent.",
    kind: Kind::Total,
    read: |c| &c.tx_bytes,
};
pub const SESSIONS_ACTIVE: Described = Described {
    key: "sessions_active",
    metric: "oxidize_relay_sessions_active",
    help: "NAT sessions the worker owns.",
    kind: Kind::Gauge,
    read: |c| &c.sessions_active,
};
pub const SESSIONS_CREATED: Described = Described {
    key: "sessions_created",
    metric: "oxidize_relay_sessions_created_total",
    help: "NAT sessions the worker created.",
    kind: Kind::Total,
    read: |c| &c.sessions_created,
};
pub const SESSIONS_EXPIRED: Described = Described {
    key: "sessions_expired",
    metric: "oxidize_relay_sessions_expired_total",
    help: "NAT sessions that expired after their idle timeout.",
    kind: Kind::Total,
    read: |c| &c.sessions_expired,
};
pub const SESSIONS_EVICTED: Described = Described {
    key: "sessions_evicted",
    metric: "oxidize_relay_sessions_evicted_total",
    help: "Sessions not yet established, evicted to make room for a new flow.",
    kind: Kind::Total,
    read: |c| &c.sessions_evicted,
};
pub const ICMP_ERRORS_RELAYED: Described = Described {
    key: "icmp_errors_relayed",
    metric: "oxidize_relay_icmp_errors_relayed_total",
    help: "ICMP errors (unreachable, time exceeded, too big) about relayed datagrams, translated to their client.",
    kind: Kind::Total,
    read: |c| &c.icmp_errors_relayed,
};
pub const ICMP_TOO_BIG_SENT: Described = Described {
    key: "icmp_too_big_sent",
    metric: "oxidize_relay_icmp_too_big_sent_total",
    help: "ICMP fragmentation-needed / packet-too-big errors sent for datagrams past their egress MTU (each also counted as an mtu_exceeded drop).",
    kind: Kind::Total,
    read: |c| &c.icmp_too_big_sent,
};
pub const SESSIONS_MOVED: Described = Described {
    key: "sessions_moved",
    metric: "oxidize_relay_sessions_moved_total",
    help: "Sessions moved, at their next client packet, from an upstream marked down to a healthy one.",
    kind: Kind::Total,
    read: |c| &c.sessions_moved,
};
pub const REPLIES_CROSS_QUEUE: Described = Described {
    key: "replies_cross_queue",
    metric: "oxidize_relay_replies_cross_queue_total",
    help: "Replies relayed for a session another worker owns (RSS put them on this queue).",
    kind: Kind::Total,
    read: |c| &c.replies_cross_queue,
};
pub const CLIENTS_CROSS_QUEUE: Described = Described {
    key: "clients_cross_queue",
    metric: "oxidize_relay_clients_cross_queue_total",
    help: "Client packets relayed through a session another worker owns.",
    kind: Kind::Total,
    read: |c| &c.clients_cross_queue,
};
pub const WAKEUPS: Described = Described {
    key: "wakeups",
    metric: "oxidize_relay_wakeups_total",
    help: "Wakeup syscalls (sendto, poll) the worker made.",
    kind: Kind::Total,
    read: |c| &c.wakeups,
};
pub const TUNNEL_BYTES_SAVED: Described = Described {
    key: "tunnel_bytes_saved",
    metric: "oxidize_relay_tunnel_compression_saved_bytes_total",
    help: "Payload bytes LZ4 saved on OxTunnel hops this relay sealed.",
    kind: Kind::Total,
    read: |c| &c.tunnel_bytes_saved,
};
pub const TUNNEL_KEEPALIVES: Described = Described {
    key: "tunnel_keepalives",
    metric: "oxidize_relay_tunnel_keepalives_answered_total",
    help: "OxTunnel keepalives the worker answered.",
    kind: Kind::Total,
    read: |c| &c.tunnel_keepalives,
};

/// Every per-worker scalar counter, in the order the stats file lists them.
pub const SCALARS: [Described; 16] = [
    RX_PACKETS,
    RX_BYTES,
    TX_PACKETS,
    TX_BYTES,
    SESSIONS_ACTIVE,
    SESSIONS_CREATED,
    SESSIONS_EXPIRED,
    SESSIONS_EVICTED,
    SESSIONS_MOVED,
    ICMP_ERRORS_RELAYED,
    ICMP_TOO_BIG_SENT,
    REPLIES_CROSS_QUEUE,
    CLIENTS_CROSS_QUEUE,
    WAKEUPS,
    TUNNEL_BYTES_SAVED,
    TUNNEL_KEEPALIVES,
];

/// Packets not relayed, by [`DropReason`].
pub const DROPS: Family = Family {
    key: "drops",
    metric: "oxidize_relay_drops_total",
    help: "Packets the worker did not relay, by reason.",
    label: "reason",
};

/// The kernel's AF_XDP socket counts, by [`KernelSocketStat`].
pub const KERNEL: Family = Family {
    key: "af_xdp_kernel",
    metric: "oxidize_relay_af_xdp_kernel_total",
    help: "What the kernel counted on the worker's AF_XDP sockets (XDP_STATISTICS), by event.",
    label: "event",
};

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
