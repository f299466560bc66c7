"""Model-family glue: where a decoder layer keeps its query projection, input norm and RoPE.

InfiniGen needs, for layer j, the query that layer j's attention would compute from a given
hidden state (to speculate layer j from layer j-1's input). Llama-3.x (GQA, RoPE) and OPT (MHA,
learned positions, pre-LayerNorm) are supported; any other family is a clear `Unsupported`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from frameworks.harness.result import Unsupported

SUPPORTED = ("llama", "opt")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # the transformers Llama convention: pairs are (i, i + d/2)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Arch:
    """Read-only view of a supported model's decoder stack."""

    def __init__(self, model):
        cfg = model.config
        self.model_type = cfg.model_type
        if self.model_type == "llama":
            self.layers = model.model.layers
            self.rope = True
        elif self.model_type == "opt":
            if not cfg.do_layer_norm_before:  # OPT-350m: the norm comes after attention
                raise Unsupported("InfiniGen needs a pre-LayerNorm OPT (do_layer_norm_before=true)")
            self.layers = model.model.decoder.layers
            self.rope = False
        else:
            raise Unsupported(f"InfiniGen supports the model families {SUPPORTED}, not {self.model_type!r}")
        self.n_layers = len(self.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.groups = self.n_heads // self.n_kv_heads

    def attn(self, i: int):
        return self.layers[i].self_attn

    def norm(self, i: int):
        layer = self.layers[i]
        return layer.input_layernorm if self.rope else layer.self_attn_layer_norm

    def normed(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's input norm applied to x: the module itself, or for Llama's RMSNorm the same
        computation (float32, then weight x result in the input dtype) with one fused
        F.rms_norm instead of its five elementwise ops."""
        norm = self.norm(i)
        eps = getattr(norm, "variance_epsilon", None)
        if not self.rope or eps is None:
            return norm(x)
        return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)

    def logit_scale(self, i: int) -> float:
        """Factor from q.k to the attention logit (OPT scales q inside its projection)."""
        return self.attn(i).scaling if self.rope else 1.0

    def rope_apply(self, q: torch.Tensor, position_embeddings) -> torch.Tensor:
        """q [B, H, T, d] -> RoPE(q), same ops as transformers' apply_rotary_pos_emb."""
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return (q * cos) + (_rotate_half(q) * sin)

    def query(self, i: int, x: torch.Tensor, position_embeddings=None) -> torch.Tensor:
        """Layer i's query for the hidden state x [B, T, D] entering layer i (before its norm),
        exactly as its attention function receives it: [B, H, T, d], post-RoPE (Llama) or
        pre-scaled (OPT)."""
        b, t, _ = x.shape
        attn = self.attn(i)
        q = attn.q_proj(self.norm(i)(x)).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            return self.rope_apply(q, position_embeddings)
        return q * attn.scaling
