"""Checks that run once before any image build or cell (Snakemake's `onstart`), so that a
missing Docker, a stopped daemon, a missing NVIDIA runtime, a GPU-less host, a full disk or a
corrupt cell file is one clear message with the way out, not a hundred failed cells (or a table
deleted by its failed job). Not run by `snakemake -n`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from workflow.lib import gpus as gpulib


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return subprocess.CompletedProcess(argv, 127, "", str(e))


def problems(runner: str, needs_gpu: bool, local_host: bool = True, which=shutil.which, run=_run,
             discover=gpulib.discover) -> list[str]:
    """What stops this run, each with the way out; empty when all is well.

    local_host: jobs run on this machine (False under a cluster executor: its login node
    needs no GPU, and the jobs' own nodes are checked by the launcher).
    """
    out: list[str] = []  # every problem at once, so one fix-and-retry round suffices
    if runner == "docker":
        info = run(["docker", "info", "--format", "{{json .}}"]) if which("docker") else None
        if info is None:
            out.append("runner=docker but the `docker` command is not installed: install Docker Engine "
                       "(https://docs.docker.com/engine/install/), or run without it: --config runner=local")
        elif info.returncode != 0:
            why = ((info.stderr or info.stdout).strip().splitlines() or ["no output"])[-1]
            out.append("runner=docker but the Docker daemon does not answer (`docker info`: "
                       f"{why}); start it "
                       "(`sudo systemctl start docker`), check that you may use it (the `docker` group), "
                       "or run without it: --config runner=local")
        elif needs_gpu and local_host and not _has_nvidia_runtime(info.stdout, which):
            out.append("runner=docker and the preset needs a GPU, but Docker has no NVIDIA runtime "
                       "(`docker info` lists no `nvidia` runtime or CDI device): install the NVIDIA Container "
                       "Toolkit and run `sudo nvidia-ctk runtime configure --runtime=docker`, or use a CPU preset "
                       "(--config preset=smoke), or --config runner=local")
    elif runner == "apptainer" and not which("apptainer"):
        out.append("runner=apptainer but the `apptainer` command is not installed: install Apptainer "
                   "(https://apptainer.org/docs/admin/main/installation.html), or --config runner=local")
    if needs_gpu and local_host and not discover():
        out.append("the preset runs on CUDA but this host has no visible GPU (nvidia-smi lists none, "
                   "or CUDA_VISIBLE_DEVICES hides them): run on a GPU host, or pick a CPU preset: "
                   "--config preset=smoke")
    return out


def _has_nvidia_runtime(info_json: str, which) -> bool:
    # `--gpus` works through a registered `nvidia` runtime, the toolkit's prestart hook, or CDI
    if which("nvidia-container-runtime-hook") or which("nvidia-ctk"):
        return True
    try:
        info = json.loads(info_json)
    except json.JSONDecodeError:
        return False
    return "nvidia" in (info.get("Runtimes") or {}) or "nvidia.com/gpu" in json.dumps(info.get("DiscoveredDevices") or [])


def unreadable_cells(paths) -> list[str]:
    """Cell files that exist but are not valid results: named before a table reads them (a failed
    table job would delete the table built from the good ones)."""
    from frameworks.harness import result as cell_result

    out = []
    for p in paths:
        try:
            cell_result.load(p)
        except cell_result.ResultError as e:
            out.append(str(e))
    return out


# Measured on the reference results (results/reference/): 25-26 bytes per generated token
# (each token's timestamp) plus a few KB of spec, summary and provenance; rounded up.
RESULT_BYTES_PER_TOKEN = 32
RESULT_BASE_BYTES = 16_384
# a cell's scratch space besides its record: torch's and Triton's compile caches
TEMP_RESERVE_BYTES = 256 * 2**20


def expected_result_bytes(spec) -> int:
    return RESULT_BASE_BYTES + RESULT_BYTES_PER_TOKEN * spec.n_requests * spec.gen_len * spec.repetitions


def disk_problems(specs, results_dir: Path, temp_dir: Path | None, usage=shutil.disk_usage) -> list[str]:
    """Free space for the pending cells: every result in results_dir, one cell's record (written
    first in its temp dir) plus scratch in temp_dir (None: the runner's container has its own)."""
    sizes = [expected_result_bytes(s) for s in specs]
    if not sizes:
        return []
    needs = {results_dir: sum(sizes)}
    if temp_dir is not None:
        needs[temp_dir] = max(sizes) + TEMP_RESERVE_BYTES
    by_fs: dict[int, list] = {}  # folders on one file system share its free space
    for folder, need in needs.items():
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        entry = by_fs.setdefault(existing.stat().st_dev, [existing, 0, []])
        entry[1] += need
        entry[2].append(str(folder))
    out = []
    for existing, need, names in by_fs.values():
        free = usage(existing).free
        if free < need:
            out.append(f"not enough free disk space: {' and '.join(names)} have {free / 1e6:.0f} MB free, the "
                       f"{len(sizes)} pending cell(s) need about {need / 1e6:.0f} MB (results, temp files); free "
                       "space there, or set TMPDIR to a folder with room")
    return out
