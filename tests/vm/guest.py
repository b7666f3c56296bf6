"""A QEMU guest that runs the relay on multi-queue virtio-net, booted on a Debian distribution kernel.

The scenarios (tests/scenarios/run.py --guest SUITE) drive it from the host: the client and
upstream peers stay in host namespaces, attached to the guest's NICs through tap devices,
and every command meant for the relay's host runs in the guest through a small shell agent
on a management NIC. Kernels are cached under /var/cache/oxidize-relay-vm/<suite>.

    guest.py kernel SUITE     download and unpack SUITE's stock kernel (bookworm, trixie, bullseye)
    guest.py boot SUITE RELAY boot a guest with the relay binary RELAY and print what its kernel offers
"""
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

CACHE = os.environ.get("OXR_VM_CACHE", "/var/cache/oxidize-relay-vm")
MIRROR = os.environ.get("OXR_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# The operators' kernels this rig boots: Debian 12, 13 and 11.
SUITES = ("bookworm", "trixie", "bullseye")


def _packages(suite):
    with urllib.request.urlopen(f"{MIRROR}/dists/{suite}/main/binary-amd64/Packages.xz", timeout=120) as r:
        text = lzma.decompress(r.read()).decode()
    return {fields["Package"]: fields for fields in (dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.M))
                                                     for stanza in text.split("\n\n")) if "Package" in fields}


def kernel(suite):
    """SUITE's stock kernel (the package `linux-image-amd64` points at), unpacked once into the cache.
    Returns (kernel image, modules directory, kernel release)."""
    if suite not in SUITES:
        raise ValueError(f"no guest kernel for {suite!r}: the rig boots {', '.join(SUITES)}")
    root = os.path.join(CACHE, suite, "root")
    if not os.path.isdir(os.path.join(root, "lib", "modules")) and not os.path.isdir(os.path.join(root, "usr", "lib", "modules")):
        packages = _packages(suite)
        concrete = re.match(r"[\w.+-]+", packages["linux-image-amd64"]["Depends"]).group(0)
        deb = os.path.join(CACHE, suite, os.path.basename(packages[concrete]["Filename"]))
        os.makedirs(os.path.dirname(deb), exist_ok=True)
        print(f"guest: downloading {concrete} for {suite}", file=sys.stderr, flush=True)
        with urllib.request.urlopen(f"{MIRROR}/{packages[concrete]['Filename']}", timeout=600) as r, open(deb + ".part", "wb") as f:
            shutil.copyfileobj(r, f)
        os.rename(deb + ".part", deb)
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", deb, root + ".part"], check=True)
        os.rename(root + ".part", root)
        os.remove(deb)
    modules = next(p for p in (os.path.join(root, "lib", "modules"), os.path.join(root, "usr", "lib", "modules")) if os.path.isdir(p))
    release = os.listdir(modules)[0]
    return os.path.join(root, "boot", f"vmlinuz-{release}"), os.path.join(modules, release), release


