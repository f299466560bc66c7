"""InfiniGen's fused speculation (frameworks/infinigen/fused.py) against the torch path it replaces
on CUDA (skew.partial_query's RoPE folding + select.scores + select.select + the fetch's bias),
under Triton's interpreter on CPU tensors (float32: the interpreter's bfloat16 is not the GPU's;
benchmarks/gpu_infinigen_graph.py compares the two paths in bf16 on the GPU). In a model:
tests/unit/test_graph_decode.py (graph == eager) and below (fused == torch, same tokens)."""

from __future__ import annotations

import pytest
import torch

from frameworks.infinigen import fused, select
from frameworks.infinigen.policy import InfiniGenPolicy

pytestmark = pytest.mark.skipif(not fused.available(), reason="triton is not installed")


def _reference(pq, pk, n, alpha, cap, min_fetch, limit):
    if limit is None:
        return select.select(select.scores(pq, pk[:, :, :n]), alpha, cap, min_fetch)
    logits = select.scores(pq, pk).masked_fill_(torch.arange(pk.shape[2]) >= n, float("-inf"))
    return select.select(logits, alpha, cap, min_fetch, limit)


def _inputs(b, hkv, g, d, r, length, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, hkv * g * d, generator=gen)
    table = torch.randn(b, 1, 1, 2 * d, generator=gen)
    qproj = torch.randn(hkv, 2 * d, r, generator=gen) / d
    pk = torch.randn(b, hkv, length, r, generator=gen)
    qq = q.view(b, hkv, g, d)
    pq = torch.matmul(torch.cat((qq, qq), dim=-1) * table, qproj)  # skew.partial_query's RoPE folding
    return q, table, qproj, pk, pq


@pytest.mark.parametrize("select_kernel", [False, True])
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("alpha,min_fetch", [(0.3, 0), (2.0, 7), (float("inf"), 0), (0.0, 3)])
@pytest.mark.parametrize("shape", [(2, 2, 4, 16, 5, 300, 257), (1, 3, 2, 8, 3, 1200, 1100)])  # several slices a lane
def test_fused_speculation_selects_as_the_torch_path(rope, static, alpha, min_fetch, shape, select_kernel):
    b, hkv, g, d, r, length, n = shape
    q, table, qproj, pk, pq = _inputs(b, hkv, g, d, r, length, seed=length + int(static))
    cap = 60
    limit = torch.tensor(50) if static else None
    want_idx, want_k = _reference(pq, pk, n, alpha, cap, min_fetch, limit)
    bias = torch.full((cap + 5,), 7.0)
    k_sum, kb_sum = torch.tensor(3), torch.tensor(5)
    args = (q, table, qproj) if rope else (pq.contiguous(), None, None)
    idx, k = fused.speculate(*args, pk, torch.tensor(n) if static else n, g, alpha, cap, min_fetch, bias, k_sum,
                             kb_sum, limit=limit, select_kernel=select_kernel)
    k = int(k)
    if select_kernel:  # a set in position order, the rest token 0
        assert bool((idx[..., :k].diff(dim=-1) > 0).all()) and bool((idx[..., k:] == 0).all())
    assert k == int(want_k) and idx.shape == want_idx.shape
    if 0 < k < cap:
        assert (want_idx.shape[-1] == cap)
    # the first k are the same tokens (the order within may differ only on exact ties)
    assert torch.equal(idx[..., :k].sort(-1).values, want_idx[..., :k].sort(-1).values)
    assert bool((idx < n).all())
    assert torch.equal(bias[:k], torch.zeros(k)) and bool(torch.isinf(bias[k:cap]).all())
    assert torch.equal(bias[cap:], torch.full((5,), 7.0)), "nothing past the budget is written"
    assert int(k_sum) == 3 + k and int(kb_sum) == 5 + k * b


