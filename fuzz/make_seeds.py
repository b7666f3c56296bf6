#!/usr/bin/env python3
"""Writes the seed corpora for the frame fuzz targets (run from fuzz/; the output is committed)."""
import ipaddress
import os
import struct


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def frame(src, sport, dst, dport, payload, vlan=False, frag=0):
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp_len = 8 + len(payload)
    eth = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + (b"\x81\0\0\x05" if vlan else b"")
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, frag, 64, 17, 0, s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        eth += b"\x08\x00"
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000, udp_len, 17, 64, s.packed, d.packed)
        eth += b"\x86\xdd"
    pseudo = s.packed + d.packed + struct.pack("!HH", 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = checksum(pseudo + udp) or 0xFFFF
    return eth + ip + udp[:6] + struct.pack("!H", csum) + udp[8:]


seeds = {
    "client_v4": frame("10.0.0.2", 40000, "10.0.0.1", 5000, b"hello relay"),
    "reply_v4": frame("10.1.0.2", 7000, "10.1.0.1", 20000, b"reply"),
    "client_v6": frame("fd00::2", 40000, "fd00::1", 5000, b"hello v6"),
    "reply_v6": frame("fd01::2", 7000, "fd01::1", 20001, b"reply v6"),
    "vlan_v4": frame("10.0.0.2", 40000, "10.0.0.1", 5000, b"tagged", vlan=True),
    "fragment_v4": frame("10.0.0.2", 40000, "10.0.0.1", 5000, b"frag", frag=0x2000),
    "truncated_v4": frame("10.0.0.2", 40000, "10.0.0.1", 5000, b"cut")[:30],
    "large_v4": frame("10.0.0.2", 40000, "10.0.0.1", 5000, bytes(range(256)) * 5),
}
os.makedirs("corpus/parse_frame", exist_ok=True)
os.makedirs("corpus/relay_handle", exist_ok=True)
for name, data in seeds.items():
    open(f"corpus/parse_frame/{name}", "wb").write(data)
# relay_handle input: flags byte, then [len u16, time step, ingress, frame]*
conversation = b"\0"
for ingress, name in [(0, "client_v4"), (1, "reply_v4"), (0, "client_v6"), (1, "reply_v6"), (0, "vlan_v4"), (0, "fragment_v4")]:
    conversation += struct.pack("!HBB", len(seeds[name]), 3, ingress) + seeds[name]
open("corpus/relay_handle/conversation", "wb").write(conversation)


def icmp_error(quoted, kind, v6=False):
    """An ICMP(v6) error of (type, code) from the upstream about the datagram frame `quoted`."""
    body = bytes(kind) + b"\0\0" + (struct.pack("!I", 1400) if kind[0] in (2, 3) and v6 or kind == (3, 4) else b"\0\0\0\0")
    body += quoted[14:]
    if not v6:
        body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 1, 0,
                         ipaddress.ip_address("10.1.0.2").packed, ipaddress.ip_address("10.1.0.1").packed)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + ip + body
    s, d = ipaddress.ip_address("fd01::2").packed, ipaddress.ip_address("fd01::1").packed
    pseudo = s + d + struct.pack("!I", len(body)) + b"\0\0\0\x3a"
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, 64, s, d)
    return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x86\xdd" + ip + body


os.makedirs("corpus/icmp_error", exist_ok=True)
icmp_seeds = {
    "port_unreachable_v4": icmp_error(frame("10.1.0.1", 20000, "10.1.0.2", 7000, b"q"), (3, 3)),
    "fragmentation_needed_v4": icmp_error(frame("10.1.0.1", 20000, "10.1.0.2", 7000, b"q" * 64), (3, 4)),
    "time_exceeded_v4": icmp_error(frame("10.1.0.1", 20000, "10.1.0.2", 7000, b"q"), (11, 0)),
    "port_unreachable_v6": icmp_error(frame("fd01::1", 20000, "fd01::2", 7000, b"q"), (1, 4), v6=True),
    "packet_too_big_v6": icmp_error(frame("fd01::1", 20000, "fd01::2", 7000, b"q" * 64), (2, 0), v6=True),
}
for name, data in icmp_seeds.items():
    open(f"corpus/icmp_error/{name}", "wb").write(data)
