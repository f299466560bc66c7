"""Attention functions that also give H2O its scores, registered with transformers'
AttentionInterface as `h2o_eager` and `h2o_chunked` (the model is built with one of them).

- eager prefill (paper-faithful): as transformers' eager attention, the whole [B, H, L, L]
  score matrix and its fp32 softmax are materialised, so the out-of-memory boundary of the
  paper's H2O (~15K tokens for 8B on 80 GB) reappears. Scores: the column sums of that matrix.
- chunked prefill: attention itself is SDPA (flash / memory-efficient kernels); the column sums
  are recomputed block by block of query rows, so at most SCORE_BLOCK_ELEMS probabilities exist
  at a time whatever the prompt length (the extra cost is one more Q·Kᵀ).
- decode (both): one query per sequence against the layer's fixed slots, computed explicitly
  since the probabilities are needed anyway.

GQA rule: the score of a token in KV head j is the SUM of the probabilities it received from
every query head of j's group (heads j*G … j*G+G-1, transformers' repeat_kv order). Summing
keeps the definition "attention received from every query"; a mean would rank identically.

Masks: the engine never pads (exact-length prompts), so causality is applied here; transformers
builds no mask for these implementations. The module finds its cache layer through the policy
that H2OPolicy.prepare attaches to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

SCORE_BLOCK_ELEMS = 2**28  # chunked prefill: probabilities per block (x 4-6 bytes: ~1.5 GB)
IMPLEMENTATIONS = {"eager": "h2o_eager", "chunked": "h2o_chunked"}


def _layer(module):
    policy = getattr(module, "h2o_policy", None)
    if policy is None or policy.cache is None:
        raise RuntimeError("h2o attention needs the model prepared by H2OPolicy and a cache from its new_cache()")
    return policy.cache.layers[module.layer_idx]


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv*G, L, D], query head h reading KV head h // G (as transformers)."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def _causal(lq: int, lk: int, device) -> torch.Tensor:
    """[lq, lk] True where query i (at position lk - lq + i) may attend key j."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)


def eager_with_scores(q, k, v, scaling: float):
    """Attention output [B, Lq, Hq, D] and column sums [B, Hkv, Lk], full matrix materialised."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    w = torch.matmul(q, repeat_kv(k, g).transpose(2, 3)) * scaling
    w.masked_fill_(~_causal(lq, lk, q.device), float("-inf"))
    p = torch.softmax(w, dim=-1, dtype=_acc_dtype(q))
    del w
    col = p.sum(2).view(b, hkv, g, lk).sum(2)
    out = torch.matmul(p.to(v.dtype), repeat_kv(v, g))
    return out.transpose(1, 2).contiguous(), col


def blockwise_scores(q, k, scaling: float, block_elems: int = SCORE_BLOCK_ELEMS) -> torch.Tensor:
    """Column sums [B, Hkv, Lk] of the causal softmax(Q·Kᵀ), never holding more than about
    block_elems probabilities: query rows are processed in blocks, each against the keys it sees."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    first = lk - lq  # position of the first query
    qg = q.unflatten(1, (hkv, g))
    col = torch.zeros(b, hkv, lk, dtype=_acc_dtype(q), device=q.device)
    rows = max(1, block_elems // (b * hq * lk))
    for a in range(0, lq, rows):
        e = min(lq, a + rows)
        kend = first + e  # keys after the block's last query are masked for all its rows
        qb = qg[:, :, :, a:e].reshape(b, hkv, g * (e - a), d) * scaling  # scale the small operand: one pass less
        w = torch.matmul(qb, k[:, :, :kend].transpose(-1, -2)).view(b, hkv, g, e - a, kend)
        # only the block's own diagonal square needs masking: earlier keys are seen by every row
        w[..., first + a:].masked_fill_(~_causal(e - a, e - a, q.device), float("-inf"))
        col[..., :kend] += torch.softmax(w, dim=-1, dtype=col.dtype).sum((2, 3))
    return col


def sdpa_causal(q, k, v, scaling: float) -> torch.Tensor:
    """Causal SDPA of the last Lq positions over Lk keys; output [B, Lq, Hq, D]."""
    lq, lk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    if lq == lk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=g > 1)
    else:  # a later chunk: torch's is_causal is top-left aligned, so an explicit mask
        out = F.scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g), attn_mask=_causal(lq, lk, q.device),
                                             scale=scaling)
    return out.transpose(1, 2).contiguous()


def decode_with_scores(q, k, v, scaling: float):
    """One query per sequence: output [B, 1, Hq, D] and probabilities summed per group [B, Hkv, S]."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    w = torch.matmul(q.reshape(b, hkv, g, d), k.transpose(-1, -2))  # GQA without copying K
    p = torch.softmax(w if scaling == 1.0 else w.mul_(scaling), dim=-1, dtype=_acc_dtype(q))  # OPT pre-scales q
    out = torch.matmul(p.to(v.dtype), v)  # [B, Hkv, G, Dv]
    return out.reshape(b, hq, 1, v.shape[-1]).transpose(1, 2), p.sum(2)


def _scaling(q, scaling):
    return scaling if scaling is not None else q.shape[-1] ** -0.5


def _h2o_attention(prefill):
    """An attention function: decode steps add their probabilities to the layer's scores;
    prefill is `prefill(query, key, value, scaling) -> (output, column sums)`."""

    def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        layer, scaling = _layer(module), _scaling(query, scaling)
        if layer.decoding:
            out, probs = decode_with_scores(query, key, value, scaling)
            layer.add_step_scores(probs)
            return out, None
        out, col = prefill(query, key, value, scaling)
        layer.add_prompt_scores(col)
        return out, None

    return attention


# eager: the full attention matrix, as the paper; chunked: SDPA, scores block by block
h2o_eager = _h2o_attention(eager_with_scores)
h2o_chunked = _h2o_attention(lambda q, k, v, s: (sdpa_causal(q, k, v, s), blockwise_scores(q, k, s)))


def register() -> None:
    AttentionInterface.register(IMPLEMENTATIONS["eager"], h2o_eager)
    AttentionInterface.register(IMPLEMENTATIONS["chunked"], h2o_chunked)
