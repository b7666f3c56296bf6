//! Hot-path micro-benchmarks of the relay core. Cases:
//! - `parse_validate/ipv4_64b`: `UdpFrame::new_checked` on a 64-byte-payload frame
//! - `rewrite/ipv4` and `rewrite/ipv6`: in-place rewrite with incremental checksums
//! - `session_lookup/{1k,64k}`: the owner's flow lookup and refresh with 1,000 and 65,536 live sessions
//!   (65,536 is the most one worker holds: one NAT port per session)
//! - `reply_lookup/64k`: a reply's binding read from the shared NAT directory, 65,536 live sessions
//! - `route_lookup`: listen address to route
//! - `rate_limit/session_bucket`: one packets+bytes token-bucket check
//! - `rate_limit/source_table_64k`: a per-source check in a 65,536-slot table, sources cycling
//! - `oxtunnel/seal_1400b_text` and `oxtunnel/seal_1400b_random`: wrap a 1400-byte payload
//!   (LZ4 attempt + keyed BLAKE3 tag), compressible and incompressible
//! - `oxtunnel/open_1400b_text`: check and unwrap the compressible one
//! - `handle_burst/64`: one full `Relay::relay_whole_frame` over a 64-packet burst of client
//!   traffic with established sessions (parse, validate, route, session, rewrite);
//!   throughput is reported per packet

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use oxidize_relay_core::counters::Counters;
use oxidize_relay_core::directory::NatDirectory;
use oxidize_relay_core::oxtunnel::{self, TunnelKey};
use oxidize_relay_core::ratelimit::{Limit, SourceLimiter, TokenPair};
use oxidize_relay_core::route::{RouteId, RouteSpec, RouteTable, UpstreamId};
use oxidize_relay_core::seed::Seeds;
use oxidize_relay_core::session::{FlowKey, IfaceId, Session, SessionTable, Timeouts};
use oxidize_relay_core::wire::{Rewrite, UdpFrame, build::udp_frame};
use oxidize_relay_core::{NextHop, Relay, RelaySettings, Verdict};

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("bench address")
}

fn client(i: u32) -> SocketAddr {
    SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0000 + (i >> 14)).into(), 1024 + (i & 0x3fff) as u16)
}

fn session_table(sessions: u32) -> (SessionTable, Arc<NatDirectory>) {
    let directory = Arc::new(NatDirectory::new((1, 65535), 1));
    let mut table = SessionTable::new(
        directory.clone(),
        (1, 65535),
        65535,
        Timeouts { idle: 60_000, unreplied: 60_000 },
        Seeds::new(2),
    );
    for i in 0..sessions {
        let template = Session {
            flow: FlowKey { client: client(i), listen: addr("10.0.0.1:5000") },
            route: RouteId(0),
            upstream: UpstreamId(0),
            nat_ip: "10.1.0.1".parse().expect("ip"),
            nat_port: 0,
            client_iface: IfaceId(0),
            client_mac: MAC_A,
            last_seen: 0,
            created: 0,
            tokens: TokenPair::full(&Limit::default(), 0),
            peer_flow: 0,
        };
        table.admit_slot(template).expect("room");
    }
    (table, directory)
}

