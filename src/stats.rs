//! Aggregating worker and XDP counters into the periodic summary line and the stats JSON.

use std::fmt::Write as _;
use std::sync::Arc;

use oxidize_relay_core::DropReason;
use oxidize_relay_core::counters::{Counters, KernelSocketStat, pool_name};
use serde_json::{Map, Value, json};

use crate::sys::bpf_abi::XdpCounter;

/// Totals over all workers at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drops: Vec<u64>,
    pub sessions_created: u64,
    pub sessions_expired: u64,
    pub sessions_active: u64,
    pub sessions_evicted: u64,
    pub replies_cross_queue: u64,
    pub clients_cross_queue: u64,
    /// The kernel's AF_XDP socket counts, in [`KernelSocketStat::ALL`] order.
    pub kernel: [u64; KernelSocketStat::COUNT],
    /// Per pool domain name: (in use, capacity, allocs, frees, failures).
    pub pools: std::collections::BTreeMap<&'static str, [u64; 5]>,
    pub wakeups: u64,
    pub tunnel_bytes_saved: u64,
    pub tunnel_keepalives: u64,
}

impl Totals {
    pub fn collect(workers: &[Arc<Counters>]) -> Self {
        let mut totals = Totals { drops: vec![0; DropReason::COUNT], ..Totals::default() };
        for c in workers {
            totals.rx_packets += c.rx_packets.get();
            totals.rx_bytes += c.rx_bytes.get();
            totals.tx_packets += c.tx_packets.get();
            totals.tx_bytes += c.tx_bytes.get();
            for (total, counter) in totals.drops.iter_mut().zip(&c.drops) {
                *total += counter.get();
            }
            totals.sessions_created += c.sessions_created.get();
            totals.sessions_expired += c.sessions_expired.get();
            totals.sessions_active += c.sessions_active.get();
            totals.sessions_evicted += c.sessions_evicted.get();
            totals.replies_cross_queue += c.replies_cross_queue.get();
            totals.clients_cross_queue += c.clients_cross_queue.get();
            for (total, counter) in totals.kernel.iter_mut().zip(&c.kernel) {
                *total += counter.get();
            }
            let domains = c.pool_domains.get() as usize;
            for (index, pool) in c.pools.iter().enumerate().take(domains) {
                let entry = totals.pools.entry(pool_name(index, domains)).or_default();
                for (total, counter) in
                    entry.iter_mut().zip([&pool.in_use, &pool.capacity, &pool.allocs, &pool.frees, &pool.failures])
                {
                    *total += counter.get();
                }
            }
            totals.wakeups += c.wakeups.get();
            totals.tunnel_bytes_saved += c.tunnel_bytes_saved.get();
            totals.tunnel_keepalives += c.tunnel_keepalives.get();
        }
        totals
    }

    /// `RX 1.2 Gbps (850.3K pps), TX ..., 2 workers, ...` over the interval since `before`.
    pub fn summary(&self, before: &Totals, seconds: f64, workers: usize, backend: &str) -> String {
        let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds.max(1e-9);
        let mut line = format!(
            "RX {} ({} pps), TX {} ({} pps), {workers} workers, backend {backend}, sessions {}, drops {}",
            bits_per_second(rate(self.rx_bytes, before.rx_bytes) * 8.0),
            si(rate(self.rx_packets, before.rx_packets)),
            bits_per_second(rate(self.tx_bytes, before.tx_bytes) * 8.0),
            si(rate(self.tx_packets, before.tx_packets)),
            self.sessions_active,
            self.drops.iter().sum::<u64>() - before.drops.iter().sum::<u64>(),
        );
        let top: Vec<_> = DropReason::ALL
            .iter()
            .zip(self.drops.iter().zip(before.drops.iter().chain(std::iter::repeat(&0))))
            .filter(|(_, (now, then))| now > then)
            .map(|(reason, (now, then))| format!("{}={}", reason.name(), now - then))
            .collect();
        if !top.is_empty() {
            let _ = write!(line, " ({})", top.join(" "));
        }
        line
    }

    /// The machine-readable form, with the XDP program's counters per interface.
    pub fn to_json(
        &self,
        xdp: &[(String, &'static str, Option<[u64; XdpCounter::ALL.len()]>)],
        extra: Map<String, Value>,
    ) -> Value {
        let drops: Map<String, Value> =
            DropReason::ALL.iter().zip(&self.drops).map(|(r, n)| (r.name().to_owned(), json!(n))).collect();
        let interfaces: Map<String, Value> = xdp
            .iter()
            .map(|(name, mode, counters)| {
                let counters: Map<String, Value> = counters
                    .iter()
                    .flat_map(|c| XdpCounter::ALL.iter().zip(c.iter()))
                    .map(|(counter, n)| (counter.name().to_owned(), json!(n)))
                    .collect();
                (name.clone(), json!({ "xdp_mode": mode, "xdp_counters": counters }))
            })
            .collect();
        let mut value = json!({
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "drops": drops,
            "sessions_created": self.sessions_created,
            "sessions_expired": self.sessions_expired,
            "sessions_active": self.sessions_active,
            "sessions_evicted": self.sessions_evicted,
            "replies_cross_queue": self.replies_cross_queue,
            "clients_cross_queue": self.clients_cross_queue,
            "af_xdp_kernel": KernelSocketStat::ALL.iter().zip(&self.kernel)
                .map(|(stat, n)| (stat.name().to_owned(), json!(n))).collect::<Map<String, Value>>(),
            "pools": self.pools.iter().map(|(name, [in_use, capacity, allocs, frees, failures])| {
                ((*name).to_owned(), json!({
                    "in_use": in_use, "capacity": capacity, "allocs": allocs, "frees": frees, "failures": failures,
                }))
            }).collect::<Map<String, Value>>(),
            "wakeups": self.wakeups,
            "tunnel_bytes_saved": self.tunnel_bytes_saved,
            "tunnel_keepalives": self.tunnel_keepalives,
            "interfaces": interfaces,
        });
        if let Value::Object(map) = &mut value {
            map.extend(extra);
        }
        value
    }
}

fn si(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}K", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn bits_per_second(value: f64) -> String {
    format!("{}bps", si(value)).replace("Mbps", " Mbps").replace("Gbps", " Gbps").replace("Kbps", " Kbps")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_like_the_operator_expects() {
        let counters = Arc::new(Counters::default());
        let before = Totals::collect(std::slice::from_ref(&counters));
        counters.rx_packets.add(850_300);
        counters.rx_bytes.add(150_000_000);
        counters.tx_packets.add(850_000);
        counters.tx_bytes.add(149_000_000);
        counters.count_drop(DropReason::NoSession);
        let line = Totals::collect(&[counters]).summary(&before, 1.0, 2, "af_xdp");
        assert!(line.starts_with("RX 1.2 Gbps (850.3K pps), TX 1.2 Gbps (850.0K pps), 2 workers"), "{line}");
        assert!(line.ends_with("(no_session=1)"), "{line}");
    }
}
