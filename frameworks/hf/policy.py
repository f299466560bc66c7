"""KV policies: the extension point of the engine.

A policy decides what the KV cache keeps, where it lives and what is fetched, through
transformers' own interfaces: it returns the `Cache` the model writes into, may name the
attention function the model uses (registered with `transformers.AttentionInterface`), and may
install hooks on the model (`prepare`). The engine never knows which policy it runs.
A new method is a new small subclass in its own package (frameworks/h2o, frameworks/infinigen).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class KVPolicy:
    """Base policy: the full KV cache, preallocated on the compute device."""

    name = "full"

    def __init__(self, spec):
        self.spec = spec

    def attn_implementation(self, prefill: str) -> str:
        """The transformers attention implementation for this prefill mode."""
        return "eager" if prefill == "eager" else "sdpa"

    def prepare(self, model) -> None:
        """Called once after the model is built (hooks, weight transforms)."""

    def new_cache(self, model, batch_size: int, max_len: int, prompt_len: int) -> Cache:
        """A fresh cache for one batch of `batch_size` sequences of at most `max_len` tokens whose
        prompts are `prompt_len` tokens long: the forwards that write the first `prompt_len`
        tokens are prefill, whatever their size (a one-token last chunk is still prefill), every
        later one is a decode step."""
        return Cache(layers=[PreallocatedLayer(max_len) for _ in range(model.config.num_hidden_layers)])

    def kv_bytes(self, cache: Cache) -> int:
        """Bytes of KV held on the compute device by this cache now."""
        return sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (layer.keys, layer.values) if t is not None)

    def reset_metrics(self) -> None:
        """Forget what metrics() counted so far (called after the warm-up: counters cover the
        measured repetitions only)."""

    def metrics(self) -> dict:
        """Policy-specific measurements for the result's `extra` (e.g. bytes fetched)."""
        return {}


class PreallocatedLayer(CacheLayerMixin):
    """Full cache of one layer: [batch, kv_heads, max_len, head_dim] allocated once at the first
    update, then written in place. Attention sees a view of the filled part only, so prefill keeps
    a plain causal mask (flash / memory-efficient SDPA) and memory never grows by concatenation.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.empty((b, h, self.max_cache_len, d), dtype=key_states.dtype, device=key_states.device)
        self.values = torch.empty((b, h, self.max_cache_len, value_states.shape[-1]), dtype=value_states.dtype,
                                  device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.max_cache_len:
            raise RuntimeError(f"KV cache overflow: {end} tokens > preallocated {self.max_cache_len}")
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.length = 0
