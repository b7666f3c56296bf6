//! The OxTunnel hop format between chained relays: a 10-byte header, the
//! payload (LZ4-compressed when that makes it smaller) and a 16-byte keyed
//! BLAKE3 tag over both. The wire format is described in docs/OXTUNNEL.md.
//!
//! Pure and allocation-free: callers pass the output buffer.

use subtle::ConstantTimeEq;

use crate::drop_reason::DropReason;

pub const MAGIC: [u8; 2] = *b"OX";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 10;
pub const TAG_LEN: usize = 16;
/// Bytes a hop adds to a payload at most: header and tag.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// The body is LZ4 block data; the length field gives the original size.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// A keepalive between relays, not client data.
pub const FLAG_KEEPALIVE: u8 = 0x02;
/// Payloads shorter than this are never worth compressing.
const MIN_COMPRESSIBLE: usize = 32;

/// A pre-shared key of one relay-to-relay hop.
#[derive(Clone)]
pub struct TunnelKey([u8; 32]);

/// Compared in constant time, like every secret.
impl PartialEq for TunnelKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl core::fmt::Debug for TunnelKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TunnelKey(..)")
    }
}

impl TunnelKey {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        TunnelKey(key)
    }

    /// Parses a key file: 64 hexadecimal digits, surrounding whitespace ignored.
    pub fn from_key_file(text: &str) -> Result<Self, &'static str> {
        let hex = text.trim();
        if hex.len() != 64 {
            return Err("a key file holds exactly 64 hexadecimal digits (32 bytes)");
        }
        let mut key = [0u8; 32];
        for (byte, pair) in key.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            let pair = core::str::from_utf8(pair).map_err(|_| "a key file holds only hexadecimal digits")?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| "a key file holds only hexadecimal digits")?;
        }
        Ok(TunnelKey(key))
    }

    fn tag(&self, authenticated: &[u8]) -> [u8; TAG_LEN] {
        let hash = blake3::keyed_hash(&self.0, authenticated);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&hash.as_bytes()[..TAG_LEN]);
        tag
    }
}

/// Why an OxTunnel packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelError {
    /// Shorter than a header and a tag, or the output buffer is too small.
    TooShort,
    BadMagic,
    BadVersion,
    /// The tag does not match: wrong key, or the packet was altered.
    BadTag,
    /// The length field disagrees with the body.
    BadLength,
    /// The declared original size exceeds what the receiver accepts.
    TooLarge,
    /// The compressed body does not decompress to the declared size.
    Decompress,
}

impl TunnelError {
    /// The drop reason this refusal is counted under.
    pub fn drop_reason(self) -> DropReason {
        match self {
            TunnelError::BadTag => DropReason::TunnelAuthFailed,
            TunnelError::TooLarge | TunnelError::Decompress => DropReason::TunnelDecompress,
            TunnelError::TooShort | TunnelError::BadMagic | TunnelError::BadVersion | TunnelError::BadLength => {
                DropReason::TunnelMalformed
            }
        }
    }
}

/// What [`seal`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub len: usize,
    pub compressed: bool,
}

/// What [`open`] recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub flow_id: u32,
    pub keepalive: bool,
    pub compressed: bool,
    /// Payload bytes written to the output buffer.
    pub len: usize,
}

/// Wraps `payload` for the next relay into `out`, compressing it when that makes it smaller.
pub fn seal(
    key: &TunnelKey,
    flow_id: u32,
    keepalive: bool,
    payload: &[u8],
    out: &mut [u8],
) -> Result<Sealed, TunnelError> {
    if payload.len() > usize::from(u16::MAX) || out.len() < OVERHEAD + payload.len() {
        return Err(TunnelError::TooShort);
    }
    let mut flags = if keepalive { FLAG_KEEPALIVE } else { 0 };
    let body = &mut out[HEADER_LEN..HEADER_LEN + payload.len()];
    // Compressed output must be strictly smaller; LZ4 fails when it does not fit.
    let compressed = (payload.len() >= MIN_COMPRESSIBLE)
        .then(|| lz4::block::compress_to_buffer(payload, None, false, &mut body[..payload.len() - 1]).ok())
        .flatten()
        .filter(|&n| n > 0 && n < payload.len());
    let body_len = match compressed {
        Some(n) => {
            flags |= FLAG_COMPRESSED;
            n
        }
        None => {
            body.copy_from_slice(payload);
            payload.len()
        }
    };
    let len = frame(key, flags, flow_id, payload.len() as u16, body_len, out);
    Ok(Sealed { len, compressed: compressed.is_some() })
}

