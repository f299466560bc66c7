"""The time model (benchmarks/time_model.py) on the shipped H100 reference cells."""

import importlib.util
import json
from pathlib import Path

import pytest

from frameworks.harness.spec import CellSpec
from tests.conftest import REPO

spec_ = importlib.util.spec_from_file_location("time_model", REPO / "benchmarks" / "time_model.py")
tm = importlib.util.module_from_spec(spec_)
spec_.loader.exec_module(tm)
CELLS = REPO / "results/reference/h100-2026-11-28/infinigen-triton/cells"


@pytest.fixture(scope="module")
def model():
    return tm.Model(tm.observations(CELLS, None))


def own_spec(path: Path) -> CellSpec:
    return CellSpec.from_dict(json.loads(path.read_text())["spec"])


def test_a_measured_cell_is_predicted_from_its_own_times(model):
    for o in model.obs:
        if o["status"] == "ok" and o["spec"]["prompt_len"] <= 16384:  # long prompts: their own nearest point
            t, status = model.estimate(own_spec(Path(o["path"])))
            assert status == "ok"
            assert abs(t - o["wall_s"]) <= max(2.0, 0.25 * o["wall_s"]), (o["path"], t, o["wall_s"])


def test_out_of_memory_boundary_is_kept_under_a_cap(model):
    d = {"experiment": "t", "framework": "infinigen", "model": "llama-3.1-8b", "prefill": "eager", "kv_budget": 0.2,
         "batch_size": 1, "gen_len": 1, "gpu_memory_gb": 85.0}
    assert model.estimate(CellSpec.from_dict({**d, "prompt_len": 32768}))[1] == "oom"
    assert model.estimate(CellSpec.from_dict({**d, "prompt_len": 8192}))[1] == "ok"
    # as many tokens as the 16K cell that ran out, but batch 8 x 2048: an eighth of its attention scores
    assert model.estimate(CellSpec.from_dict({**d, "prompt_len": 2048, "batch_size": 8}))[1] == "ok"
    assert model.estimate(CellSpec.from_dict({**d, "framework": "h2o", "prompt_len": 8192})) is None  # no h2o cell


def test_more_gpus_never_take_longer():
    times = [3, 3, 2, 2, 2]
    assert tm.lpt_makespan(times, 1) == 12 and tm.lpt_makespan(times, 2) == 7 and tm.lpt_makespan(times, 8) == 3


def test_cli_estimates_paper_and_lists_what_it_cannot(tmp_path, capsys):
    out = tmp_path / "est.json"
    assert tm.main(["--cells", str(CELLS), "--gpus", "1", "4", "--startup-s", "20", "--json", str(out)]) == 0
    est = json.loads(out.read_text())
    assert est["makespan_s"]["4"] < est["makespan_s"]["1"]
    # what the shipped H100 cells cannot time: vLLM and H2O; the accuracy cells are never timed by this model
    assert all("/vllm/" in p or "/h2o/" in p for p in est["not_estimated"]), est["not_estimated"]
    assert est["not_estimated_tasks"] and all(p.split("/")[2] in ("accuracy", "fact_retention")
                                              for p in est["not_estimated_tasks"])
    assert "not estimated" in capsys.readouterr().out
    assert tm.main(["--cells", str(tmp_path / "nothing")]) == 2


def test_snakemake_benchmark_wall_time_is_preferred(tmp_path):
    cells, logs = tmp_path / "cells" / "batch", tmp_path / "logs" / "batch"
    cells.mkdir(parents=True)
    logs.mkdir(parents=True)
    (cells / "c.json").write_text((CELLS / "batch_hf_bs8.json").read_text())
    (logs / "c.tsv").write_text("s\th:m:s\tmax_rss\n31.5\t0:00:31\t900\n")
    (o,) = tm.observations(tmp_path / "cells", tmp_path / "logs")
    assert o["wall_s"] == 31.5 and o["overhead_s"] > 25  # the job's start-up, beyond what the cell timed


def test_accuracy_cells_among_the_measured_ones_are_left_out(tmp_path):
    """The H200 pipeline run holds ok accuracy / fact-retention cells (no TTFT): the model fits the
    timed cells beside them (it raised KeyError 'ttft_ms' there)."""
    cells = REPO / "results/reference/h200-2026-12-02/pipeline/cells"
    obs = tm.observations(cells, None)
    assert obs and not any(o["spec"].get("task") for o in obs)
    assert any(p.parts[-4] == "fact_retention" and json.loads(p.read_text())["status"] == "ok"
               for p in cells.rglob("*.json"))
    assert tm.main(["--cells", str(cells), "--preset", "h200", "--gpus", "1", "--json", str(tmp_path / "e.json")]) == 0
