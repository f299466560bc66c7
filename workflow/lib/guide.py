"""The practitioner's decision guide, computed from this run's cells.

For each point of a grid (memory limit, TTFT SLO, TPOT SLO, context length) and each model: among
the configurations that measured (framework + batch size + KV budget + prefill), which one meets
the limit and both SLOs with the highest output throughput. SLOs are on p90 latency; a
configuration whose TPOT is undefined (one output token) meets only "no TPOT SLO". The grid is
taken from the run's own values (quantiles), so it spans what was measured on CPU or on an H100;
memory is device-level GPU memory on GPU runs and process RSS on CPU runs (column `memory_basis`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# the experiments whose cells are offline throughput configurations (request_rate: open loop, not one)
SOURCES = ("batch", "kv_budget", "model_size", "ttft_prompt")
COLUMNS = ("model", "context_len", "memory_basis", "mem_limit_gb", "ttft_slo_ms", "tpot_slo_ms", "framework",
           "batch_size", "kv_budget", "prefill", "output_tok_s", "peak_mem_gb", "ttft_p90_ms", "tpot_p90_ms",
           "cell_id", "candidates")


def candidates(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    frames = [t[t["status"] == "ok"] for e, t in tables.items() if e in SOURCES and t is not None and not t.empty]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    gpu = "peak_device_mem_gb" in df and df["peak_device_mem_gb"].notna().any()
    df["memory_basis"] = "peak_device_mem_gb" if gpu else "peak_rss_gb"
    df["peak_mem_gb"] = df["peak_device_mem_gb"] if gpu else df["peak_rss_gb"]
    df["context_len"] = df["prompt_len"] + df["gen_len"]
    return df.dropna(subset=["output_tok_s", "peak_mem_gb", "ttft_ms_p90"])


def nice(x: float) -> float:
    """Round up to 2 significant digits, so grid values read well (1234 -> 1300)."""
    if x <= 0 or not math.isfinite(x):
        return x
    e = 10 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / e) * e


def levels(values: pd.Series, qs=(0.25, 0.5, 0.75)) -> list[float]:
    """Grid levels: quantiles of what was measured, rounded, plus no limit (inf)."""
    v = values.dropna()
    out = sorted({nice(float(np.quantile(v, q))) for q in qs}) if len(v) else []
    return out + [math.inf]


def best(df: pd.DataFrame, mem: float, ttft: float, tpot: float) -> pd.Series | None:
    tp = df["tpot_ms_p90"]
    meets = (df["peak_mem_gb"] <= mem) & (df["ttft_ms_p90"] <= ttft) & ((tp <= tpot) | (tp.isna() & math.isinf(tpot)))
    hit = df[meets]
    return None if hit.empty else hit.loc[hit["output_tok_s"].idxmax()]


def guide(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    df = candidates(tables)
    rows = []
    if df.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    grid = {"mem": levels(df["peak_mem_gb"]), "ttft": levels(df["ttft_ms_p90"]), "tpot": levels(df["tpot_ms_p90"])}
    for (model, ctx), g in df.groupby(["model", "context_len"]):
        for mem in grid["mem"]:
            for ttft in grid["ttft"]:
                for tpot in grid["tpot"]:
                    b = best(g, mem, ttft, tpot)
                    row = {"model": model, "context_len": int(ctx), "memory_basis": g["memory_basis"].iloc[0],
                           "mem_limit_gb": mem, "ttft_slo_ms": ttft, "tpot_slo_ms": tpot, "candidates": len(g)}
                    if b is None:
                        row["framework"] = "none meets"
                    else:
                        row.update({k: b[k] for k in ("framework", "batch_size", "kv_budget", "prefill", "output_tok_s",
                                                      "peak_mem_gb", "cell_id")})
                        row.update({"ttft_p90_ms": b["ttft_ms_p90"], "tpot_p90_ms": b["tpot_ms_p90"]})
                    rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def focus(g: pd.DataFrame) -> pd.DataFrame:
    """The slice the figure draws: the model and context with the most configurations to choose from."""
    if g.empty:
        return g
    top = g.sort_values(["candidates", "context_len"], ascending=False).iloc[0]
    return g[(g["model"] == top["model"]) & (g["context_len"] == top["context_len"])]
