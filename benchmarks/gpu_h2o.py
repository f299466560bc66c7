"""H2O's decode overhead at equal cached length (an ablation no pipeline cell expresses), one GPU.

    python benchmarks/gpu_h2o.py --out DIR [--tiny] [--time-budget-s S]

What it measures: the decode step time (TPOT) of `h2o` against `hf` when both attend over the same
number of cached tokens, at batch 1/8/32 on Llama-3.1-8B (random bf16): `h2o` with a 2048-token
prompt at KV budget 0.5 keeps 1024 slots; `hf` with prompt 992 + 64 generated averages 1024 cached
tokens over its decode. The difference is H2O's bookkeeping (accumulated scores, eviction), not
a smaller cache: target <= 15%. A pipeline cell pairs a framework with one setting; this pairing
of two frameworks at different prompts is the ablation. (`benchmarks/gpu_engine.py` times the
bookkeeping kernels alone, inside one captured step.)

What it no longer measures, because the pipeline's cells do (run them with `--config
preset=paper` or `h200`, results/reference/h200-*/pipeline): throughput, peak memory and KV bytes
of hf / h2o vs batch (`batch`), KV bytes vs budget (`kv_budget`), how far eager and chunked
prefill go before running out of memory (`ttft_prompt`). The H100 reference run of the former
version is results/reference/h100-2026-11-28/h2o (at 91f62e2).

Every cell runs through the framework's adapter (`run_and_record`), so its metrics have the
pipeline's definitions and its record is the pipeline's result JSON. Cells run in a worker
process that builds the model once and reuses it; an OOM is a result; a crashed worker is
replaced and the cell it was running is recorded. A time guard skips (and records) cells that
would not fit. --tiny: the same plan with a tiny model on the CPU (< 1 minute), to check the script.
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
    """Cells in order: name, spec, estimated seconds on the target."""
    if tiny:
        base = dict(model="tiny-llama-3.1", device="cpu", dtype="float32")
        batches, prompt, gen, chunk = (1, 4), 512, 16, 256
    else:
        base = dict(model="llama-3.1-8b", device="cuda", dtype="bfloat16")
        batches, prompt, gen, chunk = (1, 8, 32), 2048, 64, 2048
    cells = []

    def add(name, est_s, **kw):
        spec = CellSpec.from_dict({**base, "experiment": "gpu_h2o_overhead", **kw})
        cells.append({"name": name, "spec": spec.to_dict(), "est_s": 0.5 if tiny else est_s})

    for b in batches:  # hf's cache averages prompt / 2 tokens over its decode, as h2o's slots at budget 0.5
        add(f"overhead/hf/bs{b}", 7, framework="hf", prefill="sdpa", batch_size=b,
            prompt_len=prompt // 2 - gen // 2, gen_len=gen)
        add(f"overhead/h2o/bs{b}", 7, framework="h2o", prefill="chunked", chunk_size=chunk, kv_budget=0.5,
            batch_size=b, prompt_len=prompt, gen_len=gen)
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
        skip = _skip_reason(cell, deadline)
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


def _skip_reason(cell: dict, deadline: float) -> str:
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
    rows, provenance = [], None
    for c in cells:
        r = json.loads((out / "cells" / f"{_key(c['name'])}.json").read_text())
        rec, s = r.get("record"), c["spec"]
        summ = (rec or {}).get("summary") or {}
        provenance = provenance or (rec or {}).get("provenance")
        rows.append({
            "name": c["name"], "framework": s["framework"], "prefill": s["prefill"], "batch_size": s["batch_size"],
            "prompt_len": s["prompt_len"], "gen_len": s["gen_len"], "kv_budget": s["kv_budget"],
            "status": r["status"], "message": r["message"], "kv_cache_bytes": summ.get("kv_cache_bytes"),
            "tpot_ms": (summ.get("tpot_ms") or {}).get("mean"), "extra": (rec or {}).get("extra"),
        })
    return {"tiny": tiny, "provenance": provenance, "checks": checks(rows), "rows": rows}


def checks(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    ok = lambda r: r is not None and r["status"] == "ok"  # noqa: E731
    out = {"decode_overhead": []}
    for r in rows:
        if r["name"].startswith("overhead/h2o"):
            full = by.get(f"overhead/hf/bs{r['batch_size']}")
            if ok(r) and ok(full):
                over = r["tpot_ms"] / full["tpot_ms"] - 1
                out["decode_overhead"].append({"batch_size": r["batch_size"], "tpot_ms_h2o": r["tpot_ms"],
                                               "tpot_ms_full": full["tpot_ms"], "overhead": over, "within_15pct": over <= 0.15})
    return out


def print_table(summary: dict) -> None:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\n{'cell':22} {'status':8} {'KV MB':>9} {'TPOT ms':>8}")
    for r in summary["rows"]:
        kv = r["kv_cache_bytes"] / 1e6 if r["kv_cache_bytes"] is not None else None
        print(f"{r['name']:22} {r['status']:8} {f(kv, '9.1f')} {f(r['tpot_ms'], '8.2f')}")
    for x in summary["checks"]["decode_overhead"]:
        print(f"  decode overhead at equal cached length, bs{x['batch_size']}: {x['overhead']:+.1%} "
              f"({'ok' if x['within_15pct'] else 'ABOVE 15%'})")
    prov = summary.get("provenance") or {}
    print(f"  {prov.get('gpu_name')} driver {prov.get('driver')} torch {(prov.get('versions') or {}).get('torch')} "
          f"transformers {(prov.get('versions') or {}).get('transformers')} git {(prov.get('git') or {}).get('commit')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (checks the script, < 1 minute)")
    ap.add_argument("--time-budget-s", type=float, default=None, help="cells stop after this (default 150; tiny 45)")
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
    budget = args.time_budget_s or (45.0 if args.tiny else 150.0)
    return orchestrate(Path(args.out), args.tiny, budget)


if __name__ == "__main__":
    sys.exit(main())
