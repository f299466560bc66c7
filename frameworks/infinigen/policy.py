"""InfiniGen as a KVPolicy: options, load-time skewing and hooks, per-batch caches, metrics.

Policy keys and defaults: options.py. kv_budget = 1 and alpha = inf fetch everything: the
full-cache result.
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
        if self.max_num_kv is not None:
            cap = self.max_num_kv
        elif self.opts.budget_rule == "fixed":
            cap = int(round(self.kv_budget * (self.spec.prompt_len + self.spec.gen_len), 6))
        else:
            cap = int(round(self.kv_budget * length, 6))
        return max(1, min(cap, length))

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
        if self.transfer.cuda and self.transfer.gather == "triton":
            kernels.self_check(self.device)  # builds the kernel now: a missing compiler fails at load

    def _pre_hook(self, i: int, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, InfiniGenCache):
            hidden = args[0] if args else kwargs["hidden_states"]
            cache.on_layer_start(i, hidden, kwargs.get("position_embeddings"))

    # -- per batch --------------------------------------------------------------------------
    def new_cache(self, model, batch_size: int, max_len: int, prompt_len: int) -> InfiniGenCache:
        a = self.arch
        shape = (a.n_layers, max_len, batch_size, a.n_kv_heads, a.head_dim, self.dtype)
        if self._store is None or not self._store.fits(*shape):
            # sized for the cell's longest batch at once, so the warm-up's store is reused
            shape = (a.n_layers, max(max_len, self.spec.prompt_len + self.spec.gen_len), *shape[2:])
            if self._store is not None:
                self._store.close()
                self._store = None
            self._store = HostStore(*shape, pin=self.transfer.cuda, device=self.device)
        return InfiniGenCache(self, self._store, batch_size, max_len, prompt_len)

    def reset_metrics(self) -> None:
        self.transfer.reset_stats()

    def kv_bytes(self, cache) -> int:
        return cache.device_bytes()

    def metrics(self) -> dict:
        t = self.transfer
        s = t.stats
        steps = max(s["steps"], 1)
        sparse_layers = len(self.skews)
        selected = t.selected_tokens()  # rows per (sequence, kv head), summed over speculated fetches
        batch = self._store.batch if self._store else 0
        full_bytes, gathered = t.moved_bytes()
        return {
            "infinigen": {
                "alpha": self.alpha, "partial_weight_ratio": self.ratio, "max_num_kv": self.max_num_kv,
                "kv_budget": self.kv_budget, "full_layers": self.full_layers, "budget_rule": self.opts.budget_rule,
                "speculation_input": self.opts.speculation_input, "partial_columns": self.opts.partial_columns,
                "min_fetch": self.opts.min_fetch,
                "partial_dims": int(next(iter(self.skews.values())).proj.shape[-1]) if self.skews else None,
                "skew_energy_kept": float(np.mean([v.energy for v in self.skews.values()])) if self.skews else None,
                "gather": ("uva-" if t.cuda else "cpu-") + t.gather,
                "fetch": t.fetch,
            },
            "decode_steps": s["steps"],
            # tokens: one token of one sequence, all its kv heads (the speculated layers fetch the
            # same count k for every sequence and head, as upstream)
            "fetched_tokens_per_step": (s["full_tokens"] + selected * batch) / steps,
            "fetched_tokens_per_step_speculated": selected * batch / steps,
            "fetched_tokens_per_seq_layer_speculated": selected / max(s["sparse_fetches"], 1) if self._store else None,
            # bytes moved host -> device: full layers + the speculated layers' gathers (index_select
            # moves the whole budget, padding included; the Triton gather the selected rows only);
            # the selected rows alone are the second figure
            "fetched_bytes_per_step": (full_bytes + gathered) / steps,
            "selected_bytes_per_step": (full_bytes + (selected * batch * s["row_bytes"] if t.fetch else 0)) / steps,
            "h2d_bandwidth_gbps": t.measured_bandwidth_gbps(),
            "gather_bandwidth_gbps": t.measured_bandwidth_gbps(sparse=True),
            "gather_ms_per_step": t.gather_ms() / steps,
            "host_kv_bytes": self._store.nbytes if self._store else 0,
            "speculated_layers": sparse_layers,
        }