def test_fused_speculation_counts_only_valid_positions():
    """alpha = inf: every valid position is within alpha of the max, none past n (masked, not read:
    the eager buffer's tail holds anything, NaN included)."""
    q, table, qproj, pk, _ = _inputs(1, 2, 2, 8, 4, 200, seed=0)
    pk[:, :, 150:] = float("nan")
    bias, sums = torch.zeros(200), (torch.tensor(0), torch.tensor(0))
    idx, k = fused.speculate(q, table, qproj, pk, 150, 2, float("inf"), 200, 0, bias, *sums)
    assert int(k) == 150 and idx.shape[-1] == 150 and bool((idx < 150).all())
    assert sorted(idx[0, 0].tolist()) == list(range(150))


@pytest.mark.parametrize("k", [0, 1, 37, 100])
def test_select_kernel_takes_ties_by_position(k):
    """Equal scores: the k best are the higher ones, then the tied ones in position order; -inf
    (masked) positions only when nothing else is left."""
    per_kv = torch.full((1, 2, 100), 1.0)
    per_kv[0, 0, 10:20] = 2.0
    per_kv[0, 1, 50:] = float("-inf")
    k_t, idx = torch.tensor(k), torch.full((1, 2, 100), -1, dtype=torch.long)
    fused._select[(2,)](per_kv, k_t, idx, 100, 100, BLOCK=128, CAP_BLOCKS=1, CAP_BLOCK=128, num_warps=8)
    want0 = sorted((list(range(10, 20)) + [p for p in range(100) if not 10 <= p < 20])[:k])
    assert idx[0, 0, :k].tolist() == want0 and idx[0, 0, k:].eq(0).all()
    assert idx[0, 1, :k].tolist() == list(range(k))  # the 50 finite ones first, then -inf ones by position


def test_bad_speculation_setting_is_a_clear_error():
    from frameworks.harness.spec import CellSpec

    class Bad(InfiniGenPolicy):
        speculation = "magic"

    spec = CellSpec(experiment="unit", framework="infinigen", model="tiny-llama-3.1", device="cpu", dtype="float32",
                    prefill="sdpa", kv_budget=0.5, batch_size=1, prompt_len=16, gen_len=2)
    from frameworks import models

    pol = Bad(spec)
    model = models.build(spec.model, "random", "cpu", "float32", pol.attn_implementation("sdpa"), 0)
    with pytest.raises(ValueError, match="unknown speculation 'magic'"):
        pol.prepare(model)


class _Fused(InfiniGenPolicy):
    gather, speculation = "triton", "fused"


class _Torch(InfiniGenPolicy):
    gather, speculation = "triton", "torch"


class _FusedSelect(_Fused):
    fused_select = True


# Llama with torch's topk: tests/unit/test_graph_decode.py (graph == eager with the fused speculation)
@pytest.mark.parametrize("model,cls", [("tiny-opt", _Fused), ("tiny-llama-3.1", _FusedSelect)])
def test_fused_speculation_generates_as_the_torch_path(model, cls):
    """A model's decode with the fused speculation: the same logits and tokens as with the torch
    path, and the same counters (k summed by the fused finish kernel)."""
    from tests.unit.test_infinigen import _generate, _spec

    spec = _spec(model, kv_budget=0.4, alpha=0.05, min_fetch=1)
    lt, tt, pt = _generate(spec, _Torch)
    lf, tf, pf = _generate(spec, cls)
    assert pf.fused_speculation and not pt.fused_speculation
    torch.testing.assert_close(lf, lt, atol=1e-4, rtol=1e-4)
    assert torch.equal(tf, tt)
    mt, mf = pt.metrics(), pf.metrics()
    keys = ("fetched_tokens_per_seq_layer_speculated", "fetched_bytes_per_step", "selected_bytes_per_step")
    assert {k: mf[k] for k in keys} == {k: mt[k] for k in keys}
    assert 0 < mf["fetched_tokens_per_seq_layer_speculated"]
