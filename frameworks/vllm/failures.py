"""Out-of-memory outcomes of vLLM, which happen in its engine-core process.

The engine core runs in a child process: when it fails (CUDA OOM while loading or profiling,
a KV cache too small for one max_model_len sequence), this process only sees
"Engine core initialization failed" or EngineDeadError; the cause is in the core's stderr,
which it shares with us. StderrTail keeps the end of that stream (still passing it through) so
that such failures become `oom` results instead of errors that rerun forever.
"""

from __future__ import annotations

import os
import sys
import threading

# vLLM 0.32.0's messages (v1/core/kv_cache_utils.py _check_enough_kv_cache_memory; on CPU
# v1/worker/cpu_worker.py, when gpu_memory_utilization's share of the NUMA node is not free,
# which engine_args avoids by sizing the KV cache) and PyTorch's.
OOM_MARKERS = (
    "CUDA out of memory",
    "OutOfMemoryError",
    "No available memory for the cache blocks",
    "larger than the available KV cache memory",
    "is less than desired CPU memory utilization",
)


class VllmOutOfMemory(MemoryError):
    """A vLLM failure whose cause is memory (the worker records it as status oom)."""


class KVCacheTooSmall(VllmOutOfMemory):
    """The cell fixed a KV capacity that cannot hold one of its sequences."""


class StderrTail:
    """Tee file descriptor 2 through a pipe, keeping the last `keep` bytes.

    Child processes started inside the block inherit the pipe, so their output is kept too.
    """

    def __init__(self, keep: int = 256 * 1024):
        self.keep = keep
        self._buf = bytearray()
        self._lock = threading.Lock()

    def __enter__(self) -> StderrTail:
        sys.stderr.flush()
        self._saved = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._reader = threading.Thread(target=self._pump, args=(r,), daemon=True)
        self._reader.start()
        return self

    def _pump(self, r: int) -> None:
        with os.fdopen(r, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                os.write(self._saved, chunk)
                with self._lock:
                    self._buf += chunk
                    del self._buf[: -self.keep]

    def __exit__(self, *exc) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # our end closes; children still holding it keep the pipe open
        self._reader.join(timeout=1)
        if not self._reader.is_alive():  # else a child still writes through it: leave it open
            os.close(self._saved)

    def text(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")


def oom_cause(text: str) -> str | None:
    """The line of `text` that says the failure was memory, if one does (the last such)."""
    hits = [line.strip() for line in text.splitlines() if any(m in line for m in OOM_MARKERS)]
    return hits[-1][:500] if hits else None


def reraise_classified(exc: BaseException, tail: StderrTail) -> None:
    """Raise VllmOutOfMemory when the engine's output says `exc` was caused by memory."""
    cause = oom_cause(str(exc)) or oom_cause(tail.text())
    if cause:
        raise VllmOutOfMemory(cause) from exc
