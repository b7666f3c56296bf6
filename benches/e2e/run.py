#!/usr/bin/env python3
"""End-to-end relay benchmark: the same netns/veth rig and AF_XDP load for every contender.

    sudo python3 benches/e2e/run.py [--quick] [--release-dir target/release]

Contenders, one after another: oxidize-relay (AF_XDP), oxidize-relay (socket
backend), a bare AF_XDP forwarder (the relay's sockets and rings, MAC rewrite
only: the ceiling of AF_XDP on this rig), nginx stream UDP proxy, socat, the
kernel's nftables DNAT/SNAT with conntrack, and the direct routed path with no
relay (the kernel's ceiling). Each gets one worker/process. Writes benches/results/e2e-<date>.json and a PNG chart.
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "scenarios"))
from oxr import Topology  # noqa: E402

CLIENT = "10.1.0.2:40000"
LISTEN = "10.1.0.1:5000"
UPSTREAM = "10.2.0.2:7000"
# Round trips per second of the paced run: 100K forwarded packets/s, below every contender's saturation here.
PACED_RATE = 50_000


def busy_ticks():
    """System-wide busy CPU time in clock ticks (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def cpu_ticks():
    """Per CPU: (user+nice, system, softirq) clock ticks, from /proc/stat."""
    ticks = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in values]
                ticks[name] = (v[0] + v[1], v[2], v[6])
    return ticks


def process_ticks(pids):
    """Summed (user, system) clock ticks of `pids` (every thread), from /proc/PID/stat."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


class Contender:
    name = ""
    target = LISTEN
    # Commands it runs beyond the rig's own (ip, perf), with the Debian package that has each.
    needs = {}
    # RX/TX queues of every veth in the rig: RSS-like spreading, as on the NICs operators run.
    queues = 2

    def start(self, topo, args):
        pass

    def pids(self, topo):
        return []

    def stop(self, topo):
        pass


class Process(Contender):
    """A user-space relay running in the relay namespace."""
    proc = None

    def command(self, topo, args):
        raise NotImplementedError

    def start(self, topo, args):
        log = open(os.path.join(topo.workdir, f"{self.slug}.log"), "w")
        self.proc = topo.spawn("relay", *self.command(topo, args), stdout=log, stderr=subprocess.STDOUT)
        time.sleep(2.5)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {open(log.name).read()}")

    def pids(self, topo):
        """The relay process and its descendants (`ip netns exec` execs, so proc.pid is the relay; socat forks)."""
        pids, frontier = {self.proc.pid}, [self.proc.pid]
        while frontier:
            children = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True).stdout
            for child in map(int, children.split()):
                if child not in pids:
                    pids.add(child)
                    frontier.append(child)
        return sorted(pids)

    def stop(self, topo):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Oxidize(Process):
    """One worker per queue of the rig's veths (the relay serves every queue the interface has)."""

    def __init__(self, mode, wait="event", queues=1):
        self.mode, self.wait, self.queues = mode, wait, queues
        suffix = "" if wait == "event" else f", {wait}"
        workers = f", {queues} workers" if queues > 1 else ""
        self.name = f"oxidize-relay ({mode}{suffix}{workers})"
        self.slug = f"oxidize-{mode}" + ("" if wait == "event" else f"-{wait}") + (f"-{queues}w" if queues > 1 else "")

    def command(self, topo, args):
        config = os.path.join(topo.workdir, f"{self.slug}.toml")
        with open(config, "w") as f:
            f.write(f"""[runtime]
mode = "{self.mode}"
wait = "{self.wait}"
[[interface]]
name = "rc0"
role = "client"
[[interface]]
name = "ru0"
role = "upstream"
[metrics]
enable = false
[[route]]
listen = "{LISTEN}"
upstreams = ["{UPSTREAM}"]
""")
        return [os.path.join(args.release_dir, "oxidize-relay"), "run", "--config", config,
                "--stats-file", os.path.join(topo.workdir, f"{self.slug}.json")]

    def stats(self, topo):
        with open(os.path.join(topo.workdir, f"{self.slug}.json")) as f:
            return json.load(f)


