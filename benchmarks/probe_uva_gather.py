"""Probe (not a test): can a CUDA kernel gather rows straight from pinned host memory?

Under unified virtual addressing a pinned host buffer's address is also a device address, so a
CUDA tensor can view it through __cuda_array_interface__ and index_select reads only the chosen
rows over PCIe (zero-copy), with no CPU gather and no staging buffer. Checks correctness and
times it against CPU gather + copy.

    python benchmarks/probe_uva_gather.py [--out DIR]
"""

import argparse
import json
import time
from pathlib import Path

import torch



def device_view(host: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor aliasing pinned host memory (bf16 viewed as int16 for the interface)."""
    as_i16 = host.view(torch.int16)
    iface = {"shape": tuple(as_i16.shape), "typestr": "<i2", "data": (as_i16.data_ptr(), False), "version": 3,
             "strides": None}
    holder = type("H", (), {"__cuda_array_interface__": iface})()
    return torch.as_tensor(holder, device="cuda").view(host.dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    L, H, D = 2048 * 8, 8, 128  # tokens x kv heads x head dim, K and V side by side
    host = torch.randn(L, 2 * H * D, dtype=torch.bfloat16).pin_memory()
    view = device_view(host)
    res["view_device"] = str(view.device)
    idx = torch.randperm(L, device="cuda")[: L // 5].sort().values
    got = view.index_select(0, idx)
    torch.cuda.synchronize()
    ref = host.index_select(0, idx.cpu())
    res["correct"] = bool(torch.equal(got.cpu(), ref))
    nbytes = got.numel() * got.element_size()
    for name, fn in [("uva_index_select", lambda: view.index_select(0, idx)),
                     ("cpu_gather_then_copy", lambda: host.index_select(0, idx.cpu()).pin_memory().to("cuda", non_blocking=True))]:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / 20
        res[name] = {"ms": dt * 1e3, "gbps": nbytes / dt / 1e9, "bytes": nbytes}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "probe_uva_gather.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
