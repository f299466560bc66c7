"""KV policies: the extension point of the engine.

A policy decides what the KV cache keeps, where it lives and what is fetched, through
transformers' own interfaces: it returns the `Cache` the model writes into, may name the
attention function the model uses (registered with `transformers.AttentionInterface`), and may
install hooks on the model (`prepare`). The engine never knows which policy it runs.
A new method is a new small subclass in its own package (frameworks/h2o, frameworks/infinigen).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, StaticLayer

DECODE_MODES = ("graph", "eager")  # graph: static decode step, captured on CUDA; eager: transformers as-is


class KVPolicy:
    """Base policy: the full KV cache, preallocated on the compute device.

    Decode modes (the spec's `decode`): `eager` is transformers' own path over a cache that
    returns the filled part (what the paper's ports ran on); `graph` is one static-shape decode
    step (frameworks/hf/graph.py) that the engine captures once per cache and replays. A policy
    supports `graph` when its decode step reads no host value and allocates no persistent state;
    it says when the step has become static (`graph_ready`) and whether the engine should pass
    the length mask of a full-size cache (`decode_mask`).
    """

    name = "full"
    decode_modes = DECODE_MODES
    step_stream = None  # graph decode on CUDA: the stream the engine runs and captures the step on (None: its own)

    def __init__(self, spec):
        self.spec = spec
        self.decode = getattr(spec, "decode", None) or "eager"
        if self.decode not in self.decode_modes:
            raise ValueError(f"{self.name}: decode must be one of {self.decode_modes}, got {self.decode!r}")
        self._static: dict = {}  # graph mode: (batch, max_len) -> the reusable cache

    @property
    def decode_mask(self) -> bool:
        """Graph mode: the engine passes a [B, 1, 1, max_len] length mask to attention."""
        return self.decode == "graph"

    def attn_implementation(self, prefill: str) -> str:
        """The transformers attention implementation for this prefill mode."""
        stock = "eager" if prefill == "eager" else "sdpa"
        if self.decode == "graph":
            from frameworks.hf import attention

            return attention.IMPLEMENTATIONS[stock]
        return stock

    def prepare(self, model) -> None:
        """Called once after the model is built (hooks, weight transforms)."""

    def new_cache(self, model, batch_size: int, max_len: int, prompt_len: int) -> Cache:
        """A cache for one batch of `batch_size` sequences of at most `max_len` tokens whose
        prompts are `prompt_len` tokens long: the forwards that write the first `prompt_len`
        tokens are prefill, whatever their size (a one-token last chunk is still prefill), every
        later one is a decode step. Graph mode reuses one cache per shape (reset), so a captured
        step stays valid for the next batch."""
        if self.decode != "graph":
            return Cache(layers=[PreallocatedLayer(max_len) for _ in range(model.config.num_hidden_layers)])
        cache = self._static.get((batch_size, max_len))
        if cache is None:
            # one cache at a time: a request-rate cell's batches vary in size, and a full cache per
            # size would not fit; a new size means a new capture (offline cells have one size)
            self._static.clear()
            cache = Cache(layers=[StaticDecodeLayer(max_len) for _ in range(model.config.num_hidden_layers)])
            self._static[(batch_size, max_len)] = cache
        for layer in cache.layers:
            layer.reset()
        return cache

    def begin_decode(self, cache: Cache) -> None:
        """Graph mode: the prompt is in the cache, one-token steps follow."""
        for layer in cache.layers:
            if isinstance(layer, StaticDecodeLayer):
                layer.decoding = True

    def graph_ready(self, cache: Cache) -> bool:
        """Graph mode: True once the decode step has fixed shapes and no host-side branch left."""
        return True

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


def append_in_place(layer, key_states: torch.Tensor, value_states: torch.Tensor):
    """Write new tokens after a preallocated layer's `length` filled ones; return the filled part."""
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
    end = layer.length + key_states.shape[-2]
    if end > layer.max_cache_len:
        raise RuntimeError(f"KV cache overflow: {end} tokens > preallocated {layer.max_cache_len}")
    layer.keys[:, :, layer.length:end] = key_states
    layer.values[:, :, layer.length:end] = value_states
    layer.length = end
    return layer.keys[:, :, :end], layer.values[:, :, :end]


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
        return append_in_place(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.length = 0


class StaticDecodeLayer(StaticLayer):
    """Full cache of one layer for graph mode: transformers' StaticLayer (zero-filled
    [batch, kv_heads, max_len, head_dim] buffers, written in place at a device-side length), except
    that prefill sees the filled part only, as PreallocatedLayer (a plain causal mask, flash
    kernels), and decode sees the whole buffer, the engine's length mask hiding the unwritten part
    (zeros: finite, so masked rows weigh exactly 0).
    """

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len)
        self.length = 0  # host-side, prefill only: replayed steps do not run Python
        self.decoding = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.decoding:
            if key_states.shape[-2] != 1:
                raise RuntimeError("graph decode feeds one token per sequence per step")
            return super().update(key_states, value_states)  # index_copy_ at cumulative_length
        keys, values = append_in_place(self, key_states, value_states)
        self.cumulative_length.fill_(self.length)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # prefill only: decode gets the engine's mask

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self.length = 0
        self.decoding = False
        if self.is_initialized:
            self.cumulative_length.zero_()
