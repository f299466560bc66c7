"""Cell results -> one tidy row each (used by the table rule and the cell-status command)."""

from __future__ import annotations

import json

from frameworks.harness import result as cell_result
from frameworks.harness.metrics import LATENCY_METRICS, STAT_KEYS

SPEC_COLUMNS = ("experiment", "framework", "model", "batch_size", "prompt_len", "gen_len", "kv_budget", "prefill",
                "chunk_size", "decode", "request_rate", "num_requests", "burstiness", "repetitions", "seed", "device", "dtype",
                "gpu_memory_gb")
# KV-policy measurements (frameworks' `extra`; empty where a framework has none): InfiniGen's traffic
EXTRA_METRICS = ("fetched_tokens_per_step", "fetched_tokens_per_seq_layer_speculated", "fetched_bytes_per_step",
                 "selected_bytes_per_step", "h2d_bandwidth_gbps", "gather_ms_per_step", "host_kv_bytes")
# accuracy cells (the `accuracy` block): report (#14) writes claims C6/C7 over these columns
ACCURACY_COLUMNS = ("task", "metric", "value", "stderr", "n", "chance", "context_len", "kv_kept_fraction",
                    "kv_fetched_fraction")
# throughput repeatability: output_tok_s_std / output_tok_s over the repetitions (None below 2)
CV_LIMIT = 0.10  # what a smoke run aims at (issue #14): cells above it are flagged
SCALAR_METRICS = ("output_tok_s", "output_tok_s_std", "total_tok_s", "request_s", "duration_s", "kv_cache_bytes",
                  "peak_gpu_mem_gb", "peak_device_mem_gb", "peak_rss_gb", "output_tok_s_per_gb", "per_gb_basis")


def row(path: str) -> dict:
    res = cell_result.load(path)  # validates; a corrupt file is an error naming it
    spec, summary, prov = res["spec"], res["summary"] or {}, res["provenance"]
    out = {"cell_id": res["cell_id"], "status": res["status"], "message": res["message"]}
    out.update({k: spec.get(k) for k in SPEC_COLUMNS})
    out["policy"] = json.dumps(spec.get("policy") or {}, sort_keys=True)
    out.update({f"policy.{k}": v for k, v in sorted((spec.get("policy") or {}).items())})
    for m in LATENCY_METRICS:
        stats = summary.get(m) or {}
        out.update({f"{m}_{s}": stats.get(s) for s in STAT_KEYS})
    out.update({k: summary.get(k) for k in SCALAR_METRICS})
    out["output_tok_s_cv"] = throughput_cv(summary, spec.get("repetitions") or 0)
    out["cv_over_limit"] = None if out["output_tok_s_cv"] is None else out["output_tok_s_cv"] > CV_LIMIT
    extra = res.get("extra") or {}
    out.update({k: extra.get(k) for k in EXTRA_METRICS})
    if res["spec"].get("task") is not None:  # accuracy cells only: the other tables keep their columns
        acc = res.get("accuracy") or {}
        out.update({"weights": spec.get("weights"), "num_examples": spec.get("num_examples")})
        out.update({k: (acc.get(k) if k != "task" else acc.get(k, spec.get("task"))) for k in ACCURACY_COLUMNS})
    out.update({"gpu_name": prov.get("gpu_name"), "gpu_total_mem_gb": prov.get("gpu_total_mem_gb"),
                "host": prov.get("host"),
                "git_commit": (prov.get("git") or {}).get("commit"),
                "image_id": prov.get("image_id"), "path": path})
    return out


def throughput_cv(summary: dict, repetitions: int) -> float | None:
    """Coefficient of variation of output throughput over the repetitions (std / mean)."""
    mean, std = summary.get("output_tok_s"), summary.get("output_tok_s_std")
    if repetitions < 2 or not mean or std is None:
        return None
    return std / mean


def frame(rows: list[dict]):
    """Rows -> one table with the same column order in every experiment: the fixed columns of row(),
    then the policy keys the cells have (policy.<key>, sorted), so tables line up side by side."""
    import pandas as pd

    df = pd.DataFrame(rows)
    policy = sorted(c for c in df.columns if c.startswith("policy."))
    return df[[c for c in df.columns if c not in policy] + policy]
