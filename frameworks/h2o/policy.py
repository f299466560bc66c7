"""H2OPolicy: the engine's KV policy for H2O (see frameworks/h2o/__init__.py)."""

from __future__ import annotations

from transformers.cache_utils import Cache

from frameworks.h2o import attention, kernels
from frameworks.h2o.budget import Budget
from frameworks.h2o.cache import H2OLayer
from frameworks.harness.result import Unsupported
from frameworks.hf.policy import KVPolicy

# model_type -> attention module class: the architectures whose attention calls the registered
# attention function with (query, key, value) after RoPE / scaling and exposes `layer_idx`
SUPPORTED = {"llama": "LlamaAttention", "opt": "OPTAttention"}


_DTYPES = {"float16", "bfloat16", "float32"}  # what the Triton kernels take


class H2OPolicy(KVPolicy):
    name = "h2o"
    # "triton" | "torch" | None: the Triton kernels (kernels.py) for chunked prefill's scores and
    # graph decode's full-slot step; None = on CUDA where triton imports, torch elsewhere (the torch
    # path is the reference). Eager decode ("transformers as-is") and eager prefill stay torch.
    kernel: str | None = None

    def __init__(self, spec):
        super().__init__(spec)
        if spec.prefill not in attention.IMPLEMENTATIONS:
            raise ValueError(f"h2o: prefill must be one of {sorted(attention.IMPLEMENTATIONS)}, got {spec.prefill!r}")
        self.budget = Budget.from_spec(spec.kv_budget, spec.policy)
        self.heavy, self.recent = self.budget.sizes(spec.prompt_len)  # fails fast on a zero budget
        self.cache: Cache | None = None
        attention.register()
        kernel = self.kernel
        if kernel is None:
            on_gpu = str(spec.device).startswith("cuda") and kernels.available() and spec.dtype in _DTYPES
            kernel = "triton" if on_gpu else "torch"
        if kernel not in ("triton", "torch"):
            raise ValueError(f"h2o: kernel must be triton or torch, got {kernel!r}")
        if kernel == "triton" and not (kernels.available() and spec.dtype in _DTYPES):
            raise ValueError(f"h2o: the Triton kernels need the `triton` package and dtype {sorted(_DTYPES)}")
        self.score_kernel = kernel if spec.prefill == "chunked" else "torch"
        self.step_kernel = kernel if self.decode == "graph" else "torch"

    def attn_implementation(self, prefill: str) -> str:
        return attention.IMPLEMENTATIONS[prefill]

    def prepare(self, model) -> None:
        model_type = getattr(model.config, "model_type", None)
        arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        if model_type not in SUPPORTED:
            raise Unsupported(f"h2o does not support the architecture {arch} (model_type {model_type!r}); "
                             f"supported model types: {', '.join(SUPPORTED)}")
        modules = [m for m in model.modules() if type(m).__name__ == SUPPORTED[model_type]]
        if len(modules) != model.config.num_hidden_layers:
            raise Unsupported(f"h2o: expected {model.config.num_hidden_layers} {SUPPORTED[model_type]} modules in {arch}, "
                             f"found {len(modules)}")
        for m in modules:
            m.h2o_policy = self  # how the registered attention function finds this batch's cache

    def new_cache(self, model, batch_size: int, max_len: int, prompt_len: int) -> Cache:
        key = (batch_size, prompt_len)
        if self.decode == "graph" and key in self._static:  # same slots, same addresses: the captured step holds
            self.cache = self._static[key]
            for layer in self.cache.layers:
                layer.reset(prompt_len)
            return self.cache
        layers = [H2OLayer(self.budget.sizes, prompt_len, self.score_kernel, self.step_kernel)
                  for _ in range(model.config.num_hidden_layers)]
        self.cache = Cache(layers=layers)
        if self.decode == "graph":
            self._static.clear()  # one shape at a time, as KVPolicy.new_cache
            self._static[key] = self.cache
        return self.cache

    @property
    def decode_mask(self) -> bool:
        return False  # decode attends over the slots, every one of them filled once graph_ready

    def graph_ready(self, cache: Cache) -> bool:
        return all(layer.free is not None for layer in cache.layers)  # slots full: fixed shapes from now on

    def metrics(self) -> dict:
        out = {"h2o_heavy": self.heavy, "h2o_recent": self.recent, "h2o_slots": self.heavy + self.recent + 1,
               "h2o_gqa_rule": "sum over the query heads of a KV head's group", "h2o_score_dtype": "float32 (float64 for float64 models)",
               "h2o_score_kernel": self.score_kernel, "h2o_step_kernel": self.step_kernel}
        if self.cache is not None:
            out["h2o_bookkeeping_bytes"] = sum(layer.bookkeeping_bytes() for layer in self.cache.layers)
            out["h2o_fused_step_layers"] = sum(layer.fused for layer in self.cache.layers)
            ran = sorted({layer.prefill_attention for layer in self.cache.layers} - {""})
            if ran:
                out["h2o_prefill_attention"] = "; ".join(ran)
        return out
