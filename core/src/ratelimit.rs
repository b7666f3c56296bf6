//! Token-bucket rate limits in packets and bytes per second, refilled from
//! passed-in time, and a fixed-memory per-source table for them.

use core::net::IpAddr;

use crate::time::Millis;

/// A limit: sustained rate plus the burst it allows (both optional per unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limit {
    pub packets_per_second: Option<u64>,
    pub bytes_per_second: Option<u64>,
}

/// How long a full bucket lasts at the sustained rate: the allowed burst.
const BURST_MS: u64 = 200;

impl Limit {
    pub fn is_unlimited(&self) -> bool {
        self.packets_per_second.is_none() && self.bytes_per_second.is_none()
    }

    /// The same limit split between `workers` (each worker enforces its share).
    pub fn per_worker(&self, workers: u64) -> Limit {
        let share = |rate: Option<u64>| rate.map(|r| (r / workers.max(1)).max(1));
        Limit { packets_per_second: share(self.packets_per_second), bytes_per_second: share(self.bytes_per_second) }
    }
}

/// One bucket, in thousandths of a token so slow rates still refill every millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Bucket {
    milli_tokens: u64,
}

impl Bucket {
    fn take(&mut self, rate: u64, elapsed_ms: u64, cost: u64) -> bool {
        let capacity = (rate * BURST_MS).max(cost * 1000);
        self.milli_tokens = (self.milli_tokens + rate * elapsed_ms).min(capacity);
        let needed = cost * 1000;
        if self.milli_tokens < needed {
            return false;
        }
        self.milli_tokens -= needed;
        true
    }
}

/// A packets bucket and a bytes bucket sharing one clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPair {
    packets: Bucket,
    bytes: Bucket,
    last: Millis,
}

impl TokenPair {
    /// A pair that starts full, as a new client deserves its burst.
    pub fn full(limit: &Limit, now: Millis) -> Self {
        let fill = |rate: Option<u64>| Bucket { milli_tokens: rate.map_or(0, |r| r * BURST_MS) };
        TokenPair { packets: fill(limit.packets_per_second), bytes: fill(limit.bytes_per_second), last: now }
    }

    /// A pair with no tokens yet: it allows traffic only as time refills it.
    pub fn empty(now: Millis) -> Self {
        TokenPair { packets: Bucket::default(), bytes: Bucket::default(), last: now }
    }

    /// Takes one packet of `bytes` if both buckets allow it; takes nothing otherwise.
    pub fn allow(&mut self, limit: &Limit, now: Millis, bytes: u64) -> bool {
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let (mut packets, mut byte_bucket) = (self.packets, self.bytes);
        let packets_ok = limit.packets_per_second.is_none_or(|rate| packets.take(rate, elapsed, 1));
        let bytes_ok = limit.bytes_per_second.is_none_or(|rate| byte_bucket.take(rate, elapsed, bytes));
        if packets_ok && bytes_ok {
            self.packets = packets;
            self.bytes = byte_bucket;
        }
        packets_ok && bytes_ok
    }
}

/// Per-source buckets in fixed memory: a two-way set-associative table.
/// A source that finds its set full evicts the less recently seen entry, so a
/// spoofed flood recycles slots instead of growing the table. A source that
/// takes a free slot starts with its burst; one that had to evict starts empty
/// and earns its tokens, so a limited source cannot refill its bucket by having
/// a spoofed flood evict it (fail closed under pressure).
#[derive(Debug)]
pub struct SourceLimiter {
    slots: Vec<Option<SourceSlot>>,
    mask: usize,
    hasher: ahash::RandomState,
}

#[derive(Debug, Clone, Copy)]
struct SourceSlot {
    key: (u16, IpAddr),
    tokens: TokenPair,
}

impl SourceLimiter {
    /// A table of at least `entries` slots (rounded up to a power of two).
    /// `hasher` must be keyed from the OS: sources are chosen by whoever sends packets.
    pub fn new(entries: usize, hasher: ahash::RandomState) -> Self {
        let size = entries.max(2).next_power_of_two();
        SourceLimiter { slots: vec![None; size], mask: size - 1, hasher }
    }

