"""Where an InfiniGen decode step's time goes (issue 4's overlap criterion), one model, one call.

    python benchmarks/gpu_infinigen_ablation.py --out DIR            # H100: Llama-3.1-8B, random bf16
    python benchmarks/gpu_infinigen_ablation.py --out DIR --tiny     # CPU, tiny model: checks the script

One model and one policy; between runs only the transfer's choices change:
  gather   triton (only the k selected rows cross PCIe) | index_select (all `cap` rows) | none
           (speculate and select, move nothing: the overlap baseline)
  append   side (the new tokens' K/V go to the host store on their own stream) | compute (on the
           compute stream, which then waits for each device->host copy: the first design)
The variants alternate over --rounds rounds (A B C A B C ...): the decode step is host-bound
(Python launches some 3500 operations a step at batch 8 and the host's speed drifts by tens of
percent from one second to the next), so back-to-back runs of one variant would compare spells
of the host, not variants. Per variant and batch: decode step time (median and p10/p90 over all
rounds' steps, after a warm-up batch; the median of each round), the host's share (launching, up
to the step's synchronisation) and its wait for the device, gather device time and bytes; the
step logits of each fetching variant are compared with the first's.
With --profile, torch.profiler tables (device time by kernel, two decode steps) for the first
and the new design, and a gzipped Chrome trace of each.
Writes DIR/ablation.json (+ provenance) and prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from frameworks import models  # noqa: E402
from frameworks.harness import provenance  # noqa: E402
from frameworks.harness.spec import CellSpec  # noqa: E402
from frameworks.hf.engine import Engine  # noqa: E402
from frameworks.infinigen import kernels  # noqa: E402
from frameworks.infinigen.policy import InfiniGenPolicy  # noqa: E402

VARIANTS = [  # name, gather, append
    ("nofetch/side", "none", "side"),
    ("nofetch/compute", "none", "compute"),
    ("index_select/compute", "index_select", "compute"),  # the design measured on 2026-11-28 (1.49x at bs8)
    ("index_select/side", "index_select", "side"),
    ("triton/compute", "triton", "compute"),
    ("triton/side", "triton", "side"),  # the new default: a persistent grid of kernels.PROGRAMS
    ("triton-grid/side", "triton-grid", "side"),  # a program per block of rows
]


def configure(policy, gather: str, append: str) -> None:
    t = policy.transfer
    t.fetch = gather != "none"
    if gather == "none":  # the default's selection work (index_select also pads the indices)
        gather = "triton" if t.cuda and kernels.available() else "index_select"
    t.gather = "triton" if gather.startswith("triton") else gather
    t.gather_programs = None if gather == "triton-grid" else kernels.PROGRAMS
    if append == "side":
        t.__dict__.pop("append", None)
    else:  # the first design: pack and copy on the current (compute) stream
        def append_on_compute(store, layer, start, key, value):
            store.write(layer, start, store.pack(key, value))
            t.appended.pop(layer, None)
        t.append = append_on_compute


def run(eng, policy, prompts, gen: int) -> dict:
    """One batch (after a short warm-up batch of the same shapes): per decode step, its time and
    the host's wait for the device at the step's synchronisation."""
    waits = []
    orig_sync = Engine._sync

    def timed_sync(self):
        t = time.perf_counter()
        orig_sync(self)
        waits.append(time.perf_counter() - t)

    eng._sync = timed_sync.__get__(eng)
    try:
        eng.generate(prompts, min(gen, 4))
        policy.transfer.reset_stats()
        waits.clear()
        eng.collect_logits = True
        gc.collect()
        t0 = time.perf_counter()
        times = eng.generate(prompts, gen)
    finally:
        del eng._sync
        eng.collect_logits = False
    steps = np.diff(np.array([t0] + times))[1:]  # decode steps (the first entry is prefill + step 0)
    m = policy.metrics()
    return {"steps": steps, "waits": np.array(waits[1:]), "metrics": m,
            "logits": torch.stack(eng.step_logits), "tokens": eng.last_tokens.cpu()}


def interleaved(eng, policy, prompts, variants, gen: int, rounds: int, log=print) -> list[dict]:
    """Each variant `rounds` times, alternating (A B C A B C ...), so that a slow spell of the
    host (the step is host-bound: Python launches ~3500 ops) hits every variant alike. Per
    variant: step time percentiles over all rounds' steps, the median per round, the host's
    share, gather time and bytes, and the logits compared with the first fetching variant's."""
    acc = {name: {"steps": [], "waits": [], "round_ms": [], "m": None} for name, _, _ in variants}
    ref = None
    for r in range(rounds):
        for name, gather, append in variants:
            configure(policy, gather, append)
            out = run(eng, policy, prompts, gen)
            a = acc[name]
            a["steps"] += list(out["steps"])
            a["waits"] += list(out["waits"])
            a["round_ms"].append(float(np.median(out["steps"]) * 1e3))
            a["m"] = out["metrics"]
            if gather != "none":
                if ref is None:
                    ref = (name, out["logits"], out["tokens"])
                a["max_abs_logit_diff"] = max(a.get("max_abs_logit_diff", 0.0), float((out["logits"] - ref[1]).abs().max()))
                a["tokens_equal"] = a.get("tokens_equal", True) and bool(torch.equal(out["tokens"], ref[2]))
                a["vs"] = ref[0]
            log(f"  round {r} bs{prompts.shape[0]} {name:22} median step {a['round_ms'][-1]:7.2f} ms", flush=True)
    rows = []
    for name, gather, append in variants:
        a = acc[name]
        steps, waits, m = np.array(a["steps"]), np.array(a["waits"]), a["m"]
        rows.append({
            "batch": int(prompts.shape[0]), "variant": name, "gather": gather, "append": append, "rounds": rounds,
            "steps": len(steps), "step_ms": float(np.median(steps) * 1e3),
            "step_ms_p10": float(np.percentile(steps, 10) * 1e3), "step_ms_p90": float(np.percentile(steps, 90) * 1e3),
            "round_median_ms": a["round_ms"], "host_ms": float(np.median(steps - waits) * 1e3),
            "device_wait_ms": float(np.median(waits) * 1e3),
            "gather_ms_per_step": m["gather_ms_per_step"], "gather_gbps": m["gather_bandwidth_gbps"],
            "fetched_bytes_per_step": m["fetched_bytes_per_step"], "selected_bytes_per_step": m["selected_bytes_per_step"],
            "fetched_tokens_per_seq_layer": m["fetched_tokens_per_seq_layer_speculated"],
            **{k: a[k] for k in ("max_abs_logit_diff", "tokens_equal", "vs") if k in a},
        })
    return rows


