"""GPU verification of the H2O policy (frameworks/h2o) on one H100, in about 7 minutes.

    python benchmarks/gpu_h2o.py --out DIR [--tiny] [--time-budget-s S]

(a) batch:    Llama-3.1-8B (random bf16 weights), prompt 2048, 256 generated, batch 1/8/32:
              `hf` full cache (sdpa prefill) vs `h2o` at KV budget 0.2 (chunked and eager prefill).
(b) prompt:   batch 1, prompts 4K … 128K: where `h2o` eager prefill runs out of memory (later
              eager cells are skipped once one has), and how far chunked prefill goes.
(c) overhead: decode step time (TPOT) of `h2o` vs `hf` at equal cached length (h2o: prompt 2048
              at budget 0.5 keeps 1024; hf: prompt 992 + 64 generated averages 1024 cached; target
              <= 15%), and KV bytes of `h2o` at budgets 1.0 / 0.5 / 0.2 / 0.1 (batch 8) vs b x the
              full cache of the prompt (target: within 5%).

Every cell runs through the framework's adapter (`run_engine_cell`), so its metrics have the
pipeline's definitions, and its record is the pipeline's result JSON. Cells run in a worker
process that builds the model once (8B random weights: seconds on the GPU) and reuses it; an
OOM is a result (memory is released before the next cell); a crashed worker is replaced and the
cell it was running is recorded. A time guard skips (and records) cells that would not fit.
--tiny: the same plan with tiny models on the CPU (< 1 minute), to check the script itself.
Output: DIR/cells/*.json (one per cell), DIR/summary.json (rows, checks, provenance), a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frameworks.harness.spec import CellSpec  # noqa: E402  (torch-free)


def plan(tiny: bool) -> list[dict]:
    """Cells in priority order: name, spec, estimated seconds on the target, optional OOM chain."""
    if tiny:
        base = dict(model="tiny-llama-3.1", device="cpu", dtype="float32")
        batches, prompt, gen, chunk = (1, 4), 256, 16, 256
        sweep, eager_sweep, sweep_gen = (256, 512, 1024, 2048), (256, 512, 1024, 2048), 4
        over_prompt, over_gen = 512, 16
    else:
        base = dict(model="llama-3.1-8b", device="cuda", dtype="bfloat16")
        batches, prompt, gen, chunk = (1, 8, 32), 2048, 256, 2048
        eager_sweep, sweep_gen = (4096, 8192, 16384, 24576, 32768), 8
        sweep = (4096, 8192, 16384, 32768, 65536, 131072 - sweep_gen)  # "128K": the model's whole context
        over_prompt, over_gen = 2048, 64
    cells = []

    def add(name, est_s, chain=None, **kw):
        spec = CellSpec.from_dict({**base, "experiment": f"gpu_h2o_{name.split('/')[0]}", **kw})
        cells.append({"name": name, "spec": spec.to_dict(), "est_s": 0.5 if tiny else est_s, "chain": chain})

    for b in batches:  # (a)
        est = 10 + 0.2 * b
        common = dict(batch_size=b, prompt_len=prompt, gen_len=gen)
        add(f"batch/hf/bs{b}", est, framework="hf", prefill="sdpa", **common)
        add(f"batch/h2o-chunked/bs{b}", est, framework="h2o", prefill="chunked", chunk_size=chunk, kv_budget=0.2, **common)
        add(f"batch/h2o-eager/bs{b}", est + 0.1 * b, framework="h2o", prefill="eager", kv_budget=0.2, **common)
    for b in batches:  # (c): hf's cache averages over_prompt / 2 tokens over its decode, as h2o's slots
        add(f"overhead/hf/bs{b}", 5, framework="hf", prefill="sdpa", batch_size=b,
            prompt_len=over_prompt // 2 - over_gen // 2, gen_len=over_gen)
        add(f"overhead/h2o/bs{b}", 5, framework="h2o", prefill="chunked", chunk_size=chunk, kv_budget=0.5,
            batch_size=b, prompt_len=over_prompt, gen_len=over_gen)
    for budget in (1.0, 0.5, 0.2, 0.1):  # (c): KV bytes follow the budget
        add(f"budget/h2o/kv{budget}", 4, framework="h2o", prefill="chunked", chunk_size=chunk, kv_budget=budget,
            batch_size=batches[1], prompt_len=prompt, gen_len=over_gen // 4)
    for n in eager_sweep:  # (b)
        add(f"prompt/h2o-eager/in{n}", 2 + n / 2048, chain="eager", framework="h2o", prefill="eager", prompt_len=n,
            gen_len=sweep_gen, warmup=0)
    for n in sorted(sweep, reverse=True):  # the longest first: it is the point of this sweep
        add(f"prompt/h2o-chunked/in{n}", 2 + (n / 16384) ** 2 * 1.5, framework="h2o",
            prefill="chunked", chunk_size=chunk, prompt_len=n, gen_len=sweep_gen, warmup=0)
    return cells


def _key(name: str) -> str:
    return name.replace("/", "__")


# -- worker: runs cells in this process with one model ---------------------------------------------
def worker(out: Path, deadline: float) -> None:
    import gc
    import importlib

    import torch

    from frameworks import models, registry
    from frameworks.harness.outcome import run_and_record

    built: dict = {}
    original_build = models.build

    def cached_build(name, weights, device, dtype, attn_implementation, seed=0):
        key = (name, weights, device, dtype, seed)
        if key not in built:
            built.clear()
            gc.collect()
            built[key] = original_build(name, weights, device, dtype, attn_implementation, seed)
        built[key].set_attn_implementation(attn_implementation)
        return built[key]

    models.build = cached_build  # the runner looks it up at call time
    cells = json.loads((out / "plan.json").read_text())
    for cell in cells:
        path = out / "cells" / f"{_key(cell['name'])}.json"
        if path.exists():
            continue
        spec = CellSpec.from_dict(cell["spec"])
        skip = _skip_reason(out, cells, cell, deadline)
        if skip:
            _write(path, {**cell, "status": "skipped", "message": skip, "record": None})
            continue
        (out / "inflight").write_text(cell["name"])
        t0 = time.time()
        # classified and recorded as the pipeline's worker does (frameworks/harness/outcome.py)
        record = run_and_record(spec, lambda: importlib.import_module(registry.get(spec.framework).adapter).run(spec))
        status, message = record["status"], record["message"]
        _write(path, {**cell, "status": status, "message": message, "wall_s": time.time() - t0, "record": record})
        print(f"[gpu_h2o] {cell['name']}: {status} {message[:120]} ({time.time() - t0:.1f} s)", flush=True)
        for model in built.values():  # the policy (and its last cache) hangs on the attention modules
            for m in model.modules():
                m.__dict__.pop("h2o_policy", None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    (out / "inflight").unlink(missing_ok=True)


def _skip_reason(out: Path, cells: list[dict], cell: dict, deadline: float) -> str:
    if cell["chain"]:
        for c in cells[: cells.index(cell)]:
            done = out / "cells" / f"{_key(c['name'])}.json"
            if c["chain"] == cell["chain"] and done.exists() and json.loads(done.read_text())["status"] == "oom":
                return f"skipped: {c['name']} already ran out of memory"
    left = deadline - time.time()
    if cell["est_s"] > left:
        return f"skipped by the time guard: needs ~{cell['est_s']:.0f} s, {left:.0f} s left"
    return ""


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    os.replace(tmp, path)


# -- orchestrator ------------------------------------------------------------------------------------
def orchestrate(out: Path, tiny: bool, budget_s: float) -> int:
    t_start = time.time()
    deadline = t_start + budget_s
    out.mkdir(parents=True, exist_ok=True)
    cells = plan(tiny)
    (out / "plan.json").write_text(json.dumps(cells, indent=1))
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"))
    remaining = lambda: [c for c in cells if not (out / "cells" / f"{_key(c['name'])}.json").exists()]  # noqa: E731
    while remaining():
        before = len(remaining())
        cmd = [sys.executable, __file__, "--worker", "--out", str(out), "--deadline", str(deadline)]
        if tiny:
            cmd += ["--threads", "2"]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time() + 10))
            why = f"the worker process died (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            why = "timeout: killed at the time budget"
        inflight = out / "inflight"
        if inflight.exists():
            name = inflight.read_text()
            inflight.unlink()
            cell = next(c for c in cells if c["name"] == name)
            _write(out / "cells" / f"{_key(name)}.json", {**cell, "status": "timeout" if "timeout" in why else "error",
                                                           "message": why, "record": None})
        stuck = len(remaining()) == before  # the worker failed before running any cell
        if stuck or time.time() >= deadline:
            for c in remaining():
                _write(out / "cells" / f"{_key(c['name'])}.json",
                       {**c, "status": "error" if stuck else "skipped", "record": None,
                        "message": f"not run: {why}" if stuck else "skipped by the time guard"})
    summary = summarize(out, cells, tiny)
    summary["command"] = [sys.executable, *sys.argv]
    summary["wall_s"] = time.time() - t_start
    _write(out / "summary.json", summary)
    print_table(summary)
    return 0


def summarize(out: Path, cells: list[dict], tiny: bool) -> dict:
    from frameworks import models

    rows, provenance = [], None
    for c in cells:
        r = json.loads((out / "cells" / f"{_key(c['name'])}.json").read_text())
        rec, s = r.get("record"), c["spec"]
        summ = (rec or {}).get("summary") or {}
        provenance = provenance or (rec or {}).get("provenance")
        tpot = (summ.get("tpot_ms") or {}).get("mean")
        rows.append({
            "name": c["name"], "framework": s["framework"], "prefill": s["prefill"], "batch_size": s["batch_size"],
            "prompt_len": s["prompt_len"], "gen_len": s["gen_len"], "kv_budget": s["kv_budget"],
            "status": r["status"], "message": r["message"],
            "peak_gpu_mem_gb": summ.get("peak_gpu_mem_gb"), "peak_rss_gb": summ.get("peak_rss_gb"),
            "kv_cache_bytes": summ.get("kv_cache_bytes"),
            "ttft_ms": (summ.get("ttft_ms") or {}).get("mean"), "tpot_ms": tpot,
            "decode_tok_s": s["batch_size"] * 1e3 / tpot if tpot else None, "output_tok_s": summ.get("output_tok_s"),
            "extra": (rec or {}).get("extra"),
        })
    cfg = models.config_dict(cells[0]["spec"]["model"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    elt = 4 if cells[0]["spec"]["dtype"] == "float32" else 2
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim * elt
    return {"tiny": tiny, "provenance": provenance, "kv_bytes_per_token": per_token,
            "checks": checks(rows, per_token), "rows": rows}


def checks(rows: list[dict], per_token: int) -> dict:
    by = {r["name"]: r for r in rows}
    ok = lambda r: r is not None and r["status"] == "ok"  # noqa: E731
    out = {"kv_bytes_vs_budget": [], "peak_mem_vs_full": [], "decode_overhead": [], "prompt_sweep": {}}
    for r in rows:
        if r["framework"] == "h2o" and ok(r) and r["name"].startswith(("batch/", "overhead/", "budget/")):
            target = r["kv_budget"] * r["prompt_len"] * r["batch_size"] * per_token
            ratio = r["kv_cache_bytes"] / target
            out["kv_bytes_vs_budget"].append({"cell": r["name"], "kv_budget": r["kv_budget"], "ratio_to_b_x_full": ratio,
                                              "within_5pct": abs(ratio - 1) <= 0.05})
        if r["name"].startswith("batch/h2o"):
            full = by.get(f"batch/hf/bs{r['batch_size']}")
            if ok(r) and ok(full) and (full["peak_gpu_mem_gb"] or full["peak_rss_gb"]):
                key = "peak_gpu_mem_gb" if full["peak_gpu_mem_gb"] else "peak_rss_gb"
                out["peak_mem_vs_full"].append({
                    "cell": r["name"], "basis": key, "h2o": r[key], "full": full[key], "reduction": 1 - r[key] / full[key],
                    "kv_bytes_h2o": r["kv_cache_bytes"], "kv_bytes_full": full["kv_cache_bytes"],
                    "decode_tok_s_h2o": r["decode_tok_s"], "decode_tok_s_full": full["decode_tok_s"]})
        if r["name"].startswith("overhead/h2o"):
            full = by.get(f"overhead/hf/bs{r['batch_size']}")
            if ok(r) and ok(full):
                over = r["tpot_ms"] / full["tpot_ms"] - 1
                out["decode_overhead"].append({"batch_size": r["batch_size"], "tpot_ms_h2o": r["tpot_ms"],
                                               "tpot_ms_full": full["tpot_ms"], "overhead": over, "within_15pct": over <= 0.15})
    for mode in ("eager", "chunked"):
        sweep = [r for r in rows if r["name"].startswith(f"prompt/h2o-{mode}/")]
        reached = [r["prompt_len"] for r in sweep if r["status"] == "ok"]
        oom = [r["prompt_len"] for r in sweep if r["status"] == "oom"]
        out["prompt_sweep"][mode] = {"longest_ok": max(reached, default=None), "first_oom": min(oom, default=None),
                                     "statuses": {r["prompt_len"]: r["status"] for r in sweep}}
    return out


def print_table(summary: dict) -> None:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\n{'cell':34} {'status':8} {'peakGB':>7} {'KV MB':>9} {'TTFT ms':>9} {'TPOT ms':>8} {'dec tok/s':>9}")
    for r in summary["rows"]:
        peak = r["peak_gpu_mem_gb"] if r["peak_gpu_mem_gb"] is not None else r["peak_rss_gb"]
        kv = r["kv_cache_bytes"] / 1e6 if r["kv_cache_bytes"] is not None else None
        print(f"{r['name']:34} {r['status']:8} {f(peak, '7.2f')} {f(kv, '9.1f')} {f(r['ttft_ms'], '9.1f')} "
              f"{f(r['tpot_ms'], '8.2f')} {f(r['decode_tok_s'], '9.1f')}")
    c = summary["checks"]
    for x in c["peak_mem_vs_full"]:
        print(f"  {x['cell']}: peak memory {x['h2o']:.2f} vs full cache {x['full']:.2f} GB ({x['reduction']:.1%} saved), "
              f"KV {x['kv_bytes_h2o'] / 1e6:.1f} vs {x['kv_bytes_full'] / 1e6:.1f} MB")
    for x in c["decode_overhead"]:
        print(f"  decode overhead at equal cached length, bs{x['batch_size']}: {x['overhead']:+.1%} "
              f"({'ok' if x['within_15pct'] else 'ABOVE 15%'})")
    bad = [x["cell"] for x in c["kv_bytes_vs_budget"] if not x["within_5pct"]]
    print(f"  KV bytes within 5% of budget x full: {'all' if not bad else 'NOT ' + ', '.join(bad)} "
          f"({len(c['kv_bytes_vs_budget'])} cells)")
    for mode, x in c["prompt_sweep"].items():
        print(f"  prompt sweep {mode}: longest ok {x['longest_ok']}, first OOM {x['first_oom']}")
    prov = summary.get("provenance") or {}
    print(f"  {prov.get('gpu_name')} driver {prov.get('driver')} torch {(prov.get('versions') or {}).get('torch')} "
          f"transformers {(prov.get('versions') or {}).get('transformers')} git {(prov.get('git') or {}).get('commit')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script, < 1 minute)")
    ap.add_argument("--time-budget-s", type=float, default=None, help="cells stop after this (default 400; tiny 45)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        worker(Path(args.out), args.deadline)
        return 0
    budget = args.time_budget_s or (45.0 if args.tiny else 400.0)
    return orchestrate(Path(args.out), args.tiny, budget)


if __name__ == "__main__":
    sys.exit(main())
