"""Batched prefill and decode on a transformers model, with per-step timing.

Every sequence of a batch has the same prompt length (the workloads are exact-length), so no
padding is involved. Exactly `gen_len` tokens are produced per sequence, greedy, EOS ignored.
Decode modes (the policy's `decode`): `eager` runs transformers' forward each step and waits
for the device after each step (what the paper's ports of H2O and InfiniGen ran on); `graph` runs
one static step (frameworks/hf/graph.py), captured once per cache on CUDA and replayed, with no
host sync in the loop: per-step times come from CUDA events, read once the batch is done.
`compile="layers"` (graph mode only): the step's decoder layers run Inductor-compiled code
(frameworks/hf/compile.py), captured in the same graph. `fuse="on"` (graph mode with the CUDA-graph
capture; the default): the step's q/k/v and gate/up projections run as one GEMM each
(frameworks/hf/fuse.py).
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from frameworks.hf.policy import KVPolicy


class Engine:
    def __init__(self, model, policy: KVPolicy, device: str, prefill: str, chunk_size: int,
                 max_len: int | None = None, capture: str = "cuda_graph", compile: str = "none", fuse: str = "on"):
        self.model = model
        self.policy = policy
        self.device = torch.device(device)
        self.prefill_mode = prefill
        self.chunk_size = chunk_size
        self.kv_bytes_peak = 0
        self.collect_logits = False  # tests: keep every step's logits
        self.step_logits: list[torch.Tensor] = []
        self.last_tokens: torch.Tensor | None = None
        # graph mode: every batch gets a cache of at least max_len tokens (the cell's prompt + gen),
        # so the warm-up's shorter batches reuse the measured batches' cache and captured step
        self.max_len = max_len
        self.capture = capture
        from frameworks.hf.compile import COMPILE_MODES, RegionalCompile

        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        if compile != "none" and (policy.decode != "graph" or capture != "cuda_graph"):
            raise ValueError(f"compile={compile!r} compiles the graph-mode step captured by CUDA graphs "
                             f"(decode graph, capture cuda_graph), not decode {policy.decode!r} / capture {capture!r}")
        self.compile = compile
        from frameworks.hf.fuse import FUSE_MODES, FusedProjections

        if fuse not in FUSE_MODES:
            raise ValueError(f"fuse must be one of {FUSE_MODES}, got {fuse!r}")
        # graph decode with the engine's own capture only (fuse.py); before RegionalCompile, which
        # then compiles the fused MLP forward
        self.fuse = fuse if policy.decode == "graph" and capture == "cuda_graph" else "off"
        self._fused = FusedProjections(model) if self.fuse == "on" else None
        self._regions = RegionalCompile(model) if compile == "layers" else None
        self._steps: dict[int, tuple] = {}  # id(cache) -> (cache, DecodeStep), the current cache only
        self._pool = None  # the CUDA graph memory pool of the current captured step
        self._graph_stats = {"graphs": 0, "capture_s": 0.0}
        self.calls: list[tuple[int, int, int]] = []  # teacher_forced: (batch, tokens, KV bytes on the device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _attention_ctx(self, decode: bool = True):
        if self.prefill_mode == "flash" and self.device.type == "cuda" and decode:
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
        if self.policy.decode == "graph":
            return self._generate_graph(prompt_ids, gen_len)
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

    def _decode_step(self, cache, b: int, max_len: int):
        from frameworks.hf.graph import DecodeStep

        entry = self._steps.get(id(cache))
        if entry is None or entry[0] is not cache:
            self._steps.clear()  # the policy keeps one cache at a time: the old step's graph goes with it
            # a fresh memory pool per captured step: a pool whose last graph was freed is released by
            # the caching allocator, and capturing into its old handle fails an internal assert
            # (seen on an H200 when a request-rate cell's batch size changed)
            if self.device.type == "cuda":
                self._pool = torch.cuda.graph_pool_handle()
            entry = (cache, DecodeStep(self.model, cache, b, max_len, self.device, self.policy.decode_mask,
                                       self.capture, self._pool, self._graph_stats, self._regions, self._fused,
                                       self.policy.step_stream))
            self._steps[id(cache)] = entry
        return entry[1]

    def _generate_graph(self, prompt_ids: np.ndarray, gen_len: int) -> list[float]:
        ids = torch.as_tensor(prompt_ids, device=self.device)
        b, length = ids.shape
        max_len = max(length + gen_len, self.max_len or 0)
        cache = self.policy.new_cache(self.model, b, max_len, length)
        step_fn = self._decode_step(cache, b, max_len)
        self.step_logits = []
        out = torch.empty((b, gen_len), dtype=torch.long, device=self.device)
        cuda = self.device.type == "cuda"
        with self._attention_ctx(decode=False):
            logits = self._prefill(ids, cache)
        out[:, 0] = logits.argmax(-1)
        if self.collect_logits:
            self.step_logits.append(logits.float().cpu())
        self._sync()
        times = [time.perf_counter()]
        self.kv_bytes_peak = max(self.kv_bytes_peak, self.policy.kv_bytes(cache))
        if gen_len > 1:
            self.policy.begin_decode(cache)
            step_fn.feed(out[:, 0], length)
        events = []
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        for step in range(1, gen_len):
            out[:, step] = step_fn.run(self.policy.graph_ready(cache))
            if self.collect_logits:
                self.step_logits.append(step_fn.logits.float().cpu().clone())  # the buffer is reused
            if cuda:
                events.append(torch.cuda.Event(enable_timing=True))
                events[-1].record()
            else:
                times.append(time.perf_counter())
        if cuda:
            self._sync()
            times += [times[0] + start.elapsed_time(e) / 1e3 for e in events]
        self.kv_bytes_peak = max(self.kv_bytes_peak, self.policy.kv_bytes(cache))
        self.last_tokens = out
        return times

    def graph_stats(self) -> dict:
        """Graph mode: how many steps were captured and what the captures cost (the result's extra)."""
        if self.policy.decode != "graph":
            return {}
        stats = {"decode_capture": self.capture if self.device.type == "cuda" else "none (no CUDA: static step run eagerly)",
                 "decode_graphs": self._graph_stats["graphs"], "decode_capture_s": self._graph_stats["capture_s"],
                 "decode_compile": self.compile,
                 "decode_fused_projections": self._fused.fused if self._fused is not None else []}
        if self._regions is not None:
            stats.update(self._regions.stats())
        return stats
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
