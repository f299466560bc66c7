"""InfiniGen policy on CPU, tiny models, float32.

Tolerances (float32 on CPU): logits within 1e-4 absolute of the reference (observed ~3e-7);
skewed logits within 1e-4 relative to the largest |logit|.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from frameworks import models
from frameworks.harness.result import Unsupported
from frameworks.harness.spec import CellSpec
from frameworks.hf.engine import Engine
from frameworks.hf.policy import KVPolicy
from frameworks.infinigen import kernels, select, skew, transfer
from frameworks.infinigen.arch import Arch
from frameworks.infinigen.policy import InfiniGenPolicy
from frameworks.infinigen.transfer import Transfer

LLAMA, OPT = "tiny-llama-3.1", "tiny-opt"
ATOL = 1e-4
needs_triton = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


class TritonGatherPolicy(InfiniGenPolicy):
    """The CUDA default gather (kernels.gather_selected), here under Triton's interpreter."""

    gather = "triton"


def _spec(model, framework="infinigen", prefill="sdpa", kv_budget=1.0, **policy):
    return CellSpec(experiment="unit", framework=framework, model=model, device="cpu", dtype="float32",
                    prefill=prefill, chunk_size=24, kv_budget=kv_budget, policy=policy, batch_size=2,
                    prompt_len=48, gen_len=6)


def _engine(spec, policy_cls):
    policy = policy_cls(spec)
    model = models.build(spec.model, "random", "cpu", "float32", policy.attn_implementation(spec.prefill), 0)
    policy.prepare(model)
    eng = Engine(model, policy, "cpu", spec.prefill, spec.chunk_size)
    eng.collect_logits = True
    return eng, policy, model


def _prompts(model, b=2, n=48, seed=1):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, (b, n))


def _generate(spec, policy_cls, gen=6):
    eng, policy, model = _engine(spec, policy_cls)
    eng.generate(_prompts(model), gen)
    return torch.stack(eng.step_logits), eng.last_tokens, policy


# -- skewing ----------------------------------------------------------------------------
def test_skew_folded_into_opt_weights_leaves_outputs_unchanged():
    plain = models.build(OPT, "random", "cpu", "float32", "sdpa", 0)
    eng, policy, skewed = _engine(_spec(OPT), InfiniGenPolicy)
    ids = torch.as_tensor(_prompts(plain))
    w0, w1 = plain.model.decoder.layers[1].self_attn.q_proj.weight, skewed.model.decoder.layers[1].self_attn.q_proj.weight
    assert not torch.allclose(w0, w1, atol=1e-3), "layer 1 should have been skewed"
    with torch.inference_mode():
        a, b = plain(input_ids=ids).logits, skewed(input_ids=ids).logits
    assert (a - b).abs().max() < ATOL


def test_skew_concentrates_energy():
    eng, policy, _ = _engine(_spec(OPT, partial_weight_ratio=0.25), InfiniGenPolicy)
    # a random rotation would keep ~r/d of the energy; the SVD basis keeps more
    assert all(s.energy > 0.25 for s in policy.skews.values())


def test_skew_after_rope_commutes_and_before_rope_does_not():
    """RoPE is R_m; A orthogonal. After RoPE: (Aᵀ R_m q)·(Aᵀ R_n k) = (R_m q)·(R_n k) exactly.
    Folded into the weights (before RoPE): (R_m Aᵀ q)·(R_n Aᵀ k) differs."""
    model = models.build(LLAMA, "random", "cpu", "float32", "sdpa", 0)
    arch = Arch(model)
    d, n = arch.head_dim, 40
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, n, d, generator=g), torch.randn(1, 1, n, d, generator=g)
    a = skew.rotation(torch.randn(200, d, generator=g) * torch.linspace(3, 0.1, d))
    assert torch.allclose(a.T @ a, torch.eye(d), atol=1e-5)
    pos = torch.arange(n)[None]
    pe = model.model.rotary_emb(q, pos)
    true = arch.rope_apply(q, pe) @ arch.rope_apply(k, pe).transpose(-1, -2)
    after = (arch.rope_apply(q, pe) @ a) @ (arch.rope_apply(k, pe) @ a).transpose(-1, -2)
    before = arch.rope_apply(q @ a, pe) @ arch.rope_apply(k @ a, pe).transpose(-1, -2)
    scale = true.abs().max()
    assert (after - true).abs().max() / scale < 1e-4
    assert (before - true).abs().max() / scale > 1e-2


