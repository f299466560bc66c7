"""One timed CPU region at a time on a host: the lock CPU cells hold while they measure.

On a CPU every core a cell does not time is free for the rest of the pipeline, so CPU cells run
side by side as Snakemake jobs (each on `cell_threads` threads), and only what they measure
(warm-up and repetitions, `loop.measure`) takes this lock: while one cell times, the others
import, build their model or write results on the other cores, and no two timed regions meet.

The lock is a file whose path the launcher passes in KVSTUDY_CPU_LOCK (under results/, so docker
and apptainer cells see the same file); an flock, so a killed cell releases it with its process.
Without the variable (a cell run by hand, GPU cells) nothing is locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time

ENV = "KVSTUDY_CPU_LOCK"
FILE_NAME = ".cpu-timing.lock"


@contextlib.contextmanager
def exclusive(device: str):
    """Hold the host's CPU timing lock for the block (device cpu with KVSTUDY_CPU_LOCK set);
    yields the seconds spent waiting for it."""
    path = os.environ.get(ENV)
    if device != "cpu" or not path:
        yield 0.0
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        t0 = time.perf_counter()
        fcntl.flock(fd, fcntl.LOCK_EX)
        waited = time.perf_counter() - t0
        if waited > 1.0:
            print(f"cputime: waited {waited:.1f} s for another cell's timed region ({path})", file=sys.stderr)
        yield waited
    finally:
        os.close(fd)  # closing the only descriptor releases the flock
