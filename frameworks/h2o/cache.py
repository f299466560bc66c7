"""One layer's H2O cache: the prompt while it is being prefilled, then a fixed set of slots.

Prefill: the prompt's keys/values are held whole (attention over the prompt is exact, as in
upstream H2O) and every prompt token gets the column sum of the causal attention matrix as its
score. When the prompt is complete the layer keeps, per sequence and per KV head, the `heavy`
highest-scoring tokens outside the recent window plus the `recent` last tokens, in
`heavy + recent + 1` freshly allocated slots; the prompt's full KV is released.

Decode: one token per step. The incoming token overwrites the slot freed at the previous step
(a per-(sequence, head) index: each sequence and head evicts its own token), attention runs over
all slots, the step's probabilities are added to the scores, and the lowest-scoring slot outside
the recent window is freed. Shapes never change once the slots are full, and slot order is
irrelevant: keys are cached after RoPE at their real positions, and decode needs no mask.

Graph decode (the engine's `decode: graph`): once the slots are full, a step reads no host
value: the position of the incoming token is a device counter (`seen_t`, one per sequence and
head, all equal), the freed slot is written in place, and `reset` keeps the slot buffers for the
next batch of the same shape, so one captured step serves every step of every batch. Replayed
steps run no Python: `seen` then stops at the captured step (the device counter is the truth).
With step_kernel "triton" (graph decode on CUDA) a full layer's step is one fused kernel
(kernels.decode_step, where kernels.fused_fits the slots): update() only hands the incoming
token to it (`incoming`), and the attention function runs fused_step(), which writes the token,
its position and score, attends, adds the scores and chooses the next free slot, exactly as the
torch path below does.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from frameworks.h2o import kernels


class H2OLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, sizes, prompt_len: int, score_kernel: str = "torch", step_kernel: str = "torch"):
        super().__init__()
        self.sizes = sizes  # prompt_len -> (heavy, recent)
        self.score_kernel = score_kernel  # chunked prefill's column sums: "torch" | "triton" (attention.py)
        self.step_kernel = step_kernel  # decode once the slots are full: "torch" | "triton" (fused)
        self.fused = False  # decode: step_kernel "triton" and the slots suit it (kernels.fused_fits)
        self.incoming: tuple[torch.Tensor, torch.Tensor] | None = None  # the token fused_step writes
        self.prefill_attention = ""  # which attention kernel the triton score path ran (metrics)
        # The layer must know when the prompt ends: the engine says how long this batch's prompt is
        # (KVPolicy.new_cache). Guessing it from forward sizes is wrong: a one-token last chunk
        # looks like a decode step, and evicting before it attends changes the logits.
        self.prompt_len = prompt_len
        self.seen = 0  # tokens given to this layer so far = position of the next one
        self.decoding = False  # False: holding the prompt; True: fixed slots
        self.scores: torch.Tensor | None = None  # prefill: [B, Hkv, cap] by position; decode: [B, Hkv, S] by slot
        self.pos: torch.Tensor | None = None  # decode: [B, Hkv, S] position of the token in each slot (-1: empty)
        self.filled = 0  # decode: slots holding a token (a prefix of the slots)
        self.free: torch.Tensor | None = None  # decode, once full: [B, Hkv] slot the next token overwrites
        self.heavy = self.recent = 0
        self.seen_t: torch.Tensor | None = None  # decode: device copy of `seen`, [B, Hkv, 1]
        self._bufs: dict[str, torch.Tensor] = {}  # decode slot buffers, kept across reset()

    def reset(self, prompt_len: int) -> None:
        """Ready for the next batch; the slot buffers stay (graph mode reuses the layer)."""
        self.prompt_len, self.seen, self.decoding, self.filled = prompt_len, 0, False, 0
        self.keys = self.values = self.scores = self.pos = self.free = self.incoming = None

    # -- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        # fp32 scores whatever the model's dtype (upstream summed half-precision probabilities)
        self.score_dtype = torch.float64 if key_states.dtype == torch.float64 else torch.float32
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.decoding:
            if n != 1:
                raise NotImplementedError(f"h2o: a {n}-token forward after the {self.prompt_len}-token prompt: "
                                          "decode feeds one token per sequence per step")
            return self._append_slot(key_states, value_states)
        if self.seen + n > self.prompt_len:
            raise ValueError(f"h2o: a prompt forward up to token {self.seen + n} of a {self.prompt_len}-token prompt")
        return self._append_prompt(key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kv = self.filled if self.decoding else self.seen
        return kv + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen  # tokens seen, not kept: default position ids stay right

    def get_max_length(self) -> int:
        return -1

    # -- after attention (called by attention.py with this step's scores) --------------------
    def add_prompt_scores(self, col: torch.Tensor) -> None:
        """col [B, Hkv, seen]: attention received by each prompt token from this forward's queries."""
        self.scores[..., : col.shape[-1]] += col
        if self.seen == self.prompt_len:
            self._compact()  # the prompt is complete: evict before the first decode step

    def add_step_scores(self, probs: torch.Tensor) -> None:
        """probs [B, Hkv, filled]: this decode step's attention, summed over the group's query heads."""
        self.scores[..., : self.filled] += probs
        if self.filled == self.scores.shape[-1]:  # heavy + recent + 1 tokens: free one slot
            protected = self.pos >= self.seen_t - self.recent
            free = self.scores.masked_fill(protected, float("inf")).argmin(-1)
            self.free = self._buf("free", free.shape, free.dtype).copy_(free)  # in place: read by the next step

    # -- inspection (tests, metrics) ---------------------------------------------------------
    def kept_positions(self) -> torch.Tensor:
        """[B, Hkv, kept] sorted positions of the tokens this layer holds for the next step."""
        if not self.decoding:
            b, h = self.scores.shape[:2]
            return torch.arange(self.seen, device=self.scores.device).expand(b, h, -1)
        pos = self.pos[..., : self.filled]
        if self.free is None:
            return pos.sort(-1).values
        # the freed slot still holds the evicted token until the next step overwrites it
        return pos.scatter(-1, self.free[..., None], -1).sort(-1).values[..., 1:]

    def bookkeeping_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scores, self.pos, self.free) if t is not None)

    # -- internals -----------------------------------------------------------------------------
    def _append_prompt(self, k: torch.Tensor, v: torch.Tensor):
        n, end = k.shape[-2], self.seen + k.shape[-2]
        if self.seen == 0 and n == self.prompt_len:
            self.keys, self.values = k, v  # the whole prompt in one forward (eager): no copy
            self.scores = torch.zeros(k.shape[:2] + (n,), dtype=self.score_dtype, device=k.device)
        else:
            if self.keys is None:  # chunked: allocate the prompt once
                cap = self.prompt_len
                self.keys, self.values = _alloc(k, cap), _alloc(v, cap)
                self.scores = _alloc(k.new_zeros(k.shape[:2] + (1,), dtype=self.score_dtype), cap, zero=True)
            self.keys[:, :, self.seen:end] = k
            self.values[:, :, self.seen:end] = v
        self.seen = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _compact(self) -> None:
        """Keep the heavy hitters and the recent window of the prompt in fresh slots."""
        length = self.seen
        self.heavy, self.recent = self.sizes(length)
        capacity = self.heavy + self.recent
        b, h, _, d = self.keys.shape
        dev = self.keys.device
        if length <= capacity:
            keep = torch.arange(length, device=dev).expand(b, h, length)
        else:
            recent = torch.arange(length - self.recent, length, device=dev).expand(b, h, self.recent)
            heavy = self.scores[..., : length - self.recent].topk(self.heavy, dim=-1).indices
            keep = torch.cat([heavy, recent], dim=-1).sort(dim=-1).values  # position order: see module doc
        n, slots = keep.shape[-1], capacity + 1
        keys = self._buf("keys", (b, h, slots, d), self.keys.dtype)
        values = self._buf("values", (b, h, slots, self.values.shape[-1]), self.values.dtype)
        keys[:, :, :n] = self.keys.gather(2, keep[..., None].expand(-1, -1, -1, d))
        values[:, :, :n] = self.values.gather(2, keep[..., None].expand(-1, -1, -1, values.shape[-1]))
        scores = self._buf("scores", (b, h, slots), self.scores.dtype).zero_()
        scores[..., :n] = self.scores.gather(-1, keep)
        self.pos = self._buf("pos", (b, h, slots), torch.long).fill_(-1)
        self.pos[..., :n] = keep
        self.seen_t = self._buf("seen", (b, h, 1), torch.long).fill_(length)  # per row: the fused kernel's own
        self.keys, self.values, self.scores = keys, values, scores  # the prompt's KV is released here
        self.filled, self.free, self.decoding = n, None, True
        self.fused = self.step_kernel == "triton" and kernels.fused_fits(b, h, slots)

    def _append_slot(self, k: torch.Tensor, v: torch.Tensor):
        if self.free is None:  # slots not full yet: append
            i = self.filled
            self.keys[:, :, i] = k[:, :, 0]
            self.values[:, :, i] = v[:, :, 0]
            self.pos[..., i] = self.seen
            self.filled += 1
            self.seen_t.add_(1)
        elif self.fused:  # fused_step writes it (and advances seen_t)
            self.incoming = (k, v)
        else:  # overwrite the slot each (sequence, head) freed at the previous step
            b, h, _, d = k.shape
            self.keys.scatter_(2, self.free.view(b, h, 1, 1).expand(b, h, 1, d), k)
            self.values.scatter_(2, self.free.view(b, h, 1, 1).expand(b, h, 1, v.shape[-1]), v)
            self.pos.scatter_(2, self.free[..., None], self.seen_t.expand(b, h, 1))
            self.scores.scatter_(2, self.free[..., None], 0.0)
            self.seen_t.add_(1)
        self.seen += 1
        return self.keys[:, :, : self.filled], self.values[:, :, : self.filled]

    def fused_step(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """The decode step of a full layer in one kernel, after update() handed it the token."""
        k, v = self.incoming
        self.incoming = None
        return kernels.decode_step(q, k, v, self.keys, self.values, self.scores, self.pos, self.free, self.seen_t,
                                   self.recent, scaling)

    def _buf(self, name: str, shape, dtype) -> torch.Tensor:
        """A decode buffer: the one kept from an earlier batch if it fits (fixed addresses), else new."""
        t = self._bufs.get(name)
        if t is None or t.shape != torch.Size(shape) or t.dtype != dtype:
            t = self._bufs[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return t


def _alloc(like: torch.Tensor, cap: int, zero: bool = False) -> torch.Tensor:
    shape = like.shape[:2] + (cap,) + like.shape[3:]
    return like.new_zeros(shape) if zero else like.new_empty(shape)
