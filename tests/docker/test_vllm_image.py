"""The vLLM image, CPU variant (LOCK=requirements-cpu.lock: vllm-cpu 0.32.0, torch 2.13.0+cpu):
its lock installs (--require-hashes) and one real vLLM cell runs in it, as the docker runner
runs cells (non-root, --network none).

A separate CI job (`.ci/run vllm-image` = `make test-vllm-image`: 6 min 20 s on a fresh machine's
2 shared cores with the Debian base already made, ~7 min with it; the image is 4.1 GB: the vLLM
CPU stack downloads), not part of `make test`: set KVSTUDY_TEST_VLLM_IMAGE=1. The GPU
variant (the official vllm wheel) needs a GPU host to mean anything; it is not built here.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import copy_repo
from tests.docker.conftest import docker, docker_config

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("KVSTUDY_TEST_VLLM_IMAGE") != "1",
                                                   reason="vLLM image build: set KVSTUDY_TEST_VLLM_IMAGE=1")]


def test_vllm_cpu_image_builds_from_its_lock_and_runs_a_cell(tmp_path, base_image, wheel_links):
    repo = copy_repo(tmp_path / "repo")
    config = docker_config(base_image, wheel_links).replace(
        "    vllm: {", f'    vllm: {{LOCK: "requirements-cpu.lock", PIP_FIND_LINKS: "{wheel_links}", ')
    (repo / "docker.yaml").write_text(config)
    p = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "docker.yaml", "--config",
                        "preset=smoke", "--", "results/images/vllm.iid"], cwd=repo, capture_output=True, text=True,
                       timeout=3000)
    assert p.returncode == 0, p.stderr[-3000:] + (repo / "logs/images/vllm.log").read_text()[-3000:]
    iid = (repo / "results/images/vllm.iid").read_text().strip()
    out = repo / "results"
    out.chmod(0o777)  # the image's user writes the result
    spec = {"experiment": "t", "framework": "vllm", "model": "tiny-llama-3.2-1b", "batch_size": 2, "prompt_len": 32,
            "gen_len": 4, "prefill": "flash", "device": "cpu", "dtype": "float32", "repetitions": 1, "warmup": 0,
            "timeout_s": 600}
    run = docker("run", "--rm", "--network", "none", "-v", f"{out}:/work/results", iid, "--spec", json.dumps(spec),
                 "--out", "/work/results/cell.json", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads((out / "cell.json").read_text())
    assert r["status"] == "ok", r["message"]
    assert [s["out_tokens"] for s in r["samples"]] == [4, 4]
    assert r["extra"]["vllm_package"] == {"package": "vllm-cpu", "version": "0.32.0"}
