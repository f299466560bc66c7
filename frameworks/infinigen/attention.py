"""The attention functions the model is built with, registered with transformers.

Prefill delegates to the stock implementation of the prefill mode: the model's own eager
attention (materialises the attention matrix: the paper's OOM boundary) or SDPA (flash on CUDA
under the engine's `flash` mode). Decode (one query token per sequence) runs `decode_attention`
over whatever keys the cache returned — the selected rows plus the new token — so the causal
mask, sized for the full sequence, does not apply there (no padding: every key is visible).
During skewing (policy.prepare) the post-RoPE queries and keys are recorded here, the one place
where transformers exposes them.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

EAGER = "infinigen_eager"
SDPA = "infinigen_sdpa"


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """query [B, Hq, 1, d], key/value [B, Hkv, n, d] -> [B, 1, Hq, d]. GQA without repeating
    the keys; softmax in float32 as transformers' eager attention. Plain matmuls: no SDPA
    backend restriction (the flash backend would refuse nothing here, but needs no mask
    either way) and any number of keys."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling
    probs = scores.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, G, d]
    return out.reshape(b, hq, 1, d).transpose(1, 2).contiguous()


def _eager_of(module):
    # each model family has its own eager function (Llama repeats kv heads for GQA)
    return sys.modules[type(module).__module__].eager_attention_forward


def _attention(prefill_fn):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        sink = getattr(module, "_infinigen_capture", None)
        if sink is not None:
            sink.append((query.detach(), key.detach()))
        if query.shape[2] == 1:
            return decode_attention(query, key, value, scaling), None
        fn = prefill_fn(module)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    return attention


AttentionInterface.register(EAGER, _attention(_eager_of))
AttentionInterface.register(SDPA, _attention(lambda module: sdpa_attention_forward))
AttentionMaskInterface.register(EAGER, eager_mask)
AttentionMaskInterface.register(SDPA, sdpa_mask)
