//! A worker's index from client flow to session slot: fixed capacity, open addressing in
//! cache-line buckets of 15 fingerprinted slot numbers, so finding a session reads one line of
//! index and then the session itself (a general hash map of full keys reads its control
//! bytes, then a key-sized entry, then the session).
//!
//! A flow lives in its home bucket unless that bucket was full when it arrived; then it lives in
//! the next bucket with room, and every bucket it passed counts it in `overflowed`, so a lookup
//! goes past a bucket only while that count is non-zero (the F14 scheme: no tombstones, no rehash).

use crate::session::FlowKey;

const ENTRIES: usize = 15;
/// Set in every stored entry, so an entry is never 0 (empty).
const OCCUPIED: u32 = 0x8000_0000;
const FINGERPRINT: u32 = 0xffff_0000;

#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    /// `fingerprint << 16 | slot`, with [`OCCUPIED`] set; 0 when empty.
    entries: [u32; ENTRIES],
    /// Flows whose home is an earlier bucket (or this one) that live in a later one.
    overflowed: u32,
}

/// Flow to slot (a `u16`: a worker holds at most one session per NAT port of its share).
#[derive(Debug)]
pub struct FlowIndex {
    buckets: Box<[Bucket]>,
    mask: usize,
    len: usize,
    hasher: ahash::RandomState,
}

