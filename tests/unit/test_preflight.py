"""Preflight: every way a run cannot start is one message that names the way out."""

import json
import subprocess

import pytest

from workflow.lib import preflight

OK_INFO = json.dumps({"Runtimes": {"runc": {}, "nvidia": {}}})


def fake_run(rc=0, stdout=OK_INFO, stderr=""):
    return lambda argv: subprocess.CompletedProcess(argv, rc, stdout, stderr)


def only(*names):
    return lambda name: f"/usr/bin/{name}" if name in names else None


@pytest.mark.parametrize(
    "runner, needs_gpu, which, run, gpus, expect",
    [
        ("docker", False, only(), fake_run(), ["0"], "`docker` command is not installed"),
        ("docker", False, only("docker"), fake_run(1, "", "Cannot connect to the Docker daemon"), ["0"],
         "Docker daemon does not answer"),
        ("docker", True, only("docker"), fake_run(stdout=json.dumps({"Runtimes": {"runc": {}}})), ["0"],
         "Docker has no NVIDIA runtime"),
        ("docker", True, only("docker"), fake_run(), [], "this host has no visible GPU"),
        ("local", True, only(), fake_run(), [], "this host has no visible GPU"),
        ("apptainer", False, only(), fake_run(), [], "`apptainer` command is not installed"),
    ],
)
def test_problem_and_way_out(runner, needs_gpu, which, run, gpus, expect):
    found = preflight.problems(runner, needs_gpu, which=which, run=run, discover=lambda: gpus)
    assert found and expect in found[0], found
    assert any(way in found[0] for way in ("runner=local", "preset=smoke")), found[0]


@pytest.mark.parametrize(
    "runner, needs_gpu, which, gpus",
    [
        ("local", False, only(), []),  # make smoke on a laptop: nothing to check
        ("docker", False, only("docker"), []),  # CPU preset in docker: no GPU needed
        ("docker", True, only("docker"), ["GPU-1"]),
        ("docker", True, only("docker", "nvidia-container-runtime-hook"), ["0"]),
        ("apptainer", True, only("apptainer"), ["0"]),
    ],
)
def test_runnable_configurations_pass(runner, needs_gpu, which, gpus):
    run = fake_run(stdout=json.dumps({"Runtimes": {"runc": {}}})) if "nvidia-container-runtime-hook" in str(which(
        "nvidia-container-runtime-hook")) else fake_run()
    assert preflight.problems(runner, needs_gpu, which=which, run=run, discover=lambda: gpus) == []


def test_cluster_login_node_needs_no_gpu():
    assert preflight.problems("local", True, local_host=False, discover=lambda: []) == []


def test_every_problem_is_named_at_once():
    """Docker down and no GPU: both are reported, so one round of fixes suffices."""
    found = preflight.problems("docker", True, which=only("docker"), run=fake_run(1, "", "Cannot connect"),
                               discover=lambda: [])
    assert len(found) == 2 and "Docker daemon does not answer" in found[0] and "no visible GPU" in found[1]
