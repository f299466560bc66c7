"""vLLM's outputs and metrics -> our schema, on data in vLLM 0.32.0's real formats.

- bench_serve_detailed.json was written by vLLM 0.32.0's own vllm/benchmarks/serve.py
  (`benchmark()`, result keys as `main()` saves them with --save-result --save-detailed; see
  fixtures/vllm/make_bench_serve_fixture.py): our metrics must reproduce vLLM's own numbers.
- Prometheus snapshots: vllm/v1/metrics/reader.py dataclasses (Counter, Gauge, Histogram),
  metric names from vllm/v1/metrics/loggers.py; with vLLM present, written by its real logger.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from frameworks.harness import provenance, result
from frameworks.harness.metrics import request_sample, summarize
from frameworks.vllm import mapping
from tests.unit.vllm_helpers import needs_vllm
from tests.unit.vllm_helpers import spec as vllm_spec

FIXTURE = Path(__file__).parent / "fixtures" / "vllm" / "bench_serve_detailed.json"


def _bench():
    return json.loads(FIXTURE.read_text())


def test_bench_serve_json_reproduces_vllms_own_statistics():
    res = _bench()
    timings, duration = mapping.bench_serve_timings(res)
    assert len(timings) == res["completed"] == 11  # the failed request is left out, as vLLM does
    samples = [request_sample(t) for t in timings]
    s = summarize(samples, [duration], {"peak_rss_gb": 1.0, "peak_gpu_mem_gb": None, "peak_device_mem_gb": None}, None)
    for ours, theirs in [("ttft_ms", "ttft"), ("tpot_ms", "tpot"), ("itl_ms", "itl"), ("e2e_ms", "e2el")]:
        assert s[ours]["mean"] == pytest.approx(res[f"mean_{theirs}_ms"], rel=1e-9)
        for p in ("p50", "p90", "p99"):
            assert s[ours][p] == pytest.approx(res[f"{p}_{theirs}_ms"], rel=1e-9)
    assert s["output_tok_s"] == pytest.approx(res["output_throughput"], rel=1e-9)
    assert s["total_tok_s"] == pytest.approx(res["total_token_throughput"], rel=1e-9)
    assert s["request_s"] == pytest.approx(res["request_throughput"], rel=1e-9)


def test_bench_serve_json_with_known_arrivals_becomes_a_valid_result():
    res = _bench()
    arrivals = [0.1 * i for i in range(len(res["ttfts"]))]
    timings, duration = mapping.bench_serve_timings(res, arrivals_s=arrivals)
    assert timings[3].arrival_s == pytest.approx(0.3)
    assert timings[3].token_times_s[0] == pytest.approx(0.3 + res["ttfts"][3])
    m = result.Measurement(timings, [duration], {"peak_rss_gb": 1.0, "peak_gpu_mem_gb": None,
                                                 "peak_device_mem_gb": None}, None,
                           {"vllm_bench_serve": mapping.bench_serve_reference(res)})
    spec = vllm_spec(request_rate=40.0, num_requests=12)
    prov = provenance.collect(0, with_gpu=False)
    out = result.build(spec.to_dict(), spec.cell_id, "ok", "", prov, "s", "e", m)
    assert out["extra"]["vllm_bench_serve"]["mean_ttft_ms"] == res["mean_ttft_ms"]
    assert "ttfts" not in out["extra"]["vllm_bench_serve"]


def test_bench_serve_json_without_detail_or_with_merged_chunks_is_refused():
    res = _bench()
    with pytest.raises(ValueError, match="--save-detailed"):
        mapping.bench_serve_timings({k: v for k, v in res.items() if k != "itls"})
    res["itls"][0] = res["itls"][0][:-2]
    with pytest.raises(ValueError, match="not recoverable"):
        mapping.bench_serve_timings(res)


def test_token_clock_from_deltas():
    clock = mapping.TokenClock([0.0, 0.5], in_tokens=16, rep=1)
    clock.record(0, 1, 0.2)
    clock.record(1, 1, 0.7)
    clock.record(0, 2, 0.3)  # two tokens in one merged delta share their time
    clock.record(1, 2, 0.9)
    t = clock.timings(gen_len=3)
    assert t[0].token_times_s == [0.2, 0.3, 0.3] and t[1].arrival_s == 0.5 and t[1].rep == 1
    assert request_sample(t[1])["ttft_ms"] == pytest.approx(200.0)
    clock.record(0, 1, 1.0)
    with pytest.raises(RuntimeError, match="exactly 3"):
        clock.timings(gen_len=3)


def test_request_ids_round_trip():
    assert mapping.request_index(mapping.request_id(3, 17)) == 17
    assert mapping.request_index(mapping.request_id("w0", 2)) == 2


# reader.py's dataclasses, reproduced for environments without vLLM (same names and fields)
@dataclass
class Counter:
    name: str
    labels: dict
    value: int


@dataclass
class Gauge:
    name: str
    labels: dict
    value: float


@dataclass
class Histogram:
    name: str
    labels: dict
    count: int
    sum: float
    buckets: dict


LABELS = {"model_name": "/tmp/m", "engine": "0"}


def _snapshot(preempt, ttft_sum, ttft_count, blocks="12345"):
    return [
        Counter("vllm:num_preemptions", LABELS, preempt),
        Counter("vllm:generation_tokens", LABELS, 10 * ttft_count),
        Histogram("vllm:time_to_first_token_seconds", LABELS, ttft_count, ttft_sum, {"+Inf": ttft_count}),
        Gauge("vllm:cache_config_info", {**LABELS, "block_size": "16", "num_gpu_blocks": blocks}, 1.0),
        Gauge("vllm:kv_cache_usage_perc", LABELS, 0.4),
    ]


def test_metrics_delta_counts_only_the_measured_window():
    d = mapping.metrics_delta(_snapshot(1, 0.5, 5), _snapshot(4, 2.5, 15))
    assert d["num_preemptions"] == 3 and d["generation_tokens"] == 100
    assert d["mean_ttft_ms"] == pytest.approx(200.0)
    assert d["mean_e2e_ms"] is None  # nothing observed
    assert mapping.cache_config_info(_snapshot(0, 0, 0)) == {"num_gpu_blocks": 12345, "block_size": 16}


@needs_vllm
def test_metrics_from_vllms_own_prometheus_logger(tmp_path):
    """vLLM's PrometheusStatLogger records iterations; vLLM's reader snapshots them; we map it."""
    from vllm import EngineArgs
    from vllm.config import CacheConfig, ObservabilityConfig
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.reader import get_metrics_snapshot
    from vllm.v1.metrics.stats import IterationStats, RequestStateStats, SchedulerStats

    from frameworks.vllm import engine_args as ea
    from tests.unit.vllm_helpers import spec

    cell = spec(model="tiny-llama-3.1", prompt_len=64, gen_len=16)
    kw = ea.engine_kwargs(cell, ea.write_model_dir(cell.model, tmp_path / "m"))
    cache = CacheConfig(block_size=16, enable_prefix_caching=False)
    cache.num_gpu_blocks = 777
    vllm_config = SimpleNamespace(model_config=EngineArgs(**kw).create_model_config(), cache_config=cache,
                                  observability_config=ObservabilityConfig(), speculative_config=None,
                                  lora_config=None, kv_transfer_config=None, ec_transfer_config=None, watermark_config=None)
    logger = PrometheusStatLogger(vllm_config, [0])
    logger.log_engine_initialized()

    def iteration(preempted, ttfts, finished):
        it = IterationStats()
        it.num_preempted_reqs, it.time_to_first_tokens_iter = preempted, ttfts
        it.num_generation_tokens = len(ttfts)
        for e2e in finished:
            stats = RequestStateStats(num_generation_tokens=16, arrival_time=it.iteration_timestamp - e2e,
                                      queued_ts=1.0, scheduled_ts=1.25, first_token_ts=1.5, last_token_ts=3.0)
            it.update_from_finished_request(FinishReason.LENGTH, f"r{len(finished)}", 64, 16, stats)
        logger.record(SchedulerStats(), it, engine_idx=0)

    iteration(1, [0.5], [])  # before the measured window
    before = get_metrics_snapshot()
    iteration(2, [0.1, 0.3], [2.0, 4.0])
    after = get_metrics_snapshot()
    d = mapping.metrics_delta(before, after)
    assert d["num_preemptions"] == 2 and d["requests_finished"] == 2
    assert d["mean_ttft_ms"] == pytest.approx(200.0)
    assert d["mean_e2e_ms"] == pytest.approx(3000.0, rel=1e-3)
    assert d["mean_queue_ms"] == pytest.approx(250.0)
    assert d["mean_decode_ms"] == pytest.approx(1500.0)
    assert d["mean_tpot_ms"] == pytest.approx(1500.0 / 15)
    assert mapping.cache_config_info(after) == {"num_gpu_blocks": 777, "block_size": 16}


def test_bench_serve_latencies_reproduce_vllms_means_and_survive_merged_chunks():
    r = _bench()
    lat = mapping.bench_serve_latencies(r)
    assert len(lat) == r["completed"] == 11  # request 5 failed
    mean = lambda k: sum(x[k] for x in lat) / len(lat)  # noqa: E731
    assert mean("ttft_ms") == pytest.approx(r["mean_ttft_ms"])
    assert mean("tpot_ms") == pytest.approx(r["mean_tpot_ms"])
    assert mean("e2e_ms") == pytest.approx(r["mean_e2el_ms"])
    # the server merged two tokens into one chunk: per-token times are refused, latencies still hold
    merged = {**r, "itls": [itl[:-1] for itl in r["itls"]]}
    with pytest.raises(ValueError, match="chunks"):
        mapping.bench_serve_timings(merged)
    assert mapping.bench_serve_latencies(merged) == lat
