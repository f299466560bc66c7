"""The transformers Cache of one batch: appends go to the host store, attention gets fetched rows.

Per layer and step: the new token's K/V are appended to the host store (and, for a speculated
layer, its partial key to the GPU partial-key cache); attention then sees the fetched rows
(the whole prefix for a full layer, the selected tokens otherwise) followed by the new token's
own K/V, which is used straight from the GPU. A speculated layer always gets `cap` rows (the KV
budget: a static shape) of which the first k were selected; the attention adds the fetch's bias
(0 / -inf) to mask the rest, handed over as the attention module's `_infinigen_bias`. Prefill
returns the chunk's K/V (plus, for later chunks of a chunked prefill, the earlier chunks read
back from the host). Nothing here reads a device value on the host.

Launch points (forward pre-hook of decoder layer i, see `on_layer_start`):
  - speculation + fetch of layer i+1 (if speculated), overlapping layer i;
  - the next step's prefetch of full layer i-1, overlapping layers i..N-1 (its attention for
    this step is already enqueued, so its device buffer is free). The first decode step of a
    batch loads full layers on demand.

Graph decode (`static`, the engine's `decode: graph`, from `begin_decode` on): the same step on
device-side positions, so that it can be captured once and replayed. `len_t` (device) is the
number of cached tokens before the step's token: appends write host row `len_t` through the
store's device alias (index_copy_), the speculation scores the whole preallocated partial-key
cache with the positions >= len_t masked out, the budget at this length is a device value
(`limit`, select.select), full layers attend over their whole max_len buffer behind a 0 / -inf
bias, filled by a gather of a device-side row count (the first step's by begin_decode, later ones
prefetched during the step before), and the step's counters are added on the device. The last
layer's update joins the side streams back into the compute stream, so each step (and its CUDA
graph) ends where it began. The cache, its buffers and the partial weights are reused, written in
place, by every batch of the same shape (policy.new_cache).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from frameworks.infinigen import fused, select, skew
from frameworks.infinigen.store import Slot


class InfiniGenLayer(CacheLayerMixin):
    is_compileable = False
    is_sliding = False

    def __init__(self, owner: InfiniGenCache, index: int, full: bool):
        super().__init__()
        self.owner, self.index, self.full = owner, index, full
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self.owner.layer_update(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.owner.max_len

    def reset(self) -> None:
        self.length = 0


class InfiniGenCache(Cache):
    def __init__(self, policy, store, batch: int, max_len: int, prompt_len: int, static: bool = False):
        arch = policy.arch
        super().__init__(layers=[InfiniGenLayer(self, i, i < policy.full_layers) for i in range(arch.n_layers)])
        self.policy, self.arch, self.store = policy, arch, store
        self.transfer = policy.transfer
        # the first prompt_len tokens are prefill whatever the chunking (a one-token last chunk
        # too: it attends to the whole prompt); every later forward is a decode step
        self.batch, self.max_len, self.prompt_len = batch, max_len, prompt_len
        dev, dtype = policy.device, policy.dtype
        b, hkv, d = batch, arch.n_kv_heads, arch.head_dim
        # each speculated layer's partial weights: the warm-up's columns, replaced at the end of
        # prefill by the prompt's own (partial_columns "prefill", upstream)
        # (static: copies, overwritten in place by each batch's prompt, so a captured step sees them)
        self.static, self.decoding = static, False  # decoding: graph decode begun (begin_decode)
        self.parts = {j: _clone(s) for j, s in policy.skews.items()} if static else dict(policy.skews)
        self._col_scores: dict[int, torch.Tensor] = {}  # layer -> [Hkv, d] summed |skewed query| of the prompt
        alloc = torch.zeros if static else torch.empty  # static: attention reads whole buffers (masked): no NaN
        self.partial_k = {j: alloc((b, hkv, max_len, s.proj.shape[-1]), dtype=dtype, device=dev)
                          for j, s in policy.skews.items()}
        cuda = self.transfer.cuda
        self.full_dev = {i: alloc((max_len, b, hkv, 2, d), dtype=dtype, device=dev) if cuda else None
                         for i in range(min(policy.full_layers, arch.n_layers))}
        cap = min(policy.cap(max_len), max_len)
        self.cap_static = cap  # graph decode: the fetch's rows per lane; the budget at a length is `limit`
        self.slots = [Slot(b * hkv * cap, cap, d, dtype, dev) for _ in range(2)] if policy.skews else []
        self.keep_pos = torch.arange(cap, device=dev)  # positions 0..cap-1 of a fetch (padding mask)
        self.lane = torch.arange(b * hkv, device=dev).view(b, hkv, 1)  # row offset of (sequence, kv head)
        self.pending: list = [None] * arch.n_layers
        self._rope = (None, None)  # (this step's cos, skew.rope_table of it): one per step, all layers
        if static:
            self.len_t = torch.zeros((), dtype=torch.long, device=dev)  # tokens cached before this step's
            self.positions = torch.arange(max_len, device=dev)
            self.invalid = torch.zeros(max_len, dtype=torch.bool, device=dev)  # this step: positions >= len_t
            self.limit = torch.zeros((), dtype=torch.long, device=dev)  # this step: the budget in tokens
            fixed = policy.fixed_cap()
            if fixed is None:
                raise ValueError("graph decode needs a fixed KV budget (policy.graph_fallback says so first)")
            self.budget_tokens = max(1, fixed)
            self.full_bias = {i: torch.zeros(max_len, dtype=torch.float32, device=dev) for i in self.full_dev}
            self.full_rows = torch.arange(max_len * b * hkv, device=dev).view(1, -1) if cuda else None
            n_sparse = len(policy.skews)
            self.per_step = torch.tensor([1, 0, n_sparse], dtype=torch.long, device=dev)
            self.per_token = torch.tensor([0, len(self.full_dev) * b, 0], dtype=torch.long, device=dev)

    def reset(self) -> None:
        """Graph decode: ready for the next batch of the same shape, every buffer kept."""
        for layer in self.layers:
            layer.reset()
        for j, s in self.policy.skews.items():
            self._set_part(j, s)
        self._col_scores.clear()
        self.pending = [None] * self.arch.n_layers
        self._rope = (None, None)
        self.decoding = False

    def _set_part(self, j: int, part) -> None:
        if not self.static:
            self.parts[j] = part
            return
        mine = self.parts[j]  # in place: a captured step holds these tensors' addresses
        for f in dataclasses.fields(part):
            new = getattr(part, f.name)
            if isinstance(new, torch.Tensor):
                getattr(mine, f.name).copy_(new)
            else:
                setattr(mine, f.name, new)

    def device_bytes(self) -> int:
        """KV held on the compute device: partial keys and the fetch buffers."""
        ts = list(self.partial_k.values()) + [t for t in self.full_dev.values() if t is not None]
        return sum(t.numel() * t.element_size() for t in ts) + sum(s.nbytes for s in self.slots)

    # -- launch points ------------------------------------------------------------------
    def on_layer_start(self, i: int, hidden: torch.Tensor, position_embeddings) -> None:
        if self.decoding:
            return self._static_layer_start(i, hidden, position_embeddings)
        if self.layers[i].length < self.prompt_len:
            return  # prefill: nothing to speculate
        if i == 0:
            self.transfer.stats["steps"] += 1
        j = i + 1
        if j < self.arch.n_layers and not self.layers[j].full:
            self.pending[j] = self._launch_sparse(j, hidden, position_embeddings)
        if i >= 1 and self.layers[i - 1].full:
            self.pending[i - 1] = self._launch_full(i - 1)

    def _launch_full(self, i: int, length: int | None = None):
        length = self.layers[i].length if length is None else length
        return self.transfer.launch_full(self.store, i, length, self.full_dev[i])

    def _launch_sparse(self, j: int, hidden: torch.Tensor, position_embeddings):
        static = self.decoding
        if static:  # the whole cache, positions >= len_t masked; the budget at this length: limit
            cap, partial_k = self.cap_static, self.partial_k[j]
        else:
            length = self.layers[j].length
            cap = self.policy.cap(length)
            partial_k = self.partial_k[j][:, :, :length]
        sk = self.parts[j]
        alpha, min_fetch = self.policy.alpha, self.policy.opts.min_fetch
        norm = j - 1 if self.policy.opts.speculation_input == "own_norm" else j

        # the step's first speculation makes the RoPE table (on the side stream, from cos/sin,
        # which are then record_stream'ed); later layers reuse it: the model passes every layer
        # the same (cos, sin) objects within a step, and a new pair each step (the reference
        # held here keeps the identity test sound).
        fresh = position_embeddings is not None and position_embeddings[0] is not self._rope[0]

        def speculate(bias, sums):
            """-> (idx, k, done): done, the fused kernels wrote bias[:cap] and added k to sums."""
            if fresh:
                self._rope = (position_embeddings[0], skew.rope_table(position_embeddings))
            if self.policy.fused_speculation:
                return (*self._fused_speculate(j, sk, hidden, norm, cap, bias, sums), True)
            pq = skew.partial_query(self.arch, j, sk, hidden, position_embeddings, self._rope[1], norm)
            logits = select.scores(pq, partial_k)
            if not static:
                return (*select.select(logits, alpha, cap, min_fetch), False)
            # position len_t may be being written (this step's token, compute stream): masked anyway
            return (*select.select(logits.masked_fill_(self.invalid, float("-inf")), alpha, cap, min_fetch,
                                   self.limit), False)

        # partial_k lives as long as the cache; the table is made and used on the side stream only
        extra = tuple(position_embeddings) if fresh else ()
        return self.transfer.launch_sparse(self.store, j, self.slots[j % 2], speculate, hidden, extra,
                                           self.keep_pos, self.lane, static=static)

    def _fused_speculate(self, j: int, sk, hidden: torch.Tensor, norm: int, cap: int, bias: torch.Tensor, sums):
        """The speculation of layer j in three Triton kernels and a topk (fused.py): the same selection."""
        static = self.decoding
        h = self.arch.normed(norm, hidden)
        if sk.wq is not None:  # OPT: the partial projection itself
            q = torch.nn.functional.linear(h, sk.wq, sk.bq).view(self.batch, self.arch.n_kv_heads, self.arch.groups, -1)
            table, qproj = None, None
        else:
            q, table, qproj = self.arch.attn(j).q_proj(h), self._rope[1], sk.qproj
        n = self.len_t if static else self.layers[j].length
        return fused.speculate(q, table, qproj, self.partial_k[j], n, self.arch.groups, self.policy.alpha, cap,
                               self.policy.opts.min_fetch, bias, *sums, limit=self.limit if static else None,
                               select_kernel=self.policy.fused_select)

    # -- graph decode ---------------------------------------------------------------------
    def begin_decode(self) -> None:
        """Graph decode: the prompt is cached; the first step's full layers are fetched now (later
        steps' during the step before), and the side streams joined (nothing crosses a step)."""
        if not self.static:
            return
        self.decoding = True
        self.len_t.fill_(self.prompt_len)
        for i in self.full_dev:
            if i + 1 < self.arch.n_layers:
                self._static_full(i, self.len_t.clone())
        self.transfer.join()

    def _static_full(self, i: int, tokens: torch.Tensor):
        return self.transfer.launch_full_static(self.store, i, tokens, self.full_dev[i], self.full_rows,
                                                self.positions, self.full_bias[i])

    def _static_layer_start(self, i: int, hidden: torch.Tensor, position_embeddings) -> None:
        if i == 0:  # the step's masks, budget and counters, read on the side streams after this
            torch.ge(self.positions, self.len_t, out=self.invalid)
            torch.clamp(self.len_t, max=self.budget_tokens, out=self.limit)
            self.transfer.count_step(self.per_step, self.per_token, self.len_t)
        j = i + 1
        if j < self.arch.n_layers and not self.layers[j].full:
            self.pending[j] = self._launch_sparse(j, hidden, position_embeddings)
        if self.transfer.full_copy == "chunked" and self.transfer.cuda:
            self._static_full_chunks(i)
        elif i >= 1 and self.layers[i - 1].full:  # the next step's, with this step's token (appended)
            self._static_full(i - 1, self.len_t + 1)

    def _static_full_chunks(self, i: int) -> None:
        """full_copy "chunked": full layer f's copy for the next step (with this step's token) in
        pieces of its rows, one at each later layer's start i = f+1 .. n_layers-1, each after layer i's
        gather (on PCIe in the gap before the next gather, instead of one copy beside the first ones)."""
        gathered = self.pending[i].ready if self.pending[i] is not None else None
        for f in self.full_dev:
            part = full_chunk(self.max_len, self.arch.n_layers, f, i)
            if part is not None:
                self.transfer.launch_full_static(self.store, f, self.len_t + 1, self.full_dev[f], self.full_rows,
                                                 self.positions, self.full_bias[f], part=part, after=gathered)

    def _static_update(self, layer: InfiniGenLayer, key: torch.Tensor, value: torch.Tensor):
        i, last = layer.index, layer.index + 1 == self.arch.n_layers
        if key.shape[2] != 1:
            raise RuntimeError(f"layer {i}: a {key.shape[2]}-token decode step (decode feeds one token per sequence)")
        at = self.len_t.view(1)
        self.transfer.append_at(self.store, i, at, key, value)
        if not layer.full:
            self.partial_k[i].index_copy_(2, at, torch.matmul(key, self.parts[i].proj))
        layer.length += 1  # host: eager runs of the step only; replays advance len_t alone
        attn = self.arch.attn(i)
        attn.__dict__["_infinigen_decode"] = True
        if layer.full:
            if last:  # no later layer to prefetch it during the step before: fetched now
                ready = self._static_full(i, self.len_t)
                if ready is not None:
                    torch.cuda.current_stream().wait_event(ready)
            src = self.full_dev[i] if self.transfer.cuda else self.store.prefix(i, self.max_len)
            keys, values = (src[..., w, :].permute(1, 2, 0, 3) for w in (0, 1))
            bias = self.full_bias[i]
        else:
            got = self.pending[i]
            self.pending[i] = None
            if got is None:
                raise RuntimeError(f"layer {i}: decode step without a speculation (was the policy prepared?)")
            got.wait()
            keys, values, bias = got.keys, got.values, got.bias
        attn.__dict__["_infinigen_bias"] = bias
        if last:  # the step ends: side streams joined, the next step's length
            self.transfer.join()
            self.len_t.add_(1)
        return torch.cat([keys, key], dim=2), torch.cat([values, value], dim=2)

    # -- the update -----------------------------------------------------------------------
    def layer_update(self, layer: InfiniGenLayer, key: torch.Tensor, value: torch.Tensor):
        if self.decoding:
            return self._static_update(layer, key, value)
        i, n, start = layer.index, key.shape[2], layer.length
        end = start + n
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} tokens > preallocated {self.max_len}")
        prefill = start < self.prompt_len
        if prefill and end > self.prompt_len:
            raise RuntimeError(f"layer {i}: a forward of tokens {start}..{end} crosses the end of the "
                               f"{self.prompt_len}-token prompt")
        if not prefill and n != 1:
            raise RuntimeError(f"layer {i}: a {n}-token decode step (decode feeds one token per sequence)")
        self.transfer.append(self.store, i, start, key, value)
        columns_from_prompt = prefill and not layer.full and self.policy.opts.partial_columns == "prefill"
        if not layer.full and not columns_from_prompt:
            self.partial_k[i][:, :, start:end] = torch.matmul(key, self.parts[i].proj)
        layer.length = end
        # read (and cleared) by the attention function right after this update (same module forward)
        attn = self.arch.attn(i)
        attn.__dict__["_infinigen_decode"] = not prefill
        if columns_from_prompt:  # the attention hands this forward's queries to prompt_queries
            attn.__dict__["_infinigen_prompt"] = (self, i, end == self.prompt_len)
        if prefill:
            return self._prefill_kv(i, start, key, value)
        pending = self.pending[i]
        self.pending[i] = None
        if pending is None:
            if not layer.full:
                raise RuntimeError(f"layer {i}: decode step without a speculation (was the policy prepared?)")
            pending = self._launch_full(i, start)
        got = pending.wait()
        if got.tokens != start and layer.full:
            raise RuntimeError(f"layer {i}: prefetched {got.tokens} tokens, expected {start}")
        self.transfer.account(got, self.batch, layer.full)
        # read by decode_attention right after this update (same module forward)
        self.arch.attn(i).__dict__["_infinigen_bias"] = got.bias
        return torch.cat([got.keys, key], dim=2), torch.cat([got.values, value], dim=2)

    def prompt_queries(self, i: int, query: torch.Tensor, key: torch.Tensor, last: bool) -> None:
        """Prefill of speculated layer i (partial_columns "prefill", upstream's
        partial_weight_index_generation): add this forward's queries [B, Hq, T, d] to the column
        scores; after the prompt's last forward (key: the whole prompt's [B, Hkv, L, d]) keep the
        top columns and build the layer's partial weights and partial keys from them."""
        sk = self.policy.skews[i]
        score = skew.column_scores(query, self.arch.n_kv_heads, sk.rot)
        score = score + self._col_scores.pop(i) if i in self._col_scores else score
        if not last:
            self._col_scores[i] = score
            return
        cols = score.topk(sk.cols.shape[-1], dim=-1).indices.sort(dim=-1).values
        self._set_part(i, skew.partial(self.arch, i, cols, sk.rot))
        self.partial_k[i][:, :, : key.shape[2]] = torch.matmul(key, self.parts[i].proj)

    def _prefill_kv(self, i: int, start: int, key: torch.Tensor, value: torch.Tensor):
        if start == 0:
            return key, value
        # a later chunk: the earlier ones come back from the host, once their appends are done
        self.transfer.after_appends(i)
        prev = self.store.prefix(i, start).to(key.device, non_blocking=True)  # [start, B, Hkv, 2, d]
        keys, values = (prev[..., w, :].permute(1, 2, 0, 3) for w in (0, 1))
        return torch.cat([keys, key], dim=2), torch.cat([values, value], dim=2)


def full_chunk(max_len: int, n_layers: int, f: int, i: int) -> tuple[int, int] | None:
    """Rows (lo, hi) of full layer f's next-step copy made at layer i's start (full_copy "chunked"):
    layers f+1 .. n_layers-1 each copy one of n_layers-1-f equal pieces; None at any other layer
    (and for the last layer, fetched within its own step)."""
    n, c = n_layers - 1 - f, i - f - 1
    if n < 1 or not 0 <= c < n:
        return None
    return c * max_len // n, (c + 1) * max_len // n


def _clone(part):
    """A LayerSkew with tensors of its own (graph decode writes each batch's columns into them)."""
    return dataclasses.replace(part, **{f.name: getattr(part, f.name).clone() for f in dataclasses.fields(part)
                                        if isinstance(getattr(part, f.name), torch.Tensor)})
