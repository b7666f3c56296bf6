#!/usr/bin/env python3
"""UDP/TCP peers for the relay scenarios; each runs inside a namespace via `ip netns exec`.

Commands print one JSON object on stdout when done, so the scenario runner can check them.
"""
import argparse
import json
import os
import select
import signal
import socket
import sys
import time

SIZES = [1, 18, 64, 200, 512, 1000, 1400]
# The largest UDP payload that fits a 1500-byte MTU unfragmented (the relay does not reassemble).
MAX_PAYLOAD = {socket.AF_INET: 1472, socket.AF_INET6: 1452}


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port)


def payload(seq, size, random=False):
    """Seq-dependent content so any mix-up or corruption shows: a repeating pattern
    (compressible), or random bytes (incompressible)."""
    head = seq.to_bytes(8, "big")
    body = os.urandom(max(0, size - 8)) if random else bytes((seq * 31 + i * 7) & 0xFF for i in range(max(0, size - 8)))
    return (head + body)[:size] if size >= 8 else head[8 - size:]


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def parse_proxy_v2(data):
    """A PROXY protocol v2 header as HAProxy's specification (section 2.2) defines it, parsed
    here independently of the relay: returns ((source, destination), rest) for a PROXY command
    over UDP, (None, data) when the datagram has no header, and raises on a malformed one."""
    if not data.startswith(PROXY_V2_SIGNATURE):
        return None, data
    if len(data) < 16:
        raise ValueError("truncated header")
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    length = int.from_bytes(data[14:16], "big")
    if version != 2 or command != 1 or transport != 2 or len(data) < 16 + length:
        raise ValueError(f"not a v2 PROXY header over DGRAM: {data[12:16].hex()}")
    block = data[16:16 + length]
    if family == 1 and length >= 12:
        source = f"{socket.inet_ntop(socket.AF_INET, block[0:4])}:{int.from_bytes(block[8:10], 'big')}"
        target = f"{socket.inet_ntop(socket.AF_INET, block[4:8])}:{int.from_bytes(block[10:12], 'big')}"
    elif family == 2 and length >= 36:
        source = f"[{socket.inet_ntop(socket.AF_INET6, block[0:16])}]:{int.from_bytes(block[32:34], 'big')}"
        target = f"[{socket.inet_ntop(socket.AF_INET6, block[16:32])}]:{int.from_bytes(block[34:36], 'big')}"
    else:
        raise ValueError(f"address family {family} with {length} address bytes")
    return (source, target), data[16 + length:]


def echo(args):
    """Echo every datagram back to its sender until SIGTERM; report who it saw. With
    --proxy-v2, a PROXY v2 header is parsed, recorded and stripped before the echo."""
    host, port = split(args.bind)
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    seen = set()
    count = 0
    sizes = set()
    headers = malformed = 0
    proxied = set()
    running = True

    def stop(*_):
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    print("ready", file=sys.stderr, flush=True)
    while running:
        ready, _, _ = select.select([sock], [], [], 0.2)
        if not ready:
            continue
        data, source = sock.recvfrom(65535)
        count += 1
        if args.proxy_v2:
            try:
                addresses, data = parse_proxy_v2(data)
            except ValueError:
                malformed += 1
                continue
            if addresses:
                headers += 1
                proxied.add(addresses)
        sizes.add(len(data))
        seen.add(f"{source[0]}:{source[1]}")
        sock.sendto(data, source)
    report = {"received": count, "sources": sorted(seen), "sizes": sorted(sizes)}
    if args.proxy_v2:
        report.update(headers=headers, malformed=malformed, proxied=sorted(proxied))
    print(json.dumps(report), flush=True)


