"""H2OPolicy: the engine's KV policy for H2O (see frameworks/h2o/__init__.py)."""

from __future__ import annotations

from transformers.cache_utils import Cache

from frameworks.h2o import attention
from frameworks.h2o.budget import Budget
from frameworks.h2o.cache import H2OLayer
from frameworks.harness.result import Unsupported
from frameworks.hf.policy import KVPolicy

# model_type -> attention module class: the architectures whose attention calls the registered
# attention function with (query, key, value) after RoPE / scaling and exposes `layer_idx`
SUPPORTED = {"llama": "LlamaAttention", "opt": "OPTAttention"}


class H2OPolicy(KVPolicy):
    name = "h2o"

    def __init__(self, spec):
        super().__init__(spec)
        if spec.prefill not in attention.IMPLEMENTATIONS:
            raise ValueError(f"h2o: prefill must be one of {sorted(attention.IMPLEMENTATIONS)}, got {spec.prefill!r}")
        self.budget = Budget.from_spec(spec.kv_budget, spec.policy)
        self.heavy, self.recent = self.budget.sizes(spec.prompt_len)  # fails fast on a zero budget
        self.cache: Cache | None = None
        attention.register()

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
        layers = [H2OLayer(self.budget.sizes, prompt_len) for _ in range(model.config.num_hidden_layers)]
        self.cache = Cache(layers=layers)
        return self.cache

    def metrics(self) -> dict:
        out = {"h2o_heavy": self.heavy, "h2o_recent": self.recent, "h2o_slots": self.heavy + self.recent + 1,
               "h2o_gqa_rule": "sum over the query heads of a KV head's group", "h2o_score_dtype": "float32 (float64 for float64 models)"}
        if self.cache is not None:
            out["h2o_bookkeeping_bytes"] = sum(layer.bookkeeping_bytes() for layer in self.cache.layers)
        return out
