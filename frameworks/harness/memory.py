"""Peak memory during a measured run.

GPU: the allocator's peak (torch.cuda.max_memory_allocated) and the device-level memory in use,
sampled from a thread (NVML through torch when present, else cudaMemGetInfo) — the latter also
sees memory that other allocators (vLLM's, NCCL, CUDA context) hold. CPU: process RSS, sampled;
with tree=True the RSS of this process and all its descendants together (vLLM on CPU keeps model
and KV cache in its engine-core child), each sample one sum.

An engine whose allocator lives in another process (vLLM's engine core) passes `device_used`,
a function returning the device-level bytes in use: the monitor then never touches torch.cuda
(no CUDA context in this process) and reports no allocator peak, only the device-level one.
"""

from __future__ import annotations

import math
import threading
import time

import psutil

GB = 1e9
RESCAN_S = 0.5  # tree=True: how often the list of descendants is refreshed


class MemoryMonitor:
    def __init__(self, device: str, interval_s: float = 0.01, device_used=None, tree: bool = False):
        self.device = device
        self.external = device_used is not None
        if self.external:
            self._device_used = device_used
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_rss = 0
        self.peak_device_used = 0
        self._proc = psutil.Process()
        self.tree = tree
        self._children: list[psutil.Process] = []
        self._children_at = -math.inf

    def _device_used(self) -> int:
        import torch

        try:
            return int(torch.cuda.device_memory_used())
        except Exception:  # no NVML: fall back to the CUDA runtime's view
            free, total = torch.cuda.mem_get_info()
            return int(total - free)

    def _rss(self) -> int:
        rss = self._proc.memory_info().rss
        if self.tree:
            # listing descendants scans every process of the host (psutil's ppid map: ~1.6 ms
            # holding the GIL, 16% of a core at 10 ms, taken from the cell it measures); the
            # engine's children live for the whole cell, so list them every RESCAN_S only
            now = time.monotonic()
            if now - self._children_at >= RESCAN_S:
                self._children, self._children_at = self._proc.children(recursive=True), now
            for child in self._children:
                try:
                    rss += child.memory_info().rss
                except psutil.NoSuchProcess:  # ended since it was listed
                    pass
        return rss

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._rss())
        if self.device == "cuda":
            self.peak_device_used = max(self.peak_device_used, self._device_used())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemoryMonitor:
        if self.device == "cuda" and not self.external:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()

    def result(self) -> dict:
        out = {"peak_rss_gb": self.peak_rss / GB, "peak_gpu_mem_gb": None, "peak_device_mem_gb": None}
        if self.device == "cuda":
            out["peak_device_mem_gb"] = self.peak_device_used / GB
            if not self.external:
                import torch

                out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / GB
        return out


def cap_fraction(cap_gb: float | None, total_bytes: int) -> float:
    """The share of the card a cap of cap_gb allows: 1.0 without a cap or with one above the card."""
    if cap_gb is None:
        return 1.0
    return min(1.0, cap_gb * GB / total_bytes)


def apply_gpu_cap(cap_gb: float | None) -> dict:
    """Limit this process's PyTorch allocator to cap_gb of the current GPU (before any allocation).

    torch's caching allocator then raises OutOfMemoryError past the cap exactly as it would on a
    card of that size (the CUDA context, ~0.5 GB, lies outside both). Returns what applied.
    """
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fraction = cap_fraction(cap_gb, total)
    if cap_gb is not None:
        torch.cuda.set_per_process_memory_fraction(fraction)
    return {"gpu_memory_cap_gb": cap_gb, "gpu_total_mem_gb": total / GB, "gpu_memory_fraction": fraction}