/// Checks and unwraps `packet` into `out` (at most `out.len()` bytes, so
/// decompression is bounded by the frame). The tag is checked, in constant
/// time, before anything else is read from the body.
pub fn open(key: &TunnelKey, packet: &[u8], out: &mut [u8]) -> Result<Opened, TunnelError> {
    if packet.len() < OVERHEAD {
        return Err(TunnelError::TooShort);
    }
    if packet[0..2] != MAGIC {
        return Err(TunnelError::BadMagic);
    }
    if packet[2] != VERSION {
        return Err(TunnelError::BadVersion);
    }
    let (authenticated, tag) = packet.split_at(packet.len() - TAG_LEN);
    if !bool::from(key.tag(authenticated).ct_eq(tag)) {
        return Err(TunnelError::BadTag);
    }
    let flags = packet[3];
    let flow_id = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let original = usize::from(u16::from_be_bytes([packet[8], packet[9]]));
    let body = &authenticated[HEADER_LEN..];
    if original > out.len() {
        return Err(TunnelError::TooLarge);
    }
    let compressed = flags & FLAG_COMPRESSED != 0;
    if compressed {
        let written = lz4::block::decompress_to_buffer(body, Some(original as i32), &mut out[..original])
            .map_err(|_| TunnelError::Decompress)?;
        if written != original {
            return Err(TunnelError::Decompress);
        }
    } else {
        if body.len() != original {
            return Err(TunnelError::BadLength);
        }
        out[..original].copy_from_slice(body);
    }
    Ok(Opened { flow_id, keepalive: flags & FLAG_KEEPALIVE != 0, compressed, len: original })
}

