//! Any bytes as an ICMP error from the network: parsing never panics, and an error that
//! parses translates to one that parses again, quoting the client's datagram, with a valid
//! ICMP checksum (the relay's ICMP translation path).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxidize_relay_core::icmp::{IcmpError, Translation};

fuzz_target!(|data: &[u8]| {
    let mut frame = data.to_vec();
    let Some(error) = IcmpError::parse(&frame) else { return };
    let (client, listen) = if error.quoted_src.is_ipv4() {
        ("10.0.0.2:40000".parse().expect("v4"), "10.0.0.1:5000".parse().expect("v4"))
    } else {
        ("[fd00::2]:40000".parse().expect("v6"), "[fd00::1]:5000".parse().expect("v6"))
    };
    let to = Translation { src_mac: [2, 0, 0, 0, 0, 1], dst_mac: [2, 0, 0, 0, 0, 2], client, listen, overhead: 52 };
    let Some(len) = error.translate(&mut frame, &to) else { return };
    let again = IcmpError::parse(&frame[..len]).expect("a translated error parses");
    assert_eq!((again.quoted_src, again.quoted_dst), (client, listen));
});
