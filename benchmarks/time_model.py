"""Time model: the per-cell wall times of a run -> how long a whole preset (default `paper`) takes
on 1 GPU and on G GPUs (`--resources gpu=G`: G cells at a time, one GPU each).

    python benchmarks/time_model.py --cells results/cells --logs logs/benchmarks/cells --gpus 1 2 4 8

A cell's wall time = start-up (process, imports, model build: the measured wall time less what the
cell timed itself, median per framework and model) + (warmup + repetitions) prefills + the decode
steps. Prefill: the measured prompt tokens per second of the nearest measured prompt size (batch ×
prompt tokens, same framework, model and prefill mode). Decode: the measured TPOT at the nearest
batch sizes (interpolated in log2 batch). Request-rate cells: the longer of the arrival span and the
batches' service time. A cell predicted out of memory (a measured cell of the same framework, model
and prefill mode, with as much GPU memory, ran out at no larger a batch x prompt, x prompt again for
eager prefill's attention scores) costs what such a cell took. A model without
measurements scales from the nearest measured one by parameter count (within 10x). Cells of a
framework (or model size) with no measured cell are listed, not guessed. G GPUs: longest-first list scheduling of the estimates.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frameworks import models  # noqa: E402
from workflow.lib import celltable  # noqa: E402


def n_params(model: str) -> float:
    """Parameters from the model's config.json (attention, MLP, embeddings): for scaling only."""
    c = models.config_dict(model)
    h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c.get("intermediate_size", 4 * c["hidden_size"])
    kv = c.get("num_key_value_heads") or c["num_attention_heads"]
    attn = 2 * h * h + 2 * h * h * kv / c["num_attention_heads"]
    experts = c.get("num_local_experts", 1)
    return layers * (attn + 3 * h * inter * experts) + 2 * c["vocab_size"] * h


def mem_size(prefill: str, batch: int, prompt_len: int) -> int:
    """What a cell's peak memory grows with: eager prefill materialises batch x L x L attention
    scores; the other modes hold batch x L tokens of KV and activations."""
    return batch * prompt_len * (prompt_len if prefill == "eager" else 1)


def _bench_wall(logs: Path | None, cell: Path, cells_root: Path) -> float | None:
    """Snakemake's `benchmark:` wall time of the job (the whole job, process start included)."""
    if logs is None:
        return None
    tsv = logs / cell.relative_to(cells_root).with_suffix(".tsv")
    if not tsv.is_file():
        return None
    rows = list(csv.DictReader(tsv.open(), delimiter="\t"))
    return float(rows[0]["s"]) if rows else None


def observations(cells_root: Path, logs: Path | None) -> list[dict]:
    obs = []
    for path in sorted(cells_root.rglob("*.json")):
        r = json.loads(path.read_text())
        if isinstance(r, dict) and isinstance(r.get("record"), dict):
            r = r["record"]  # benchmarks/gpu_h2o.py wraps each cell's result
        if not isinstance(r, dict) or not {"spec", "status", "started_at", "ended_at"} <= set(r):
            continue  # not a cell result
        sp, s, ex = r["spec"], r.get("summary") or {}, r.get("extra") or {}
        if sp.get("task"):
            continue  # accuracy / fact-retention cells: no TTFT or decode timing to model (their time is per example)
        wall = _bench_wall(logs, path, cells_root)
        if wall is None:
            wall = (datetime.fromisoformat(r["ended_at"]) - datetime.fromisoformat(r["started_at"])).total_seconds()
        o = {"path": str(path), "framework": sp["framework"], "model": sp["model"], "prefill": sp["prefill"],
             "batch": sp["batch_size"], "tokens": sp["batch_size"] * sp["prompt_len"], "status": r["status"],
             "size": mem_size(sp["prefill"], sp["batch_size"], sp["prompt_len"]),
             "cap": sp.get("gpu_memory_gb"), "wall_s": wall, "rate": sp.get("request_rate") is not None, "spec": sp}
        if r["status"] == "ok":
            step = s["tpot_ms"]["mean"] / 1e3 if s.get("tpot_ms") else 0.0
            # the warm-up's own prefill and steps are modelled per cell; what it took beyond them
            # (first-time allocations, kernel compilation) is start-up, like imports and model build
            warm = ex.get("warmup_s", 0.0)
            if not o["rate"]:
                o["prefill_tok_s"] = o["tokens"] / (s["ttft_ms"]["mean"] / 1e3)
                warm = sp.get("warmup", 1) * (s["ttft_ms"]["mean"] / 1e3 + (min(sp["gen_len"], 4) - 1) * step)
            o["overhead_s"] = max(0.0, wall - s["repetitions"] * s["duration_s"] - warm)
            if s.get("tpot_ms"):
                o["step_s"] = step
        elif r["status"] in ("oom", "unsupported"):
            o["failed_s"] = wall  # it ends at start-up or at its first allocation
        obs.append(o)
    return obs