class BareForwarder(Process):
    """The rig's AF_XDP ceiling: the relay's sockets, rings, UMEM and batch size with a MAC rewrite
    only (no parse, session, NAT or checksum). The client addresses the upstream, as for Direct."""
    name, slug = "bare AF_XDP forwarder (MAC rewrite only)", "forwarder"
    target = UPSTREAM

    def command(self, topo, args):
        client_mac = topo.exec("client", "cat", "/sys/class/net/c0/address").strip()
        upstream_mac = topo.exec("upstream", "cat", "/sys/class/net/u0/address").strip()
        return [os.path.join(args.release_dir, "oxr-loadgen"), "forward", "--client-interface", "rc0",
                "--upstream-interface", "ru0", "--upstream", UPSTREAM, "--upstream-mac", upstream_mac,
                "--client", CLIENT, "--client-mac", client_mac]


class Nginx(Process):
    name, slug = "nginx stream", "nginx"
    needs = {"nginx": "nginx-light libnginx-mod-stream"}

    def command(self, topo, args):
        conf = os.path.join(topo.workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid {topo.workdir}/nginx.pid;
error_log {topo.workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
stream {{
    server {{
        listen {LISTEN} udp;
        proxy_pass {UPSTREAM};
        proxy_timeout 30s;
    }}
}}
""")
        return ["nginx", "-c", conf, "-p", topo.workdir]


class Socat(Process):
    name, slug = "socat", "socat"
    needs = {"socat": "socat"}

    def command(self, topo, args):
        host, port = LISTEN.split(":")
        return ["socat", "-T", "30", f"UDP4-LISTEN:{port},bind={host},fork,reuseaddr", f"UDP4:{UPSTREAM}"]


class Nftables(Contender):
    name, slug = "nftables DNAT/SNAT", "nftables"
    needs = {"nft": "nftables"}

    def start(self, topo, args):
        topo.exec("relay", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        host, port = UPSTREAM.split(":")
        rules = f"""table ip oxr_bench {{
    chain prerouting {{ type nat hook prerouting priority -100; udp dport {LISTEN.split(':')[1]} dnat to {UPSTREAM}; }}
    chain postrouting {{ type nat hook postrouting priority 100; ip daddr {host} udp dport {port} masquerade; }}
}}
"""
        path = os.path.join(topo.workdir, "nat.nft")
        with open(path, "w") as f:
            f.write(rules)
        topo.exec("relay", "nft", "-f", path)

    def stop(self, topo):
        topo.exec("relay", "nft", "delete", "table", "ip", "oxr_bench", check=False)
        topo.exec("relay", "sysctl", "-qw", "net.ipv4.ip_forward=0")


class Direct(Contender):
    """No relay: the client addresses the upstream and the relay namespace only routes."""
    name, slug = "direct (routed, no relay)", "direct"
    target = UPSTREAM

    def start(self, topo, args):
        topo.exec("relay", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        topo.ip("upstream", "route", "replace", "10.1.0.0/24", "via", "10.2.0.1")

    def stop(self, topo):
        topo.exec("relay", "sysctl", "-qw", "net.ipv4.ip_forward=0")


def generate(topo, args, contender, size, count, rate):
    relay_mac = topo.exec("relay", "cat", "/sys/class/net/rc0/address").strip()
    cmd = [os.path.join(args.release_dir, "oxr-loadgen"), "gen", "--interface", "c0", "--src", CLIENT,
           "--dst", contender.target, "--dst-mac", relay_mac, "--size", str(size), "--count", str(count), "--rate", str(rate)]
    return json.loads(topo.exec("client", *cmd).strip().splitlines()[-1])


def measure(topo, args, contender, size, count, rate, profile=False):
    """One run: the generator's view plus the relay's CPU time and syscalls over the run;
    with `profile`, also where the relay's CPU time went (sampled, user and kernel symbols)."""
    pids = contender.pids(topo)
    perf = record = None
    if pids:
        perf_out = os.path.join(topo.workdir, "perf.txt")
        perf = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "task-clock,raw_syscalls:sys_enter",
                                 "-p", ",".join(map(str, pids)), "-o", perf_out])
        if profile:
            samples = os.path.join(topo.workdir, f"{contender.slug}.perf.data")
            record = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "2999", "-o", samples,
                                       "-p", ",".join(map(str, pids))], stderr=subprocess.DEVNULL)
        time.sleep(0.3)
    busy_before, cpus_before, process_before = busy_ticks(), cpu_ticks(), process_ticks(pids)
    result = generate(topo, args, contender, size, count, rate)
    hz = os.sysconf("SC_CLK_TCK")
    busy = (busy_ticks() - busy_before) / hz
    process_after, cpus_after = process_ticks(pids), cpu_ticks()
    # Where the time went: the relay's own user-mode work against the kernel's share (its
    # syscalls, which in copy mode include the copy and the veth peer's receive path, and softirqs).
    result["relay_user_seconds"] = (process_after[0] - process_before[0]) / hz
    result["relay_system_seconds"] = (process_after[1] - process_before[1]) / hz
    result["cpus"] = {cpu: dict(zip(("user", "system", "softirq"), ((a - b) / hz for a, b in zip(cpus_after[cpu], cpus_before[cpu]))))
                      for cpu in cpus_after}
    result["relay_process_cpu_seconds"] = None
    result["syscalls"] = 0
    if record:
        record.send_signal(signal.SIGINT)
        record.wait(timeout=30)
        report = subprocess.run(["perf", "report", "-i", samples, "--stdio", "--no-children", "--sort", "dso,sym",
                                 "--percent-limit", "1"], capture_output=True, text=True).stdout
        result["profile"] = [line.strip() for line in report.splitlines() if line.strip() and not line.startswith("#")]
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=10)
        for line in open(perf_out):
            parts = line.strip().split(",")
            if len(parts) > 2 and parts[2] == "task-clock":
                result["relay_process_cpu_seconds"] = float(parts[0]) / 1000.0
            elif len(parts) > 2 and parts[2].startswith("raw_syscalls:sys_enter"):
                result["syscalls"] = int(float(parts[0])) if parts[0][0].isdigit() else None
    forwarded = 2 * result["received"]
    result["forwarded"] = forwarded
    result["forwarded_pps"] = forwarded / result["seconds"] if result["seconds"] else 0
    result["loss_ratio"] = result["lost"] / result["sent"] if result["sent"] else 0
    # Net CPU: everything the machine did during the run minus the generator's and the reflector's own time.
    result["system_busy_seconds"] = busy
    if forwarded:
        process = result["relay_process_cpu_seconds"]
        result["relay_ns_per_forward"] = (process * 1e9 / forwarded) if process is not None else None
        result["syscalls_per_forward"] = (result["syscalls"] / forwarded) if result["syscalls"] is not None else None
        if pids:
            result["relay_user_ns_per_forward"] = result["relay_user_seconds"] * 1e9 / forwarded
            result["relay_system_ns_per_forward"] = result["relay_system_seconds"] * 1e9 / forwarded
    return result


