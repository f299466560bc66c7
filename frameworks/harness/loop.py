"""The one measurement loop of every framework: the cell's requests, warm-up, repetitions under
the memory monitor. Adapters supply only how one batch runs on their engine.

Before this module the transformers runner and the vLLM adapter each had a copy, the vLLM one
"drawn exactly as hf draws them" by convention; now both call `requests` and `measure`.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from frameworks.harness import cputime, workload
from frameworks.harness.memory import MemoryMonitor

# warm-up runs the cell's shapes with at most this many decode steps (compiles, caches, graphs);
# on a CPU the whole generation length: a CPU repetition is short, and after 4 steps of warm-up the
# first repetitions of the smoke reference run were up to 1.7x slower than the last ones
WARMUP_GEN_LEN = 4


def requests(spec, vocab_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The cell's prompts and, for request-rate cells, their arrival offsets in seconds
    (None for offline cells: every request at t=0). Same seed, same load, on every framework."""
    prompts = workload.prompts(spec.seed, spec.n_requests, spec.prompt_len, vocab_size)
    if not spec.is_rate_cell:
        return prompts, None
    return prompts, workload.arrival_times(spec.seed, spec.n_requests, spec.request_rate, spec.burstiness)


@contextlib.contextmanager
def frozen_heap():
    """The repetitions' heap (torch, transformers, the model: ~450 000 objects for a tiny model,
    a full collection of which took 0.2 s on the 2-vCPU smoke host) frozen out of the cyclic
    collector: the collections between repetitions then scan only what was made since. Frozen
    before the warm-up (measure): the full collection walks the whole heap, and right before the
    first repetition it made that one 20-40% slower than the next (smoke TTFT cells, 2-vCPU host)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def no_cyclic_gc():
    """A repetition without Python's cyclic garbage collector, as timeit runs it: otherwise a
    collection lands at a random point of a timed region. Likely what made a 7 ms smoke TTFT
    cell measure 7.2, 20.5, 7.3, 7.2 ms. The cycles of one repetition are collected before the
    next, outside its timed region; reference counting frees everything else as usual."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def warmup_gen_len(spec) -> int:
    return spec.gen_len if spec.device == "cpu" else min(spec.gen_len, WARMUP_GEN_LEN)


@dataclass
class Measured:
    timings: list  # RequestTiming of every request of every repetition
    rep_durations_s: list[float]
    memory: dict  # MemoryMonitor.result()
    warmup_s: float


def measure(spec, warm: Callable[[int], object], rep: Callable[[int], tuple[list, float]],
            monitor: MemoryMonitor, before_measure: Callable[[], object] | None = None) -> Measured:
    """spec.warmup calls of warm(w), then spec.repetitions calls of rep(r) -> (timings, duration_s)
    inside `monitor`. before_measure runs between the two (reset peaks, snapshot counters)."""
    # CPU cells: no other cell's warm-up or repetitions on this host meanwhile (cputime.py)
    with cputime.exclusive(spec.device), frozen_heap():
        t0 = time.perf_counter()
        for w in range(spec.warmup):
            warm(w)
        warmup_s = time.perf_counter() - t0
        if before_measure is not None:
            before_measure()
        timings, durations = [], []
        with monitor:
            for r in range(spec.repetitions):
                with no_cyclic_gc():
                    t, d = rep(r)
                timings += t
                durations.append(d)
    return Measured(timings, durations, monitor.result(), warmup_s)
