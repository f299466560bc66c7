"""The core allocator on fake core lists: disjoint cores for concurrent cells, queueing, crash
safety; a cell launched through it runs (and records) its allocation; vLLM binds to it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from frameworks.harness.spec import CellSpec
from tests.conftest import REPO
from workflow.lib import cores

HOLD = """
import json, sys, time
from pathlib import Path
from workflow.lib import cores
c = cores.claim([int(x) for x in sys.argv[1].split(",")], int(sys.argv[2]), Path(sys.argv[3]), poll_s=0.05)
t0 = time.time(); time.sleep(float(sys.argv[4])); t1 = time.time()
print(json.dumps({"cores": c.cores, "start": t0, "end": t1}), flush=True)
"""


def hold(core_list, n, lock_dir, seconds):
    return subprocess.Popen([sys.executable, "-c", HOLD, ",".join(map(str, core_list)), str(n), str(lock_dir),
                             str(seconds)], stdout=subprocess.PIPE, text=True, cwd=REPO)


def test_parse_reads_the_kernels_cpulist_format():
    assert cores.parse("0-2,5") == [0, 1, 2, 5]
    assert cores.parse(" 3 , 1-1,") == [1, 3]
    assert cores.format_list((5, 0, 2)) == "0,2,5"
    assert cores.discover({"KVSTUDY_CPUS": "4-5"}) == [4, 5]
    assert cores.discover({}) == sorted(os.sched_getaffinity(0))


def test_concurrent_claims_get_disjoint_cores_until_none_are_left(tmp_path):
    a = cores.try_claim([0, 1, 2, 3, 4], 2, tmp_path)
    b = cores.try_claim([0, 1, 2, 3, 4], 2, tmp_path)
    assert len(a.cores) == len(b.cores) == 2 and not set(a.cores) & set(b.cores)
    assert cores.try_claim([0, 1, 2, 3, 4], 2, tmp_path) is None  # one core left: not enough
    c = cores.try_claim([0, 1, 2, 3, 4], 1, tmp_path)
    assert c.cores == tuple(set(range(5)) - set(a.cores) - set(b.cores))
    a.release()
    d = cores.try_claim([0, 1, 2, 3, 4], 2, tmp_path)
    assert set(d.cores) == set(a.cores)
    for x in (b, c, d):
        x.release()


def test_a_failed_claim_takes_nothing(tmp_path):
    a = cores.try_claim([0, 1, 2], 2, tmp_path)
    assert cores.try_claim([0, 1, 2], 2, tmp_path) is None
    free = cores.try_claim([0, 1, 2], 1, tmp_path)  # the core the failed claim had locked is free again
    assert free is not None and not set(free.cores) & set(a.cores)
    a.release(), free.release()


def test_more_cells_than_cores_queue_and_never_share(tmp_path):
    procs = [hold([0, 1, 2], 2, tmp_path, 0.5) for _ in range(2)] + [hold([0, 1, 2], 1, tmp_path, 0.5)
                                                                    for _ in range(3)]
    runs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    for a in runs:
        for b in runs:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:  # at the same time
                assert not set(a["cores"]) & set(b["cores"]), (a, b)
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for a in runs for b in runs if a is not b)


def test_a_killed_holder_frees_its_cores(tmp_path):
    p = hold([7, 8], 2, tmp_path, 60)
    deadline = time.time() + 30
    while time.time() < deadline:  # until the child holds both
        c = cores.try_claim([7, 8], 1, tmp_path)
        if c is None:
            break
        c.release()
        time.sleep(0.05)
    assert cores.try_claim([7, 8], 1, tmp_path) is None
    os.kill(p.pid, signal.SIGKILL)  # a crash: no cleanup code runs
    p.wait()
    c = cores.claim([7, 8], 2, tmp_path, timeout_s=5, poll_s=0.05)
    assert c.cores == (7, 8)
    c.release()


def test_a_claim_of_more_cores_than_there_are_gets_all_of_them(tmp_path):
    c = cores.claim([0, 1], 8, tmp_path, timeout_s=5)  # cell_threads: all on a smaller machine
    assert c.cores == (0, 1)
    c.release()


def _affinity_probe(tmp_path):
    # a stand-in for the cell's Python that prints what it was started with: affinity, env, open locks
    probe = tmp_path / "python"
    probe.write_text(f"#!{sys.executable}\n"
                     "import json, os, sys\n"
                     f"json.dump({{'affinity': sorted(os.sched_getaffinity(0)), "
                     f"'cores': os.environ.get('KVSTUDY_CPU_CORES')}}, open({str(tmp_path / 'seen.json')!r}, 'w'))\n")
    probe.chmod(0o755)
    return probe


def test_launcher_pins_a_cpu_cell_to_its_claimed_cores(tmp_path):
    visible = sorted(os.sched_getaffinity(0))
    env = {**os.environ, "KVSTUDY_CPU_LOCK_DIR": str(tmp_path / "locks"), "PYTHONPATH": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    other = cores.try_claim(visible, 1, tmp_path / "locks") if len(visible) > 1 else None  # a neighbour cell
    p = subprocess.run([sys.executable, "-m", "workflow.lib.launch", "--runner", "local", "--python",
                        str(_affinity_probe(tmp_path)), "--cpus", "1", "--", "--spec", "{}", "--out", "x.json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert len(seen["affinity"]) == 1 and seen["cores"] == str(seen["affinity"][0])
    if other:
        assert seen["affinity"][0] not in other.cores
        other.release()
    assert f"on cores {seen['cores']}" in p.stderr


def test_a_cells_recorded_affinity_is_its_allocation(tmp_path):
    # the real cell (hf, tiny model): its result's provenance names the cores and the affinity it ran with
    spec = CellSpec(experiment="batch", framework="hf", model="tiny-llama-3.1", batch_size=1, prompt_len=16,
                    gen_len=2, warmup=0, repetitions=1, device="cpu", dtype="float32", timeout_s=120)
    out = tmp_path / "cell.json"
    env = {**os.environ, "KVSTUDY_CPU_LOCK_DIR": str(tmp_path / "locks"), "PYTHONPATH": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    p = subprocess.run([sys.executable, "-m", "workflow.lib.launch", "--runner", "local", "--gpus", "0", "--cpus", "1",
                        "--", "--spec", spec.to_json(), "--out", str(out), "--threads", "1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    prov = json.loads(out.read_text())["provenance"]
    assert prov["cpu_cores"] and [int(prov["cpu_cores"])] == prov["cpu_affinity"]


def test_unpinned_cells_and_gpu_cells_are_left_alone(monkeypatch, tmp_path):
    seen = {}

    def execve(path, argv, env):  # the CPU cell's exec: stop here
        seen.update(env=env, affinity=sorted(os.sched_getaffinity(0)))
        raise SystemExit(0)

    from workflow.lib import launch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch.os, "execve", execve)
    monkeypatch.delenv(cores.ENV, raising=False)
    with pytest.raises(SystemExit):
        launch.main(["--runner", "local", "--", "--spec", "{}", "--out", "x.json"])  # no --cpus: by hand
    assert cores.ENV not in seen["env"] and seen["affinity"] == sorted(os.sched_getaffinity(0))


def test_docker_cpu_cell_gets_its_cpuset(tmp_path):
    from workflow.lib import launch

    argv = launch.docker_argv("img", "n", 1, 1, tmp_path, None, {cores.ENV: "2,3"}, [], ["--threads", "2"], (2, 3))
    assert argv[argv.index("--cpuset-cpus") + 1] == "2,3" and f"{cores.ENV}=2,3" in argv
    assert "--cpuset-cpus" not in launch.docker_argv("img", "n", 1, 1, tmp_path, "0", {}, [], [])  # GPU cells


@pytest.mark.parametrize("pinned, expect", [("3", "3"), ("0,2", "0,2"), (None, "nobind")])
def test_vllm_binds_its_omp_threads_to_the_cells_cores(monkeypatch, pinned, expect):
    from frameworks.vllm import adapter

    for k in (cores.ENV, "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(k, raising=False)
    if pinned:
        monkeypatch.setenv(cores.ENV, pinned)
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")  # a pinned cell overrides any other binding
    adapter.cpu_environment(CellSpec(experiment="t", framework="vllm", model="tiny-llama-3.1", device="cpu",
                                     dtype="float32"))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == expect


def test_any_cpu_job_runs_pinned_through_the_cli_and_gpu_jobs_as_they_are(tmp_path):
    # the trainer's wrapper (workflow/rules/models.smk): CMD on cores of its own, or untouched on a GPU
    env = {**os.environ, "KVSTUDY_CPU_LOCK_DIR": str(tmp_path / "locks"), "PYTHONPATH": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    show = [sys.executable, "-c", "import os, json; print(json.dumps([sorted(os.sched_getaffinity(0)), "
                                  "os.environ.get('KVSTUDY_CPU_CORES')]))"]
    for gpus, pinned in (("0", True), ("1", False)):
        p = subprocess.run([sys.executable, "-m", "workflow.lib.cores", "--cpus", "1", "--gpus", gpus, "--", *show],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        affinity, named = json.loads(p.stdout)
        if pinned:
            assert len(affinity) == 1 and named == str(affinity[0])
        else:
            assert affinity == sorted(os.sched_getaffinity(0)) and named is None


def test_a_system_without_affinity_runs_the_job_unpinned(monkeypatch, tmp_path):
    # macOS has no sched_setaffinity: the job runs as before, claiming nothing, naming no cores
    monkeypatch.delattr(cores.os, "sched_setaffinity")
    env = {"KVSTUDY_CPUS": "0"}
    assert cores.pin(1, env) == ((), ())
    assert cores.ENV not in env