def run_contender(args, contender):
    # Default offloads everywhere, as operators run them.
    with Topology(f"oxb{os.getpid() % 10000}", arm="two_arm", queues=contender.queues) as topo:
        reflector = topo.spawn("upstream", os.path.join(args.release_dir, "oxr-loadgen"), "reflect",
                               "--interface", "u0", "--listen", UPSTREAM, stderr=subprocess.PIPE)
        if "ready" not in reflector.stderr.readline():
            raise RuntimeError("reflector did not start")
        contender.start(topo, args)
        try:
            generate(topo, args, contender, 64, 2000, 20000)  # warm-up: sessions, ARP, forks
            results = {
                "max_64": measure(topo, args, contender, 64, args.count_small, 0, profile=args.profile),
                "max_1400": measure(topo, args, contender, 1400, args.count_large, 0),
                # Below everyone's saturation, so CPU per packet is compared without loss skewing it.
                "paced_64": measure(topo, args, contender, 64, args.paced_count, PACED_RATE),
                "latency_64": measure(topo, args, contender, 64, args.latency_count, args.latency_rate),
            }
            if isinstance(contender, Oxidize):
                results["relay_stats"] = contender.stats(topo)
        finally:
            contender.stop(topo)
            reflector.send_signal(signal.SIGTERM)
            out, _ = reflector.communicate(timeout=10)
            results["reflector"] = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    return results


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {"kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)}


def chart(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart (pip install matplotlib)")
        return
    names = list(report["contenders"])
    small = [report["contenders"][n]["max_64"]["forwarded_pps"] / 1e3 for n in names]
    large = [report["contenders"][n]["max_1400"]["forwarded_pps"] / 1e3 for n in names]
    fig, ax = plt.subplots(figsize=(10, 5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], small, 0.4, label="64-byte payload")
    ax.bar([i + 0.2 for i in x], large, 0.4, label="1400-byte payload")
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylabel("forwarded packets per second (thousands)")
    ax.set_title(f"UDP relays on one netns/veth rig ({report['machine']['cores']} cores, kernel {report['machine']['kernel']}, {report['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release-dir", default=os.path.join(ROOT, "target", "release"))
    parser.add_argument("--quick", action="store_true", help="fewer packets per run")
    parser.add_argument("--only", help="comma-separated contender slugs")
    parser.add_argument("--tag", help="suffix of the results file name (e2e-DATE-TAG.json)")
    parser.add_argument("--profile", action="store_true",
                        help="sample where each user-space contender's CPU time goes in the 64 B saturation run")
    args = parser.parse_args()
    args.count_small = 100_000 if args.quick else 1_000_000
    args.count_large = 50_000 if args.quick else 300_000
    args.latency_count, args.latency_rate = (5_000, 5_000) if args.quick else (20_000, 10_000)
    args.paced_count = 100_000 if args.quick else 500_000
    contenders = [Oxidize("af_xdp"), Oxidize("af_xdp", queues=2), Oxidize("af_xdp", "busy_poll"), Oxidize("socket"),
                  BareForwarder(), Nginx(), Socat(), Nftables(), Direct()]
    if args.only:
        contenders = [c for c in contenders if c.slug in args.only.split(",")]
    needed = {"perf": "linux-perf"}
    for contender in contenders:
        needed.update(contender.needs)
    missing = sorted({package for tool, package in needed.items() if not shutil.which(tool)})
    if missing:
        sys.exit(f"missing for these contenders: apt-get install {' '.join(missing)}")
    date = datetime.date.today().isoformat()
    report = {"date": date, "machine": machine(), "quick": args.quick, "contenders": {}}
    for contender in contenders:
        print(f"== {contender.name}", flush=True)
        report["contenders"][contender.name] = result = run_contender(args, contender)
        for run in ("max_64", "max_1400", "paced_64", "latency_64"):
            r = result[run]
            print(f"   {run:<11} {r['forwarded_pps'] / 1e3:9.1f} Kpps forwarded, loss {100 * r['loss_ratio']:.2f}%, "
                  f"p50 {r['rtt_p50_us']:.0f} us, p99 {r['rtt_p99_us']:.0f} us, "
                  f"cpu/fwd {r.get('relay_ns_per_forward') or 0:.0f} ns "
                  f"(user {r.get('relay_user_ns_per_forward') or 0:.0f}, kernel {r.get('relay_system_ns_per_forward') or 0:.0f}), "
                  f"syscalls/fwd {r.get('syscalls_per_forward') or 0:.3f}", flush=True)
            cpus = ", ".join(f"{cpu} usr {t['user']:.2f} sys {t['system']:.2f} si {t['softirq']:.2f} s" for cpu, t in r["cpus"].items())
            print(f"   {'':<11} machine: {cpus}", flush=True)
            for line in r.get("profile", []):
                print(f"   {'':<11} {line}", flush=True)
    os.makedirs(os.path.join(ROOT, "benches", "results"), exist_ok=True)
    path = os.path.join(ROOT, "benches", "results", f"e2e-{date}" + (f"-{args.tag}" if args.tag else "") + ".json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"results: {path}")
    chart(report, path.replace(".json", ".png"))


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("the benchmark creates namespaces and attaches XDP: run as root")
    main()
