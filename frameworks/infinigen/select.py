"""Speculated scores -> the tokens to fetch. Pure tensor functions, fixed shapes (no host sync).

Upstream's rule (kv_selection_controller.speculate_attention): a token is critical for a query
head when its speculated logit is > max - alpha; the number fetched is the mean count over
sequences and heads (one number for the batch, so transfers stay rectangular), capped by the
KV budget; each sequence and head then takes its own top tokens. With GQA the rows fetched are
per kv head, so a kv head's score of a token is the max over its query heads (a token stays if
any head of the group needs it); the count is still averaged over query heads as upstream.
"""

from __future__ import annotations

import torch


def scores(partial_q: torch.Tensor, partial_k: torch.Tensor) -> torch.Tensor:
    """partial_q [B, Hkv, G, r], partial_k [B, Hkv, L, r] -> logits [B, Hkv, G, L] (float32)."""
    return torch.matmul(partial_q, partial_k.transpose(-1, -2)).float()


def select(logits: torch.Tensor, alpha: float, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, Hkv, G, L] -> (idx [B, Hkv, min(cap, L)] by decreasing score, k: 0-d long).

    Use the first k indices of every row; k in [1, min(cap, L)]. `cap` is the KV budget in tokens.
    """
    length = logits.shape[-1]
    cap = max(1, min(cap, length))
    top = logits.amax(dim=-1, keepdim=True)
    count = (logits > top - alpha).sum(dim=-1)  # [B, Hkv, G]
    k = torch.div(count.sum(), count.numel(), rounding_mode="floor").clamp(1, cap)
    per_kv = logits.amax(dim=2)  # [B, Hkv, L]
    idx = per_kv.topk(cap, dim=-1).indices
    return idx, k


def flat_rows(idx: torch.Tensor, batch: int, kv_heads: int) -> torch.Tensor:
    """idx [B, Hkv, k] token positions -> row numbers in a token-major [L, B, Hkv, d] store
    viewed as [L*B*Hkv, d] (as upstream's select_kv). Returned flat, in [B, Hkv, k] order."""
    lane = torch.arange(batch * kv_heads, device=idx.device).view(batch, kv_heads, 1)
    return (idx * (batch * kv_heads) + lane).reshape(-1)
