#!/usr/bin/env python3
"""End-to-end relay scenarios over real namespaces, veth and AF_XDP.

    run.py --relay PATH [--prefix NAME] SCENARIO

Exit 0 when every check of the scenario holds; otherwise the failing check is printed.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oxr import NAT_PORTS, Relay, Topology, relay_config, stop_peer  # noqa: E402

SCENARIOS = {}


def scenario(name):
    def register(fn):
        SCENARIOS[name] = fn
        return fn
    return register


def expect(condition, message):
    if not condition:
        raise AssertionError(message)
    print(f"  ok: {message}")


def xdp_counter(stats, name):
    return sum(i["xdp_counters"].get(name, 0) for i in stats["interfaces"].values())


def start_relay(topo, binary, **config):
    relay = Relay(topo, binary, relay_config(topo, **config)).start()
    return relay


def finish(topo, relay):
    """SIGTERM the relay: exit 0, final stats, and no XDP program left on its interfaces."""
    code, final = relay.terminate()
    expect(code == 0, f"relay exits 0 on SIGTERM (got {code})")
    for dev in topo.relay_interfaces:
        expect(not topo.xdp_attached("relay", dev), f"no XDP program left on {dev} after SIGTERM")
    return final


def relay_traffic(topo, binary, count):
    """`count` datagrams of mixed sizes through the relay, every payload checked; kernel sockets bypassed."""
    echo = topo.spawn_peer("upstream", "echo", "--bind", topo.upstream)
    # A kernel socket on the listen port: if the relay's traffic reached the kernel, it would answer.
    decoy = topo.spawn_peer("relay", "echo", "--bind", topo.listen)
    relay = start_relay(topo, binary)
    report = topo.peer("client", "client", "--to", topo.listen, "--count", str(count))
    print(f"  client: {report}")
    # The stats file is rewritten every 200 ms: wait until it covers the whole exchange.
    stats = relay.wait_stats(lambda s: s["tx_packets"] >= 2 * count)
    print(f"  relay drops: { {k: v for k, v in stats['drops'].items() if v} }, xdp: "
          f"{ {n: c for i in stats['interfaces'].values() for n, c in i['xdp_counters'].items() if c} }")
    echo_report = stop_peer(echo)
    decoy_report = stop_peer(decoy)
    expect(report["received"] == count and report["missing"] == 0, f"all {count} datagrams came back ({report['received']})")
    expect(report["corrupt"] == 0, "every payload came back byte for byte")
    expect(report["first_try_lost"] <= count // 1000, f"first-try loss at most 0.1% ({report['first_try_lost']})")
    print(f"  kernel socket on the listen port: {decoy_report}")
    expect(decoy_report["received"] == 0, "the kernel socket on the listen port saw nothing: AF_XDP took the traffic")
    for source in echo_report["sources"]:
        host, port = source.rsplit(":", 1)
        expect(host == topo.relay_upstream_ip and NAT_PORTS[0] <= int(port) <= NAT_PORTS[1],
               f"upstream saw the relay's NAT address {source}, not the client")
    sent = count + report["retransmits"]
    expect(xdp_counter(stats, "redirect_listen") >= sent, f"XDP redirected client traffic ({xdp_counter(stats, 'redirect_listen')})")
    expect(xdp_counter(stats, "redirect_nat") >= count, f"XDP redirected replies ({xdp_counter(stats, 'redirect_nat')})")
    expect(stats["rx_packets"] >= 2 * count and stats["tx_packets"] >= 2 * count,
           f"AF_XDP worker counters moved (rx {stats['rx_packets']}, tx {stats['tx_packets']})")
    final = finish(topo, relay)
    return report, final


def traffic_scenario(arm, ipv6, count):
    def run(binary, prefix):
        with Topology(prefix, arm=arm, ipv6=ipv6) as topo:
            relay_traffic(topo, binary, count)
    return run


SCENARIOS["ipv4-one-arm"] = traffic_scenario("one_arm", False, 100_000)
SCENARIOS["ipv6-one-arm"] = traffic_scenario("one_arm", True, 20_000)
SCENARIOS["ipv4-two-arm"] = traffic_scenario("two_arm", False, 20_000)
SCENARIOS["ipv6-two-arm"] = traffic_scenario("two_arm", True, 100_000)


@scenario("many-clients")
def many_clients(binary, prefix):
    """1000 client ports at once; each gets only its own replies."""
    with Topology(prefix, arm="two_arm") as topo:
        echo = topo.spawn_peer("upstream", "echo", "--bind", topo.upstream)
        relay = start_relay(topo, binary)
        report = topo.peer("client", "many-clients", "--to", topo.listen, "--count", "1000", "--rounds", "3")
        print(f"  clients: {report}")
        expect(report["distinct_ports"] == 1000, "1000 distinct client ports")
        expect(report["complete"] == 1000, f"every client got all its replies ({report['complete']})")
        expect(report["wrong"] == 0, "no client got another client's reply")
        stats = relay.wait_stats(lambda s: s["sessions_active"] >= 1000)
        expect(stats["sessions_active"] == 1000, f"one NAT session per client ({stats['sessions_active']})")
        stop_peer(echo)
        finish(topo, relay)


@scenario("session-expiry")
def session_expiry(binary, prefix):
    """Idle sessions expire; replies to an expired NAT port are dropped; the client gets a fresh session."""
    with Topology(prefix, arm="two_arm") as topo:
        echo = topo.spawn_peer("upstream", "echo", "--bind", topo.upstream)
        relay = start_relay(topo, binary, idle_timeout_secs=2)
        first = topo.peer("client", "client", "--to", topo.listen, "--bind", topo.endpoint(topo.client_ip, 41000), "--count", "10")
        expect(first["received"] == 10, "first exchange works")
        stats = relay.wait_stats(lambda s: s["sessions_active"] == 1)
        expect(stats["sessions_active"] == 1, "one session while active")
        stats = relay.wait_stats(lambda s: s["sessions_active"] == 0, timeout=10)
        expect(stats["sessions_active"] == 0 and stats["sessions_expired"] == 1, "the idle session expired")
        echo_report = stop_peer(echo)
        old_nat = echo_report["sources"][0]
        host, port = old_nat.rsplit(":", 1)
        topo.peer("upstream", "send", "--to", topo.endpoint(host, int(port)), "--count", "5")
        stats = relay.wait_stats(lambda s: s["drops"]["no_session"] >= 5)
        expect(stats["drops"]["no_session"] == 5, f"late replies to {old_nat} dropped as no_session")
        echo = topo.spawn_peer("upstream", "echo", "--bind", topo.upstream)
        again = topo.peer("client", "client", "--to", topo.listen, "--bind", topo.endpoint(topo.client_ip, 41000), "--count", "10")
        expect(again["received"] == 10, "the same client port works again after expiry")
        expect(relay.wait_stats(lambda s: s["sessions_created"] == 2)["sessions_created"] == 2, "through a new session")
        stop_peer(echo)
        finish(topo, relay)


@scenario("tcp-coexistence")
def tcp_coexistence(binary, prefix):
    """A TCP connection to a non-relay port on the relay host works while the program is attached."""
    with Topology(prefix, arm="one_arm") as topo:
        echo = topo.spawn_peer("upstream", "echo", "--bind", topo.upstream)
        relay = start_relay(topo, binary)
        tcp = topo.spawn_peer("relay", "tcp-echo", "--bind", topo.endpoint(topo.listen_ip, 8022))
        report = topo.peer("client", "tcp-client", "--to", topo.endpoint(topo.listen_ip, 8022))
        expect(report["echoed_intact"], "1 MiB over TCP to the relay host came back intact")
        tcp.wait(timeout=5)
        udp = topo.peer("client", "client", "--to", topo.listen, "--count", "1000")
        expect(udp["received"] == 1000, "UDP relaying works alongside")
        stats = relay.wait_stats(lambda s: xdp_counter(s, "pass_not_udp") > 0)
        expect(xdp_counter(stats, "pass_not_udp") > 0, f"TCP was passed to the kernel ({xdp_counter(stats, 'pass_not_udp')})")
        expect(topo.xdp_attached("relay", "rc0"), "the XDP program was attached throughout")
        stop_peer(echo)
        finish(topo, relay)


@scenario("sigkill-fallback")
def sigkill_fallback(binary, prefix):
    """After SIGKILL nothing is left attached, and relay-port traffic reaches the kernel instead of vanishing."""
    with Topology(prefix, arm="one_arm") as topo:
        echo = topo.spawn_peer("upstream", "echo", "--bind", topo.upstream)
        kernel = topo.spawn_peer("relay", "echo", "--bind", topo.listen)
        relay = start_relay(topo, binary)
        before = topo.peer("client", "client", "--to", topo.listen, "--count", "100")
        expect(before["received"] == 100, "relayed while running")
        relay.kill()
        expect(not topo.xdp_attached("relay", "rc0"), "SIGKILL left no XDP program (the BPF link died with the process)")
        after = topo.peer("client", "client", "--to", topo.listen, "--count", "100")
        kernel_report = stop_peer(kernel)
        upstream_report = stop_peer(echo)
        expect(after["received"] == 100, "after SIGKILL the client is answered")
        expect(kernel_report["received"] == 100, "by the kernel socket on the relay port (traffic reached the kernel)")
        expect(upstream_report["received"] == 100, "and the upstream saw only the relayed traffic from before")


@scenario("demo")
def demo(binary, prefix):
    """Two-arm IPv4 relay: 20,000 datagrams client -> relay -> upstream echo and back, then a summary."""
    with Topology(prefix, arm="two_arm") as topo:
        print(f"topology: client {topo.client_ip} -> [relay {topo.listen}] ... [relay {topo.relay_upstream_ip}] -> upstream {topo.upstream}")
        report, final = relay_traffic(topo, binary, 20_000)
        print()
        print("demo summary")
        print(f"  client sent {report['sent']} datagrams (mixed sizes 1..1472 bytes), {report['received']} came back intact")
        print(f"  relay AF_XDP workers: rx {final['rx_packets']} packets / {final['rx_bytes']} bytes, "
              f"tx {final['tx_packets']} packets / {final['tx_bytes']} bytes")
        for name, iface in final["interfaces"].items():
            counters = {k: v for k, v in iface["xdp_counters"].items() if v}
            print(f"  XDP on {name} ({iface['xdp_mode']} mode): {counters}")
        drops = {k: v for k, v in final["drops"].items() if v}
        print(f"  sessions created {final['sessions_created']}, drops {drops or 'none'}, wakeups {final['wakeups']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--relay", required=True, help="path to the oxidize-relay binary")
    parser.add_argument("--prefix", default=f"oxr{os.getpid() % 100000}", help="namespace name prefix")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("scenarios create network namespaces and attach XDP: run as root")
    print(f"scenario {args.scenario} (namespaces {args.prefix}-*)")
    started = time.monotonic()
    try:
        SCENARIOS[args.scenario](os.path.abspath(args.relay), args.prefix)
    except AssertionError as failure:
        print(f"FAILED: {failure}")
        sys.exit(1)
    print(f"scenario {args.scenario} passed in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
