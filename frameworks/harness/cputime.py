"""One timed CPU region at a time on a host: the lock CPU cells hold while they measure.

On a CPU every core a cell does not time is free for the rest of the pipeline, so CPU cells run
side by side as Snakemake jobs (each on `cell_threads` threads), and only what they measure
(warm-up and repetitions, `loop.measure`) takes this lock: while one cell times, the others
import, build their model or write results on the other cores, and no two timed regions meet.

The lock is a file whose path the launcher passes in KVSTUDY_CPU_LOCK (under results/, so docker
and apptainer cells see the same file); an flock, so a killed cell releases it with its process.
Without the variable (a cell run by hand, GPU cells) nothing is locked.

KVSTUDY_CPU_TIMING=pause (config `cpu_timing`, local runner): the holder also has every other
registered pipeline process tree stopped while it times (pause.py); `lock`: the lock only.
What the last timed region did is in LAST, for the cell's provenance.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from frameworks.harness import pause

ENV = "KVSTUDY_CPU_LOCK"
MODE_ENV = "KVSTUDY_CPU_TIMING"
MODES = ("lock", "pause")
FILE_NAME = ".cpu-timing.lock"
READY_S = 30  # the sidecar's first scan of /proc; past it, time with the lock only
LAST: dict = {}  # mode, waited_s, paused_others_s, ... of this process's last timed region


def provenance() -> dict | None:
    """The cell's CPU timing: mode, seconds waited for the lock, seconds it kept others stopped
    (paused_others_s) and seconds its own tree was stopped by other cells (stopped_s)."""
    path = os.environ.get(ENV)
    if not LAST or not path:
        return None
    root = os.environ.get(pause.ROOT_ENV)
    return {**LAST, "stopped_s": round(pause.stopped_s(registry(path), int(root)), 3) if root else None}


def registry(lock_path: str) -> Path:
    return Path(lock_path).parent / pause.DIR_NAME


def _start_sidecar(lock_path: str, lock_fd: int) -> tuple[subprocess.Popen, int] | None:
    """The detached process that stops the others and resumes them even if we die (pause.py)."""
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    lock_dirs = [Path(lock_path).parent, Path(os.environ.get("KVSTUDY_CPU_LOCK_DIR") or "/tmp/kvstudy-cpu-locks")]
    own_root = os.environ.get(pause.ROOT_ENV) or str(os.getpid())
    argv = [sys.executable, "-m", "frameworks.harness.pause", "--holder", str(os.getpid()), "--own-root", own_root,
            "--registry", str(registry(lock_path)), "--ready-fd", str(ready_w), "--release-fd", str(release_r),
            "--lock-fd", str(lock_fd)] + [a for d in lock_dirs for a in ("--lock-dir", str(d))]
    env = dict(os.environ)  # importable from any working directory
    top = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (top, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(argv, pass_fds=(ready_w, release_r, lock_fd), start_new_session=True,
                                stdout=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(ready_w)
        os.close(release_r)
    ready, _, _ = select.select([ready_r], [], [], READY_S)
    ok = bool(ready) and os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    if not ok:
        print("cputime: the pause sidecar did not start: timing with the lock only", file=sys.stderr)
        os.close(release_w)
        proc.kill()
        proc.wait()
        return None
    return proc, release_w


@contextlib.contextmanager
def exclusive(device: str):
    """Hold the host's CPU timing lock for the block (device cpu with KVSTUDY_CPU_LOCK set);
    yields the seconds spent waiting for it. Mode pause: the others are stopped meanwhile."""
    path = os.environ.get(ENV)
    if device != "cpu" or not path:
        yield 0.0
        return
    mode = os.environ.get(MODE_ENV) or "lock"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: one of {MODES}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    side = None
    try:
        t0 = time.perf_counter()
        fcntl.flock(fd, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        if waited > 1.0:
            print(f"cputime: waited {waited:.1f} s for another cell's timed region ({path})", file=sys.stderr)
        LAST.clear()
        LAST.update(mode=mode, waited_s=round(waited, 3))
        if mode == "pause":
            side = _start_sidecar(path, fd)
        yield waited
    finally:
        if side is not None:  # EOF on the release pipe: the sidecar resumes everyone, then lets the lock go
            proc, release_w = side
            os.write(release_w, b"0")
            os.close(release_w)
            try:
                out, _ = proc.communicate(timeout=60)
                LAST.update(json.loads(out.strip().splitlines()[-1]))
            except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
                print(f"cputime: the pause sidecar gave no account ({e})", file=sys.stderr)
        os.close(fd)  # the lock is free once the sidecar's copy is closed too
