"""Batched prefill and decode on a transformers model, with per-step timing.

Every sequence of a batch has the same prompt length (the workloads are exact-length), so no
padding is involved. Exactly `gen_len` tokens are produced per sequence, greedy, EOS ignored.
Decode keeps shapes fixed (one token per sequence per step, a preallocated cache, a fixed
batch) so that a later speed-up can capture it in CUDA graphs.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from frameworks.hf.policy import KVPolicy


class Engine:
    def __init__(self, model, policy: KVPolicy, device: str, prefill: str, chunk_size: int):
        self.model = model
        self.policy = policy
        self.device = torch.device(device)
        self.prefill_mode = prefill
        self.chunk_size = chunk_size
        self.kv_bytes_peak = 0
        self.collect_logits = False  # tests: keep every step's logits
        self.step_logits: list[torch.Tensor] = []
        self.last_tokens: torch.Tensor | None = None
        self.calls: list[tuple[int, int, int]] = []  # teacher_forced: (batch, tokens, KV bytes on the device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _attention_ctx(self):
        if self.prefill_mode == "flash" and self.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        return contextlib.nullcontext()

    def _forward(self, ids: torch.Tensor, start: int, cache):
        b, n = ids.shape
        pos = torch.arange(start, start + n, device=self.device).unsqueeze(0).expand(b, n)
        return self.model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def _prefill(self, ids: torch.Tensor, cache) -> torch.Tensor:
        length = ids.shape[1]
        step = self.chunk_size if self.prefill_mode == "chunked" else length
        for s in range(0, length, step):
            logits = self._forward(ids[:, s:s + step], s, cache)
        return logits

    @torch.inference_mode()
    def generate(self, prompt_ids: np.ndarray, gen_len: int) -> list[float]:
        """Run one batch; return the host time at which each step's tokens were available."""
        ids = torch.as_tensor(prompt_ids, device=self.device)
        b, length = ids.shape
        cache = self.policy.new_cache(self.model, b, length + gen_len, length)
        self.step_logits = []
        out = torch.empty((b, gen_len), dtype=torch.long, device=self.device)
        times = []
        with self._attention_ctx():
            logits = self._prefill(ids, cache)
            for step in range(gen_len):
                if step:
                    logits = self._forward(out[:, step - 1:step], length + step - 1, cache)
                out[:, step] = logits.argmax(-1)
                if self.collect_logits:
                    self.step_logits.append(logits.float().cpu())
                self._sync()
                times.append(time.perf_counter())
                if step == 0 or step == gen_len - 1:
                    self.kv_bytes_peak = max(self.kv_bytes_peak, self.policy.kv_bytes(cache))
        self.last_tokens = out
        return times

    # -- accuracy hook (frameworks/accuracy): score tokens after the policy compressed the context --
    @torch.inference_mode()
    def teacher_forced(self, context_ids, feed_ids, gen_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill `context_ids` [b, L] (the policy evicts / offloads as in a real run), then feed
        `feed_ids` [b, n] one token per step through the decode path, then generate `gen_len`
        tokens greedily. Returns (logits [b, n, vocab] float32 on the CPU, where logits[:, i] is the
        prediction of feed_ids[:, i] — i = 0 from the prefill, the rest from decode steps — and the
        generated tokens [b, gen_len]). The last fed token is forwarded only when gen_len > 0.
        """
        ctx = torch.as_tensor(context_ids, device=self.device)
        feed = torch.as_tensor(feed_ids, device=self.device)
        b, length = ctx.shape
        n = feed.shape[1]
        cache = self.policy.new_cache(self.model, b, length + n + gen_len, length)
        out_logits = []
        gen = torch.empty((b, gen_len), dtype=torch.long, device=self.device)
        with self._attention_ctx():
            logits = self._prefill(ctx, cache)
            for i in range(n):
                out_logits.append(logits.float().cpu())
                if i < n - 1 or gen_len:
                    logits = self._forward(feed[:, i:i + 1], length + i, cache)
            for step in range(gen_len):
                if step:
                    logits = self._forward(gen[:, step - 1:step], length + n + step - 1, cache)
                gen[:, step] = logits.argmax(-1)
        kv = self.policy.kv_bytes(cache)
        self.kv_bytes_peak = max(self.kv_bytes_peak, kv)
        self.calls.append((b, length + n + gen_len - 1, kv))
        return torch.stack(out_logits, 1) if out_logits else torch.empty(b, 0, 0), gen.cpu()
