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
