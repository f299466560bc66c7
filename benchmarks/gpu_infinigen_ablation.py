"""Where an InfiniGen decode step's time goes (issue 4's overlap criterion), one model, one call.

    python benchmarks/gpu_infinigen_ablation.py --out DIR            # H100: Llama-3.1-8B, random bf16
    python benchmarks/gpu_infinigen_ablation.py --out DIR --tiny     # CPU, tiny model: checks the script

One model and one policy; between runs only the transfer's choices change:
  gather   triton (only the k selected rows cross PCIe) | index_select (all `cap` rows) | none
           (speculate and select, move nothing: the overlap baseline)
  append   side (the new tokens' K/V go to the host store on their own stream) | compute (on the
           compute stream, which then waits for each device->host copy: the first design)
Per variant and batch: decode step time (median over steps, after a warm-up batch), the host's
share of it (launching, up to the step's synchronisation) and the wait for the device, gather
device time and bytes; the step logits of each fetching variant are compared with the first's.
With --profile, torch.profiler tables (device time by kernel, two decode steps) for the first
and the new design, and a gzipped Chrome trace of each.
Writes DIR/ablation.json (+ provenance) and prints a table last.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
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
from frameworks.infinigen.policy import InfiniGenPolicy  # noqa: E402

VARIANTS = [  # name, gather, append
    ("nofetch/side", "none", "side"),
    ("nofetch/compute", "none", "compute"),
    ("index_select/compute", "index_select", "compute"),  # the design measured on 2026-11-28 (1.49x at bs8)
    ("index_select/side", "index_select", "side"),
    ("triton/compute", "triton", "compute"),
    ("triton/side", "triton", "side"),  # the new default
]


def configure(policy, gather: str, append: str) -> None:
    t = policy.transfer
    t.fetch = gather != "none"
    if t.fetch:
        t.gather = gather
    if append == "side":
        t.__dict__.pop("append", None)
    else:  # the first design: pack and copy on the current (compute) stream
        def append_on_compute(store, layer, start, key, value):
            store.write(layer, start, store.pack(key, value))
            t.appended.pop(layer, None)
        t.append = append_on_compute


def run(eng, policy, prompts, gen: int, cuda: bool) -> dict:
    waits = []
    orig_sync = Engine._sync

    def timed_sync(self):
        t = time.perf_counter()
        orig_sync(self)
        waits.append(time.perf_counter() - t)

    eng._sync = timed_sync.__get__(eng)
    eng.generate(prompts, min(gen, 4))  # warm-up: same shapes
    policy.transfer.reset_stats()
    waits.clear()
    eng.collect_logits = True
    t0 = time.perf_counter()
    times = eng.generate(prompts, gen)
    del eng._sync
    steps = np.diff(np.array([t0] + times))[1:]  # decode steps (the first entry is prefill + step 0)
    wait = np.array(waits[1:])
    m = policy.metrics()
    return {
        "step_ms": float(np.median(steps) * 1e3), "step_ms_p10": float(np.percentile(steps, 10) * 1e3),
        "step_ms_p90": float(np.percentile(steps, 90) * 1e3),
        "host_ms": float(np.median(steps - wait) * 1e3), "device_wait_ms": float(np.median(wait) * 1e3),
        "gather_ms_per_step": m["gather_ms_per_step"], "gather_gbps": m["gather_bandwidth_gbps"],
        "fetched_bytes_per_step": m["fetched_bytes_per_step"], "selected_bytes_per_step": m["selected_bytes_per_step"],
        "fetched_tokens_per_seq_layer": m["fetched_tokens_per_seq_layer_speculated"],
        "logits": torch.stack(eng.step_logits), "tokens": eng.last_tokens.cpu(),
    }


def profile(eng, prompts, out: Path, name: str) -> str:
    from torch.profiler import ProfilerActivity, profile as prof

    eng.collect_logits = False
    eng.generate(prompts, 3)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        eng.generate(prompts, 3)  # prefill + 2 decode steps (the table covers all three)
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    safe = name.replace("/", "_")
    (out / f"profile_{safe}.txt").write_text(table)
    trace = out / f"trace_{safe}.json"
    p.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
        g.write(f.read())
    trace.unlink()
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", default=None, help="comma-separated (default 8,32 GPU; 2 tiny)")
    ap.add_argument("--prompt", type=int, default=None)
    ap.add_argument("--gen", type=int, default=None)
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
    variants = [v for v in VARIANTS if cuda or v[1] != "triton" or _triton_ok()]
    rows, first = [], {}
    for b in batches:
        prompts = np.random.default_rng(b).integers(0, model.config.vocab_size, (b, prompt))
        for name, gather, append in variants:
            configure(policy, gather, append)
            r = run(eng, policy, prompts, gen, cuda)
            logits, tokens = r.pop("logits"), r.pop("tokens")
            if gather != "none":
                if b not in first:
                    first[b] = (name, logits, tokens)
                ref_name, ref_logits, ref_tokens = first[b]
                r["vs"] = ref_name
                r["max_abs_logit_diff"] = float((logits - ref_logits).abs().max())
                r["tokens_equal"] = bool(torch.equal(tokens, ref_tokens))
            rows.append({"batch": b, "variant": name, **r})
            print(f"bs{b} {name:22} step {r['step_ms']:7.2f} ms (host {r['host_ms']:6.2f}, wait {r['device_wait_ms']:6.2f})"
                  f" gather {r['gather_ms_per_step'] or 0:6.2f} ms/step", flush=True)
    tables = {}
    if args.profile:
        b = batches[0]
        prompts = np.random.default_rng(b).integers(0, model.config.vocab_size, (b, prompt))
        for name, gather, append in (("index_select/compute", "index_select", "compute"), ("triton/side", "triton", "side")):
            if cuda or gather != "triton" or _triton_ok():
                configure(policy, gather, append)
                tables[name] = profile(eng, prompts, args.out, f"bs{b}_{name}")
    prov = provenance.collect(0)
    (args.out / "ablation.json").write_text(json.dumps(
        {"model": model_name, "dtype": dtype, "prompt": prompt, "gen": gen, "kv_budget": 0.2, "rows": rows,
         "provenance": prov, "command": " ".join(sys.argv)}, indent=1, default=str))
    for name, t in tables.items():
        print(f"\n== profile {name} (device time by kernel; prefill + 2 decode steps)\n{t[:6000]}")
    print(f"\n{'bs':>3} {'variant':22} {'step ms':>8} {'p10':>7} {'p90':>7} {'host ms':>8} {'wait ms':>8} {'gather ms':>9} "
          f"{'GB/s':>6} {'MB/step':>8} {'logit diff':>10}")
    for r in rows:
        print(f"{r['batch']:>3} {r['variant']:22} {r['step_ms']:8.2f} {r['step_ms_p10']:7.2f} {r['step_ms_p90']:7.2f} "
              f"{r['host_ms']:8.2f} {r['device_wait_ms']:8.2f} {r['gather_ms_per_step'] or 0:9.2f} "
              f"{r['gather_gbps'] or 0:6.1f} {r['fetched_bytes_per_step'] / 1e6:8.1f} "
              f"{r.get('max_abs_logit_diff', float('nan')):10.3g}")
    return 0


def _triton_ok() -> bool:
    from frameworks.infinigen import kernels

    return kernels.available()


if __name__ == "__main__":
    sys.exit(main())
