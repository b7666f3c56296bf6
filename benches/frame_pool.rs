//! Frame pool micro-benchmark. Cases:
//! - `frame_pool/take_release`: take one frame descriptor from a worker's UMEM pool and give it back
//! - `frame_pool/take_release_burst64`: the same for a 64-frame burst, per frame
//!
//! Creating a UMEM registers it with the kernel (needs root or CAP_NET_RAW);
//! without that the bench says so and measures nothing.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use oxidize_relay::sys::xsk::FramePool;

fn benches(c: &mut Criterion) {
    let mut pool = match FramePool::new(4096, 2048, false, 1) {
        Ok(pool) => pool,
        Err(error) => {
            eprintln!("SKIPPED frame_pool benches: creating a UMEM failed ({error}); run as root");
            return;
        }
    };
    c.bench_function("frame_pool/take_release", |b| {
        b.iter(|| {
            let frame = pool.take(0).expect("a free frame");
            pool.release(black_box(frame));
        })
    });
    let mut burst = Vec::with_capacity(64);
    let mut group = c.benchmark_group("frame_pool");
    group.throughput(Throughput::Elements(64));
    group.bench_function("take_release_burst64", |b| {
        b.iter(|| {
            burst.extend((0..64).filter_map(|_| pool.take(0)));
            for frame in burst.drain(..) {
                pool.release(black_box(frame));
            }
        })
    });
    group.finish();
}

criterion_group!(frame_pool, benches);
criterion_main!(frame_pool);
