"""Moving selected KV rows host -> device without stalling the compute stream.

CUDA, per speculated layer j (launched from layer j-1's forward pre-hook, main thread):
  1. an event on the compute stream marks layer j-1's input ready; the speculation stream waits
     on it (stream.wait_event: no device-wide synchronisation), then computes the speculated
     scores, the selection, and copies (idx, k) into pinned memory + an event;
  2. a worker thread waits for that event only, gathers the selected rows of the host store
     with index_select into a pinned staging buffer (CPU memory bandwidth, parallel over torch's
     intra-op threads), and enqueues the host->device copy on the copy stream + an event;
  3. layer j's cache update waits for the worker (host) and makes the compute stream wait on
     the copy's event. Layer j-1's attention and MLP run meanwhile.
Why a CPU gather: torch has no public way to let a GPU kernel index pinned host memory, and a
custom zero-copy kernel could not be built and tested here; upstream gathers on the CPU too.
Two side streams, so that layer j's copy never queues behind layer j+1's speculation (which
waits for layer j-1 to finish). The copy stream waits on the same "input ready" event before
writing a device buffer: that is after the buffer's previous reader (layer j-2) in stream order.
CPU device: the same code, inline (no stream, no thread unless `threaded`), gathering straight
into the "device" buffer, so every step but the copy is exercised by the CPU tests.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from frameworks.infinigen.select import flat_rows


@dataclass
class Fetched:
    keys: torch.Tensor  # [B, Hkv, n, d] on the compute device
    values: torch.Tensor
    ready: object  # CUDA event after the copy, or None
    tokens: int  # n: rows per (sequence, kv head)
    nbytes: int  # bytes moved host -> device


class Pending:
    """A fetch in flight: a worker future or an already available result."""

    def __init__(self, result: Fetched | Future):
        self._result = result

    def wait(self) -> Fetched:
        got = self._result.result() if isinstance(self._result, Future) else self._result
        if got.ready is not None:
            torch.cuda.current_stream().wait_event(got.ready)
        return got


class Transfer:
    """One per policy: the side streams, the gather worker and the measurements."""

    def __init__(self, device: torch.device, threaded: bool | None = None, fetch: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        self.fetch = fetch  # False: select but move nothing (the overlap benchmark's baseline)
        self.spec_stream = torch.cuda.Stream(device) if self.cuda else None
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        threaded = self.cuda if threaded is None else threaded
        init = (lambda: torch.cuda.set_device(device)) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="infinigen-gather", initializer=init) if threaded else None
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"full_tokens": 0, "sparse_tokens": 0, "bytes": 0, "gather_s": 0.0, "sparse_fetches": 0,
                      "steps": 0}
        self._timed: list[tuple[object, object, int]] = []

    # -- stream helpers -----------------------------------------------------------------
    def follow_compute(self, *tensors: torch.Tensor):
        """An event after what the compute stream enqueued so far; the speculation stream waits
        on it, and tensors it reads that were made on the compute stream stay allocated until it
        is done with them (record_stream)."""
        if not self.cuda:
            return None
        ready = torch.cuda.Event()
        ready.record()
        self.spec_stream.wait_event(ready)
        for t in tensors:
            t.record_stream(self.spec_stream)
        return ready

    def _timed_copy(self, pairs, nbytes: int, after):
        """dst <- src for each (dst, src) on the copy stream once `after` happened; returns the
        event after them (None on CPU). Each pair is contiguous on both sides, so every copy is
        one cudaMemcpyAsync from page-locked memory (a strided one would stage through pageable
        memory and block)."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(after)
            start.record()
            for dst, src in pairs:
                dst.record_stream(self.copy_stream)  # the buffer may be freed while the copy runs
                dst.copy_(src, non_blocking=True)
            end.record()
        self._timed.append((start, end, nbytes))
        return end

    # -- full layers ----------------------------------------------------------------------
    def launch_full(self, store, layer: int, length: int, dev: torch.Tensor | None) -> Pending:
        """The whole prefix 0..length of a layer. dev: [max_len, B, Hkv, 2, d] device buffer
        (CUDA) — on CPU the host store is used in place."""
        src = store.prefix(layer, length)  # [length, B, Hkv, 2, d], contiguous
        ready, nbytes = None, 0
        if self.cuda:
            dst = dev[:length]
            after = self.follow_compute()
            if self.fetch:
                nbytes = src.numel() * src.element_size()
                ready = self._timed_copy([(dst, src)], nbytes, after)
            src = dst
        keys, values = (src[..., w, :].permute(1, 2, 0, 3) for w in (0, 1))
        return Pending(Fetched(keys, values, ready, length, nbytes))

    # -- speculated layers --------------------------------------------------------------
    def launch_sparse(self, store, layer: int, slot, speculate, hidden: torch.Tensor, extra=()) -> Pending:
        """speculate() -> (idx [B, Hkv, cap], k) runs on the side stream after `hidden` is ready."""
        after = self.follow_compute(hidden, *extra)
        with torch.cuda.stream(self.spec_stream) if self.cuda else contextlib.nullcontext():
            idx, k = speculate()
            idx_host = slot.idx[: idx.numel()].view(idx.shape)
            idx_host.copy_(idx, non_blocking=True)
            slot.k.copy_(k, non_blocking=True)
            selected = torch.cuda.Event() if self.cuda else None
            if selected is not None:
                selected.record()
        job = (store, layer, slot, idx_host, selected, after)
        if self.pool is None:
            return Pending(self._gather(*job))
        return Pending(self.pool.submit(self._gather, *job))

    def _gather(self, store, layer: int, slot, idx_host: torch.Tensor, selected, after) -> Fetched:
        with torch.inference_mode():
            if selected is not None:
                selected.synchronize()  # only the speculation, not the device
            b, hkv, d = store.batch, store.shape[3], store.shape[-1]
            k = int(slot.k)
            rows = flat_rows(idx_host[..., :k], b, hkv)
            n = rows.numel()
            dst = slot.dev[:n]  # [n, 2d] contiguous: key | value of each selected (token, head)
            ready, nbytes = None, 0
            if self.fetch:
                if slot.copied is not None:
                    slot.copied.synchronize()  # the staging buffer's previous copy is done
                stage = slot.stage[:n] if self.cuda else dst
                t0 = time.perf_counter()
                torch.index_select(store.rows(layer), 0, rows, out=stage)
                self.stats["gather_s"] += time.perf_counter() - t0
                if self.cuda:
                    nbytes = stage.numel() * stage.element_size()
                    ready = slot.copied = self._timed_copy([(dst, stage)], nbytes, after)
            kv = dst.view(b, hkv, k, 2, d)
            return Fetched(kv[..., 0, :], kv[..., 1, :], ready, k, nbytes)

    # -- measurements -----------------------------------------------------------------------
    def account(self, fetched: Fetched, batch: int, full: bool) -> None:
        """Count a fetch when it is used (a prefetch for a step that never comes is not)."""
        self.stats["full_tokens" if full else "sparse_tokens"] += fetched.tokens * batch
        self.stats["bytes"] += fetched.nbytes
        self.stats["sparse_fetches"] += 0 if full else 1

    def measured_bandwidth_gbps(self) -> float | None:
        """Bytes / time of the host->device copies, from CUDA events (device time)."""
        if not self._timed:
            return None
        self._timed[-1][1].synchronize()
        ms = sum(s.elapsed_time(e) for s, e, _ in self._timed)
        moved = sum(n for _, _, n in self._timed)
        return moved / (ms * 1e-3) / 1e9 if ms > 0 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def __del__(self):  # the runner never closes policies: do not leak a thread per cell
        if getattr(self, "pool", None) is not None:
            self.pool.shutdown(wait=False)
