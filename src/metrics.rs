//! Prometheus metrics: the control thread copies the workers' counters into
//! `metrics` once per tick; the hot path never calls a metrics macro.

use std::net::SocketAddr;
use std::sync::Arc;

use metrics::{counter, describe_counter, describe_gauge, gauge};
use oxidize_relay_core::DropReason;
use oxidize_relay_core::counters::{self, Counters, KernelSocketStat, Kind, SCALARS, pool_name};

use crate::backend::Attached;
use crate::sys::bpf_abi::XdpCounter;

/// The worker counters' metric names, from their one description in the core.
pub const RX_PACKETS: &str = counters::RX_PACKETS.metric;
pub const RX_BYTES: &str = counters::RX_BYTES.metric;
pub const TX_PACKETS: &str = counters::TX_PACKETS.metric;
pub const TX_BYTES: &str = counters::TX_BYTES.metric;
pub const SESSIONS_ACTIVE: &str = counters::SESSIONS_ACTIVE.metric;
pub const WAKEUPS: &str = counters::WAKEUPS.metric;
pub const REPLIES_CROSS_QUEUE: &str = counters::REPLIES_CROSS_QUEUE.metric;
pub const CLIENTS_CROSS_QUEUE: &str = counters::CLIENTS_CROSS_QUEUE.metric;
pub const DROPS: &str = counters::DROPS.metric;
pub const AF_XDP_KERNEL: &str = counters::KERNEL.metric;

// Metrics of the control thread and of the pools, described here (their only home).
pub const SESSIONS_REFUSED: &str = "oxidize_relay_sessions_refused_total";
pub const POOL_FRAMES_IN_USE: &str = "oxidize_relay_pool_frames_in_use";
pub const POOL_FRAMES: &str = "oxidize_relay_pool_frames";
pub const POOL_ALLOCS: &str = "oxidize_relay_pool_allocs_total";
pub const POOL_FREES: &str = "oxidize_relay_pool_frees_total";
pub const POOL_FAILURES: &str = "oxidize_relay_pool_failures_total";
pub const NEIGHBOR_RESOLUTIONS: &str = "oxidize_relay_neighbor_resolutions_total";
pub const XDP_PACKETS: &str = "oxidize_relay_xdp_packets_total";
pub const INFO: &str = "oxidize_relay_info";
pub const XDP_MODE_INFO: &str = "oxidize_relay_xdp_mode_info";
pub const AF_XDP_BIND_INFO: &str = "oxidize_relay_af_xdp_bind_info";
pub const BUILD_INFO: &str = "oxidize_relay_build_info";
pub const TUNNEL_PEER_KEEPALIVES: &str = "oxidize_relay_tunnel_peer_keepalives_total";
pub const TUNNEL_PEER_UP: &str = "oxidize_relay_tunnel_peer_up";
pub const RELOADS: &str = "oxidize_relay_reloads_total";
pub const UPSTREAM_UP: &str = "oxidize_relay_upstream_up";
pub const UPSTREAM_PROBES: &str = "oxidize_relay_upstream_probes_total";
pub const UPSTREAM_SESSIONS: &str = "oxidize_relay_upstream_sessions";
pub const DRAINING: &str = "oxidize_relay_draining";

/// Every metric the relay exports (the dashboard test checks its queries against this list).
pub fn names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = SCALARS.iter().map(|d| d.metric).collect();
    names.extend([
        DROPS,
        AF_XDP_KERNEL,
        SESSIONS_REFUSED,
        POOL_FRAMES_IN_USE,
        POOL_FRAMES,
        POOL_ALLOCS,
        POOL_FREES,
        POOL_FAILURES,
        NEIGHBOR_RESOLUTIONS,
        XDP_PACKETS,
        INFO,
        XDP_MODE_INFO,
        AF_XDP_BIND_INFO,
        BUILD_INFO,
        TUNNEL_PEER_KEEPALIVES,
        TUNNEL_PEER_UP,
        RELOADS,
        DRAINING,
        UPSTREAM_UP,
        UPSTREAM_PROBES,
        UPSTREAM_SESSIONS,
    ]);
    names
}

