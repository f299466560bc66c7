"""A one-node SLURM cluster on this machine, for the tests: munged + slurmctld + slurmd.

Everything lives in one temporary folder (config, key, sockets, state, logs) and listens on
127.0.0.1 only, on free ports, so it never touches another host or a site's own SLURM. The node
is `localhost` with 2 CPUs and the memory this machine has; two partitions named as in
profiles/slurm (`gpu`, `cpu`), both on that node, so the profile runs unchanged. No accounting
database: sacct answers from slurmctld's memory of recent jobs (MinJobAge keeps them an hour).
Needs the Debian packages slurmctld, slurmd, slurm-client and munge (.ci/run installs them).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE_CPUS = 2


def missing_programs() -> list[str]:
    return [p for p in (*DAEMONS, "sbatch", "squeue", "sacct", "scancel", "sinfo") if not shutil.which(p)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(d: Path, user: str, mem_mb: int) -> str:
    return f"""\
ClusterName=kvstudy-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# the node is what this file says, whatever the machine has (CI machines differ)
SlurmdParameters=config_overrides
ReturnToService=2
# finished jobs stay in slurmctld's memory for sacct (no accounting database here)
MinJobAge=3600
KillWait=5
OverTimeLimit=0
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
DefMemPerCPU=1000
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.txt
NodeName=localhost NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={mem_mb} State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        # the executor plugin's job step starts its `srun` without any SLURM_* variable, SLURM_CONF
        # included: a real node finds its config at /etc/slurm (or configless, from slurmd), this
        # one only through this folder's srun, which names the config and runs the real srun
        self.bin = root / "bin"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{self.bin}:{os.environ['PATH']}"}
        self.procs: list[subprocess.Popen] = []

    def cmd(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def start(self, timeout_s: float = 60) -> "Cluster":
        d = self.root
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # munged refuses a socket folder others may write to
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        mem_mb = psutil.virtual_memory().total // 2**20 - 1024  # what the machine has, less the OS's share
        self.conf.write_text(slurm_conf(d, getpass.getuser(), mem_mb))
        self.bin.mkdir(exist_ok=True)
        srun = self.bin / "srun"
        srun.write_text(f"#!/bin/sh\nSLURM_CONF={self.conf} exec {shutil.which('srun')} \"$@\"\n")
        srun.chmod(0o755)
        self._spawn("munged", "--foreground", f"--key-file={key}", f"--socket={d}/munge.socket",
                    f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed",
                    "--force")
        self._wait(lambda: (d / "munge.socket").exists(), timeout_s, "munged did not create its socket")
        self._spawn("slurmctld", "-D", "-i", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-N", "localhost", "-f", str(self.conf))
        self._wait(self.node_idle, timeout_s, "the node did not become idle")
        return self

    def node_idle(self) -> bool:
        p = self.cmd("sinfo", "--noheader", "--nodes=localhost", "--format=%T", check=False)
        return p.returncode == 0 and p.stdout.split()[:1] == ["idle"]

    def _spawn(self, *argv: str) -> None:
        log = open(self.root / f"{argv[0]}.out", "w")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM test cluster: {what}" + (f" ({', '.join(dead)} exited)" if dead else "")
                           + "\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")))

    def stop(self) -> None:
        # jobs first (their steps belong to slurmd), then the daemons, newest first
        self.cmd("scancel", "--user", getpass.getuser(), check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        self.procs.clear()
