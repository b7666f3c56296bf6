//! The XDP program under BPF_PROG_TEST_RUN, from a table of fixtures: each
//! names its input frame, the expected action and the one counter it moves.
//! The frame must leave the program unchanged in every case.

mod common;

use std::net::SocketAddr;

use oxidize_relay::sys::bpf_abi::{RelayConfig, XdpCounter};
use oxidize_relay::sys::xdp::XdpProgram;
use oxidize_relay::sys::xsk::{FramePool, QueueSocket};
use oxidize_relay_core::wire::build::udp_frame;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const RELAY_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

struct Fixture {
    description: &'static str,
    frame: Vec<u8>,
    /// Action when the queue has an AF_XDP socket.
    with_socket: (u32, XdpCounter),
    /// Action when it has none (relay dead or not started): must never be a drop of relay traffic.
    without_socket: (u32, XdpCounter),
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("fixture address")
}

fn udp(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    udp_frame(PEER_MAC, RELAY_MAC, addr(src), addr(dst), payload)
}

fn with_ipv4_header(mutate: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut frame = udp("10.0.0.2:40000", "10.0.0.1:5000", b"payload");
    mutate(&mut frame);
    frame
}

fn fixtures() -> Vec<Fixture> {
    let redirected = |counter| ((XDP_REDIRECT, counter), (XDP_PASS, XdpCounter::PassNoSocket));
    let same = |action, counter| ((action, counter), (action, counter));
    let mut tcp = udp("10.0.0.2:40000", "10.0.0.1:22", b"ssh");
    tcp[23] = 6;
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&PEER_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let mut icmpv6 = udp("[fd00::2]:0", "[fd00::1]:0", b"nd");
    icmpv6[20] = 58;
    let mut vlan = udp("10.0.0.2:40000", "10.0.0.1:5000", b"tagged");
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    // IPv6 with an 8-byte hop-by-hop header (no options: PadN) in front of UDP.
    let ipv6_extension = |dst: &str| {
        let mut frame = udp("[fd00::2]:40000", dst, b"ext");
        frame[20] = 0;
        frame.splice(54..54, [17, 0, 1, 4, 0, 0, 0, 0]);
        let payload = u16::from_be_bytes([frame[18], frame[19]]) + 8;
        frame[18..20].copy_from_slice(&payload.to_be_bytes());
        frame
    };
    let mut ipv4_options = udp("10.0.0.2:40000", "10.0.0.1:5000", b"opts");
    // IHL 6 with a 4-byte NOP option inserted before the UDP header.
    ipv4_options[14] = 0x46;
    ipv4_options.splice(34..34, [1, 1, 1, 1]);
    let total = u16::from_be_bytes([ipv4_options[16], ipv4_options[17]]) + 4;
    ipv4_options[16..18].copy_from_slice(&total.to_be_bytes());

    // An ICMPv4 error of (type, code) quoting the datagram `quoted` (a frame), as an upstream's kernel sends it.
    let icmp_about = |quoted: Vec<u8>, kind: [u8; 2]| {
        let mut frame = udp("10.1.0.2:1", "10.1.0.1:1", b"")[..34].to_vec();
        frame[23] = 1;
        frame.extend_from_slice(&[kind[0], kind[1], 0, 0, 0, 0, 0, 0]);
        frame.extend_from_slice(&quoted[14..]);
        let total = (frame.len() - 14) as u16;
        frame[16..18].copy_from_slice(&total.to_be_bytes());
        frame
    };
    let nat_datagram = || udp("10.1.0.1:20000", "10.1.0.2:7000", b"q");

    let table = [
        (
            "ICMP port unreachable about a datagram from a NAT endpoint",
            icmp_about(nat_datagram(), [3, 3]),
            redirected(XdpCounter::RedirectIcmp),
        ),
        (
            "ICMP time exceeded about a datagram from a NAT endpoint",
            icmp_about(nat_datagram(), [11, 0]),
            redirected(XdpCounter::RedirectIcmp),
        ),
        (
            "ICMP error about a datagram from another port",
            icmp_about(udp("10.1.0.1:53", "10.1.0.2:7000", b"q"), [3, 3]),
            same(XDP_PASS, XdpCounter::PassNotUdp),
        ),
        ("ICMP echo request (ping)", icmp_about(nat_datagram(), [8, 0]), same(XDP_PASS, XdpCounter::PassNotUdp)),
        (
            "client datagram to an IPv4 listen address",
            udp("10.0.0.2:40000", "10.0.0.1:5000", b"hi"),
            redirected(XdpCounter::RedirectListen),
        ),
        (
            "client datagram to an IPv6 wildcard listen port",
            udp("[fd00::2]:40000", "[fd00::1]:5000", b"hi6"),
            redirected(XdpCounter::RedirectListen),
        ),
        ("802.1Q-tagged client datagram", vlan, redirected(XdpCounter::RedirectListen)),
        (
            "upstream reply to a NAT port on the NAT address",
            udp("10.1.0.2:7000", "10.1.0.1:20000", b"re"),
            redirected(XdpCounter::RedirectNat),
        ),
        (
            "upstream reply over IPv6 to a NAT port",
            udp("[fd01::2]:7000", "[fd01::1]:29999", b"re6"),
            redirected(XdpCounter::RedirectNat),
        ),
        (
            "NAT-range port on an address that is not a NAT address",
            udp("10.1.0.2:7000", "10.1.0.9:20000", b"x"),
            same(XDP_PASS, XdpCounter::PassOtherPort),
        ),
        (
            "port just past the NAT range",
            udp("10.1.0.2:7000", "10.1.0.1:30000", b"x"),
            same(XDP_PASS, XdpCounter::PassOtherPort),
        ),
        (
            "DNS to the relay host",
            udp("10.0.0.2:40000", "10.0.0.1:53", b"dns"),
            same(XDP_PASS, XdpCounter::PassOtherPort),
        ),
        (
            "IPv4 listen port on another address",
            udp("10.0.0.2:40000", "10.0.0.7:5000", b"x"),
            same(XDP_PASS, XdpCounter::PassOtherPort),
        ),
        ("TCP (SSH) to the relay host", tcp, same(XDP_PASS, XdpCounter::PassNotUdp)),
        (
            "IPv6 with a hop-by-hop header to a listen port",
            ipv6_extension("[fd00::1]:5000"),
            same(XDP_DROP, XdpCounter::DropIpv6Extension),
        ),
        (
            "IPv6 with a hop-by-hop header to another port",
            ipv6_extension("[fd00::1]:53"),
            same(XDP_PASS, XdpCounter::PassOtherPort),
        ),
        (
            "relay-bound frame longer than an AF_XDP frame holds",
            udp("10.0.0.2:40000", "10.0.0.1:5000", &[0x42; 1800]),
            same(XDP_DROP, XdpCounter::DropTooBig),
        ),
        ("ARP", arp, same(XDP_PASS, XdpCounter::PassNotIp)),
        ("ICMPv6 neighbour discovery", icmpv6, same(XDP_PASS, XdpCounter::PassNotUdp)),
        (
            "relay-bound frame cut inside the UDP header",
            with_ipv4_header(|f| f.truncate(38)),
            same(XDP_PASS, XdpCounter::PassUnparsed),
        ),
        (
            "relay-bound UDP length beyond the IP payload",
            with_ipv4_header(|f| f[38..40].copy_from_slice(&400u16.to_be_bytes())),
            same(XDP_DROP, XdpCounter::DropBadUdpLength),
        ),
        (
            "relay-bound UDP length below the header size",
            with_ipv4_header(|f| f[38..40].copy_from_slice(&4u16.to_be_bytes())),
            same(XDP_DROP, XdpCounter::DropBadUdpLength),
        ),
        (
            "relay-bound UDP length past the end of the frame",
            with_ipv4_header(|f| {
                f.truncate(44);
            }),
            same(XDP_DROP, XdpCounter::DropBadUdpLength),
        ),
        ("relay-bound IPv4 with options", ipv4_options, same(XDP_DROP, XdpCounter::DropIpOptions)),
        (
            "relay-bound first fragment (MF set)",
            with_ipv4_header(|f| f[20] = 0x20),
            same(XDP_DROP, XdpCounter::DropFragment),
        ),
        (
            "later fragment (no UDP header of its own)",
            with_ipv4_header(|f| f[21] = 0x10),
            same(XDP_PASS, XdpCounter::PassUnparsed),
        ),
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, as no driver delivers them.
        (
            "Ethernet header announcing IPv4 with nothing after it",
            with_ipv4_header(|f| f.truncate(14)),
            same(XDP_PASS, XdpCounter::PassUnparsed),
        ),
    ];
    table
        .into_iter()
        .map(|(description, frame, (with_socket, without_socket))| Fixture {
            description,
            frame,
            with_socket,
            without_socket,
        })
        .collect()
}

