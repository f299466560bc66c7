"""Skewing at load time and the partial query / partial key it enables.

Choice (documented in the report): as upstream, the rotation comes from the queries of a
warm-up forward pass (seeded random tokens: weights may be random, so no text is assumed),
not from the weights. For each layer and kv head, A is the right-singular basis of the
group's queries Q [tokens x queries-per-kv-head, d] (computed as the eigenvectors of QᵀQ, d x d,
which is the same basis and cheap for any token count). In that basis a few columns of QA carry
most of the energy; the `r = int(partial_weight_ratio * d)` columns with the largest absolute
column sum (upstream's rule) are kept. With GQA the rotation is per kv head because the query
heads of a group share one key: (q_h A)·(k_g A) = q_h·k_g needs the same A for both.

Where A is applied relative to RoPE:
- Llama (RoPE): on the *post-RoPE* query and key, as upstream's Llama code does. RoPE is a
  position-dependent rotation R_m; (R_m q)ᵀ A Aᵀ (R_n k) = (R_m q)ᵀ (R_n k) for orthogonal A,
  so the skewed logits equal the true ones at every position, whereas A folded into W_q / W_k
  (before RoPE) would not commute with R_m (tests prove both). Hence A is not folded: the
  attention keeps the model's keys, the partial key cache is (RoPE(k) A)[:, cols] and the
  partial query (RoPE(W_q x) A)[:, cols] — RoPE mixes all of a head's dimensions, so it needs
  the full (already GPU-resident) q_proj of the next layer; only A[:, cols] is extra.
  RoPE is folded into that projection instead of applied: RoPE(q) = q*cos + rotate_half(q)*sin
  and rotate_half is a signed permutation, so RoPE(q) P = [q | q] * [cos | sin'] @ [P ; P']
  with P' = rotate_half's transpose applied to P's rows and sin' = sin permuted alike (made
  once per step, shared by all layers): one cat, one mul and one matmul per layer instead of
  RoPE's nine ops; the logit scale is folded into [P ; P'] (`qproj`).
- OPT (no RoPE): A is folded into W_q, b_q, W_k, b_k (W <- AᵀW per head, as upstream's
  `skew`), so the cached keys are skewed; the partial key is a column gather and the partial
  query projection is the kept rows of the skewed W_q (pre-scaled): a genuine [H·r, D] matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LayerSkew:
    proj: torch.Tensor  # [Hkv, d, r]: partial key = key @ proj (per kv head)
    cols: torch.Tensor  # [Hkv, r] kept columns of the skewed space
    energy: float  # share of the warm-up queries' squared norm in the kept columns
    wq: torch.Tensor | None = None  # OPT: partial query weight [H*r, D] (times the attention scaling)
    bq: torch.Tensor | None = None  # OPT: its bias [H*r] (same)
    qproj: torch.Tensor | None = None  # RoPE: [Hkv, 2d, r] = [proj ; rotate_half-permuted proj] x logit scale
    rot: torch.Tensor | None = None  # RoPE: the rotation A [Hkv, d, d] (OPT: folded into the weights, None)


def capture(model, arch, layers, tokens: torch.Tensor) -> dict:
    """Post-RoPE queries and keys of a forward pass: {layer: (q [Hq, T, d], k [Hkv, T, d])} float32."""
    sinks = {i: [] for i in layers}
    for i in layers:
        arch.attn(i)._infinigen_capture = sinks[i]
    try:
        with torch.inference_mode():
            model(input_ids=tokens, use_cache=False)
    finally:
        for i in layers:
            del arch.attn(i)._infinigen_capture
    return {i: (s[0][0][0].float(), s[0][1][0].float()) for i, s in sinks.items()}


def rotation(q: torch.Tensor) -> torch.Tensor:
    """q [n, d] -> orthogonal A [d, d], columns by decreasing singular value of q."""
    evals, evecs = torch.linalg.eigh(q.T.double() @ q.double())
    return evecs.flip(-1).to(q.dtype)


def layer_skew(q: torch.Tensor, n_kv: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """q [Hq, T, d] of one layer -> (A [Hkv, d, d], cols [Hkv, r], energy share)."""
    hq, _, d = q.shape
    r = max(1, int(d * ratio))
    groups = q.reshape(n_kv, (hq // n_kv) * q.shape[1], d)
    rots, cols, kept, total = [], [], 0.0, 0.0
    for qg in groups:
        a = rotation(qg)
        qa = qg @ a
        c = qa.abs().sum(0).topk(r).indices.sort().values
        rots.append(a)
        cols.append(c)
        kept += float(qa[:, c].pow(2).sum())
        total += float(qa.pow(2).sum())
    return torch.stack(rots), torch.stack(cols), kept / max(total, 1e-30)


def _rotate_rows(linear, a: torch.Tensor, head_dim: int) -> None:
    """W <- Aᵀ W and b <- Aᵀ b per head (so the projection's output becomes q A)."""
    w = linear.weight.data
    wf = w.float().view(a.shape[0], head_dim, -1)
    linear.weight.data.copy_(torch.matmul(a.transpose(1, 2), wf).view_as(w))
    if linear.bias is not None:
        bf = linear.bias.data.float().view(a.shape[0], head_dim, 1)
        linear.bias.data.copy_(torch.matmul(a.transpose(1, 2), bf).view_as(linear.bias))


def partial(arch, i: int, cols: torch.Tensor, rot: torch.Tensor | None, energy: float = float("nan")) -> LayerSkew:
    """Layer i's partial key projection and partial query weights for the kept columns
    cols [Hkv, r] of its skewed space (rot: Llama's rotation A; None for OPT, skewed in place)."""
    d = arch.head_dim
    attn = arch.attn(i)
    dev, dtype = attn.q_proj.weight.device, attn.q_proj.weight.dtype
    cols = cols.to(dev)
    gather = cols[:, None, :].expand(-1, d, -1)
    if rot is not None:
        proj = torch.gather(rot.to(dev), 2, gather)
        h = d // 2  # rotate_half(q) @ P = q @ cat(P[h:], -P[:h]) (rows), given sin permuted alike
        qproj = torch.cat((proj, proj[:, h:], -proj[:, :h]), dim=1) * arch.logit_scale(i)
        return LayerSkew(proj.to(dtype), cols, energy, qproj=qproj.to(dtype), rot=rot.to(dev))
    eye = torch.eye(d, device=dev).expand(arch.n_kv_heads, d, d)
    proj = torch.gather(eye, 2, gather)
    rows = (cols + torch.arange(arch.n_heads, device=dev)[:, None] * d).reshape(-1)
    wq = attn.q_proj.weight.data.index_select(0, rows) * attn.scaling
    bq = attn.q_proj.bias.data.index_select(0, rows) * attn.scaling if attn.q_proj.bias is not None else None
    return LayerSkew(proj.to(dtype), cols, energy, wq, bq)


def column_scores(query: torch.Tensor, n_kv: int, rot: torch.Tensor | None) -> torch.Tensor:
    """Upstream's column rule (partial_weight_index_generation) on a prompt's queries: the summed
    |skewed query| of each column, from the batch's FIRST sequence as upstream (its columns serve
    the whole batch). query [B, Hq, T, d] as the attention receives it -> [Hkv, d] float32; with
    GQA the query heads of a kv head add up (they share its partial key)."""
    q = query[0].float()  # [Hq, T, d]
    hq, t, d = q.shape
    q = q.reshape(n_kv, (hq // n_kv) * t, d)
    if rot is not None:
        q = q @ rot.float()
    return q.abs().sum(1)


def build(model, arch, layers, tokens: torch.Tensor, ratio: float) -> dict[int, LayerSkew]:
    """Skew every layer in `layers` (folding into OPT's weights) and return their partial data
    for the warm-up's columns."""
    captured = capture(model, arch, layers, tokens)
    out = {}
    for i in layers:
        q, _ = captured[i]
        a, cols, energy = layer_skew(q, arch.n_kv_heads, ratio)
        if arch.rope:
            out[i] = partial(arch, i, cols, a, energy)
        else:
            a = a.to(arch.attn(i).q_proj.weight.device)
            _rotate_rows(arch.attn(i).q_proj, a, arch.head_dim)
            _rotate_rows(arch.attn(i).k_proj, a, arch.head_dim)
            out[i] = partial(arch, i, cols, None, energy)
    return out


def rope_table(position_embeddings) -> torch.Tensor:
    """(cos, sin) [B, T, d] -> [cos | sin'] [B, 1, T, 2d], sin' = sin with its halves swapped
    (the factor rotate_half(q) meets once rotate_half is moved onto the projection)."""
    cos, sin = position_embeddings
    h = sin.shape[-1] // 2
    return torch.cat((cos, sin[..., h:], sin[..., :h]), dim=-1).unsqueeze(1)


def partial_query(arch, j: int, skew: LayerSkew, x: torch.Tensor, position_embeddings=None,
                  table: torch.Tensor | None = None, norm: int | None = None) -> torch.Tensor:
    """Layer j's partial query from the hidden state x [B, 1, D] (layer j-1's input, before its
    norm), normalised by layer `norm`'s input norm (upstream: j-1, the attention input of the
    layer that speculates; default j): [B, Hkv, G, r], scaled so that partial_query · partial_key
    approximates the logit. table: rope_table(position_embeddings), if already made for this step."""
    b = x.shape[0]
    h = arch.normed(j if norm is None else norm, x)
    if skew.wq is not None:  # OPT: the partial projection itself
        return F.linear(h, skew.wq, skew.bq).view(b, arch.n_kv_heads, arch.groups, -1)
    if table is None:
        table = rope_table(position_embeddings)
    q = arch.attn(j).q_proj(h).view(b, arch.n_kv_heads, arch.groups, arch.head_dim)
    return torch.matmul(torch.cat((q, q), dim=-1) * table, skew.qproj)