def _capture_decode_step(model, policy, eng, j):
    """Run a prefill + one decode step; return layer j's decode input, its position embeddings,
    the query the attention really used, and the cache."""
    seen = {}
    layer = policy.arch.layers[j]

    def pre(module, args, kwargs):
        if args[0].shape[1] == 1:
            seen["x"], seen["pe"] = args[0], kwargs.get("position_embeddings")
            policy.arch.attn(j)._infinigen_capture = seen.setdefault("sink", [])

    h = layer.register_forward_pre_hook(pre, with_kwargs=True)
    caches = []
    orig = policy.new_cache
    policy.new_cache = lambda *a, **k: caches.append(orig(*a, **k)) or caches[-1]
    try:
        eng.generate(_prompts(model), 2)
    finally:
        h.remove()
        policy.new_cache = orig
        policy.arch.attn(j).__dict__.pop("_infinigen_capture", None)
    return seen["x"], seen["pe"], seen["sink"][0][0], caches[-1]


@pytest.mark.parametrize("name", [LLAMA, OPT])
def test_speculation_with_all_columns_gives_the_true_logits(name):
    """partial_weight_ratio 1: partial query (position m) x cached partial keys (positions < m)
    = the logits of the model's own attention: the skew is placed consistently with RoPE."""
    eng, policy, model = _engine(_spec(name, partial_weight_ratio=1.0, alpha=math.inf), InfiniGenPolicy)
    j = 1
    x, pe, q_true, cache = _capture_decode_step(model, policy, eng, j)
    length = 48  # prompt: the partial keys of the decode step's past
    arch = policy.arch
    keys, _ = cache.store.keys_values(j, length)  # [B, Hkv, L, d] as the model made them
    b = keys.shape[0]
    qg = q_true.reshape(b, arch.n_kv_heads, arch.groups, arch.head_dim)
    true = torch.matmul(qg, keys.transpose(-1, -2)) * arch.logit_scale(j)
    with torch.inference_mode():
        pq = skew.partial_query(arch, j, policy.skews[j], x, pe)
        spec = select.scores(pq, cache.partial_k[j][:, :, :length])
    assert (spec - true).abs().max() / true.abs().max() < 1e-4


def test_rope_folded_partial_query_equals_rope_then_projection():
    """[q | q] * [cos | sin'] @ [P ; P'] = RoPE(q) @ P, for any cos/sin (halves not tied, so the
    sin permutation is checked too), batch 2; and the fused RMSNorm equals the module."""
    eng, policy, model = _engine(_spec(LLAMA, partial_weight_ratio=0.5), InfiniGenPolicy)
    arch, j = policy.arch, 1
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 1, model.config.hidden_size, generator=g)
    pe = (torch.randn(2, 1, arch.head_dim, generator=g), torch.randn(2, 1, arch.head_dim, generator=g))
    with torch.inference_mode():
        assert (arch.normed(j, x) - arch.norm(j)(x)).abs().max() < 1e-5
        q = arch.query(j, x, pe).reshape(2, arch.n_kv_heads, arch.groups, arch.head_dim)
        want = torch.matmul(q, policy.skews[j].proj) * arch.logit_scale(j)
        got = skew.partial_query(arch, j, policy.skews[j], x, pe)
        table = skew.rope_table(pe)
        again = skew.partial_query(arch, j, policy.skews[j], x, None, table)
    assert got.shape == want.shape
    assert (got - want).abs().max() / want.abs().max() < 1e-5
    assert torch.equal(got, again)


# -- full budget = full cache -----------------------------------------------------------
@pytest.mark.parametrize("name,prefill,budget,policy", [
    (LLAMA, "sdpa", 1.0, {}), (LLAMA, "eager", 1.0, {}), (LLAMA, "chunked", 1.0, {}),
    (OPT, "eager", 1.0, {}), (OPT, "chunked", 1.0, {}),
    (LLAMA, "sdpa", 0.1, {"max_num_kv": 10_000}),  # a token cap above the sequence length
    (OPT, "sdpa", 0.1, {"max_num_kv": 10_000, "partial_weight_ratio": 0.5}),
    pytest.param(LLAMA, "chunked", 1.0, {"gather": "triton"}, marks=needs_triton),
    pytest.param(OPT, "sdpa", 1.0, {"gather": "triton"}, marks=needs_triton),
])
def test_budget_covering_the_sequence_and_alpha_inf_equal_full_cache(name, prefill, budget, policy):
    ref, ref_tokens, _ = _generate(_spec(name, "hf", prefill), KVPolicy)
    cls = TritonGatherPolicy if policy.pop("gather", None) else InfiniGenPolicy
    got, tokens, policy = _generate(_spec(name, prefill=prefill, kv_budget=budget, alpha=math.inf, **policy), cls)
    assert (got - ref).abs().max() < ATOL
    assert torch.equal(tokens, ref_tokens)
    m = policy.metrics()
    # every speculated layer fetched the whole past of both sequences
    assert m["fetched_tokens_per_step_speculated"] > 0


