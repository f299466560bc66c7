"""Preflight in a real run: a clear error before any image or cell, and `snakemake -n` unaffected."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CELL = "results/cells/batch/hf/llama-3.1-8b/bs8_in2048_out256_kv1_sdpa.json"


def run(repo, *args, env=None):
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *args], cwd=repo, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def no_docker_path(tmp_path) -> str:
    """This PATH minus docker: every other executable, linked into one folder."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for exe in (Path(d).iterdir() if Path(d).is_dir() else []):
            target = bindir / exe.name
            if not exe.name.startswith("docker") and not target.exists() and os.access(exe, os.X_OK):
                target.symlink_to(exe.resolve())
    return str(bindir)


def assert_stopped_before_work(p, repo, message, way_out):
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "kvstudy preflight" in out and message in out and way_out in out, out[-3000:]
    assert not (repo / "results" / "cells").exists() and not (repo / "results" / "images").exists()


def test_gpu_preset_on_a_host_without_gpu(repo_copy):
    p = run(repo_copy, "--config", "preset=paper", "--", CELL, env={"CUDA_VISIBLE_DEVICES": ""})
    assert_stopped_before_work(p, repo_copy, "this host has no visible GPU", "preset=smoke")


def test_docker_runner_without_docker(repo_copy, tmp_path):
    p = run(repo_copy, "--config", "preset=smoke", "runner=docker", env={"PATH": no_docker_path(tmp_path)})
    assert_stopped_before_work(p, repo_copy, "`docker` command is not installed", "runner=local")


@pytest.mark.skipif(not shutil.which("docker"), reason="needs the docker client (no daemon)")
def test_docker_runner_with_daemon_down(repo_copy, tmp_path):
    p = run(repo_copy, "--config", "preset=smoke", "runner=docker",
            env={"DOCKER_HOST": f"unix://{tmp_path}/no-such-docker.sock"})
    assert_stopped_before_work(p, repo_copy, "Docker daemon does not answer", "runner=local")


def test_dry_run_of_gpu_preset_with_docker_needs_neither(repo_copy, tmp_path):
    p = run(repo_copy, "-n", "--config", "preset=paper", "runner=docker",
            env={"PATH": no_docker_path(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "results/images/engine.iid" in p.stdout and "results/images/vllm.iid" in p.stdout


@pytest.mark.skipif(not shutil.which("docker") or subprocess.run(["docker", "info"], capture_output=True).returncode,
                    reason="needs a running Docker engine")
def test_gpu_preset_in_docker_without_nvidia_runtime(repo_copy):
    p = run(repo_copy, "--config", "preset=paper", "runner=docker", "--", CELL, env={"CUDA_VISIBLE_DEVICES": ""})
    if "nvidia" in subprocess.run(["docker", "info"], capture_output=True, text=True).stdout:
        pytest.skip("this Docker has an NVIDIA runtime")
    assert_stopped_before_work(p, repo_copy, "Docker has no NVIDIA runtime", "preset=smoke")
