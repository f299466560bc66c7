"""One cell on the transformers engine, for any KV policy: build, warm up, measure."""

from __future__ import annotations

import time

from frameworks import models
from frameworks.harness import driver, workload
from frameworks.harness.memory import MemoryMonitor
from frameworks.harness.result import Measurement


def run_engine_cell(spec, policy_cls) -> Measurement:
    if spec.task is not None:  # accuracy and fact-retention cells
        from frameworks.accuracy.cell import run_accuracy_cell

        return run_accuracy_cell(spec, policy_cls)
    import torch

    from frameworks.hf.engine import Engine

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this cell needs a CUDA GPU and none is visible (use a CPU preset such as `smoke`)")
    torch.manual_seed(spec.seed)
    policy = policy_cls(spec)
    t0 = time.perf_counter()
    model = models.build(spec.model, spec.weights, spec.device, spec.dtype, policy.attn_implementation(spec.prefill), spec.seed)
    policy.prepare(model)
    engine = Engine(model, policy, spec.device, spec.prefill, spec.chunk_size)
    build_s = time.perf_counter() - t0

    vocab = model.config.vocab_size
    prompts = workload.prompts(spec.seed, spec.n_requests, spec.prompt_len, vocab)
    t0 = time.perf_counter()
    for _ in range(spec.warmup):  # same shapes as the cell, fewer decode steps
        engine.generate(prompts[: spec.batch_size], min(spec.gen_len, 4))
    warmup_s = time.perf_counter() - t0
    engine.kv_bytes_peak = 0
    policy.reset_metrics()  # counters cover the measured repetitions only

    timings, durations = [], []
    with MemoryMonitor(spec.device) as mon:
        for rep in range(spec.repetitions):
            if spec.is_rate_cell:
                arrivals = workload.arrival_times(spec.seed, spec.n_requests, spec.request_rate, spec.burstiness)
                t, d = driver.run_open_loop(engine, prompts, arrivals, spec.batch_size, spec.gen_len, rep)
            else:
                t, d = driver.run_offline(engine, prompts, spec.gen_len, rep)
            timings += t
            durations.append(d)
    extra = {"model_build_s": build_s, "warmup_s": warmup_s, "attn_implementation": model.config._attn_implementation}
    extra.update(policy.metrics())
    return Measurement(timings, durations, mon.result(), engine.kv_bytes_peak, extra)
