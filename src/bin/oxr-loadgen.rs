//! Load generator and reflector over AF_XDP, for the end-to-end benchmark.
//!
//! `gen` sends IPv4/UDP frames (sequence number and send time in the payload)
//! from one interface toward a relay and receives what comes back; `reflect`
//! swaps addresses and returns every datagram to its sender; `forward` is the
//! rig's AF_XDP ceiling: the relay's sockets, rings, UMEM and batch size with
//! nothing but a MAC rewrite between receive and transmit. All steer their
//! traffic with the relay's own XDP program and use copy or zero-copy AF_XDP
//! as the driver allows, so they cost far less per packet than the relays they measure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use oxidize_relay::sys::bpf_abi::RelayConfig;
use oxidize_relay::sys::iface::IfaceInfo;
use oxidize_relay::sys::xdp::XdpProgram;
use oxidize_relay::sys::xsk::{self, Frame, FramePool, QueueSocket};
use oxidize_relay_core::config::{
    DEFAULT_BATCH_SIZE, DEFAULT_FRAME_SIZE, DEFAULT_FRAMES_PER_WORKER, XdpMode, parse_mac,
};
use oxidize_relay_core::wire::{MacAddr, UdpFrame, build::udp_frame};
use serde_json::json;

const BATCH: usize = 64;
const FRAMES: u32 = 8192;
/// Source ports the generator cycles through: flows for the relay's RSS to spread over its queues.
const FLOWS: u64 = 64;
/// Payload bytes used for the sequence number and the send timestamp.
const STAMP: usize = 16;

