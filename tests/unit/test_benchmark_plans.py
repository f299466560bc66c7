"""benchmarks/gpu_h2o.py runs only the ablation no pipeline cell expresses: H2O against the full
cache at equal cached length (its plan, checked here without a GPU; the script itself runs on one,
or with --tiny on the CPU)."""

import importlib.util
from pathlib import Path

import pytest

from frameworks.h2o.budget import Budget
from frameworks.harness.spec import CellSpec

REPO = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("tiny", [True, False])
def test_gpu_h2o_pairs_h2o_with_the_full_cache_at_equal_cached_length(tiny):
    cells = load("gpu_h2o").plan(tiny)
    by = {c["name"]: CellSpec.from_dict(c["spec"]) for c in cells}
    batches = sorted({s.batch_size for s in by.values()})
    assert sorted(by) == sorted(f"overhead/{fw}/bs{b}" for fw in ("hf", "h2o") for b in batches)
    assert {s.experiment for s in by.values()} == {"gpu_h2o_overhead"}  # none of the pipeline's experiments
    for b in batches:
        h2o, hf = by[f"overhead/h2o/bs{b}"], by[f"overhead/hf/bs{b}"]
        heavy, recent = Budget.from_spec(h2o.kv_budget, h2o.policy).sizes(h2o.prompt_len)
        # hf's cache over its decode: prompt + 1 … prompt + gen - 1 tokens, on average prompt + gen / 2
        assert heavy + recent == hf.prompt_len + hf.gen_len / 2
        assert (h2o.gen_len, h2o.batch_size, h2o.model) == (hf.gen_len, hf.batch_size, hf.model)
