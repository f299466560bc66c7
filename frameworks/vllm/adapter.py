"""Framework `vllm`: run(spec) -> Measurement, through vLLM 0.32.0's own engine.

Offline cells (request_rate None): one batch through vllm.LLM (offline.py). Request-rate cells:
AsyncLLM, vLLM's serving engine, in this process, fed the harness's seeded schedule
(online.py). Both: load_format="dummy" with the model's config.json (no hub, no weights),
token-id prompts of exact length, exactly gen_len tokens, prefix caching off, KV capacity fixed
when the cell asks (policy num_gpu_blocks / kv_cache_memory_bytes). Memory: NVML, device level.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

import numpy as np

from frameworks import models
from frameworks.harness import loop
from frameworks.harness.memory import MemoryMonitor
from frameworks.harness.result import Measurement, Unsupported
from frameworks.vllm import VERSION, engine_args, failures, nvml, offline, online, package_version
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
    """The cell's prompts and (request-rate cells) arrival times: the harness's one draw."""
    return loop.requests(spec, models.config_dict(spec.model)["vocab_size"])


def cpu_environment(spec) -> None:
    """CPU cells: the offline engine in this one process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
    vLLM's default, an engine-core process (and its worker) beside this one, costs 25-90 s of
    start per cell on 2 cores against 4.5-17 s in one process, and gains nothing on CPU, where
    the overlap of scheduling and GPU work it exists for does not arise. AsyncLLM (rate cells)
    always runs its engine core in a child process (v1/engine/core_client.py); the memory
    monitor sums the process tree either way. GPU cells keep vLLM's defaults."""
    if spec.device == "cpu":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ.get(CORES_ENV):  # pinned: the cell's cores, whatever else was set
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind(os.environ[CORES_ENV])
        else:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", omp_threads_bind(None))


CORES_ENV = "KVSTUDY_CPU_CORES"  # set by the launcher (workflow/lib/cores.py): this cell's own cores


def omp_threads_bind(cores: str | None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for a CPU cell. vLLM's default, `auto`, binds a worker's OpenMP
    threads to every core of the NUMA node (less one it reserves), the cores the pipeline gives
    other cells; the launcher pins each cell to cores of its own, and those are the binding
    (vLLM 0.32.0, utils/ompmultiprocessing.py: a worker process gets OMP_NUM_THREADS = their
    number and OMP_PLACES / OMP_PROC_BIND, GOMP_CPU_AFFINITY or KMP_AFFINITY on them; applied
    where the engine starts worker processes: the multiprocessing executor). The CPU cells here
    run vLLM's one-process executor, where vLLM binds nothing and the launcher's affinity alone
    confines the engine; the binding keeps an engine with worker processes on the same cores.
    A cell not pinned (run by hand): `nobind`, as before (with `auto` an engine here once failed
    to exit)."""
    return cores or "nobind"


def run(spec) -> Measurement:
    engine_args.check_supported(spec)
    cpu_environment(spec)
    check_version()
    config = models.config_dict(spec.model)
    prompts, arrivals = requests_for(spec)
    with tempfile.TemporaryDirectory(prefix="kvstudy-vllm-") as td, failures.StderrTail() as tail:
        total = nvml.device_total_bytes() if spec.gpu_memory_gb is not None else None
        kwargs = engine_args.engine_kwargs(spec, engine_args.write_model_dir(spec.model, td), total)
        cell = _Cell(spec, kwargs, config, prompts)
        try:
            if spec.is_rate_cell:
                return cell.run_online(arrivals)
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
        self.extra = {"vllm_version": VERSION, "vllm_package": package_version(),
                      "engine_kwargs": {k: v for k, v in kwargs.items() if k != "model"}}
        if spec.device == "cpu":  # where vLLM would bind its OpenMP threads (the cell's cores when pinned)
            self.extra["vllm_cpu_omp_threads_bind"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        # GPU: NVML at device level (the allocator is in the engine core). CPU: no NVML; the
        # model and the KV cache are in the engine-core child when multiprocessing is on, so
        # the RSS of the whole process tree
        self.device_used = nvml.device_used_fn() if spec.device == "cuda" else None
        if self.device_used is not None:
            self.extra["device_mem_before_engine_gb"] = self.device_used() / 1e9

    def _monitor(self) -> MemoryMonitor:
        if self.device_used is not None:
            return MemoryMonitor("cuda", device_used=self.device_used, tree=True)
        return MemoryMonitor("cpu", tree=True)

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

    def _before(self) -> None:
        self._counters_before = self._snapshot()

    def _measurement(self, m: loop.Measured) -> Measurement:
        after = self._snapshot()
        self.extra["warmup_s"] = m.warmup_s
        self.extra["vllm_metrics"] = metrics_delta(self._counters_before, after)
        self.extra["vllm_cache_config_info"] = cache_config_info(after)
        return Measurement(m.timings, m.rep_durations_s, m.memory, self.layout["kv_cache_bytes"], self.extra)

    def run_offline(self) -> Measurement:
        spec = self.spec
        t0 = time.perf_counter()
        llm = offline.build(self.kwargs)
        try:
            self._built(llm.llm_engine.vllm_config, t0)
            warm = self.prompts[: spec.batch_size]
            m = loop.measure(spec, lambda w: offline.generate(llm, warm, loop.warmup_gen_len(spec), f"w{w}"),
                             lambda r: offline.generate(llm, self.prompts, spec.gen_len, r),
                             self._monitor(), before_measure=self._before)
            return self._measurement(m)
        finally:
            core = getattr(llm.llm_engine, "engine_core", None)
            if core is not None:
                core.shutdown()

    def run_online(self, arrivals: np.ndarray) -> Measurement:
        """AsyncLLM on one event loop kept across calls (asyncio.Runner), so that the one
        synchronous measurement loop drives it: each batch is one runner.run."""
        spec = self.spec
        with asyncio.Runner() as runner:
            t0 = time.perf_counter()
            engine = runner.run(online.build_in_loop(self.kwargs))
            try:
                self._built(engine.vllm_config, t0)
                warm = self.prompts[: spec.batch_size]
                m = loop.measure(
                    spec, lambda w: runner.run(online.generate(engine, warm, np.zeros(len(warm)),
                                                               loop.warmup_gen_len(spec), f"w{w}")),
                    lambda r: runner.run(online.generate(engine, self.prompts, arrivals, spec.gen_len, r)),
                    self._monitor(), before_measure=self._before)
                return self._measurement(m)
            finally:
                engine.shutdown()