#[derive(Debug, Parser)]
#[command(about = "AF_XDP load generator and reflector for the relay benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send `count` datagrams to `dst` (at `rate` per second, 0 = as fast as possible) and measure what returns.
    Gen {
        #[arg(long)]
        interface: String,
        #[arg(long)]
        src: SocketAddr,
        #[arg(long)]
        dst: SocketAddr,
        /// MAC of the next hop toward `dst`.
        #[arg(long)]
        dst_mac: String,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// UDP payload bytes (at least 16).
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Flood `dst` for `seconds` with spoofed sources, malformed frames, fragments and oversize datagrams.
    Flood {
        #[arg(long)]
        interface: String,
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        dst_mac: String,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Distinct spoofed source addresses (taken from 10.128.0.0/9).
        #[arg(long, default_value_t = 200_000)]
        sources: u32,
        /// Frames per second (0 = as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Echo every datagram to `listen` back to its sender until SIGTERM.
    Reflect {
        #[arg(long)]
        interface: String,
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Until SIGTERM, move datagrams to `upstream` from the client interface to the upstream
    /// interface and datagrams to the generator's flows from `client` back, rewriting MACs only.
    Forward {
        #[arg(long)]
        client_interface: String,
        #[arg(long)]
        upstream_interface: String,
        #[arg(long)]
        upstream: SocketAddr,
        /// MAC of the upstream's interface.
        #[arg(long)]
        upstream_mac: String,
        /// The generator's source address: its flows' ports start here.
        #[arg(long)]
        client: SocketAddr,
        /// MAC of the client's interface.
        #[arg(long)]
        client_mac: String,
    },
}

/// Loads the relay's XDP program on `interface`, taking traffic to `endpoints` only.
fn steer(interface: &str, endpoints: &[SocketAddr]) -> anyhow::Result<(XdpProgram, IfaceInfo)> {
    let info = IfaceInfo::lookup(interface)?;
    let mut program = XdpProgram::load(1)?;
    for endpoint in endpoints {
        program.add_listen(*endpoint)?;
    }
    // Keep the NAT range empty so only the endpoints are taken.
    program.configure(&RelayConfig { nat_port_first: 1, nat_port_last: 0, ..RelayConfig::default() })?;
    program.attach(info.index, XdpMode::Auto)?;
    Ok((program, info))
}

/// The AF_XDP plumbing every mode shares: a socket (with its own frames) on
/// every RX queue of the interface, since the relay's workers answer on theirs.
struct Port {
    _program: XdpProgram,
    queues: Vec<Queue>,
}

struct Queue {
    pool: FramePool,
    socket: QueueSocket,
    outgoing: Vec<Frame>,
}

impl Port {
    /// Takes traffic to `ports` consecutive ports from `listen`'s.
    fn open(interface: &str, listen: SocketAddr, ports: u16) -> anyhow::Result<(Self, IfaceInfo)> {
        let endpoints: Vec<SocketAddr> =
            (0..ports).map(|offset| SocketAddr::new(listen.ip(), listen.port().wrapping_add(offset))).collect();
        let (program, info) = steer(interface, &endpoints)?;
        let mut queues = Vec::new();
        for queue in 0..info.rx_queues.max(1) {
            let pool = FramePool::new(FRAMES, 2048, false, 1)?;
            let mut socket = QueueSocket::bind(&pool, interface, queue, 0)?;
            program.register_socket(queue, socket.fd())?;
            let mut pool = pool;
            socket.refill(&mut pool, (FRAMES / 2) as usize);
            queues.push(Queue { pool, socket, outgoing: Vec::with_capacity(BATCH) });
        }
        Ok((Port { _program: program, queues }, info))
    }

    fn fds(&self) -> Vec<i32> {
        self.queues.iter().map(|q| q.socket.fd()).collect()
    }
}

impl Queue {
    /// Reclaims sent frames and refills the fill ring.
    fn recycle(&mut self) {
        self.socket.reclaim(&mut self.pool);
        self.socket.refill(&mut self.pool, BATCH);
    }

    /// Sends what fits of `outgoing` (the rest waits for the next call); returns frames sent and wakeups.
    fn flush(&mut self) -> (u64, u64) {
        let (sent, _) = self.socket.transmit(&mut self.outgoing);
        (sent as u64, u64::from(self.socket.wake_tx_if_needed()))
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Gen { interface, src, dst, dst_mac, count, size, rate } => {
            generate(&interface, src, dst, &dst_mac, count, size, rate)
        }
        Command::Reflect { interface, listen } => reflect(&interface, listen),
        Command::Forward { client_interface, upstream_interface, upstream, upstream_mac, client, client_mac } => {
            let upstream_mac = parse_mac(&upstream_mac).context("--upstream-mac is not a MAC address")?;
            let client_mac = parse_mac(&client_mac).context("--client-mac is not a MAC address")?;
            let flows: Vec<SocketAddr> =
                (0..FLOWS).map(|i| SocketAddr::new(client.ip(), client.port().wrapping_add(i as u16))).collect();
            forward([(&client_interface, &[upstream][..], client_mac), (&upstream_interface, &flows, upstream_mac)])
        }
        Command::Flood { interface, dst, dst_mac, seconds, sources, rate } => {
            flood(&interface, dst, &dst_mac, seconds, sources, rate)
        }
    }
}

fn generate(
    interface: &str,
    src: SocketAddr,
    dst: SocketAddr,
    dst_mac: &str,
    count: u64,
    size: usize,
    rate: u64,
) -> anyhow::Result<()> {
    if size < STAMP || !src.is_ipv4() {
        bail!("payload must be at least {STAMP} bytes and addresses IPv4");
    }
    let dst_mac = parse_mac(dst_mac).context("--dst-mac is not a MAC address")?;
    let (mut port, info) = Port::open(interface, src, FLOWS as u16)?;
    let fds = port.fds();
    let mut template = udp_frame(info.mac, dst_mac, src, dst, &vec![0x5a; size]);
    // No UDP checksum (allowed over IPv4), so stamping the payload needs no checksum update.
    template[40..42].copy_from_slice(&[0, 0]);
    let payload_at = template.len() - size;

    let mut rtts: Vec<u32> = Vec::with_capacity(count.min(10_000_000) as usize);
    let mut seen = vec![false; count as usize];
    let (mut sent, mut queued, mut received, mut duplicates, mut wakeups) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut batch = Vec::with_capacity(BATCH);
    let start = Instant::now();
    let mut last_receive = start;
    let mut turn = 0usize;
    loop {
        // Sending: as many as the pacing allows, in bursts, each burst from the next queue
        // with a source port of its own so the relay's RSS spreads them too.
        let due = due(start, rate, count);
        let queue_count = port.queues.len();
        turn = (turn + 1) % queue_count;
        let queue = &mut port.queues[turn];
        while queued < due && queue.outgoing.len() < BATCH {
            let Some(mut frame) = queue.pool.take(0) else { break };
            let seq = queued;
            let mut data = queue.pool.packet_mut(&mut frame);
            let mut cursor = data.cursor();
            cursor.set_pos(0);
            std::io::Write::write_all(&mut cursor, &template)?;
            let stamp = start.elapsed().as_nanos() as u64;
            let bytes = data.contents_mut();
            bytes[34..36].copy_from_slice(&(src.port().wrapping_add((seq % FLOWS) as u16)).to_be_bytes());
            bytes[payload_at..payload_at + 8].copy_from_slice(&seq.to_be_bytes());
            bytes[payload_at + 8..payload_at + 16].copy_from_slice(&stamp.to_be_bytes());
            queue.outgoing.push(frame);
            queued += 1;
        }
        let mut got = 0;
        for queue in &mut port.queues {
            queue.recycle();
            let (flushed, kicked) = queue.flush();
            sent += flushed;
            wakeups += kicked;
            // Receiving: count, check the sequence, time the round trip.
            got += queue.socket.receive(BATCH, &mut batch);
            for mut frame in batch.drain(..) {
                let data = queue.pool.packet_mut(&mut frame);
                if let Ok(frame) = UdpFrame::new_checked(data.contents()) {
                    let payload = frame.payload();
                    if payload.len() >= STAMP {
                        let seq = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
                        let stamp = u64::from_be_bytes(payload[8..16].try_into().unwrap_or_default());
                        match seen.get_mut(seq as usize) {
                            Some(flag) if !*flag => {
                                *flag = true;
                                received += 1;
                                let rtt = (start.elapsed().as_nanos() as u64).saturating_sub(stamp);
                                rtts.push(rtt.min(u64::from(u32::MAX)) as u32);
                            }
                            Some(_) => duplicates += 1,
                            None => {}
                        }
                    }
                }
                queue.pool.release(frame);
            }
        }
        if got > 0 {
            last_receive = Instant::now();
        }
        let finished_sending = sent >= count;
        if finished_sending && (received >= count || last_receive.elapsed() > Duration::from_millis(500)) {
            break;
        }
        if got == 0 && finished_sending {
            wakeups += 1;
            xsk::wait_readable(&fds, 10)?;
        }
    }
    let active = last_receive.duration_since(start).as_secs_f64().max(1e-9);
    rtts.sort_unstable();
    let percentile =
        |p: f64| rtts.get(((rtts.len() as f64 - 1.0) * p) as usize).map_or(0.0, |&ns| f64::from(ns) / 1000.0);
    println!(
        "{}",
        json!({
            "sent": sent, "received": received, "lost": sent - received, "duplicates": duplicates,
            "size": size, "rate": rate, "seconds": active,
            "received_pps": received as f64 / active,
            "rtt_p50_us": percentile(0.50), "rtt_p99_us": percentile(0.99),
            "wakeups": wakeups, "cpu_seconds": cpu_seconds(),
        })
    );
    Ok(())
}

fn reflect(interface: &str, listen: SocketAddr) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let (mut port, _) = Port::open(interface, listen, 1)?;
    let fds = port.fds();
    eprintln!("ready");
    let (mut reflected, mut wakeups) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        for queue in &mut port.queues {
            queue.recycle();
            let room = BATCH.saturating_sub(queue.outgoing.len());
            let mut received = Vec::with_capacity(room);
            queue.socket.receive(room, &mut received);
            for mut frame in received {
                let mut data = queue.pool.packet_mut(&mut frame);
                swap_endpoints(data.contents_mut());
                queue.outgoing.push(frame);
            }
            let (sent, kicked) = queue.flush();
            reflected += sent;
            wakeups += kicked;
            busy |= !queue.outgoing.is_empty() || queue.socket.tx_pending() || sent > 0;
        }
        if !busy {
            wakeups += 1;
            xsk::wait_readable(&fds, 100)?;
        }
    }
    println!("{}", json!({ "reflected": reflected, "wakeups": wakeups, "cpu_seconds": cpu_seconds() }));
    Ok(())
}

