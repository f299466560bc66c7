"""Device-level GPU memory in use, from NVML, without a CUDA context in this process.

vLLM's allocator lives in its engine-core process; what the GPU holds (weights, the KV pool,
activations, CUDA graphs, both processes' contexts) is visible only at device level, as
nvidia-smi shows it. vLLM ships its own pynvml (vllm/third_party/pynvml.py).
"""

from __future__ import annotations

import os


def nvml_index(visible: str | None) -> tuple[str, str]:
    """("index", "3") or ("uuid", "GPU-...") for the first device CUDA_VISIBLE_DEVICES names."""
    first = (visible or "0").split(",")[0].strip()
    return ("index", first) if first.isdigit() else ("uuid", first)


def _handle():
    from vllm.third_party import pynvml

    pynvml.nvmlInit()
    kind, value = nvml_index(os.environ.get("CUDA_VISIBLE_DEVICES"))
    handle = (pynvml.nvmlDeviceGetHandleByIndex(int(value)) if kind == "index"
              else pynvml.nvmlDeviceGetHandleByUUID(value))
    return pynvml, handle


def device_used_fn():
    """A function returning the bytes in use on this process's first visible GPU."""
    pynvml, handle = _handle()
    return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def device_total_bytes() -> int:
    """The memory of this process's first visible GPU (a GPU-memory cap is a share of it)."""
    pynvml, handle = _handle()
    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
