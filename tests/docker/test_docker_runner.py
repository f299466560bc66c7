"""The docker runner for real: image built from containers/ on a local base, a smoke cell in it
through Snakemake, provenance, file ownership, no-op rerun, rebuild scope, secrets, cleanup."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from frameworks.harness import result
from tests.conftest import copy_repo, snakemake
from tests.docker.conftest import docker, docker_config
from workflow.lib import launch

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # make test-e2e
SECRET = "hf_kvstudy_canary_" + hashlib.sha1(str(os.getpid()).encode()).hexdigest()[:12]
# the engine frameworks: the vLLM image has its CPU variant and its own job (test_vllm_image.py)
RUN = ["--cores", "2", "--configfile", "docker.yaml", "--config", "preset=smoke", "experiments=[kv_budget,model_size]",
       "frameworks=[hf,h2o,infinigen]"]
CELL = "results/cells/kv_budget/hf/tiny-llama-3.1/bs4_in256_out64_kv1_sdpa.json"


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def mtimes(repo):
    return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in (repo / "results").rglob("*") if p.is_file()}


def jobs(dry_run_stdout: str) -> dict[str, int]:
    import re

    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", dry_run_stdout, re.M) if m[1] != "total"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, base_image, wheel_links):
    repo = copy_repo(tmp_path_factory.mktemp("docker") / "repo")
    (repo / "docker.yaml").write_text(docker_config(base_image, wheel_links))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "t"]):
        git(repo, *args)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "snakemake", *RUN], cwd=repo, capture_output=True, text=True,
                       timeout=1500, env={**os.environ, "HF_TOKEN": SECRET})
    assert p.returncode == 0, p.stderr[-5000:]
    print(f"docker smoke run (images + 4 cells): {time.time() - t0:.0f} s")
    return repo


def test_cell_ran_in_the_image_as_the_caller(run):
    r = result.load(run / CELL)
    assert r["status"] == "ok", r["message"]
    iid = (run / "results/images/hf.iid").read_text().strip()
    prov = r["provenance"]
    assert prov["image_id"] == iid and prov["command"][0] == "/opt/venv/bin/python"
    assert prov["git"] == {"commit": git(run, "rev-parse", "HEAD"), "dirty": False}
    assert prov["versions"]["transformers"] == "5.17.0"
    # files belong to the caller although the image's own user is 10001
    inspect = json.loads(docker("image", "inspect", iid).stdout)[0]["Config"]
    assert inspect["User"] == "10001:10001"
    for f in (run / "results/cells").rglob("*.json"):
        assert (f.stat().st_uid, f.stat().st_gid) == (os.getuid(), os.getgid())
    labels = inspect["Labels"]
    assert labels["org.opencontainers.image.revision"] == git(run, "rev-parse", "HEAD")
    assert labels["io.kvstudy.framework"] == "hf" and labels["org.opencontainers.image.version"]
    assert inspect["Env"] and "HF_HUB_OFFLINE=1" in inspect["Env"]


LAUNCHER = r"""
import os, subprocess, sys, sysconfig, tempfile
d = tempfile.mkdtemp()
open(os.path.join(d, "m.c"), "w").write(
    '#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "m"};\n'
    "PyMODINIT_FUNC PyInit_m(void) { return PyModule_Create(&m); }\n")
scheme = sysconfig.get_default_scheme()
scheme = "posix_prefix" if scheme == "posix_local" else scheme  # as triton/runtime/build.py
subprocess.check_call(["gcc", os.path.join(d, "m.c"), "-O3", "-shared", "-fPIC", "-o", os.path.join(d, "m.so"),
                       "-I" + sysconfig.get_paths(scheme=scheme)["include"]])
sys.path.insert(0, d)
import m
print("ok", os.environ["TRITON_HOME"])
"""


def test_infinigen_image_can_build_triton_launchers(run):
    """On CUDA the InfiniGen gather is a Triton kernel, and Triton compiles its launcher with the
    system C compiler against Python.h at first use: the image has both, as the caller's user."""
    iid = (run / "results/images/infinigen.iid").read_text().strip()
    p = docker("run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}", "--entrypoint", "python",
               iid, "-c", LAUNCHER)
    assert p.returncode == 0 and p.stdout.startswith("ok /tmp/triton-home"), (p.stdout, p.stderr[-3000:])


def test_second_run_rebuilds_and_reruns_nothing(run):
    before = mtimes(run)
    p = snakemake(run, *RUN)
    assert p.returncode == 0 and "Nothing to be done" in p.stdout + p.stderr, p.stderr[-3000:]
    assert mtimes(run) == before