/// One side of the forwarder: an interface, the endpoints its XDP program takes, and the MAC
/// of the host behind it (the destination of frames the forwarder sends out of it).
type Side<'a> = (&'a String, &'a [SocketAddr], MacAddr);

/// The bare forwarder: per queue, one thread with one UMEM shared by a socket on each side
/// (two frame domains, as a two-arm relay has), run like the relay's worker without the relay.
fn forward(sides: [Side; 2]) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let mut programs = Vec::new();
    let mut infos = Vec::new();
    for (interface, endpoints, _) in &sides {
        let (program, info) = steer(interface, endpoints)?;
        programs.push(program);
        infos.push(info);
    }
    if infos[0].rx_queues != infos[1].rx_queues {
        bail!("the two interfaces have different queue counts");
    }
    // What goes out of side `i` is addressed to the host behind it, from side `i`'s own MAC.
    let mut headers = [[0u8; 12]; 2];
    for (header, ((_, _, peer), info)) in headers.iter_mut().zip(sides.iter().zip(&infos)) {
        header[..6].copy_from_slice(peer);
        header[6..].copy_from_slice(&info.mac);
    }
    let mut workers = Vec::new();
    for queue in 0..infos[0].rx_queues.max(1) {
        // The relay's defaults, so the ceiling is measured with what the relay runs with.
        let pool = FramePool::new(DEFAULT_FRAMES_PER_WORKER, DEFAULT_FRAME_SIZE, true, 2)?;
        let mut sockets = Vec::new();
        for (domain, (info, program)) in infos.iter().zip(&programs).enumerate() {
            let socket = QueueSocket::bind(&pool, &info.name, queue, domain)?;
            program.register_socket(queue, socket.fd())?;
            sockets.push(socket);
        }
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || forward_queue(pool, sockets, headers, &stop)));
    }
    eprintln!("ready");
    let (mut forwarded, mut wakeups) = (0u64, 0u64);
    for worker in workers {
        let (f, w) = worker.join().map_err(|_| anyhow::anyhow!("a forwarding thread panicked"))?;
        forwarded += f;
        wakeups += w;
    }
    println!("{}", json!({ "forwarded": forwarded, "wakeups": wakeups, "cpu_seconds": cpu_seconds() }));
    Ok(())
}

