"""Network-namespace topologies and a relay handle for the end-to-end scenarios.

Used by run.py natively (cargo test runs it as root) and inside the NixOS VM tests,
so one scenario has two runners. Everything created here is deleted on exit,
including after an exception or SIGTERM.
"""
import atexit
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "peer.py")
LISTEN_PORT = 5000
UPSTREAM_PORT = 7000
NAT_PORTS = (20000, 29999)
# Operators' NICs have several queues and RSS spreads flows over them: so do the test links.
DEFAULT_QUEUES = 2
# Set by `run.py --guest SUITE`: the relay's host is then a QEMU guest on that Debian kernel (tests/vm).
GUEST = None


def sh(*cmd, check=True, capture=True):
    result = subprocess.run(cmd, check=False, text=True, capture_output=capture)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout if capture else ""


class Topology:
    """Client, relay and upstream namespaces over veth.

    one_arm: client, upstream and the relay's single interface share a bridge (the `sw` namespace).
    two_arm: client <-> relay (client side), relay (upstream side) <-> upstream.

    Every veth has `queues` RX and TX queues: a packet's RX queue is the sender's
    flow-hashed TX queue, as RSS spreads flows on a NIC. Offloads stay at their
    defaults (veth offloads checksums: frames arrive with partial checksums).

    With GUEST set, the relay's host is a QEMU guest instead of the relay namespace: each of
    its interfaces is a multi-queue virtio-net NIC whose host tap takes the peer's place (and
    name) in the peer's namespace, and commands for the relay role run in the guest.
    """

    def __init__(self, prefix, arm="two_arm", ipv6=False, attacker=False, queues=DEFAULT_QUEUES):
        assert arm in ("one_arm", "two_arm", "chain") and not (attacker and arm != "one_arm")
        self.prefix, self.arm, self.ipv6, self.attacker, self.queues = prefix, arm, ipv6, attacker, queues
        self.ns = {role: f"{prefix}-{role}" for role in ("client", "relay", "relay2", "upstream", "sw", "attacker")}
        self.processes = []
        self.workdir = tempfile.mkdtemp(prefix=f"{prefix}-")
        self._up = False
        self.guest = None
        self._taps = {}  # guest interface -> host tap, until the tap takes its peer's place

    # Addresses -----------------------------------------------------------------
    def _addr(self, net, host):
        return f"fd00:{net}::{host}" if self.ipv6 else f"10.{net}.0.{host}"

    def _plen(self):
        return 64 if self.ipv6 else 24

    @property
    def client_ip(self):
        return self._addr(1, 2)

    @property
    def listen_ip(self):
        return self._addr(1, 1)

    @property
    def relay_upstream_ip(self):
        return self._addr(1, 1) if self.arm == "one_arm" else self._addr(2, 1)

    @property
    def upstream_ip(self):
        return {"one_arm": self._addr(1, 3), "two_arm": self._addr(2, 2), "chain": self._addr(3, 2)}[self.arm]

    @property
    def relay2_listen_ip(self):
        """chain: the second relay's address on the relay-to-relay hop."""
        return self._addr(2, 2)

    def endpoint(self, ip, port):
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    @property
    def listen(self):
        return self.endpoint(self.listen_ip, LISTEN_PORT)

    @property
    def upstream(self):
        return self.endpoint(self.upstream_ip, UPSTREAM_PORT)

    @property
    def relay_interfaces(self):
        return ["rc0"] if self.arm == "one_arm" else ["rc0", "ru0"]

    # Lifecycle -----------------------------------------------------------------
    def __enter__(self):
        atexit.register(self.destroy)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: sys.exit(1))
        try:
            self._create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False

    def _veth(self, role, dev, peer, peer_role):
        """A veth pair with `self.queues` queues each way: `dev` in `role`, `peer` in `peer_role`.
        In a guest the relay's side is a virtio-net NIC: its tap becomes `peer` in `peer_role`."""
        if self.guest and "relay" in (role, peer_role):
            (dev, peer, peer_role) = (dev, peer, peer_role) if role == "relay" else (peer, dev, role)
            tap = self._taps.pop(dev)
            sh("ip", "link", "set", tap, "netns", self.ns[peer_role])
            self.ip(peer_role, "link", "set", tap, "name", peer)
            return
        q = [f"numrxqueues", str(self.queues), "numtxqueues", str(self.queues)]
        self.ip(role, "link", "add", dev, *q, "type", "veth", "peer", "name", peer, *q, "netns", self.ns[peer_role])

    def _boot_guest(self):
        """Boots the relay's host: one multi-queue virtio-net NIC per relay interface, each on a host tap."""
        sys.path.insert(0, os.path.join(HERE, "..", "vm"))
        from guest import Guest
        for index, dev in enumerate(self.relay_interfaces):
            self._taps[dev] = f"{self.prefix[:10]}-t{index}"
            sh("ip", "tuntap", "add", self._taps[dev], "mode", "tap", "multi_queue")
        self.guest = Guest(GUEST["suite"], GUEST["binaries"], self.workdir, self._taps, queues=self.queues)
        print(f"  guest: Debian {GUEST['suite']} kernel {self.guest.release} booted in {self.guest.boot_seconds:.0f}s "
              f"(TCG), {self.queues} queue pairs per virtio-net NIC", flush=True)

    def _create(self):
        roles = ["client", "upstream"] + ([] if GUEST else ["relay"]) + (["sw"] if self.arm == "one_arm" else [])
        roles += (["attacker"] if self.attacker else []) + (["relay2"] if self.arm == "chain" else [])
        for role in roles:
            sh("ip", "netns", "add", self.ns[role])
            self.ip(role, "link", "set", "lo", "up")
        self._up = True
        if GUEST:
            self._boot_guest()
        plen = self._plen()
        if self.arm == "one_arm":
            self.ip("sw", "link", "add", "br0", "type", "bridge")
            self.ip("sw", "link", "set", "br0", "up")
            hosts = [("client", "c0", "swc", 2), ("relay", "rc0", "swr", 1), ("upstream", "u0", "swu", 3)]
            if self.attacker:
                hosts.append(("attacker", "a0", "swa", 66))
            for role, dev, peer, host in hosts:
                self._veth("sw", peer, dev, role)
                self.ip("sw", "link", "set", peer, "master", "br0", "up")
                self._address(role, dev, self._addr(1, host), plen)
            if self.queues > 1:
                self._spread_like_rss("sw", "swr")
        elif self.arm == "chain":
            # client -> relay (rc0 | ru0) -> relay2 (bc0 | bu0) -> upstream
            self._veth("relay", "rc0", "c0", "client")
            self._veth("relay", "ru0", "bc0", "relay2")
            self._veth("relay2", "bu0", "u0", "upstream")
            self._address("client", "c0", self.client_ip, plen)
            self._address("relay", "rc0", self.listen_ip, plen)
            self._address("relay", "ru0", self._addr(2, 1), plen)
            self._address("relay2", "bc0", self._addr(2, 2), plen)
            self._address("relay2", "bu0", self._addr(3, 1), plen)
            self._address("upstream", "u0", self.upstream_ip, plen)
            self.ip("client", "route", "add", "default", "via", self.listen_ip)
            self.ip("upstream", "route", "add", "default", "via", self._addr(3, 1))
        else:
            self._veth("relay", "rc0", "c0", "client")
            self._veth("relay", "ru0", "u0", "upstream")
            self._address("client", "c0", self.client_ip, plen)
            self._address("relay", "rc0", self.listen_ip, plen)
            self._address("relay", "ru0", self.relay_upstream_ip, plen)
            self._address("upstream", "u0", self.upstream_ip, plen)
            self.ip("client", "route", "add", "default", "via", self.listen_ip)
            self.ip("upstream", "route", "add", "default", "via", self.relay_upstream_ip)
        # A fresh veth drops the first neighbour solicitation while the link settles
        # (a 1 s stall, relay or not): settle links and neighbour caches before any test traffic.
        self.settle("client", self.listen_ip)
        if self.arm == "chain":
            self.settle("relay", self._addr(2, 2))
            self.settle("upstream", self._addr(3, 1))
        else:
            self.settle("upstream", self.relay_upstream_ip)

    def _spread_like_rss(self, role, dev):
        """A bridge sends every frame it forwards out of one TX queue, where a switch port into
        a NIC with RSS would spread flows over its RX queues: a tc program picks `dev`'s TX
        queue (so the peer's RX queue) from the flow hash instead."""
        obj = os.path.join(self.workdir, "spread.o")
        # Kernel UAPI headers: Debian's multiarch directory, or what the runner names (the NixOS VM tests).
        includes = os.environ.get("OXR_BPF_INCLUDE", "/usr/include/x86_64-linux-gnu").split(":")
        sh("clang", "-O2", "-target", "bpf", f"-DQUEUES={self.queues}", *(f"-I{d}" for d in includes),
           "-c", os.path.join(HERE, "spread.bpf.c"), "-o", obj)
        self.exec(role, "tc", "qdisc", "add", "dev", dev, "clsact")
        self.exec(role, "tc", "filter", "add", "dev", dev, "egress", "bpf", "direct-action", "obj", obj, "sec", "tc")

    def _address(self, role, dev, addr, plen):
        extra = ["nodad"] if self.ipv6 else []
        self.ip(role, "addr", "add", f"{addr}/{plen}", "dev", dev, *extra)
        self.ip(role, "link", "set", dev, "up")

    def destroy(self):
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self.guest:
            self.guest.shutdown()
            self.guest = None
        for tap in self._taps.values():
            sh("ip", "link", "del", tap, check=False)
        self._taps.clear()
        if self._up:
            existing = sh("ip", "netns", "list", check=False)
            for name in self.ns.values():
                if name in existing:
                    sh("ip", "netns", "del", name, check=False)
            self._up = False
        shutil.rmtree(self.workdir, ignore_errors=True)

    # Commands in namespaces ----------------------------------------------------
    def in_guest(self, role):
        return self.guest is not None and role == "relay"

    def ip(self, role, *args):
        return self.exec(role, "ip", *args) if self.in_guest(role) else sh("ip", "-n", self.ns[role], *args)

    def exec(self, role, *cmd, check=True):
        if self.in_guest(role):
            status, out = self.guest.run(self.guest.command(cmd))
            if check and status != 0:
                raise RuntimeError(f"{shlex.join(cmd)} failed in the guest ({status}): {out.strip()}")
            return out
        return sh("ip", "netns", "exec", self.ns[role], *cmd, check=check)

    def spawn(self, role, *cmd, stdout=subprocess.PIPE, stderr=None):
        if self.in_guest(role):
            raise RuntimeError(f"{cmd[0]} runs on the host, not in the guest: the scenario needs a namespace relay")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[role], *cmd], stdout=stdout, stderr=stderr, text=True)
        self.processes.append(proc)
        return proc

    # Files and processes on the relay's host ------------------------------------
    def path(self, role, name):
        """Where a file of the relay's host lives: the work directory, or /run in the guest."""
        return f"/run/{name}" if self.in_guest(role) else os.path.join(self.workdir, name)

    def write_file(self, role, path, text):
        if self.in_guest(role):
            self.guest.write(path, text)
        else:
            with open(path, "w") as f:
                f.write(text)

    def read_file(self, role, path):
        if self.in_guest(role):
            return self.guest.read(path)
        with open(path) as f:
            return f.read()

    def start_logged(self, role, cmd, log):
        """Starts `cmd` with stderr to the file `log` (a path on the relay's host) and stdout kept for the caller."""
        if self.in_guest(role):
            return self.guest.start(cmd, log)
        return self.spawn(role, *cmd, stderr=open(log, "w"))

    def binary(self, role, path):
        """The path of a host binary on the relay's host (the guest carries its own copy in /bin)."""
        return f"/bin/{os.path.basename(path)}" if self.in_guest(role) else path

    def peer(self, role, *args):
        """Runs a peer.py command to completion and returns its JSON report."""
        out = self.exec(role, sys.executable, PEER, *args)
        return json.loads(out.strip().splitlines()[-1])

    def spawn_peer(self, role, *args):
        proc = self.spawn(role, sys.executable, PEER, *args, stderr=subprocess.PIPE)
        line = proc.stderr.readline()
        if "ready" not in line:
            raise RuntimeError(f"peer {args} did not start: {line}")
        return proc

    def xdp_attached(self, role, dev):
        return "xdp" in self.ip(role, "-d", "link", "show", "dev", dev)

    def settle(self, role, ip):
        """Pings `ip` from `role` until it answers (at most 5 s)."""
        flag = "-6" if ":" in ip else "-4"
        for _ in range(5):
            try:
                self.exec(role, "ping", flag, "-c", "1", "-W", "1", ip)
                return
            except RuntimeError:
                pass
        raise RuntimeError(f"{ip} does not answer pings from {role}")


