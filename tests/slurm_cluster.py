"""A real two-node SLURM cluster on this one host, for the tests that submit jobs.

Debian's slurm-wlm 22.05 (`bash .ci/install-slurm.sh`) runs as root without systemd, cgroups
or accounting: a private munged (its own key and socket in a temp dir), `slurmctld -i` and two
`slurmd -N n1|n2` on distinct ports, both nodes at NodeAddr 127.0.0.1. Every path and port is
private to one cluster, so two test sessions on one machine do not collide.

Use the `slurm_cluster` fixture (session scope) or, by hand, `python tests/slurm_cluster.py`
which starts a cluster, prints `export SLURM_CONF=...` and waits for Ctrl-C.

Where the binaries are missing the fixture skips, unless CI=true: then it fails, because CI
installs them and a silent skip would hide a broken install.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
NODES = ("n1", "n2")
CPUS_PER_NODE = 1  # the host has 2 cores: one per "node", so that launchers size their threads right

SLURM_CONF = """\
ClusterName=lrpt-test
# A random first job id: job scripts derive their rendezvous port from the job id
# (20000 + id % 10000), and two test sessions on one host must not share ports.
FirstJobId={first_job_id}
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups, no accounting: plain process tracking works in a container as root.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Generous timeouts: two cores are shared with whatever else the tests run.
SlurmdTimeout=300
SlurmctldTimeout=300
MessageTimeout=30
BatchStartTimeout=60
KillWait=30
InactiveLimit=0
MinJobAge=3600
SchedulerParameters=sched_interval=1
NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=localhost Port={port_n1} CPUs={cpus} RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 NodeHostname=localhost Port={port_n2} CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


def find_binaries() -> dict[str, str] | str:
    """{name: path} for the daemons and clients, or a string saying what is missing."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    names = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
    found = {n: shutil.which(n, path=path) for n in names}
    missing = [n for n, p in found.items() if not p]
    if missing:
        return f"SLURM/munge binaries not found: {', '.join(missing)} (run: bash .ci/install-slurm.sh)"
    return found


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL, so that
    no daemon outlives a killed pytest (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


def _free_job_id_base(span: int = 20) -> int:
    """A first job id whose next `span` ports (20000 + id % 10000) are free right now."""
    for _ in range(50):
        base = random.randrange(10000, 19980)
        try:
            socks = []
            for port in range(20000 + base % 10000, 20000 + base % 10000 + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return random.randrange(10000, 19980)


class SlurmCluster:
    """Starts and stops the daemons; helpers to submit jobs and read their state."""

    def __init__(self, bins: dict[str, str]):
        self.bins = bins
        # mkdtemp in /tmp, not pytest's tmp_path: munged wants every directory above its socket
        # searchable by all, and a unix socket path must stay under 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="lrpt-slurm-"))
        self.dir.chmod(0o711)
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = os.pathsep.join([str(Path(bins["sbatch"]).parent), *SBIN,
                                            self.env.get("PATH", "")])
        # A cluster of our own: drop any SLURM_* a surrounding allocation may have set.
        for k in [k for k in self.env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del self.env[k]
        self.procs: dict[str, subprocess.Popen] = {}
        self.logfiles: list = []
        self.start_seconds = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        t0 = time.monotonic()
        d = self.dir
        (d / "munge").mkdir(mode=0o755)
        (d / "state").mkdir()
        for n in NODES:
            (d / "spool" / n).mkdir(parents=True)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = d / "munge" / "munge.socket"
        # munged runs as root here with a key and socket of its own (not /etc/munge, not
        # /run/munge): no need for the munge user, nor to share a daemon with the host.
        self._spawn("munged", [self.bins["munged"], "-F", "--force", f"--socket={sock}",
                               f"--key-file={key}", f"--log-file={d}/munged.log",
                               f"--pid-file={d}/munge/munged.pid", f"--seed-file={d}/munge/seed"])
        self._wait_for(lambda: sock.exists(), 10, "munged socket")
        ctld, p1, p2 = _free_ports(3)
        first_job_id = _free_job_id_base()
        self.conf.write_text(SLURM_CONF.format(d=d, ctld_port=ctld, port_n1=p1, port_n2=p2, munge_socket=sock,
                                               cpus=CPUS_PER_NODE, first_job_id=first_job_id))
        # -D: stay in the foreground (we hold the pid); -i: ignore any saved state; -c: clean.
        self._spawn("slurmctld", [self.bins["slurmctld"], "-D", "-i", "-c", "-f", str(self.conf)])
        for n in NODES:
            self._spawn(f"slurmd-{n}", [self.bins["slurmd"], "-D", "-N", n, "-f", str(self.conf)])
        self._wait_for(self._all_idle, timeout, "both nodes idle in sinfo")
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Cancel what is left (slurmd kills its jobs' processes), stop the daemons by pid,
        remove the directory (kept with LRPT_KEEP_SLURM_DIR=1)."""
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.run(["scancel", "--full", "--partition=debug"], check=False, timeout=10)
            for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
                p = self.procs.get(name)
                if p is None or p.poll() is not None:
                    continue
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        finally:
            for f in self.logfiles:
                f.close()
            if os.environ.get("LRPT_KEEP_SLURM_DIR") != "1":
                shutil.rmtree(self.dir, ignore_errors=True)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / f"{name}.stdout", "wb")
        self.logfiles.append(log)
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_die_with_parent)

    def _wait_for(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}\n"
                                       + self.logs())
            if ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n" + self.logs())

    def _all_idle(self) -> bool:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return r.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

    def logs(self, tail: int = 30) -> str:
        """The tail of every daemon log, for failure messages."""
        out = []
        for f in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.stdout")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # -- helpers for tests ----------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a command with this cluster's SLURM_CONF (and the daemons' PATH)."""
        kw.setdefault("env", self.env)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def submit(self, script: str | Path, *args: str, cwd: str | Path | None = None) -> int:
        """sbatch a script (a path, or the script text itself); returns the job id."""
        if isinstance(script, str) and script.startswith("#!"):
            path = self.dir / f"job-{time.monotonic_ns()}.sbatch"
            path.write_text(script)
            script = path
        r = self.run(["sbatch", "--parsable", *args, str(script)], cwd=cwd or self.dir)
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (no accounting here, so no sacct)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=20)
        if r.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def job_state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: int, timeout: float = 300, until=None) -> dict:
        """Poll until the job has finished, or until `until(record)` is true; returns its
        scontrol record. (A requeued job may start again cred_expire = 5 s after the requeue;
        releasing it sooner by hand races with the revoked credential and fails the job.)
        Raises with the daemon logs on timeout."""
        done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info) if until is not None else info.get("JobState") in done:
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout:.0f}s\n"
                           + self.logs())


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started two-node cluster (n1, n2, partition `debug`), stopped at session end."""
    bins = find_binaries()
    if isinstance(bins, str):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(bins + " -- CI=true, so this is an error, not a skip")
        pytest.skip(bins)
    if os.geteuid() != 0:
        reason = "the local SLURM cluster runs its daemons as root (SlurmUser=root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = SlurmCluster(bins)
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":  # a cluster by hand: python tests/slurm_cluster.py
    found = find_binaries()
    if isinstance(found, str):
        raise SystemExit(found)
    c = SlurmCluster(found).start()
    print(f"cluster up in {c.start_seconds:.1f}s\nexport SLURM_CONF={c.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
