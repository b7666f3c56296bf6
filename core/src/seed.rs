//! Randomness the core is given, never fetches: one seed from the OS becomes
//! the keys of every hash over packet fields and the NAT port choice, so an
//! attacker can neither aim collisions at a table nor predict the next port.

/// A stream of 64-bit values derived from one seed (SplitMix64: fast, and
/// every output of a good seed is unpredictable without it).
#[derive(Debug, Clone)]
pub struct Seeds {
    state: u64,
}

impl Seeds {
    pub fn new(seed: u64) -> Self {
        Seeds { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A keyed hasher for a table over packet fields.
    pub fn hasher(&mut self) -> ahash::RandomState {
        ahash::RandomState::with_seeds(self.next_u64(), self.next_u64(), self.next_u64(), self.next_u64())
    }

    /// A value in `0..bound` (`bound` > 0), without modulo bias worth an attacker's time.
    pub fn below(&mut self, bound: usize) -> usize {
        ((u128::from(self.next_u64()) * bound as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn different_seeds_give_different_streams_and_below_stays_in_range() {
        let (mut a, mut b) = (Seeds::new(1), Seeds::new(2));
        assert_ne!(a.next_u64(), b.next_u64());
        let mut hits = [0u32; 10];
        for _ in 0..10_000 {
            hits[a.below(10)] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "roughly uniform: {hits:?}");
    }
}
