"""Decision guide on a hand-made table: the best configuration meeting memory and SLOs, or none."""

import math

import pandas as pd

from workflow.lib import guide


def table():
    cols = ["cell_id", "framework", "model", "batch_size", "kv_budget", "prefill", "prompt_len", "gen_len",
            "output_tok_s", "peak_device_mem_gb", "peak_rss_gb", "ttft_ms_p90", "tpot_ms_p90"]
    rows = [("a", "vllm", "m", 8, 1.0, "flash", 100, 10, 800, 40, 1, 50, 10),
            ("b", "h2o", "m", 8, 0.2, "eager", 100, 10, 500, 15, 1, 60, 12),
            ("c", "hf", "m", 1, 1.0, "sdpa", 100, 10, 50, 12, 1, 20, 20)]
    df = pd.DataFrame(rows, columns=cols)
    df["status"] = "ok"
    return {"batch": df}


def test_best_meets_memory_and_slos():
    df = guide.candidates(table())
    assert df["memory_basis"].iloc[0] == "peak_device_mem_gb" and set(df["context_len"]) == {110}
    assert guide.best(df, math.inf, math.inf, math.inf)["framework"] == "vllm"
    assert guide.best(df, 20, math.inf, math.inf)["framework"] == "h2o"  # vLLM's 40 GB over the limit
    assert guide.best(df, 20, 30, math.inf)["framework"] == "hf"  # only hf's TTFT within 30 ms
    assert guide.best(df, 20, 30, 15) is None


def test_grid_covers_every_point_and_names_none_meets():
    g = guide.guide(table())
    assert len(g) == 4 * 4 * 4  # 3 quantiles + no limit, per axis, one model and context
    assert (g["framework"] == "none meets").any()
    nolimit = g[(g["mem_limit_gb"] == math.inf) & (g["ttft_slo_ms"] == math.inf) & (g["tpot_slo_ms"] == math.inf)]
    assert nolimit["framework"].tolist() == ["vllm"] and nolimit["output_tok_s"].tolist() == [800]


def test_cpu_run_uses_rss_and_empty_tables_give_an_empty_guide():
    t = table()
    t["batch"]["peak_device_mem_gb"] = float("nan")
    assert guide.candidates(t)["memory_basis"].iloc[0] == "peak_rss_gb"
    assert guide.guide({}).empty
