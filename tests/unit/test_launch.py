"""The launcher: the command each runner gets, where secrets go, GPU per cell on the local runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from frameworks.harness import cputime
from frameworks.harness.spec import CellSpec
from tests.conftest import REPO
from workflow.lib import launch

CELL = ["--spec", "{}", "--out", "results/cells/batch/hf/m/bs1.json", "--threads", "2"]


def test_docker_command_isolates_and_names_the_cell(tmp_path):
    argv = launch.docker_argv("sha256:abc", "kvstudy_x", 1234, 99, tmp_path / "results", "GPU-7",
                              {"KVSTUDY_IMAGE_ID": "sha256:abc"}, ["HF_TOKEN"], CELL)
    s = " ".join(argv)
    assert argv[:3] == ["docker", "run", "--rm"]
    for part in ("--name kvstudy_x", "--user 1234:99", "--network none", "--gpus device=GPU-7",
                 f"--volume {(tmp_path / 'results').resolve()}:/work/results", "--env KVSTUDY_IMAGE_ID=sha256:abc",
                 "--env CUDA_VISIBLE_DEVICES=GPU-7"):
        assert part in s
    assert argv[argv.index("sha256:abc", argv.index("--user")):] == ["sha256:abc", *CELL]  # entry point: run-cell
    assert argv[argv.index("HF_TOKEN") - 1] == "--env"  # by name only; docker copies the value


def test_docker_cpu_cell_gets_no_gpu_and_index_gpus_are_not_renamed(tmp_path):
    assert "--gpus" not in launch.docker_argv("i", "n", 1, 1, tmp_path, None, {}, [], CELL)
    argv = launch.docker_argv("i", "n", 1, 1, tmp_path, "3", {}, [], CELL)
    assert "device=3" in argv and not any(a.startswith("CUDA_VISIBLE_DEVICES") for a in argv)


def test_container_name_is_the_cell_and_differs_per_checkout(tmp_path):
    a = launch.container_name("results/cells/batch/hf/llama-3.1-8b/bs8_in2048.json", tmp_path / "a")
    b = launch.container_name("results/cells/batch/hf/llama-3.1-8b/bs8_in2048.json", tmp_path / "b")
    assert a.startswith("kvstudy_batch_hf_llama-3.1-8b_bs8_in2048_") and a != b


def test_apptainer_gets_gpu_and_secret_by_environment_only(tmp_path):
    argv = launch.apptainer_argv("results/images/hf.sif", tmp_path, "0", CELL)
    assert argv[:2] == ["apptainer", "exec"] and "--nv" in argv and "--cleanenv" in argv
    assert argv[argv.index("results/images/hf.sif"):] == ["results/images/hf.sif", "python", "-m",
                                                           "frameworks.harness.run_cell", *CELL]
    env = launch.apptainer_env({"HF_TOKEN": "hf_secret", "PATH": "/bin"}, {"KVSTUDY_IMAGE_ID": "sha256:1"}, "0",
                               ["HF_TOKEN"])
    assert env["APPTAINERENV_HF_TOKEN"] == "hf_secret" and env["APPTAINERENV_CUDA_VISIBLE_DEVICES"] == "0"
    assert "hf_secret" not in " ".join(argv)


def test_local_gpu_cell_runs_on_its_claimed_gpu(tmp_path):
    spec = CellSpec(experiment="batch", framework="hf", model="tiny-llama-3.1", batch_size=1, prompt_len=16, gen_len=2,
                    warmup=0, device="cpu", dtype="float32", timeout_s=120)
    out = tmp_path / "cell.json"
    env = {**os.environ, "KVSTUDY_GPUS": "fake0,fake1", "KVSTUDY_GPU_LOCK_DIR": str(tmp_path / "locks"),
           "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "workflow.lib.launch", "--runner", "local", "--gpus", "1", "--",
                        "--spec", spec.to_json(), "--out", str(out), "--threads", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(out.read_text())["provenance"]["cuda_visible_devices"] == "fake0"
    assert "on GPU fake0" in p.stderr and ": start (local)" in p.stderr and "end, exit 0" in p.stderr
    assert Path(tmp_path / "locks" / "gpu-fake0.lock").exists()


def test_local_cell_runs_in_the_python_it_is_given(tmp_path):
    # vLLM cells run in their own venv: --python is the interpreter of the cell, a missing one
    # is named before anything runs
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/argv\n")
    fake.chmod(0o755)
    p = subprocess.run([sys.executable, "-m", "workflow.lib.launch", "--runner", "local", "--python", str(fake), "--",
                        "--spec", "{}", "--out", "x.json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "argv").read_text().split() == ["-m", "frameworks.harness.run_cell", "--spec", "{}", "--out", "x.json"]
    p = subprocess.run([sys.executable, "-m", "workflow.lib.launch", "--runner", "local", "--python",
                        str(tmp_path / "nope"), "--", "--spec", "{}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "is not an executable Python" in p.stderr


def test_local_cpu_cell_gets_the_hosts_timing_lock(tmp_path):
    # the lock file under results/ (mounted into containers, where cells name it /work/results/...)
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$KVSTUDY_CPU_LOCK\" > {tmp_path}/lock\n")
    fake.chmod(0o755)
    p = subprocess.run([sys.executable, "-m", "workflow.lib.launch", "--runner", "local", "--python", str(fake), "--",
                        "--spec", "{}", "--out", "x.json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "lock").read_text().strip() == str(REPO / "results" / cputime.FILE_NAME)


def test_local_cell_gets_the_shared_inductor_cache(monkeypatch, tmp_path):
    """Compiled decode layers (compile=layers) are cached where every cell of the run finds them:
    results/cache/torchinductor, unless the environment names its own cache."""
    seen = {}

    def execve(path, argv, env):  # the CPU cell's exec: stop here
        seen.update(env=env, argv=argv)
        raise SystemExit(0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch.os, "execve", execve)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    with pytest.raises(SystemExit):
        launch.main(["--runner", "local", "--", "--spec", "{}", "--out", "x.json"])
    assert seen["env"]["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "results" / launch.INDUCTOR_CACHE)
    assert seen["env"]["TRITON_CACHE_DIR"] == str(tmp_path / "results" / launch.TRITON_CACHE)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    with pytest.raises(SystemExit):
        launch.main(["--runner", "local", "--", "--spec", "{}", "--out", "x.json"])
    assert seen["env"]["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"


def test_local_cpu_cell_unregisters_its_pause_root_when_it_ends(tmp_path):
    # the launcher registers the cell's pid under results/.cpu-cells/ (pause.py) and execs run-cell,
    # which removes it when it ends, whatever its outcome (here: a bad spec, exit 2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "workflow.lib.launch", "--runner", "local", "--cpu-timing", "pause", "--",
                        "--spec", "{}", "--out", "x.json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "bad spec" in p.stderr, p.stderr
    registry = cputime.registry(str(tmp_path / "results" / cputime.FILE_NAME))
    assert registry.is_dir() and not list(registry.iterdir())


def test_bytecode_cache_only_where_the_environment_has_none_and_may_not_write_it(monkeypatch, tmp_path):
    """A local cell gets results/cache/pycache (PYTHONPYCACHEPREFIX) when PYTHONDONTWRITEBYTECODE is set
    and over 10% of the probed modules have no bytecode; never when the environment has it, may write
    it, names its own prefix, or the cell runs another Python."""
    import py_compile

    pkg = tmp_path / "site" / "kvprobe_pkg"
    (pkg / "sub").mkdir(parents=True)
    sources = [pkg / "__init__.py"] + [pkg / "sub" / f"m{i}.py" for i in range(9)]
    for f in sources:
        f.write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    probes = {"kvprobe_pkg": ("", "sub", "absent"), "kvprobe_absent": ("",)}
    no_write = {"PYTHONDONTWRITEBYTECODE": "1"}
    assert launch.missing_bytecode(probes) == 1.0
    assert launch.needs_pycache(no_write, probes=probes)
    assert not launch.needs_pycache({}, probes=probes)  # Python writes its own __pycache__
    assert not launch.needs_pycache({"PYTHONDONTWRITEBYTECODE": ""}, probes=probes)
    assert not launch.needs_pycache({**no_write, "PYTHONPYCACHEPREFIX": "/mine"}, probes=probes)
    assert not launch.needs_pycache(no_write, python="/usr/bin/true", probes=probes)
    for f in sources[:8]:
        py_compile.compile(str(f))
    assert launch.missing_bytecode(probes) == 0.2
    assert launch.needs_pycache(no_write, probes=probes)
    py_compile.compile(str(sources[8]))
    assert launch.missing_bytecode(probes) == 0.1  # not above the threshold
    assert not launch.needs_pycache(no_write, probes=probes)

    monkeypatch.setattr(launch, "needs_pycache", lambda env, python=None: True)
    env = launch.local_cache_env(no_write, tmp_path / "results")
    assert env["PYTHONPYCACHEPREFIX"] == str(tmp_path / "results" / launch.PYCACHE)
    assert env["PYTHONDONTWRITEBYTECODE"] == ""  # empty: Python writes bytecode
    monkeypatch.setattr(launch, "needs_pycache", lambda env, python=None: False)
    assert "PYTHONPYCACHEPREFIX" not in launch.local_cache_env(no_write, tmp_path / "results")


def test_local_cell_without_bytecode_gets_the_cache_and_a_log_line(monkeypatch, tmp_path, capsys):
    seen = {}

    def execve(path, argv, env):  # the CPU cell's exec: stop here
        seen.update(env=env)
        raise SystemExit(0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch.os, "execve", execve)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setattr(launch, "missing_bytecode", lambda probes=None: 0.5)
    with pytest.raises(SystemExit):
        launch.main(["--runner", "local", "--", "--spec", "{}", "--out", "x.json"])
    assert seen["env"]["PYTHONPYCACHEPREFIX"] == str(tmp_path / "results" / launch.PYCACHE)
    assert seen["env"]["PYTHONDONTWRITEBYTECODE"] == ""
    assert "50% of torch's and transformers' probed modules have no bytecode" in capsys.readouterr().err
    monkeypatch.setattr(launch, "missing_bytecode", lambda probes=None: 0.0)
    with pytest.raises(SystemExit):
        launch.main(["--runner", "local", "--", "--spec", "{}", "--out", "x.json"])
    assert "PYTHONPYCACHEPREFIX" not in seen["env"] and seen["env"]["PYTHONDONTWRITEBYTECODE"] == "1"