def client(args):
    """Send `count` datagrams of mixed sizes with a bounded window from `sockets` sockets
    (flows) in turn; check every echo byte for byte, and that it came back to the socket that sent it."""
    host, port = split(args.to)
    family = family_of(host)
    sizes = SIZES + [MAX_PAYLOAD[family] - args.headroom]
    socks = []
    for i in range(args.sockets):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        if args.bind:
            bind_host, bind_port = split(args.bind)
            sock.bind((bind_host, bind_port + i))
        sock.connect((host, port))
        sock.setblocking(False)
        socks.append(sock)
    by_fd = {sock.fileno(): index for index, sock in enumerate(socks)}
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    pending = {}  # seq -> (payload, sent at, socket index)
    expected_total = args.count
    next_seq = 0
    received = corrupt = duplicates = first_try_lost = retransmits = wrong_socket = 0
    lost_examples = []
    delivered = set()
    given_up = set()
    late = 0  # hashes of payloads already matched: a late original after a retransmit is a duplicate
    attempts = {}
    first_sent = {}  # seq -> when it was first sent: the slowest delivery shows a stall, not just a loss
    slowest = (0.0, None)
    start = time.monotonic()
    deadline = start + args.timeout
    while (next_seq < expected_total or pending) and time.monotonic() < deadline:
        while next_seq < expected_total and len(pending) < args.window:
            data = payload(next_seq, sizes[next_seq % len(sizes)] if args.size == 0 else args.size, args.random)
            index = next_seq % len(socks)
            pending[next_seq] = (data, time.monotonic(), index)
            attempts[next_seq] = 1
            first_sent[next_seq] = pending[next_seq][1]
            socks[index].send(data)
            next_seq += 1
        for fd, _ in poller.poll(50):
            index = by_fd[fd]
            while True:
                try:
                    data = socks[index].recv(65535)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    continue
                seq = int.from_bytes(data[:8], "big") if len(data) >= 8 else None
                match = None
                if seq is not None and seq in pending and pending[seq][0] == data:
                    match = seq
                else:
                    # Short payloads carry only the low bytes of seq: find the pending one that matches.
                    match = next((s for s, (d, _, _) in pending.items() if d == data), None)
                if match is None:
                    if hash(data) in given_up:
                        late += 1
                    elif hash(data) in delivered:
                        duplicates += 1
                    else:
                        corrupt += 1
                    continue
                if pending[match][2] != index:
                    wrong_socket += 1
                del pending[match]
                waited = time.monotonic() - first_sent[match]
                if waited > slowest[0]:
                    slowest = (waited, match)
                delivered.add(hash(data))
                received += 1
        now = time.monotonic()
        for seq, (data, sent, index) in list(pending.items()):
            if now - sent > args.retry_after:
                if attempts[seq] == 1:
                    first_try_lost += 1
                    lost_examples.append((seq, round(sent - start, 2)))
                if attempts[seq] > args.retries:
                    del pending[seq]  # given up on: frees the window; a late answer counts as late, not corrupt
                    given_up.add(hash(data))
                    continue
                attempts[seq] += 1
                retransmits += 1
                pending[seq] = (data, now, index)
                socks[index].send(data)
    print(json.dumps({
        "sent": expected_total, "received": received, "missing": expected_total - received, "late": late,
        "corrupt": corrupt + wrong_socket, "wrong_socket": wrong_socket, "duplicates": duplicates,
        "first_try_lost": first_try_lost, "retransmits": retransmits, "sockets": len(socks),
        "local": "%s:%d" % socks[0].getsockname()[:2], "lost_examples": lost_examples[:8],
        "slowest_delivery": {"seconds": round(slowest[0], 3), "seq": slowest[1]},
    }), flush=True)


def stream(args):
    """A steady stream: `rate` datagrams per second for `duration` seconds, round-robin over
    `sockets` flows, never retransmitted. Reports every datagram lost, every echo checked byte
    for byte, and the longest silence between two echoes (a restart's gap as clients see it)."""
    host, port = split(args.to)
    family = family_of(host)
    socks = []
    for _ in range(args.sockets):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.connect((host, port))
        sock.setblocking(False)
        socks.append(sock)
    sent = {}  # seq -> payload
    received = corrupt = refused = 0
    lost_by_socket = [0] * len(socks)
    last_echo = None
    max_gap = 0.0
    start = time.monotonic()
    print("ready", file=sys.stderr, flush=True)

    def receive_ready(timeout_ms):
        nonlocal received, corrupt, refused, last_echo, max_gap
        for sock in socks:
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    refused += 1  # the listen port had no taker for a moment (no relay attached)
                    continue
                seq = int.from_bytes(data[:8], "big") if len(data) >= 8 else None
                if seq in sent and sent[seq] == data:
                    del sent[seq]
                    received += 1
                    now = time.monotonic()
                    if last_echo is not None:
                        max_gap = max(max_gap, now - last_echo)
                    last_echo = now
                else:
                    corrupt += 1
        if timeout_ms:
            time.sleep(timeout_ms / 1000)

    seq = 0
    while time.monotonic() - start < args.duration:
        due = int((time.monotonic() - start) * args.rate)
        while seq < due:
            data = payload(seq, args.size)
            sent[seq] = data
            try:
                socks[seq % len(socks)].send(data)
            except ConnectionRefusedError:
                refused += 1
                socks[seq % len(socks)].send(data)
            seq += 1
        receive_ready(1)
    settle = time.monotonic() + 2
    while sent and time.monotonic() < settle:
        receive_ready(10)
    for lost in sent:
        lost_by_socket[lost % len(socks)] += 1
    # Where in the stream the losses were, as time offsets (the stream is paced at `rate`).
    lost_span = [round(min(sent) / args.rate, 2), round(max(sent) / args.rate, 2)] if sent else []
    print(json.dumps({
        "sent": seq, "received": received, "lost": len(sent), "corrupt": corrupt, "refused": refused,
        "max_gap_ms": round(max_gap * 1000, 1), "sockets_with_loss": sum(1 for n in lost_by_socket if n),
        "lost_between_s": lost_span,
        "seconds": round(time.monotonic() - start, 2),
    }), flush=True)


