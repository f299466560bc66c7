"""A real Docker engine: a local base image (debootstrap, no registry pull) and a wheel source.

Skipped where `docker info` fails, unless KVSTUDY_REQUIRE_DOCKER=1 (CI: .ci/run starts the
engine itself, so a missing engine is a failure there, not a skip).
"""

import functools
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

BASE_TAG = "kvstudy-test-base:bookworm"
# CI's CPU torch (requirements-cpu.lock) comes from a local wheel folder when there is one
WHEELS = Path(os.environ.get("KVSTUDY_TEST_WHEELS", "/opt/wheels"))


def docker(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, **kw)


def _engine_up() -> bool:
    try:
        return shutil.which("docker") is not None and docker("info", timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pytest_collection_modifyitems(config, items):
    if _engine_up():
        return
    if os.environ.get("KVSTUDY_REQUIRE_DOCKER") == "1":
        raise pytest.UsageError("KVSTUDY_REQUIRE_DOCKER=1 but no Docker engine answers (`docker info`)")
    skip = pytest.mark.skip(reason="no Docker engine (docker info failed); .ci/run starts one")
    for item in items:
        if "tests/docker/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def base_image(tmp_path_factory) -> str:
    """Debian bookworm (Python 3.11) from debootstrap + docker import: the BASE_IMAGE of the test builds."""
    if docker("image", "inspect", BASE_TAG).returncode == 0:
        return BASE_TAG
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap is needed to make the test base image (apt-get install debootstrap)")
    root = tmp_path_factory.mktemp("rootfs")
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), "http://deb.debian.org/debian"],
                   check=True, capture_output=True)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", BASE_TAG], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    shutil.rmtree(root, ignore_errors=True)
    return BASE_TAG


@pytest.fixture(scope="session")
def wheel_links():
    """PIP_FIND_LINKS for the CPU torch wheel: a loopback HTTP server over WHEELS, or PyTorch's index."""
    if not any(WHEELS.glob("torch-*+cpu-*.whl")):
        yield "https://download.pytorch.org/whl/cpu/torch/"
        return
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(WHEELS))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def docker_config(base: str, links: str, **extra_args) -> str:
    """config for the docker runner on the test base. The build runs on the host network (the
    test daemon has no bridge); PIP_TRUSTED_HOST lets pip through a TLS-intercepting proxy;
    the lock's hashes still decide what is installed."""
    engine = {"BASE_IMAGE": base, "LOCK": "requirements-cpu.lock", "PIP_FIND_LINKS": links,
              "PIP_TRUSTED_HOST": "pypi.org files.pythonhosted.org", **extra_args}
    lines = ["runner: docker", "images:", "  build_network: host", "  build_args:",
             "    engine: {" + ", ".join(f'{k}: "{v}"' for k, v in engine.items()) + "}",
             f'    vllm: {{BASE_IMAGE: "{base}", PIP_TRUSTED_HOST: "pypi.org files.pythonhosted.org"}}']
    return "\n".join(lines) + "\n"
