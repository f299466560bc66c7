"""One classification of a cell's outcome (frameworks/harness/outcome.py), for every framework."""

from __future__ import annotations

import pytest
import torch

from frameworks.harness import outcome, provenance, result
from frameworks.harness.metrics import RequestTiming
from frameworks.harness.spec import CellSpec, SpecError


@pytest.mark.parametrize("exc,status", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "oom"),
    (MemoryError(), "oom"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), "oom"),
    (result.Unsupported("no such architecture"), "unsupported"),
    (TimeoutError("the server did not answer in 600 s"), "timeout"),
    (RuntimeError("shape mismatch"), "error"),
    (ValueError("bad"), "error"),
])
def test_classify(exc, status):
    assert outcome.classify(exc)[0] == status


def _spec(framework, **kw):
    return CellSpec.from_dict(dict(experiment="t", framework=framework, model="tiny-gpt-oss", batch_size=1,
                                   prompt_len=8, gen_len=2, device="cpu", dtype="float32", **kw))


@pytest.mark.parametrize("framework,kw", [("h2o", dict(prefill="eager", kv_budget=0.5)),
                                          ("infinigen", dict(prefill="eager", kv_budget=0.5))])
def test_an_unsupported_architecture_is_recorded_as_unsupported_in_every_policy(framework, kw):
    import importlib

    from frameworks import registry

    s = _spec(framework, **kw)
    rec = outcome.run_and_record(s, lambda: importlib.import_module(registry.get(framework).adapter).run(s),
                                 provenance=provenance.collect(0, with_gpu=False))
    assert rec["status"] == "unsupported", rec["message"]
    assert "gpt" in rec["message"].lower() and rec["summary"] is None


def test_run_and_record_keeps_an_ok_measurement_and_propagates_an_interrupt():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outcome.run_and_record(_spec("hf"), interrupted, provenance={})
    m = result.Measurement([RequestTiming(0.0, [0.1, 0.2], 8)], [1.0],
                           {"peak_rss_gb": 1.0, "peak_gpu_mem_gb": None, "peak_device_mem_gb": None})
    rec = outcome.run_and_record(_spec("hf"), lambda: m, provenance=provenance.collect(0, with_gpu=False))
    assert rec["status"] == "ok" and rec["summary"] is not None


@pytest.mark.parametrize("framework", ["hf", "infinigen"])
def test_flash_prefill_in_float32_on_cuda_is_rejected_at_validation(framework):
    with pytest.raises(SpecError, match="flash.*float32"):
        CellSpec.from_dict(dict(experiment="t", framework=framework, model="tiny-llama-3.1", prefill="flash",
                                device="cuda", dtype="float32"))
    # vLLM's `flash` is unchunked prefill, not torch's kernel: float32 is fine there
    CellSpec.from_dict(dict(experiment="t", framework="vllm", model="tiny-llama-3.1", prefill="flash",
                            device="cuda", dtype="float32"))
