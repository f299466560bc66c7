"""InfiniGen as a KVPolicy: options, load-time skewing and hooks, per-batch caches, metrics.

Policy keys and defaults: options.py. kv_budget = 1 and alpha = inf fetch everything: the
full-cache result.

Decode modes: `eager` (the default) runs the step as the paper's port did, host-side lengths;
`graph` runs it on device-side positions (cache.py, graph decode), captured once per cache by the
engine on CUDA and replayed. A cell whose options cannot be captured (`graph_fallback` says why,
the result's extra `infinigen_graph_fallback`) runs the eager step at every step of `graph`.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from frameworks.harness.result import Unsupported
from frameworks.hf.policy import KVPolicy
from frameworks.infinigen import attention, kernels, options, skew
from frameworks.infinigen.arch import Arch
from frameworks.infinigen.cache import InfiniGenCache
from frameworks.infinigen.store import HostStore
from frameworks.infinigen.transfer import Transfer

SKEW_TOKENS = 512  # warm-up tokens for the SVD (upstream: 2048 of PG-19; random weights here)


class InfiniGenPolicy(KVPolicy):
    name = "infinigen"
    fetch: bool = True  # False: speculate but move nothing (overlap benchmark baseline)
    gather: str | None = None  # None: "triton" on CUDA, "index_select" on CPU (transfer.Transfer)
    speculation: str | None = None  # None: "fused" (fused.py) on CUDA with Triton, else "torch" (select.py)
    fused_select: bool = False  # fused: the selection by fused._select instead of torch's topk

    def __init__(self, spec):
        super().__init__(spec)
        opts = options.parse(spec.policy)
        self.alpha, self.ratio, self.max_num_kv, self.full_layers = opts.alpha, opts.ratio, opts.max_num_kv, opts.full_layers
        self.opts = opts
        self.kv_budget = float(spec.kv_budget)
        self._store: HostStore | None = None
        self.skews: dict = {}

    def attn_implementation(self, prefill: str) -> str:
        return attention.EAGER if prefill == "eager" else attention.SDPA

    def cap(self, length: int) -> int:
        """KV budget in tokens per sequence and kv head, for a sequence of `length` tokens:
        max_num_kv, else kv_budget x the cell's whole sequence (budget_rule fixed: upstream's
        fixed cap) or x the current length (current)."""
        cap = self.fixed_cap()
        if cap is None:
            cap = int(round(self.kv_budget * length, 6))
        return max(1, min(cap, length))

    def fixed_cap(self) -> int | None:
        """The budget's token count when it does not depend on the length (None: budget_rule current)."""
        if self.max_num_kv is not None:
            return self.max_num_kv
        if self.opts.budget_rule == "fixed":
            return int(round(self.kv_budget * (self.spec.prompt_len + self.spec.gen_len), 6))
        return None

    def _graph_fallback(self) -> str | None:
        """Why this cell's graph decode cannot be captured (None: it can)."""
        if self.decode != "graph":
            return None
        if self.fixed_cap() is None:
            return ("budget_rule 'current': the KV budget grows with the sequence, so the fetch's size changes "
                    "every step; graph decode runs the eager step at every step (not captured)")
        if self.transfer.cuda and self.transfer.gather != "triton":
            return (f"gather {self.transfer.gather!r}: graph decode on CUDA fetches the full layers' growing prefix "
                    "with the Triton gather (a device-side row count); it runs the eager step at every step (not captured)")
        return None

    # -- load time ------------------------------------------------------------------------
    def prepare(self, model) -> None:
        self.arch = Arch(model)
        if model.config._attn_implementation not in (attention.EAGER, attention.SDPA):
            raise Unsupported("the model was not built with InfiniGen's attention implementation")
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.full_layers = min(self.full_layers, self.arch.n_layers)
        n_tokens = min(SKEW_TOKENS, int(model.config.max_position_embeddings))
        rng = np.random.default_rng([self.spec.seed, 0x5CE])  # not the cell's prompts
        tokens = torch.as_tensor(rng.integers(0, model.config.vocab_size, (1, n_tokens)), device=self.device)
        self.skews = skew.build(model, self.arch, range(self.full_layers, self.arch.n_layers), tokens, self.ratio)
        for i, layer in enumerate(self.arch.layers):
            layer.register_forward_pre_hook(partial(self._pre_hook, i), with_kwargs=True)
        self.transfer = Transfer(self.device, fetch=self.fetch, gather=self.gather)
        self.fused_speculation = self._speculation() == "fused"
        if self.transfer.cuda and self.transfer.gather == "triton":
            kernels.self_check(self.device)  # builds the kernel now: a missing compiler fails at load
        self.graph_fallback = self._graph_fallback()
        self.sm_partition = self._partition()

    def _speculation(self) -> str:
        from frameworks.infinigen import fused

        how = self.speculation or ("fused" if self.transfer.cuda and fused.available() else "torch")
        if how not in ("fused", "torch"):
            raise ValueError(f"unknown speculation {how!r}: 'fused' or 'torch'")
        if how == "fused" and not fused.available():
            raise RuntimeError("speculation 'fused' needs the triton package (CUDA builds of torch bring it)")
        return how

    def speculation_used(self) -> str:
        """How this policy's decode speculates (after prepare): torch, fused or fused+select."""
        if not self.fused_speculation:
            return "torch"
        return "fused+select" if self.fused_select else "fused"

    def _partition(self) -> dict | None:
        """Graph decode on CUDA with the Triton gather: the gather's streams on `gather_sms` SMs of their
        own, the captured step and the speculation on the rest (green.py). None: not asked for or not
        applicable (CPU, eager decode); {"error": why}: asked for and unavailable, unpartitioned."""
        n = self.opts.gather_sms
        if not n or not self.static or not self.transfer.cuda or self.transfer.gather != "triton":
            return None
        from frameworks.infinigen import green
        from frameworks.infinigen.transfer import STREAMS_DEFAULT

        try:
            part = green.partition(n, self.device)
        except green.Unavailable as e:
            return {"requested_sms": n, "error": str(e)}
        self.transfer.set_streams(STREAMS_DEFAULT, 0, part.make_side, part.make_step)
        self.step_stream = part.step_stream
        return {"requested_sms": n, **part.info}

    def _pre_hook(self, i: int, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, InfiniGenCache):
            hidden = args[0] if args else kwargs["hidden_states"]
            cache.on_layer_start(i, hidden, kwargs.get("position_embeddings"))

    # -- per batch --------------------------------------------------------------------------
    @property
    def static(self) -> bool:
        """Graph decode on device positions (captured on CUDA)."""
        return self.decode == "graph" and self.graph_fallback is None

    @property
    def decode_mask(self) -> bool:
        return False  # the cache masks what it fetched (the attention's bias)

    def begin_decode(self, cache) -> None:
        cache.begin_decode()

    def graph_ready(self, cache) -> bool:
        return cache.decoding  # False: the eager step, every step (graph_fallback)

    def new_cache(self, model, batch_size: int, max_len: int, prompt_len: int) -> InfiniGenCache:
        a = self.arch
        key = (batch_size, max_len, prompt_len)
        cache = self._static.get(key)
        if cache is not None and cache.store is self._store:  # same buffers: the captured step holds
            cache.reset()
            return cache
        shape = (a.n_layers, max_len, batch_size, a.n_kv_heads, a.head_dim, self.dtype)
        if self._store is None or not self._store.fits(*shape):
            # sized for the cell's longest batch at once, so the warm-up's store is reused
            shape = (a.n_layers, max(max_len, self.spec.prompt_len + self.spec.gen_len), *shape[2:])
            if self._store is not None:
                self._store.close()
                self._store = None
            self._store = HostStore(*shape, pin=self.transfer.cuda, device=self.device, zero=self.static)
        cache = InfiniGenCache(self, self._store, batch_size, max_len, prompt_len, static=self.static)
        if self.static:
            self._static.clear()  # one shape at a time, as KVPolicy.new_cache
            self._static[key] = cache
        return cache

    def reset_metrics(self) -> None:
        self.transfer.reset_stats()

    def kv_bytes(self, cache) -> int:
        return cache.device_bytes()

    def metrics(self) -> dict:
        t = self.transfer
        s = dict(t.stats)
        # graph decode counts on the device (replayed steps run no Python): read once, here
        g_steps, g_full, g_sparse = t.counts.tolist()
        t.counts.zero_()  # folded into the host counters now
        s["graph_steps"] = s.get("graph_steps", 0) + g_steps
        captured = s["graph_steps"] > 0
        s["steps"] += g_steps
        s["full_tokens"] += g_full
        s["sparse_fetches"] += g_sparse
        # one token of a sequence, all kv heads: K and V (a model constant, never a launch-time stat)
        token_bytes = self.arch.n_kv_heads * 2 * self.arch.head_dim * (torch.finfo(self.dtype).bits // 8)
        if t.fetch and t.cuda:  # CPU: the store is read in place
            s["bytes"] += g_full * token_bytes
        t.stats.update(s)
        steps = max(s["steps"], 1)
        sparse_layers = len(self.skews)
        # selected rows summed over speculated fetches: per (sequence, kv head), and x each fetch's batch
        selected, selected_tokens = t.selected_tokens()
        full_bytes, gathered = t.moved_bytes(token_bytes)
        return {
            "infinigen": {
                "alpha": self.alpha, "partial_weight_ratio": self.ratio, "max_num_kv": self.max_num_kv,
                "kv_budget": self.kv_budget, "full_layers": self.full_layers, "budget_rule": self.opts.budget_rule,
                "speculation_input": self.opts.speculation_input, "partial_columns": self.opts.partial_columns,
                "min_fetch": self.opts.min_fetch, "gather_sms": self.opts.gather_sms,
                "partial_dims": int(next(iter(self.skews.values())).proj.shape[-1]) if self.skews else None,
                "skew_energy_kept": float(np.mean([v.energy for v in self.skews.values()])) if self.skews else None,
                "gather": ("uva-" if t.cuda else "cpu-") + t.gather,
                # engine settings, not upstream's algorithm: how the speculation and the full layers' copy run
                "speculation": self.speculation_used(),
                "full_copy": t.full_copy if t.cuda and self.static else None,
                "fetch": t.fetch,
            },
            "infinigen_graph_fallback": self.graph_fallback,  # None: graph decode on device positions (or eager)
            "sm_partition": self.sm_partition,  # the gather's SMs (gather_sms): None where not applicable
            "decode_steps": s["steps"],
            "graph_decode_steps": s["graph_steps"],  # of them on device positions (graph decode)
            # tokens: one token of one sequence, all its kv heads (the speculated layers fetch the
            # same count k for every sequence and head, as upstream)
            "fetched_tokens_per_step": (s["full_tokens"] + selected_tokens) / steps,
            "fetched_tokens_per_step_speculated": selected_tokens / steps,
            "fetched_tokens_per_seq_layer_speculated": selected / max(s["sparse_fetches"], 1) if self._store else None,
            # bytes moved host -> device: full layers + the speculated layers' gathers (index_select
            # moves the whole budget, padding included; the Triton gather the selected rows only);
            # the selected rows alone are the second figure
            "fetched_bytes_per_step": (full_bytes + gathered) / steps,
            "selected_bytes_per_step": (full_bytes + (selected_tokens * token_bytes if t.fetch else 0)) / steps,
            # CUDA graph decode times no transfer (a captured step has no timing events): None
            "h2d_bandwidth_gbps": None if captured and t.cuda else t.measured_bandwidth_gbps(),
            "gather_bandwidth_gbps": None if captured and t.cuda else t.measured_bandwidth_gbps(sparse=True),
            "gather_ms_per_step": None if captured and t.cuda else t.gather_ms() / steps,
            "host_kv_bytes": self._store.nbytes if self._store else 0,
            "speculated_layers": sparse_layers,
        }
