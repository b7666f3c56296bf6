//! Frame pool domains on a real UMEM: a side that exhausts its frames cannot
//! take the other side's, and every frame goes home by address.

mod common;

use oxidize_relay::sys::xsk::FramePool;

#[test]
fn domains_are_isolated() {
    if !common::privileged("domains_are_isolated") {
        return;
    }
    let mut pool = FramePool::new(512, 2048, false, 2).expect("UMEM (needs CAP_NET_RAW)");
    assert_eq!((pool.capacity(0), pool.capacity(1)), (256, 256));
    let client: Vec<_> = (0..256).map(|_| pool.take(0).expect("client frame")).collect();
    assert!(pool.take(0).is_none(), "the client domain is exhausted");
    assert_eq!(pool.stats(0).failures, 1);
    let upstream = pool.take(1).expect("the upstream domain is untouched by a client-side flood");
    assert_eq!((pool.in_use(0), pool.in_use(1)), (256, 1));
    pool.release(upstream);
    for frame in client {
        pool.release(frame);
    }
    assert_eq!((pool.in_use(0), pool.in_use(1)), (0, 0), "each frame went back to its own domain");
    assert_eq!((pool.stats(0).allocs, pool.stats(0).frees), (256, 256));
}