def _interp(points: dict[int, float], batch: int) -> float:
    """Linear in log2(batch) between the nearest measured batch sizes; flat beyond them."""
    pts = sorted(points.items())
    if not pts:
        return 0.0
    lo = [p for p in pts if p[0] <= batch] or pts[:1]
    hi = [p for p in pts if p[0] >= batch] or pts[-1:]
    (b0, v0), (b1, v1) = lo[-1], hi[0]
    if b0 == b1:
        return v0
    w = (math.log2(batch) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
    return v0 + w * (v1 - v0)


class Model:
    def __init__(self, obs: list[dict]):
        self.obs = obs
        self.measured = {(o["framework"], o["model"]) for o in obs if o["status"] == "ok"}

    def _proxy(self, fw: str, model: str) -> tuple[str, float] | None:
        """(measured model, scale) for fw: the model itself, else the nearest in parameters."""
        if (fw, model) in self.measured:
            return model, 1.0
        cands = [m for f, m in self.measured if f == fw]
        if not cands:
            return None
        near = min(cands, key=lambda m: abs(math.log(n_params(m) / n_params(model))))
        scale = n_params(model) / n_params(near)
        return (near, scale) if 0.1 <= scale <= 10 else None  # beyond 10x: no basis for a guess

    def _ok(self, fw, model, **match):
        return [o for o in self.obs if o["framework"] == fw and o["model"] == model and o["status"] == "ok"
                and all(o[k] == v for k, v in match.items())]

    startup_s: float | None = None  # --startup-s: assumed, for cells not run one process each

    def overhead(self, fw, model, batch) -> float:
        """Start-up at this batch size (host buffers grow with it): interpolated over the measured ones."""
        if self.startup_s is not None:
            return self.startup_s
        by_batch: dict[int, list] = {}
        for o in self._ok(fw, model):
            by_batch.setdefault(o["batch"], []).append(o["overhead_s"])
        return _interp({b: statistics.median(v) for b, v in by_batch.items()}, batch)

    def failed_s(self, fw, model, batch) -> float:
        vals = [o["failed_s"] for o in self.obs if (o["framework"], o["model"]) == (fw, model) and "failed_s" in o]
        return statistics.median(vals) if vals and self.startup_s is None else self.overhead(fw, model, batch)

    def prefill_s(self, fw, model, prefill, tokens) -> float:
        pool = [o for o in self._ok(fw, model, prefill=prefill) if "prefill_tok_s" in o]
        pool = pool or [o for o in self._ok(fw, model) if "prefill_tok_s" in o]
        o = min(pool, key=lambda o: abs(math.log(o["tokens"] / tokens)))
        return tokens / o["prefill_tok_s"]

    def step_s(self, fw, model, batch) -> float:
        by_batch: dict[int, list] = {}
        for o in self._ok(fw, model):
            if "step_s" in o:
                by_batch.setdefault(o["batch"], []).append(o["step_s"])
        return _interp({b: statistics.median(v) for b, v in by_batch.items()}, batch)

    def predicts_oom(self, fw, model, prefill, size, cap) -> bool:
        """A measured cell with as much memory or more (an uncapped one counts as more) ran out at no
        larger a size (mem_size)."""
        ooms = [o["size"] for o in self.obs if (o["framework"], o["model"], o["prefill"], o["status"])
                == (fw, model, prefill, "oom") and (o["cap"] is None or cap is not None and o["cap"] >= cap)]
        return bool(ooms) and size >= min(ooms)

    def estimate(self, spec) -> tuple[float, str] | None:
        """(seconds, status predicted) for one cell, or None without a measurement of its framework."""
        proxy = self._proxy(spec.framework, spec.model)
        if proxy is None:
            return None
        model, scale = proxy
        fw, B, L, gen = spec.framework, spec.batch_size, spec.prompt_len, spec.gen_len
        grow = scale if scale > 1 else 1.0  # a larger model takes longer to build; a smaller one still imports
        if self.predicts_oom(fw, spec.model, spec.prefill, mem_size(spec.prefill, B, L), spec.gpu_memory_gb):
            return self.failed_s(fw, model, B) * grow, "oom"
        start = self.overhead(fw, model, B) * grow
        pre, step = self.prefill_s(fw, model, spec.prefill, B * L) * scale, self.step_s(fw, model, B) * scale
        batch_s = pre + (gen - 1) * step
        warm = spec.warmup * (pre + (min(gen, 4) - 1) * step)
        if spec.is_rate_cell:
            n = spec.num_requests
            span = 0.0 if math.isinf(spec.request_rate) else n / spec.request_rate
            rep = max(span, math.ceil(n / B) * batch_s)
        else:
            rep = batch_s
        return start + warm + spec.repetitions * rep, "ok"


def lpt_makespan(times: list[float], gpus: int) -> float:
    """Longest first onto the least loaded GPU: what G independent one-GPU jobs take at best."""
    loads = [0.0] * gpus
    for t in sorted(times, reverse=True):
        loads[loads.index(min(loads))] += t
    return max(loads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", required=True, type=Path, help="a run's cell results (results/cells or a reference run's)")
    ap.add_argument("--logs", type=Path, help="its Snakemake benchmark files (logs/benchmarks/cells), if any")
    ap.add_argument("--preset", default="paper", help="the preset to estimate (default paper)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--json", type=Path, help="also write the estimate here")
    ap.add_argument("--startup-s", type=float, help="assume this start-up per cell instead of the measured one "
                    "(for cells that did not run one process each, such as the H100 scripts' cells)")
    args = ap.parse_args(argv)
    if not args.cells.is_dir():
        print(f"time_model: {args.cells} is not a folder of cell results", file=sys.stderr)
        return 2
    obs = observations(args.cells, args.logs if args.logs and args.logs.is_dir() else None)
    if not any(o["status"] == "ok" for o in obs):
        print(f"time_model: no measured (ok) cell under {args.cells}", file=sys.stderr)
        return 2
    model = Model(obs)
    model.startup_s = args.startup_s
    cells = celltable.cells_from_config({"preset": args.preset, "runner": "local"})
    est, missing, tasks = {}, [], []
    for path, spec in cells.items():
        if spec.task:
            tasks.append(path)
            continue
        e = model.estimate(spec)
        (missing.append(path) if e is None else est.__setitem__(path, (spec, *e)))
    print(f"time model from {sum(o['status'] == 'ok' for o in obs)} measured cells ({len(obs)} results) in {args.cells}")
    for fw, m in sorted(model.measured):
        bs = sorted({o['batch'] for o in model._ok(fw, m) if 'step_s' in o})
        steps = ", ".join(f"bs{b} {model.step_s(fw, m, b) * 1e3:.0f}" for b in bs)
        ups = ", ".join(f"bs{b} {model.overhead(fw, m, b):.1f}" for b in bs)
        print(f"  {fw:9} {m:14} start-up s: {ups or '-'}; decode step ms: {steps or '-'}")
    print(f"\npreset {args.preset}: {len(cells)} cells, {len(est)} estimated")
    by_exp: dict[str, list] = {}
    for spec, t, status in est.values():
        by_exp.setdefault(spec.experiment, []).append((t, status))
    for exp, v in sorted(by_exp.items()):
        print(f"  {exp:13} {len(v):4} cells {sum(t for t, _ in v) / 60:7.1f} min"
              f" ({sum(s == 'oom' for _, s in v)} predicted out of memory)")
    times = [t for _, t, _ in est.values()]
    span = {g: lpt_makespan(times, g) for g in args.gpus}
    for g in args.gpus:
        print(f"  on {g} GPU{'s' if g > 1 else ' '}: {span[g] / 3600:5.2f} h")
    if missing:
        fws = sorted({cells[p].framework for p in missing})
        print(f"  not estimated ({len(missing)} cells of {', '.join(fws)}: no measured cell of that framework "
              "and model size): not in the totals")
    if tasks:
        print(f"  not estimated ({len(tasks)} accuracy / fact-retention cells: their time grows with the task's "
              "examples, not with the timing this model fits): not in the totals")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "cells": len(cells), "not_estimated_tasks": tasks,
                                         "estimated_s": {p: t for p, (_, t, _) in est.items()},
                                         "makespan_s": span, "not_estimated": missing}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