def pmtu(args):
    """Path MTU discovery as an application does it: a connected socket that forbids local
    fragmentation sends one datagram of `size` bytes; reports the path MTU the kernel learned
    from the ICMP error it got back (IP_MTU), and whether a second send is refused (EMSGSIZE)."""
    host, port = split(args.to)
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    level, discover, mtu_option = ((socket.IPPROTO_IP, 10, 14) if family == socket.AF_INET
                                   else (socket.IPPROTO_IPV6, 23, 24))  # IP(V6)_MTU_DISCOVER, IP(V6)_MTU
    sock.setsockopt(level, discover, 2)  # IP(V6)_PMTUDISC_DO
    sock.connect((host, port))
    sock.settimeout(1.0)
    echoed = False
    try:
        # Incompressible, so a tunnel hop cannot shrink it back under the MTU.
        sock.send(os.urandom(args.size))
        echoed = len(sock.recv(65535)) == args.size
    except OSError:
        pass
    refused = False
    try:
        sock.send(os.urandom(args.size))
    except OSError as error:
        refused = error.errno == 90  # EMSGSIZE
    print(json.dumps({"mtu": sock.getsockopt(level, mtu_option), "emsgsize": refused, "echoed": echoed}), flush=True)


def refused(args):
    """A connected socket sends one datagram and waits: reports whether the kernel delivered an
    ICMP port unreachable for it (ECONNREFUSED), as a client of a closed port sees it."""
    host, port = split(args.to)
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.settimeout(2.0)
    outcome = "timeout"
    try:
        sock.send(b"anyone there?")
        sock.recv(2048)
        outcome = "answered"
    except ConnectionRefusedError:
        outcome = "refused"
    except socket.timeout:
        pass
    print(json.dumps({"outcome": outcome}), flush=True)


def many_clients(args):
    """Open `count` sockets on distinct ports; each sends its own token and must get only its own back."""
    host, port = split(args.to)
    socks = []
    for i in range(args.count):
        s = socket.socket(family_of(host), socket.SOCK_DGRAM)
        s.bind(("", 0))
        s.connect((host, port))
        s.setblocking(False)
        socks.append(s)
    tokens = {s.fileno(): b"client-%05d-%s" % (i, os.urandom(6).hex().encode()) for i, s in enumerate(socks)}
    got = {s.fileno(): 0 for s in socks}
    wrong = 0
    for round_ in range(args.rounds):
        for s in socks:
            s.send(tokens[s.fileno()])
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(got[s.fileno()] <= round_ for s in socks):
            poller = select.poll()
            for s in socks:
                poller.register(s, select.POLLIN)
            for fd, _ in poller.poll(100):
                sock = next(s for s in socks if s.fileno() == fd)
                while True:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        break
                    if data == tokens[fd]:
                        got[fd] += 1
                    else:
                        wrong += 1
    ports = {s.getsockname()[1] for s in socks}
    complete = sum(1 for n in got.values() if n >= args.rounds)
    print(json.dumps({"clients": len(socks), "distinct_ports": len(ports), "complete": complete,
                      "wrong": wrong, "replies": sum(got.values())}), flush=True)


def send(args):
    """Fire datagrams at an address without expecting anything back."""
    host, port = split(args.to)
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    for i in range(args.count):
        sock.sendto((b"unsolicited-%d-" % i).ljust(args.size, b"x"), (host, port))
    print(json.dumps({"sent": args.count}), flush=True)