def _union_ms(intervals) -> float:
    total, cur = 0.0, None
    for a, b in sorted(intervals):
        if cur is None or a > cur[1]:
            total += 0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return (total + (0 if cur is None else cur[1] - cur[0])) / 1e3


def trace_steps(events: list[dict]) -> list[dict]:
    """Per window between two device synchronisations of a Chrome trace (the engine syncs once
    a step): its length, the device's busy time (union of kernels and copies: all streams, and
    per stream), and the host's time inside top-level operators vs between them (Python)."""
    syncs = sorted((e for e in events if e.get("cat") == "cuda_runtime" and "Synchronize" in e.get("name", "")),
                   key=lambda e: e["ts"])
    ends = [e["ts"] + e["dur"] for e in syncs]
    out = []
    for a, b in zip(ends, ends[1:]):
        inw = [e for e in events if "dur" in e and a <= e.get("ts", -1) < b]
        gpu = [e for e in inw if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        streams: dict = {}
        for e in gpu:
            streams.setdefault(str(e["args"].get("stream")), []).append((e["ts"], e["ts"] + e["dur"]))
        top, end = [], -1.0
        for e in sorted((e for e in inw if e.get("cat") == "cpu_op"), key=lambda e: e["ts"]):
            if e["ts"] >= end:
                top.append(e)
                end = e["ts"] + e["dur"]
        in_ops = sum(e["dur"] for e in top) / 1e3
        out.append({"window_ms": (b - a) / 1e3, "device_busy_ms": _union_ms([x for v in streams.values() for x in v]),
                    "stream_busy_ms": {k: _union_ms(v) for k, v in streams.items()},
                    "kernels": {k: len(v) for k, v in streams.items()}, "host_ops": len(top),
                    "host_in_ops_ms": in_ops, "host_between_ops_ms": (b - a) / 1e3 - in_ops})
    return out


def profile(eng, prompts, out: Path, name: str) -> tuple[str, list[dict]]:
    """torch.profiler over prefill + 2 decode steps: the table by device time, a gzipped Chrome
    trace, and trace_steps() of it (the decode steps are the windows after the first)."""
    from torch.profiler import ProfilerActivity, profile as prof

    eng.generate(prompts, 3)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        eng.generate(prompts, 3)
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    safe = name.replace("/", "_")
    (out / f"profile_{safe}.txt").write_text(table)
    trace = out / f"trace_{safe}.json"
    p.export_chrome_trace(str(trace))
    with open(trace, "rb") as f:
        raw = f.read()
    with gzip.open(f"{trace}.gz", "wb") as g:
        g.write(raw)
    trace.unlink()
    return table, trace_steps(json.loads(raw)["traceEvents"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", default=None, help="comma-separated (default 8,32 GPU; 2 tiny)")
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--gen", type=int, default=None)
    ap.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of all variants (default 3)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        print("no CUDA device: use --tiny", file=sys.stderr)
        return 2
    model_name, device, dtype = ("tiny-llama-3.1", "cpu", "float32") if args.tiny else ("llama-3.1-8b", "cuda", "bfloat16")
    batches = [int(b) for b in (args.batches or ("2" if args.tiny else "8,32")).split(",")]
    prompt, gen = args.prompt or (64 if args.tiny else 2048), args.gen or (6 if args.tiny else 32)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = CellSpec(experiment="gpu-ablation", framework="infinigen", model=model_name, device=device, dtype=dtype,
                    prefill="flash" if cuda else "sdpa", batch_size=max(batches), prompt_len=prompt, gen_len=gen,
                    kv_budget=0.2)
    torch.manual_seed(0)
    policy = InfiniGenPolicy(spec)
    model = models.build(model_name, "random", device, dtype, policy.attn_implementation(spec.prefill), 0)
    policy.prepare(model)
    eng = Engine(model, policy, device, spec.prefill, spec.chunk_size)
    variants = [v for v in VARIANTS if (cuda or not v[1].startswith("triton") or kernels.available())
                and (args.variants is None or v[0] in args.variants.split(","))]
    rows = []
    for b in batches:
        prompts = np.random.default_rng(b).integers(0, model.config.vocab_size, (b, prompt))
        rows += interleaved(eng, policy, prompts, variants, gen, args.rounds)
    tables, windows = {}, {}
    if args.profile:
        b = batches[0]
        prompts = np.random.default_rng(b).integers(0, model.config.vocab_size, (b, prompt))
        for name, gather, append in (("index_select/compute", "index_select", "compute"), ("triton/side", "triton", "side")):
            if cuda or gather != "triton" or kernels.available():
                configure(policy, gather, append)
                tables[name], windows[name] = profile(eng, prompts, args.out, f"bs{b}_{name}")
    prov = provenance.collect(0)
    (args.out / "ablation.json").write_text(json.dumps(
        {"model": model_name, "dtype": dtype, "prompt": prompt, "gen": gen, "kv_budget": 0.2, "rounds": args.rounds,
         "rows": rows, "profiled_windows": windows,
         "provenance": prov, "command": " ".join(sys.argv)}, indent=1, default=str))
    for name, t in tables.items():
        print(f"\n== profile {name} (device time by kernel; prefill + 2 decode steps)\n{t[:3000]}")
        for i, w in enumerate(windows[name][1:], 1):
            print(f"decode step {i}: {w['window_ms']:.1f} ms; device busy {w['device_busy_ms']:.1f} ms "
                  f"(by stream {', '.join(f'{k}: {v:.1f}' for k, v in w['stream_busy_ms'].items())}); host: "
                  f"{w['host_ops']} ops, {w['host_in_ops_ms']:.1f} ms in them, {w['host_between_ops_ms']:.1f} ms between")
    print(f"\n{'bs':>3} {'variant':22} {'step ms':>8} {'p10':>7} {'p90':>7} {'host ms':>8} {'wait ms':>8} {'gather ms':>9} "
          f"{'GB/s':>6} {'MB/step':>8} {'logit diff':>10}")
    for r in rows:
        print(f"{r['batch']:>3} {r['variant']:22} {r['step_ms']:8.2f} {r['step_ms_p10']:7.2f} {r['step_ms_p90']:7.2f} "
              f"{r['host_ms']:8.2f} {r['device_wait_ms']:8.2f} {r['gather_ms_per_step'] or 0:9.2f} "
              f"{r['gather_gbps'] or 0:6.1f} {r['fetched_bytes_per_step'] / 1e6:8.1f} "
              f"{r.get('max_abs_logit_diff', float('nan')):10.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
