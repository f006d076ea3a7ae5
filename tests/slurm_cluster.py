"""A real one-node SLURM cluster for the tests: Debian's `slurm-wlm` and `munge`, installed with apt when missing,
configured in a temporary folder (munge key, slurm.conf, state and logs) and started as three foreground
processes (munged, slurmctld, slurmd) that `stop` ends by their PIDs.

Clients find the cluster through SLURM_CONF, which `start` sets in this process's environment, so every `sbatch`
the code under test runs (directly or from a child process) talks to this cluster and no other.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from alignment.backends.vllm_server import free_port

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]


def install() -> str | None:
    """Install the daemons with apt when missing; None when they are there, else why they cannot be."""
    if all(shutil.which(d) for d in DAEMONS):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "slurm-wlm and munge are not installed, and apt-get (as root) is not available to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}"
    return None


def slurm_conf(folder: Path, host: str, munge_socket: Path) -> str:
    """The settings DESIGN.md section 4 found to work in a container: processes tracked by walking /proc, no
    cgroups, cores as the consumable resource, one node of 2 CPUs."""
    return "\n".join([
        "ClusterName=test", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",  # schedule at submission: no backfill interval to wait for
        "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'slurmd.log'}",
        "KillWait=5", "InactiveLimit=0", "MinJobAge=600",  # finished jobs stay visible to `scontrol show job`
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n"


class Cluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.host = socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout_s: float = 600) -> None:  # a guard against a hang: each wait ends on a state
        f = self.folder
        for sub in ("state", "spool", "munge"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = f / "munge" / "munge.socket"
        (f / "slurm.conf").write_text(slurm_conf(f, self.host, sock))
        os.environ["SLURM_CONF"] = str(f / "slurm.conf")  # for this process and every child it starts
        self._spawn(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={f / 'munge' / 'munged.pid'}", f"--seed-file={f / 'munge' / 'seed'}",
                     f"--log-file={f / 'munge' / 'munged.log'}"])
        self._wait(lambda: sock.exists(), timeout_s, "munged")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(f / "slurm.conf")])
        self._spawn(["slurmd", "-D", "-f", str(f / "slurm.conf")])
        self._wait(lambda: run("sinfo", "-h", "-o", "%t").stdout.strip() == "idle", timeout_s, "the node to be idle")

    def _spawn(self, cmd: list[str], name: str | None = None) -> None:
        log = open(self.folder / f"{name or Path(cmd[0]).name}.out", "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        start = time.time()
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() - start > timeout_s:
                logs = "\n".join(f"{p.name}:\n{p.read_text()[-1500:]}" for p in sorted(self.folder.glob("*.log"))
                                 + sorted(self.folder.glob("*.out")))
                raise RuntimeError(f"SLURM test cluster: waited for {what}; {dead or 'nothing'} exited\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel the jobs still on this cluster (a failed test may leave one; slurmstepd would outlive slurmd), then
        end the daemons this object started, newest first, by PID."""
        if all(p.poll() is None for p in self.procs):
            run("scancel", f"--user={os.getuid()}")  # SLURM_CONF: this cluster's jobs only
            start = time.time()
            while run("squeue", "-h").stdout.strip() and time.time() - start < 30:
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def job_state(job_id: str, timeout_s: float = 900) -> str:
    """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED...: from `scontrol show job` (no accounting database here).
    COMPLETING (a job's processes still being stopped: a vLLM server takes seconds on a loaded machine) is waited
    through, so the state returned is the one the job ends in (`timeout_s` only guards against a hang)."""
    deadline = time.time() + timeout_s
    while True:
        out = run("scontrol", "show", "job", job_id).stdout
        state = out.split("JobState=")[1].split()[0] if "JobState=" in out else ""
        if state != "COMPLETING" or time.time() > deadline:
            return state
        time.sleep(0.5)


