//! The OxTunnel deframer and its LZ4 path. Arbitrary bytes go through `open`
//! as they are (almost always refused by the tag), and again framed under a
//! valid tag with fuzzer-chosen flags and declared length, so the
//! decompressor sees hostile bodies too. Nothing panics, output stays bounded,
//! and a plain body comes back byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxidize_relay_core::oxtunnel::{self, FLAG_COMPRESSED, HEADER_LEN, TunnelKey};

fuzz_target!(|data: &[u8]| {
    let key = TunnelKey::from_bytes([0x5a; 32]);
    let mut out = [0u8; 1792];
    let _ = oxtunnel::open(&key, data, &mut out);

    let Some((&[flags, len_hi, len_lo], body)) = data.split_first_chunk::<3>() else { return };
    let body = &body[..body.len().min(2000)];
    let mut packet = vec![0u8; HEADER_LEN + body.len() + oxtunnel::TAG_LEN];
    packet[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(body);
    let declared = u16::from_be_bytes([len_hi, len_lo]);
    let len = oxtunnel::frame(&key, flags, 7, declared, body.len(), &mut packet);
    if let Ok(opened) = oxtunnel::open(&key, &packet[..len], &mut out) {
        assert!(opened.len <= out.len());
        assert_eq!(opened.len, usize::from(declared));
        if flags & FLAG_COMPRESSED == 0 {
            assert_eq!(&out[..opened.len], body);
        }
    }
});