/// NAT ports 20000-29999, AF_XDP frames of 2048 bytes, a new-flow budget of `new_flows_per_second` (0: off).
fn config(new_flows_per_second: u32) -> RelayConfig {
    RelayConfig {
        nat_port_first: 20000,
        nat_port_last: 29999,
        new_flows_per_second,
        max_frame_len: oxidize_relay::sys::xsk::max_frame_len(2048),
        pad: 0,
    }
}

fn loaded_program() -> XdpProgram {
    let program = XdpProgram::load(1024).expect("load the XDP program");
    program.configure(&config(0)).expect("NAT ports");
    program.add_listen(addr("10.0.0.1:5000")).expect("IPv4 listen");
    program.add_listen(addr("[::]:5000")).expect("IPv6 wildcard listen");
    program.add_nat_addr("10.1.0.1".parse().expect("ip")).expect("NAT address");
    program.add_nat_addr("fd01::1".parse().expect("ip")).expect("NAT address");
    program
}

fn check(program: &XdpProgram, fixture: &Fixture, expected: (u32, XdpCounter), phase: &str) {
    let before = program.counters().expect("read counters");
    let (action, output) = program
        .test_run(&fixture.frame)
        .unwrap_or_else(|e| panic!("{phase}: {}: BPF_PROG_TEST_RUN: {e}", fixture.description));
    let after = program.counters().expect("read counters");
    assert_eq!(action, expected.0, "{phase}: {}: action", fixture.description);
    assert_eq!(output, fixture.frame, "{phase}: {}: the program must not modify the frame", fixture.description);
    for counter in XdpCounter::ALL {
        let moved = after[counter as usize] - before[counter as usize];
        let wanted = u64::from(counter == expected.1);
        assert_eq!(moved, wanted, "{phase}: {}: counter {}", fixture.description, counter.name());
    }
}

