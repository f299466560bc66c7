"""The attention functions the model is built with, registered with transformers.

Prefill delegates to the stock implementation of the prefill mode: the model's own eager
attention (materialises the attention matrix: the paper's OOM boundary) or SDPA (flash on CUDA
under the engine's `flash` mode). Decode (one query token per sequence after the prompt: the cache says which forward is which,
so a one-token last prefill chunk is still prefill) runs `decode_attention`
over whatever keys the cache returned — the fetched rows plus the new token — so the causal
mask, sized for the full sequence, does not apply there; a speculated layer's fetch is padded to
a static size, and the cache leaves the padding's bias (0 / -inf per fetched row) on the module
as `_infinigen_bias` for this call.
During skewing (policy.prepare) the post-RoPE queries and keys are recorded here, the one place
where transformers exposes them.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from frameworks.hf.attention import eager_mask_capturable

EAGER = "infinigen_eager"
SDPA = "infinigen_sdpa"


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, Hq, 1, d], key/value [B, Hkv, n, d] -> [B, 1, Hq, d]. GQA without repeating
    the keys; softmax in float32 as transformers' eager attention. Plain matmuls: no SDPA
    backend restriction and any number of keys. bias [m <= n] (float32) is added to the logits
    of the first m keys (-inf: a padding row, weight exactly 0)."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, hq // hkv, d)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling
    if bias is not None:
        scores[..., : bias.shape[-1]] += bias
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
        if module.__dict__.pop("_infinigen_decode", False):  # the cache said: a decode step, not prefill
            return decode_attention(query, key, value, scaling, module.__dict__.get("_infinigen_bias")), None
        prompt = module.__dict__.pop("_infinigen_prompt", None)
        if prompt is not None:  # a speculated layer picks its partial columns from the prompt's queries
            cache, layer, last = prompt
            cache.prompt_queries(layer, query, key, last)
        fn = prefill_fn(module)
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    return attention


AttentionInterface.register(EAGER, _attention(_eager_of))
AttentionInterface.register(SDPA, _attention(lambda module: sdpa_attention_forward))
AttentionMaskInterface.register(EAGER, eager_mask_capturable)
AttentionMaskInterface.register(SDPA, sdpa_mask)