    /// Whether `source` may send `bytes` more on route `route` under `limit`.
    pub fn allow(&mut self, route: u16, source: IpAddr, limit: &Limit, now: Millis, bytes: u64) -> bool {
        let key = (route, source);
        let first = (self.hasher.hash_one(key) as usize) & self.mask & !1;
        let pair = [first, first + 1];
        let index = match pair.iter().find(|&&i| self.slots[i].is_some_and(|s| s.key == key)) {
            Some(&found) => found,
            None => {
                let victim =
                    *pair.iter().min_by_key(|&&i| self.slots[i].map_or(0, |s| s.tokens.last + 1)).unwrap_or(&first);
                let tokens = match self.slots[victim] {
                    None => TokenPair::full(limit, now),
                    Some(_) => TokenPair::empty(now),
                };
                self.slots[victim] = Some(SourceSlot { key, tokens });
                victim
            }
        };
        self.slots[index].as_mut().is_some_and(|slot| slot.tokens.allow(limit, now, bytes))
    }

    /// Slots in the table (fixed for its lifetime).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pps(n: u64) -> Limit {
        Limit { packets_per_second: Some(n), bytes_per_second: None }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limit = pps(1000);
        let mut tokens = TokenPair::full(&limit, 0);
        let burst = (0..1000).take_while(|_| tokens.allow(&limit, 0, 100)).count();
        assert_eq!(burst, 200, "a 200 ms burst at 1000 pps");
        assert!(!tokens.allow(&limit, 0, 100));
        assert!(!tokens.allow(&limit, 0, 100));
        // One second later: 1000 more tokens, capped at the burst.
        let refilled = (0..1000).take_while(|_| tokens.allow(&limit, 1000, 100)).count();
        assert_eq!(refilled, 200);
        let mut sustained = 0;
        for ms in 1001..=2000 {
            while tokens.allow(&limit, ms, 100) {
                sustained += 1;
            }
        }
        assert_eq!(sustained, 1000, "1000 packets over the next second");
    }

    #[test]
    fn bytes_and_packets_both_apply_and_a_refusal_takes_nothing() {
        let limit = Limit { packets_per_second: Some(1000), bytes_per_second: Some(10_000) };
        let mut tokens = TokenPair::full(&limit, 0);
        // 2,000 bytes of burst: two 1000-byte packets, then refused though packet tokens remain.
        assert!(tokens.allow(&limit, 0, 1000));
        assert!(tokens.allow(&limit, 0, 1000));
        assert!(!tokens.allow(&limit, 0, 1000));
        assert!(tokens.allow(&limit, 100, 1000), "100 ms refill 1000 bytes");
    }

    #[test]
    fn unlimited_always_allows() {
        let limit = Limit::default();
        assert!(limit.is_unlimited());
        let mut tokens = TokenPair::full(&limit, 0);
        assert!((0..10_000).all(|_| tokens.allow(&limit, 0, 1500)));
    }

    #[test]
    fn sources_are_limited_separately_in_fixed_memory() {
        let limit = pps(10);
        let mut limiter = SourceLimiter::new(1024, crate::seed::Seeds::new(1).hasher());
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!((0..10).filter(|_| limiter.allow(0, a, &limit, 0, 1)).count(), 2, "burst of 2 at 10 pps");
        assert!(limiter.allow(0, b, &limit, 0, 1), "another source has its own bucket");
        assert!(limiter.allow(1, a, &limit, 0, 1), "and so does the same source on another route");
        // A flood of 100,000 spoofed sources recycles the same 1024 slots.
        for i in 0..100_000u32 {
            limiter.allow(0, IpAddr::from(i.to_be_bytes()), &limit, 1, 1);
        }
        assert_eq!(limiter.capacity(), 1024);
    }

    #[test]
    fn a_limited_source_evicted_by_a_flood_gets_no_fresh_burst() {
        let limit = pps(10);
        let mut limiter = SourceLimiter::new(2, crate::seed::Seeds::new(1).hasher());
        let limited: IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!((0..10).filter(|_| limiter.allow(0, limited, &limit, 0, 1)).count(), 2, "its burst, then refused");
        for i in 0..100u32 {
            limiter.allow(0, IpAddr::from((i + 1000).to_be_bytes()), &limit, 0, 1);
        }
        assert!(!limiter.allow(0, limited, &limit, 0, 1), "back in the table after eviction, still empty");
        assert!(limiter.allow(0, limited, &limit, 100, 1), "it earns tokens at its rate");
    }

    #[test]
    fn a_busy_source_survives_a_flood_in_its_set() {
        let limit = pps(1_000_000);
        let mut limiter = SourceLimiter::new(2, crate::seed::Seeds::new(1).hasher());
        let busy: IpAddr = "10.0.0.1".parse().expect("ip");
        for t in 0..1000u64 {
            assert!(limiter.allow(0, busy, &limit, t * 2 + 1, 1));
            // One spoofed source per millisecond lands in the same (only) set and evicts the older entry.
            limiter.allow(0, IpAddr::from((t as u32 + 100).to_be_bytes()), &limit, t * 2, 1);
        }
    }
}
