"""vLLM's outputs and metrics -> our schema. No vLLM import: inputs are duck-typed.

Three sources, each in vLLM 0.32.0's own format:
  - RequestOutput deltas (vllm/outputs.py; output_kind=DELTA): each carries the token ids new
    since the last one. Our clock stamps them when they reach this process, as `vllm bench
    serve` stamps streamed chunks; these host times are the per-request, per-token record, and
    metrics.py computes TTFT/TPOT/ITL/E2E from them.
  - the Prometheus snapshot (vllm/v1/metrics/reader.py Counter/Gauge/Histogram, metric names
    from v1/metrics/loggers.py): preemptions, token counters and vLLM's own mean latencies,
    kept in `extra` as a cross-check.
  - the `vllm bench serve --save-result --save-detailed` JSON (vllm/benchmarks/serve.py,
    `benchmark()` and `main()`), for runs of vLLM's own benchmark tool.
"""

from __future__ import annotations

import math

from frameworks.harness.metrics import RequestTiming


class TokenClock:
    """Per-request token timestamps, relative to the start of a repetition."""

    def __init__(self, arrivals_s, in_tokens: int, rep: int):
        self.arrivals_s = [float(a) for a in arrivals_s]
        self.in_tokens = in_tokens
        self.rep = rep
        self.times: list[list[float]] = [[] for _ in self.arrivals_s]

    def record(self, request: int, new_tokens: int, t_s: float) -> None:
        """`new_tokens` tokens of `request` reached the host at t_s (several when vLLM merged
        deltas because this process was behind: they share the time they were seen)."""
        self.times[request].extend([t_s] * new_tokens)

    def timings(self, gen_len: int) -> list[RequestTiming]:
        out = []
        for i, (arrival, times) in enumerate(zip(self.arrivals_s, self.times)):
            if len(times) != gen_len:
                raise RuntimeError(f"request {i} produced {len(times)} tokens, expected exactly {gen_len}")
            out.append(RequestTiming(arrival, times, self.in_tokens, self.rep, i))
        return out


def request_index(request_id: str) -> int:
    """Our request ids are "<rep>-<index>" (unique per engine, as vLLM requires)."""
    return int(request_id.rsplit("-", 1)[1])


def request_id(rep: int, index: int) -> str:
    return f"{rep}-{index}"


# -- Prometheus snapshot (LLM.get_metrics / vllm.v1.metrics.reader.get_metrics_snapshot) ------
COUNTERS = {
    "vllm:num_preemptions": "num_preemptions",
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:generation_tokens": "generation_tokens",
    "vllm:request_success": "requests_finished",
}
HISTOGRAMS_MS = {  # vLLM's own latencies (engine-side clocks), means in ms
    "vllm:time_to_first_token_seconds": "mean_ttft_ms",
    "vllm:inter_token_latency_seconds": "mean_itl_ms",
    "vllm:request_time_per_output_token_seconds": "mean_tpot_ms",
    "vllm:e2e_request_latency_seconds": "mean_e2e_ms",
    "vllm:request_queue_time_seconds": "mean_queue_ms",
    "vllm:request_prefill_time_seconds": "mean_prefill_ms",
    "vllm:request_decode_time_seconds": "mean_decode_ms",
}


def _kind(m) -> str:
    return type(m).__name__  # reader.py's dataclasses: Counter, Gauge, Histogram, Vector


def _totals(snapshot) -> dict:
    """name -> summed value (counters) or (sum, count) (histograms), over all label sets."""
    out: dict = {}
    for m in snapshot:
        if _kind(m) == "Counter" and m.name in COUNTERS:
            out[m.name] = out.get(m.name, 0) + m.value
        elif _kind(m) == "Histogram" and m.name in HISTOGRAMS_MS:
            s, c = out.get(m.name, (0.0, 0))
            out[m.name] = (s + m.sum, c + m.count)
    return out


def cache_config_info(snapshot) -> dict:
    """num_gpu_blocks and block_size from the vllm:cache_config_info gauge, whose labels are
    CacheConfig.metrics_info(): every CacheConfig field as a string."""
    for m in snapshot:
        if _kind(m) == "Gauge" and m.name == "vllm:cache_config_info":
            blocks = m.labels.get("num_gpu_blocks")
            return {
                "num_gpu_blocks": int(blocks) if blocks not in (None, "None") else None,
                "block_size": int(m.labels["block_size"]),
            }
    return {}


