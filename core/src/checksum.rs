//! Internet checksum (RFC 1071) and its incremental update (RFC 1624).

/// Ones'-complement sum of `data` as big-endian 16-bit words, folded to 16 bits.
/// An odd trailing byte is padded with zero, as RFC 1071 prescribes.
pub fn ones_complement_sum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    let mut words = data.chunks_exact(2);
    for word in &mut words {
        sum += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    fold(sum)
}

/// The checksum field value for `data` (the complement of its sum).
pub fn checksum(data: &[u8]) -> u16 {
    !ones_complement_sum(data, 0)
}

/// A pending change to the words covered by one or more checksums.
///
/// Record every old/new pair once, then apply the same delta to each checksum
/// that covers those words (an address change touches both the IPv4 header
/// checksum and the UDP checksum through its pseudo-header).
#[derive(Debug, Default, Clone, Copy)]
pub struct ChecksumDelta {
    sum: u64,
}

impl ChecksumDelta {
    /// Records that the 16-bit-aligned bytes `old` become `new` (equal lengths, even).
    pub fn replace(&mut self, old: &[u8], new: &[u8]) {
        debug_assert_eq!(old.len(), new.len());
        for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
            // RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')
            self.sum += u64::from(!u16::from_be_bytes([o[0], o[1]]));
            self.sum += u64::from(u16::from_be_bytes([n[0], n[1]]));
        }
    }

    /// Records a single 16-bit word change.
    pub fn replace_word(&mut self, old: u16, new: u16) {
        self.sum += u64::from(!old) + u64::from(new);
    }

    /// The checksum field value after the recorded changes.
    pub fn apply(&self, checksum: u16) -> u16 {
        !fold(u64::from(!checksum) + self.sum)
    }
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example bytes: sum is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(ones_complement_sum(&data, 0), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(ones_complement_sum(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_matches_full_recompute() {
        let mut header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        let original = checksum(&header);
        header[10..12].copy_from_slice(&original.to_be_bytes());
        assert_eq!(checksum(&header), 0, "a header with its checksum sums to zero");

        let new_src = [10, 200, 3, 4];
        let mut delta = ChecksumDelta::default();
        delta.replace(&header[12..16], &new_src);
        header[12..16].copy_from_slice(&new_src);
        let updated = delta.apply(original);

        header[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, checksum(&header));
    }

    #[test]
    fn incremental_handles_every_single_word_change() {
        // Exhaustive over one word position: the incremental result always equals a recompute.
        let base = [0x12u8, 0x34, 0xff, 0xff, 0x00, 0x00, 0xab, 0xcd];
        let base_sum = checksum(&base);
        for new in (0..=u16::MAX).step_by(7) {
            let mut data = base;
            data[2..4].copy_from_slice(&new.to_be_bytes());
            let mut delta = ChecksumDelta::default();
            delta.replace_word(0xffff, new);
            let incremental = delta.apply(base_sum);
            let full = checksum(&data);
            // 0x0000 and 0xffff are the same value in ones' complement.
            assert!(
                incremental == full || (incremental ^ full == 0xffff && (full == 0 || full == 0xffff)),
                "word {new:#06x}: incremental {incremental:#06x} full {full:#06x}"
            );
        }
    }
}
