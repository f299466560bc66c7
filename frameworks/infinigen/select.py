"""Speculated scores -> the tokens to fetch. Pure tensor functions, fixed shapes (no host sync).

Upstream's rule (kv_selection_controller.speculate_attention): a token is critical for a query
head when its speculated logit is > max - alpha; the number fetched is the mean count over
sequences and heads (one number for the batch, so transfers stay rectangular, floored as
upstream's int(mean): 0 when alpha = 0), capped by the KV budget; each sequence and head then takes its own top tokens. With GQA the rows fetched are
per kv head, so a kv head's score of a token is the max over its query heads (a token stays if
any head of the group needs it); the count is still averaged over query heads as upstream.

Static shapes: the count k is data-dependent and stays on the device. Every step gathers
exactly `cap` rows per (sequence, kv head) — cap is the KV budget, a function of the sequence
length only — whose first k are the selected tokens and the rest a copy of the first (a valid
row); an additive attention bias (0 for the first k, -inf after) masks the padding. No .item(),
no nonzero, no boolean indexing: nothing waits for the device.
"""

from __future__ import annotations

import torch


def scores(partial_q: torch.Tensor, partial_k: torch.Tensor) -> torch.Tensor:
    """partial_q [B, Hkv, G, r], partial_k [B, Hkv, L, r] -> logits [B, Hkv, G, L] (float32)."""
    return torch.matmul(partial_q, partial_k.transpose(-1, -2)).float()


def select(logits: torch.Tensor, alpha: float, cap: int, min_fetch: int = 0,
           limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, Hkv, G, L] -> (idx [B, Hkv, min(cap, L)] by decreasing score, k: 0-d long).

    Use the first k indices of every row; k in [min(min_fetch, cap), min(cap, L)]. `cap` is the
    KV budget in tokens; k = 0 (upstream, alpha = 0: no token is above the maximum) fetches none.
    limit (graph decode: L is the whole preallocated cache, logits of positions not written yet
    are -inf): a 0-d device tensor, the budget at the real length (<= cap), bounding k instead of cap.
    """
    b, hkv, g, length = logits.shape
    cap = max(1, min(cap, length))
    top = logits.amax(dim=-1, keepdim=True)
    total = (logits > top - alpha).sum()  # sum over rows of each row's count: one reduction
    k = torch.div(total, b * hkv * g, rounding_mode="floor")
    if limit is None:
        k = k.clamp_(min(min_fetch, cap), cap)
    else:
        k = torch.minimum(torch.maximum(k, limit.clamp(max=min_fetch)), limit)
    per_kv = logits.amax(dim=2)  # [B, Hkv, L]
    idx = per_kv.topk(cap, dim=-1).indices
    return idx, k


def pad(idx: torch.Tensor, k: torch.Tensor, keep_pos: torch.Tensor):
    """idx [B, Hkv, cap], k 0-d, keep_pos = arange(>= cap) -> (idx with positions >= k replaced by
    position 0's token, keep [cap] bool). Shapes depend on cap only."""
    keep = keep_pos[: idx.shape[-1]] < k
    return torch.where(keep, idx, idx[..., :1]), keep


def flat_rows(idx: torch.Tensor, batch: int, kv_heads: int, lane: torch.Tensor | None = None) -> torch.Tensor:
    """idx [B, Hkv, k] token positions -> row numbers in a token-major [L, B, Hkv, d] store
    viewed as [L*B*Hkv, d] (as upstream's select_kv). Returned flat, in [B, Hkv, k] order.
    lane: arange(B*Hkv).view(B, Hkv, 1) on idx's device (made here if not given)."""
    if lane is None:
        lane = torch.arange(batch * kv_heads, device=idx.device).view(batch, kv_heads, 1)
    return torch.add(lane, idx, alpha=batch * kv_heads).reshape(-1)