class Nodes(Cluster):
    """A SLURM cluster of `count` nodes on this one machine: each node a network namespace (`ip netns`) joined to a
    bridge by a veth pair, with its own address, UTS host name and /etc/hosts (a mount namespace: node names resolve
    on the nodes, as on a cluster), running its own slurmd under the one slurmctld, which listens on the bridge.
    Every job's processes run inside their node's namespaces, so a rendezvous between nodes crosses the bridge.
    `stop` ends the daemons and removes the namespaces, the veth pairs and the bridge it made."""

    def __init__(self, folder: Path, count: int = 2):
        super().__init__(folder)
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"albr{tag}"  # (interface names: 15 characters at most)
        self.net = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
        self.nodes = [f"node{i + 1}" for i in range(count)]
        self.namespaces = [f"al{tag}n{i + 1}" for i in range(count)]
        self.addresses = [f"{self.net}.{11 + i}" for i in range(count)]
        self.previous_conf = os.environ.get("SLURM_CONF")

    def conf(self, sock: Path) -> str:
        nodes = [f"NodeName={n} NodeAddr={a} CPUs=2 RealMemory=20000 State=UNKNOWN"
                 for n, a in zip(self.nodes, self.addresses)]
        lines = [line for line in slurm_conf(self.folder, self.host, sock).splitlines()
                 if not line.startswith(("NodeName=", "PartitionName=", "SlurmctldHost="))]
        # each slurmd its own spool, PID and log file (%n: SLURM puts the node's name there)
        lines = [line.replace("/spool", "/spool-%n").replace("slurmd.pid", "slurmd-%n.pid")
                 .replace("slurmd.log", "slurmd-%n.log") for line in lines]
        return "\n".join([f"SlurmctldHost={self.host}({self.net}.1)", *lines, *nodes,
                          f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP"]) + "\n"

    def network(self) -> None:
        ip = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True, text=True)  # noqa: E731
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.net}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, (ns, addr) in enumerate(zip(self.namespaces, self.addresses)):
            outside = f"{self.bridge}v{i}"
            ip("netns", "add", ns)
            ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", outside, "master", self.bridge)
            ip("link", "set", outside, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
        hosts = ["127.0.0.1 localhost", f"{self.net}.1 {self.host}",
                 *(f"{a} {n}" for n, a in zip(self.nodes, self.addresses))]
        (self.folder / "hosts").write_text("\n".join(hosts) + "\n")

    def start(self, timeout_s: float = 600) -> None:
        f = self.folder
        for sub in ("state", "munge", *(f"spool-{n}" for n in self.nodes)):
            (f / sub).mkdir(parents=True, exist_ok=True)
        self.network()
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = f / "munge" / "munge.socket"  # a file: reached from every namespace
        (f / "slurm.conf").write_text(self.conf(sock))
        os.environ["SLURM_CONF"] = str(f / "slurm.conf")
        self._spawn(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={f / 'munge' / 'munged.pid'}", f"--seed-file={f / 'munge' / 'seed'}",
                     f"--log-file={f / 'munge' / 'munged.log'}"])
        self._wait(lambda: sock.exists(), timeout_s, "munged")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(f / "slurm.conf")])
        for node, ns in zip(self.nodes, self.namespaces):
            inside = (f"hostname {node} && mount --bind {f / 'hosts'} /etc/hosts && "
                      f"exec slurmd -D -N {node} -f {f / 'slurm.conf'}")
            # nsenter, not `ip netns exec`, which mounts a sysfs of its own and so hides /sys/fs/cgroup from slurmd
            self._spawn(["nsenter", f"--net=/var/run/netns/{ns}", "unshare", "--uts", "--mount", "sh", "-c", inside],
                        name=f"slurmd-{node}")
        self._wait(lambda: run("sinfo", "-h", "-N", "-o", "%t").stdout.split() == ["idle"] * len(self.nodes),
                   timeout_s, "every node to be idle")

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for ns in self.namespaces:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its veth end goes with it
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            if self.previous_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self.previous_conf


def namespaces_work() -> str | None:
    """None where this machine lets root make network namespaces and bridges, else why not."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "unshare", "nsenter")):
        return "network namespaces need root, iproute2's `ip` and util-linux's `unshare` and `nsenter`"
    probe = f"alprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"`ip netns add` failed: {made.stderr.strip()}"


@contextmanager
def running(cluster: Cluster, why: str | None):
    """The cluster started for a fixture, and stopped after; where it cannot be made (`why`), the tests that use it
    skip and say why, and in CI (CI=true) fail instead."""
    import pytest

    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and the SLURM test cluster cannot be made: {why}")
        pytest.skip(why)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
