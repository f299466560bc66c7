"""Checks that run once before any image build or cell (Snakemake's `onstart`), so that a
missing Docker, a stopped daemon, a missing NVIDIA runtime or a GPU-less host is one clear
message with the way out, not a hundred failed cells. Not run by `snakemake -n`.
"""

from __future__ import annotations

import json
import shutil
import subprocess

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
