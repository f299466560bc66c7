"""H2O's Triton kernels (frameworks/h2o/kernels.py) against the torch path they replace.

On a machine without a GPU they run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on CPU tensors; benchmarks/gpu_engine.py checks the compiled kernels on a GPU.
Tolerances (float32 inputs, float32 accumulation in both paths, different summation order):
column sums within rtol 1e-5 / atol 1e-5 of a float64 reference; a decode step's output within
atol 1e-5, its scores within rtol 1e-5 / atol 1e-6 of the torch step, positions, slots and the
evicted slot exactly equal; whole generations: logits within rtol/atol 1e-4, same greedy tokens,
same kept positions.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from frameworks.h2o import attention, kernels
from frameworks.h2o.cache import H2OLayer
from frameworks.h2o.policy import H2OPolicy
from frameworks.harness import workload
from frameworks.harness.spec import CellSpec

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


class TritonH2OPolicy(H2OPolicy):
    """The CUDA default (Triton kernels), here under Triton's interpreter."""

    kernel = "triton"


def _reference_columns(q, k, scaling):
    """Column sums from the whole causal probability matrix, float64."""
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    logits = (q.double() @ attention.repeat_kv(k.double(), g).transpose(-1, -2)) * scaling
    p = torch.softmax(logits.masked_fill(~attention._causal(lq, lk, "cpu"), float("-inf")), -1)
    return p.sum(2).view(b, hkv, g, lk).sum(2), torch.logsumexp(logits.masked_fill(~attention._causal(lq, lk, "cpu"),
                                                                                  float("-inf")), -1)


# (batch, query heads, KV heads, chunk rows, keys, head dim, tile): GQA and MHA, a first chunk and
# later ones, ragged last blocks of rows and keys, a one-row chunk, several blocks per program
SHAPES = [(2, 8, 2, 37, 37, 32, None), (1, 4, 1, 21, 100, 16, {"BLOCK_M": 16, "BLOCK_N": 32}),
          (1, 4, 1, 21, 100, 16, {"BLOCK_M": 16, "BLOCK_N": 32, "DIAG_MASK": False}),  # the mask on every block
          (2, 4, 2, 40, 150, 16, {"BLOCK_M": 16, "BLOCK_N": 16}),  # most blocks below the diagonal
          (2, 2, 2, 5, 70, 32, {"BLOCK_M": 16, "BLOCK_N": 16}), (1, 8, 2, 1, 45, 32, None),
          (1, 8, 2, 50, 50, 64, {"BLOCK_M": 16, "BLOCK_N": 16})]


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d,tile", SHAPES)
def test_column_scores_equal_the_full_matrix(b, hq, hkv, lq, lk, d, tile):
    g = torch.Generator().manual_seed(lq * lk)
    q, k = torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g)
    scaling = 3 * d ** -0.5  # sharp rows: the probabilities are far from uniform
    expected, lse = _reference_columns(q, k, scaling)
    torch.testing.assert_close(attention.blockwise_lse(q, k, scaling, block_elems=200).double(), lse, rtol=1e-5, atol=1e-5)
    col = kernels.column_scores(q, k, attention.blockwise_lse(q, k, scaling), scaling, tile)
    torch.testing.assert_close(col.double(), expected, rtol=1e-5, atol=1e-5)
    assert col.sum().item() == pytest.approx(b * hq * lq, rel=1e-5)  # every query row's probabilities sum to 1


def test_column_scores_reject_bad_shapes():
    q, k = torch.randn(1, 6, 4, 16), torch.randn(1, 4, 8, 16)  # 6 query heads over 4 KV heads
    with pytest.raises(ValueError, match="h2o kernels"):
        kernels.column_scores(q, k, torch.zeros(1, 6, 4), 1.0)
    with pytest.raises(ValueError, match="lse"):
        kernels.column_scores(torch.randn(1, 4, 4, 16), k, torch.zeros(1, 4, 4, dtype=torch.float64), 1.0)


