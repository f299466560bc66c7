"""While a CPU cell times, every other pipeline process tree on the host is stopped (SIGSTOP).

The timing lock (cputime.py) keeps two timed regions apart, but not a timed region and a
neighbouring cell's start-up (imports, model build, vLLM's engine processes): on a 2-vCPU VM
that start-up, on the other core, slowed the timed one through shared caches and memory
bandwidth (smoke CV up to 32%). With `cpu_timing: pause` the lock holder stops the others.

Who is stopped: the process trees of the registered roots. The launcher (workflow/lib/launch.py)
and `python -m workflow.lib.cores` write `<registry>/<pid>` (the pid's start time inside, so a
reused pid is never taken for a cell) before they exec the job; a dead or reused pid is stale and
its file removed. Never stopped: the holder's own tree (its root in KVSTUDY_CELL_ROOT: its vLLM
engine core is in it), its ancestors (Snakemake), the sidecar, and any tree of which a process
holds a file lock other than our own lock files (a stopped Inductor cache lock would hang the
holder's compile); such a tree is tried again at the next scan.

Who resumes: not the holder but a detached sidecar (`python -m frameworks.harness.pause`) it
starts after taking the lock. The sidecar stops the trees, says so on a pipe, then waits for the
holder to close the release pipe or to die (pidfd), and SIGCONTs everything it stopped. It holds a
copy of the timing lock's descriptor, so the lock passes to the next cell only after the resume:
a killed holder (SIGKILL, timeout) never leaves a stopped tree, nor two sidecars fighting.

Container cells (docker, apptainer with its own pid namespace) are neither registered nor stopped:
their processes are not children of any host-visible root; they time under the lock only.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import tempfile
import time
from pathlib import Path

DIR_NAME = ".cpu-cells"  # beside the timing lock
ROOT_ENV = "KVSTUDY_CELL_ROOT"
SCAN_S = 0.25  # a tree started (or a lock released) while the holder times is stopped this late


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a live pid, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def register(registry: Path, pid: int | None = None) -> None:
    pid = os.getpid() if pid is None else pid
    st = _stat(pid)
    if st is None:
        return
    registry.mkdir(parents=True, exist_ok=True)
    (registry / str(pid)).write_text(str(st[1]))


def unregister(registry: Path, pid: int) -> None:
    """A root's entry and its stopped-seconds file, removed when it ends (after its provenance)."""
    for f in (registry / str(pid), registry / f"{pid}.stopped"):
        f.unlink(missing_ok=True)


def roots(registry: Path) -> list[tuple[int, int]]:
    """Live registered roots (pid, start time); stale entries are removed."""
    out = []
    for f in registry.glob("[0-9]*"):
        if not f.name.isdigit():
            continue
        try:
            start = int(f.read_text() or -1)
        except (OSError, ValueError):
            continue
        st = _stat(int(f.name))
        if st is None or st[1] != start:
            for stale in (f, f.with_name(f.name + ".stopped")):
                stale.unlink(missing_ok=True)
            continue
        out.append((int(f.name), start))
    return out


