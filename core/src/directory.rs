//! The NAT state every worker can read without locks: one published binding per
//! NAT port and an index from client flow to NAT port.
//!
//! On a multi-queue NIC, RSS chooses the queue (and so the worker) of each
//! packet by its own hash: a reply usually lands on a worker that does not own
//! its NAT port, and after an RSS table change a client flow may land on a
//! worker that did not create its session. The owning worker creates, publishes
//! and expires its sessions; every worker reads them here.
//!
//! - Bindings: one entry per NAT port, written only by the port's owner under a
//!   sequence lock built from atomics (readers retry while a write is in
//!   progress and never see a torn binding), plus a last-active time any worker
//!   may refresh.
//! - Flow index: buckets of 64-bit slots (`fingerprint << 32 | port offset + 1`),
//!   two candidate buckets per flow from a keyed hash. Any worker inserts with a
//!   compare-and-swap; the owner removes its own slots.

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering, fence};

use crate::route::{RouteId, UpstreamId};
use crate::session::{FlowKey, IfaceId};
use crate::time::Millis;
use crate::wire::MacAddr;

/// Slots per index bucket: one 64-byte cache line.
const BUCKET_SLOTS: usize = 8;
/// Index slots per NAT port: at most a quarter of the slots are ever used, so with two
/// candidate buckets (the emptier one taken) a full bucket pair does not happen in practice.
const SLOTS_PER_PORT: usize = 4;
/// How often a reader retries a binding that is being rewritten before giving up.
const READ_ATTEMPTS: usize = 16;
const WORDS: usize = 9;
const OCCUPIED: u64 = 1 << 56;
const IPV6: u64 = 1 << 57;

/// What a worker needs to relay either direction of a session it may not own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub flow: FlowKey,
    /// The relay address the upstream sees, with the entry's NAT port.
    pub nat_ip: IpAddr,
    pub upstream: UpstreamId,
    pub route: RouteId,
    /// Where replies to the client go: the interface and MAC its packets came from.
    pub client_iface: IfaceId,
    pub client_mac: MacAddr,
    /// The flow id a tunnelled previous hop gave this flow.
    pub peer_flow: u32,
}

/// Why a flow could not be indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexError {
    /// Another worker indexed the same flow at the same time, under this NAT port.
    Taken(u16),
    /// Both candidate buckets are full (only with far more flows than NAT ports).
    Full,
}

