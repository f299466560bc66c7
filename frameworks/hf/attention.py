"""The graph-mode attention of the transformers engine, registered with transformers'
AttentionInterface as `kvstudy_eager` / `kvstudy_sdpa` (prefill: the stock eager / sdpa path).

Decode (one query per sequence) runs over the whole preallocated cache with a boolean length
mask that the engine computes once per step (a 4-D mask, which transformers passes through
untouched) and `enable_gqa=True`: the stock `sdpa` path repeats every KV head for each of its
query heads whenever a mask is given (4x the KV bytes read for Llama-3's GQA) and a static
cache always needs one. Shapes depend on the batch and the cache size only: one captured step
serves every position.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATIONS = {"eager": "kvstudy_eager", "sdpa": "kvstudy_sdpa"}  # by prefill attention
DECODE_KERNELS = ("sdpa", "matmul")
decode_kernel = "sdpa"  # module setting: the GPU benchmark times both


def gqa_decode(query, key, value, mask, scaling: float) -> torch.Tensor:
    """query [B, Hq, 1, D], key/value [B, Hkv, L, D], mask bool [B, 1, 1, L] or None -> [B, 1, Hq, D].
    Hq/Hkv query heads share each KV head without copying it: torch's SDPA with enable_gqa, or
    (decode_kernel "matmul") two batched matmuls over [B, Hkv, G, D] queries, softmax in float32."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    if decode_kernel == "matmul":
        w = torch.matmul(query.reshape(b, hkv, hq // hkv, d), key.transpose(-1, -2)).float() * scaling
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf"))  # [B, 1, 1, L] broadcasts over heads and group
        out = torch.matmul(w.softmax(-1).to(value.dtype), value).reshape(b, hq, 1, value.shape[-1])
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=hq != hkv)
    return out.transpose(1, 2).contiguous()


def _eager_of(module):
    return sys.modules[type(module).__module__].eager_attention_forward  # each family has its own


def _attention(prefill_fn):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] == 1:
            scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
            return gqa_decode(query, key, value, attention_mask, scaling), None
        return prefill_fn(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    return attention


def eager_mask_capturable(*args, dtype: torch.dtype = torch.float32, **kwargs):
    """transformers' `eager_mask` (the boolean `sdpa_mask` as 0 / dtype-min), but with its 0 made on
    the mask's device: the stock one copies a host scalar (`torch.tensor(0.0, device=...)`), which
    CUDA-graph capture refuses (seen on the H200 for InfiniGen's captured step with eager prefill)."""
    kwargs.pop("allow_is_causal_skip", None)
    mask = sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)
    if mask is None:
        return None
    return torch.where(mask, mask.new_zeros((), dtype=dtype), torch.finfo(dtype).min)


AttentionInterface.register(IMPLEMENTATIONS["eager"], _attention(_eager_of))
AttentionInterface.register(IMPLEMENTATIONS["sdpa"], _attention(lambda module: sdpa_attention_forward))
AttentionMaskInterface.register(IMPLEMENTATIONS["eager"], eager_mask_capturable)  # prefill masks as stock
AttentionMaskInterface.register(IMPLEMENTATIONS["sdpa"], sdpa_mask)
