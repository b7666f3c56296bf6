//! Prometheus metrics: the control thread copies the workers' counters into
//! `metrics` once per tick; the hot path never calls a metrics macro.

use std::net::SocketAddr;
use std::sync::Arc;

use metrics::{counter, gauge};
use oxidize_relay_core::DropReason;
use oxidize_relay_core::counters::{Counters, KernelSocketStat, pool_name};

use crate::sys::bpf_abi::XdpCounter;

/// Every metric the relay exports (the dashboard test checks its queries against this list).
pub const NAMES: &[&str] = &[
    RX_PACKETS,
    RX_BYTES,
    TX_PACKETS,
    TX_BYTES,
    DROPS,
    SESSIONS_ACTIVE,
    SESSIONS_CREATED,
    SESSIONS_EXPIRED,
    SESSIONS_REFUSED,
    SESSIONS_EVICTED,
    REPLIES_CROSS_QUEUE,
    CLIENTS_CROSS_QUEUE,
    AF_XDP_KERNEL,
    POOL_FRAMES_IN_USE,
    POOL_FRAMES,
    POOL_ALLOCS,
    POOL_FREES,
    POOL_FAILURES,
    WAKEUPS,
    NEIGHBOR_RESOLUTIONS,
    XDP_PACKETS,
    INFO,
    XDP_MODE_INFO,
    BUILD_INFO,
    TUNNEL_BYTES_SAVED,
    TUNNEL_KEEPALIVES_ANSWERED,
    TUNNEL_PEER_KEEPALIVES,
    TUNNEL_PEER_UP,
];

pub const RX_PACKETS: &str = "oxidize_relay_rx_packets_total";
pub const RX_BYTES: &str = "oxidize_relay_rx_bytes_total";
pub const TX_PACKETS: &str = "oxidize_relay_tx_packets_total";
pub const TX_BYTES: &str = "oxidize_relay_tx_bytes_total";
pub const DROPS: &str = "oxidize_relay_drops_total";
pub const SESSIONS_ACTIVE: &str = "oxidize_relay_sessions_active";
pub const SESSIONS_CREATED: &str = "oxidize_relay_sessions_created_total";
pub const SESSIONS_EXPIRED: &str = "oxidize_relay_sessions_expired_total";
pub const SESSIONS_REFUSED: &str = "oxidize_relay_sessions_refused_total";
pub const SESSIONS_EVICTED: &str = "oxidize_relay_sessions_evicted_total";
pub const REPLIES_CROSS_QUEUE: &str = "oxidize_relay_replies_cross_queue_total";
pub const CLIENTS_CROSS_QUEUE: &str = "oxidize_relay_clients_cross_queue_total";
pub const AF_XDP_KERNEL: &str = "oxidize_relay_af_xdp_kernel_total";
pub const POOL_FRAMES_IN_USE: &str = "oxidize_relay_pool_frames_in_use";
pub const POOL_FRAMES: &str = "oxidize_relay_pool_frames";
pub const POOL_ALLOCS: &str = "oxidize_relay_pool_allocs_total";
pub const POOL_FREES: &str = "oxidize_relay_pool_frees_total";
pub const POOL_FAILURES: &str = "oxidize_relay_pool_failures_total";
pub const WAKEUPS: &str = "oxidize_relay_wakeups_total";
pub const NEIGHBOR_RESOLUTIONS: &str = "oxidize_relay_neighbor_resolutions_total";
pub const XDP_PACKETS: &str = "oxidize_relay_xdp_packets_total";
pub const INFO: &str = "oxidize_relay_info";
pub const XDP_MODE_INFO: &str = "oxidize_relay_xdp_mode_info";
pub const BUILD_INFO: &str = "oxidize_relay_build_info";
pub const TUNNEL_BYTES_SAVED: &str = "oxidize_relay_tunnel_compression_saved_bytes_total";
pub const TUNNEL_KEEPALIVES_ANSWERED: &str = "oxidize_relay_tunnel_keepalives_answered_total";
pub const TUNNEL_PEER_KEEPALIVES: &str = "oxidize_relay_tunnel_peer_keepalives_total";
pub const TUNNEL_PEER_UP: &str = "oxidize_relay_tunnel_peer_up";

/// Publishes what never changes after start-up.
pub fn publish_static(backend: &'static str, xdp_modes: &[(String, &'static str)]) {
    gauge!(INFO, "backend" => backend).set(1.0);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for (interface, mode) in xdp_modes {
        gauge!(XDP_MODE_INFO, "interface" => interface.clone(), "mode" => *mode).set(1.0);
    }
}