def test_all_layers_full_equals_full_cache():
    ref, _, _ = _generate(_spec(LLAMA, "hf"), KVPolicy)
    got, _, policy = _generate(_spec(LLAMA, kv_budget=0.1, full_layers=2), InfiniGenPolicy)
    assert not policy.skews and (got - ref).abs().max() < ATOL


def test_small_budget_fetches_at_most_the_budget():
    got, _, policy = _generate(_spec(LLAMA, kv_budget=0.2), InfiniGenPolicy)
    m = policy.metrics()
    assert 1 <= m["fetched_tokens_per_seq_layer_speculated"] <= int(0.2 * (48 + 6))
    ref, _, _ = _generate(_spec(LLAMA, "hf"), KVPolicy)
    assert (got - ref).abs().max() > ATOL  # it really used fewer tokens


# -- selection --------------------------------------------------------------------------
def _naive_select(logits, alpha, cap, min_fetch=0):
    """Written independently of select.select: loops, python sorting. Upstream's count: the
    floored mean over rows (0 when alpha = 0), here raised to min_fetch."""
    b, hkv, g, length = logits.shape
    counts = []
    for bi in range(b):
        for h in range(hkv):
            for gi in range(g):
                row = logits[bi, h, gi].tolist()
                m = max(row)
                counts.append(sum(1 for v in row if v > m - alpha))
    k = min(max(sum(counts) // len(counts), min_fetch), min(cap, length))
    chosen = {}
    for bi in range(b):
        for h in range(hkv):
            score = [max(logits[bi, h, gi, t].item() for gi in range(g)) for t in range(length)]
            order = sorted(range(length), key=lambda t: -score[t])
            chosen[bi, h] = set(order[:k])
    return k, chosen


@pytest.mark.parametrize("alpha,cap,min_fetch", [(0.5, 100, 0), (2.0, 5, 0), (4.0, 30, 0), (math.inf, 100, 0),
                                                 (math.inf, 7, 0), (0.0, 30, 0), (0.0, 30, 1)])
def test_selection_matches_naive_reference(alpha, cap, min_fetch):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 2, 4, 50, generator=g) * 2
    idx, k = select.select(logits, alpha, cap, min_fetch)
    k_ref, chosen = _naive_select(logits, alpha, cap, min_fetch)
    assert k_ref == (min_fetch if alpha == 0 else k_ref)  # alpha 0: no token is above the maximum
    assert int(k) == k_ref
    for (bi, h), want in chosen.items():
        assert set(idx[bi, h, : int(k)].tolist()) == want


@pytest.mark.parametrize("name,policy_cls", [(LLAMA, InfiniGenPolicy), (OPT, InfiniGenPolicy),
                                             pytest.param(LLAMA, TritonGatherPolicy, marks=needs_triton)])
def test_engine_selection_and_fetched_rows(name, policy_cls, monkeypatch):
    """In a real decode: the selection of layer j equals the naive reference computed from layer
    j-1's input, and the rows that reach attention equal the host store's rows (the first k the
    selected tokens, the rest padding masked by a -inf bias: copies of the top token with
    index_select, zeros with the Triton gather, which reads only the k selected rows)."""
    # the tiny random model's logits lie within ~0.1 of each other: a small alpha makes k < cap
    eng, policy, model = _engine(_spec(name, kv_budget=0.9, alpha=0.01), policy_cls)
    arch, j = policy.arch, 1
    records = []
    orig_launch = Transfer.launch_sparse

    def launch(self, store, layer, *args, **kwargs):
        got = orig_launch(self, store, layer, *args, **kwargs)  # CPU: done on return
        records.append((layer, got.idx.clone(), int(got.k), got.keys.clone(), got.values.clone(), got.bias.clone()))
        return got

    monkeypatch.setattr(Transfer, "launch_sparse", launch)
    inputs = []
    h = arch.layers[j - 1].register_forward_pre_hook(
        lambda m, a, kw: inputs.append((a[0], kw.get("position_embeddings"))) if a[0].shape[1] == 1 else None,
        with_kwargs=True)
    caches = []
    orig = policy.new_cache
    policy.new_cache = lambda *a, **k: caches.append(orig(*a, **k)) or caches[-1]
    eng.generate(_prompts(model), 2)
    h.remove()
    cache = caches[-1]
    layer, idx, k, keys, values, bias = [r for r in records if r[0] == j][-1]
    length, b = 48, 2
    cap = policy.cap(length)
    assert idx.shape == (b, arch.n_kv_heads, cap) and keys.shape[2] == cap  # static: the budget
    # naive reference: next layer's own modules, per head, post-RoPE, skewed columns
    x, pe = inputs[-1]
    attn = arch.attn(j)
    with torch.inference_mode():
        # upstream: layer j-1's own normalised input; the columns picked from this prompt
        q = attn.q_proj(arch.norm(j - 1)(x)).view(b, 1, arch.n_heads, arch.head_dim).transpose(1, 2)
        if arch.rope:
            cos, sin = pe
            half = arch.head_dim // 2
            rot = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
            q = q * cos[:, None] + rot * sin[:, None]
        else:
            q = q * attn.scaling
        keys_post = cache.store.prefix(j, length)[..., 0, :]  # [L, B, Hkv, d]
        proj = cache.parts[j].proj
        logits = torch.zeros(b, arch.n_kv_heads, arch.groups, length)
        for bi in range(b):
            for hq in range(arch.n_heads):
                kv = hq // arch.groups
                pq = q[bi, hq, 0] @ proj[kv]
                pk = keys_post[:, bi, kv] @ proj[kv]
                logits[bi, kv, hq % arch.groups] = (pk @ pq) * arch.logit_scale(j)
    k_ref, chosen = _naive_select(logits, 0.01, cap)
    assert k == k_ref
    triton = policy.transfer.gather == "triton"
    assert k < cap  # the padding is exercised
    for (bi, h_), want in chosen.items():
        assert set(idx[bi, h_, :k].tolist()) == want
        if not triton:
            assert (idx[bi, h_, k:] == idx[bi, h_, 0]).all()  # padding: a valid row
    assert torch.equal(bias, torch.tensor([0.0] * k + [-math.inf] * (cap - k)))
    # fetched rows == host rows
    for bi in range(b):
        for h_ in range(arch.n_kv_heads):
            rows = idx[bi, h_, :k] if triton else idx[bi, h_]
            n = rows.shape[0]
            assert torch.equal(keys[bi, h_, :n], cache.store.kv[j, rows, bi, h_, 0])
            assert torch.equal(values[bi, h_, :n], cache.store.kv[j, rows, bi, h_, 1])
            if triton:
                assert not keys[bi, h_, k:].any() and not values[bi, h_, k:].any()
    if triton:  # bytes moved: the selected rows only
        m = policy.metrics()
        assert m["fetched_bytes_per_step"] == pytest.approx(m["selected_bytes_per_step"])


def test_gather_copies_the_selected_rows_and_pads_statically():
    """select.pad + flat_rows + transfer.gather on CPU (the CUDA path runs the same functions
    on the host store's device alias): row r of the output is store row (idx * B*Hkv + lane)."""
    length, b, hkv, d, cap = 20, 2, 3, 4, 6
    store = torch.randn(length, b, hkv, 2, d)
    src = store.view(-1, 2 * d)
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.stack([torch.randperm(length, generator=g)[:cap] for _ in range(hkv)]) for _ in range(b)])
    keep_pos = torch.arange(10)
    for k in (1, 4, cap):
        padded, keep = select.pad(idx, torch.tensor(k), keep_pos)
        assert padded.shape == idx.shape and keep.tolist() == [i < k for i in range(cap)]
        out = torch.full((b * hkv * cap, 2 * d), math.nan)
        got = transfer.gather(src, select.flat_rows(padded, b, hkv), out)
        assert got.data_ptr() == out.data_ptr()
        kv = out.view(b, hkv, cap, 2, d)
        for bi in range(b):
            for h in range(hkv):
                want = store[padded[bi, h], bi, h]  # [cap, 2, d]
                assert torch.equal(kv[bi, h], want)
                assert torch.equal(kv[bi, h, :k], store[idx[bi, h, :k], bi, h])
                assert torch.equal(kv[bi, h, k:], store[idx[bi, h, :1], bi, h].expand(cap - k, 2, d))


