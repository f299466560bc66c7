"""Metrics against hand-computed values."""

import math

import pytest

from frameworks.harness.metrics import RequestTiming, request_sample, stats, summarize


def test_request_sample_hand_computed():
    # arrives at 1.0 s; tokens at 1.5, 1.6, 1.8, 2.1 s
    s = request_sample(RequestTiming(1.0, [1.5, 1.6, 1.8, 2.1], in_tokens=10, rep=0, request=3))
    assert s["ttft_ms"] == pytest.approx(500.0)
    assert s["e2e_ms"] == pytest.approx(1100.0)
    assert s["tpot_ms"] == pytest.approx((1100.0 - 500.0) / 3)
    assert s["itl_ms"] == pytest.approx([100.0, 200.0, 300.0])
    assert (s["out_tokens"], s["in_tokens"], s["request"]) == (4, 10, 3)


def test_single_token_has_no_tpot():
    s = request_sample(RequestTiming(0.0, [0.25], in_tokens=5))
    assert s["tpot_ms"] is None and s["itl_ms"] == [] and s["ttft_ms"] == pytest.approx(250.0)


def test_token_before_arrival_is_rejected():
    with pytest.raises(ValueError, match="precede arrival"):
        request_sample(RequestTiming(2.0, [1.0], in_tokens=1))


def test_stats_percentiles_linear():
    st = stats([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert st["mean"] == pytest.approx(5.5)
    assert st["p50"] == pytest.approx(5.5)
    assert st["p90"] == pytest.approx(9.1)
    assert st["p99"] == pytest.approx(9.91)
    assert stats([None, None]) is None


def test_summarize_throughput_per_repetition():
    timings = [RequestTiming(0.0, [0.1, 0.2], 8, rep=0, request=i) for i in range(2)]
    timings += [RequestTiming(0.0, [0.2, 0.4], 8, rep=1, request=i) for i in range(2)]
    samples = [request_sample(t) for t in timings]
    mem = {"peak_gpu_mem_gb": 2.0, "peak_device_mem_gb": 3.0, "peak_rss_gb": 1.0}
    s = summarize(samples, [0.2, 0.4], mem, kv_cache_bytes=1024)
    # rep 0: 4 output tokens / 0.2 s = 20 tok/s; rep 1: 4 / 0.4 = 10 tok/s
    assert s["output_tok_s"] == pytest.approx(15.0)
    assert s["output_tok_s_std"] == pytest.approx(5.0)
    assert s["total_tok_s"] == pytest.approx((20 / 0.2 + 20 / 0.4) / 2)
    assert s["request_s"] == pytest.approx((2 / 0.2 + 2 / 0.4) / 2)
    assert s["output_tok_s_per_gb"] == pytest.approx(5.0)  # per GB of device-level memory
    assert s["per_gb_basis"] == "peak_device_mem_gb"
    assert s["ttft_ms"]["mean"] == pytest.approx(150.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(150.0)
    assert s["kv_cache_bytes"] == 1024 and s["num_requests"] == 2 and s["repetitions"] == 2


def test_summarize_cpu_uses_rss():
    samples = [request_sample(RequestTiming(0.0, [0.5, 1.0], 4))]
    s = summarize(samples, [1.0], {"peak_gpu_mem_gb": None, "peak_device_mem_gb": None, "peak_rss_gb": 0.5}, None)
    assert s["per_gb_basis"] == "peak_rss_gb" and s["output_tok_s_per_gb"] == pytest.approx(4.0)
    assert not math.isnan(s["output_tok_s"])
