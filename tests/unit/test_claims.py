"""Claims C1-C7 on small hand-made tables: each verdict, and `not measured` naming what is missing."""

import pandas as pd

from workflow.lib import claims


def batch(rows):
    cols = ["framework", "model", "batch_size", "output_tok_s", "e2e_ms_mean", "peak_device_mem_gb", "output_tok_s_per_gb"]
    df = pd.DataFrame(rows, columns=cols)
    df["status"] = "ok"
    return df


GPU_BATCH = batch([
    ("vllm", "m", 1, 100, 10, 40, 2.5), ("vllm", "m", 8, 700, 12, 45, 15.6),
    ("hf", "m", 1, 30, 30, 42, 0.7), ("hf", "m", 8, 200, 40, 60, 3.3),
    ("h2o", "m", 1, 40, 25, 16, 2.5), ("h2o", "m", 8, 300, 30, 18, 16.7),
    ("infinigen", "m", 1, 8, 120, 20, 0.4), ("infinigen", "m", 8, 9, 900, 22, 0.4),
])


def test_every_claim_is_not_measured_on_empty_tables_and_names_what_is_missing():
    out = claims.judge({})
    assert list(out["claim"]) == [f"C{i}" for i in range(1, 8)]
    assert set(out["verdict"]) == {"not measured"}
    assert out["missing"].str.len().gt(0).all()


def test_c1_supported_when_vllm_wins_everywhere_and_not_when_it_loses():
    assert claims.c1({"batch": GPU_BATCH}).verdict == "supported"
    slow = GPU_BATCH.copy()
    slow.loc[(slow.framework == "vllm") & (slow.batch_size == 8), "output_tok_s"] = 250
    v = claims.c1({"batch": slow})
    assert v.verdict == "not supported" and "bs8" in v.evidence and "h2o" in v.evidence


def test_c2_uses_gpu_memory_only_and_the_50_percent_threshold():
    v = claims.c2({"batch": GPU_BATCH})  # h2o 18 vs vllm 45 GB at bs8: 60%
    assert v.verdict == "supported" and "60%" in v.evidence
    cpu = GPU_BATCH.assign(peak_device_mem_gb=float("nan"))
    assert claims.c2({"batch": cpu}).verdict == "not measured"
    small = GPU_BATCH.copy()
    small.loc[small.framework == "h2o", "peak_device_mem_gb"] = 40
    assert claims.c2({"batch": small}).verdict == "not supported"


def test_c3_linearity_and_per_gb_ratio():
    v = claims.c3({"batch": GPU_BATCH})  # 300/40 = 7.5 over 8: efficiency 0.94; per GB 16.7/15.6 = 1.07x
    assert v.verdict == "not supported" and "1.07x" in v.evidence
    better = GPU_BATCH.copy()
    better.loc[better.framework == "h2o", "output_tok_s_per_gb"] = 40
    assert claims.c3({"batch": better}).verdict == "supported"
    no_vllm = GPU_BATCH[GPU_BATCH.framework != "vllm"]
    v = claims.c3({"batch": no_vllm})
    assert v.verdict == "not measured" and "batch/vllm/*" in v.missing and "efficiency 0.94" in v.evidence


def test_c4_flat_and_ten_times_below():
    v = claims.c4({"batch": GPU_BATCH})  # flat 8 -> 9 tok/s; vLLM 12.5x and 78x above
    assert v.verdict == "supported" and "bs1 12.5x" in v.evidence
    fast = GPU_BATCH.copy()
    fast.loc[fast.framework == "vllm", "output_tok_s"] = [30, 700]  # 3.75x at bs1: not ~10x
    assert claims.c4({"batch": fast}).verdict == "not supported"
    fast.loc[fast.framework == "vllm", "output_tok_s"] = [100, 700]
    fast.loc[fast.framework == "infinigen", "output_tok_s"] = [8, 40]  # scales: not flat
    assert claims.c4({"batch": fast}).verdict == "not supported"


def prompts(rows):
    return pd.DataFrame(rows, columns=["framework", "prefill", "prompt_len", "status"])


def test_c5_oom_boundary_and_128k():
    rows = [("vllm", "flash", p, "ok") for p in (1024, 16384, 131072)]
    rows += [("h2o", "eager", 1024, "ok"), ("h2o", "eager", 16384, "oom"), ("h2o", "chunked", 131072, "ok"),
             ("infinigen", "eager", 1024, "ok"), ("infinigen", "eager", 16384, "oom"),
             ("infinigen", "flash", 131072, "ok")]
    assert claims.c5({"ttft_prompt": prompts(rows)}).verdict == "supported"
    rows[-1] = ("infinigen", "flash", 131072, "oom")
    assert claims.c5({"ttft_prompt": prompts(rows)}).verdict == "not supported"
    short = prompts([("h2o", "eager", 2048, "ok")])
    v = claims.c5({"ttft_prompt": short})
    assert v.verdict == "not measured" and any("longest: 2048" in m for m in v.missing)


def acc(rows):
    df = pd.DataFrame(rows, columns=["framework", "task", "kv_budget", "value", "context_len"])
    df["status"] = "ok"
    return df


def test_c6_points_lost_at_budget_0_1():
    rows = [("hf", "boolq", 1.0, 0.80, 0), ("h2o", "boolq", 0.1, 0.57, 0), ("infinigen", "boolq", 0.1, 0.78, 0),
            ("hf", "piqa", 1.0, 0.70, 0), ("h2o", "piqa", 0.1, 0.68, 0), ("infinigen", "piqa", 0.1, 0.69, 0)]
    v = claims.c6({"accuracy": acc(rows)})
    assert v.verdict == "supported" and "boolq +23.0" in v.evidence
    rows[2] = ("infinigen", "boolq", 0.1, 0.60, 0)
    assert claims.c6({"accuracy": acc(rows)}).verdict == "not supported"
    v = claims.c6({"accuracy": acc(rows[:2])})
    assert v.verdict == "not measured" and v.missing == ["accuracy/infinigen/* at kv_budget 0.1"]


def test_c7_retention_beyond_4k():
    rows = [("infinigen", "fact", 0.2, 0.93, 8192), ("h2o", "fact", 0.2, 0.70, 8192), ("h2o", "fact", 0.2, 1.0, 1024)]
    v = claims.c7({"fact_retention": acc(rows)})
    assert v.verdict == "supported" and "h2o 70%" in v.evidence  # the 1024-token row is not counted
    rows[1] = ("h2o", "fact", 0.2, 0.90, 8192)
    assert claims.c7({"fact_retention": acc(rows)}).verdict == "not supported"
    assert claims.c7({"fact_retention": acc(rows[2:])}).verdict == "not measured"
