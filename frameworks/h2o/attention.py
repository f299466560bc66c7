"""Attention functions that also give H2O its scores, registered with transformers'
AttentionInterface as `h2o_eager` and `h2o_chunked` (the model is built with one of them).

- eager prefill (paper-faithful): as transformers' eager attention, the whole [B, H, L, L]
  score matrix and its fp32 softmax are materialised, so the out-of-memory boundary of the
  paper's H2O (~15K tokens for 8B on 80 GB) reappears. Scores: the column sums of that matrix.
- chunked prefill: attention itself is SDPA (flash / memory-efficient kernels); the column sums
  cost one more Q·Kᵀ pass. Torch path (CPU, and the reference): recomputed block by block of
  query rows, so at most SCORE_BLOCK_ELEMS probabilities exist at a time whatever the prompt
  length. Triton path (CUDA): flash attention returns each query row's log-sum-exp with the
  output, and kernels.column_scores sums exp(q·k·scale − lse) per key in one fused pass.
- decode (both): one query per sequence against the layer's fixed slots, computed explicitly
  since the probabilities are needed anyway; in graph mode on CUDA, once the slots are full, the
  whole step (slot write, attention, scores, eviction choice) is one kernel (kernels.decode_step).

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

from frameworks.h2o import kernels

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


def blockwise_lse(q, k, scaling: float, block_elems: int = SCORE_BLOCK_ELEMS) -> torch.Tensor:
    """Each query row's log-sum-exp [B, Hq, Lq] (float32) of its scaled causal logits, in float32
    (the kernels' logits are float32-accumulated too), block by block of query rows."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    first = lk - lq
    dt = _acc_dtype(q)
    qg = q.unflatten(1, (hkv, g))
    lse = torch.empty(b, hkv, g, lq, dtype=dt, device=q.device)
    rows = max(1, block_elems // (b * hq * lk))
    for a in range(0, lq, rows):
        e = min(lq, a + rows)
        kend = first + e
        qb = qg[:, :, :, a:e].reshape(b, hkv, g * (e - a), d).to(dt) * scaling
        w = torch.matmul(qb, k[:, :, :kend].to(dt).transpose(-1, -2)).view(b, hkv, g, e - a, kend)
        w[..., first + a:].masked_fill_(~_causal(e - a, e - a, q.device), float("-inf"))
        lse[:, :, :, a:e] = torch.logsumexp(w, dim=-1)
    return lse.view(b, hq, lq)


_FLASH_OK: dict = {}  # (device, dtype) -> "" or why torch's flash kernel is not used


def _flash_check(device, dtype) -> str:
    """Once per device and dtype: does torch's flash kernel give GQA, bottom-right causal output
    and natural-log LSE of the scaled logits, as flash_with_lse assumes? "" if so, else why not."""
    key = (str(device), dtype)
    if key not in _FLASH_OK:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, 4, 3, 64, generator=g, device=device).to(dtype)
        k, v = (torch.randn(1, 2, 7, 64, generator=g, device=device).to(dtype) for _ in range(2))
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=0.3)[:2]
            ref = sdpa_causal(q.float(), k.float(), v.float(), 0.3)
            ok = torch.allclose(out.transpose(1, 2).float(), ref, atol=2e-2, rtol=2e-2) and \
                torch.allclose(lse[..., :3].float(), blockwise_lse(q, k, 0.3), atol=2e-2, rtol=1e-3)
            _FLASH_OK[key] = "" if ok else "torch's flash kernel disagreed with the reference in the self-check"
        except Exception as e:  # noqa: BLE001 - recorded (policy metrics), the SDPA path runs instead
            _FLASH_OK[key] = f"torch's flash kernel failed its self-check: {type(e).__name__}: {str(e)[:200]}"
    return _FLASH_OK[key]


def flash_with_lse(q, k, v, scaling: float) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Causal attention of the last Lq positions over Lk keys: output [B, Lq, Hq, D], each query
    row's log-sum-exp [B, Hq, Lq] and which kernel gave them. torch's flash kernel where it runs
    (its op takes GQA as is, and is_causal there is bottom-right aligned, which a later chunk
    needs: torch.nn.attention.bias.causal_lower_right dispatches to it the same way); else SDPA's
    output and blockwise_lse."""
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    g = q.shape[1] // k.shape[1]
    why = "not CUDA" if q.device.type != "cuda" else "not fp16/bf16" if q.dtype not in (torch.float16, torch.bfloat16) \
        else "head_dim not a multiple of 8" if q.shape[-1] % 8 else ""
    if not why and not can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, g > 1)):
        why = "torch.backends.cuda.can_use_flash_attention is False"
    why = why or _flash_check(q.device, q.dtype)
    if why:
        return sdpa_causal(q, k, v, scaling), blockwise_lse(q, k, scaling).float(), f"sdpa + torch lse ({why})"
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scaling)[:2]
    return out.transpose(1, 2), lse, "flash"


def chunked_with_scores(q, k, v, scaling: float, layer=None):
    """Chunked prefill: output [B, Lq, Hq, D] and column sums [B, Hkv, Lk]. The layer's
    score_kernel says how: "torch" (SDPA + blockwise_scores, also without a layer) or "triton"
    (flash_with_lse + kernels.column_scores; the layer records which attention kernel ran)."""
    if layer is None or layer.score_kernel == "torch":
        return sdpa_causal(q, k, v, scaling), blockwise_scores(q, k, scaling)
    out, lse, layer.prefill_attention = flash_with_lse(q, k, v, scaling)
    return out, kernels.column_scores(q, k, lse, scaling)


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
    prefill is `prefill(query, key, value, scaling, layer) -> (output, column sums)`."""

    def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
        layer, scaling = _layer(module), _scaling(query, scaling)
        if layer.decoding:
            if layer.incoming is not None:  # the fused step: it also writes the token and the scores
                return layer.fused_step(query, scaling), None
            out, probs = decode_with_scores(query, key, value, scaling)
            layer.add_step_scores(probs)
            return out, None
        out, col = prefill(query, key, value, scaling, layer)
        layer.add_prompt_scores(col)
        return out, None

    return attention


# eager: the full attention matrix, as the paper; chunked: SDPA, scores block by block or fused
h2o_eager = _h2o_attention(lambda q, k, v, s, layer: eager_with_scores(q, k, v, s))
h2o_chunked = _h2o_attention(chunked_with_scores)


def register() -> None:
    AttentionInterface.register(IMPLEMENTATIONS["eager"], h2o_eager)
    AttentionInterface.register(IMPLEMENTATIONS["chunked"], h2o_chunked)
