"""The shaped networks `lrpt bench --link` runs its jobs on, made of Linux network namespaces
(root or CAP_NET_ADMIN; `ip` and `tc` from iproute2, `unshare` from util-linux).

- One node: `shaped_loopback(rate)`, a command prefix. The job runs in a private namespace
  whose loopback is shaped: every process's traffic shares the one limited link.
- Two nodes: `TwoNodes(rate)`, a context manager. Two namespaces joined by a veth pair, each
  end shaped with tbf (so both directions carry `rate`), each loopback unshaped. A node's
  processes run in its namespace; traffic between them goes over its loopback (Linux routes
  a namespace's own addresses through `lo`), so only inter-node traffic crosses the veth, and
  the kernel's counters on the veth count exactly that. Names are unique per invocation and
  everything is removed on exit, on failure and on Ctrl-C or SIGTERM alike.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

TC_RATE = re.compile(r"^(\d+(?:\.\d+)?)([kmg]?)bit$")
SUBNET = "10.88.0"  # inside private namespaces: no clash with the host's or another bench's
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/hosts on /etc/hosts


def tbf(rate: str) -> str:
    """The tc qdisc arguments that shape a link to `rate` (tc syntax), checked in one line."""
    m = TC_RATE.match(rate.lower())
    if not m:
        raise ValueError(f"--link {rate!r}: expected a rate such as 100mbit, 1gbit or 500kbit")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    burst = max(256 * 1024, int(bits / 8 / 250))  # tbf needs at least rate / HZ bytes per tick
    return f"tbf rate {rate.lower()} burst {burst} latency 50ms"


def require_namespaces() -> None:
    """One line if this machine or user cannot make network namespaces."""
    for tool in ("unshare", "tc", "ip"):
        if not shutil.which(tool):
            raise RuntimeError(f"--link needs `{tool}` (Debian: apt-get install util-linux iproute2)")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise PermissionError(f"--link needs root or CAP_NET_ADMIN to make a network namespace "
                              f"(unshare -n: {probe.stderr.strip() or 'refused'})")


def shaped_loopback(rate: str) -> list[str]:
    """The command prefix that runs a command in a new network namespace whose loopback
    carries `rate`. Nothing to clean up: the namespace dies with its last process."""
    qdisc = tbf(rate)
    require_namespaces()
    setup = f"ip link set lo up && tc qdisc add dev lo root {qdisc} && exec \"$@\""
    return ["unshare", "-n", "bash", "-c", setup, "lrpt-link"]


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")


class TwoNodes:
    """Namespaces `lrpt-TAG-0` and `lrpt-TAG-1` with addresses 10.88.0.1 and .2 on veths
    `lrTAG0`/`lrTAG1` (TAG: this process's pid and a random suffix; interface names hold at
    most 15 characters)."""

    def __init__(self, rate: str):
        self.qdisc = tbf(rate)
        require_namespaces()
        tag = f"{os.getpid():x}{secrets.token_hex(2)}"
        self.ns = [f"lrpt-{tag}-{i}" for i in (0, 1)]
        self.ifname = [f"lr{tag}{i}" for i in (0, 1)]
        self.addr = [f"{SUBNET}.{i + 1}" for i in (0, 1)]
        self.holders: list[subprocess.Popen] = []

    def __enter__(self) -> TwoNodes:
        # SIGTERM would end the process without running __exit__: make it an exception.
        self._sigterm = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self._create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _create(self) -> None:
        for ns in self.ns:
            _ip("netns", "add", ns)
        # Created inside the namespaces: no name ever appears in this one.
        _ip("link", "add", self.ifname[0], "netns", self.ns[0], "type", "veth",
            "peer", "name", self.ifname[1], "netns", self.ns[1])
        for i, ns in enumerate(self.ns):
            _ip("-n", ns, "addr", "add", f"{self.addr[i]}/24", "dev", self.ifname[i])
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", self.ifname[i], "up")
            out = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", self.ifname[i], "root",
                                  *self.qdisc.split()], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"tc on {self.ifname[i]} failed: {out.stderr.strip()}")
            # A namespace has no resolver. c10d names each client socket its store accepts, from
            # the peer's IPv4-mapped IPv6 address: without an entry for that form too, every
            # accept warns "hostname of the client socket cannot be retrieved". And this host's
            # name must resolve to an address the other node reaches.
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(
                f"127.0.0.1 localhost\n::1 localhost\n{self.addr[i]} {os.uname().nodename}\n" +
                "".join(f"{a} lrpt-node{j}\n::ffff:{a} lrpt-node{j}\n" for j, a in enumerate(self.addr)))
            # A process that lives as long as the namespace: the counters are read through it.
            self.holders.append(subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "infinity"],
                                                 start_new_session=True))

    def prefix(self, node: int) -> list[str]:
        """The command prefix that runs a command on `node` (in its namespace, with its hosts)."""
        return ["ip", "netns", "exec", self.ns[node]]

    def env(self, node: int) -> dict[str, str]:
        """Gloo's interface named, not guessed from the host name."""
        return {"GLOO_SOCKET_IFNAME": self.ifname[node]}

    def tx_bytes(self, node: int) -> int:
        """What the kernel counted leaving `node` on its veth: the counter behind
        /sys/class/net/IF/statistics/tx_bytes, read from /proc/PID/net/dev of a process in the
        namespace (this process's /sys shows its own namespace)."""
        text = Path(f"/proc/{self.holders[node].pid}/net/dev").read_text()
        for line in text.splitlines():
            name, _, fields = line.partition(":")
            if name.strip() == self.ifname[node]:
                return int(fields.split()[8])  # receive: 8 fields, then transmit bytes
        raise RuntimeError(f"no interface {self.ifname[node]} in namespace {self.ns[node]}")

    def run(self, commands: list[tuple[list[str], dict]], watch=None) -> list[int]:
        """Run one command per node (argv, env) in its namespace and wait for all; call
        `watch()` every few milliseconds meanwhile. If one fails the others are stopped (they
        would wait for it until the collective timeout). Returns the exit codes."""
        procs = [subprocess.Popen([*self.prefix(i), *argv], env={**env, **self.env(i)},
                                  stdout=subprocess.DEVNULL, start_new_session=True)
                 for i, (argv, env) in enumerate(commands)]
        try:
            while any(p.poll() is None for p in procs):
                if watch:
                    watch()
                if any(p.returncode not in (None, 0) for p in procs):
                    break
                time.sleep(0.005)
            if watch:
                watch()
        finally:
            # A bench run has nothing to save: no graceful stop, whatever is left is killed.
            self._kill_all()
            for p in procs:
                p.wait()
        return [p.returncode for p in procs]

    def _kill_all(self, holders: bool = False) -> None:
        """SIGKILL every process in the namespaces (the holders only if asked). Torch elastic
        starts its workers in sessions of their own, so no process group reaches them all;
        each was started by us and is ended by its pid."""
        keep = set() if holders else {p.pid for p in self.holders}
        for ns in self.ns:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
            for pid in set(map(int, pids.split())) - keep:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def __exit__(self, *exc) -> None:
        try:
            self._kill_all(holders=True)
            for p in self.holders:
                p.wait()
            for ns in self.ns:
                subprocess.run(["ip", "netns", "delete", ns], capture_output=True)  # the veth goes with it
                shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        finally:
            signal.signal(signal.SIGTERM, self._sigterm)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)
