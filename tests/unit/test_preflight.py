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


def _spec(**kw):
    from frameworks.harness.spec import CellSpec

    return CellSpec(experiment="batch", framework="hf", model="tiny-llama-3.1", **kw)


def test_disk_space_is_checked_against_the_pending_cells(tmp_path):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    results, temp = tmp_path / "results", tmp_path / "tmp"  # one file system: their needs add up
    specs = [_spec(batch_size=32, gen_len=256), _spec(batch_size=8, gen_len=256)]
    need = sum(map(preflight.expected_result_bytes, specs)) + preflight.expected_result_bytes(specs[0]) \
        + preflight.TEMP_RESERVE_BYTES
    # the reference run bs32 x 256 tokens wrote 207 183 bytes: the estimate covers it, within 2x
    assert 207_183 <= preflight.expected_result_bytes(specs[0]) <= 2 * 207_183
    assert preflight.disk_problems(specs, results, temp, usage=lambda p: usage(0, 0, need)) == []
    [msg] = preflight.disk_problems(specs, results, temp, usage=lambda p: usage(0, 0, need - 1))
    assert "not enough free disk space" in msg and str(results) in msg and "2 pending cell(s)" in msg
    assert preflight.disk_problems([], results, temp, usage=lambda p: usage(0, 0, 0)) == []


def test_unreadable_cells_are_named_with_the_way_out(tmp_path):
    bad, wrong = tmp_path / "bad.json", tmp_path / "wrong.json"
    bad.write_text('{"status": ')
    wrong.write_text('{"status": "ok"}')
    msgs = preflight.unreadable_cells([bad, wrong])
    assert len(msgs) == 2 and all("delete it to rerun the cell" in m for m in msgs)
    assert f"{bad}: not a readable result JSON" in msgs[0] and f"{wrong}: invalid" in msgs[1]