/// One queue's loop, shaped as the relay worker's: reclaim and refill, receive what the egress
/// backlog has room for, rewrite, transmit, and sleep in poll() only when nothing moved.
fn forward_queue(
    mut pool: FramePool,
    mut sockets: Vec<QueueSocket>,
    headers: [[u8; 12]; 2],
    stop: &AtomicBool,
) -> (u64, u64) {
    let batch = DEFAULT_BATCH_SIZE;
    let backlog = 2 * batch;
    let mut outgoing: [Vec<Frame>; 2] = [Vec::with_capacity(backlog), Vec::with_capacity(backlog)];
    let mut received = Vec::with_capacity(batch);
    let fds: Vec<_> = sockets.iter().map(QueueSocket::fd).collect();
    let share = pool.capacity(0) / 2;
    for socket in &mut sockets {
        socket.refill(&mut pool, share);
    }
    let (mut forwarded, mut wakeups) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        for socket in &mut sockets {
            socket.reclaim(&mut pool);
            socket.refill(&mut pool, batch);
        }
        let mut got = 0;
        for (ingress, socket) in sockets.iter_mut().enumerate() {
            let egress = 1 - ingress;
            let room = batch.min(backlog - outgoing[egress].len());
            got += socket.receive(room, &mut received);
            for mut frame in received.drain(..) {
                let mut data = pool.packet_mut(&mut frame);
                if let Some(header) = data.contents_mut().get_mut(..12) {
                    header.copy_from_slice(&headers[egress]);
                }
                outgoing[egress].push(frame);
            }
        }
        for (socket, queue) in sockets.iter_mut().zip(outgoing.iter_mut()) {
            if queue.is_empty() {
                continue;
            }
            forwarded += socket.transmit(queue).0 as u64;
            wakeups += u64::from(socket.wake_tx_if_needed());
        }
        if got == 0 && outgoing.iter().all(Vec::is_empty) {
            let mut kicked = false;
            for socket in &mut sockets {
                if socket.tx_unsent() {
                    wakeups += u64::from(socket.wake_tx_if_needed());
                    kicked = true;
                }
            }
            if !kicked {
                wakeups += 1;
                let _ = xsk::wait_readable(&fds, 100);
            }
        }
    }
    (forwarded, wakeups)
}

/// The kinds of flood frame, in the order they rotate (weights by repetition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloodKind {
    Spoofed,
    Oversize,
    BadUdpLength,
    Fragment,
    IpOptions,
}

