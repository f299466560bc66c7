"""The pipeline for real: a smoke run, a no-op rerun, single-cell reruns, resume after a kill.

Two runs: the whole smoke preset (~12-20 min on 2 cores; marked e2e: `make test-e2e`) for what
needs every cell (tables, figures, the trained model, claims, the report in a browser), and its
hf cells of four experiments (13 cells, ~2 min; `make test`) for how the workflow reruns:
no-op, forced cell, deleted and corrupt results, status commands, bad config."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from frameworks.harness import result
from tests import browser
from tests.conftest import REPO, copy_repo, snakemake
from workflow.lib import celltable

pytestmark = pytest.mark.slow
# what every cell feeds besides its table and figures (a shipped smoke reference run exists: compared with)
REPORT = {"results/claims.csv", "results/guide/decision_guide.csv", "results/compare/reference.csv",
          "results/report/index.html"}

# vLLM cells run in their own venv: one for every run of the suite (and tests/vllm_env.sh), in
# the checkout under test, created by the first smoke run (~4 min) instead of once per copy
VLLM_VENV = f"vllm_venv={os.environ.get('KVSTUDY_VLLM_VENV', REPO / '.venv-vllm')}"


def cells_of(preset: str, **filters) -> dict:
    return celltable.build_cells({"preset": preset, "runner": "local", **filters}, celltable.load_preset(preset))


def jobs(stdout: str) -> dict[str, int]:
    """Snakemake's job-count table of a (dry-)run: rule -> count."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stdout, re.M) if m[1] != "total"}


def mtimes(repo) -> dict[str, float]:
    return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in (repo / "results").rglob("*") if p.is_file()}


