"""Probe (not a test): the rate of InfiniGen's Triton UVA gather alone, at the 8B decode shapes.

The InfiniGen graph step at budget 0.2 costs (fetch step - no-fetch step) more than its fetched
bytes / pinned-copy rate predicts (engine-1c7f78f: 11 ms for 71 MB at bs 8, 48 ms for 285 MB at
bs 32). This times kernels.gather_selected by itself on the store's layout (rows of K|V for one
(token, kv head), 2 x 128 bf16 = 512 B, row = token * lanes + lane, random sorted positions per
lane) for one layer, so that the gather's own PCIe rate is measured beside a pinned bulk copy.

    python benchmarks/probe_gather_rate.py --out DIR
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_engine_h2o import _cuda_ms  # noqa: E402  (the engine benchmark's CUDA-event timer)

from frameworks.infinigen import kernels  # noqa: E402
from frameworks.infinigen.store import device_view  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": []}
    max_len, hkv, w, cap = 2048 + 256, 8, 256, 410  # Llama-3.1-8B, budget 0.2 of 2048
    h = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    d = torch.empty_like(h, device="cuda")
    res["pinned_copy_gbps"] = h.numel() / _cuda_ms(torch, lambda: d.copy_(h, non_blocking=True)) / 1e6
    del h, d
    for batch in (1, 8, 32):
        lanes = batch * hkv
        host = torch.randn(max_len * lanes, w, dtype=torch.bfloat16).pin_memory()
        src = device_view(host)
        g = torch.Generator(device="cuda").manual_seed(0)
        idx = torch.stack([torch.randperm(2048, device="cuda", generator=g)[:cap].sort().values for _ in range(lanes)])
        idx = idx.view(batch, hkv, cap).contiguous()
        k = torch.tensor(cap, device="cuda")
        out = torch.empty(lanes * cap, w, dtype=torch.bfloat16, device="cuda")
        nbytes = lanes * cap * w * 2
        row = {"batch": batch, "bytes_per_layer": nbytes}
        for name, programs in (("grid64", kernels.PROGRAMS), ("full", None), ("grid1024", 1024)):
            ms = _cuda_ms(torch, lambda: kernels.gather_selected(src, idx, k, out, programs), 20)
            row[name] = {"ms": ms, "gbps": nbytes / ms / 1e6}
        want = host[(idx.view(lanes, cap).cpu() * lanes + torch.arange(lanes).view(lanes, 1)).reshape(-1)]
        row["correct"] = bool(torch.equal(out.cpu(), want))
        rows = (idx.view(lanes, cap) * lanes + torch.arange(lanes, device="cuda").view(lanes, 1)).reshape(-1)
        ms = _cuda_ms(torch, lambda: torch.index_select(src, 0, rows, out=out), 20)
        row["uva_index_select"] = {"ms": ms, "gbps": nbytes / ms / 1e6}
        row["x32_layers_ms"] = row["grid64"]["ms"] * 32
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        del host, src
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "probe_gather_rate.json").write_text(json.dumps(res, indent=1))
    print("pinned copy", round(res["pinned_copy_gbps"], 1), "GB/s")


if __name__ == "__main__":
    main()