# What the guest loads (with their dependencies): the NIC driver and the PCI transport.
MODULES = ("virtio_pci", "virtio_net")
# Host tools the scenarios run on the relay's host, copied in with their shared libraries.
TOOLS = ("/usr/sbin/ip", "/usr/sbin/ethtool")
AGENT_PORT = 7000
MGMT_MAC = "52:54:00:00:00:01"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf
for module in $(cat /modules.order); do insmod "/modules/$module.ko" || echo "oxr-guest: insmod $module failed"; done
# NICs are named by MAC as the host asked (oxr_nics=MAC=NAME,...): mg0 is the agent's, the rest the relay's.
sleep 0.2
for dev in /sys/class/net/*; do
    name="$(basename "$dev")"; mac="$(cat "$dev/address")"
    for pair in $(echo "$oxr_nics" | tr , ' '); do
        [ "${pair%%=*}" = "$mac" ] && ip link set dev "$name" name "${pair#*=}"
    done
done
ip link set lo up
ip addr add 10.0.2.15/24 dev mg0
ip link set mg0 up
sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
echo "oxr-guest ready $(uname -r)"
while true; do nc -ll -p AGENT_PORT -e /bin/sh; done
""".replace("AGENT_PORT", str(AGENT_PORT))


def _module_files(modules_dir):
    files = {}
    for directory, _, names in os.walk(os.path.join(modules_dir, "kernel")):
        for name in names:
            if ".ko" in name:
                files[name.split(".ko")[0].replace("-", "_")] = os.path.join(directory, name)
    return files


def _module_bytes(path):
    with open(path, "rb") as f:
        data = f.read()
    return lzma.decompress(data) if path.endswith(".xz") else data


def _load_order(modules_dir, wanted):
    """`wanted` modules that are modules in this kernel (not built in), dependencies first."""
    files, order = _module_files(modules_dir), []

    def visit(name):
        if name in order or name not in files:
            return
        depends = re.search(rb"depends=([\w,-]*)", _module_bytes(files[name]))
        for dep in filter(None, (depends.group(1).decode().split(",") if depends else [])):
            visit(dep.replace("-", "_"))
        order.append(name)

    for name in wanted:
        visit(name)
    return [(name, files[name]) for name in order]


def _shared_libraries(binary):
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"(/\S+\.so[.\d]*)", out)))


def _cpio_newc(tree, out):
    """Packs `tree` into a gzip'd newc cpio archive (what the kernel unpacks as its initramfs)."""
    entries = []
    for directory, dirs, files in os.walk(tree):
        for name in sorted(dirs) + sorted(files):
            entries.append(os.path.relpath(os.path.join(directory, name), tree))
    listing = "\n".join(entries) + "\n"
    with open(out, "wb") as f:
        cpio = subprocess.Popen(["busybox", "cpio", "-o", "-H", "newc"], cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        gzip = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=f)
        cpio.stdout.close()
        cpio.communicate(listing.encode())
        if cpio.returncode != 0 or gzip.wait() != 0:
            raise RuntimeError("packing the initramfs failed")


def initramfs(suite, binaries, out):
    """The guest's whole userland: busybox, the relay and the tools with their libraries, the NIC driver."""
    _, modules_dir, _ = kernel(suite)
    tree = tempfile.mkdtemp(prefix="oxr-initramfs-")
    try:
        os.makedirs(os.path.join(tree, "bin"))
        os.makedirs(os.path.join(tree, "modules"))
        shutil.copy("/bin/busybox", os.path.join(tree, "bin", "busybox"))
        with open(os.path.join(tree, "init"), "w") as f:
            f.write(INIT)
        os.chmod(os.path.join(tree, "init"), 0o755)
        order = _load_order(modules_dir, MODULES)
        for name, path in order:
            with open(os.path.join(tree, "modules", f"{name}.ko"), "wb") as f:
                f.write(_module_bytes(path))
        with open(os.path.join(tree, "modules.order"), "w") as f:
            f.write("".join(f"{name}\n" for name, _ in order))
        for binary in list(binaries) + list(TOOLS):
            # The relay in /bin; the tools where the host has them, ahead of busybox's in PATH.
            target = os.path.join(tree, "bin", os.path.basename(binary)) if binary in binaries else os.path.join(tree, binary.lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(binary, target)
            for library in _shared_libraries(binary):
                target = os.path.join(tree, library.lstrip("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy(library, target)
        _cpio_newc(tree, out)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _die_with_parent():
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class BootCrash(RuntimeError):
    """The guest's kernel died before its init was up."""


class Guest:
    """A booted guest: the relay's host. `nics` maps guest interface names to host tap devices
    (multi-queue, `queues` pairs each); `run` executes a shell script in the guest."""

    def __init__(self, suite, binaries, workdir, nics, queues=2, memory_mib=1024, boot_timeout=180):
        self.suite, self.workdir, self.nics, self.queues = suite, workdir, dict(nics), queues
        self.image, _, self.release = kernel(suite)
        self.console = os.path.join(workdir, f"guest-{suite}-console.log")
        initrd = os.path.join(workdir, "initramfs.gz")
        initramfs(suite, binaries, initrd)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.agent_port = probe.getsockname()[1]
        macs = {"mg0": MGMT_MAC}
        args = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", str(memory_mib),
                "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{self.console}",
                "-kernel", self.image, "-initrd", initrd,
                "-netdev", f"user,id=mg0,restrict=on,hostfwd=tcp:127.0.0.1:{self.agent_port}-:{AGENT_PORT}",
                "-device", f"virtio-net-pci,netdev=mg0,mac={MGMT_MAC}"]
        for index, (name, tap) in enumerate(self.nics.items()):
            mac = macs[name] = f"52:54:00:00:01:{index + 1:02x}"
            args += ["-netdev", f"tap,id={name},ifname={tap},script=no,downscript=no,queues={queues}",
                     "-device", f"virtio-net-pci,netdev={name},mac={mac},mq=on,vectors={2 * queues + 2}"]
        nic_map = ",".join(f"{mac}={name}" for name, mac in macs.items())
        args += ["-append", f"console=ttyS0 panic=-1 quiet oxr_nics={nic_map}"]
        self.qemu_log = os.path.join(workdir, "qemu.log")
        try:
            self._boot(args, boot_timeout)
        except BootCrash as crash:
            # Multi-threaded TCG now and then breaks the kernel's own code patching while it boots
            # (seen on 6.12: "Oops: int3" in sched_init_debug, about 1 boot in 40), before anything
            # of the relay runs: said loudly, and booted once more.
            first_line = str(crash).strip().splitlines()[1] if "\n" in str(crash).strip() else str(crash)
            print(f"  guest: the {suite} kernel crashed while booting, before the relay ran ({first_line.strip()}); booting again",
                  flush=True)
            os.replace(self.console, self.console + ".crashed")
            self._boot(args, boot_timeout)
        self.boot_seconds = time.monotonic() - self.started

    def _boot(self, args, timeout):
        self.started = time.monotonic()
        with open(self.qemu_log, "w") as log:
            # QEMU dies with whoever started it, even if that is killed outright.
            self.qemu = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.qemu.poll() is not None:
                with open(self.qemu_log, errors="replace") as log:
                    failure = f"qemu exited ({self.qemu.returncode}): {log.read()}\n{self.crash_report()}"
                raise (BootCrash if "oxr-guest ready" not in self.console_text() else RuntimeError)(failure)
            if "oxr-guest ready" in self.console_text():
                try:
                    if self.run("echo up", timeout=10)[1].strip() == "up":
                        return
                except OSError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"the {self.suite} guest did not come up in {timeout}s:\n{self.crash_report()}")

    def crash_report(self):
        """The console from the kernel's first oops, warning or panic on (or its end if there is none)."""
        text = self.console_text()
        found = re.search(r"^.*(BUG:|Oops|general protection|WARNING:|Kernel panic).*$", text, re.M)
        return text[found.start():found.start() + 8000] if found else text[-3000:]

    def console_text(self):
        try:
            with open(self.console, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def run(self, script, timeout=60):
        """Runs `script` in the guest's shell; returns (exit status, stdout and stderr)."""
        if self.qemu.poll() is not None:
            raise RuntimeError(f"the {self.suite} guest is gone (qemu exited {self.qemu.returncode}):\n{self.crash_report()}")
        with socket.create_connection(("127.0.0.1", self.agent_port), timeout=timeout) as conn:
            conn.sendall(f"exec 2>&1\n{script}\necho \"__oxr_rc=$?\"\nexit\n".encode())
            conn.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                chunks.append(data)
        out = b"".join(chunks).decode(errors="replace")
        match = re.search(r"__oxr_rc=(\d+)\n?$", out)
        if not match:
            raise OSError(f"the guest agent's answer ended early: {out[-500:]!r}")
        return int(match.group(1)), out[:match.start()]

    @staticmethod
    def command(cmd):
        """`cmd` for the guest's shell: a copied tool by its path (busybox's shell prefers its own applets)."""
        tools = {os.path.basename(tool): tool for tool in TOOLS}
        return shlex.join([tools.get(cmd[0], cmd[0]), *cmd[1:]])

    def write(self, path, text):
        status, out = self.run(f"cat > {path} <<'OXR_EOF'\n{text}\nOXR_EOF")
        if status != 0:
            raise RuntimeError(f"writing {path} in the guest failed: {out}")

    def read(self, path):
        status, out = self.run(f"cat {path}")
        if status != 0:
            raise FileNotFoundError(path)
        return out

    def start(self, cmd, log):
        """Starts `cmd` in the background, stderr to `log`; a handle shaped like subprocess.Popen."""
        return GuestProcess(self, cmd, log)

    def shutdown(self):
        if self.qemu.poll() is None:
            self.qemu.send_signal(signal.SIGTERM)
            try:
                self.qemu.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.qemu.kill()
                self.qemu.wait()


class GuestProcess:
    """A process in the guest, handled as the scenarios handle a local one (poll, signals, communicate)."""

    _count = 0

    def __init__(self, guest, cmd, log):
        GuestProcess._count += 1
        self.guest, self.returncode = guest, None
        base = f"/run/proc{GuestProcess._count}"
        self._pid_file, self._rc_file, self._out_file = base + ".pid", base + ".rc", base + ".out"
        status, out = guest.run(f"( {guest.command(cmd)} >{self._out_file} 2>{log} </dev/null & echo $! >{self._pid_file}; "
                                f"wait $!; echo $? >{self._rc_file} ) </dev/null >/dev/null 2>&1 &\n"
                                f"while [ ! -s {self._pid_file} ]; do usleep 10000; done; cat {self._pid_file}")
        if status != 0:
            raise RuntimeError(f"starting {cmd} in the guest failed: {out}")
        self.pid = int(out.split()[-1])

    def poll(self):
        if self.returncode is None:
            status, out = self.guest.run(f"cat {self._rc_file} 2>/dev/null")
            if status == 0 and out.strip():
                self.returncode = int(out.strip())
        return self.returncode

    def send_signal(self, sig):
        self.guest.run(f"kill -{int(sig)} {self.pid}")

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"guest pid {self.pid}", timeout)
            time.sleep(0.1)
        return self.returncode

    def communicate(self, timeout=None):
        self.wait(timeout)
        return self.guest.read(self._out_file), None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "kernel":
        print(kernel(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "boot":
        work = tempfile.mkdtemp(prefix="oxr-guest-")
        subprocess.run(["ip", "tuntap", "add", "oxrboot0", "mode", "tap", "multi_queue"], check=True)
        try:
            guest = Guest(sys.argv[2], [sys.argv[3]], work, {"rc0": "oxrboot0"})
            try:
                print(f"booted {guest.release} in {guest.boot_seconds:.1f}s")
                print(guest.run("uname -r; ip -d link show rc0; ethtool -l rc0; ethtool -i rc0")[1])
                print(guest.run(f"{os.path.basename(sys.argv[3])} probe")[1])
            finally:
                guest.shutdown()
        finally:
            subprocess.run(["ip", "link", "del", "oxrboot0"])
            print(open(os.path.join(work, f"guest-{sys.argv[2]}-console.log"), errors="replace").read()[-2000:])
            shutil.rmtree(work, ignore_errors=True)
    else:
        sys.exit(__doc__)