def test_flash_with_lse_off_cuda_is_sdpa_and_the_torch_lse():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 8, 9, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g)
    out, lse, which = attention.flash_with_lse(q, k, v, 0.25)
    assert which.startswith("sdpa + torch lse")
    torch.testing.assert_close(out, attention.sdpa_causal(q, k, v, 0.25))
    torch.testing.assert_close(lse.double(), _reference_columns(q, k, 0.25)[1], rtol=1e-5, atol=1e-5)


def _layer_pair(b, hkv, d, prompt_len, heavy, recent, seed):
    """Two layers in the same state after the same prompt: torch and fused decode steps."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, hkv, prompt_len, d, generator=g), torch.randn(b, hkv, prompt_len, d, generator=g)
    col = torch.rand(b, hkv, prompt_len, generator=g) * 4
    layers = []
    for kernel in ("torch", "triton"):
        layer = H2OLayer(lambda n: (heavy, recent), prompt_len, step_kernel=kernel)
        layer.update(k.clone(), v.clone())
        layer.add_prompt_scores(col.clone())  # the prompt is complete: compacted into the slots
        layers.append(layer)
    return layers, g


def _attend(layer, q, k, v, scaling):
    """One decode step through the registered attention function, as the model calls it."""
    module = SimpleNamespace(layer_idx=0, h2o_policy=SimpleNamespace(cache=SimpleNamespace(layers=[layer])))
    keys, values = layer.update(k, v)
    return attention.h2o_chunked(module, q, keys, values, scaling=scaling)[0]


# decode_step's forms: the split step with one block per split, with several blocks per split
# (few programs wanted), and the one-pass step
FORMS = [("split", 1024), ("split", 2), ("onepass", 1024)]


@pytest.mark.parametrize("mode,programs", FORMS)
@pytest.mark.parametrize("b,hq,hkv,d,prompt_len,heavy,recent", [
    (2, 8, 2, 32, 60, 20, 9),  # GQA, 30 slots: one block
    (1, 4, 4, 16, 300, 80, 70),  # MHA, 151 slots: three blocks, the last ragged
    (3, 4, 1, 32, 40, 12, 0),  # heavy hitters only: nothing is protected
    (1, 8, 2, 16, 700, 150, 40),  # 191 slots, GQA: split 1024 -> 3 splits of one block, 2 -> 1 split of 3
])
def test_fused_decode_step_equals_the_torch_step(b, hq, hkv, d, prompt_len, heavy, recent, mode, programs, monkeypatch):
    monkeypatch.setattr(kernels, "DECODE_MODE", mode)
    monkeypatch.setattr(kernels, "DECODE_TARGET_PROGRAMS", programs)
    (ref, fused), g = _layer_pair(b, hkv, d, prompt_len, heavy, recent, seed=prompt_len)
    scaling = 4 * d ** -0.5
    for step in range(6):  # the first step appends (torch in both), the rest overwrite a freed slot
        q, k, v = torch.randn(b, hq, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g), torch.randn(b, hkv, 1, d, generator=g)
        want = _attend(ref, q, k, v, scaling)
        got = _attend(fused, q, k, v, scaling)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(fused.scores, ref.scores, rtol=1e-5, atol=1e-6)
        for name in ("keys", "values", "pos", "free", "seen_t"):
            assert torch.equal(getattr(fused, name), getattr(ref, name)), (step, name)
        assert torch.equal(fused.kept_positions(), ref.kept_positions())
    assert fused.incoming is None and fused.step_kernel == "triton" and fused.fused


def test_split_blocks(monkeypatch):
    monkeypatch.setattr(kernels, "DECODE_TARGET_PROGRAMS", 1024)
    assert kernels.split_blocks(1, 8, 409) == (7, 1)  # batch 1: one block of 64 slots per program
    assert kernels.split_blocks(64, 8, 409) == (2, 4)  # 512 (sequence, head) pairs: two splits
    assert kernels.split_blocks(256, 8, 409) == (1, 7)  # the GPU is full: one program per pair
    assert kernels.split_blocks(1, 8, 30) == (1, 1)


# -- whole generations on the tiny models ---------------------------------------------------------
def _run(s: CellSpec, policy_cls, ids):
    from frameworks import models
    from frameworks.hf.engine import Engine

    policy = policy_cls(s)
    model = models.build(s.model, "random", "cpu", "float32", policy.attn_implementation(s.prefill), seed=0)
    with torch.no_grad():  # sharpened attention: the selection depends on content
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)
    policy.prepare(model)
    engine = Engine(model, policy, "cpu", s.prefill, s.chunk_size, max_len=s.prompt_len + s.gen_len)
    engine.collect_logits = True
    engine.generate(ids[::-1].copy(), 4)  # a warm-up batch: the second one reuses the cache and step
    engine.generate(ids, s.gen_len)
    return policy, engine


def _spec(model, decode, prefill, **policy):
    return CellSpec.from_dict(dict(experiment="t", framework="h2o", model=model, batch_size=3, prompt_len=33, gen_len=9,
                                   prefill=prefill, chunk_size=8, device="cpu", dtype="float32", decode=decode,
                                   kv_budget=0.4, policy=policy))


@pytest.mark.parametrize("model", ["tiny-llama-3.1", "tiny-opt"])
def test_triton_graph_generation_equals_torch_eager(model):
    """Chunked prefill (a one-token last chunk) with the score kernel, then graph decode with the
    fused step, against the torch path's eager decode with the blockwise scores."""
    ids = np.random.default_rng(11).integers(0, 1000, (3, 33))
    ref_policy, ref = _run(_spec(model, "eager", "chunked"), H2OPolicy, ids)
    policy, got = _run(_spec(model, "graph", "chunked"), TritonH2OPolicy, ids)
    assert (policy.score_kernel, policy.step_kernel) == ("triton", "triton")
    assert (ref_policy.score_kernel, ref_policy.step_kernel) == ("torch", "torch")
    torch.testing.assert_close(torch.stack(got.step_logits), torch.stack(ref.step_logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(got.last_tokens, ref.last_tokens)
    for a, b in zip(policy.cache.layers, ref_policy.cache.layers):
        assert torch.equal(a.kept_positions(), b.kept_positions())
    assert policy.metrics()["h2o_prefill_attention"].startswith("sdpa + torch lse (not CUDA)")


def test_triton_chunked_prefill_equals_eager_prefill():
    """Issue #10's equality, with the score kernel: the chunked prompt (several chunks and a
    2-token last one) keeps the same tokens as the eager, materialised prefill."""
    s = _spec("tiny-llama-3.1", "eager", "eager", heavy_size=6, recent_size=4)
    ids = workload.prompts(5, 3, 26, 1000)
    eager_policy, eager = _run(s, H2OPolicy, ids)
    chunked_policy, chunked = _run(CellSpec.from_dict({**s.to_dict(), "prefill": "chunked"}), TritonH2OPolicy, ids)
    assert chunked_policy.score_kernel == "triton" and chunked_policy.step_kernel == "torch"  # eager decode: torch
    torch.testing.assert_close(torch.stack(chunked.step_logits), torch.stack(eager.step_logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(chunked.last_tokens, eager.last_tokens)
    for a, b in zip(eager_policy.cache.layers, chunked_policy.cache.layers):
        assert torch.equal(a.kept_positions(), b.kept_positions())


def test_kernel_choice():
    cpu = _spec("tiny-llama-3.1", "graph", "chunked")
    assert (H2OPolicy(cpu).score_kernel, H2OPolicy(cpu).step_kernel) == ("torch", "torch")  # CPU: the torch path
    assert TritonH2OPolicy(_spec("tiny-llama-3.1", "eager", "eager")).step_kernel == "torch"  # eager decode: as-is
    with pytest.raises(ValueError, match="kernel must be"):
        type("P", (H2OPolicy,), {"kernel": "cuda"})(cpu)