def metrics_delta(before, after) -> dict:
    """What vLLM's metrics counted between two snapshots (the measured repetitions only)."""
    b, a = _totals(before), _totals(after)
    out = {}
    for name, key in COUNTERS.items():
        out[key] = int(a.get(name, 0) - b.get(name, 0))
    for name, key in HISTOGRAMS_MS.items():
        s1, c1 = a.get(name, (0.0, 0))
        s0, c0 = b.get(name, (0.0, 0))
        out[key] = (s1 - s0) / (c1 - c0) * 1e3 if c1 > c0 else None
    return out


# -- `vllm bench serve` result JSON -------------------------------------------------------------
DETAILED_KEYS = ("input_lens", "output_lens", "ttfts", "itls")


def bench_serve_timings(result: dict, arrivals_s=None, rep: int = 0) -> tuple[list[RequestTiming], float]:
    """Per-request timings from a `vllm bench serve --save-result --save-detailed` JSON.

    The file holds, per request, `ttfts` (s), `itls` (s, one per streamed chunk after the first)
    and `input_lens` / `output_lens`, but not when each request was sent: `arrivals_s` supplies
    those when known; otherwise every request is placed at 0, which keeps every per-request
    metric (all relative to arrival) right. Failed requests (empty `errors` entry is success)
    are left out, as vLLM's own summary does. A request whose chunks are fewer than its tokens
    (the server merged tokens) has no per-token times: that is an error, not a guess.
    """
    missing = [k for k in DETAILED_KEYS if k not in result]
    if missing:
        raise ValueError(f"bench serve result lacks {missing}: run it with --save-detailed")
    errors = result.get("errors") or [""] * len(result["ttfts"])
    timings = []
    for i, (n_in, n_out, ttft, itl, err) in enumerate(
        zip(result["input_lens"], result["output_lens"], result["ttfts"], result["itls"], errors)
    ):
        if err or not n_out:
            continue
        if len(itl) + 1 != n_out:
            raise ValueError(f"request {i}: {len(itl) + 1} streamed chunks for {n_out} tokens; "
                             "per-token times are not recoverable")
        arrival = float(arrivals_s[i]) if arrivals_s is not None else 0.0
        t = arrival + ttft
        times = [t]
        for gap in itl:
            t += gap
            times.append(t)
        timings.append(RequestTiming(arrival, times, int(n_in), rep, i))
    if not timings:
        raise ValueError("bench serve result has no successful request")
    return timings, float(result["duration"])


def bench_serve_reference(result: dict) -> dict:
    """vLLM's own summary numbers from the same JSON, kept next to ours as a cross-check."""
    keys = ["duration", "completed", "request_throughput", "output_throughput", "total_token_throughput",
            "request_rate", "burstiness", "max_concurrency"]
    keys += [k for k in result if k.split("_", 1)[0] in ("mean", "median", "std") or
             (k.startswith("p") and k.endswith("_ms"))]
    out = {}
    for k in keys:
        if k in result:
            v = result[k]
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


def bench_serve_latencies(result: dict) -> list[dict]:
    """Per-request TTFT, TPOT and E2E (ms) from a bench serve result, as vLLM's own summary
    computes them (TPOT = (latency - TTFT) / (output_len - 1)). Unlike bench_serve_timings this
    needs no per-token times, so it holds when the server merged streamed tokens into fewer
    chunks (at rate inf, 26-32 chunks for 32 tokens on 2 cores)."""
    errors = result.get("errors") or [""] * len(result["ttfts"])
    out = []
    for i, (n_out, ttft, latency, err) in enumerate(
            zip(result["output_lens"], result["ttfts"], result["latencies"], errors)):
        if err or not n_out:
            continue
        out.append({"request": i, "out_tokens": int(n_out), "ttft_ms": ttft * 1e3, "e2e_ms": latency * 1e3,
                    "tpot_ms": (latency - ttft) * 1e3 / (n_out - 1) if n_out > 1 else None})
    return out
