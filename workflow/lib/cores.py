"""Cores of its own for every CPU cell: which cores this job may use, and an exclusive claim on some.

Snakemake's `threads` only counts: two cells of one thread each may run at once, but nothing
keeps either on one core, and a cell whose processes use more than its share (vLLM CPU's engine,
start-up processes, inter-op pools) slows the other one's timed region even with the timing lock
(frameworks/harness/cputime.py). Here, as for GPUs (gpus.py), every core is a lock file under a
host-wide folder; a cell takes `n` free ones with `flock`, and the launcher pins the cell's
process tree to them (sched_setaffinity before anything is imported; children inherit it).
The kernel drops a flock when its holder dies, so a killed cell never leaves a core taken.

The launcher (launch.py) pins every CPU cell; `python -m workflow.lib.cores --cpus N -- CMD` runs
any other CPU job (the trainer) the same way, registered as a tree a timing cell may stop.

A claim of several cores is taken under one short host-wide lock (`alloc.lock`), so two cells
never each hold half of what both need and wait for the other.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from workflow.lib import gpus

LOCK_DIR = Path(os.environ.get("KVSTUDY_CPU_LOCK_DIR") or "/tmp/kvstudy-cpu-locks")
ENV = "KVSTUDY_CPU_CORES"  # the cores a cell was given ("0,1"): the worker's threads, vLLM's binding, provenance


@dataclass(frozen=True)
class Claim:
    cores: tuple[int, ...]
    fds: tuple[int, ...] = field(default=())  # the claim lasts as long as these (or a child's copies) are open

    def release(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


def discover(env: dict | None = None) -> list[int]:
    """The cores this job may use: KVSTUDY_CPUS (a list such as "0-3,6"; tests), else this
    process's affinity (a scheduler, taskset or a container's cpuset already narrowed it)."""
    env = os.environ if env is None else env
    if env.get("KVSTUDY_CPUS"):
        return parse(env["KVSTUDY_CPUS"])
    if not hasattr(os, "sched_getaffinity"):  # macOS: no affinity to read (nor to set: see pin)
        return list(range(os.cpu_count() or 1))
    return sorted(os.sched_getaffinity(0))


def parse(text: str) -> list[int]:
    """ "0-2,5" -> [0, 1, 2, 5] (the kernel's cpulist format, as taskset and vLLM write it)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return sorted(set(out))


def format_list(cores) -> str:
    return ",".join(str(c) for c in sorted(cores))


def _open_dir(lock_dir: Path) -> None:
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:  # shared by every user of the host, like /tmp itself
        os.chmod(lock_dir, 0o1777)
    except OSError:
        pass


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def try_claim(cores: list[int], n: int, lock_dir: Path = LOCK_DIR) -> Claim | None:
    """Claim `n` free cores of `cores` (lowest first), or None if fewer are free right now."""
    if not 1 <= n <= len(cores):
        raise ValueError(f"cannot claim {n} of the cores {format_list(cores)}")
    _open_dir(lock_dir)
    guard = os.open(lock_dir / "alloc.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # held for microseconds: only while picking
        got: list[tuple[int, int]] = []
        for core in cores:
            fd = _try_lock(lock_dir / f"cpu-{core}.lock")
            if fd is not None:
                got.append((core, fd))
                if len(got) == n:
                    break
        if len(got) < n:
            for _, fd in got:
                os.close(fd)
            return None
    finally:
        os.close(guard)
    for _, fd in got:
        os.set_inheritable(fd, True)  # the cell's processes keep the claim alive if the launcher dies first
    return Claim(tuple(c for c, _ in got), tuple(fd for _, fd in got))


def claim(cores: list[int], n: int, lock_dir: Path = LOCK_DIR, timeout_s: float = 24 * 3600,
          poll_s: float = 0.5, on_wait=None) -> Claim:
    """Block until `n` of `cores` are free (cells of another run on this host queue, never share).
    More cores than the job may use: all of them (a cell_threads: all preset)."""
    n = max(1, min(n, len(cores)))
    return gpus.wait_for(lambda: try_claim(cores, n, lock_dir), timeout_s, poll_s, on_wait,
                         f"no {n} free cores among {format_list(cores)}")


def pin(n: int, env: dict[str, str], log=lambda msg: None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`n` cores of this job's own: claimed host-wide, this process pinned to them (so is everything
    it starts afterwards), and named in env[ENV]. Under SLURM the job's cgroup already holds its
    cores: no claim. Returns the cores and the claim's lock fds (for a child to inherit); on a
    system without sched_setaffinity (macOS) nothing, and the job runs unpinned."""
    if not hasattr(os, "sched_setaffinity"):
        log("this system cannot pin a process to cores: running unpinned")
        return (), ()
    visible = discover(env)
    fds: tuple[int, ...] = ()
    if env.get("SLURM_JOB_ID"):
        cores = tuple(visible[:n])
    else:
        got = claim(visible, n, on_wait=lambda: log(f"fewer than {n} of the cores {format_list(visible)} free: waiting"))
        cores, fds = got.cores, got.fds  # inheritable: open in the job until its last process ends
    os.sched_setaffinity(0, cores)
    env[ENV] = format_list(cores)
    return cores, fds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: python -m workflow.lib.cores --cpus N [--gpus G] -- CMD ...")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(prog="kvstudy-cores")
    ap.add_argument("--cpus", type=int, required=True, help="cores to claim and pin CMD to")
    ap.add_argument("--gpus", type=int, default=0, help="GPU jobs (G > 0) are not pinned: CMD runs as is")
    args = ap.parse_args(argv[:cut])
    cmd = argv[cut + 1:]
    env = dict(os.environ)
    if not args.gpus and args.cpus:
        cores, _ = pin(args.cpus, env, lambda m: print(f"kvstudy-cores: {m}", file=sys.stderr, flush=True))
        if cores:
            print(f"kvstudy-cores: on cores {env[ENV]}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        # a CPU job like any cell: stopped while a cell times with cpu_timing: pause (pause.py)
        from frameworks.harness import cputime, pause

        pause.register(cputime.registry(str(Path("results") / cputime.FILE_NAME)))
    os.execvpe(cmd[0], cmd, env)  # the lock fds stay open in CMD


if __name__ == "__main__":
    sys.exit(main())
