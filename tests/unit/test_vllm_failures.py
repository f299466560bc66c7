"""Engine-core failures classified as oom; device-level memory for an allocator in another process."""

import subprocess
import sys

import pytest

from frameworks.harness import worker
from frameworks.harness.memory import MemoryMonitor
from frameworks.harness.metrics import RequestTiming, request_sample, summarize
from frameworks.vllm import failures, nvml

# as vLLM prints them from the engine-core process (0.11.0 wording; 0.32.0 keeps the marked phrases) (v1/core/kv_cache_utils.py; torch)
KV_TOO_SMALL = ("ValueError: To serve at least one request with the models's max seq len (131104), (16.01 GiB KV "
                "cache is needed, which is larger than the available KV cache memory (9.48 GiB). Based on the "
                "available memory, the estimated maximum model length is 77648. Try increasing "
                "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.")
CUDA_OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity of 79.19 GiB"


def test_child_stderr_is_kept_and_passed_through(capfd):
    with failures.StderrTail() as tail:
        code = f"import sys; sys.stderr.write({KV_TOO_SMALL!r} + '\\n')"
        subprocess.run([sys.executable, "-c", code], check=True)
        with pytest.raises(failures.VllmOutOfMemory, match="larger than the available KV cache memory"):
            failures.reraise_classified(RuntimeError("Engine core initialization failed. See root cause above."), tail)
    assert "estimated maximum model length" in capfd.readouterr().err


@pytest.mark.parametrize("text, oom", [(KV_TOO_SMALL, True), (CUDA_OOM, True),
                                       ("ValueError: No available memory for the cache blocks. Try ...", True),
                                       # vLLM 0.32.0 on CPU (v1/worker/cpu_worker.py), as it failed here
                                       ("ValueError: Available memory on node 0 (12.16/16.59 GiB) on startup is less "
                                        "than desired CPU memory utilization (0.9, 14.93 GiB).", True),
                                       ("RuntimeError: Engine core initialization failed.", False)])
def test_oom_causes(text, oom):
    assert (failures.oom_cause("INFO start\n" + text + "\nINFO end") is not None) == oom


def test_oom_outcomes_are_results_not_errors():
    assert worker.is_oom(failures.VllmOutOfMemory("CUDA out of memory"))
    assert worker.is_oom(failures.KVCacheTooSmall("KV cache of 16 tokens cannot hold one sequence of 2080"))
    with failures.StderrTail() as tail:
        failures.reraise_classified(RuntimeError("EngineCore encountered an issue."), tail)  # no cause: no raise


def test_nvml_device_follows_cuda_visible_devices():
    assert nvml.nvml_index(None) == ("index", "0")
    assert nvml.nvml_index("3,1") == ("index", "3")
    assert nvml.nvml_index("GPU-8a1f,GPU-77") == ("uuid", "GPU-8a1f")


def test_external_device_memory_is_the_per_gb_basis():
    used = iter(range(10**9, 10**12, 10**9))
    with MemoryMonitor("cuda", interval_s=0.001, device_used=lambda: next(used)) as mon:
        pass  # never touches torch.cuda: there is no GPU here
    mem = mon.result()
    assert mem["peak_gpu_mem_gb"] is None and mem["peak_device_mem_gb"] >= 2.0
    sample = request_sample(RequestTiming(0.0, [0.1, 0.2], 8))
    s = summarize([sample], [0.2], mem, 123)
    assert s["per_gb_basis"] == "peak_device_mem_gb"
    assert s["output_tok_s_per_gb"] == pytest.approx(10.0 / mem["peak_device_mem_gb"])