/// Bindings and flow index over a whole NAT port range, shared by every worker.
#[derive(Debug)]
pub struct NatDirectory {
    first_port: u16,
    entries: Box<[PortEntry]>,
    index: Box<[AtomicU64]>,
    bucket_mask: usize,
    hasher: ahash::RandomState,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct PortEntry {
    /// Even: stable; odd: the owner is writing `words`.
    sequence: AtomicU64,
    words: [AtomicU64; WORDS],
    /// Milliseconds of the session's latest accepted packet, either direction, any worker.
    last_active: AtomicU64,
    /// [`NEW`], [`ANSWERED`] (a worker relayed a reply) or [`ESTABLISHED`] (a client packet
    /// came after a reply): a spoofed source never sees the reply, so its flows stay below it.
    stage: AtomicU8,
}

const NEW: u8 = 0;
const ANSWERED: u8 = 1;
const ESTABLISHED: u8 = 2;

impl NatDirectory {
    /// A directory for ports `ports.0..=ports.1`, its flow hash keyed with `seed` (from the OS).
    pub fn new(ports: (u16, u16), seed: u64) -> Self {
        let count = usize::from(ports.1.saturating_sub(ports.0)) + 1;
        let buckets = (count * SLOTS_PER_PORT).div_ceil(BUCKET_SLOTS).next_power_of_two().max(2);
        let mut seeds = crate::seed::Seeds::new(seed);
        NatDirectory {
            first_port: ports.0,
            entries: (0..count).map(|_| PortEntry::default()).collect(),
            index: (0..buckets * BUCKET_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            bucket_mask: buckets - 1,
            hasher: seeds.hasher(),
        }
    }

    /// Whether `port` is one of the relay's NAT ports (whichever worker owns it).
    #[inline]
    pub fn covers(&self, port: u16) -> bool {
        self.offset(port).is_some()
    }

    /// The binding of `port`, if a session holds it.
    #[inline]
    pub fn binding(&self, port: u16) -> Option<Binding> {
        let entry = &self.entries[self.offset(port)?];
        for _ in 0..READ_ATTEMPTS {
            let before = entry.sequence.load(Ordering::Acquire);
            if before & 1 == 1 {
                core::hint::spin_loop();
                continue;
            }
            let mut words = [0u64; WORDS];
            for (word, atomic) in words.iter_mut().zip(&entry.words) {
                *word = atomic.load(Ordering::Relaxed);
            }
            fence(Ordering::Acquire);
            if entry.sequence.load(Ordering::Relaxed) == before {
                return decode(&words);
            }
        }
        None
    }

    /// Publishes (or, with `None`, withdraws) the binding of `port`. Only the
    /// worker owning `port` may call this: the sequence lock has one writer.
    pub fn publish(&self, port: u16, binding: Option<&Binding>, now: Millis) {
        let Some(offset) = self.offset(port) else { return };
        let entry = &self.entries[offset];
        let words = binding.map_or([0; WORDS], encode);
        let sequence = entry.sequence.load(Ordering::Relaxed);
        entry.sequence.store(sequence.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (atomic, word) in entry.words.iter().zip(words) {
            atomic.store(word, Ordering::Relaxed);
        }
        entry.last_active.store(now, Ordering::Relaxed);
        entry.stage.store(NEW, Ordering::Relaxed);
        entry.sequence.store(sequence.wrapping_add(2), Ordering::Release);
    }

    /// Records traffic on `port`'s session at `now` (any worker).
    #[inline]
    pub fn touch(&self, port: u16, now: Millis) {
        if let Some(offset) = self.offset(port) {
            let last = &self.entries[offset].last_active;
            // Write only when the value changes: a shared line written per packet would bounce between cores.
            if last.load(Ordering::Relaxed) < now {
                last.store(now, Ordering::Relaxed);
            }
        }
    }

    /// Records a reply from the upstream on `port`'s session at `now` (any worker).
    #[inline]
    pub fn answered(&self, port: u16, now: Millis) {
        self.advance(port, NEW, ANSWERED);
        self.touch(port, now);
    }

    /// Records a client packet of `port`'s session (any worker): after a reply, the session is established.
    #[inline]
    pub fn client_sent(&self, port: u16) {
        self.advance(port, ANSWERED, ESTABLISHED);
    }

    /// Whether a client packet followed a reply on `port`'s session.
    pub fn established(&self, port: u16) -> bool {
        self.offset(port).is_some_and(|offset| self.entries[offset].stage.load(Ordering::Relaxed) == ESTABLISHED)
    }

    /// Moves `port`'s session from stage `from` to `to` (written only on that change).
    #[inline]
    fn advance(&self, port: u16, from: u8, to: u8) {
        if let Some(offset) = self.offset(port) {
            let stage = &self.entries[offset].stage;
            // A compare-and-swap is a locked write even when it fails: on every packet it would make
            // the line bounce between cores. Most packets find the stage already past `from`.
            if stage.load(Ordering::Relaxed) == from {
                let _ = stage.compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
    }

    /// When `port`'s session last carried traffic.
    pub fn last_active(&self, port: u16) -> Millis {
        self.offset(port).map_or(0, |offset| self.entries[offset].last_active.load(Ordering::Relaxed))
    }

    /// The NAT port and binding of `flow`, whichever worker created it.
    pub fn find(&self, flow: &FlowKey) -> Option<(u16, Binding)> {
        let (fingerprint, buckets) = self.place(flow);
        buckets.into_iter().flat_map(|b| self.bucket(b)).find_map(|slot| self.match_slot(slot, fingerprint, flow))
    }

    /// Indexes `flow` under `port` (whose binding must already be published).
    /// Two workers indexing one flow at once: whoever sees the other's slot after
    /// placing its own withdraws and gets [`IndexError::Taken`]; at least one sees it.
    pub fn insert(&self, flow: &FlowKey, port: u16) -> Result<(), IndexError> {
        let (fingerprint, buckets) = self.place(flow);
        let offset = self.offset(port).ok_or(IndexError::Full)?;
        let value = (u64::from(fingerprint) << 32) | (offset as u64 + 1);
        // The emptier bucket first (two choices keep every bucket's load close to the mean).
        let used = |bucket: usize| self.bucket(bucket).iter().filter(|s| s.load(Ordering::Relaxed) != 0).count();
        let order = if used(buckets[1]) < used(buckets[0]) { [buckets[1], buckets[0]] } else { buckets };
        let placed = order
            .into_iter()
            .flat_map(|b| self.bucket(b))
            .find(|slot| slot.compare_exchange(0, value, Ordering::SeqCst, Ordering::SeqCst).is_ok())
            .ok_or(IndexError::Full)?;
        let rival = buckets
            .into_iter()
            .flat_map(|b| self.bucket(b))
            .filter(|slot| !core::ptr::eq(*slot, placed))
            .find_map(|slot| self.match_slot(slot, fingerprint, flow));
        match rival {
            Some((rival_port, _)) => {
                placed.store(0, Ordering::SeqCst);
                Err(IndexError::Taken(rival_port))
            }
            None => Ok(()),
        }
    }

    /// Removes `flow`'s slot for `port` (the owner, when the session ends).
    pub fn remove(&self, flow: &FlowKey, port: u16) {
        let (fingerprint, buckets) = self.place(flow);
        let Some(offset) = self.offset(port) else { return };
        let value = (u64::from(fingerprint) << 32) | (offset as u64 + 1);
        for slot in buckets.into_iter().flat_map(|b| self.bucket(b)) {
            if slot.compare_exchange(value, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                return;
            }
        }
    }

    /// Bytes this directory holds per NAT port (bindings plus index).
    pub fn bytes_per_port(&self) -> usize {
        size_of::<PortEntry>() + SLOTS_PER_PORT.next_power_of_two() * size_of::<AtomicU64>()
    }

    #[inline]
    fn offset(&self, port: u16) -> Option<usize> {
        let offset = usize::from(port.checked_sub(self.first_port)?);
        (offset < self.entries.len()).then_some(offset)
    }

    fn place(&self, flow: &FlowKey) -> (u32, [usize; 2]) {
        let hash = self.hasher.hash_one(flow);
        let first = (hash as usize) & self.bucket_mask;
        let second = ((hash >> 20) as usize) & self.bucket_mask;
        // A fingerprint of 0 would make the slot value depend on the port alone; any fixed non-zero is fine.
        let fingerprint = ((hash >> 32) as u32).max(1);
        (fingerprint, [first, if second == first { first ^ 1 } else { second }])
    }

    fn bucket(&self, bucket: usize) -> &[AtomicU64] {
        &self.index[bucket * BUCKET_SLOTS..(bucket + 1) * BUCKET_SLOTS]
    }

    fn match_slot(&self, slot: &AtomicU64, fingerprint: u32, flow: &FlowKey) -> Option<(u16, Binding)> {
        let value = slot.load(Ordering::SeqCst);
        if value == 0 || (value >> 32) as u32 != fingerprint {
            return None;
        }
        let port = self.first_port + ((value & 0xffff_ffff) - 1) as u16;
        self.binding(port).filter(|b| b.flow == *flow).map(|b| (port, b))
    }
}

fn encode(binding: &Binding) -> [u64; WORDS] {
    let [client_hi, client_lo] = ip_words(binding.flow.client.ip());
    let [listen_hi, listen_lo] = ip_words(binding.flow.listen.ip());
    let [nat_hi, nat_lo] = ip_words(binding.nat_ip);
    let ports = u64::from(binding.flow.client.port())
        | u64::from(binding.flow.listen.port()) << 16
        | u64::from(binding.upstream.0) << 32
        | u64::from(binding.route.0) << 48;
    let mut mac = [0u8; 8];
    mac[2..].copy_from_slice(&binding.client_mac);
    let family = if binding.flow.client.is_ipv6() { IPV6 } else { 0 };
    let link = u64::from_be_bytes(mac) | u64::from(binding.client_iface.0) << 48 | OCCUPIED | family;
    [client_hi, client_lo, listen_hi, listen_lo, nat_hi, nat_lo, ports, link, u64::from(binding.peer_flow)]
}

fn decode(words: &[u64; WORDS]) -> Option<Binding> {
    let link = words[7];
    if link & OCCUPIED == 0 {
        return None;
    }
    let ipv6 = link & IPV6 != 0;
    let ip = |hi: u64, lo: u64| {
        let bits = u128::from(hi) << 64 | u128::from(lo);
        if ipv6 { IpAddr::V6(Ipv6Addr::from_bits(bits)) } else { IpAddr::V4(Ipv4Addr::from_bits(bits as u32)) }
    };
    let ports = words[6];
    let mut client_mac = [0u8; 6];
    client_mac.copy_from_slice(&link.to_be_bytes()[2..]);
    Some(Binding {
        flow: FlowKey {
            client: SocketAddr::new(ip(words[0], words[1]), ports as u16),
            listen: SocketAddr::new(ip(words[2], words[3]), (ports >> 16) as u16),
        },
        nat_ip: ip(words[4], words[5]),
        upstream: UpstreamId((ports >> 32) as u16),
        route: RouteId((ports >> 48) as u16),
        client_iface: IfaceId((link >> 48) as u8),
        client_mac,
        peer_flow: words[8] as u32,
    })
}

fn ip_words(ip: IpAddr) -> [u64; 2] {
    let bits = match ip {
        IpAddr::V4(v4) => u128::from(v4.to_bits()),
        IpAddr::V6(v6) => v6.to_bits(),
    };
    [(bits >> 64) as u64, bits as u64]
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    fn binding(client: &str, nat_ip: &str) -> Binding {
        let ipv6 = client.starts_with('[');
        Binding {
            flow: FlowKey {
                client: client.parse().expect("addr"),
                listen: (if ipv6 { "[fd00::1]:5000" } else { "10.0.0.1:5000" }).parse().expect("addr"),
            },
            nat_ip: nat_ip.parse().expect("ip"),
            upstream: UpstreamId(3),
            route: RouteId(2),
            client_iface: IfaceId(1),
            client_mac: [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
            peer_flow: 0xdead_beef,
        }
    }

    #[test]
    fn a_published_binding_reads_back_whole_in_both_families() {
        let directory = NatDirectory::new((20000, 20099), 7);
        for (port, b) in [(20000, binding("10.0.0.2:4000", "10.1.0.1")), (20099, binding("[fd00::2]:4000", "fd01::1"))]
        {
            assert_eq!(directory.binding(port), None);
            directory.publish(port, Some(&b), 5);
            assert_eq!(directory.binding(port), Some(b));
            assert_eq!(directory.last_active(port), 5);
        }
        assert!(!directory.covers(19999) && !directory.covers(20100));
        assert_eq!(directory.binding(20100), None);
    }

    #[test]
    fn withdrawn_and_reused_ports_never_return_the_old_client() {
        let directory = NatDirectory::new((20000, 20009), 7);
        let old = binding("10.0.0.2:4000", "10.1.0.1");
        directory.publish(20003, Some(&old), 1);
        directory.insert(&old.flow, 20003).expect("indexed");
        directory.remove(&old.flow, 20003);
        directory.publish(20003, None, 2);
        assert_eq!(directory.binding(20003), None);
        assert_eq!(directory.find(&old.flow), None);

        let new = binding("10.0.0.9:5000", "10.1.0.1");
        directory.publish(20003, Some(&new), 3);
        directory.insert(&new.flow, 20003).expect("indexed");
        assert_eq!(directory.binding(20003).map(|b| b.flow), Some(new.flow));
        assert_eq!(directory.find(&old.flow), None, "the old flow does not find the reused port");
        assert_eq!(directory.find(&new.flow).map(|(port, _)| port), Some(20003));
    }

    #[test]
    fn the_index_holds_a_flow_on_every_port_of_the_widest_range() {
        for seed in [11, 12, 13] {
            let directory = NatDirectory::new((1, 65535), seed);
            let flow = |port: u16| binding(&format!("10.{}.{}.2:{}", port >> 8, port & 0xff, port), "10.1.0.1");
            for port in 1..=65535u16 {
                let b = flow(port);
                directory.publish(port, Some(&b), 0);
                directory.insert(&b.flow, port).unwrap_or_else(|e| panic!("seed {seed}, port {port}: {e:?}"));
            }
            for port in (1..=65535u16).step_by(97) {
                assert_eq!(directory.find(&flow(port).flow).map(|(p, _)| p), Some(port));
            }
        }
    }

    #[test]
    fn touch_only_moves_time_forward() {
        let directory = NatDirectory::new((20000, 20000), 1);
        directory.publish(20000, Some(&binding("10.0.0.2:1", "10.1.0.1")), 10);
        directory.touch(20000, 50);
        directory.touch(20000, 40);
        assert_eq!(directory.last_active(20000), 50);
    }

    #[test]
    fn one_flow_indexed_by_two_workers_at_once_keeps_one_port() {
        for round in 0..200u64 {
            let directory = Arc::new(NatDirectory::new((20000, 20063), round));
            let flow = binding("10.0.0.2:4000", "10.1.0.1");
            let go = Arc::new(AtomicBool::new(false));
            let workers: Vec<_> = [20001u16, 20040]
                .into_iter()
                .map(|port| {
                    let (directory, go) = (directory.clone(), go.clone());
                    std::thread::spawn(move || {
                        directory.publish(port, Some(&flow), 0);
                        while !go.load(Ordering::Acquire) {
                            core::hint::spin_loop();
                        }
                        let result = directory.insert(&flow.flow, port);
                        if result.is_err() {
                            directory.publish(port, None, 0);
                        }
                        result.is_ok()
                    })
                })
                .collect();
            go.store(true, Ordering::Release);
            let kept = workers.into_iter().map(|w| w.join().expect("worker")).filter(|&kept| kept).count();
            assert!(kept <= 1, "round {round}: {kept} sessions indexed for one flow");
            let found = directory.find(&flow.flow);
            assert_eq!(found.is_some(), kept == 1, "round {round}: the index holds what was kept");
        }
    }

    #[test]
    fn readers_never_see_a_torn_binding_while_the_owner_rewrites() {
        let directory = Arc::new(NatDirectory::new((20000, 20000), 3));
        let a = binding("10.0.0.2:1111", "10.1.0.1");
        let b = binding("[fd00::7]:2222", "fd01::1");
        directory.publish(20000, Some(&a), 0);
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let reader = {
            let (directory, stop, seen) = (directory.clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(read) = directory.binding(20000) {
                        assert!(read == a || read == b, "torn read: {read:?}");
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        // Rewrite until the reader has read 100,000 whole bindings between (and during) the writes.
        let mut writes = 0u64;
        while seen.load(Ordering::Relaxed) < 100_000 && writes < 100_000_000 {
            directory.publish(20000, Some(if writes % 2 == 0 { &b } else { &a }), writes);
            writes += 1;
            for _ in 0..writes % 8 {
                core::hint::spin_loop();
            }
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().expect("no torn read");
        assert!(seen.load(Ordering::Relaxed) >= 100_000, "the reader got whole bindings ({writes} writes)");
    }
}