@needs_triton
@pytest.mark.parametrize("w,programs,shape", [(256, 4, {}), (24, None, {}), (24, 1000, {}), (256, 1, {}),
                                              (256, 4, {"block_rows": 32, "num_warps": 8}), (24, 2, {"stages": 2}),
                                              (24, 3, {"block_rows": 8})])
def test_triton_gather_reads_the_first_k_rows_of_each_lane(w, programs, shape):
    """kernels.gather_selected against an indexing reference: row t < k of lane l is store row
    idx[l, t] * lanes + l, rows k..cap-1 are zeros, nothing past lanes * cap is written."""
    g = torch.Generator().manual_seed(11)
    length, b, hkv, cap = 40, 2, 3, 9
    lanes = b * hkv
    src = torch.randn(length * lanes, w, generator=g).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(length, generator=g)[:cap] for _ in range(lanes)]).view(b, hkv, cap)
    lane = torch.arange(lanes).view(b, hkv, 1)
    for k in (1, 5, cap):
        out = torch.full((lanes * cap + 3, w), math.nan, dtype=torch.bfloat16)
        got = kernels.gather_selected(src, idx, torch.tensor(k), out, programs, **shape)
        assert got.data_ptr() == out.data_ptr()
        want = src[(idx * lanes + lane).reshape(-1)].view(lanes, cap, w).clone()
        want[:, k:] = 0
        assert torch.equal(out[: lanes * cap].view(lanes, cap, w), want)
        assert out[lanes * cap:].isnan().all()


