"""The vLLM image: its lock installs (--require-hashes) and `import vllm` works in it.

A separate CI job (`make test-vllm-image`, ~5 min and ~11 GB: vLLM, CUDA torch and the nvidia
wheels), not part of `make test`: set KVSTUDY_TEST_VLLM_IMAGE=1. No model runs here (no GPU).
"""

import os
import subprocess
import sys

import pytest

from tests.conftest import copy_repo
from tests.docker.conftest import docker, docker_config

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("KVSTUDY_TEST_VLLM_IMAGE") != "1",
                                                   reason="vLLM image build: set KVSTUDY_TEST_VLLM_IMAGE=1")]


def test_vllm_image_builds_from_its_lock_and_imports_vllm(tmp_path, base_image, wheel_links):
    repo = copy_repo(tmp_path / "repo")
    (repo / "docker.yaml").write_text(docker_config(base_image, wheel_links))
    if not (repo / "frameworks/vllm").is_dir():  # the adapter lands with its own issue
        (repo / "frameworks/vllm").mkdir()
        (repo / "frameworks/vllm/__init__.py").write_text("")
    p = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "docker.yaml", "--config",
                        "preset=smoke", "--", "results/images/vllm.iid"], cwd=repo, capture_output=True, text=True,
                       timeout=3000)
    assert p.returncode == 0, p.stderr[-3000:] + (repo / "logs/images/vllm.log").read_text()[-3000:]
    iid = (repo / "results/images/vllm.iid").read_text().strip()
    run = docker("run", "--rm", "--network", "none", "--entrypoint", "python", iid, "-c",
                 "import vllm, torch, frameworks.vllm; print(vllm.__version__, torch.__version__)", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[:2] == ["0.11.0", "2.8.0+cu128"], run.stdout