fn benches(c: &mut Criterion) {
    let frame = udp_frame(MAC_A, MAC_B, addr("10.0.0.2:40000"), addr("10.0.0.1:5000"), &[0x5a; 64]);
    c.bench_function("parse_validate/ipv4_64b", |b| {
        b.iter(|| UdpFrame::new_checked(black_box(&frame[..])).map(|f| f.dst()))
    });

    for (name, src, dst, new_src, new_dst) in [
        ("rewrite/ipv4", "10.0.0.2:40000", "10.0.0.1:5000", "10.1.0.1:20000", "10.1.0.2:7000"),
        ("rewrite/ipv6", "[fd00::2]:40000", "[fd00::1]:5000", "[fd01::1]:20000", "[fd01::2]:7000"),
    ] {
        let mut frame = udp_frame(MAC_A, MAC_B, addr(src), addr(dst), &[0x5a; 64]);
        let to = Rewrite { src_mac: MAC_B, dst_mac: MAC_A, src: addr(new_src), dst: addr(new_dst) };
        c.bench_function(name, |b| {
            b.iter(|| {
                let mut view = UdpFrame::new_checked(&mut frame[..]).expect("valid");
                view.rewrite(black_box(&to))
            })
        });
    }

    for (name, sessions) in [("session_lookup/1k", 1_000u32), ("session_lookup/64k", 65_535)] {
        let (mut table, _) = session_table(sessions);
        let keys: Vec<FlowKey> =
            (0..sessions).map(|i| FlowKey { client: client(i), listen: addr("10.0.0.1:5000") }).collect();
        let mut next = 0usize;
        c.bench_function(name, |b| {
            b.iter(|| {
                next = (next + 7919) % keys.len();
                let slot = table.find(black_box(&keys[next]))?;
                table.refresh(slot, 1).map(|s| s.nat_port)
            })
        });
    }

    let (_table, directory) = session_table(65_535);
    let mut port = 1u16;
    c.bench_function("reply_lookup/64k", |b| {
        b.iter(|| {
            port = port.wrapping_mul(31).wrapping_add(7).max(1);
            directory.binding(black_box(port)).map(|s| s.upstream)
        })
    });

    let routes = RouteTable::new(&[
        RouteSpec::new(addr("10.0.0.1:5000"), vec![addr("10.1.0.2:7000")]),
        RouteSpec::new(addr("0.0.0.0:6000"), vec![addr("10.1.0.3:7000")]),
    ]);
    let listen = addr("10.0.0.1:5000");
    c.bench_function("route_lookup", |b| b.iter(|| routes.lookup(black_box(listen))));

    let limit = Limit { packets_per_second: Some(1_000_000_000), bytes_per_second: Some(1_000_000_000_000) };
    let mut tokens = TokenPair::full(&limit, 0);
    let mut now = 0u64;
    c.bench_function("rate_limit/session_bucket", |b| {
        b.iter(|| {
            now += 1;
            tokens.allow(black_box(&limit), now, 100)
        })
    });
    let mut sources = SourceLimiter::new(65_536, Seeds::new(3).hasher());
    let mut source = 0u32;
    c.bench_function("rate_limit/source_table_64k", |b| {
        b.iter(|| {
            source = source.wrapping_mul(2_654_435_761).wrapping_add(1) % 50_000;
            sources.allow(0, std::net::IpAddr::from(source.to_be_bytes()), black_box(&limit), 1, 100)
        })
    });

    let key = TunnelKey::from_bytes([7; 32]);
    let text = b"GET /index.html HTTP/1.1\r\nHost: relay.example\r\nAccept: */*\r\n".repeat(25)[..1400].to_vec();
    let random: Vec<u8> = (0..1400u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut wire = vec![0u8; 1400 + oxtunnel::OVERHEAD];
    for (name, payload) in [("oxtunnel/seal_1400b_text", &text), ("oxtunnel/seal_1400b_random", &random)] {
        c.bench_function(name, |b| b.iter(|| oxtunnel::seal(&key, 1, false, black_box(payload), &mut wire)));
    }
    let sealed = oxtunnel::seal(&key, 1, false, &text, &mut wire).expect("seal");
    let mut plain = vec![0u8; 1792];
    c.bench_function("oxtunnel/open_1400b_text", |b| {
        b.iter(|| oxtunnel::open(&key, black_box(&wire[..sealed.len]), &mut plain))
    });

    let mut relay = Relay::new(
        Arc::new(routes),
        RelaySettings::unlimited(vec![MAC_B], (20000, 29999), 10_000, 60_000, 4),
        Arc::new(Counters::default()),
    );
    relay.set_next_hop(
        UpstreamId(0),
        Ok(NextHop { iface: IfaceId(0), src_ip: "10.1.0.1".parse().expect("ip"), dst_mac: MAC_A }),
    );
    let burst: Vec<Vec<u8>> =
        (0..64).map(|i| udp_frame(MAC_A, MAC_B, client(i), addr("10.0.0.1:5000"), &[0x5a; 64])).collect();
    for frame in &burst {
        assert!(matches!(relay.relay_whole_frame(0, IfaceId(0), &mut frame.clone()), Verdict::Forward(_)));
    }
    let mut group = c.benchmark_group("handle_burst");
    group.throughput(Throughput::Elements(64));
    group.bench_function("64", |b| {
        b.iter_batched_ref(
            || burst.clone(),
            |frames| {
                for frame in frames.iter_mut() {
                    black_box(relay.relay_whole_frame(1, IfaceId(0), frame));
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
