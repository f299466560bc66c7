"""The frameworks the artifact knows: what each accepts, where its adapter lives.

Torch-free on purpose: the host-side workflow imports it to validate configs before any
cell runs. An adapter module exposes ``run(spec) -> Measurement`` (frameworks.harness.result).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Framework:
    name: str
    adapter: str  # module with run(spec)
    description: str
    full_cache_only: bool  # True: kv_budget must be 1.0
    label: str  # its name in figures and tables
    # True: runs on the transformers engine (frameworks/hf): its image is FROM the engine stage, and
    # prefill=flash is torch's flash-attention SDPA kernel on CUDA, which has no float32 version
    # (vLLM's `flash` means unchunked prefill and takes any dtype)
    on_engine: bool
    prefill_modes: tuple[str, ...]
    policy_keys: frozenset[str] = field(default_factory=frozenset)
    # "module:function" (torch-free) raising ValueError for a policy a cell cannot run; called by
    # CellSpec.validate, so the host rejects a bad value before any cell runs
    policy_check: str | None = None
    # decode step: "graph" (static shapes, captured once, replayed) or "eager" (transformers as-is,
    # one forward and a host sync per step); the first is the default of the framework's cells
    decode_modes: tuple[str, ...] = ("graph", "eager")
    # busy processes of a request-rate cell on the CPU, each on the cell's threads (the workflow
    # reserves that many cores for it): vLLM's AsyncLLM runs its engine core beside the driver
    rate_cell_processes: int = 1


PREFILL_MODES = ("eager", "sdpa", "flash", "chunked")

FRAMEWORKS: dict[str, Framework] = {
    f.name: f
    for f in (
        Framework(
            name="hf",
            label="HF full cache",
            adapter="frameworks.hf.adapter",
            description="transformers engine, full KV cache on the GPU (baseline of the KV policies)",
            full_cache_only=True,
            prefill_modes=PREFILL_MODES,
            on_engine=True,
        ),
        Framework(
            name="h2o",
            label="H2O",
            adapter="frameworks.h2o.adapter",
            description="H2O heavy-hitter eviction on the transformers engine",
            full_cache_only=False,
            prefill_modes=("eager", "chunked"),
            policy_keys=frozenset({"heavy_ratio", "recent_ratio", "heavy_size", "recent_size"}),
            policy_check="frameworks.h2o.budget:check",
            on_engine=True,
        ),
        Framework(
            name="infinigen",
            label="InfiniGen",
            adapter="frameworks.infinigen.adapter",
            description="InfiniGen: KV cache in CPU memory, speculative prefetch",
            full_cache_only=False,
            prefill_modes=("eager", "flash", "chunked"),
            policy_keys=frozenset({"alpha", "partial_weight_ratio", "max_num_kv", "full_layers", "budget_rule",
                                  "speculation_input", "partial_columns", "min_fetch", "gather_sms"}),
            policy_check="frameworks.infinigen.options:check",
            on_engine=True,
            # graph decode (frameworks/infinigen/cache.py) equals eager on the H200 (benchmarks/gpu_infinigen_graph.py,
            # results/reference/h200-2026-12-02/infinigen-graph-7d916f0/); eager = the paper's port as it ran
            decode_modes=("graph", "eager"),
        ),
        Framework(
            name="vllm",
            label="vLLM",
            adapter="frameworks.vllm.adapter",
            description="vLLM (PagedAttention, continuous batching)",
            full_cache_only=True,
            on_engine=False,
            prefill_modes=("flash", "chunked"),
            policy_keys=frozenset(
                {"gpu_memory_utilization", "num_gpu_blocks", "kv_cache_memory_bytes", "enforce_eager", "max_num_seqs"}
            ),
            decode_modes=("graph",),  # vLLM's own CUDA graphs; its policy key enforce_eager turns them off
            rate_cell_processes=2,
        ),
    )
}


def get(name: str) -> Framework:
    try:
        return FRAMEWORKS[name]
    except KeyError:
        raise ValueError(f"unknown framework {name!r}; known: {', '.join(FRAMEWORKS)}") from None
