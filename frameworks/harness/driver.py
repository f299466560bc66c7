"""Drive an engine with a cell's requests and collect raw timings.

An engine here is anything with ``generate(prompt_ids [B, L] int64 array, gen_len) -> list of
time.perf_counter() values``, one per decode step: the moment that step's tokens were available
to the host, for every sequence of the batch. Times returned are relative to the run's start.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from frameworks.harness.metrics import RequestTiming


def run_offline(engine, prompt_ids: np.ndarray, gen_len: int, rep: int) -> tuple[list[RequestTiming], float]:
    """One batch, every request arriving at t=0."""
    t0 = time.perf_counter()
    times = [t - t0 for t in engine.generate(prompt_ids, gen_len)]
    n, length = prompt_ids.shape
    timings = [RequestTiming(0.0, times, length, rep, i) for i in range(n)]
    return timings, times[-1]


def run_open_loop(engine, prompt_ids: np.ndarray, arrivals_s: np.ndarray, max_batch: int, gen_len: int,
                  rep: int) -> tuple[list[RequestTiming], float]:
    """Open-loop load: requests arrive on their schedule whatever the engine is doing.

    Batching policy (the engines here do not batch continuously): first come, first served;
    when the engine is free it takes every request that has arrived, up to max_batch, and runs
    that batch to completion. Requests arriving meanwhile wait (their TTFT includes the wait).
    """
    n, length = prompt_ids.shape
    t0 = time.perf_counter()
    pending = deque(range(n))
    timings: list[RequestTiming] = []
    while pending:
        now = time.perf_counter() - t0
        first = arrivals_s[pending[0]]
        if first > now:
            time.sleep(first - now)
            continue
        batch = []
        while pending and arrivals_s[pending[0]] <= now and len(batch) < max_batch:
            batch.append(pending.popleft())
        times = [t - t0 for t in engine.generate(prompt_ids[batch], gen_len)]
        timings += [RequestTiming(float(arrivals_s[i]), times, length, rep, i) for i in batch]
    timings.sort(key=lambda t: t.request)
    return timings, max(t.token_times_s[-1] for t in timings)