def raw(args):
    """Put hand-made Ethernet/IPv4/UDP frames on an interface (AF_PACKET), with valid checksums:
    for frames no socket would send (another host's MAC, a forged source address)."""
    import struct

    def checksum(data):
        if len(data) % 2:
            data += b"\0"
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return ~total & 0xFFFF

    src_host, src_port = split(args.src)
    dst_host, dst_port = split(args.dst)
    mac = lambda text: bytes(int(part, 16) for part in text.split(":"))
    with open(f"/sys/class/net/{args.interface}/address") as f:
        own_mac = mac(f.read().strip())
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((args.interface, 0))
    for i in range(args.count):
        body = b"raw-%d" % i
        src, dst = socket.inet_aton(src_host), socket.inet_aton(dst_host)
        udp_len = 8 + len(body)
        pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
        udp = struct.pack("!HHHH", src_port, dst_port, udp_len, 0) + body
        udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp) or 0xFFFF) + udp[8:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, i, 0, 64, 17, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        tags = b"".join(struct.pack("!HH", tpid, vid) for tpid, vid in ((0x88A8, args.qinq), (0x8100, args.vlan)) if vid)
        sock.send(mac(args.dst_mac) + own_mac + tags + b"\x08\x00" + ip + udp)
    print(json.dumps({"sent": args.count}), flush=True)


def tcp_hold(args):
    """Open `count` TCP connections and hold them idle for `seconds` (an abusive scraper)."""
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port = split(args.to)
    held, refused = [], 0
    for _ in range(args.count):
        try:
            sock = socket.socket(family_of(host), socket.SOCK_STREAM)
        except OSError:
            break  # this process's descriptor limit
        sock.setblocking(False)
        try:
            sock.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            refused += 1
            sock.close()
            continue
        held.append(sock)
    time.sleep(args.seconds)
    for sock in held:
        sock.close()
    print(json.dumps({"opened": len(held), "refused": refused}), flush=True)


def tcp_echo(args):
    host, port = split(args.bind)
    server = socket.socket(family_of(host), socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(4)
    print("ready", file=sys.stderr, flush=True)
    conn, _ = server.accept()
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
    print(json.dumps({"served": 1}), flush=True)


def tcp_client(args):
    host, port = split(args.to)
    blob = os.urandom(args.bytes)
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(blob)
        conn.shutdown(socket.SHUT_WR)
        back = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            back += data
    print(json.dumps({"sent": len(blob), "echoed_intact": back == blob}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("echo"); p.add_argument("--bind", required=True)
    p.add_argument("--proxy-v2", action="store_true", help="parse and strip PROXY v2 headers"); p.set_defaults(run=echo)
    p = sub.add_parser("client"); p.add_argument("--to", required=True); p.add_argument("--bind")
    p.add_argument("--count", type=int, default=1000); p.add_argument("--size", type=int, default=0)
    p.add_argument("--window", type=int, default=32); p.add_argument("--retry-after", type=float, default=0.5)
    p.add_argument("--retries", type=int, default=3); p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--random", action="store_true", help="incompressible payloads")
    p.add_argument("--sockets", type=int, default=1, help="client sockets (flows), used in turn; --bind gives the first port")
    p.add_argument("--headroom", type=int, default=0, help="keep the largest datagram this far below the MTU")
    p.set_defaults(run=client)
    p = sub.add_parser("stream"); p.add_argument("--to", required=True); p.add_argument("--sockets", type=int, default=64)
    p.add_argument("--rate", type=float, default=2000); p.add_argument("--duration", type=float, default=5)
    p.add_argument("--size", type=int, default=64); p.set_defaults(run=stream)
    p = sub.add_parser("refused"); p.add_argument("--to", required=True); p.set_defaults(run=refused)
    p = sub.add_parser("pmtu"); p.add_argument("--to", required=True); p.add_argument("--size", type=int, required=True)
    p.set_defaults(run=pmtu)
    p = sub.add_parser("many-clients"); p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=1000); p.add_argument("--rounds", type=int, default=2)
    p.set_defaults(run=many_clients)
    p = sub.add_parser("send"); p.add_argument("--to", required=True); p.add_argument("--count", type=int, default=10)
    p.add_argument("--size", type=int, default=0, help="pad each datagram to this many bytes")
    p.set_defaults(run=send)
    p = sub.add_parser("raw"); p.add_argument("--interface", required=True); p.add_argument("--dst-mac", required=True)
    p.add_argument("--src", required=True); p.add_argument("--dst", required=True); p.add_argument("--count", type=int, default=5)
    p.add_argument("--vlan", type=int, default=0, help="802.1Q tag"); p.add_argument("--qinq", type=int, default=0, help="outer 802.1ad tag")
    p.set_defaults(run=raw)
    p = sub.add_parser("tcp-hold"); p.add_argument("--to", required=True); p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5); p.set_defaults(run=tcp_hold)
    p = sub.add_parser("tcp-echo"); p.add_argument("--bind", required=True); p.set_defaults(run=tcp_echo)
    p = sub.add_parser("tcp-client"); p.add_argument("--to", required=True); p.add_argument("--bytes", type=int, default=1 << 20)
    p.set_defaults(run=tcp_client)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