/// Gives every worker counter its help text (once, when the recorder is installed).
pub fn describe() {
    for described in &SCALARS {
        match described.kind {
            Kind::Total => describe_counter!(described.metric, described.help),
            Kind::Gauge => describe_gauge!(described.metric, described.help),
        }
    }
    for family in [counters::DROPS, counters::KERNEL] {
        describe_counter!(family.metric, family.help);
    }
    describe_counter!(RELOADS, "Config reloads by outcome: applied, or failed (the old config stays in force)");
    describe_gauge!(DRAINING, "1 while the relay drains: existing sessions are served, no new ones are opened");
    describe_gauge!(UPSTREAM_UP, "1 while the upstream is healthy (new sessions may go to it), 0 while it is down");
    describe_counter!(UPSTREAM_PROBES, "Active health probes by outcome: answered or failed");
    describe_gauge!(UPSTREAM_SESSIONS, "Live sessions relayed to the upstream");
}

/// Counts a reload by its outcome.
pub fn reload(outcome: &'static str) {
    counter!(RELOADS, "outcome" => outcome).increment(1);
}

pub fn upstream_up(upstream: SocketAddr, up: bool) {
    gauge!(UPSTREAM_UP, "upstream" => upstream.to_string()).set(if up { 1.0 } else { 0.0 });
}

pub fn upstream_probe(upstream: SocketAddr, outcome: &'static str) {
    counter!(UPSTREAM_PROBES, "upstream" => upstream.to_string(), "outcome" => outcome).increment(1);
}

pub fn upstream_sessions(upstream: SocketAddr, sessions: u64) {
    gauge!(UPSTREAM_SESSIONS, "upstream" => upstream.to_string()).set(sessions as f64);
}

pub fn draining(draining: bool) {
    gauge!(DRAINING).set(if draining { 1.0 } else { 0.0 });
}

/// Publishes what never changes after start-up: the backend, and per interface its XDP mode
/// and each queue's AF_XDP bind mode.
pub(crate) fn publish_static(backend: &'static str, attached: &[Attached]) {
    gauge!(INFO, "backend" => backend).set(1.0);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for a in attached {
        gauge!(XDP_MODE_INFO, "interface" => a.info.name.clone(), "mode" => a.mode.name()).set(1.0);
        for (queue, &zero_copy) in a.zero_copy.iter().enumerate() {
            let bind = if zero_copy { "zero_copy" } else { "copy" };
            gauge!(AF_XDP_BIND_INFO, "interface" => a.info.name.clone(), "queue" => queue.to_string(), "bind" => bind)
                .set(1.0);
        }
    }
}

/// Copies every worker's counters and the XDP program counters into the registry.
pub fn publish(workers: &[Arc<Counters>], xdp: &[(String, Option<[u64; XdpCounter::ALL.len()]>)]) {
    for (id, c) in workers.iter().enumerate() {
        let worker = id.to_string();
        for described in &SCALARS {
            let value = (described.read)(c).get();
            match described.kind {
                Kind::Total => counter!(described.metric, "worker" => worker.clone()).absolute(value),
                Kind::Gauge => gauge!(described.metric, "worker" => worker.clone()).set(value as f64),
            }
        }
        for reason in DropReason::ALL {
            counter!(DROPS, "worker" => worker.clone(), counters::DROPS.label => reason.name())
                .absolute(c.dropped(reason));
        }
        for reason in [DropReason::SessionTableFull, DropReason::NatPortsExhausted, DropReason::ClientNotAllowed] {
            counter!(SESSIONS_REFUSED, "worker" => worker.clone(), "reason" => reason.name())
                .absolute(c.dropped(reason));
        }
        for (stat, value) in KernelSocketStat::ALL.iter().zip(&c.kernel) {
            counter!(AF_XDP_KERNEL, "worker" => worker.clone(), counters::KERNEL.label => stat.name())
                .absolute(value.get());
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
        let names = names();
        for name in &names {
            assert!(name.starts_with("oxidize_relay_"), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name}");
        }
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "every metric is described once");
    }

    #[test]
    fn dashboard_queries_name_only_exported_metrics() {
        let dashboard = include_str!("../dashboards/oxidize-relay.json");
        let value: serde_json::Value = serde_json::from_str(dashboard).expect("dashboard is JSON");
        let mut exprs = Vec::new();
        collect_exprs(&value, &mut exprs);
        assert!(exprs.len() >= 8, "the dashboard has its panels");
        let exported = names();
        for expr in exprs {
            let mut names = expr.match_indices("oxidize_relay_").map(|(at, _)| {
                expr[at..].split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or_default()
            });
            assert!(
                names.all(|name| exported.contains(&name)),
                "query `{expr}` names a metric the relay does not export"
            );
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
