"""The pipeline for real: a smoke run, a no-op rerun, single-cell reruns, resume after a kill."""

import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from frameworks.harness import result
from tests import browser
from tests.conftest import REPO, copy_repo, snakemake
from workflow.lib import celltable

pytestmark = pytest.mark.slow
# what every cell feeds besides its table and figures (a shipped smoke reference run exists: compared with)
REPORT = {"results/claims.csv", "results/guide/decision_guide.csv", "results/compare/reference.csv",
          "results/report/index.html"}


def cells_of(preset: str, **filters) -> dict:
    return celltable.build_cells({"preset": preset, "runner": "local", **filters}, celltable.load_preset(preset))


def jobs(stdout: str) -> dict[str, int]:
    """Snakemake's job-count table of a (dry-)run: rule -> count."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stdout, re.M) if m[1] != "total"}


def mtimes(repo) -> dict[str, float]:
    return {str(p.relative_to(repo)): p.stat().st_mtime_ns for p in (repo / "results").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("smoke") / "repo")
    p = snakemake(repo, "--cores", "all", "--config", "preset=smoke", "runner=local", timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    return repo


def test_paper_dry_run_lists_every_cell_of_every_framework(repo_copy):
    p = snakemake(repo_copy, "-n", "--cores", "1", "--config", "preset=paper")
    assert p.returncode == 0, p.stderr[-3000:]
    cells = cells_of("paper")
    assert {c.framework for c in cells.values()} == {"hf", "h2o", "infinigen", "vllm"}
    assert jobs(p.stdout)["run_cell"] == len(cells)
    for path in cells:
        assert path in p.stdout


def test_smoke_writes_tables_and_figures_from_real_runs(smoke):
    cells = cells_of("smoke")
    for path in cells:
        r = result.load(smoke / path)
        assert r["status"] == "ok", (path, r["message"])
        assert r["summary"]["output_tok_s"] > 0
    for exp in {c.experiment for c in cells.values()}:
        df = pd.read_csv(smoke / f"results/tables/{exp}.csv")
        assert len(df) == sum(c.experiment == exp for c in cells.values()) and "status" in df
    figs = list((smoke / "results/figures").glob("*.png"))
    # one script per figure (the decision guide's included); tables, claims and the report have their own
    scripts = [f for f in (smoke / "workflow/scripts").glob("*.py") if f.stem not in ("aggregate", "claims", "report")]
    assert len(figs) == len(scripts) == 9 and all(f.stat().st_size > 10_000 and f.with_suffix(".pdf").exists() for f in figs)


def test_report_has_every_claim_the_guide_and_the_reference_comparison(smoke):
    claims = pd.read_csv(smoke / "results/claims.csv").fillna("")
    assert list(claims["claim"]) == [f"C{i}" for i in range(1, 8)]
    assert set(claims["verdict"]) <= {"supported", "not supported", "not measured"}
    assert all(r.missing for r in claims.itertuples() if r.verdict == "not measured")  # names the missing cells
    assert (pd.read_csv(smoke / "results/guide/decision_guide.csv")["framework"] != "none meets").any()
    cmp = pd.read_csv(smoke / "results/compare/reference.csv")
    assert (cmp["flag"].isin(["within", "outside"])).any()  # matched against results/reference/smoke-*
    page = (smoke / "results/report/index.html").read_text()
    assert "results/reference/smoke-" in page and "C7" in page and "cdn" not in page.lower()


@pytest.mark.skipif(browser.chromium() is None and not os.environ.get("KVSTUDY_REQUIRE_BROWSER"),
                    reason="chromium not installed (apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_chromium(smoke):
    # the screenshot is a CI artifact: kept under this checkout's results/
    shot = REPO / "results/report/screenshot.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    found = browser.check(smoke / "results/report/index.html", shot)
    assert found["broken_images"] == [] and found["broken_links"] == [], found
    assert len(found["images"]) == 9 and found["screenshot"], found


def test_second_run_does_nothing(smoke):
    before = mtimes(smoke)
    p = snakemake(smoke, "--cores", "all", "--config", "preset=smoke", "runner=local")
    assert p.returncode == 0 and "Nothing to be done" in p.stdout + p.stderr
    assert mtimes(smoke) == before


def test_force_one_cell_redoes_only_that_cell(smoke):
    target = "results/cells/batch/hf/tiny-llama-3.1/bs4_in256_out32_kv1_sdpa.json"
    before = mtimes(smoke)
    p = snakemake(smoke, "--cores", "all", "--config", "preset=smoke", "runner=local", "-f", target)
    assert p.returncode == 0, p.stderr[-3000:]
    after = mtimes(smoke)
    assert [k for k in after if after[k] != before[k]] == [target]
    # the next full run refreshes only what depends on that cell
    p = snakemake(smoke, "--cores", "all", "--config", "preset=smoke", "runner=local")
    changed = {k for k, v in mtimes(smoke).items() if v != after[k]}
    assert changed == {"results/tables/batch.csv"} | {f"results/figures/{f}.{e}" for f in
                                                        ("throughput_vs_batch", "memory_vs_batch", "tok_s_per_gb_vs_batch",
                                                         "decision_guide") for e in ("pdf", "png")} | REPORT


def test_forcerun_redoes_cell_and_dependents(smoke):
    target = "results/cells/kv_budget/hf/tiny-llama-3.1/bs4_in256_out16_kv1_sdpa.json"
    p = snakemake(smoke, "--cores", "all", "--config", "preset=smoke", "runner=local", "-n", "--forcerun", target)
    assert jobs(p.stdout) == {"run_cell": 1, "table": 1, "figure": 1, "claims": 1, "decision_guide": 1,
                              "compare_reference": 1, "report": 1, "all": 1}, p.stdout


def test_status_lists_non_ok_cells_with_rerun_command(smoke):
    cell = smoke / "results/cells/model_size/hf/tiny-llama-3.1/bs4_in256_out16_kv1_sdpa.json"
    saved = cell.read_text()
    r = yaml.safe_load(saved)
    r.update(status="oom", message="OutOfMemoryError: test", summary=None, samples=[])
    result.write_atomic(cell, r)
    try:
        p = subprocess.run([sys.executable, "-m", "workflow.lib.status", "--config", "preset=smoke", "runner=local"], cwd=smoke,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(smoke)})
        assert p.returncode == 0, p.stderr
        rel = str(cell.relative_to(smoke))
        assert f"oom          {rel}" in p.stdout
        assert f"rerun: snakemake --cores all --config preset=smoke runner=local --forcerun {rel}" in p.stdout
        assert f"cells: {len(cells_of('smoke')) - 1} ok, 1 oom" in p.stdout
    finally:
        cell.write_text(saved)


def test_corrupt_result_is_named(smoke):
    cell = smoke / "results/cells/request_rate/hf/tiny-llama-3.1/bs8_in128_out16_kv1_sdpa_rate16-n16.json"
    saved = cell.read_text()
    cell.write_text(saved[: len(saved) // 2])
    try:
        p = snakemake(smoke, "--cores", "all", "--config", "preset=smoke", "runner=local", "--forcerun", "results/tables/request_rate.csv")
        assert p.returncode != 0
        assert f"{cell.relative_to(smoke)}: not a readable result JSON" in open(smoke / "logs/tables/request_rate.log").read() + p.stderr
        assert cell.exists()  # nothing computed is deleted
    finally:
        cell.write_text(saved)


def test_bad_config_touches_no_result(smoke):
    before = mtimes(smoke)
    p = snakemake(smoke, "--cores", "all", "--config", "preset=smoke", "runner=local", "frameworks=[nope]")
    assert p.returncode != 0 and mtimes(smoke) == before


def test_killed_run_resumes_without_redoing_finished_cells(repo_copy):
    args = [sys.executable, "-m", "snakemake", "--cores", "all", "--config", "preset=smoke", "runner=local",
            "experiments=[request_rate]", "frameworks=[hf]"]
    proc = subprocess.Popen(args, cwd=repo_copy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    n = len(cells_of("smoke", experiments=["request_rate"], frameworks=["hf"]))
    cells_dir = repo_copy / "results/cells/request_rate"
    logs_dir = repo_copy / "logs/cells/request_rate"
    deadline = time.time() + 300
    # cells run one at a time (cell_threads: all): once the second has started, the first is
    # finished and recorded by Snakemake, and the second is still running
    while time.time() < deadline and len(list(logs_dir.rglob("*.log"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # no clean shutdown: as a crash or a lost node
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in cells_dir.rglob("*.json")}
    assert 1 <= len(done) < n
    # a hard kill leaves Snakemake's lock behind: unlock, then resume (rerun-incomplete is in the profile)
    assert snakemake(repo_copy, "--unlock", "--config", "preset=smoke", "runner=local").returncode == 0
    p = snakemake(repo_copy, "--cores", "all", "--config", "preset=smoke", "runner=local", "experiments=[request_rate]",
                  "frameworks=[hf]")
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(f.stat().st_mtime_ns == t for f, t in done.items())  # finished cells were kept
    assert len(list(cells_dir.rglob("*.json"))) == n
    assert not list(cells_dir.rglob("*.tmp"))


def test_lint_and_format_clean():
    fmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                         capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stderr
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--config", "preset=smoke", "runner=local"], cwd=REPO,
                          capture_output=True, text=True)
    # accepted lint (README, "Lint"): software is pinned per image in containers/, not per rule via conda
    lints = re.findall(r"^    \* (.+?):?$", lint.stdout + lint.stderr, re.M)
    assert set(lints) <= {"Specify a conda environment or container for each rule."}, lint.stdout + lint.stderr
