//! Any bytes through the packet view: parsing never panics, and a frame that
//! parses can be rewritten and still parses, with valid checksums when it had them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxidize_relay_core::DropReason;
use oxidize_relay_core::wire::{Rewrite, UdpFrame, is_martian};

fuzz_target!(|data: &[u8]| {
    let mut frame = data.to_vec();
    let Ok(mut view) = UdpFrame::new_checked(&mut frame[..]) else { return };
    let had_valid_checksums = view.checksums_valid();
    let (src, dst) = (view.src(), view.dst());
    let _ = view.payload();
    let to = Rewrite { src_mac: view.dst_mac(), dst_mac: view.src_mac(), src: dst, dst: src };
    assert!(view.rewrite(&to));
    let again = match UdpFrame::new_checked(&frame[..]) {
        Ok(again) => again,
        // The old destination became the source; a martian one is refused, as on the wire.
        Err(DropReason::MartianSource) if is_martian(dst.ip()) => return,
        Err(reason) => panic!("a rewritten frame no longer parses: {reason:?}"),
    };
    assert_eq!((again.src(), again.dst()), (dst, src));
    if had_valid_checksums {
        assert!(again.checksums_valid(), "rewrite kept the checksums valid");
    }
});