def scrape(topo, port=9184, role="relay"):
    """The relay's /metrics text, fetched from inside its namespace (or guest)."""
    url = f"http://127.0.0.1:{port}/metrics"
    if topo.in_guest(role):
        return topo.exec(role, "wget", "-q", "-O", "-", url)
    code = f"import urllib.request; print(urllib.request.urlopen('{url}', timeout=5).read().decode())"
    return topo.exec(role, sys.executable, "-c", code)


def ready_status(topo, port=9184, role="relay"):
    """The HTTP status of the relay's /ready (200 while it takes new sessions, 503 while draining)."""
    url = f"http://127.0.0.1:{port}/ready"
    if topo.in_guest(role):
        answer = topo.exec(role, "wget", "-S", "-q", "-O", "/dev/null", url, check=False)
        return re.findall(r"HTTP/1\.\d (\d{3})", answer)[-1]
    code = ("import urllib.request, urllib.error\n"
            f"try: print(urllib.request.urlopen('{url}').status)\n"
            "except urllib.error.HTTPError as e: print(e.code)")
    return topo.exec(role, sys.executable, "-c", code).strip()


def metric(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def peer_report(proc, timeout=60):
    """Waits for a peer that ends by itself and returns its JSON report."""
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def stop_peer(proc, timeout=10):
    """SIGTERM a long-running peer and return its JSON report."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


class Relay:
    """The relay under test, running in the relay namespace."""

    def __init__(self, topo, binary, config_text, wrapper=(), role="relay", name=None, state_dir=None):
        """`role` is the namespace it runs in; `name` (default: the role) names its files;
        `state_dir` is where a clean stop leaves its sessions for the next start."""
        self.topo, self.binary, self.wrapper, self.role = topo, topo.binary(role, binary), list(wrapper), role
        self.state_dir = state_dir
        name = name or role
        self.config = topo.path(role, f"{name}.toml")
        self.stats_file = topo.path(role, f"{name}-stats.json")
        self.log = topo.path(role, f"{name}.log")
        topo.write_file(role, self.config, config_text)
        self.proc = None

    def start(self, timeout=15):
        state = ["--state-dir", self.state_dir] if self.state_dir else []
        cmd = [*self.wrapper, self.binary, "run", "--config", self.config, "--stats-file", self.stats_file, *state]
        self.proc = self.topo.start_logged(self.role, cmd, self.log)
        # Under emulation the BPF verifier and the first packets take many times longer.
        deadline = time.monotonic() + timeout * (8 if self.topo.in_guest(self.role) else 1)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.log_text()}")
            if "relay ready" in self.log_text():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"relay not ready after {timeout}s:\n{self.log_text()}")

    def log_text(self):
        """The relay's log without terminal colours."""
        return re.sub(r"\x1b\[[0-9;]*m", "", self.topo.read_file(self.role, self.log))

    def stats(self):
        return json.loads(self.topo.read_file(self.role, self.stats_file))

    def scrape(self, port=9184):
        return scrape(self.topo, port, self.role)

    metric = staticmethod(lambda text, name, **labels: metric(text, name, **labels))

    def wait_stats(self, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats) or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)

    def terminate(self, timeout=10):
        """SIGTERM; returns (exit code, final stats printed on stdout)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        lines = [l for l in out.strip().splitlines() if l.startswith("{")]
        return self.proc.returncode, (json.loads(lines[-1]) if lines else None)

    def rewrite_config(self, config_text):
        """Replaces the config file (the relay reads it again on SIGHUP)."""
        self.topo.write_file(self.role, self.config, config_text)

    def reload(self, config_text, expect_log, timeout=5):
        """Writes `config_text`, sends SIGHUP and waits until the log shows `expect_log` once more than before."""
        before = self.log_text().count(expect_log)
        self.rewrite_config(config_text)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_text().count(expect_log) <= before:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no `{expect_log}` after SIGHUP:\n{self.log_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def relay_config(topo, mode, idle_timeout_secs=120, interfaces=None, extra=""):
    """A relay config for `topo`; in a guest the relay picks its backend as operators run it
    (`auto`), and the scenario's backend is what it must pick."""
    mode = "auto" if topo.in_guest("relay") else mode
    if interfaces is None and topo.arm == "one_arm":
        interfaces = '[[interface]]\nname = "rc0"\nrole = "both"\n'
    elif interfaces is None:
        interfaces = '[[interface]]\nname = "rc0"\nrole = "client"\n\n[[interface]]\nname = "ru0"\nrole = "upstream"\n'
    return f"""{interfaces}
[nat]
ports = "{NAT_PORTS[0]}-{NAT_PORTS[1]}"
idle_timeout_secs = {idle_timeout_secs}

[runtime]
mode = "{mode}"
stats_interval_secs = 2

[[route]]
listen = "{topo.listen}"
upstreams = ["{topo.upstream}"]
{extra}"""
