"""Framework `vllm`: run(spec) -> Measurement, through vLLM 0.11.0's own engine.

Offline cells (request_rate None): one batch through vllm.LLM (offline.py). Request-rate cells:
AsyncLLM, vLLM's serving engine, in this process, fed the harness's seeded schedule
(online.py). Both: load_format="dummy" with the model's config.json (no hub, no weights),
token-id prompts of exact length, exactly gen_len tokens, prefix caching off, KV capacity fixed
when the cell asks (policy num_gpu_blocks / kv_cache_memory_bytes). Memory: NVML, device level.
"""

from __future__ import annotations

import asyncio
import tempfile
import time

import numpy as np

from frameworks import models
from frameworks.harness import workload
from frameworks.harness.memory import MemoryMonitor
from frameworks.harness.result import Measurement, Unsupported
from frameworks.vllm import VERSION, engine_args, failures, nvml, offline, online
from frameworks.vllm.mapping import cache_config_info, metrics_delta


def check_version() -> str:
    try:
        import vllm
    except ImportError:  # runner local in an environment without vLLM (e.g. a GPU image with torch only): a result
        raise Unsupported(f"vLLM is not installed in this environment: install vLLM {VERSION} "
                          "(containers/vllm/requirements.in) or run with runner=docker") from None

    if vllm.__version__ != VERSION:
        raise RuntimeError(f"the vllm adapter is written for vLLM {VERSION}, this environment has "
                           f"{vllm.__version__}: install containers/vllm/requirements.in")
    return vllm.__version__


def requests_for(spec) -> tuple[np.ndarray, np.ndarray | None]:
    """The cell's prompts and (request-rate cells) arrival times: the harness's seeded workload,
    drawn exactly as frameworks.hf.runner draws them, so every framework gets the same load."""
    vocab = models.config_dict(spec.model)["vocab_size"]
    prompts = workload.prompts(spec.seed, spec.n_requests, spec.prompt_len, vocab)
    if not spec.is_rate_cell:
        return prompts, None
    return prompts, workload.arrival_times(spec.seed, spec.n_requests, spec.request_rate, spec.burstiness)


def run(spec) -> Measurement:
    engine_args.check_supported(spec)
    check_version()
    config = models.config_dict(spec.model)
    prompts, arrivals = requests_for(spec)
    with tempfile.TemporaryDirectory(prefix="kvstudy-vllm-") as td, failures.StderrTail() as tail:
        total = nvml.device_total_bytes() if spec.gpu_memory_gb is not None else None
        kwargs = engine_args.engine_kwargs(spec, engine_args.write_model_dir(spec.model, td), total)
        cell = _Cell(spec, kwargs, config, prompts)
        try:
            if spec.is_rate_cell:
                return asyncio.run(cell.run_online(arrivals))
            return cell.run_offline()
        except failures.VllmOutOfMemory:
            raise
        except Exception as e:
            failures.reraise_classified(e, tail)
            raise


class _Cell:
    """One cell's engine life: build, check the KV layout, warm up, measure, shut down."""

    def __init__(self, spec, kwargs: dict, config: dict, prompts: np.ndarray):
        self.spec, self.kwargs, self.config, self.prompts = spec, kwargs, config, prompts
        self.device_used = nvml.device_used_fn()
        self.extra = {"vllm_version": VERSION, "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"},
                      "device_mem_before_engine_gb": self.device_used() / 1e9}

    def _built(self, vllm_config, t0: float) -> None:
        self.extra["engine_init_s"] = time.perf_counter() - t0
        cache = vllm_config.cache_config
        self.layout = engine_args.kv_cache_layout(self.config, cache.num_gpu_blocks, cache.block_size,
                                                  self.spec.dtype)
        self.extra.update(self.layout)
        need = engine_args.max_model_len(self.spec)
        if self.layout["kv_groups"] == 1 and self.layout["kv_capacity_tokens"] < need:
            # vLLM checks this only for the memory it profiled, not for num_gpu_blocks_override;
            # a sequence that can never fit would be preempted forever
            raise failures.KVCacheTooSmall(
                f"KV cache of {self.layout['kv_capacity_tokens']} tokens cannot hold one sequence of {need}")

    def _snapshot(self):
        from vllm.v1.metrics.reader import get_metrics_snapshot

        return get_metrics_snapshot()

    def _measurement(self, timings, durations, monitor, before, after) -> Measurement:
        self.extra["vllm_metrics"] = metrics_delta(before, after)
        self.extra["vllm_cache_config_info"] = cache_config_info(after)
        return Measurement(timings, durations, monitor.result(), self.layout["kv_cache_bytes"], self.extra)

    def _warm_gen(self) -> int:
        return min(self.spec.gen_len, 4)

    def run_offline(self) -> Measurement:
        spec = self.spec
        t0 = time.perf_counter()
        llm = offline.build(self.kwargs)
        try:
            self._built(llm.llm_engine.vllm_config, t0)
            t0 = time.perf_counter()
            for w in range(spec.warmup):  # same batch, fewer decode steps
                offline.generate(llm, self.prompts[: spec.batch_size], self._warm_gen(), f"w{w}")
            self.extra["warmup_s"] = time.perf_counter() - t0
            timings, durations = [], []
            before = self._snapshot()
            with MemoryMonitor("cuda", device_used=self.device_used) as mon:
                for rep in range(spec.repetitions):
                    t, d = offline.generate(llm, self.prompts, spec.gen_len, rep)
                    timings += t
                    durations.append(d)
            return self._measurement(timings, durations, mon, before, self._snapshot())
        finally:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None:
                core.shutdown()

    async def run_online(self, arrivals: np.ndarray) -> Measurement:
        spec = self.spec
        t0 = time.perf_counter()
        engine = online.build(self.kwargs)
        try:
            self._built(engine.vllm_config, t0)
            t0 = time.perf_counter()
            warm = self.prompts[: spec.batch_size]
            for w in range(spec.warmup):
                await online.generate(engine, warm, np.zeros(len(warm)), self._warm_gen(), f"w{w}")
            self.extra["warmup_s"] = time.perf_counter() - t0
            timings, durations = [], []
            before = self._snapshot()
            with MemoryMonitor("cuda", device_used=self.device_used) as mon:
                for rep in range(spec.repetitions):
                    t, d = await online.generate(engine, self.prompts, arrivals, spec.gen_len, rep)
                    timings += t
                    durations.append(d)
            return self._measurement(timings, durations, mon, before, self._snapshot())
        finally:
            engine.shutdown()