@needs_triton
def test_triton_gather_self_check_passes_and_names_a_failure(monkeypatch):
    kernels.self_check("cpu")  # the policy runs it at load on CUDA

    def broken(*a, **kw):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(kernels, "_gather_selected", type("K", (), {"__getitem__": lambda self, grid: broken})())
    with pytest.raises(RuntimeError, match="does not build or run here.*C compiler.*Python headers"):
        kernels.self_check("cpu")


def test_unknown_gather_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown gather 'memcpy'"):
        Transfer(torch.device("cpu"), gather="memcpy")


@pytest.mark.parametrize("max_len,n_layers,f", [(2304, 32, 0), (2304, 32, 1), (40, 2, 0), (5, 12, 0), (7, 3, 1)])
def test_chunked_full_copy_covers_every_row_once(max_len, n_layers, f):
    """full_copy "chunked": the pieces made at layers f+1 .. n_layers-1 tile rows 0..max_len, in order."""
    from frameworks.infinigen.cache import full_chunk

    parts = [full_chunk(max_len, n_layers, f, i) for i in range(n_layers)]
    assert all(p is None for p in parts[: f + 1])
    got = [p for p in parts if p is not None]
    assert len(got) == n_layers - 1 - f and got[0][0] == 0 and got[-1][1] == max_len
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
    assert full_chunk(max_len, n_layers, n_layers - 1, n_layers - 1) is None  # the last layer: fetched in its step


def test_unknown_full_copy_is_a_clear_error():
    t = Transfer(torch.device("cpu"))
    t.full_copy = "dma"
    z = torch.zeros(4)
    with pytest.raises(ValueError, match="unknown full_copy 'dma': one of memcpy, chunked, gather"):
        t.launch_full_static(None, 0, torch.tensor(2), None, None, torch.arange(4), z)


def test_selection_shapes_do_not_depend_on_the_data():
    """No host sync: the selected-index tensor's shape is a function of (B, Hkv, cap, L) only;
    the data-dependent count k is a 0-d tensor that is never read on the host."""
    g = torch.Generator().manual_seed(7)
    flat = torch.zeros(2, 2, 4, 40)  # every token ties: k = cap
    peaked = torch.randn(2, 2, 4, 40, generator=g) * 0.01
    peaked[..., 3] = 100.0  # one critical token: k = 1
    shapes, ks = set(), []
    for logits in (flat, peaked, torch.randn(2, 2, 4, 40, generator=g) * 3):
        idx, k = select.select(logits, 2.0, 12)
        padded, keep = select.pad(idx, k, torch.arange(12))
        shapes.add((idx.shape, padded.shape, keep.shape, select.flat_rows(padded, 2, 2).shape, k.shape))
        ks.append(int(k))
    assert len(shapes) == 1 and ks[0] == 12 and ks[1] == 1