#[test]
fn fixtures_without_a_socket_never_drop_relay_traffic() {
    if !common::privileged("fixtures_without_a_socket_never_drop_relay_traffic") {
        return;
    }
    let program = loaded_program();
    for fixture in fixtures() {
        check(&program, &fixture, fixture.without_socket, "no socket");
    }
}

/// One test binds the socket: the kernel releases a loopback queue lazily, so a
/// second bind right after the first socket closes can fail.
#[test]
fn with_an_af_xdp_socket_in_the_map() {
    if !common::privileged("with_an_af_xdp_socket_in_the_map") {
        return;
    }
    // A real AF_XDP socket in slot 0 (bound to loopback; no program is attached anywhere).
    let pool = FramePool::new(256, 2048, false, 1).expect("UMEM");
    let socket = QueueSocket::bind(&pool, "lo", 0, 0).expect("AF_XDP socket on lo");
    fixtures_redirect_only_relay_traffic(&socket);
    new_flow_budget_sheds_new_flows_but_never_established_ones(&socket);
}

fn fixtures_redirect_only_relay_traffic(socket: &QueueSocket) {
    let program = loaded_program();
    program.register_socket(0, socket.fd()).expect("register socket");
    for fixture in fixtures() {
        check(&program, &fixture, fixture.with_socket, "socket on queue 0");
    }
}

fn new_flow_budget_sheds_new_flows_but_never_established_ones(socket: &QueueSocket) {
    let program = loaded_program();
    // 10 new flows per second per CPU: a full bucket holds a quarter second, 2 flows.
    program.configure(&config(10)).expect("configure");
    program.register_socket(0, socket.fd()).expect("register socket");
    let established = addr("10.0.0.9:40000");
    program.flow_map().insert(established, 5000).expect("register a flow");
    let mut actions = Vec::new();
    for port in 1..=20u16 {
        let frame = udp(&format!("10.0.0.2:{port}"), "10.0.0.1:5000", b"new");
        actions.push(program.test_run(&frame).expect("run").0);
    }
    let admitted = actions.iter().filter(|&&a| a == XDP_REDIRECT).count();
    assert!((1..=3).contains(&admitted), "the burst admits about 2 new flows, not {admitted}");
    assert!(actions.iter().all(|&a| a == XDP_REDIRECT || a == XDP_DROP));
    for _ in 0..100 {
        let frame = udp("10.0.0.9:40000", "10.0.0.1:5000", b"established");
        assert_eq!(program.test_run(&frame).expect("run").0, XDP_REDIRECT, "an established flow always passes");
    }
    let reply = udp("10.1.0.2:7000", "10.1.0.1:20000", b"reply");
    assert_eq!(program.test_run(&reply).expect("run").0, XDP_REDIRECT, "replies are not budgeted");
    let counters = program.counters().expect("counters");
    assert_eq!(counters[XdpCounter::DropNewFlowBudget as usize], 20 - admitted as u64);
    program.flow_map().remove(established, 5000);
}
