"""One GPU per cell: which GPUs this host has, and an exclusive claim on one of them.

Snakemake's `gpu` resource only counts: it lets G cells run at once but does not say which
GPU each gets. Here every GPU is a lock file under a host-wide folder; a cell takes the first
one it can `flock`. The kernel drops a flock when its holder dies, so a crashed or killed
cell never leaves a GPU taken (no stale-lock cleanup, no pid files). The lock folder is
host-local on purpose (/tmp): two Snakemake runs from different checkouts on one host share it
and still never put two cells on one GPU.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_DIR = Path(os.environ.get("KVSTUDY_GPU_LOCK_DIR") or "/tmp/kvstudy-gpu-locks")


class NoGPU(RuntimeError):
    """A GPU cell on a host where no GPU can be found."""


@dataclass(frozen=True)
class Claim:
    gpu: str  # what CUDA_VISIBLE_DEVICES / `docker run --gpus device=` get: an index or a UUID
    fd: int  # the open lock file; the claim lasts as long as this fd (or a child's copy) is open

    def release(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def discover(env: dict | None = None) -> list[str]:
    """The GPUs this job may use, most specific source first.

    KVSTUDY_GPUS (comma list; tests and unusual hosts), then CUDA_VISIBLE_DEVICES (a scheduler
    or the user already narrowed the set), then `nvidia-smi` (UUIDs: stable across reboots and
    recorded as such in each result's provenance).
    """
    env = os.environ if env is None else env
    for key in ("KVSTUDY_GPUS", "CUDA_VISIBLE_DEVICES"):
        if env.get(key) is not None:
            ids = [g.strip() for g in env[key].split(",") if g.strip()]
            if ids and ids != ["-1"]:
                return ids
            if key == "CUDA_VISIBLE_DEVICES":
                return []  # explicitly hidden
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def _lock_path(lock_dir: Path, gpu: str) -> Path:
    return lock_dir / f"gpu-{gpu.replace('/', '_')}.lock"


def try_claim(gpus: list[str], lock_dir: Path = LOCK_DIR) -> Claim | None:
    """Claim the first free GPU of `gpus`, or None if all are taken right now."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:  # shared by every user of the host, like /tmp itself
        os.chmod(lock_dir, 0o1777)
    except OSError:
        pass
    for gpu in gpus:
        path = _lock_path(lock_dir, gpu)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                continue
            raise
        os.set_inheritable(fd, True)  # children keep the claim alive if this process dies first
        return Claim(gpu, fd)
    return None


def claim(gpus: list[str], lock_dir: Path = LOCK_DIR, timeout_s: float = 24 * 3600,
          poll_s: float = 1.0, on_wait=None) -> Claim:
    """Block until one of `gpus` is free (more cells than GPUs queue here, never share)."""
    if not gpus:
        raise NoGPU("this cell needs a GPU, but none was found (nvidia-smi lists none and neither "
                    "CUDA_VISIBLE_DEVICES nor KVSTUDY_GPUS names one); run a CPU preset (preset=smoke) "
                    "or run on a GPU host")
    return wait_for(lambda: try_claim(gpus, lock_dir), timeout_s, poll_s, on_wait, f"no free GPU among {gpus}")


def wait_for(try_once, timeout_s: float, poll_s: float, on_wait, what: str):
    """Poll try_once() until it returns a claim; on_wait() once before the first wait;
    TimeoutError "<what> after <timeout_s> s" past the deadline (the GPU and the core allocators)."""
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        got = try_once()
        if got:
            return got
        if not waited and on_wait:
            on_wait()
        waited = True
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout_s:g} s")
        time.sleep(poll_s)
