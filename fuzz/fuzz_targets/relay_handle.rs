//! A stream of arbitrary frames through one relay, in both directions, with
//! time moving forward: no panic, sessions stay within capacity, and every
//! frame is either forwarded or dropped with a counted reason.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use oxidize_relay_core::counters::Counters;
use oxidize_relay_core::ratelimit::Limit;
use oxidize_relay_core::route::{RouteSpec, RouteTable, UpstreamId};
use oxidize_relay_core::{IfaceId, NextHop, Relay, RelaySettings, Verdict};

const MAX_SESSIONS: usize = 8;

fuzz_target!(|data: &[u8]| {
    let routes = RouteTable::new(&[
        RouteSpec {
            // A tight per-session limit so the fuzzer reaches the limiter too.
            per_session: Limit { packets_per_second: Some(50), bytes_per_second: Some(20_000) },
            ..RouteSpec::new(
                "10.0.0.1:5000".parse().expect("addr"),
                vec!["10.1.0.2:7000".parse().expect("addr"), "10.1.0.3:7000".parse().expect("addr")],
            )
        },
        RouteSpec::new("[::]:5000".parse().expect("addr"), vec!["[fd01::2]:7000".parse().expect("addr")]),
    ]);
    let counters = Arc::new(Counters::default());
    let settings = RelaySettings {
        verify_checksums: data.first().is_some_and(|b| b & 1 == 1),
        global_limit: Limit { packets_per_second: Some(2_000), bytes_per_second: None },
        max_sessions_per_source: 4,
        source_table_entries: 4,
        ..RelaySettings::unlimited(vec![[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]], (20000, 20015), MAX_SESSIONS, 1000, 1)
    };
    let mut relay = Relay::new(Arc::new(routes), settings, counters.clone());
    for (id, ip) in [(0, "10.1.0.1"), (1, "10.1.0.1"), (2, "fd01::1")] {
        relay.set_next_hop(
            UpstreamId(id),
            Ok(NextHop { iface: IfaceId(1), src_ip: ip.parse().expect("ip"), dst_mac: [2, 0, 0, 0, 0, 3] }),
        );
    }
    // Input: [len_hi, len_lo, time_step, ingress, frame...]*
    let mut rest = data.get(1..).unwrap_or_default();
    let (mut now, mut forwarded) = (0u64, 0u64);
    let mut frames = 0u64;
    while rest.len() >= 4 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 4);
        now += u64::from(rest[2]) * 16;
        let ingress = IfaceId(rest[3] & 1);
        let mut frame = rest[4..4 + len].to_vec();
        // Mostly addressed to the receiving interface, so the fuzzer gets past the MAC check.
        if rest[3] & 2 == 0 && frame.len() >= 6 {
            frame[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1 + ingress.0]);
        }
        rest = &rest[4 + len..];
        frames += 1;
        if let Verdict::Forward(egress) = relay.relay_whole_frame(now, ingress, &mut frame) {
            assert!(egress.0 < 2);
            forwarded += 1;
        }
        relay.expire(now, 4, |_| {});
        assert!(relay.session_count() <= MAX_SESSIONS);
    }
    // A datagram past its egress MTU is both: dropped (counted) and answered with an ICMP error (forwarded).
    let answered = counters.icmp_too_big_sent.get();
    assert_eq!(forwarded + counters.total_drops(), frames + answered, "every frame is forwarded or counted");
});
