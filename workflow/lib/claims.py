"""The paper's claims C1-C7 (docs/PAPER.md) as code: each a small function over this run's tables.

A claim returns `supported`, `not supported` or `not measured` (naming the cells it lacks), with
the numbers it used and the threshold it applied. Thresholds are wider than the paper's words
("~70%", "~10x") because those are approximate: each says what it accepts. A claim is judged
only on the tables it is given (this run), never on numbers written here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

SUPPORTED, NOT_SUPPORTED, NOT_MEASURED = "supported", "not supported", "not measured"
COLUMNS = ("claim", "statement", "verdict", "evidence", "threshold", "missing")


@dataclass
class Verdict:
    claim: str
    statement: str
    verdict: str
    evidence: str = ""
    threshold: str = ""
    missing: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return {"claim": self.claim, "statement": self.statement, "verdict": self.verdict,
                "evidence": self.evidence, "threshold": self.threshold, "missing": "; ".join(self.missing)}


def ok(tables: dict[str, pd.DataFrame], experiment: str, **where) -> pd.DataFrame:
    """The cells of one experiment that measured (status ok), filtered by column == value."""
    df = tables.get(experiment)
    if df is None or df.empty:
        return pd.DataFrame()
    df = df[df["status"] == "ok"] if "status" in df else df
    for col, val in where.items():
        if col not in df:
            return df.iloc[0:0]
        df = df[df[col] == val]
    return df


def has_gpu_memory(df: pd.DataFrame) -> bool:
    return "peak_device_mem_gb" in df and df["peak_device_mem_gb"].notna().any()


def fmt(x: float, unit: str = "") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}{unit}"


def full_cache_baseline(df: pd.DataFrame) -> str | None:
    """vLLM where it ran (the paper's baseline), else the transformers engine's full cache."""
    for fw in ("vllm", "hf"):
        if (df["framework"] == fw).any():
            return fw
    return None


def c1(t) -> Verdict:
    s = "vLLM is fastest (lowest latency, highest throughput) whenever the full cache fits."
    thr = "at every (model, batch) of `batch` where vLLM ran ok: its output tok/s >= and mean E2E <= every other framework's"
    df = ok(t, "batch")
    vl = df[df["framework"] == "vllm"] if not df.empty else df
    if vl.empty:
        return Verdict("C1", s, NOT_MEASURED, threshold=thr, missing=["batch/vllm/* (no ok vLLM cell)"])
    lost, points = [], 0
    for (model, bs), g in df.groupby(["model", "batch_size"]):
        v, others = g[g["framework"] == "vllm"], g[g["framework"] != "vllm"]
        if v.empty or others.empty:
            continue
        points += 1
        best_tps, v_tps = others["output_tok_s"].max(), v["output_tok_s"].max()
        best_e2e, v_e2e = others["e2e_ms_mean"].min(), v["e2e_ms_mean"].min()
        if v_tps < best_tps or v_e2e > best_e2e:
            who = others.loc[others["output_tok_s"].idxmax(), "framework"]
            lost.append(f"{model} bs{bs}: vLLM {fmt(v_tps)} tok/s, {fmt(v_e2e)} ms vs best other ({who}) "
                        f"{fmt(best_tps)} tok/s, {fmt(best_e2e)} ms")
    if points == 0:
        return Verdict("C1", s, NOT_MEASURED, threshold=thr, missing=["batch/{hf,h2o,infinigen}/* at vLLM's batch sizes"])
    ev = f"{points} batch points compared" + (": " + "; ".join(lost) if lost else ", vLLM first at all")
    return Verdict("C1", s, NOT_SUPPORTED if lost else SUPPORTED, ev, thr)


def c2(t) -> Verdict:
    s = "H2O cuts GPU memory by up to ~70%."
    thr = "largest cut of peak GPU memory (device level) vs the full cache at the same (model, batch) >= 50%"
    df = ok(t, "batch")
    if df.empty or not (df["framework"] == "h2o").any():
        return Verdict("C2", s, NOT_MEASURED, threshold=thr, missing=["batch/h2o/*"])
    if not has_gpu_memory(df):
        return Verdict("C2", s, NOT_MEASURED, threshold=thr,
                       missing=["batch/* with GPU memory (a CPU run has process RSS only)"])
    base = full_cache_baseline(df)
    if base is None:
        return Verdict("C2", s, NOT_MEASURED, threshold=thr, missing=["batch/vllm/* or batch/hf/*"])
    cuts = []
    for (model, bs), g in df.groupby(["model", "batch_size"]):
        h, b = g[g["framework"] == "h2o"], g[g["framework"] == base]
        if h.empty or b.empty:
            continue
        cuts.append((1 - h["peak_device_mem_gb"].min() / b["peak_device_mem_gb"].max(), model, bs))
    if not cuts:
        return Verdict("C2", s, NOT_MEASURED, threshold=thr, missing=[f"batch/{base}/* at H2O's batch sizes"])
    best = max(cuts)
    ev = (f"cut vs {base}: " + ", ".join(f"bs{bs} {c:.0%}" for c, _, bs in sorted(cuts, key=lambda x: x[2]))
          + f"; largest {best[0]:.0%} ({best[1]} bs{best[2]})")
    return Verdict("C2", s, SUPPORTED if best[0] >= 0.5 else NOT_SUPPORTED, ev, thr)


def scaling(g: pd.DataFrame) -> tuple[float, str]:
    """Throughput gain from the smallest to the largest batch over the batch ratio (1 = linear)."""
    g = g.groupby("batch_size")["output_tok_s"].max().sort_index()
    lo, hi = g.index[0], g.index[-1]
    eff = (g.iloc[-1] / g.iloc[0]) / (hi / lo)
    return eff, f"bs{lo} {fmt(g.iloc[0])} -> bs{hi} {fmt(g.iloc[-1])} tok/s (scaling efficiency {eff:.2f})"


def c3(t) -> Verdict:
    s = "H2O throughput scales ~linearly with batch; its throughput per GB is ~3x vLLM's."
    thr = ("H2O tok/s(largest batch)/tok/s(smallest) >= 0.7 x the batch ratio, and H2O's output tok/s per GB "
           "of peak GPU memory >= 2x vLLM's at the largest batch both ran")
    df = ok(t, "batch")
    h = df[df["framework"] == "h2o"] if not df.empty else df
    if h.empty or h["batch_size"].nunique() < 2:
        return Verdict("C3", s, NOT_MEASURED, threshold=thr, missing=["batch/h2o/* at two or more batch sizes"])
    eff, ev = scaling(h)
    v = df[df["framework"] == "vllm"]
    missing = []
    if v.empty:
        missing.append("batch/vllm/*")
    if not has_gpu_memory(df):
        missing.append("batch/* with GPU memory (a CPU run has process RSS only)")
    if missing:
        return Verdict("C3", s, NOT_MEASURED, "linearity measured: " + ev, thr, missing)
    both = sorted(set(h["batch_size"]) & set(v["batch_size"]))
    if not both:
        return Verdict("C3", s, NOT_MEASURED, ev, thr, ["batch/vllm/* at H2O's batch sizes"])
    bs = both[-1]
    ratio = (h[h["batch_size"] == bs]["output_tok_s_per_gb"].max() / v[v["batch_size"] == bs]["output_tok_s_per_gb"].max())
    ev += f"; per GB H2O/vLLM at bs{bs}: {ratio:.2f}x"
    return Verdict("C3", s, SUPPORTED if eff >= 0.7 and ratio >= 2 else NOT_SUPPORTED, ev, thr)


def c4(t) -> Verdict:
    s = "InfiniGen stays at ~8 tok/s whatever the batch, ~10x below vLLM: PCIe-bound."
    thr = ("InfiniGen tok/s max/min over the batch sweep <= 2 (flat), and vLLM/InfiniGen >= 5x at every batch "
           "both ran (the 8 tok/s itself is the paper's hardware)")
    df = ok(t, "batch")
    ig = df[df["framework"] == "infinigen"] if not df.empty else df
    if ig.empty or ig["batch_size"].nunique() < 2:
        return Verdict("C4", s, NOT_MEASURED, threshold=thr, missing=["batch/infinigen/* at two or more batch sizes"])
    per_bs = ig.groupby("batch_size")["output_tok_s"].max()
    spread = per_bs.max() / per_bs.min()
    ev = "InfiniGen " + ", ".join(f"bs{b} {fmt(x)}" for b, x in per_bs.items()) + f" tok/s (max/min {spread:.2f})"
    v = df[df["framework"] == "vllm"].groupby("batch_size")["output_tok_s"].max()
    both = sorted(set(per_bs.index) & set(v.index))
    if not both:
        return Verdict("C4", s, NOT_MEASURED, ev, thr, ["batch/vllm/* at InfiniGen's batch sizes"])
    ratios = {b: v[b] / per_bs[b] for b in both}
    ev += "; vLLM/InfiniGen " + ", ".join(f"bs{b} {r:.1f}x" for b, r in ratios.items())
    return Verdict("C4", s, SUPPORTED if spread <= 2 and min(ratios.values()) >= 5 else NOT_SUPPORTED, ev, thr)


def longest_ok(df: pd.DataFrame, fw: str, prefill: str | None = None) -> tuple[float, float]:
    """(longest prompt that ran ok, shortest that ran out of memory) for one framework/prefill."""
    g = df[df["framework"] == fw]
    if prefill:
        g = g[g["prefill"] == prefill]
    good = g.loc[g["status"] == "ok", "prompt_len"]
    oom = g.loc[g["status"] == "oom", "prompt_len"]
    return (good.max() if len(good) else math.nan), (oom.min() if len(oom) else math.nan)


def c5(t) -> Verdict:
    s = ("Past ~15K-token prompts H2O and InfiniGen run out of memory before vLLM unless FA2 or chunked "
         "prefill is used; InfiniGen with FA2 reaches 128K.")
    thr = ("H2O and InfiniGen with eager prefill: out of memory at a prompt <= 32K that vLLM ran; H2O chunked and "
           "InfiniGen flash: ok at >= 127K-token prompts")
    df = t.get("ttft_prompt")
    if df is None or df.empty:
        return Verdict("C5", s, NOT_MEASURED, threshold=thr, missing=["ttft_prompt/*"])
    missing = []
    longest = df["prompt_len"].max()
    if longest < 127 * 1024:
        missing.append(f"ttft_prompt cells with prompts >= 127K (this sweep's longest: {longest})")
    if not (df["framework"] == "vllm").any():
        missing.append("ttft_prompt/vllm/*")
    pts = {(fw, p): longest_ok(df, fw, p) for fw, p in
           [("h2o", "eager"), ("infinigen", "eager"), ("h2o", "chunked"), ("infinigen", "flash"), ("vllm", None)]}
    ev = "; ".join(f"{fw}{'/' + p if p else ''}: longest ok {fmt(a)}, first OOM {fmt(b)}" for (fw, p), (a, b) in pts.items())
    if missing:
        return Verdict("C5", s, NOT_MEASURED, ev, thr, missing)
    v_ok = pts[("vllm", None)][0]
    eager_ok = all(not math.isnan(pts[(fw, "eager")][1]) and pts[(fw, "eager")][1] <= 32768
                   and pts[(fw, "eager")][1] <= v_ok for fw in ("h2o", "infinigen"))
    long_ok = all(pts[k][0] >= 127 * 1024 for k in [("h2o", "chunked"), ("infinigen", "flash")])
    return Verdict("C5", s, SUPPORTED if eager_ok and long_ok else NOT_SUPPORTED, ev, thr)


def budget_drop(acc: pd.DataFrame, fw: str, budget: float) -> dict[str, float]:
    """Per task: accuracy points lost at `budget` vs the full cache (budget 1.0, any framework)."""
    out = {}
    for task, g in acc.groupby("task"):
        full = g[g["kv_budget"] == 1.0]["value"]
        at = g[(g["framework"] == fw) & (g["kv_budget"] == budget)]["value"]
        if len(full) and len(at):
            out[task] = 100 * (full.mean() - at.mean())
    return out


def c6(t) -> Verdict:
    s = "At budget 0.1 H2O accuracy drops sharply (about -23 points in one task); InfiniGen holds."
    thr = "vs the full cache (budget 1.0): H2O at 0.1 loses >= 10 points in some task; InfiniGen at 0.1 loses <= 5 in every task"
    acc = ok(t, "accuracy")
    missing = [f"accuracy/{fw}/* at kv_budget 0.1" for fw in ("h2o", "infinigen")
               if acc.empty or acc[(acc["framework"] == fw) & (acc["kv_budget"] == 0.1)].empty]
    if acc.empty or not (acc["kv_budget"] == 1.0).any():
        missing.append("accuracy/* at kv_budget 1.0 (the full-cache baseline)")
    if missing:
        return Verdict("C6", s, NOT_MEASURED, threshold=thr, missing=missing)
    h, i = budget_drop(acc, "h2o", 0.1), budget_drop(acc, "infinigen", 0.1)
    if not h or not i:
        return Verdict("C6", s, NOT_MEASURED, threshold=thr, missing=["accuracy tasks with budget 1.0 and 0.1 rows"])
    ev = ("points lost at 0.1: H2O " + ", ".join(f"{k} {v:+.1f}" for k, v in h.items())
          + "; InfiniGen " + ", ".join(f"{k} {v:+.1f}" for k, v in i.items()))
    good = max(h.values()) >= 10 and max(i.values()) <= 5
    return Verdict("C6", s, SUPPORTED if good else NOT_SUPPORTED, ev, thr)


def c7(t) -> Verdict:
    s = "Fact retention: InfiniGen 92-94%; H2O about 70% beyond ~4K context."
    thr = ("at kv_budget < 1 and context >= 4096: InfiniGen's mean retention >= 85%, H2O's <= 80% "
           "and below InfiniGen's by >= 10 points")
    fr = ok(t, "fact_retention")
    if not fr.empty:
        fr = fr[(fr["kv_budget"] < 1.0) & (fr["context_len"] >= 4096)]
    missing = [f"fact_retention/{fw}/* at context >= 4096, kv_budget < 1" for fw in ("infinigen", "h2o")
               if fr.empty or not (fr["framework"] == fw).any()]
    if missing:
        return Verdict("C7", s, NOT_MEASURED, threshold=thr, missing=missing)
    m = {fw: fr[fr["framework"] == fw]["value"].mean() for fw in ("infinigen", "h2o")}
    n = {fw: int((fr["framework"] == fw).sum()) for fw in m}
    ev = "; ".join(f"{fw} {m[fw]:.0%} over {n[fw]} rows (contexts {sorted(fr[fr['framework'] == fw]['context_len'].unique().tolist())})"
                   for fw in m)
    good = m["infinigen"] >= 0.85 and m["h2o"] <= 0.8 and m["infinigen"] - m["h2o"] >= 0.10
    return Verdict("C7", s, SUPPORTED if good else NOT_SUPPORTED, ev, thr)


CLAIMS = (c1, c2, c3, c4, c5, c6, c7)


def judge(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.DataFrame([c(tables).row() for c in CLAIMS], columns=list(COLUMNS))
