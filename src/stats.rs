//! Aggregating worker and XDP counters into the periodic summary line and the stats JSON.

use std::fmt::Write as _;
use std::sync::Arc;

use oxidize_relay_core::DropReason;
use oxidize_relay_core::counters::{
    Counters, DROPS, Described, KERNEL, KernelSocketStat, RX_BYTES, RX_PACKETS, SCALARS, SESSIONS_ACTIVE, TX_BYTES,
    TX_PACKETS, pool_name,
};
use serde_json::{Map, Value, json};

use crate::sys::bpf_abi::XdpCounter;

/// Totals over all workers at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// In [`SCALARS`] order.
    scalars: Vec<u64>,
    pub drops: Vec<u64>,
    /// The kernel's AF_XDP socket counts, in [`KernelSocketStat::ALL`] order.
    pub kernel: [u64; KernelSocketStat::COUNT],
    /// Per pool domain name: (in use, capacity, allocs, frees, failures).
    pub pools: std::collections::BTreeMap<&'static str, [u64; 5]>,
}

impl Totals {
    pub fn collect(workers: &[Arc<Counters>]) -> Self {
        let mut totals =
            Totals { scalars: vec![0; SCALARS.len()], drops: vec![0; DropReason::COUNT], ..Totals::default() };
        for c in workers {
            for (total, described) in totals.scalars.iter_mut().zip(&SCALARS) {
                *total += (described.read)(c).get();
            }
            for (total, counter) in totals.drops.iter_mut().zip(c.drops.iter()) {
                *total += counter.get();
            }
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
        }
        totals
    }

    /// The total of one described counter.
    pub fn value(&self, described: &Described) -> u64 {
        SCALARS.iter().position(|d| d.key == described.key).map_or(0, |index| self.scalars[index])
    }

    /// `RX 1.2 Gbps (850.3K pps), TX ..., 2 workers, ...` over the interval since `before`.
    pub fn summary(&self, before: &Totals, seconds: f64, workers: usize, backend: &str) -> String {
        let rate = |d: &Described| self.value(d).saturating_sub(before.value(d)) as f64 / seconds.max(1e-9);
        let mut line = format!(
            "RX {} ({} pps), TX {} ({} pps), {workers} workers, backend {backend}, sessions {}, drops {}",
            bits_per_second(rate(&RX_BYTES) * 8.0),
            si(rate(&RX_PACKETS)),
            bits_per_second(rate(&TX_BYTES) * 8.0),
            si(rate(&TX_PACKETS)),
            self.value(&SESSIONS_ACTIVE),
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
        let mut value: Map<String, Value> =
            SCALARS.iter().zip(&self.scalars).map(|(d, total)| (d.key.to_owned(), json!(total))).collect();
        value.insert(DROPS.key.into(), Value::Object(drops));
        value.insert(
            KERNEL.key.into(),
            KernelSocketStat::ALL
                .iter()
                .zip(&self.kernel)
                .map(|(stat, n)| (stat.name().to_owned(), json!(n)))
                .collect(),
        );
        let pools = self.pools.iter().map(|(name, [in_use, capacity, allocs, frees, failures])| {
            let pool = json!({ "in_use": in_use, "capacity": capacity, "allocs": allocs, "frees": frees, "failures": failures });
            ((*name).to_owned(), pool)
        });
        value.insert("pools".into(), pools.collect());
        value.insert("interfaces".into(), Value::Object(interfaces));
        value.extend(extra);
        Value::Object(value)
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