/// Writes the header for a body already at `out[HEADER_LEN..][..body_len]` and the
/// tag after it; returns the packet length. Public for tests and fuzzing, which
/// build packets with arbitrary flags, lengths and bodies under a valid tag.
pub fn frame(key: &TunnelKey, flags: u8, flow_id: u32, original_len: u16, body_len: usize, out: &mut [u8]) -> usize {
    out[0..2].copy_from_slice(&MAGIC);
    out[2] = VERSION;
    out[3] = flags;
    out[4..8].copy_from_slice(&flow_id.to_be_bytes());
    out[8..10].copy_from_slice(&original_len.to_be_bytes());
    let end = HEADER_LEN + body_len;
    let tag = key.tag(&out[..end]);
    out[end..end + TAG_LEN].copy_from_slice(&tag);
    end + TAG_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> TunnelKey {
        TunnelKey::from_bytes([seed; 32])
    }

    /// xorshift: reproducible pseudo-random payloads for the property tests.
    fn noise(state: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                *state as u8
            })
            .collect()
    }

    #[test]
    fn round_trip_for_every_size_and_content() {
        let k = key(7);
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for len in (0..1500).step_by(37) {
            for payload in [vec![0x61; len], noise(&mut state, len), b"relay ".repeat(len / 6 + 1)[..len].to_vec()] {
                let mut wire = vec![0u8; OVERHEAD + len];
                let sealed = seal(&k, 42, false, &payload, &mut wire).expect("seal");
                let mut back = vec![0u8; 2048];
                let opened = open(&k, &wire[..sealed.len], &mut back).expect("open");
                assert_eq!(&back[..opened.len], &payload[..]);
                assert_eq!((opened.flow_id, opened.keepalive, opened.compressed), (42, false, sealed.compressed));
                assert!(sealed.len <= OVERHEAD + len, "never larger than header + payload + tag");
            }
        }
    }

    #[test]
    fn compressible_payloads_shrink_and_incompressible_ones_go_plain() {
        let k = key(1);
        let text = b"GET /index.html HTTP/1.1\r\nHost: example\r\n".repeat(30);
        let mut wire = vec![0u8; OVERHEAD + text.len()];
        let sealed = seal(&k, 1, false, &text, &mut wire).expect("seal");
        assert!(sealed.compressed && sealed.len < text.len() / 4, "{} bytes for {}", sealed.len, text.len());
        let random = noise(&mut 12345, 1400);
        let mut wire = vec![0u8; OVERHEAD + random.len()];
        let sealed = seal(&k, 1, false, &random, &mut wire).expect("seal");
        assert!(!sealed.compressed);
        assert_eq!(wire[3] & FLAG_COMPRESSED, 0, "the flag is clear on the wire");
        assert_eq!(sealed.len, OVERHEAD + random.len());
    }

    #[test]
    fn wrong_key_and_every_altered_byte_are_refused() {
        let payload = b"a datagram between two relays, long enough to compress compress compress".to_vec();
        let mut wire = vec![0u8; OVERHEAD + payload.len()];
        let sealed = seal(&key(1), 9, false, &payload, &mut wire).expect("seal");
        let packet = &wire[..sealed.len];
        let mut out = [0u8; 2048];
        assert_eq!(open(&key(2), packet, &mut out), Err(TunnelError::BadTag));
        for index in 0..packet.len() {
            let mut tampered = packet.to_vec();
            tampered[index] ^= 0x01;
            let expected = match index {
                0 | 1 => TunnelError::BadMagic,
                2 => TunnelError::BadVersion,
                _ => TunnelError::BadTag,
            };
            assert_eq!(open(&key(1), &tampered, &mut out), Err(expected), "byte {index}");
        }
        for cut in 0..packet.len() {
            assert!(open(&key(1), &packet[..cut], &mut out).is_err(), "truncated to {cut}");
        }
    }

    #[test]
    fn decompression_is_bounded_and_checked() {
        let k = key(3);
        let mut out = [0u8; 512];
        // A body that claims to expand to 60,000 bytes: refused before decompressing.
        let mut wire = vec![0u8; 64];
        let len = frame(&k, FLAG_COMPRESSED, 1, 60_000, 8, &mut wire);
        assert_eq!(open(&k, &wire[..len], &mut out), Err(TunnelError::TooLarge));
        // Garbage under a valid tag: refused by the decompressor, not trusted.
        let mut wire = vec![0xffu8; 64];
        let len = frame(&k, FLAG_COMPRESSED, 1, 100, 20, &mut wire);
        assert_eq!(open(&k, &wire[..len], &mut out), Err(TunnelError::Decompress));
        // A plain body whose length field lies.
        let mut wire = vec![0u8; 64];
        let len = frame(&k, 0, 1, 30, 20, &mut wire);
        assert_eq!(open(&k, &wire[..len], &mut out), Err(TunnelError::BadLength));
    }

    #[test]
    fn keepalives_are_marked() {
        let k = key(4);
        let mut wire = [0u8; OVERHEAD];
        let sealed = seal(&k, 0, true, &[], &mut wire).expect("seal");
        let opened = open(&k, &wire[..sealed.len], &mut [0u8; 16]).expect("open");
        assert!(opened.keepalive && opened.len == 0);
    }

    #[test]
    fn key_files() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        assert!(TunnelKey::from_key_file(hex).is_ok());
        assert!(TunnelKey::from_key_file("0011").is_err());
        assert!(TunnelKey::from_key_file(&hex.replace('a', "z")).is_err());
        assert_eq!(
            format!("{:?}", TunnelKey::from_key_file(hex).expect("key")),
            "TunnelKey(..)",
            "keys never reach logs"
        );
    }
}
