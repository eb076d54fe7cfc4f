"""A real one-node SLURM cluster on localhost for the ``slurm`` tests: munged, slurmctld and slurmd (Debian's
slurm-wlm and munge, installed by ``make install``), each in the foreground as a child of the test session, with
their own key, config, spool and state under a temporary folder; stopped (by their own process ids) afterwards.

Why not a mock: requeueing and resuming is a conversation between slurmctld, submitit's signal handler, Hydra's
pickled launcher and Lightning; a fake scheduler tests none of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "squeue", "scancel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    """Half the machine's memory: slurmd drains a node whose configured RealMemory exceeds what it finds."""
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return max(256, kb // 2048)


def slurm_conf(root: Path, cpus: int, mem_mb: int, user: str) -> str:
    """slurm.conf for one node on localhost: no cgroups, no accounting database, state and spool under ``root``."""
    return "\n".join([
        "ClusterName=mmlmtest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        f"SlurmUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        "KillWait=5",           # SIGTERM -> SIGKILL of a cancelled or requeued job
        "MinJobAge=600",        # keep finished jobs visible to scontrol for the whole test
        "InactiveLimit=0",
        "SlurmdTimeout=60",
        "SlurmctldTimeout=60",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@dataclass
class LocalSlurm:
    """The running cluster: ``env`` is what a client (sbatch, sinfo, submitit) needs to reach it."""

    root: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True) -> str:
        p = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def start(self, name: str, *cmd: str) -> None:
        log = open(self.root / f"{name}.out", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(list(cmd), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def logs(self) -> str:
        """The tail of every daemon's log: what a failed start or a stuck job is diagnosed with."""
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until sinfo shows the node idle (a job submitted before that waits, or fails on a down node)."""
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited (rc={p.returncode}) while starting:\n{self.logs()}")
            state = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout:.0f} s (sinfo: {state!r}):\n{self.logs()}")

    def drain(self, timeout: float = 30.0) -> None:
        """Let finished jobs' steps wind down (a job's result is written before srun exits), then cancel the rest:
        a daemon stopped under a running step leaves its slurmstepd behind."""
        for cancel in (False, True):
            if cancel:
                self.run("scancel", "--partition=debug", check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).strip():
                time.sleep(0.5)

    def leftovers(self) -> list[int]:
        """Processes of this cluster's jobs still alive (their environment names this slurm.conf)."""
        mark, found = f"SLURM_CONF={self.env['SLURM_CONF']}".encode(), []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:  # gone, or not ours to read
                continue
        return found

    def stop(self) -> None:
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            self.drain()
        for name in ("slurmd", "slurmctld", "munged"):  # reverse start order, each by its own pid
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        for pid in self.leftovers():  # started by this cluster's slurmd for this session's jobs: ours to end
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def start_local_slurm(root: Path) -> LocalSlurm:
    """munged with a fresh key, then slurmctld and slurmd in the foreground; returns once the node is idle."""
    for d in ("munge", "state", "spool"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o711)  # the socket reachable, the key not
    key = root / "munge" / "munge.key"
    if not key.exists():  # a key of this cluster only: never the machine's /etc/munge/munge.key
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, os.cpu_count() or 1, _mem_mb(), user))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
        env.pop(k)  # a test session itself inside a SLURM job must not leak that job's settings
    cluster = LocalSlurm(root, env)
    m = root / "munge"
    cluster.start("munged", "munged", "-F", "-f", f"--socket={m}/munge.socket", f"--key-file={key}",
                  f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed", f"--log-file={root}/munged.log")
    deadline = time.monotonic() + 20
    while not (m / "munge.socket").exists():
        if cluster.procs["munged"].poll() is not None or time.monotonic() > deadline:
            cluster.stop()
            raise RuntimeError(f"munged did not start:\n{cluster.logs()}")
        time.sleep(0.1)
    cluster.start("slurmctld", "slurmctld", "-D", "-i", "-f", str(conf))
    cluster.start("slurmd", "slurmd", "-D", "-N", "localhost", "-f", str(conf))
    try:
        cluster.wait_idle()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory) -> Iterator[LocalSlurm]:
    """A one-node SLURM cluster on localhost for this session (fails with its logs if the daemons do not start)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # the daemons: not on a user's PATH
    os.environ["PATH"] = path  # for start_local_slurm's env (the fixture runs once per session)
    missing = [d for d in DAEMONS if not shutil.which(d, path=path)]
    if missing:
        if not shutil.which("apt-get"):
            pytest.skip(f"slurm cannot be installed here (no apt-get for slurm-wlm/munge; missing {', '.join(missing)})")
        pytest.fail(f"{', '.join(missing)} not installed: run `make install` (apt: slurm-wlm munge)")
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        pytest.fail("hydra-submitit-launcher not installed: run `make install` (pip extra mmlm[slurm])")
    root = Path(tmp_path_factory.mktemp("slurm"))
    cluster = start_local_slurm(root)
    try:
        yield cluster
    finally:
        cluster.stop()