def test_device_view_of_pageable_memory_is_a_clear_error():
    from frameworks.infinigen.store import device_view

    with pytest.raises(RuntimeError, match="page-locked|not device-accessible"):
        device_view(torch.zeros(4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="contiguous CPU"):
        device_view(torch.zeros(4, 8).t())


class _HostSync(AssertionError):
    pass


@pytest.mark.parametrize("decode", ["eager", "graph"])
def test_decode_path_never_reads_the_device_on_the_host(monkeypatch, decode):
    """While InfiniGen's hooks, cache update and decode attention run, no tensor is read on the
    host (.item, int/float/bool of a tensor, .tolist, .cpu/.numpy) and nothing has a
    data-dependent shape (nonzero, masked_select, boolean-mask indexing): on CUDA each would
    be a device->host synchronisation. CPU stand-in for torch.cuda.set_sync_debug_mode.
    Graph decode: the whole step the engine captures (the model's forward, transformers' own
    code included) and begin_decode, where a sync would break the capture."""
    from frameworks.hf.graph import DecodeStep
    from frameworks.infinigen import attention
    from frameworks.infinigen.cache import InfiniGenCache

    spec = _spec(LLAMA, kv_budget=0.3, alpha=3.0)
    # decode named either way (graph is the default, eager is transformers as-is)
    spec = CellSpec.from_dict({**spec.to_dict(), "prefill": "eager", "decode": decode})
    eng, policy, model = _engine(spec, InfiniGenPolicy)
    state = {"on": 0, "calls": 0}

    def guard(fn):
        def wrapped(*a, **kw):
            state["on"] += 1
            state["calls"] += 1
            try:
                return fn(*a, **kw)
            finally:
                state["on"] -= 1
        return wrapped

    def forbid(name, orig):
        def f(*a, **kw):
            if state["on"]:
                raise _HostSync(f"host sync in the decode path: {name}")
            return orig(*a, **kw)
        return f

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select",
                 "cpu", "numpy", "unique"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name, getattr(torch.Tensor, name)))
    for name in ("nonzero", "masked_select", "unique", "argwhere"):
        monkeypatch.setattr(torch, name, forbid(name, getattr(torch, name)))
    orig_getitem = torch.Tensor.__getitem__

    def getitem(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if state["on"] and any(isinstance(x, torch.Tensor) and x.dtype == torch.bool for x in keys):
            raise _HostSync("host sync in the decode path: boolean-mask indexing")
        return orig_getitem(self, key)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    monkeypatch.setattr(InfiniGenCache, "on_layer_start", guard(InfiniGenCache.on_layer_start))
    orig_update = InfiniGenCache.layer_update

    def update(self, layer, key, value):  # decode steps only (prefill is allowed to do anything)
        return guard(orig_update)(self, layer, key, value) if key.shape[2] == 1 else orig_update(self, layer, key, value)

    monkeypatch.setattr(InfiniGenCache, "layer_update", update)
    monkeypatch.setattr(attention, "decode_attention", guard(attention.decode_attention))
    if decode == "graph":
        monkeypatch.setattr(DecodeStep, "_step", guard(DecodeStep._step))
        monkeypatch.setattr(InfiniGenCache, "begin_decode", guard(InfiniGenCache.begin_decode))
    eng.generate(_prompts(model), 4)
    assert state["calls"] > 3 * policy.arch.n_layers  # the guards did run
    assert (policy.metrics()["graph_decode_steps"] > 0) == (decode == "graph")


# -- errors, adapter ----------------------------------------------------------------------
def test_unsupported_family_is_a_clear_error():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt_oss"))
    with pytest.raises(Unsupported, match="llama"):
        Arch(fake)


@pytest.mark.parametrize("policy,match", [({"alpha": -1}, "alpha"), ({"partial_weight_ratio": 0}, "partial_weight_ratio"),
                                          ({"full_layers": 0}, "full_layers"), ({"max_num_kv": 0}, "max_num_kv"),
                                          ({"gather_sms": -8}, "gather_sms"), ({"gather_sms": 8.0}, "gather_sms")])
def test_bad_options(policy, match):
    with pytest.raises(ValueError, match=match):
        InfiniGenPolicy(_spec(LLAMA, **policy))


def test_adapter_runs_a_cell_with_metrics():
    from frameworks.infinigen import adapter

    spec = CellSpec(experiment="unit", framework="infinigen", model=LLAMA, device="cpu", dtype="float32",
                    batch_size=2, prompt_len=32, gen_len=4, kv_budget=0.25, prefill="eager", policy={"max_num_kv": 5})
    m = adapter.run(spec)
    assert m.extra["attn_implementation"] == "infinigen_eager"
    assert m.extra["fetched_tokens_per_seq_layer_speculated"] <= 5
    assert m.kv_cache_bytes > 0 and m.extra["host_kv_bytes"] > 0
    g = adapter.run(CellSpec.from_dict({**spec.to_dict(), "decode": "graph"}))  # a whole cell in graph decode
    assert g.extra["decode"] == "graph" and g.extra["infinigen_graph_fallback"] is None
    assert g.extra["graph_decode_steps"] == g.extra["decode_steps"] > 0
    assert g.extra["fetched_tokens_per_step"] == m.extra["fetched_tokens_per_step"]
    # the gather's own SMs are a CUDA graph-decode setting: recorded, and not applicable on a CPU
    assert g.extra["infinigen"]["gather_sms"] == 8 and g.extra["sm_partition"] is None and m.extra["sm_partition"] is None
    # so are the fused speculation and the copy-engine full-layer copy: the torch path and no copy on a CPU
    assert g.extra["infinigen"]["speculation"] == "torch" and g.extra["infinigen"]["full_copy"] is None


def test_green_partition_is_unavailable_without_cuda():
    from frameworks.infinigen import green

    if torch.cuda.is_available():
        pytest.skip("a CUDA device: the GPU check (benchmarks/gpu_infinigen_graph.py) runs the partition")
    with pytest.raises(green.Unavailable, match="CUDA"):
        green.partition(8)


# -- prefill is prefill whatever the chunking (issue #10 items 2, 3) ------------------------
@pytest.mark.parametrize("name", [LLAMA, OPT])
@pytest.mark.parametrize("prompt_len,chunk", [(33, 8), (25, 8), (17, 4), (32, 8)])
def test_chunked_prefill_equals_eager_and_counts_only_decode_steps(name, prompt_len, chunk):
    """A one-token last chunk (33 = 4 x 8 + 1) attends to the whole prompt, as in eager prefill,
    not to the budget-selected tokens; decode_steps counts the decode forwards only."""
    gen, b = 5, 3
    got = {}
    for prefill in ("eager", "chunked"):
        s = CellSpec(experiment="unit", framework="infinigen", model=name, device="cpu", dtype="float32",
                     prefill=prefill, chunk_size=chunk, kv_budget=0.2, batch_size=b, prompt_len=32, gen_len=gen)
        eng, policy, model = _engine(s, InfiniGenPolicy)
        eng.generate(_prompts(model, b=b, n=prompt_len), gen)
        got[prefill] = torch.stack(eng.step_logits), eng.last_tokens, policy.metrics()["decode_steps"]
    (e_logits, e_tokens, e_steps), (c_logits, c_tokens, c_steps) = got["eager"], got["chunked"]
    assert (c_logits - e_logits).abs().max() < ATOL
    assert torch.equal(c_tokens, e_tokens)
    assert e_steps == c_steps == gen - 1


def test_warmup_is_not_counted_in_the_metrics():
    from frameworks.infinigen import adapter

    spec = CellSpec(experiment="unit", framework="infinigen", model=LLAMA, device="cpu", dtype="float32",
                    batch_size=2, prompt_len=16, gen_len=4, kv_budget=0.5, prefill="eager", warmup=1, repetitions=2)
    m = adapter.run(spec)
    assert m.extra["decode_steps"] == 2 * (4 - 1)  # 2 repetitions of 3 decode steps; the warm-up's 3 not counted


# -- upstream's behaviour, on models whose norm weights are not all 1 (issue #10 item 4) -------
def _engine_uneven_norms(spec, seed=0):
    """As _engine, with every norm weight (and OPT's norm bias) drawn away from 1 / 0 before the
    policy is prepared: with norm weights all 1 layer i's and layer i+1's norms coincide and
    the speculation-input difference is invisible."""
    policy = InfiniGenPolicy(spec)
    model = models.build(spec.model, "random", "cpu", "float32", policy.attn_implementation(spec.prefill), 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(0.3 + 1.4 * torch.rand(p.shape, generator=g))
            elif "norm" in n and n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    policy.prepare(model)
    eng = Engine(model, policy, "cpu", spec.prefill, spec.chunk_size)
    eng.collect_logits = True
    return eng, policy, model


def _uspec(name, prefill="eager", **policy):
    return CellSpec(experiment="unit", framework="infinigen", model=name, device="cpu", dtype="float32",
                    prefill=prefill, chunk_size=16, kv_budget=0.5, policy=policy, batch_size=2, prompt_len=40,
                    gen_len=3)


def _record_partial_queries(monkeypatch):
    seen = []
    orig = skew.partial_query

    def wrapped(arch, j, sk, x, pe=None, table=None, norm=None):
        out = orig(arch, j, sk, x, pe, table, norm)
        seen.append((j, x, pe, sk, out))
        return out

    monkeypatch.setattr(skew, "partial_query", wrapped)
    return seen


@pytest.mark.parametrize("name", [LLAMA, OPT])
@pytest.mark.parametrize("option,norm_of", [("own_norm", lambda j: j - 1), ("next_norm", lambda j: j)])
def test_speculation_input_is_the_speculating_layers_normalised_input(name, option, norm_of, monkeypatch):
    """Upstream (own_norm): layer j's partial query is made from layer j-1's normalised attention
    input, i.e. layer j-1's norm; next_norm: layer j's norm on the same un-normalised input."""
    eng, policy, model = _engine_uneven_norms(_uspec(name, speculation_input=option))
    arch = policy.arch
    seen = _record_partial_queries(monkeypatch)
    eng.generate(_prompts(model, n=40), 3)
    assert seen
    other = {"own_norm": lambda j: j, "next_norm": lambda j: j - 1}[option]
    for j, x, pe, sk, got in seen:
        def reference(norm_layer):
            attn = arch.attn(j)
            b = x.shape[0]
            q = attn.q_proj(arch.norm(norm_layer)(x)).view(b, 1, arch.n_heads, arch.head_dim).transpose(1, 2)
            if arch.rope:
                cos, sin = pe
                half = arch.head_dim // 2
                q = q * cos[:, None] + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin[:, None]
            else:
                q = q * attn.scaling
            q = q.view(b, arch.n_kv_heads, arch.groups, arch.head_dim)
            return torch.einsum("bhgd,hdr->bhgr", q, sk.proj) * arch.logit_scale(j)

        with torch.inference_mode():
            want, wrong = reference(norm_of(j)), reference(other(j))
        scale = want.abs().max()
        assert (got - want).abs().max() / scale < 1e-4
        assert (got - wrong).abs().max() / scale > 1e-2  # the two inputs really differ here


@pytest.mark.parametrize("name", [LLAMA, OPT])
def test_partial_columns_are_picked_from_each_prompt_at_prefill(name):
    """Upstream (partial_weight_index_generation): per head, the columns of largest summed
    |skewed query| over the prompt of the batch's first sequence; the partial keys use them.
    partial_columns=warmup keeps the warm-up's columns."""
    eng, policy, model = _engine_uneven_norms(_uspec(name))
    arch, j = policy.arch, 1
    sk = policy.skews[j]
    r = sk.cols.shape[-1]
    chosen = []
    for seed in (1, 2):
        sink = arch.attn(j)._infinigen_capture = []
        caches = []
        orig = policy.new_cache
        policy.new_cache = lambda *a, **k: caches.append(orig(*a, **k)) or caches[-1]
        try:
            eng.generate(_prompts(model, n=40, seed=seed), 2)
        finally:
            policy.new_cache = orig
            del arch.attn(j)._infinigen_capture
        q = sink[0][0]  # the prefill forward's queries [B, Hq, 40, d], as the attention got them
        assert q.shape[2] == 40
        cache = caches[-1]
        want = []
        for h in range(arch.n_kv_heads):
            qh = q[0, h * arch.groups:(h + 1) * arch.groups].reshape(-1, arch.head_dim).float()
            if sk.rot is not None:
                qh = qh @ sk.rot[h]
            want.append(sorted(qh.abs().sum(0).topk(r).indices.tolist()))
        assert cache.parts[j].cols.tolist() == want
        keys = cache.store.prefix(j, 40)[..., 0, :].permute(1, 2, 0, 3)  # [B, Hkv, L, d]
        assert torch.allclose(cache.partial_k[j][:, :, :40], keys @ cache.parts[j].proj, atol=1e-5)
        chosen.append(want)
    assert chosen[0] != chosen[1]  # each prompt its own columns
    eng2, policy2, model2 = _engine_uneven_norms(_uspec(name, partial_columns="warmup"))
    caches = []
    orig = policy2.new_cache
    policy2.new_cache = lambda *a, **k: caches.append(orig(*a, **k)) or caches[-1]
    eng2.generate(_prompts(model2, n=40, seed=1), 2)
    assert torch.equal(caches[-1].parts[j].cols, policy2.skews[j].cols)


@pytest.mark.parametrize("name", [LLAMA, OPT])
def test_prompt_columns_do_not_depend_on_the_chunking(name):
    got = {}
    for prefill in ("eager", "chunked"):
        eng, policy, model = _engine_uneven_norms(_uspec(name, prefill=prefill))
        eng.generate(_prompts(model, n=40, seed=4), 4)
        got[prefill] = torch.stack(eng.step_logits)
    assert (got["eager"] - got["chunked"]).abs().max() < ATOL


@pytest.mark.parametrize("name", [LLAMA, OPT])
def test_alpha_zero_fetches_nothing_beyond_the_full_layers(name):
    """Upstream: int(mean count) with no token above max - 0 is 0 tokens; min_fetch=1 keeps one."""
    for min_fetch, per_layer in ((0, 0), (1, 1)):
        eng, policy, model = _engine_uneven_norms(_uspec(name, alpha=0.0, min_fetch=min_fetch))
        eng.generate(_prompts(model, n=40), 4)
        m = policy.metrics()
        assert m["speculated_layers"] >= 1 and m["decode_steps"] == 3
        assert m["fetched_tokens_per_seq_layer_speculated"] == per_layer
        assert m["fetched_tokens_per_step_speculated"] == per_layer * 2 * m["speculated_layers"]
        assert torch.isfinite(torch.stack(eng.step_logits)).all()  # nothing but the new token attended


def test_budget_is_a_fixed_cap_from_the_whole_sequence_by_default():
    """kv_budget x (prompt_len + gen_len) tokens for the whole cell, as upstream's max_num_kv;
    budget_rule=current: kv_budget x the current length; max_num_kv overrides both."""
    fixed = InfiniGenPolicy(_uspec(LLAMA))  # kv_budget 0.5, 40 + 3 tokens
    assert [fixed.cap(n) for n in (10, 40, 41, 42)] == [10, 21, 21, 21]
    current = InfiniGenPolicy(_uspec(LLAMA, budget_rule="current"))
    assert [current.cap(n) for n in (10, 40, 41, 42)] == [5, 20, 20, 21]
    assert InfiniGenPolicy(_uspec(LLAMA, max_num_kv=7)).cap(40) == 7
    for rule, want in (("fixed", 21), ("current", (20 + 20 + 21) / 3)):  # decode steps see 40, 41, 42 tokens
        eng, policy, model = _engine_uneven_norms(_uspec(LLAMA, alpha=math.inf, budget_rule=rule))
        eng.generate(_prompts(model, n=40), 4)
        assert policy.metrics()["fetched_tokens_per_seq_layer_speculated"] == pytest.approx(want)
