"""Probe (not a test): where InfiniGen's captured decode step spends its time on the GPU.

engine-1c7f78f: at batch 32 (Llama-3.1-8B, random bf16, prompt 2048, budget 0.2) the graph step
with fetch is 66.6 ms, without fetch 18.9 ms, while the gather alone moves the step's 285 MB in
~6 ms (probe_gather_rate.py, 48 GB/s). This profiles a few replays of the captured step (CUPTI
reports the kernels of a CUDA graph) with and without fetch, and prints the kernels by device
time, so the cost of the fetch path is attributed to kernels, not guessed.

    python benchmarks/probe_infinigen_profile.py --out DIR [--batch 32]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_infinigen_graph as g  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from frameworks.harness import workload

    ctx = g.Ctx(False)
    model = ctx.model_8b()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    for fetch in (True, False):
        s = g.spec(ctx, "llama-3.1-8b", args.batch, 2048, args.steps, "graph", 0.2, "flash")
        policy, e = g.engine_for(ctx, s, model, fetch)
        prompts = workload.prompts(0, args.batch, 2048, model.config.vocab_size)
        e.generate(prompts, 4)  # captures the step
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            e.generate(prompts, args.steps)
            torch.cuda.synchronize()
        name = "fetch" if fetch else "nofetch"
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90)
        (out / f"profile_{name}.txt").write_text(table)
        prof.export_chrome_trace(str(out / f"trace_{name}.json"))
        res[name] = [{"name": ev.key, "device_ms": ev.self_device_time_total / 1e3, "count": ev.count}
                     for ev in sorted(prof.key_averages(), key=lambda ev: -ev.self_device_time_total)[:30]]
        print(f"== {name} (batch {args.batch}, {args.steps} steps incl. prefill)\n{table}", flush=True)
        del policy, e
        ctx.free()
    (out / "profile.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