impl FlowIndex {
    /// Room for `capacity` flows, keyed with `hasher` (seeded from the OS: attackers choose flows).
    pub fn new(capacity: usize, hasher: ahash::RandomState) -> Self {
        // At most half full, so a flow almost always finds room in its home bucket.
        let buckets = (capacity.max(1) * 2).div_ceil(ENTRIES).next_power_of_two();
        FlowIndex { buckets: vec![Bucket::default(); buckets].into_boxed_slice(), mask: buckets - 1, len: 0, hasher }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The home bucket and the fingerprint (with [`OCCUPIED`]) of `flow`.
    #[inline]
    fn place(&self, flow: &FlowKey) -> (usize, u32) {
        let hash = self.hasher.hash_one(flow);
        ((hash as usize) & self.mask, ((hash >> 32) as u32 & FINGERPRINT) | OCCUPIED)
    }

    /// The slot of `flow`; `holds(slot)` says whether the session in a slot whose fingerprint
    /// matches is really `flow`'s (the index keeps no keys, the sessions do).
    #[inline]
    pub fn find(&self, flow: &FlowKey, holds: impl Fn(u16) -> bool) -> Option<u16> {
        let (mut at, tag) = self.place(flow);
        for _ in 0..self.buckets.len() {
            let bucket = &self.buckets[at];
            for &entry in &bucket.entries {
                if entry & FINGERPRINT == tag && holds(entry as u16) {
                    return Some(entry as u16);
                }
            }
            if bucket.overflowed == 0 {
                return None;
            }
            at = (at + 1) & self.mask;
        }
        None
    }

    /// Indexes `flow` (not indexed yet) at `slot`; false only when every bucket is full,
    /// which the capacity given to [`FlowIndex::new`] rules out.
    pub fn insert(&mut self, flow: &FlowKey, slot: u16) -> bool {
        let (home, tag) = self.place(flow);
        let mut at = home;
        for _ in 0..self.buckets.len() {
            if let Some(entry) = self.buckets[at].entries.iter_mut().find(|e| **e == 0) {
                *entry = tag | u32::from(slot);
                self.count_passed(home, at, |overflowed| overflowed + 1);
                self.len += 1;
                return true;
            }
            at = (at + 1) & self.mask;
        }
        false
    }

    /// Removes `flow`'s entry for `slot`; whether it was there.
    pub fn remove(&mut self, flow: &FlowKey, slot: u16) -> bool {
        let (home, tag) = self.place(flow);
        let wanted = tag | u32::from(slot);
        let mut at = home;
        for _ in 0..self.buckets.len() {
            let bucket = &mut self.buckets[at];
            if let Some(entry) = bucket.entries.iter_mut().find(|e| **e == wanted) {
                *entry = 0;
                self.count_passed(home, at, |overflowed| overflowed - 1);
                self.len -= 1;
                return true;
            }
            if bucket.overflowed == 0 {
                return false;
            }
            at = (at + 1) & self.mask;
        }
        false
    }

    /// Applies `change` to the overflow count of every bucket from `home` up to (not including)
    /// `at`: the buckets a flow living in `at` was pushed past.
    fn count_passed(&mut self, home: usize, at: usize, change: impl Fn(u32) -> u32) {
        let mut passed = home;
        while passed != at {
            let bucket = &mut self.buckets[passed];
            bucket.overflowed = change(bucket.overflowed);
            passed = (passed + 1) & self.mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(i: u32) -> FlowKey {
        FlowKey {
            client: format!("10.{}.{}.{}:{}", i >> 16 & 0xff, i >> 8 & 0xff, i & 0xff, 1000 + i % 50_000)
                .parse()
                .expect("addr"),
            listen: "10.0.0.1:5000".parse().expect("addr"),
        }
    }

    /// An index with a constant hasher, plus the sessions' side: which flow each slot holds.
    fn filled(capacity: usize, count: u32) -> (FlowIndex, Vec<Option<FlowKey>>) {
        let mut index = FlowIndex::new(capacity, ahash::RandomState::with_seeds(1, 2, 3, 4));
        let mut slots = vec![None; capacity];
        for i in 0..count {
            assert!(index.insert(&flow(i), i as u16));
            slots[i as usize] = Some(flow(i));
        }
        (index, slots)
    }

    fn lookup(index: &FlowIndex, slots: &[Option<FlowKey>], key: &FlowKey) -> Option<u16> {
        index.find(key, |slot| slots[usize::from(slot)] == Some(*key))
    }

    #[test]
    fn every_flow_is_found_at_its_slot_and_strangers_are_not() {
        let (index, slots) = filled(65_536, 65_536);
        assert_eq!(index.len(), 65_536);
        for i in (0..65_536).step_by(7) {
            assert_eq!(lookup(&index, &slots, &flow(i)), Some(i as u16));
        }
        assert_eq!(lookup(&index, &slots, &flow(70_000)), None);
    }

    #[test]
    fn flows_pushed_out_of_a_full_home_bucket_are_found_and_removed() {
        // Filled to the last entry (twice what it is sized for): flows whose home filled up
        // live further on, and the `overflowed` counts are what lookups and removals follow.
        let mut index = FlowIndex::new(60, ahash::RandomState::with_seeds(5, 6, 7, 8));
        let count = (index.buckets.len() * ENTRIES) as u32;
        let mut slots = vec![None; count as usize];
        for i in 0..count {
            assert!(index.insert(&flow(i), i as u16));
            slots[i as usize] = Some(flow(i));
        }
        assert!(index.buckets.iter().any(|b| b.overflowed > 0), "some home bucket overflowed");
        assert!(!index.insert(&flow(count), 99), "every bucket is full");
        for i in 0..count {
            assert_eq!(lookup(&index, &slots, &flow(i)), Some(i as u16));
        }
        for i in (0..count).step_by(2) {
            assert!(index.remove(&flow(i), i as u16));
            slots[i as usize] = None;
        }
        for i in 0..count {
            let expected = (i % 2 == 1).then_some(i as u16);
            assert_eq!(lookup(&index, &slots, &flow(i)), expected, "flow {i}");
        }
        for i in (1..count).step_by(2) {
            assert!(index.remove(&flow(i), i as u16));
        }
        assert_eq!(index.len(), 0);
        assert!(index.buckets.iter().all(|b| b.overflowed == 0 && b.entries.iter().all(|&e| e == 0)));
    }

    #[test]
    fn removing_needs_the_right_slot_and_a_second_removal_finds_nothing() {
        let (mut index, _) = filled(64, 10);
        assert!(!index.remove(&flow(3), 4));
        assert!(index.remove(&flow(3), 3));
        assert!(!index.remove(&flow(3), 3));
        assert_eq!(index.len(), 9);
    }

    #[test]
    fn a_fingerprint_match_on_another_flow_is_not_taken_for_it() {
        let (index, _) = filled(64, 10);
        // The sessions disagree with every candidate: nothing is found, whatever the fingerprints say.
        assert_eq!(index.find(&flow(3), |_| false), None);
    }
}
