"""benchmarks/gpu_reference.sh on CPU (KVSTUDY_ALLOW_CPU=1, one smoke cell): a call stopped by its
deadline keeps what finished and says so (exit 3); the next call, from its unpacked tar, finishes
(exit 0) and its one tar holds cells, tables, figures and the run's record."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ONE_CELL = "experiments=[kv_budget] frameworks=[hf]"  # the smoke preset's single hf kv_budget cell


def call(repo: Path, out: Path, deadline_s: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "KVSTUDY_ALLOW_CPU": "1",
           "PRESET": "smoke", "EXTRA_CONFIG": ONE_CELL, "DEADLINE_S": str(deadline_s), "OUT": str(out)}
    return subprocess.run(["bash", "benchmarks/gpu_reference.sh"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=600)


def test_deadline_then_resume(repo_copy, tmp_path):
    p = call(repo_copy, tmp_path / "out1", deadline_s=1)
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-2000:]
    assert "stopped_by_deadline" in p.stdout
    (tar1,) = (tmp_path / "out1").glob("*.tar.gz")
    # as the lead does between calls: a fresh copy, the tar unpacked into results/
    repo2 = repo_copy.parent / "repo2"
    subprocess.run(["cp", "-r", str(repo_copy), str(repo2)], check=True)
    subprocess.run(["rm", "-rf", str(repo2 / "results/cells"), str(repo2 / "results/run"), str(repo2 / "logs"),
                    str(repo2 / ".snakemake")], check=True)
    with tarfile.open(tar1) as t:
        t.extractall(repo2 / "results", filter="data")
    p = call(repo2, tmp_path / "out2", deadline_s=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    (tar2,) = (tmp_path / "out2").glob("*.tar.gz")
    names = tarfile.open(tar2).getnames()
    assert any(n.startswith("./cells/kv_budget/hf/") for n in names)
    assert "./tables/kv_budget.csv" in names and "./figures/metrics_vs_kv_budget.png" in names
    assert {"./run/call1.json", "./run/call2.json", "./run/command.txt", "./run/time_model.txt"} <= set(names)
    rec = json.loads((repo2 / "results/run/call2.json").read_text())
    assert rec["state"] == "complete" and rec["cells_after"] == 1


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM: the cell would run")
def test_vllm_venv_none_records_vllm_cells_unsupported(repo_copy):
    """What gpu_reference.sh sets on the H200 machine (no vLLM there): vLLM cells run in the
    workflow's own Python, no venv is planned, and a Python without vLLM gives a result that says so."""
    cell = "results/cells/kv_budget/vllm/tiny-llama-3.1/bs4_in256_out64_kv1_flash.json"
    from tests.conftest import snakemake

    p = snakemake(repo_copy, "--cores", "1", "--config", "preset=smoke", "runner=local", "vllm_venv=none", "--", cell)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "rule vllm_venv" not in log.lower() and "rule run_cell" in log.lower()  # no venv job, the cell ran
    rec = json.loads((repo_copy / cell).read_text())
    assert rec["status"] == "unsupported" and "vLLM is not installed in this environment" in rec["message"]
