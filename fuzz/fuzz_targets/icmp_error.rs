//! Any bytes as an ICMP error from the network: parsing never panics, and an error that
//! parses translates to one that parses again, quoting the client's datagram, with a valid
//! ICMP checksum (the relay's ICMP translation path). The same bytes as what a socket's error
//! queue reports (type, code, info, quoted payload: the socket backend's input) rebuild into a
//! frame that goes through the same path.
#![no_main]

use core::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use oxidize_relay_core::icmp::{IcmpError, QueuedError, Translation, rebuild_frame};

fuzz_target!(|data: &[u8]| {
    translate_checked(data.to_vec());
    if let [kind, code, a, b, c, d, family, payload @ ..] = data {
        let ipv6 = family & 1 == 1;
        let (nat, upstream, from): (SocketAddr, SocketAddr, _) = if ipv6 {
            (
                "[fd00:2::1]:20001".parse().expect("v6"),
                "[fd00:2::2]:7000".parse().expect("v6"),
                "fd00:2::9".parse().expect("v6"),
            )
        } else {
            (
                "10.2.0.1:20001".parse().expect("v4"),
                "10.2.0.2:7000".parse().expect("v4"),
                "10.2.0.9".parse().expect("v4"),
            )
        };
        let error = QueuedError { kind: *kind, code: *code, info: u32::from_be_bytes([*a, *b, *c, *d]), from };
        let frame = rebuild_frame(&error, [2, 0, 0, 0, 0, 2], nat, upstream, payload).expect("one family");
        let is_error = if ipv6 { matches!(kind, 1..=3) } else { matches!(kind, 3 | 11) };
        if is_error {
            let parsed = IcmpError::parse(&frame).expect("a rebuilt error parses");
            assert_eq!((parsed.quoted_src, parsed.quoted_dst), (nat, upstream));
        }
        translate_checked(frame);
    }
});

fn translate_checked(mut frame: Vec<u8>) {
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
}
