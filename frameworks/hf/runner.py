"""One cell on the transformers engine, for any KV policy: build, warm up, measure."""

from __future__ import annotations

import time

from frameworks import models
from frameworks.harness import driver, loop
from frameworks.harness.memory import MemoryMonitor, apply_gpu_cap
from frameworks.harness.result import Measurement


def run_engine_cell(spec, policy_cls) -> Measurement:
    if spec.task is not None:  # accuracy and fact-retention cells
        from frameworks.accuracy.cell import run_accuracy_cell

        return run_accuracy_cell(spec, policy_cls)
    import torch

    from frameworks.hf.engine import Engine

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this cell needs a CUDA GPU and none is visible (use a CPU preset such as `smoke`)")
    cap = apply_gpu_cap(spec.gpu_memory_gb) if spec.device == "cuda" else {}
    torch.manual_seed(spec.seed)
    policy = policy_cls(spec)
    t0 = time.perf_counter()
    model = models.build(spec.model, spec.weights, spec.device, spec.dtype, policy.attn_implementation(spec.prefill), spec.seed)
    policy.prepare(model)
    engine = Engine(model, policy, spec.device, spec.prefill, spec.chunk_size, max_len=spec.prompt_len + spec.gen_len,
                    compile=spec.compile)
    build_s = time.perf_counter() - t0

    prompts, arrivals = loop.requests(spec, model.config.vocab_size)

    def rep(r: int):
        if arrivals is not None:
            return driver.run_open_loop(engine, prompts, arrivals, spec.batch_size, spec.gen_len, r)
        return driver.run_offline(engine, prompts, spec.gen_len, r)

    def reset_kv_peak() -> None:
        engine.kv_bytes_peak = 0
        policy.reset_metrics()  # counters cover the measured repetitions only

    m = loop.measure(spec, lambda _w: engine.generate(prompts[: spec.batch_size], loop.warmup_gen_len(spec)),
                     rep, MemoryMonitor(spec.device), before_measure=reset_kv_peak)
    extra = {"model_build_s": build_s, "warmup_s": m.warmup_s, "attn_implementation": model.config._attn_implementation,
             "decode": policy.decode, **engine.graph_stats(), **cap}
    extra.update(policy.metrics())
    return Measurement(m.timings, m.rep_durations_s, m.memory, engine.kv_bytes_peak, extra)
