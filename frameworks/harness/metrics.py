"""One definition of every metric, shared by all frameworks.

A framework reports, per request, when it arrived, when each output token was produced and how
many tokens went in: everything else is computed here. Times are seconds on one monotonic clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STAT_KEYS = ("mean", "p50", "p90", "p99")
LATENCY_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@dataclass
class RequestTiming:
    """Raw timing of one request: arrival, then the time each output token became available."""

    arrival_s: float
    token_times_s: list[float]
    in_tokens: int
    rep: int = 0
    request: int = 0

    @property
    def out_tokens(self) -> int:
        return len(self.token_times_s)


def request_sample(t: RequestTiming) -> dict:
    """Per-request metrics. TPOT = (E2E - TTFT) / (out_tokens - 1); undefined for one token."""
    index = t.request
    if not t.token_times_s:
        raise ValueError(f"request {index} produced no token")
    times = np.asarray(t.token_times_s)
    if np.any(np.diff(times) < 0) or times[0] < t.arrival_s:
        raise ValueError(f"request {index}: token times must not decrease nor precede arrival")
    ttft = (times[0] - t.arrival_s) * 1e3
    e2e = (times[-1] - t.arrival_s) * 1e3
    n = len(times)
    return {
        "rep": t.rep,
        "request": t.request,
        "arrival_s": float(t.arrival_s),
        "in_tokens": int(t.in_tokens),
        "out_tokens": n,
        "ttft_ms": float(ttft),
        "e2e_ms": float(e2e),
        "tpot_ms": float((e2e - ttft) / (n - 1)) if n > 1 else None,
        "itl_ms": [float(x) for x in np.diff(times) * 1e3],
    }


def stats(values) -> dict | None:
    """mean / p50 / p90 / p99 (linear interpolation, as numpy and vLLM's benchmark)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return None
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(samples: list[dict], rep_durations_s: list[float], memory: dict, kv_cache_bytes: int | None) -> dict:
    """Summary of a cell: latency stats over all requests of all repetitions; throughput per
    repetition (output tokens / wall time of that repetition), averaged over repetitions.
    """
    if not samples:
        raise ValueError("no samples")
    n_reps = len(rep_durations_s)
    by_rep = [[s for s in samples if s["rep"] == r] for r in range(n_reps)]
    if any(not reqs for reqs in by_rep):
        raise ValueError("every repetition needs samples")
    out_tps, tot_tps, req_ps = [], [], []
    for reqs, dur in zip(by_rep, rep_durations_s):
        if dur <= 0:
            raise ValueError(f"repetition duration must be > 0, got {dur}")
        out = sum(s["out_tokens"] for s in reqs)
        inp = sum(s["in_tokens"] for s in reqs)
        out_tps.append(out / dur)
        tot_tps.append((out + inp) / dur)
        req_ps.append(len(reqs) / dur)
    summary = {
        "ttft_ms": stats(s["ttft_ms"] for s in samples),
        "tpot_ms": stats(s["tpot_ms"] for s in samples),
        "itl_ms": stats(x for s in samples for x in s["itl_ms"]),
        "e2e_ms": stats(s["e2e_ms"] for s in samples),
        "output_tok_s": float(np.mean(out_tps)),
        "output_tok_s_std": float(np.std(out_tps)),
        "total_tok_s": float(np.mean(tot_tps)),
        "request_s": float(np.mean(req_ps)),
        "duration_s": float(np.mean(rep_durations_s)),
        "num_requests": len(by_rep[0]),
        "repetitions": n_reps,
        "kv_cache_bytes": int(kv_cache_bytes) if kv_cache_bytes is not None else None,
    }
    summary.update(memory)
    # device-level memory in use on GPUs: the one measure every framework has (vLLM's allocator
    # lives in another process) and what the device loses to the framework; host RSS on the CPU
    basis = "peak_device_mem_gb" if memory.get("peak_device_mem_gb") else "peak_rss_gb"
    gb = memory.get(basis)
    summary["per_gb_basis"] = basis
    summary["output_tok_s_per_gb"] = summary["output_tok_s"] / gb if gb else None
    return summary