def processes() -> dict[int, tuple[int, int]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                out[int(d)] = st
    return out


def tree(root: int, procs: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p in procs and p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def ancestors(pid: int, procs: dict[int, tuple[int, int]]) -> set[int]:
    out = set()
    while pid in procs and pid not in out and pid > 1:
        out.add(pid)
        pid = procs[pid][0]
    return out


def lock_holders(ours: set[int]) -> set[int]:
    """Pids that hold (not wait for) a file lock on a file whose inode is not one of ours."""
    out = set()
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if len(f) < 6 or f[1] == "->":
            continue
        try:
            out.add(int(f[4])) if int(f[5].split(":")[2]) not in ours else None
        except (ValueError, IndexError):
            continue
    return out


def our_inodes(dirs: list[Path]) -> set[int]:
    """The lock files of this pipeline itself: timing lock, cores, GPUs (`*.lock` in dirs) and
    every cell supervisor's temp-dir owner lock (lifeline.py), held by every cell for its life."""
    from frameworks.harness import lifeline

    out = set()
    files = list(Path(tempfile.gettempdir()).glob(f"{lifeline.TEMP_PREFIX}*/{lifeline.LOCK_NAME}"))
    for d in dirs:
        files += list(d.glob("*.lock")) if d.is_dir() else []
    for f in files:
        try:
            out.add(f.stat().st_ino)
        except OSError:
            pass
    return out


def sidecar(holder: int, own_root: int, registry: Path, lock_dirs: list[Path], ready_fd: int, release_fd: int) -> dict:
    """Stop the others, report on ready_fd, wait for release_fd's EOF or the holder's death, resume."""
    try:
        pidfd = os.pidfd_open(holder)
    except (AttributeError, OSError):
        pidfd = None
    stopped: dict[int, tuple[int, int]] = {}  # pid -> (start time, its root)
    t0 = time.monotonic()

    def scan() -> None:
        procs = processes()
        keep = tree(own_root, procs) | ancestors(holder, procs) | ancestors(os.getpid(), procs) | {holder}
        held = lock_holders(our_inodes(lock_dirs))  # new cells bring new owner locks
        for root, _ in roots(registry):
            members = tree(root, procs) - keep
            if not members or members & held:
                continue
            for pid in members - set(stopped):
                try:
                    os.kill(pid, signal.SIGSTOP)
                    stopped[pid] = (procs[pid][1], root)
                except (ProcessLookupError, PermissionError):  # ended; another user's
                    pass

    scan()
    settle(stopped)  # SIGSTOP lands asynchronously: the holder times only once all are stopped
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    waits = [release_fd] + ([pidfd] if pidfd is not None else [])
    while True:
        ready, _, _ = select.select(waits, [], [], SCAN_S)
        if release_fd in ready:  # a byte or EOF: a child the holder forked may keep the pipe open
            break
        if (pidfd is not None and pidfd in ready) or _stat(holder) is None:
            break
        scan()
    held_s = time.monotonic() - t0
    roots_stopped = set()
    for pid, (start, root) in stopped.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        roots_stopped.add(root)
    for root in roots_stopped:  # what each stopped cell records in its provenance (stopped_s)
        f = registry / f"{root}.stopped"
        try:
            f.write_text(f"{float(f.read_text() or 0) + held_s:.3f}" if f.exists() else f"{held_s:.3f}")
        except (OSError, ValueError):
            pass
    return {"paused_others_s": round(held_s, 3), "paused_processes": len(stopped), "paused_cells": len(roots_stopped)}


def settle(pids, timeout_s: float = 2.0) -> None:
    end = time.monotonic() + timeout_s
    for pid in pids:
        while time.monotonic() < end:
            try:
                text = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                break
            if text[text.rindex(")") + 2] in "TtZX":
                break
            time.sleep(0.002)


def stopped_s(registry: Path, root: int) -> float:
    try:
        return float((registry / f"{root}.stopped").read_text())
    except (OSError, ValueError):
        return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvstudy-pause")
    ap.add_argument("--holder", type=int, required=True)
    ap.add_argument("--own-root", type=int, required=True)
    ap.add_argument("--registry", type=Path, required=True)
    ap.add_argument("--lock-dir", type=Path, action="append", default=[])
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--release-fd", type=int, required=True)
    ap.add_argument("--lock-fd", type=int, help="the timing lock: held here until everything is resumed")
    a = ap.parse_args(argv)
    try:  # off the holder's cores (inherited): the others are stopped, theirs are idle
        others = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
        if others:
            os.sched_setaffinity(0, others)
    except (AttributeError, OSError):
        pass
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # resume first, whatever ends us
        signal.signal(s, lambda *_: None)
    stats = sidecar(a.holder, a.own_root, a.registry, a.lock_dir, a.ready_fd, a.release_fd)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