SMOKE = ["--config", "preset=smoke", "runner=local", VLLM_VENV]
# the rerun checks' cells: hf in the experiments they touch (batch feeds the most figures, the decision guide's too)
SUBSET_FILTERS = {"experiments": ["batch", "model_size", "request_rate", "kv_budget"], "frameworks": ["hf"]}
SUBSET = [*SMOKE, f"experiments=[{','.join(SUBSET_FILTERS['experiments'])}]", "frameworks=[hf]"]
e2e = pytest.mark.e2e


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The whole smoke preset, every framework and experiment."""
    repo = copy_repo(tmp_path_factory.mktemp("smoke") / "repo")
    p = snakemake(repo, "--cores", "all", *SMOKE, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    return repo


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """The smoke preset's hf cells of SUBSET_FILTERS' experiments, with their tables, figures and report."""
    repo = copy_repo(tmp_path_factory.mktemp("subset") / "repo")
    p = snakemake(repo, "--cores", "all", *SUBSET, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert len(list((repo / "results/cells").rglob("*.json"))) == len(cells_of("smoke", **SUBSET_FILTERS)) == 13
    return repo


def test_paper_dry_run_lists_every_cell_of_every_framework(repo_copy):
    p = snakemake(repo_copy, "-n", "--cores", "1", "--config", "preset=paper")
    assert p.returncode == 0, p.stderr[-3000:]
    cells = cells_of("paper")
    assert {c.framework for c in cells.values()} == {"hf", "h2o", "infinigen", "vllm"}
    assert jobs(p.stdout)["run_cell"] == len(cells)
    for path in cells:
        assert path in p.stdout


@e2e
def test_smoke_writes_tables_and_figures_from_real_runs(smoke):
    cells = cells_of("smoke")
    for path in cells:
        r = result.load(smoke / path)
        assert r["status"] == "ok", (path, r["message"])
        if r["accuracy"] is None:
            assert r["summary"]["output_tok_s"] > 0
        else:  # accuracy cells: scored documents instead of timed requests
            assert r["accuracy"]["n"] > 0
    for exp in {c.experiment for c in cells.values()}:
        df = pd.read_csv(smoke / f"results/tables/{exp}.csv")
        assert len(df) == sum(c.experiment == exp for c in cells.values()) and "status" in df
    figs = list((smoke / "results/figures").glob("*.png"))
    # one script per figure (the decision guide's included); tables, claims and the report have their own
    scripts = [f for f in (smoke / "workflow/scripts").glob("*.py") if f.stem not in ("aggregate", "claims", "report")]
    assert len(figs) == len(scripts) == 12 and all(f.stat().st_size > 10_000 and f.with_suffix(".pdf").exists() for f in figs)


@e2e
def test_smoke_trains_a_model_and_measures_its_retention(smoke):
    """The trained model really retrieves (issue 13's target): full-cache recall >= 0.95 at every
    context length, in its training log and in the tables (every framework at KV budget 1.0: the
    full cache, fact_retention and lm-eval's kvstudy_recall); the tables also hold H2O's and
    InfiniGen's recall at the smaller budget, as fractions."""
    log = json.loads((smoke / "results/models/retriever-tiny/train_log.json").read_text())
    lengths = {c.prompt_len for c in cells_of("smoke", experiments=["fact_retention"]).values()}
    assert set(log["recall_full_cache"]) == {str(n) for n in lengths}
    assert all(v >= 0.95 for v in log["recall_full_cache"].values()), log["recall_full_cache"]
    df = pd.read_csv(smoke / "results/tables/fact_retention.csv")
    assert {"hf", "h2o", "infinigen"} <= set(df["framework"]) and df["value"].between(0, 1).all()
    assert (df["status"] == "ok").all() and (df["n"] > 0).all()
    full = df[df["kv_budget"] == 1.0]
    assert set(full["prompt_len"]) == lengths and set(full["framework"]) == {"hf", "h2o", "infinigen"}
    assert (full["value"] >= 0.95).all(), full[["framework", "prompt_len", "value"]].to_string()
    assert (df["kv_budget"] < 1.0).any()
    acc = pd.read_csv(smoke / "results/tables/accuracy.csv")
    full = acc[(acc["task"] == "kvstudy_recall") & (acc["kv_budget"] == 1.0)]
    assert len(full) and (full["value"] >= 0.95).all(), full[["framework", "prompt_len", "value"]].to_string()


@e2e
def test_report_has_every_claim_the_guide_and_the_reference_comparison(smoke):
    claims = pd.read_csv(smoke / "results/claims.csv").fillna("")
    assert list(claims["claim"]) == [f"C{i}" for i in range(1, 8)]
    assert set(claims["verdict"]) <= {"supported", "not supported", "not measured"}
    assert all(r.missing for r in claims.itertuples() if r.verdict == "not measured")  # names the missing cells
    assert (pd.read_csv(smoke / "results/guide/decision_guide.csv")["framework"] != "none meets").any()
    cmp = pd.read_csv(smoke / "results/compare/reference.csv")
    assert (cmp["flag"].isin(["within", "outside"])).any()  # matched against results/reference/smoke-*
    page = (smoke / "results/report/index.html").read_text()
    assert "results/reference/smoke-" in page and "C7" in page
    # offline: nothing fetched from elsewhere (inlined base64 figures may hold any letters, "cdn" too)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.I)


@e2e
@pytest.mark.skipif(browser.chromium() is None and not os.environ.get("KVSTUDY_REQUIRE_BROWSER"),
                    reason="chromium not installed (apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_chromium(smoke):
    # the screenshot is a CI artifact: kept under this checkout's results/
    shot = REPO / "results/report/screenshot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    found = browser.check(smoke / "results/report/index.html", shot)
    assert found["broken_images"] == [] and found["broken_links"] == [], found
    assert len(found["images"]) == 12 and found["screenshot"], found


def nothing_to_do(repo, config: list[str]) -> None:
    before = mtimes(repo)
    p = snakemake(repo, "--cores", "all", *config)
    assert p.returncode == 0 and "Nothing to be done" in p.stdout + p.stderr, p.stderr[-3000:]
    assert mtimes(repo) == before


@e2e
def test_second_run_of_the_whole_preset_does_nothing(smoke):
    nothing_to_do(smoke, SMOKE)  # every rule: the vLLM venv, the trainer, accuracy and vLLM cells too


def test_second_run_does_nothing(subset):
    nothing_to_do(subset, SUBSET)


def test_force_one_cell_redoes_only_that_cell(subset):
    target = "results/cells/batch/hf/tiny-llama-3.1/bs4_in256_out64_kv1_sdpa.json"
    before = mtimes(subset)
    p = snakemake(subset, "--cores", "all", *SUBSET, "-f", target)
    assert p.returncode == 0, p.stderr[-3000:]
    after = mtimes(subset)
    assert [k for k in after if after[k] != before[k]] == [target]
    # the next full run refreshes only what depends on that cell
    p = snakemake(subset, "--cores", "all", *SUBSET)
    changed = {k for k, v in mtimes(subset).items() if v != after[k]}
    assert changed == {"results/tables/batch.csv"} | {f"results/figures/{f}.{e}" for f in
                                                        ("throughput_vs_batch", "memory_vs_batch", "tok_s_per_gb_vs_batch", "engine_decode",
                                                         "decision_guide") for e in ("pdf", "png")} | REPORT


def test_forcerun_redoes_cell_and_dependents(subset):
    target = "results/cells/kv_budget/hf/tiny-llama-3.1/bs4_in256_out64_kv1_sdpa.json"
    p = snakemake(subset, "--cores", "all", *SUBSET, "-n", "--forcerun", target)
    assert jobs(p.stdout) == {"run_cell": 1, "table": 1, "figure": 1, "claims": 1, "decision_guide": 1,
                              "compare_reference": 1, "report": 1, "all": 1}, p.stdout


def status(repo) -> str:
    p = subprocess.run([sys.executable, "-m", "workflow.lib.status", *SUBSET], cwd=repo,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert p.returncode == 0, p.stderr
    return p.stdout


def pasted(repo, stdout: str, kind: str, path: str) -> subprocess.CompletedProcess:
    """Run the `run:` / `rerun:` command that status printed for `path`, as a user pastes it."""
    [cmd] = [ln.split(f"{kind}:", 1)[1] for ln in stdout.splitlines() if ln.strip().startswith(f"{kind}:") and path in ln]
    assert shlex.split(cmd)[0].endswith("snakemake")  # this environment's, not whatever is on PATH
    return subprocess.run(shlex.split(cmd), cwd=repo, capture_output=True, text=True, timeout=600)


def test_status_lists_non_ok_cells_with_commands_that_work(subset):
    oom = subset / "results/cells/model_size/hf/tiny-llama-3.1/bs4_in256_out64_kv1_sdpa.json"
    gone = subset / "results/cells/model_size/hf/tiny-llama-3.2-1b/bs4_in256_out64_kv1_sdpa.json"
    r = result.load(oom)
    r.update(status="oom", message="OutOfMemoryError: test", summary=None, samples=[])
    result.write_atomic(oom, r)
    gone.unlink()
    out = status(subset)
    rel_oom, rel_gone = str(oom.relative_to(subset)), str(gone.relative_to(subset))
    assert f"oom          {rel_oom}" in out and f"missing      {rel_gone}" in out
    assert f"--cores all --forcerun {rel_oom} --config preset=smoke runner=local" in out
    assert f"cells: 1 missing, {len(cells_of('smoke', **SUBSET_FILTERS)) - 2} ok, 1 oom" in out
    p = pasted(subset, out, "run", rel_gone)
    assert p.returncode == 0 and gone.exists(), p.stderr[-3000:]
    p = pasted(subset, out, "rerun", rel_oom)
    assert p.returncode == 0 and result.load(oom)["status"] == "ok", p.stderr[-3000:]
    assert "cells: " + f"{len(cells_of('smoke', **SUBSET_FILTERS))} ok" in status(subset)


def test_deleted_result_reruns_although_its_table_exists(subset):
    target = "results/cells/model_size/hf/tiny-llama-3.2-3b/bs4_in256_out64_kv1_sdpa.json"
    before = mtimes(subset)
    (subset / target).unlink()
    p = snakemake(subset, "--cores", "all", *SUBSET)
    assert p.returncode == 0, p.stderr[-3000:]
    changed = {k for k, v in mtimes(subset).items() if v != before.get(k)}
    assert changed == {target, "results/tables/model_size.csv", "results/figures/model_size.pdf",
                       "results/figures/model_size.png", "results/figures/decision_guide.pdf",
                       "results/figures/decision_guide.png"} | REPORT


def test_corrupt_result_stops_the_run_before_any_table(subset):
    cell = subset / "results/cells/request_rate/hf/tiny-llama-3.1/bs8_in128_out16_kv1_sdpa_rate16-n16.json"
    saved = cell.read_text()
    before = mtimes(subset)
    try:
        for corrupt in (saved[: len(saved) // 2], '{"status": "ok"}'):  # truncated; valid JSON, wrong schema
            cell.write_text(corrupt)
            p = snakemake(subset, "--cores", "all", *SUBSET)
            assert p.returncode != 0
            out = p.stdout + p.stderr
            assert f"{cell.relative_to(subset)}: " in out and "delete it to rerun the cell" in out, out[-3000:]
            assert "Traceback" not in out
            assert cell.exists() and (subset / "results/tables/request_rate.csv").exists()  # nothing deleted
            assert {k: v for k, v in mtimes(subset).items() if k != str(cell.relative_to(subset))} == \
                {k: v for k, v in before.items() if k != str(cell.relative_to(subset))}
    finally:
        cell.write_text(saved)


def test_bad_config_touches_no_result(subset):
    before = mtimes(subset)
    p = snakemake(subset, "--cores", "all", *SMOKE, "frameworks=[nope]")
    assert p.returncode != 0 and mtimes(subset) == before


def cell_processes(repo) -> list[str]:
    """The processes of a cell started in `repo`: launcher, run-cell, worker, lifeline watchdog."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "frameworks.harness" in cmd or "workflow.lib.launch" in cmd:
                if p.status() != psutil.STATUS_ZOMBIE and os.path.samefile(p.cwd(), repo):
                    out.append(f"{p.pid} {cmd[:150]}")
        except (psutil.Error, OSError):
            continue
    return out


def test_sigkilled_run_leaves_no_cell_process_and_resumes_with_only_that_cell(repo_copy, tmp_path):
    tmp = tmp_path / "tmp"  # the cells' temp folder, to see that no temp dir is left
    tmp.mkdir()
    config = ["--config", "preset=smoke", "runner=local", VLLM_VENV]
    two = sorted(cells_of("smoke", experiments=["request_rate"], frameworks=["hf"]))[:2]  # two tiny cells
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", *two, *config],
                            cwd=repo_copy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.time() + 300
    # one core: the cells run one after the other; once one is written, Snakemake has recorded it
    # and starts the other; kill while the other one's worker computes
    while time.time() < deadline and not (any((repo_copy / c).exists() for c in two) and
                                          any("harness.worker" in c for c in cell_processes(repo_copy))):
        time.sleep(0.1)
    assert list(tmp.glob("kvstudy-cell-*")), "the second cell should be running"
    os.killpg(proc.pid, signal.SIGKILL)  # no clean shutdown: as a crash or a lost node
    proc.wait()
    time.sleep(5)
    assert cell_processes(repo_copy) == []
    assert not list(tmp.glob("kvstudy-cell-*"))
    [first] = [c for c in two if (repo_copy / c).exists()]
    [killed] = [c for c in two if c != first]
    done = (repo_copy / first).stat().st_mtime_ns
    # the hard kill left Snakemake's lock; `make smoke` runs this first and it removes the lock
    unlock = subprocess.run([sys.executable, "-m", "workflow.lib.lock"], cwd=repo_copy, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(repo_copy)})
    assert "removed Snakemake's lock left by a run that was killed" in unlock.stderr, unlock.stderr
    p = snakemake(repo_copy, "--cores", "all", *two, *config)  # rerun-incomplete is in the profile
    assert p.returncode == 0, p.stderr[-3000:]
    assert jobs(p.stdout + p.stderr) == {"run_cell": 1}
    assert (repo_copy / first).stat().st_mtime_ns == done and (repo_copy / killed).exists()
    assert not list((repo_copy / "results/cells").rglob("*.tmp"))


def test_lint_and_format_clean():
    fmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                         capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--config", "preset=smoke", "runner=local"], cwd=REPO,
                          capture_output=True, text=True)
    # accepted lint (README, "Lint"): software is pinned per image in containers/, not per rule via conda
    lints = re.findall(r"^    \* (.+?):?$", lint.stdout + lint.stderr, re.M)
    assert set(lints) <= {"Specify a conda environment or container for each rule."}, lint.stdout + lint.stderr
