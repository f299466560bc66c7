"""vLLM's own serving path (frameworks/vllm/serve.py) against the AsyncLLM cell: the real
OpenAI-compatible server on loopback, driven by vllm.benchmarks.serve on the harness's seeded
arrivals, its result mapped by frameworks/vllm/mapping.py. Two engine starts (~1-3 min on 2
cores). Run by tests/vllm_env.sh in the vLLM venv; skipped where vLLM is not importable."""

import math

import numpy as np
import pytest

from frameworks.harness import loop, metrics
from frameworks.harness.spec import CellSpec
from frameworks.vllm import mapping
from tests.unit.vllm_helpers import needs_vllm

pytestmark = needs_vllm

# TTFT and TPOT means of the two paths within this factor of each other. Loose on purpose: on a
# shared 2-core CPU the two runs happen minutes apart, and the server adds HTTP, detokenizing
# and its own process; a broken clock or a wrong mapping is off by far more (seconds vs ms,
# or per-chunk vs per-token TPOT)
TOLERANCE_FACTOR = 3.0


def spec(rate):
    return CellSpec.from_dict(dict(experiment="t", framework="vllm", model="tiny-llama-3.1", batch_size=4,
                                   prompt_len=48, gen_len=12, prefill="flash", device="cpu", dtype="float32",
                                   request_rate=rate, num_requests=6, repetitions=1, warmup=1, seed=5))


def mean(xs):
    return float(np.mean([x for x in xs if x is not None]))


def test_server_and_bench_serve_agree_with_the_asyncllm_cell(tmp_path):
    from frameworks.vllm import adapter, serve

    s = spec(8.0)
    prompts, arrivals = loop.requests(s, 1024)
    burst_prompts, burst_arrivals = loop.requests(spec(math.inf), 1024)
    (tmp_path / "m").mkdir()
    from frameworks.vllm import engine_args

    model_dir = engine_args.write_model_dir(s.model, tmp_path / "m")
    warm, paced, burst = serve.run_bench(s, [(prompts[:2], np.zeros(2)), (prompts, arrivals),
                                             (burst_prompts, burst_arrivals)], model_dir, tmp_path / "server.log")
    for r in (paced, burst):
        assert r["completed"] == 6 and not any(r["errors"]), r["errors"]
        assert r["output_lens"] == [12] * 6  # exactly gen_len through the server too
    # per-token times where every token came in its own chunk; refused (not guessed) otherwise
    per_token = [len(itl) + 1 == n for itl, n in zip(burst["itls"], burst["output_lens"])]
    if all(per_token):
        timings, _ = mapping.bench_serve_timings(burst, burst_arrivals)
        assert len(timings) == 6
    else:
        with pytest.raises(ValueError, match="chunks"):
            mapping.bench_serve_timings(burst, burst_arrivals)
    served = mapping.bench_serve_latencies(paced)
    assert len(mapping.bench_serve_latencies(burst)) == 6  # merged chunks or not

    m = adapter.run(s)  # the AsyncLLM cell, same prompts and arrivals
    ours = [metrics.request_sample(t) for t in m.timings]
    for key in ("ttft_ms", "tpot_ms"):
        a, b = mean(x[key] for x in ours), mean(x[key] for x in served)
        ratio = max(a, b) / min(a, b)
        print(f"{key}: AsyncLLM {a:.1f} ms, server {b:.1f} ms, ratio {ratio:.2f}")
        assert ratio < TOLERANCE_FACTOR, (key, a, b)
