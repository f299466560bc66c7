"""Framework `vllm`: vLLM's own engine, driven through its public Python APIs.

Pinned to vLLM 0.11.0 (see VERSION below). The adapter is split by concern:
  engine_args  what vLLM is asked to build for a cell (engine + sampling arguments, model dir)
  offline      offline batches through `vllm.LLM` (its LLMEngine, stepped here)
  online       request-rate cells through `AsyncLLM`, vLLM's serving engine, in this process
  mapping      vLLM outputs, Prometheus metrics and `vllm bench serve` JSON -> our schema
  failures     out-of-memory classification of engine-core failures
  adapter      run(spec): the entry point the harness calls
vLLM is imported lazily inside functions, so every module imports without it.
"""

# Why 0.11.0: the paper ran GPT-OSS, which vLLM supports from 0.10.1 (MXFP4 MoE, attention
# sinks); 0.11.0 is the release in which the V1 engine is the only engine, and the adapter is
# written and tested against its code (LLMEngine.step, AsyncLLM.generate, the Prometheus metric
# names, EngineArgs fields such as kv_cache_memory_bytes). adapter.run refuses other versions.
VERSION = "0.11.0"