def test_an_image_rebuilds_only_for_its_own_inputs(run):
    # building vllm needs no engine build; hf's Dockerfile changing rebuilds hf (not engine) and its cells
    assert jobs(snakemake(run, "-n", *RUN, "--", "results/images/vllm.iid").stdout) == {"image": 1}
    dockerfile = run / "containers/hf/Dockerfile"
    saved = dockerfile.read_text()
    try:
        dockerfile.write_text(saved + "# touched\n")
        assert jobs(snakemake(run, "-n", *RUN).stdout) == {"image": 1, "run_cell": 4, "table": 2, "figure": 2,
                                                            "claims": 1, "decision_guide": 1, "compare_reference": 1,
                                                            "report": 1, "all": 1}
        (run / "containers/vllm/Dockerfile").touch()
        dockerfile.write_text(saved)
        os.utime(dockerfile, ns=(0, 0))
        p = snakemake(run, "-n", *RUN)
        assert "Nothing to be done" in p.stdout + p.stderr, p.stdout[-2000:]
    finally:
        dockerfile.write_text(saved)
        os.utime(dockerfile, ns=(0, 0))


def test_secret_is_never_written(run):
    for folder in ("results", "logs", ".snakemake"):
        for f in (run / folder).rglob("*"):
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f


def launch_raw(run, image, *cmd, env=None, timeout=120, opts=()):
    """The launcher on the plain base image: cmd replaces run-cell's arguments (no entry point)."""
    iid = run / "base.iid"
    iid.write_text(json.loads(docker("image", "inspect", image).stdout)[0]["Id"])
    return subprocess.Popen([sys.executable, "-m", "workflow.lib.launch", "--runner", "docker", "--image",
                             str(iid), "--gpus", "0", *opts, "--", *cmd], cwd=run, env={**os.environ, **(env or {}),
                            "PYTHONPATH": str(run)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_secret_reaches_the_container_by_environment(run, base_image):
    p = launch_raw(run, base_image, "sh", "-c", 'printf %s "$HF_TOKEN" | sha256sum', env={"HF_TOKEN": SECRET})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.split()[0] == hashlib.sha256(SECRET.encode()).hexdigest()


def test_cpu_cell_runs_on_its_own_cores_in_the_container(run, base_image):
    # --cpuset-cpus: the container sees only the cores the launcher claimed, and is told which
    p = launch_raw(run, base_image, "sh", "-c", 'grep Cpus_allowed_list /proc/self/status; echo "$KVSTUDY_CPU_CORES"',
                   opts=("--cpus", "1"))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    allowed, named = out.split()[-2:]
    assert allowed == named and len(named.split(",")) == 1, out


def container_gone(name) -> bool:
    return docker("ps", "-a", "--filter", f"name=^{name}$", "--format", "{{.Names}}").stdout.strip() == ""


def test_interrupt_removes_the_container(run, base_image):
    name = launch.container_name("cell", run / "results")
    p = launch_raw(run, base_image, "sleep", "300")
    deadline = time.time() + 60
    while container_gone(name) and time.time() < deadline:
        time.sleep(0.2)
    assert not container_gone(name)
    p.send_signal(signal.SIGTERM)  # what Snakemake sends its jobs on Ctrl-C
    p.wait(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and container_gone(name)


def test_timeout_removes_the_container(run, base_image):
    name = "kvstudy_test_timeout"
    argv = launch.docker_argv(base_image, name, os.getuid(), os.getgid(), run / "results", None, {}, [],
                              ["sleep", "300"])
    t0 = time.time()
    rc = launch.run(argv, dict(os.environ), 3, launch.docker_remover(name))
    assert rc == 124 and time.time() - t0 < 60 and container_gone(name)


def test_image_build_failure_is_named_before_cells(tmp_path, wheel_links):
    repo = copy_repo(tmp_path / "repo")
    (repo / "docker.yaml").write_text(docker_config("kvstudy-test-base:no-such-tag", wheel_links))
    p = snakemake(repo, *RUN)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "building image 'engine' failed" in out and "runner=local" in out, out[-3000:]
    assert not (repo / "results/cells").exists()


def test_sigkill_of_the_launcher_removes_the_container(tmp_path, base_image):
    """No clean shutdown (a SIGKILL of Snakemake's process group): the launcher's lifeline removes
    the container, which would otherwise outlive its killed docker client and hold its GPU."""
    repo = copy_repo(tmp_path / "repo")
    name = launch.container_name("cell", repo / "results")
    p = launch_raw(repo, base_image, "sleep", "300")
    deadline = time.time() + 60
    while container_gone(name) and time.time() < deadline:
        time.sleep(0.2)
    assert not container_gone(name)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    deadline = time.time() + 30
    while not container_gone(name) and time.time() < deadline:
        time.sleep(0.2)
    assert container_gone(name)