/// Copies every worker's counters and the XDP program counters into the registry.
pub fn publish(workers: &[Arc<Counters>], xdp: &[(String, Option<[u64; XdpCounter::ALL.len()]>)]) {
    for (id, c) in workers.iter().enumerate() {
        let worker = id.to_string();
        counter!(RX_PACKETS, "worker" => worker.clone()).absolute(c.rx_packets.get());
        counter!(RX_BYTES, "worker" => worker.clone()).absolute(c.rx_bytes.get());
        counter!(TX_PACKETS, "worker" => worker.clone()).absolute(c.tx_packets.get());
        counter!(TX_BYTES, "worker" => worker.clone()).absolute(c.tx_bytes.get());
        for reason in DropReason::ALL {
            counter!(DROPS, "worker" => worker.clone(), "reason" => reason.name()).absolute(c.dropped(reason));
        }
        for reason in [DropReason::SessionTableFull, DropReason::NatPortsExhausted, DropReason::ClientNotAllowed] {
            counter!(SESSIONS_REFUSED, "worker" => worker.clone(), "reason" => reason.name())
                .absolute(c.dropped(reason));
        }
        gauge!(SESSIONS_ACTIVE, "worker" => worker.clone()).set(c.sessions_active.get() as f64);
        counter!(SESSIONS_CREATED, "worker" => worker.clone()).absolute(c.sessions_created.get());
        counter!(SESSIONS_EXPIRED, "worker" => worker.clone()).absolute(c.sessions_expired.get());
        counter!(SESSIONS_EVICTED, "worker" => worker.clone()).absolute(c.sessions_evicted.get());
        counter!(REPLIES_CROSS_QUEUE, "worker" => worker.clone()).absolute(c.replies_cross_queue.get());
        counter!(CLIENTS_CROSS_QUEUE, "worker" => worker.clone()).absolute(c.clients_cross_queue.get());
        for (stat, value) in KernelSocketStat::ALL.iter().zip(&c.kernel) {
            counter!(AF_XDP_KERNEL, "worker" => worker.clone(), "event" => stat.name()).absolute(value.get());
        }
        let domains = c.pool_domains.get() as usize;
        for (index, pool) in c.pools.iter().enumerate().take(domains) {
            let name = pool_name(index, domains);
            gauge!(POOL_FRAMES_IN_USE, "worker" => worker.clone(), "pool" => name).set(pool.in_use.get() as f64);
            gauge!(POOL_FRAMES, "worker" => worker.clone(), "pool" => name).set(pool.capacity.get() as f64);
            counter!(POOL_ALLOCS, "worker" => worker.clone(), "pool" => name).absolute(pool.allocs.get());
            counter!(POOL_FREES, "worker" => worker.clone(), "pool" => name).absolute(pool.frees.get());
            counter!(POOL_FAILURES, "worker" => worker.clone(), "pool" => name).absolute(pool.failures.get());
        }
        counter!(TUNNEL_BYTES_SAVED, "worker" => worker.clone()).absolute(c.tunnel_bytes_saved.get());
        counter!(TUNNEL_KEEPALIVES_ANSWERED, "worker" => worker.clone()).absolute(c.tunnel_keepalives.get());
        counter!(WAKEUPS, "worker" => worker).absolute(c.wakeups.get());
    }
    for (interface, counters) in xdp {
        let Some(counters) = counters else { continue };
        for (kind, value) in XdpCounter::ALL.iter().zip(counters) {
            counter!(XDP_PACKETS, "interface" => interface.clone(), "verdict" => kind.name()).absolute(*value);
        }
    }
}

/// Counts a keepalive this relay sent to, or got back from, a tunnel upstream.
pub fn tunnel_keepalive(direction: &'static str, upstream: SocketAddr) {
    counter!(TUNNEL_PEER_KEEPALIVES, "direction" => direction, "upstream" => upstream.to_string()).increment(1);
}

/// Whether a tunnel upstream answers keepalives.
pub fn tunnel_peer_up(upstream: SocketAddr, up: bool) {
    gauge!(TUNNEL_PEER_UP, "upstream" => upstream.to_string()).set(if up { 1.0 } else { 0.0 });
}

/// Counts one neighbour/route resolution outcome (`resolved` or `pending`).
pub fn neighbor_resolution(outcome: &'static str) {
    counter!(NEIGHBOR_RESOLUTIONS, "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        for name in NAMES {
            assert!(name.starts_with("oxidize_relay_"), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name}");
        }
    }

    #[test]
    fn dashboard_queries_name_only_exported_metrics() {
        let dashboard = include_str!("../dashboards/oxidize-relay.json");
        let value: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard is JSON");
        let mut exprs = Vec::new();
        collect_exprs(&value, &mut exprs);
        assert!(exprs.len() >= 8, "the dashboard has its panels");
        for expr in exprs {
            let mut names = expr.match_indices("oxidize_relay_").map(|(at, _)| {
                expr[at..].split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or_default()
            });
            assert!(names.all(|name| NAMES.contains(&name)), "query `{expr}` names a metric the relay does not export");
        }
    }

    fn collect_exprs<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, child) in map {
                    match (key.as_str(), child) {
                        ("expr", serde_json::Value::String(expr)) => out.push(expr),
                        _ => collect_exprs(child, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
            _ => {}
        }
    }
}