const FLOOD_MIX: [FloodKind; 10] = [
    FloodKind::Spoofed,
    FloodKind::Spoofed,
    FloodKind::Spoofed,
    FloodKind::Spoofed,
    FloodKind::Oversize,
    FloodKind::Oversize,
    FloodKind::BadUdpLength,
    FloodKind::Fragment,
    FloodKind::Fragment,
    FloodKind::IpOptions,
];

/// How many frames of at most `limit` are due `start.elapsed()` into a run paced at `rate` per second (0: unpaced).
fn due(start: Instant, rate: u64, limit: u64) -> u64 {
    if rate == 0 {
        return limit;
    }
    ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(limit)
}

fn flood(interface: &str, dst: SocketAddr, dst_mac: &str, seconds: u64, sources: u32, rate: u64) -> anyhow::Result<()> {
    let dst_mac = parse_mac(dst_mac).context("--dst-mac is not a MAC address")?;
    // Listen on an address nobody answers: the flooder only sends.
    let (mut port, info) = Port::open(interface, "10.255.255.254:9".parse()?, 1)?;
    let small = udp_frame(info.mac, dst_mac, "10.128.0.1:1024".parse()?, dst, &[0x41; 64]);
    let large = udp_frame(info.mac, dst_mac, "10.128.0.1:1024".parse()?, dst, &[0x42; 1472]);
    // IHL 6 with one 4-byte option (four NOPs) before the UDP header.
    let mut with_options = small.clone();
    with_options.splice(34..34, [1, 1, 1, 1]);
    with_options[14] = 0x46;
    let total = u16::from_be_bytes([with_options[16], with_options[17]]) + 4;
    with_options[16..18].copy_from_slice(&total.to_be_bytes());
    let mut sent = [0u64; 5];
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut counter = 0u64;
    let mut turn = 0usize;
    while Instant::now() < deadline {
        turn = (turn + 1) % port.queues.len();
        let queue = &mut port.queues[turn];
        queue.socket.reclaim(&mut queue.pool);
        let due = due(start, rate, u64::MAX);
        if counter >= due {
            std::thread::sleep(Duration::from_micros(200));
        }
        while queue.outgoing.len() < BATCH && counter < due {
            let Some(mut desc) = queue.pool.take(0) else { break };
            let kind = FLOOD_MIX[(counter % FLOOD_MIX.len() as u64) as usize];
            let source = 0x0a80_0000 + (counter as u32 % sources.max(1));
            let mut data = queue.pool.packet_mut(&mut desc);
            let mut cursor = data.cursor();
            cursor.set_pos(0);
            let (template, l4) = match kind {
                FloodKind::Oversize => (&large, 34),
                FloodKind::IpOptions => (&with_options, 38),
                _ => (&small, 34),
            };
            std::io::Write::write_all(&mut cursor, template)?;
            let frame = data.contents_mut();
            frame[26..30].copy_from_slice(&source.to_be_bytes());
            frame[l4..l4 + 2].copy_from_slice(&(1024 + (counter % 60_000) as u16).to_be_bytes());
            frame[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]); // no UDP checksum
            match kind {
                FloodKind::BadUdpLength => frame[38..40].copy_from_slice(&1400u16.to_be_bytes()),
                FloodKind::Fragment => frame[20] = 0x20,
                _ => {}
            }
            frame[24..26].copy_from_slice(&[0, 0]);
            let header = oxidize_relay_core::checksum::checksum(&frame[14..l4]);
            frame[24..26].copy_from_slice(&header.to_be_bytes());
            sent[kind as usize] += 1;
            counter += 1;
            queue.outgoing.push(desc);
        }
        queue.flush();
    }
    println!(
        "{}",
        json!({
            "spoofed": sent[0], "oversize": sent[1], "bad_udp_length": sent[2], "fragment": sent[3],
            "ip_options": sent[4], "total": sent.iter().sum::<u64>(), "seconds": seconds,
            "distinct_sources": u64::from(sources).min(sent[0] + sent[1]),
        })
    );
    Ok(())
}

/// Swaps MACs, IPv4 addresses and UDP ports in place (the checksums are sums, so they stay valid).
fn swap_endpoints(frame: &mut [u8]) {
    if frame.len() < 42 {
        return;
    }
    for i in 0..6 {
        frame.swap(i, 6 + i);
    }
    for i in 0..4 {
        frame.swap(26 + i, 30 + i);
    }
    for i in 0..2 {
        frame.swap(34 + i, 36 + i);
    }
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    ticks / 100.0
}
